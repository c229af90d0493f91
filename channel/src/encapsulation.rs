//! Oblivious HTTP message encapsulation (RFC 9458 §3 and §4), both ends, on the
//! `hpke` crate (RFC 9180), HKDF and AES-GCM from RustCrypto.
//!
//! The channel has one suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
//! AES-256-GCM. (The `ohttp` crate's pure-Rust backend offers only AES-128-GCM
//! and ChaCha20-Poly1305.) The code is generic over the AEAD so that the tests
//! can check it against RFC 9458 Appendix A, which uses AES-128-GCM, and
//! against the `ohttp` crate.
//!
//! - Key configuration: `key_id(1) kem_id(2) public_key(32) suites_len(2)
//!   kdf_id(2) aead_id(2)`; `application/ohttp-keys` prefixes each with its
//!   length (2 bytes).
//! - Request: `hdr = key_id kem_id kdf_id aead_id`; `info = "message/bhttp
//!   request" 0x00 hdr`; `enc, ctx = SetupBaseS(pkR, info)`; the message is
//!   `hdr enc ctx.Seal("", request)`.
//! - Response: `secret = ctx.Export("message/bhttp response", max(Nn, Nk))`;
//!   `prk = Extract(enc || response_nonce, secret)` with a random
//!   `response_nonce` of `max(Nn, Nk)` bytes; key = `Expand(prk, "key", Nk)`,
//!   nonce = `Expand(prk, "nonce", Nn)`; the message is `response_nonce ||
//!   Seal(key, nonce, "", response)`.

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::{Aead as _, AeadCore, KeyInit, Payload};
use hkdf::Hkdf;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use zeroize::Zeroizing;

/// `Npk` and `Nenc` of DHKEM(X25519, HKDF-SHA256).
pub const KEY_LEN: usize = 32;
/// The request header: key id, KEM, KDF and AEAD identifiers.
pub const HEADER_LEN: usize = 7;
/// An encoded key configuration of the channel's one suite.
pub const CONFIG_LEN: usize = 41;
const KEM_ID: u16 = X25519HkdfSha256::KEM_ID;
const KDF_ID: u16 = <HkdfSha256 as hpke::kdf::Kdf>::KDF_ID;
const REQUEST_LABEL: &[u8] = b"message/bhttp request";
const RESPONSE_LABEL: &[u8] = b"message/bhttp response";

/// An AEAD the channel can use: its HPKE identity and its AES-GCM type.
pub trait Suite {
    type Hpke: hpke::aead::Aead;
    type Gcm: aes_gcm::aead::Aead + KeyInit + AeadCore<NonceSize = U12>;
    /// `Nk`; `Nn` is 12 for AES-GCM.
    const KEY_LEN: usize;
}

/// The channel's suite.
pub struct Aes256Gcm;

impl Suite for Aes256Gcm {
    type Hpke = hpke::aead::AesGcm256;
    type Gcm = aes_gcm::Aes256Gcm;
    const KEY_LEN: usize = 32;
}

/// AES-128-GCM: RFC 9458's example suite, for the tests.
pub struct Aes128Gcm;

impl Suite for Aes128Gcm {
    type Hpke = hpke::aead::AesGcm128;
    type Gcm = aes_gcm::Aes128Gcm;
    const KEY_LEN: usize = 16;
}

const NONCE_LEN: usize = 12;

fn aead_id<S: Suite>() -> u16 {
    <S::Hpke as hpke::aead::Aead>::AEAD_ID
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncapsulationError {
    #[error("{0}")]
    Malformed(String),
    #[error("key id {0} is not this key's")]
    WrongKey(u8),
    #[error("it does not open: altered, or sealed to another key")]
    Open,
    #[error("the public key is not an X25519 key")]
    PublicKey,
}

/// A channel key's public half as clients see it (RFC 9458 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    pub key_id: u8,
    pub public_key: [u8; KEY_LEN],
}

