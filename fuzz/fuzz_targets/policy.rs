//! Key and identity policies: parse, lint, and evaluate against a request
//! whose values come from the input (policy JSON, then NUL, then a value).
#![no_main]

use cloister_kms::policy::{Policy, PolicyKind, RequestContext, authorize, wildcard_match};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (json, value) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let (Ok(json), Ok(value)) = (std::str::from_utf8(json), std::str::from_utf8(value)) else {
        return;
    };
    let _ = wildcard_match(json, value);
    let identity = Policy::parse(r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}"#, PolicyKind::Identity)
        .expect("a valid identity policy");
    for kind in [PolicyKind::Key, PolicyKind::Identity] {
        let Ok(policy) = Policy::parse(json, kind) else {
            continue;
        };
        let _ = policy.lint();
        let mut ctx = RequestContext {
            action: "kms:Decrypt".into(),
            resource: "arn:cloister:kms:local:key/1111".into(),
            principal: value.into(),
            ..Default::default()
        };
        ctx.set("kms:CallerPrincipal", value);
        ctx.set("kms:RecipientAttestation:ImageSha384", value);
        ctx.set("kms:RecipientAttestation:PCR3", value);
        ctx.set(&format!("kms:EncryptionContext:{value}"), value);
        let key = (kind == PolicyKind::Key).then_some(("arn:cloister:kms:local:key/1111", &policy));
        let _ = authorize(&identity, key, &ctx);
        let _ = authorize(&policy, None, &ctx);
    }
});
