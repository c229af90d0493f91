//! Table-driven policy evaluation: AWS semantics, one row per case.
#![allow(clippy::unwrap_used)]

use cloister_kms::policy::{Policy, PolicyKind, RequestContext, authorize};

const KEY: &str = "arn:cloister:kms:local:key/1111";
const OTHER_KEY: &str = "arn:cloister:kms:local:key/2222";
const A: &str = "a6cdfede5b1e7950de33218995add7d8f1f6e059c9cccd204316e69feaa2ce54f6f9ff6f5992db0f1ca6135f9b095b85";
const B: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a09080706050403020100ffeeddccbbaa99887766554433221100";
const ROLE: &str = "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef4fc1f1a452e315b9e98f9e312e6921e6";
const ZERO: &str = "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";

const ID_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}"#;
const KEY_ALL_APP: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"App","Effect":"Allow","Principal":{"AWS":"app"},"Action":"kms:*","Resource":"*"}]}"#;

fn key_policy(statement: &str) -> String {
    format!(r#"{{"Version":"2012-10-17","Statement":[{statement}]}}"#)
}

fn pinned(op: &str, cond_key: &str, values: &str) -> String {
    key_policy(&format!(
        r#"{{"Sid":"Enclave","Effect":"Allow","Principal":{{"AWS":"app"}},"Action":"kms:Decrypt","Resource":"*","Condition":{{"{op}":{{"{cond_key}":{values}}}}}}}"#
    ))
}

struct Case {
    name: &'static str,
    identity: String,
    key: Option<String>,
    action: &'static str,
    resource: &'static str,
    principal: &'static str,
    context: Vec<(&'static str, &'static str)>,
    allowed: bool,
    reason: &'static str,
}

fn case(name: &'static str, identity: &str, key: Option<&str>) -> Case {
    Case {
        name,
        identity: identity.to_owned(),
        key: key.map(str::to_owned),
        action: "kms:Decrypt",
        resource: KEY,
        principal: "app",
        context: vec![],
        allowed: true,
        reason: "allowed",
    }
}

impl Case {
    fn action(mut self, a: &'static str) -> Self {
        self.action = a;
        self
    }
    fn resource(mut self, r: &'static str) -> Self {
        self.resource = r;
        self
    }
    fn principal(mut self, p: &'static str) -> Self {
        self.principal = p;
        self
    }
    fn with(mut self, k: &'static str, v: &'static str) -> Self {
        self.context.push((k, v));
        self
    }
    fn denied(mut self, reason: &'static str) -> Self {
        self.allowed = false;
        self.reason = reason;
        self
    }
}

#[test]
fn policy_cases() {
    let pcr0_a = pinned(
        "StringEquals",
        "kms:RecipientAttestation:PCR0",
        &format!("\"{A}\""),
    );
    let cases = vec![
        case("identity and key policy both allow", ID_ALL, Some(KEY_ALL_APP)),
        case("key policy does not name the principal", ID_ALL, Some(KEY_ALL_APP))
            .principal("intruder")
            .denied("key policy of arn:cloister:kms:local:key/1111 does not allow kms:Decrypt by \"intruder\": statement \"App\" does not name principal"),
        case(
            "identity policy does not cover the action",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Encrypt","Resource":"*"}}"#,
            Some(KEY_ALL_APP),
        )
        .denied("identity policy of \"app\" does not allow kms:Decrypt"),
        case(
            "explicit deny in the identity policy wins",
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:*","Resource":"*"},{"Sid":"NoDecrypt","Effect":"Deny","Action":"kms:Decrypt","Resource":"*"}]}"#,
            Some(KEY_ALL_APP),
        )
        .denied("explicit Deny in the identity policy of \"app\", statement \"NoDecrypt\""),
        case(
            "explicit deny in the key policy wins over allows in both",
            ID_ALL,
            Some(&key_policy(r#"{"Sid":"App","Effect":"Allow","Principal":{"AWS":"app"},"Action":"kms:*","Resource":"*"},{"Sid":"Stop","Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*"}"#)),
        )
        .denied("explicit Deny in the key policy of arn:cloister:kms:local:key/1111, statement \"Stop\""),
        case(
            "NotAction allows what it does not list",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","NotAction":"kms:ScheduleKeyDeletion","Resource":"*"}}"#,
            Some(KEY_ALL_APP),
        ),
        case(
            "NotAction refuses what it lists",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","NotAction":["kms:ScheduleKeyDeletion","kms:Disable*"],"Resource":"*"}}"#,
            Some(KEY_ALL_APP),
        )
        .action("kms:DisableKey")
        .denied("does not cover action kms:DisableKey"),
        case(
            "Action wildcard matches a prefix",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Generate*","Resource":"*"}}"#,
            Some(KEY_ALL_APP),
        )
        .action("kms:GenerateDataKey"),
        case(
            "Action wildcard does not match another action",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Generate*","Resource":"*"}}"#,
            Some(KEY_ALL_APP),
        )
        .denied("does not cover action kms:Decrypt"),
        case(
            "actions match case-insensitively",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"KMS:decrypt","Resource":"*"}}"#,
            Some(KEY_ALL_APP),
        ),
        case(
            "? matches exactly one character",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:?ecrypt","Resource":"*"}}"#,
            Some(KEY_ALL_APP),
        ),
        case(
            "Resource naming this key",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Decrypt","Resource":"arn:cloister:kms:local:key/1111"}}"#,
            Some(KEY_ALL_APP),
        ),
        case(
            "Resource naming another key",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Decrypt","Resource":"arn:cloister:kms:local:key/1111"}}"#,
            Some(KEY_ALL_APP),
        )
        .resource(OTHER_KEY)
        .denied("does not cover resource arn:cloister:kms:local:key/2222"),
        case(
            "NotResource excludes one key",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","NotResource":"arn:cloister:kms:*:key/1111"}}"#,
            Some(KEY_ALL_APP),
        )
        .denied("does not cover resource"),
        case(
            "a key-less action needs Resource \"*\"",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","Resource":"arn:cloister:kms:*:key/*"}}"#,
            None,
        )
        .action("kms:CreateKey")
        .resource("*")
        .denied("does not cover resource *"),
        case("Principal \"*\" in a key policy", ID_ALL, Some(&key_policy(r#"{"Effect":"Allow","Principal":"*","Action":"kms:Decrypt","Resource":"*"}"#))),
        case(
            "Principal list names the caller",
            ID_ALL,
            Some(&key_policy(r#"{"Effect":"Allow","Principal":{"AWS":["ops","app"]},"Action":"kms:Decrypt","Resource":"*"}"#)),
        ),
        case("StringEquals PCR0 matches", ID_ALL, Some(&pcr0_a)).with("kms:RecipientAttestation:PCR0", A),
        case("StringEquals PCR0 mismatches", ID_ALL, Some(&pcr0_a))
            .with("kms:RecipientAttestation:PCR0", B)
            .denied("failed condition StringEquals kms:RecipientAttestation:PCR0: requires one of"),
        case("StringEquals PCR0 without a recipient", ID_ALL, Some(&pcr0_a))
            .denied("the request has no kms:RecipientAttestation:PCR0 (no attestation document)"),
        case("a debug enclave's zero PCR0 never matches a measurement", ID_ALL, Some(&pcr0_a))
            .with("kms:RecipientAttestation:PCR0", ZERO)
            .denied("failed condition StringEquals"),
        case(
            "StringEqualsIgnoreCase accepts upper-case hex",
            ID_ALL,
            Some(&pinned("StringEqualsIgnoreCase", "kms:RecipientAttestation:PCR0", &format!("\"{}\"", A.to_uppercase()))),
        )
        .with("kms:RecipientAttestation:PCR0", A),
        case(
            "StringEquals is case-sensitive",
            ID_ALL,
            Some(&pinned("StringEquals", "kms:RecipientAttestation:PCR0", &format!("\"{}\"", A.to_uppercase()))),
        )
        .with("kms:RecipientAttestation:PCR0", A)
        .denied("failed condition StringEquals"),
        case(
            "several values for one key are ORed",
            ID_ALL,
            Some(&pinned("StringEquals", "kms:RecipientAttestation:PCR0", &format!("[\"{B}\",\"{A}\"]"))),
        )
        .with("kms:RecipientAttestation:PCR0", A),
        case(
            "several keys are ANDed: both match",
            ID_ALL,
            Some(&key_policy(&format!(r#"{{"Sid":"E","Effect":"Allow","Principal":{{"AWS":"app"}},"Action":"kms:Decrypt","Resource":"*","Condition":{{"StringEquals":{{"kms:RecipientAttestation:PCR0":"{A}","kms:RecipientAttestation:PCR3":"{ROLE}"}}}}}}"#))),
        )
        .with("kms:RecipientAttestation:PCR0", A)
        .with("kms:RecipientAttestation:PCR3", ROLE),
        case(
            "several keys are ANDed: one mismatches",
            ID_ALL,
            Some(&key_policy(&format!(r#"{{"Sid":"E","Effect":"Allow","Principal":{{"AWS":"app"}},"Action":"kms:Decrypt","Resource":"*","Condition":{{"StringEquals":{{"kms:RecipientAttestation:PCR0":"{A}","kms:RecipientAttestation:PCR3":"{ROLE}"}}}}}}"#))),
        )
        .with("kms:RecipientAttestation:PCR0", A)
        .with("kms:RecipientAttestation:PCR3", B)
        .denied("kms:RecipientAttestation:PCR3"),
        case(
            "several operators are ANDed",
            ID_ALL,
            Some(&key_policy(&format!(r#"{{"Effect":"Allow","Principal":{{"AWS":"app"}},"Action":"kms:Decrypt","Resource":"*","Condition":{{"StringEquals":{{"kms:RecipientAttestation:PCR0":"{A}"}},"StringLike":{{"kms:EncryptionContext:dept":"cardio-*"}}}}}}"#))),
        )
        .with("kms:RecipientAttestation:PCR0", A)
        .with("kms:EncryptionContext:dept", "oncology-2")
        .denied("failed condition StringLike kms:EncryptionContext:dept"),
        case(
            "StringLike wildcard on the encryption context",
            ID_ALL,
            Some(&pinned("StringLike", "kms:EncryptionContext:dept", "\"cardio-*\"")),
        )
        .with("kms:EncryptionContext:dept", "cardio-7"),
        case(
            "StringNotLike refuses a matching value",
            ID_ALL,
            Some(&pinned("StringNotLike", "kms:EncryptionContext:dept", "\"test-*\"")),
        )
        .with("kms:EncryptionContext:dept", "test-1")
        .denied("requires none of"),
        case(
            "StringNotEquals refuses the listed value",
            ID_ALL,
            Some(&pinned("StringNotEquals", "kms:RecipientAttestation:PCR0", &format!("\"{ZERO}\""))),
        )
        .with("kms:RecipientAttestation:PCR0", ZERO)
        .denied("failed condition StringNotEquals"),
        case(
            "StringNotEquals allows another value",
            ID_ALL,
            Some(&pinned("StringNotEquals", "kms:RecipientAttestation:PCR0", &format!("\"{ZERO}\""))),
        )
        .with("kms:RecipientAttestation:PCR0", A),
        case(
            "StringNotEquals on a missing key holds (AWS)",
            ID_ALL,
            Some(&pinned("StringNotEquals", "kms:RecipientAttestation:PCR0", &format!("\"{ZERO}\""))),
        ),
        case(
            "IfExists on a missing key holds",
            ID_ALL,
            Some(&pinned("StringEqualsIfExists", "kms:RecipientAttestation:PCR0", &format!("\"{A}\""))),
        ),
        case(
            "IfExists on a present key still compares",
            ID_ALL,
            Some(&pinned("StringEqualsIfExists", "kms:RecipientAttestation:PCR0", &format!("\"{A}\""))),
        )
        .with("kms:RecipientAttestation:PCR0", B)
        .denied("failed condition StringEqualsIfExists"),
        case("Null true holds when the key is absent", ID_ALL, Some(&pinned("Null", "kms:RecipientAttestation:PCR0", "\"true\""))),
        case("Null true fails when the key is present", ID_ALL, Some(&pinned("Null", "kms:RecipientAttestation:PCR0", "true")))
            .with("kms:RecipientAttestation:PCR0", A)
            .denied("failed condition Null"),
        case("Null false requires the key", ID_ALL, Some(&pinned("Null", "kms:RecipientAttestation:PCR0", "false")))
            .denied("requires the key to be present"),
        case("ImageSha384 is PCR0", ID_ALL, Some(&pinned("StringEquals", "kms:RecipientAttestation:ImageSha384", &format!("\"{A}\""))))
            .with("kms:RecipientAttestation:ImageSha384", A),
        case("the cloister: prefix aliases kms:", ID_ALL, Some(&pinned("StringEquals", "cloister:RecipientAttestation:PCR0", &format!("\"{A}\""))))
            .with("kms:RecipientAttestation:PCR0", A),
        case("condition key names are case-insensitive", ID_ALL, Some(&pinned("StringEquals", "KMS:RECIPIENTATTESTATION:pcr0", &format!("\"{A}\""))))
            .with("kms:RecipientAttestation:PCR0", A),
        case("encryption context key names are case-sensitive", ID_ALL, Some(&pinned("StringEquals", "kms:EncryptionContext:Dept", "\"cardio\"")))
            .with("kms:EncryptionContext:dept", "cardio")
            .denied("the request has no kms:EncryptionContext:Dept"),
        case("kms:CallerPrincipal", ID_ALL, Some(&pinned("StringEquals", "kms:CallerPrincipal", "\"app\"")))
            .with("kms:CallerPrincipal", "app"),
        case(
            "a Deny conditioned on a missing attestation refuses unattested callers",
            ID_ALL,
            Some(&key_policy(r#"{"Effect":"Allow","Principal":{"AWS":"app"},"Action":"kms:*","Resource":"*"},{"Sid":"NeedsEnclave","Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*","Condition":{"Null":{"kms:RecipientAttestation:PCR0":"true"}}}"#)),
        )
        .denied("statement \"NeedsEnclave\""),
        case(
            "the same Deny lets an attested caller through",
            ID_ALL,
            Some(&key_policy(r#"{"Effect":"Allow","Principal":{"AWS":"app"},"Action":"kms:*","Resource":"*"},{"Sid":"NeedsEnclave","Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*","Condition":{"Null":{"kms:RecipientAttestation:PCR0":"true"}}}"#)),
        )
        .with("kms:RecipientAttestation:PCR0", A),
        case(
            "a Deny on another action does not apply",
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:*","Resource":"*"},{"Effect":"Deny","Action":"kms:ScheduleKeyDeletion","Resource":"*"}]}"#,
            Some(KEY_ALL_APP),
        ),
        case(
            "one failing Allow does not stop another that matches",
            ID_ALL,
            Some(&key_policy(&format!(r#"{{"Effect":"Allow","Principal":{{"AWS":"app"}},"Action":"kms:Decrypt","Resource":"*","Condition":{{"StringEquals":{{"kms:RecipientAttestation:PCR0":"{B}"}}}}}},{{"Effect":"Allow","Principal":{{"AWS":"app"}},"Action":"kms:Decrypt","Resource":"*","Condition":{{"StringEquals":{{"kms:RecipientAttestation:PCR0":"{A}"}}}}}}"#))),
        )
        .with("kms:RecipientAttestation:PCR0", A),
        case(
            "an identity policy alone decides key-less actions",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:GenerateRandom","Resource":"*"}}"#,
            None,
        )
        .action("kms:GenerateRandom")
        .resource("*"),
        case(
            "identity conditions apply too",
            &format!(r#"{{"Version":"2012-10-17","Statement":{{"Sid":"OnlyEnclaves","Effect":"Allow","Action":"kms:*","Resource":"*","Condition":{{"StringEquals":{{"kms:RecipientAttestation:PCR0":"{A}"}}}}}}}}"#),
            Some(KEY_ALL_APP),
        )
        .denied("identity policy of \"app\" does not allow kms:Decrypt on arn:cloister:kms:local:key/1111: statement \"OnlyEnclaves\" failed condition"),
    ];
    assert!(cases.len() >= 40, "{} cases", cases.len());
    for c in cases {
        let identity = Policy::parse(&c.identity, PolicyKind::Identity)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let key = c.key.as_ref().map(|k| {
            Policy::parse(k, PolicyKind::Key).unwrap_or_else(|e| panic!("{}: {e}", c.name))
        });
        let mut ctx = RequestContext {
            action: c.action.into(),
            resource: c.resource.into(),
            principal: c.principal.into(),
            ..Default::default()
        };
        for (k, v) in &c.context {
            ctx.set(k, *v);
        }
        let d = authorize(&identity, key.as_ref().map(|k| (c.resource, k)), &ctx);
        assert_eq!(d.allowed, c.allowed, "{}: {}", c.name, d.reason);
        assert!(
            d.reason.contains(c.reason),
            "{}: reason {:?} lacks {:?}",
            c.name,
            d.reason,
            c.reason
        );
    }
}

#[test]
fn invalid_policies_are_refused_with_the_reason() {
    let cases: &[(PolicyKind, &str, &str)] = &[
        (PolicyKind::Identity, "not json", "not JSON"),
        (PolicyKind::Identity, "[]", "must be a JSON object"),
        (
            PolicyKind::Identity,
            r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#,
            "Version is missing",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2020-01-01","Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#,
            "is not \"2012-10-17\"",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17"}"#,
            "Statement is missing",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":[]}"#,
            "empty list",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Permit","Action":"*","Resource":"*"}}"#,
            "must be \"Allow\" or \"Deny\"",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"}}"#,
            "identity policy has no Principal",
        ),
        (
            PolicyKind::Key,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#,
            "needs a Principal",
        ),
        (
            PolicyKind::Key,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Principal":{"Service":"x"},"Action":"*","Resource":"*"}}"#,
            "Principal type \"Service\"",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Decrypt","NotAction":"kms:Encrypt","Resource":"*"}}"#,
            "cannot both appear",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Resource":"*"}}"#,
            "Action (or NotAction) is missing",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}}"#,
            "must be \"*\" or start with",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Decrypt"}}"#,
            "Resource (or NotResource) is missing",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Decrypt","Resource":"*","Condition":{"NumericEquals":{"kms:CallerPrincipal":"1"}}}}"#,
            "operator \"NumericEquals\" is not supported",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Decrypt","Resource":"*","Condition":{"ForAnyValue:StringEquals":{"kms:CallerPrincipal":"a"}}}}"#,
            "set operator",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Decrypt","Resource":"*","Condition":{"StringEquals":{"aws:SourceIp":"1.2.3.4"}}}}"#,
            "condition key \"aws:SourceIp\" is not known",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Decrypt","Resource":"*","Condition":{"StringEquals":{"kms:RecipientAttestation:PCR32":"00"}}}}"#,
            "is not known",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Decrypt","Resource":"*","Condition":{"Null":{"kms:CallerPrincipal":"maybe"}}}}"#,
            "takes \"true\" or \"false\"",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Decrypt","Resource":"*","Condition":{"NullIfExists":{"kms:CallerPrincipal":"true"}}}}"#,
            "not supported",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Decrypt","Resource":"*","Condition":{"StringEquals":{"kms:CallerPrincipal":[]}}}}"#,
            "empty list",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":[{"Sid":"A","Effect":"Allow","Action":"*","Resource":"*"},{"Sid":"A","Effect":"Deny","Action":"*","Resource":"*"}]}"#,
            "Sid \"A\" is used by two statements",
        ),
        (
            PolicyKind::Identity,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"*","Resource":"*","Extra":1}}"#,
            "unknown element \"Extra\"",
        ),
        (
            PolicyKind::Key,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","NotPrincipal":{"AWS":"x"},"Action":"*","Resource":"*"}}"#,
            "NotPrincipal is not supported",
        ),
    ];
    for (kind, json, want) in cases {
        let err = Policy::parse(json, *kind).unwrap_err();
        assert!(
            err.to_string().contains(want),
            "{json}: want {want:?}, got {err}"
        );
    }
}

#[test]
fn lint_finds_the_nitro_pitfall() {
    let moot = key_policy(&format!(
        r#"{{"Sid":"Enclave","Effect":"Allow","Principal":{{"AWS":"app"}},"Action":"kms:Decrypt","Resource":"*","Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"{A}"}}}}}},
           {{"Sid":"Admin","Effect":"Allow","Principal":{{"AWS":"app"}},"Action":["kms:Decrypt","kms:Encrypt"],"Resource":"*"}}"#
    ));
    let warnings = Policy::parse(&moot, PolicyKind::Key).unwrap().lint();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0]
            .contains("statement \"Admin\" allows kms:Decrypt without attestation conditions"),
        "{warnings:?}"
    );
    assert!(warnings[0].contains("statement \"Enclave\""));

    let good = pinned(
        "StringEqualsIgnoreCase",
        "kms:RecipientAttestation:PCR0",
        &format!("\"{A}\""),
    );
    assert!(
        Policy::parse(&good, PolicyKind::Key)
            .unwrap()
            .lint()
            .is_empty()
    );

    let if_exists = pinned(
        "StringEqualsIfExists",
        "kms:RecipientAttestation:PCR0",
        &format!("\"{A}\""),
    );
    let w = Policy::parse(&if_exists, PolicyKind::Key).unwrap().lint();
    assert!(
        w.iter()
            .any(|w| w.contains("WITHOUT an attestation document")),
        "{w:?}"
    );

    let upper = pinned(
        "StringEquals",
        "kms:RecipientAttestation:PCR0",
        &format!("\"{}\"", A.to_uppercase()),
    );
    let w = Policy::parse(&upper, PolicyKind::Key).unwrap().lint();
    assert!(w.iter().any(|w| w.contains("upper-case hex")), "{w:?}");

    let open = key_policy(
        r#"{"Sid":"Open","Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"}"#,
    );
    let w = Policy::parse(&open, PolicyKind::Key).unwrap().lint();
    assert!(
        w.iter().any(|w| w.contains("allows every principal")),
        "{w:?}"
    );
}

#[test]
fn wildcards() {
    use cloister_kms::policy::wildcard_match as m;
    assert!(m("*", ""));
    assert!(m("a*c", "abbbc"));
    assert!(m("a*c", "ac"));
    assert!(!m("a*c", "acb"));
    assert!(m("a?c", "abc"));
    assert!(!m("a?c", "ac"));
    assert!(m("*b*", "abc"));
    assert!(m("**", "x"));
    assert!(!m("", "x"));
}

/// `lint` on key policies: the warnings expected, each by a phrase it must
/// contain, in order; nothing else.
#[test]
fn lint_warns_on_pitfalls_and_only_on_them() {
    let pin = |sid: &str, who: &str, actions: &str| {
        format!(
            r#"{{"Sid":"{sid}","Effect":"Allow","Principal":{{"AWS":"{who}"}},"Action":{actions},"Resource":"*","Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"{A}"}}}}}}"#
        )
    };
    let open = |sid: &str, who: &str, actions: &str| {
        format!(
            r#"{{"Sid":"{sid}","Effect":"Allow","Principal":{{"AWS":"{who}"}},"Action":{actions},"Resource":"*"}}"#
        )
    };
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "the demo's policy: the owner's statement and the enclave's name different principals",
            vec![
                open(
                    "DataOwner",
                    "data-owner",
                    r#"["kms:GenerateDataKey","kms:Decrypt","kms:DescribeKey","kms:CreateAlias"]"#,
                ),
                pin("ScorerEnclaveOnly", "role", r#"["kms:Decrypt","kms:GenerateDataKey"]"#),
            ],
            vec![],
        ),
        (
            "the Nitro pitfall: one principal, pinned and unconditioned (kms:* covers ReEncrypt too)",
            vec![
                pin("Enclave", "parent", r#""kms:Decrypt""#),
                open("Admins", "parent", r#""kms:*""#),
            ],
            vec![
                "statement \"Admins\" allows kms:Decrypt without attestation conditions, so the attestation conditions of statement \"Enclave\" are moot",
                "statement \"Admins\" allows kms:ReEncryptFrom to principals that statement \"Enclave\" lets decrypt only",
                "statement \"Admins\" allows kms:PutKeyPolicy to principals that statement \"Enclave\" lets have keys only",
            ],
        ),
        (
            "ReEncrypt beside a pinned Decrypt",
            vec![
                pin("Enclave", "app", r#""kms:Decrypt""#),
                open("Move", "app", r#""kms:ReEncrypt*""#),
            ],
            vec!["statement \"Move\" allows kms:ReEncryptFrom"],
        ),
        (
            "ReEncrypt for another principal",
            vec![
                pin("Enclave", "app", r#""kms:Decrypt""#),
                open("Move", "ops", r#""kms:ReEncrypt*""#),
            ],
            vec![],
        ),
        (
            "ReEncrypt allowed but denied to everyone",
            vec![
                pin("Enclave", "app", r#""kms:Decrypt""#),
                open("Move", "app", r#""kms:ReEncrypt*""#),
                r#"{"Sid":"NoMoves","Effect":"Deny","Principal":"*","Action":"kms:ReEncrypt*","Resource":"*"}"#.into(),
            ],
            vec![],
        ),
        (
            "an unconditioned Allow denied without attestation (AWS's Deny-unless pattern)",
            vec![
                pin("Enclave", "app", r#""kms:Decrypt""#),
                open("App", "app", r#""kms:Decrypt""#),
                format!(
                    r#"{{"Sid":"OnlyTheImage","Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*","Condition":{{"StringNotEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"{A}"}}}}}}"#
                ),
            ],
            vec![],
        ),
        (
            "a Deny for one principal or one other key covers nothing of an Allow for everyone",
            vec![
                pin("Enclave", "app", r#""kms:Decrypt""#),
                r#"{"Sid":"Everyone","Effect":"Allow","Principal":"*","Action":"kms:Decrypt","Resource":"*"}"#.into(),
                r#"{"Sid":"NotAlice","Effect":"Deny","Principal":{"AWS":"alice"},"Action":"kms:Decrypt","Resource":"*"}"#.into(),
                r#"{"Sid":"OtherKey","Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"arn:cloister:kms:local:key/other"}"#.into(),
            ],
            vec![
                "statement \"Everyone\" allows kms:Decrypt without attestation conditions",
                "statement \"Everyone\" allows every principal with no condition",
            ],
        ),
        (
            "only negated attestation conditions",
            vec![format!(
                r#"{{"Sid":"NotTheOldImage","Effect":"Allow","Principal":{{"AWS":"app"}},"Action":"kms:Decrypt","Resource":"*","Condition":{{"StringNotEquals":{{"kms:RecipientAttestation:PCR0":"{B}"}}}}}}"#
            )],
            vec![
                "statement \"NotTheOldImage\": its only attestation conditions are negated (StringNotEquals kms:RecipientAttestation:PCR0)",
            ],
        ),
        (
            "IfExists and upper-case hex",
            vec![format!(
                r#"{{"Sid":"Lax","Effect":"Allow","Principal":{{"AWS":"app"}},"Action":"kms:Decrypt","Resource":"*","Condition":{{"StringEqualsIfExists":{{"kms:RecipientAttestation:PCR0":"{A}"}},"StringEquals":{{"kms:RecipientAttestation:PCR8":"{}"}}}}}}"#,
                A.to_uppercase()
            )],
            vec![
                "statement \"Lax\": StringEqualsIfExists kms:RecipientAttestation:PCR0 is satisfied by a request WITHOUT",
                "statement \"Lax\": StringEquals kms:RecipientAttestation:PCR8 compares with upper-case hex",
            ],
        ),
        (
            "everyone, unconditioned, beside a pinned statement",
            vec![
                pin("Enclave", "app", r#""kms:Decrypt""#),
                r#"{"Sid":"Everyone","Effect":"Allow","Principal":"*","Action":"kms:Decrypt","Resource":"*"}"#.into(),
            ],
            vec![
                "statement \"Everyone\" allows kms:Decrypt without attestation conditions, so the attestation conditions of statement \"Enclave\"",
                "statement \"Everyone\" allows every principal with no condition",
            ],
        ),
    ];
    for (name, statements, expected) in cases {
        let policy = Policy::parse(&key_policy(&statements.join(",")), PolicyKind::Key)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let warnings = policy.lint();
        assert_eq!(warnings.len(), expected.len(), "{name}: {warnings:#?}");
        for (w, e) in warnings.iter().zip(&expected) {
            assert!(w.contains(e), "{name}: {w:?} lacks {e:?}");
        }
    }
}