impl KeyConfig {
    /// The encoding with the one suite `S`.
    pub fn encode<S: Suite>(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CONFIG_LEN);
        out.push(self.key_id);
        out.extend_from_slice(&KEM_ID.to_be_bytes());
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&KDF_ID.to_be_bytes());
        out.extend_from_slice(&aead_id::<S>().to_be_bytes());
        out
    }

    /// Reads a configuration that offers exactly the suite `S` (anything else
    /// is refused: this client speaks one suite).
    pub fn decode<S: Suite>(bytes: &[u8]) -> Result<KeyConfig, EncapsulationError> {
        let malformed = |m: &str| EncapsulationError::Malformed(m.to_owned());
        if bytes.len() != CONFIG_LEN {
            return Err(malformed(&format!(
                "a key configuration of this suite is {CONFIG_LEN} bytes, not {}",
                bytes.len()
            )));
        }
        let key_id = bytes[0];
        let public_key: [u8; KEY_LEN] = bytes[3..35]
            .try_into()
            .map_err(|_| malformed("short public key"))?;
        let expected = KeyConfig { key_id, public_key }.encode::<S>();
        if bytes != expected {
            return Err(malformed(
                "the key configuration is not DHKEM(X25519, HKDF-SHA256) with HKDF-SHA256 and the expected AEAD alone",
            ));
        }
        Ok(KeyConfig { key_id, public_key })
    }

    fn header<S: Suite>(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = self.key_id;
        h[1..3].copy_from_slice(&KEM_ID.to_be_bytes());
        h[3..5].copy_from_slice(&KDF_ID.to_be_bytes());
        h[5..7].copy_from_slice(&aead_id::<S>().to_be_bytes());
        h
    }
}

fn info(header: &[u8]) -> Vec<u8> {
    let mut info = REQUEST_LABEL.to_vec();
    info.push(0);
    info.extend_from_slice(header);
    info
}

/// The AES-GCM key and nonce of a response (RFC 9458 §4.4).
fn response_aead<S: Suite>(
    secret: &[u8],
    enc: &[u8],
    response_nonce: &[u8],
) -> Result<(S::Gcm, [u8; NONCE_LEN]), EncapsulationError> {
    let salt = [enc, response_nonce].concat();
    let hk = Hkdf::<Sha256>::new(Some(&salt), secret);
    let mut key = Zeroizing::new(vec![0u8; S::KEY_LEN]);
    let mut nonce = [0u8; NONCE_LEN];
    hk.expand(b"key", &mut key)
        .and_then(|()| hk.expand(b"nonce", &mut nonce))
        .map_err(|_| EncapsulationError::Malformed("HKDF length".into()))?;
    let gcm = S::Gcm::new_from_slice(&key)
        .map_err(|_| EncapsulationError::Malformed("key length".into()))?;
    Ok((gcm, nonce))
}

fn secret_len<S: Suite>() -> usize {
    S::KEY_LEN.max(NONCE_LEN)
}

/// A channel key pair (the gateway's). The private key is zeroized on drop.
pub struct KeyPair {
    config: KeyConfig,
    private: <X25519HkdfSha256 as hpke::Kem>::PrivateKey,
}

impl KeyPair {
    pub fn generate(key_id: u8) -> KeyPair {
        let (private, public) = X25519HkdfSha256::gen_keypair(&mut OsRng);
        let mut public_key = [0u8; KEY_LEN];
        public_key.copy_from_slice(&public.to_bytes());
        KeyPair {
            config: KeyConfig { key_id, public_key },
            private,
        }
    }

    /// A key pair from its private key's bytes (tests: RFC 9458's example key).
    pub fn from_private(key_id: u8, private: &[u8]) -> Result<KeyPair, EncapsulationError> {
        let private = <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(private)
            .map_err(|_| EncapsulationError::PublicKey)?;
        let public = X25519HkdfSha256::sk_to_pk(&private);
        let mut public_key = [0u8; KEY_LEN];
        public_key.copy_from_slice(&public.to_bytes());
        Ok(KeyPair {
            config: KeyConfig { key_id, public_key },
            private,
        })
    }

