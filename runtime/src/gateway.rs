//! The attested channel's gateway: clients verify the enclave's attestation
//! document, then send Oblivious HTTP requests (RFC 9458) that only this runtime
//! can open; the parent relays ciphertext.
//!
//! In RFC 9458's terms the runtime is the Oblivious Gateway Resource and the
//! workload the Target Resource. Each channel key is an HPKE key pair
//! (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM) made in this process;
//! its private half never leaves it, and never enters the guest. Keys rotate
//! every `rotate` (measured: `cloister.channel.rotate-secs`), and a rotated-out
//! key still opens requests for `grace` (`cloister.channel.grace-secs`), then is
//! dropped (zeroized).
//!
//! **Replay:** a request is accepted at most once per key: the HPKE `enc` of
//! every request a key opened is remembered while the key lives, and a key that
//! has opened [`MAX_REQUESTS_PER_KEY`] requests is rotated out (and, once
//! retired, refuses more). A replay of a request is refused, never answered
//! twice. A key dies with its record of what it opened, so nothing can be
//! replayed after it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use cloister_channel::encapsulation::{
    Aes256Gcm, EncapsulationError, HEADER_LEN, KEY_LEN as ENC_LEN, KeyPair, ResponseSealer,
};
use cloister_proto::ErrorCode;

pub use cloister_channel::message::{ok, refusal, request_body};
/// A key opens at most this many requests (it remembers each one's `enc`).
pub const MAX_REQUESTS_PER_KEY: usize = 100_000;
/// All keys together remember at most this many requests (~20 MB); past it the
/// oldest retired keys are dropped early.
pub const MAX_REMEMBERED: usize = 4 * MAX_REQUESTS_PER_KEY;
/// Measured configuration keys that set the rotation schedule.
pub const ROTATE_KEY: &str = "cloister.channel.rotate-secs";
pub const GRACE_KEY: &str = "cloister.channel.grace-secs";
/// Defaults: a new key every hour, the old one honoured five more minutes.
pub const DEFAULT_ROTATE: Duration = Duration::from_secs(3600);
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);
/// Rotation periods and grace are at most this long.
const MAX_PERIOD: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a channel request is refused before the workload sees it.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("not an encapsulated request of this channel: {0}")]
    Malformed(String),
    #[error(
        "key id {0} is not one of this enclave's live channel keys (rotated out, retired or never issued): fetch the key configuration again"
    )]
    UnknownKey(u8),
    #[error(
        "the encapsulated request does not open with channel key {0}: altered, or sealed to another key"
    )]
    Decrypt(u8),
    #[error("this encapsulated request was already answered once (key {0}): a replay is refused")]
    Replayed(u8),
    #[error("the channel's attestation document could not be made: {0}")]
    Attestation(String),
    #[error("the channel failed internally: {0}")]
    Internal(String),
}

impl ErrorCode for GatewayError {
    fn code(&self) -> &'static str {
        match self {
            GatewayError::Malformed(_) => "E-CHANNEL-MALFORMED",
            GatewayError::UnknownKey(_) => "E-CHANNEL-KEY-UNKNOWN",
            GatewayError::Decrypt(_) => "E-CHANNEL-DECRYPT",
            GatewayError::Replayed(_) => "E-CHANNEL-REPLAYED",
            GatewayError::Attestation(_) => "E-CHANNEL-ATTESTATION",
            GatewayError::Internal(_) => "E-ENCLAVE-INTERNAL",
        }
    }
}

/// A channel key: its key pair (shared with requests being opened) and what
/// it has opened.
struct ChannelKey {
    id: u8,
    pair: Arc<KeyPair>,
    created: Instant,
    opened: HashSet<[u8; ENC_LEN]>,
}

impl ChannelKey {
    fn new(id: u8, now: Instant) -> ChannelKey {
        ChannelKey {
            id,
            pair: Arc::new(KeyPair::generate(id)),
            created: now,
            opened: HashSet::new(),
        }
    }
}

