//! The client's checks on an enclave's channel document, each refusal with its code.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use cloister_attestation::nsm::{AttestationRequest, DEFAULT_NSM_VALIDITY, Nsm, PlatformDir};
use cloister_attestation::pcr::{self, PCR_LEN, Pcr};
use cloister_channel::encapsulation::{Aes256Gcm, KeyPair};
use cloister_channel::{Expectations, new_nonce, verify};
use cloister_proto::ErrorCode;

struct Platform {
    dir: tempfile::TempDir,
    nsm: Nsm,
}

fn platform() -> Platform {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = PlatformDir::new(dir.path());
    p.init("channel-test", DEFAULT_NSM_VALIDITY).expect("init");
    Platform {
        nsm: Nsm::load(&p).expect("nsm"),
        dir,
    }
}

impl Platform {
    fn root_pem(&self) -> Vec<u8> {
        std::fs::read(PlatformDir::new(self.dir.path()).root_cert()).expect("root")
    }

    fn document(
        &self,
        pcrs: BTreeMap<usize, Pcr>,
        key: &KeyPair,
        nonce: &[u8],
        at: SystemTime,
    ) -> Vec<u8> {
        self.nsm
            .attest(
                &AttestationRequest {
                    module_id: "i-enclave".into(),
                    pcrs,
                    public_key: Some(key.config().public_key.to_vec()),
                    user_data: Some(key.config().encode::<Aes256Gcm>()),
                    nonce: Some(nonce.to_vec()),
                },
                at,
            )
            .expect("attest")
    }
}

fn production_pcrs() -> BTreeMap<usize, Pcr> {
    let mut pcrs: BTreeMap<usize, Pcr> = (0..16).map(|i| (i, [0; PCR_LEN])).collect();
    pcrs.insert(0, pcr::measure(b"image"));
    pcrs.insert(1, pcr::measure(b"runtime"));
    pcrs.insert(2, pcr::measure(b"code"));
    pcrs
}

fn expect(p: &Platform) -> Expectations {
    Expectations::from_root_pem(&p.root_pem())
        .expect("root")
        .pcr(0, pcr::measure(b"image").to_vec())
}

#[test]
fn a_fresh_document_of_the_expected_enclave_binds_its_channel_key() {
    let p = platform();
    let key = KeyPair::generate(5);
    let nonce = new_nonce();
    let doc = p.document(production_pcrs(), &key, &nonce, SystemTime::now());
    let enclave = verify(&doc, &nonce, &expect(&p)).expect("verify");
    assert_eq!(enclave.key_config(), key.config().encode::<Aes256Gcm>());
    assert_eq!(enclave.document().module_id, "i-enclave");
    // Only that key opens what the client seals.
    let (request, _) = enclave.seal(b"record").expect("seal");
    assert!(key.open_request::<Aes256Gcm>(&request).is_ok());
    assert!(
        KeyPair::generate(5)
            .open_request::<Aes256Gcm>(&request)
            .is_err()
    );
}

#[test]
fn each_mismatch_is_refused_with_its_code() {
    let p = platform();
    let key = KeyPair::generate(1);
    let nonce = new_nonce();
    let now = SystemTime::now();
    let good = p.document(production_pcrs(), &key, &nonce, now);

    let other_pcr0 = expect(&p).pcr(0, pcr::measure(b"another image").to_vec());
    let e = verify(&good, &nonce, &other_pcr0).expect_err("other PCR0");
    assert_eq!(e.code(), "E-ATTEST-PCR-MISMATCH", "{e}");

    let e = verify(&good, &new_nonce(), &expect(&p)).expect_err("other nonce");
    assert_eq!(e.code(), "E-ATTEST-NONCE", "{e}");

    let old = p.document(
        production_pcrs(),
        &key,
        &nonce,
        now - Duration::from_secs(600),
    );
    let e = verify(&old, &nonce, &expect(&p)).expect_err("old");
    assert_eq!(e.code(), "E-ATTEST-STALE", "{e}");
    assert!(verify(&old, &nonce, &expect(&p).max_age(Duration::from_secs(900))).is_ok());

    let debug = p.document(
        (0..16).map(|i| (i, [0; PCR_LEN])).collect(),
        &key,
        &nonce,
        now,
    );
    let e = verify(&debug, &nonce, &expect(&p)).expect_err("debug");
    assert_eq!(e.code(), "E-ATTEST-DEBUG-ENCLAVE", "{e}");
    let zeros = expect(&p).pcr(0, vec![0; PCR_LEN]).allow_debug(true);
    assert!(verify(&debug, &nonce, &zeros).is_ok(), "allowed when asked");

    let stranger = platform();
    let e = verify(&good, &nonce, &expect(&stranger)).expect_err("other root");
    assert_eq!(e.code(), "E-ATTEST-UNTRUSTED-ROOT", "{e}");
    // Signed by another platform's NSM, presented with this platform's chain.
    let foreign = stranger.document(production_pcrs(), &key, &nonce, now);
    let mut spliced = foreign.clone();
    let sig_len = 64;
    let good_sig = &good[good.len() - sig_len..];
    let end = spliced.len();
    spliced[end - sig_len..].copy_from_slice(good_sig);
    assert!(verify(&spliced, &nonce, &expect(&stranger)).is_err());

    let e = verify(
        &good,
        &nonce,
        &Expectations::from_root_pem(&p.root_pem()).expect("root"),
    )
    .expect_err("no PCR");
    assert_eq!(e.code(), "E-CHANNEL-EXPECTATION", "{e}");

    // Pinning only what the parent chooses (PCR3/4) or the runtime (PCR1)
    // would accept any image the parent starts.
    let root_only = Expectations::from_root_pem(&p.root_pem()).expect("root");
    let runtime_only = root_only
        .clone()
        .pcr(1, pcr::measure(b"runtime").to_vec())
        .pcr(3, [0; PCR_LEN].to_vec());
    let e = verify(&good, &nonce, &runtime_only).expect_err("no image PCR");
    assert_eq!(e.code(), "E-CHANNEL-EXPECTATION", "{e}");
    assert!(
        verify(
            &good,
            &nonce,
            &root_only.pcr(2, pcr::measure(b"code").to_vec())
        )
        .is_ok()
    );
    // A nonce too short to be a challenge, even one the document carries.
    let short = [7u8; 8];
    let doc = p.document(production_pcrs(), &key, &short, now);
    let e = verify(&doc, &short, &expect(&p)).expect_err("short nonce");
    assert_eq!(e.code(), "E-CHANNEL-EXPECTATION", "{e}");

    for bad in [
        &b""[..],
        b"not pem",
        b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
    ] {
        let e = Expectations::from_root_pem(bad).expect_err("bad root");
        assert_eq!(e.code(), "E-CHANNEL-EXPECTATION", "{e}");
    }

    for cut in [0, 10, good.len() / 2, good.len() - 1] {
        assert!(
            verify(&good[..cut], &nonce, &expect(&p)).is_err(),
            "truncated at {cut}"
        );
    }
}