    pub fn config(&self) -> &KeyConfig {
        &self.config
    }

    /// Opens an encapsulated request (RFC 9458 §4.3 receiver side); returns
    /// the request and what encapsulates its one response.
    pub fn open_request<S: Suite>(
        &self,
        message: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, ResponseSealer<S>), EncapsulationError> {
        if message.len() < HEADER_LEN + KEY_LEN {
            return Err(EncapsulationError::Malformed(format!(
                "{} bytes, shorter than a header and an encapsulated key",
                message.len()
            )));
        }
        let (header, rest) = message.split_at(HEADER_LEN);
        if header[0] != self.config.key_id {
            return Err(EncapsulationError::WrongKey(header[0]));
        }
        if header != self.config.header::<S>() {
            return Err(EncapsulationError::Malformed(format!(
                "the header names KEM {:#06x}, KDF {:#06x}, AEAD {:#06x}: this key takes {KEM_ID:#06x}, {KDF_ID:#06x}, {:#06x}",
                u16::from_be_bytes([header[1], header[2]]),
                u16::from_be_bytes([header[3], header[4]]),
                u16::from_be_bytes([header[5], header[6]]),
                aead_id::<S>()
            )));
        }
        let (enc_bytes, ciphertext) = rest.split_at(KEY_LEN);
        let enc = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(enc_bytes)
            .map_err(|_| EncapsulationError::Open)?;
        let mut ctx = hpke::setup_receiver::<S::Hpke, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &self.private,
            &enc,
            &info(header),
        )
        .map_err(|_| EncapsulationError::Open)?;
        let request = Zeroizing::new(
            ctx.open(ciphertext, b"")
                .map_err(|_| EncapsulationError::Open)?,
        );
        let mut secret = Zeroizing::new(vec![0u8; secret_len::<S>()]);
        ctx.export(RESPONSE_LABEL, &mut secret)
            .map_err(|_| EncapsulationError::Open)?;
        Ok((
            request,
            ResponseSealer {
                secret,
                enc: enc_bytes.to_vec(),
                suite: std::marker::PhantomData,
            },
        ))
    }
}

/// Encapsulates the one response to an opened request.
pub struct ResponseSealer<S: Suite> {
    secret: Zeroizing<Vec<u8>>,
    enc: Vec<u8>,
    suite: std::marker::PhantomData<S>,
}

impl<S: Suite> ResponseSealer<S> {
    /// The HPKE `enc` of the request (what identifies it).
    pub fn enc(&self) -> &[u8] {
        &self.enc
    }

    pub fn seal(self, response: &[u8]) -> Result<Vec<u8>, EncapsulationError> {
        let mut nonce = vec![0u8; secret_len::<S>()];
        OsRng.fill_bytes(&mut nonce);
        self.seal_with_nonce(&nonce, response)
    }

    fn seal_with_nonce(
        self,
        response_nonce: &[u8],
        response: &[u8],
    ) -> Result<Vec<u8>, EncapsulationError> {
        let (gcm, nonce) = response_aead::<S>(&self.secret, &self.enc, response_nonce)?;
        let ct = gcm
            .encrypt(
                GenericArray::from_slice(&nonce),
                Payload {
                    msg: response,
                    aad: b"",
                },
            )
            .map_err(|_| EncapsulationError::Malformed("the response is too long".into()))?;
        Ok([response_nonce, &ct].concat())
    }
}