struct Keys {
    current: ChannelKey,
    /// Rotated-out keys and when they stop opening requests.
    retired: Vec<(ChannelKey, Instant)>,
}

/// The channel's keys, rotated lazily as they are used.
pub struct Gateway {
    keys: Mutex<Keys>,
    rotate: Duration,
    grace: Duration,
    /// Requests a key opens before it is retired ([`MAX_REQUESTS_PER_KEY`]).
    max_requests: usize,
    /// Requests all keys remember at most ([`MAX_REMEMBERED`]).
    max_remembered: usize,
}

/// The current key as clients see it.
pub struct Published {
    /// The RFC 9458 key configuration (one, without a length prefix).
    pub config: Vec<u8>,
    /// Its X25519 public key (also inside `config`).
    pub public_key: [u8; 32],
}

/// An opened request and what answers it.
pub struct Opened {
    pub request: Zeroizing<Vec<u8>>,
    pub response: ResponseSealer<Aes256Gcm>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opened({} bytes, redacted)", self.request.len())
    }
}

/// A rotation schedule from the image's measured configuration.
pub fn schedule(get: impl Fn(&str) -> Option<String>) -> Result<(Duration, Duration), String> {
    let read = |key: &str, default: Duration, min: u64| -> Result<Duration, String> {
        let Some(text) = get(key) else {
            return Ok(default);
        };
        match text.parse::<u64>() {
            Ok(secs) if secs >= min && Duration::from_secs(secs) <= MAX_PERIOD => {
                Ok(Duration::from_secs(secs))
            }
            _ => Err(format!(
                "the measured configuration's {key} is {text:?}: expected whole seconds from {min} to {}",
                MAX_PERIOD.as_secs()
            )),
        }
    };
    Ok((
        read(ROTATE_KEY, DEFAULT_ROTATE, 1)?,
        read(GRACE_KEY, DEFAULT_GRACE, 0)?,
    ))
}

