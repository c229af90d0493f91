//! The broker's AWS API (what any TCP peer sends to `kms serve --aws-api`):
//! a whole HTTP request — method, path, headers, body — through SigV4
//! authentication and the JSON parser of the operation its target names.
//!
//! Input: `METHOD\nPATH\nname: value\n...\n\nBODY`. In header values,
//! `AKCLFUZZ` stands for an access key the broker issued, `NOW` for the
//! current X-Amz-Date and `TODAY` for its date, so that mutations get past
//! the key lookup and the clock to the canonicalisation and signature check.
#![no_main]

use std::sync::OnceLock;

use cloister_kms::aws::{HttpRequest, parse_operation};
use cloister_kms::datadir::DataDir;
use cloister_kms::service::{Broker, BrokerConfig};
use libfuzzer_sys::fuzz_target;

/// A broker in a fresh data directory, and one principal's access key id.
fn broker() -> &'static (Broker, String) {
    static BROKER: OnceLock<(Broker, String)> = OnceLock::new();
    BROKER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cloister-fuzz-aws-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = DataDir::new(&dir);
        data.init(None, &[], None).expect("init");
        let broker = data.open(None, BrokerConfig::default()).expect("open");
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        broker
            .keystore()
            .add_principal(
                "arn:aws:iam::111122223333:role/fuzz",
                key.verifying_key(),
                r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}"#,
                0,
                |_| Ok(()),
            )
            .expect("principal");
        let access_key = broker
            .keystore()
            .create_access_key("arn:aws:iam::111122223333:role/fuzz", 0, |_, _| Ok(()))
            .expect("access key");
        (broker, access_key.access_key_id)
    })
}

/// Now as SigV4's X-Amz-Date, and its date.
fn amz_now() -> (String, String) {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let now = time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_default();
    (now.get(..8).unwrap_or_default().to_owned(), now)
}

fuzz_target!(|data: &[u8]| {
    let (broker, access_key_id) = broker();
    let (today, now) = amz_now();
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split('\n');
    let method = lines.next().unwrap_or_default().to_owned();
    let uri = lines.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| {
            let v = v
                .trim()
                .replace("AKCLFUZZ", access_key_id)
                .replace("NOW", &now)
                .replace("TODAY", &today);
            (n.trim().to_ascii_lowercase(), v)
        })
        .collect();
    let target = headers
        .iter()
        .find(|(n, _)| n == "x-amz-target")
        .and_then(|(_, v)| v.strip_prefix("TrentService."))
        .unwrap_or("Decrypt")
        .to_owned();
    let request = HttpRequest {
        method,
        uri,
        headers,
        body: body.to_vec(),
    };
    let _ = broker.prepare_aws(&request, "us-east-1");
    let _ = parse_operation(&target, body);
});