/// Encapsulates a request to a key configuration (RFC 9458 §4.3 sender side);
/// returns the message and what opens its response.
pub fn seal_request<S: Suite>(
    config: &KeyConfig,
    request: &[u8],
) -> Result<(Vec<u8>, ResponseOpener<S>), EncapsulationError> {
    let pk = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(&config.public_key)
        .map_err(|_| EncapsulationError::PublicKey)?;
    let header = config.header::<S>();
    let (enc, mut ctx) = hpke::setup_sender::<S::Hpke, HkdfSha256, X25519HkdfSha256, _>(
        &OpModeS::Base,
        &pk,
        &info(&header),
        &mut OsRng,
    )
    .map_err(|_| EncapsulationError::PublicKey)?;
    let ct = ctx
        .seal(request, b"")
        .map_err(|_| EncapsulationError::Malformed("the request is too long".into()))?;
    let mut secret = Zeroizing::new(vec![0u8; secret_len::<S>()]);
    ctx.export(RESPONSE_LABEL, &mut secret)
        .map_err(|_| EncapsulationError::Open)?;
    let enc = enc.to_bytes().to_vec();
    let message = [&header[..], &enc, &ct].concat();
    Ok((
        message,
        ResponseOpener {
            secret,
            enc,
            suite: std::marker::PhantomData,
        },
    ))
}

/// Opens the one response to a request this client sealed.
pub struct ResponseOpener<S: Suite> {
    secret: Zeroizing<Vec<u8>>,
    enc: Vec<u8>,
    suite: std::marker::PhantomData<S>,
}

impl<S: Suite> ResponseOpener<S> {
    pub fn open(self, message: &[u8]) -> Result<Zeroizing<Vec<u8>>, EncapsulationError> {
        let n = secret_len::<S>();
        if message.len() < n + 16 {
            return Err(EncapsulationError::Malformed(format!(
                "{} bytes, shorter than a response nonce and a tag",
                message.len()
            )));
        }
        let (response_nonce, ct) = message.split_at(n);
        let (gcm, nonce) = response_aead::<S>(&self.secret, &self.enc, response_nonce)?;
        gcm.decrypt(
            GenericArray::from_slice(&nonce),
            Payload { msg: ct, aad: b"" },
        )
        .map(Zeroizing::new)
        .map_err(|_| EncapsulationError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s).expect("hex")
    }

    /// RFC 9458 Appendix A: the gateway's key, the client's request and the
    /// gateway's response, byte for byte (AES-128-GCM, key id 1).
    #[test]
    fn rfc_9458_appendix_a() {
        let key = KeyPair::from_private(
            1,
            &hex("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a"),
        )
        .expect("key");
        assert_eq!(
            key.config().public_key.to_vec(),
            hex("31e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e798155")
        );
        // The RFC's configuration offers two suites; ours offers one, and the
        // first eight bytes after the public key differ accordingly.
        let rfc_config = hex(
            "01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500080001000100010003",
        );
        assert_eq!(key.config().encode::<Aes128Gcm>()[..35], rfc_config[..35]);
        let request = hex(
            "010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad19dec96c208b4726374e469135906992e1268c594d2a10c695d858c40a026e7965e7d86b83dd440b2c0185204b4d63525",
        );
        let (plain, sealer) = key.open_request::<Aes128Gcm>(&request).expect("open");
        assert_eq!(
            plain.to_vec(),
            hex("00034745540568747470730b6578616d706c652e636f6d012f")
        );
        assert_eq!(
            sealer.secret.to_vec(),
            hex("62d87a6ba569ee81014c2641f52bea36")
        );
        let response = sealer
            .seal_with_nonce(&hex("c789e7151fcba46158ca84b04464910d"), &hex("0140c8"))
            .expect("seal");
        assert_eq!(
            response,
            hex("c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd")
        );
    }