fn lock(keys: &Mutex<Keys>) -> std::sync::MutexGuard<'_, Keys> {
    keys.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gateway {
    pub fn new(rotate: Duration, grace: Duration) -> Gateway {
        Gateway {
            keys: Mutex::new(Keys {
                current: ChannelKey::new(0, Instant::now()),
                retired: Vec::new(),
            }),
            rotate,
            grace,
            max_requests: MAX_REQUESTS_PER_KEY,
            max_remembered: MAX_REMEMBERED,
        }
    }

    /// Retires the current key for a new one whose id no live key uses. When
    /// all 255 other ids are in their grace (a very short rotation period, or
    /// quotas exhausted on purpose), the oldest retired key goes first.
    fn rotate_now(&self, keys: &mut Keys, now: Instant) {
        let free = |keys: &Keys| {
            (1..=255u8)
                .map(|step| keys.current.id.wrapping_add(step))
                .find(|id| keys.retired.iter().all(|(k, _)| k.id != *id))
        };
        let id = match free(keys) {
            Some(id) => id,
            None => {
                keys.retired.remove(0);
                free(keys).unwrap_or(keys.current.id.wrapping_add(1))
            }
        };
        let old = std::mem::replace(&mut keys.current, ChannelKey::new(id, now));
        keys.retired.push((old, now + self.grace));
    }

    /// Drops retired keys, oldest first, while all keys together remember
    /// more than [`MAX_REMEMBERED`] requests: the memory a client (or the
    /// parent posing as many) can make the gateway hold is bounded.
    fn bound_memory(&self, keys: &mut Keys) {
        let mut total: usize = keys.current.opened.len()
            + keys
                .retired
                .iter()
                .map(|(k, _)| k.opened.len())
                .sum::<usize>();
        while total > self.max_remembered && !keys.retired.is_empty() {
            total -= keys.retired.remove(0).0.opened.len();
        }
    }

    /// Drops keys past their grace and rotates a current key past its time.
    fn tend(&self, keys: &mut Keys, now: Instant) {
        keys.retired.retain(|(_, until)| *until > now);
        if now.duration_since(keys.current.created) >= self.rotate {
            self.rotate_now(keys, now);
        }
    }

    /// The current key's configuration and public key.
    pub fn current(&self) -> Result<Published, GatewayError> {
        self.current_at(Instant::now())
    }

    fn current_at(&self, now: Instant) -> Result<Published, GatewayError> {
        let mut keys = lock(&self.keys);
        self.tend(&mut keys, now);
        let config = keys.current.pair.config();
        Ok(Published {
            config: config.encode::<Aes256Gcm>(),
            public_key: config.public_key,
        })
    }

    /// The `application/ohttp-keys` list (RFC 9458 §3.2): the current key.
    pub fn key_configs(&self) -> Result<Vec<u8>, GatewayError> {
        let config = self.current()?.config;
        let len = u16::try_from(config.len()).map_err(|e| GatewayError::Internal(e.to_string()))?;
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(&config);
        Ok(out)
    }

    /// Opens an encapsulated request with the live key it names, once.
    pub fn open(&self, encapsulated: &[u8]) -> Result<Opened, GatewayError> {
        self.open_at(encapsulated, Instant::now())
    }

    fn open_at(&self, encapsulated: &[u8], now: Instant) -> Result<Opened, GatewayError> {
        if encapsulated.len() <= HEADER_LEN + ENC_LEN {
            return Err(GatewayError::Malformed(format!(
                "{} bytes, shorter than a header and an encapsulated key",
                encapsulated.len()
            )));
        }
        let id = encapsulated[0];
        let enc: [u8; ENC_LEN] = encapsulated[HEADER_LEN..HEADER_LEN + ENC_LEN]
            .try_into()
            .map_err(|_| GatewayError::Malformed("short encapsulated key".into()))?;
        // The key pair is shared out so that the HPKE work runs unlocked.
        let pair = {
            let mut keys = lock(&self.keys);
            self.tend(&mut keys, now);
            let Keys { current, retired } = &*keys;
            std::iter::once(current)
                .chain(retired.iter().map(|(k, _)| k))
                .find(|k| k.id == id)
                .map(|k| k.pair.clone())
                .ok_or(GatewayError::UnknownKey(id))?
        };
        let (request, response) =
            pair.open_request::<Aes256Gcm>(encapsulated)
                .map_err(|e| match e {
                    EncapsulationError::Open => GatewayError::Decrypt(id),
                    EncapsulationError::WrongKey(id) => GatewayError::UnknownKey(id),
                    other => GatewayError::Malformed(other.to_string()),
                })?;
        // Only a request that opened is remembered (a forgery with a copied
        // `enc` must not burn the genuine one), and remembered atomically.
        let mut keys = lock(&self.keys);
        {
            let Keys { current, retired } = &mut *keys;
            let key = std::iter::once(current)
                .chain(retired.iter_mut().map(|(k, _)| k))
                .find(|k| k.id == id)
                .ok_or(GatewayError::UnknownKey(id))?;
            if key.opened.len() >= self.max_requests {
                return Err(GatewayError::UnknownKey(id));
            }
            if !key.opened.insert(enc) {
                return Err(GatewayError::Replayed(id));
            }
        }
        if keys.current.id == id && keys.current.opened.len() >= self.max_requests {
            self.rotate_now(&mut keys, now);
        }
        self.bound_memory(&mut keys);
        Ok(Opened { request, response })
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use cloister_attestation::nsm::{
        AttestationRequest, DEFAULT_NSM_VALIDITY, Nsm, PlatformDir, read_pem_certificates,
    };
    use cloister_attestation::pcr::{self, PCR_LEN};
    use cloister_channel::{ChannelError, Expectations, TrustAnchor};

    use super::*;

    struct Platform {
        _dir: tempfile::TempDir,
        nsm: Nsm,
        anchor: TrustAnchor,
    }

    fn platform() -> Platform {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = PlatformDir::new(dir.path());
        p.init("gateway-test", DEFAULT_NSM_VALIDITY).expect("init");
        let root = read_pem_certificates(&p.root_cert())
            .expect("root")
            .remove(0);
        Platform {
            nsm: Nsm::load(&p).expect("nsm"),
            anchor: TrustAnchor::from_der("test", root).expect("anchor"),
            _dir: dir,
        }
    }

    fn pcr0() -> Vec<u8> {
        pcr::measure(b"image").to_vec()
    }

    /// The document the runtime asks for: the channel key in public_key, its
    /// configuration in user_data, the client's nonce.
    fn document(p: &Platform, g: &Gateway, nonce: &[u8]) -> Vec<u8> {
        let current = g.current().expect("current");
        let mut pcrs: BTreeMap<usize, pcr::Pcr> = (0..16).map(|i| (i, [0; PCR_LEN])).collect();
        pcrs.insert(0, pcr::measure(b"image"));
        pcrs.insert(1, pcr::measure(b"runtime"));
        pcrs.insert(2, pcr::measure(b"code"));
        p.nsm
            .attest(
                &AttestationRequest {
                    module_id: "i-test-enc".into(),
                    pcrs,
                    public_key: Some(current.public_key.to_vec()),
                    user_data: Some(current.config),
                    nonce: Some(nonce.to_vec()),
                },
                SystemTime::now(),
            )
            .expect("attest")
    }

    use std::collections::BTreeMap;

    fn client(p: &Platform, g: &Gateway) -> cloister_channel::AttestedEnclave {
        let nonce = cloister_channel::new_nonce();
        let expect = Expectations::new(vec![p.anchor.clone()]).pcr(0, pcr0());
        cloister_channel::verify(&document(p, g, &nonce), &nonce, &expect).expect("verify")
    }

    fn gateway() -> Gateway {
        Gateway::new(DEFAULT_ROTATE, DEFAULT_GRACE)
    }

    #[test]
    fn a_request_opens_once_and_only_its_client_opens_the_answer() {
        let (p, g) = (platform(), gateway());
        let enclave = client(&p, &g);
        let (request, pending) = enclave
            .seal(b"patient-1,F,61,180,47,124,0,1,0")
            .expect("seal");
        assert!(
            !request.windows(9).any(|w| w == b"patient-1"),
            "the encapsulated request shows the record"
        );
        let opened = g.open(&request).expect("open");
        assert_eq!(
            request_body(&opened.request).expect("body"),
            b"patient-1,F,61,180,47,124,0,1,0"
        );
        let answer = opened
            .response
            .seal(&ok(b"patient-1,0.123456"))
            .expect("seal");
        // A replay of the same bytes is refused, not answered again.
        let replay = g.open(&request).expect_err("replay refused");
        assert_eq!(replay.code(), "E-CHANNEL-REPLAYED", "{replay}");
        // The relay alters the answer: the client refuses it.
        let mut altered = answer.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        let (_, other_pending) = enclave.seal(b"x").expect("seal");
        // The answer of one request does not open as another's.
        let err = other_pending
            .open(&answer)
            .expect_err("another request's answer");
        assert_eq!(err.code(), "E-CHANNEL-RESPONSE", "{err}");
        let (request2, pending2) = enclave.seal(b"y").expect("seal");
        let opened2 = g.open(&request2).expect("open");
        let answer2 = opened2.response.seal(&ok(b"z")).expect("seal");
        let mut altered2 = answer2.clone();
        altered2[20] ^= 0x80;
        assert_eq!(
            pending2.open(&altered2).expect_err("altered").code(),
            "E-CHANNEL-RESPONSE"
        );
        assert_eq!(
            &*pending.open(&answer).expect("open"),
            b"patient-1,0.123456"
        );
    }

    #[test]
    fn altered_truncated_and_foreign_requests_are_refused_with_codes() {
        let (p, g) = (platform(), gateway());
        let enclave = client(&p, &g);
        let (request, _) = enclave.seal(b"record").expect("seal");
        for at in [HEADER_LEN, HEADER_LEN + ENC_LEN, request.len() - 1] {
            let mut altered = request.clone();
            altered[at] ^= 1;
            let e = g.open(&altered).expect_err("altered");
            assert_eq!(e.code(), "E-CHANNEL-DECRYPT", "byte {at}: {e}");
        }
        let mut other_key = request.clone();
        other_key[0] ^= 0x55;
        assert_eq!(
            g.open(&other_key).expect_err("key").code(),
            "E-CHANNEL-KEY-UNKNOWN"
        );
        let mut other_suite = request.clone();
        other_suite[6] = 1; // AES-128-GCM
        assert_eq!(
            g.open(&other_suite).expect_err("suite").code(),
            "E-CHANNEL-MALFORMED"
        );
        for len in [0, 1, HEADER_LEN, HEADER_LEN + ENC_LEN] {
            assert_eq!(
                g.open(&request[..len]).expect_err("short").code(),
                "E-CHANNEL-MALFORMED",
                "{len} bytes"
            );
        }
        // A forgery that copies the genuine request's `enc` does not burn it.
        let mut forged = request.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(g.open(&forged).is_err());
        assert!(
            g.open(&request).is_ok(),
            "the genuine request still opens once"
        );
    }

    #[test]
    fn keys_rotate_and_are_honoured_through_their_grace_only() {
        let (p, g) = (
            platform(),
            Gateway::new(Duration::from_secs(60), Duration::from_secs(10)),
        );
        let t0 = Instant::now();
        let old = client(&p, &g);
        let (before, _) = old.seal(b"a").expect("seal");
        let (in_grace, _) = old.seal(b"b").expect("seal");
        let (after_grace, _) = old.seal(b"c").expect("seal");
        assert!(g.open_at(&before, t0).is_ok());
        let rotated = g.current_at(t0 + Duration::from_secs(61)).expect("rotate");
        assert_ne!(
            rotated.config,
            old.key_config(),
            "a new key after the period"
        );
        assert_eq!(rotated.config[0], 1, "the next key id");
        assert!(
            g.open_at(&in_grace, t0 + Duration::from_secs(65)).is_ok(),
            "the old key still opens in its grace"
        );
        let e = g
            .open_at(&after_grace, t0 + Duration::from_secs(72))
            .expect_err("past the grace");
        assert_eq!(e.code(), "E-CHANNEL-KEY-UNKNOWN", "{e}");
        assert_eq!(g.key_configs().expect("list")[2..], rotated.config[..]);
    }

    #[test]
    fn a_key_that_opened_its_quota_is_retired_and_refuses_more() {
        let p = platform();
        let mut g = gateway();
        g.max_requests = 2;
        let old = client(&p, &g);
        let sealed: Vec<Vec<u8>> = (0..3).map(|i| old.seal(&[i]).expect("seal").0).collect();
        assert!(g.open(&sealed[0]).is_ok());
        assert!(g.open(&sealed[1]).is_ok());
        assert_eq!(
            g.current().expect("current").config[0],
            1,
            "rotated at its quota"
        );
        let e = g.open(&sealed[2]).expect_err("quota");
        assert_eq!(e.code(), "E-CHANNEL-KEY-UNKNOWN", "{e}");
        let fresh = client(&p, &g);
        assert!(g.open(&fresh.seal(b"x").expect("seal").0).is_ok());
    }

    #[test]
    fn key_ids_never_run_out_and_remembered_requests_are_bounded() {
        let p = platform();
        let mut g = Gateway::new(Duration::from_secs(1), Duration::from_secs(3600));
        g.max_requests = 1;
        g.max_remembered = 5;
        let t0 = Instant::now();
        // 600 rotations within one grace period: ids wrap, the oldest go first.
        for i in 1..=600u64 {
            let at = t0 + Duration::from_secs(i);
            g.current_at(at).expect("rotates");
            let keys = lock(&g.keys);
            let mut ids: Vec<u8> = keys.retired.iter().map(|(k, _)| k.id).collect();
            ids.push(keys.current.id);
            let count = ids.len();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), count, "live key ids are distinct");
            assert!(count <= 256);
        }
        // Each request exhausts its key's quota; all keys remember at most 5.
        for _ in 0..20 {
            let enclave = client(&p, &g);
            let (request, _) = enclave.seal(b"r").expect("seal");
            g.open_at(&request, t0 + Duration::from_secs(601))
                .expect("open");
            let keys = lock(&g.keys);
            let remembered: usize = keys.current.opened.len()
                + keys
                    .retired
                    .iter()
                    .map(|(k, _)| k.opened.len())
                    .sum::<usize>();
            assert!(remembered <= 5, "{remembered} remembered");
        }
    }

    #[test]
    fn an_enc_that_differs_only_in_its_ignored_bit_does_not_open() {
        // X25519 ignores bit 255 of a public key: a replay with it flipped must
        // not open (HPKE binds the enc bytes as sent), or replay protection,
        // which remembers those bytes, would be bypassed.
        let (p, g) = (platform(), gateway());
        let enclave = client(&p, &g);
        let (request, _) = enclave.seal(b"once").expect("seal");
        g.open(&request).expect("open");
        let mut twin = request.clone();
        twin[HEADER_LEN + ENC_LEN - 1] ^= 0x80;
        assert_eq!(g.open(&twin).expect_err("twin").code(), "E-CHANNEL-DECRYPT");
    }

    #[test]
    fn the_schedule_comes_from_the_measured_configuration() {
        let none = |_: &str| None;
        assert_eq!(
            schedule(none).expect("defaults"),
            (DEFAULT_ROTATE, DEFAULT_GRACE)
        );
        let set = |k: &str| match k {
            ROTATE_KEY => Some("60".to_owned()),
            GRACE_KEY => Some("0".to_owned()),
            _ => None,
        };
        assert_eq!(
            schedule(set).expect("set"),
            (Duration::from_secs(60), Duration::ZERO)
        );
        for (key, bad) in [
            (ROTATE_KEY, "0"),
            (ROTATE_KEY, "-1"),
            (GRACE_KEY, "1h"),
            (ROTATE_KEY, "99999999999"),
        ] {
            let e = schedule(|k: &str| (k == key).then(|| bad.to_owned())).expect_err("bad");
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn a_document_without_the_runtime_binding_is_refused_by_clients() {
        let (p, g) = (platform(), gateway());
        let nonce = cloister_channel::new_nonce();
        let current = g.current().expect("current");
        let expect = Expectations::new(vec![p.anchor.clone()]).pcr(0, pcr0());
        let attest = |public_key: Option<Vec<u8>>, user_data: Option<Vec<u8>>| {
            let mut pcrs: BTreeMap<usize, pcr::Pcr> = (0..16).map(|i| (i, [0; PCR_LEN])).collect();
            pcrs.insert(0, pcr::measure(b"image"));
            p.nsm
                .attest(
                    &AttestationRequest {
                        module_id: "m".into(),
                        pcrs,
                        public_key,
                        user_data,
                        nonce: Some(nonce.to_vec()),
                    },
                    SystemTime::now(),
                )
                .expect("attest")
        };
        // What a guest can ask for: user_data of its choosing, no public_key.
        let guest_made = attest(None, Some(current.config.clone()));
        let other_key = attest(Some(vec![7; 32]), Some(current.config.clone()));
        let no_config = attest(Some(current.public_key.to_vec()), None);
        let mut aes128 = current.config.clone();
        aes128[40] = 1;
        let weak = attest(Some(current.public_key.to_vec()), Some(aes128));
        for (what, doc) in [
            ("guest", guest_made),
            ("other key", other_key),
            ("no config", no_config),
            ("AES-128", weak),
        ] {
            let e = cloister_channel::verify(&doc, &nonce, &expect).expect_err(what);
            assert!(matches!(e, ChannelError::KeyBinding(_)), "{what}: {e}");
            assert_eq!(e.code(), "E-CHANNEL-KEY-BINDING");
        }
    }
}