    /// The `ohttp` crate (a separate implementation, AES-128-GCM only in pure
    /// Rust) and this one read each other's messages.
    #[test]
    fn interoperates_with_the_ohttp_crate() {
        use ohttp::hpke::{Aead, Kdf, Kem};
        let theirs = ohttp::KeyConfig::new(
            9,
            Kem::X25519Sha256,
            vec![ohttp::SymmetricSuite::new(Kdf::HkdfSha256, Aead::Aes128Gcm)],
        )
        .expect("config");
        let encoded = theirs.encode().expect("encode");
        let config = KeyConfig::decode::<Aes128Gcm>(&encoded).expect("decode");
        let server = ohttp::Server::new(theirs).expect("server");
        let (message, opener) = seal_request::<Aes128Gcm>(&config, b"to them").expect("seal");
        let (plain, response) = server.decapsulate(&message).expect("they open ours");
        assert_eq!(plain, b"to them");
        let answer = response.encapsulate(b"from them").expect("encapsulate");
        assert_eq!(
            &*opener.open(&answer).expect("we open theirs"),
            b"from them"
        );

        let ours = KeyPair::generate(3);
        let client =
            ohttp::ClientRequest::from_encoded_config(&ours.config().encode::<Aes128Gcm>())
                .expect("client");
        let (message, their_opener) = client.encapsulate(b"to us").expect("encapsulate");
        let (plain, sealer) = ours
            .open_request::<Aes128Gcm>(&message)
            .expect("we open theirs");
        assert_eq!(&*plain, b"to us");
        let answer = sealer.seal(b"from us").expect("seal");
        assert_eq!(
            their_opener.decapsulate(&answer).expect("they open ours"),
            b"from us"
        );
    }

    /// A request pyhpke encapsulated with the channel's suite (AES-256-GCM, the
    /// one the RFC's example and the `ohttp` crate lack), kept as a fuzzing seed.
    #[test]
    fn opens_a_request_an_independent_implementation_sealed() {
        let seeds =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/channel_message");
        let key = KeyPair::from_private(0, &[1u8; 32]).expect("key");
        assert_eq!(
            std::fs::read(seeds.join("seed-key-config")).expect("seed"),
            key.config().encode::<Aes256Gcm>()
        );
        let request = std::fs::read(seeds.join("seed-ohttp-request")).expect("seed");
        let (plain, _) = key.open_request::<Aes256Gcm>(&request).expect("open");
        assert_eq!(
            *plain,
            std::fs::read(seeds.join("seed-bhttp-post")).expect("seed")
        );
    }

    #[test]
    fn the_channel_suite_round_trips_and_refuses_tampering() {
        let key = KeyPair::generate(7);
        let config =
            KeyConfig::decode::<Aes256Gcm>(&key.config().encode::<Aes256Gcm>()).expect("decode");
        assert_eq!(&config, key.config());
        let (message, opener) = seal_request::<Aes256Gcm>(&config, b"record").expect("seal");
        assert_eq!(&message[..HEADER_LEN], [7, 0, 0x20, 0, 1, 0, 2]);
        for i in 0..message.len() {
            let mut altered = message.clone();
            altered[i] ^= 1;
            assert!(key.open_request::<Aes256Gcm>(&altered).is_err(), "byte {i}");
        }
        assert!(
            key.open_request::<Aes128Gcm>(&message).is_err(),
            "another suite"
        );
        let (plain, sealer) = key.open_request::<Aes256Gcm>(&message).expect("open");
        assert_eq!(&*plain, b"record");
        let answer = sealer.seal(b"score").expect("seal");
        let mut altered = answer.clone();
        altered[40] ^= 1;
        let (_, other) = seal_request::<Aes256Gcm>(&config, b"other").expect("seal");
        assert_eq!(other.open(&answer).err(), Some(EncapsulationError::Open));
        let (_, again) = seal_request::<Aes256Gcm>(&config, b"again").expect("seal");
        assert!(again.open(&answer[..20]).is_err());
        assert_eq!(opener.open(&altered).err(), Some(EncapsulationError::Open));
    }

    #[test]
    fn configurations_of_other_suites_or_lengths_are_refused() {
        let good = KeyPair::generate(1).config().encode::<Aes256Gcm>();
        assert!(KeyConfig::decode::<Aes128Gcm>(&good).is_err());
        for (i, v) in [(1usize, 0x01u8), (2, 0x10), (36, 8), (38, 2), (40, 3)] {
            let mut bad = good.clone();
            bad[i] = v;
            assert!(KeyConfig::decode::<Aes256Gcm>(&bad).is_err(), "byte {i}");
        }
        assert!(KeyConfig::decode::<Aes256Gcm>(&good[..40]).is_err());
        assert!(KeyConfig::decode::<Aes256Gcm>(&[&good[..], &[0]].concat()).is_err());
    }
}
