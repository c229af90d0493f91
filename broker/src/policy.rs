//! AWS-style policies: the JSON grammar of IAM / KMS key policies and their
//! evaluation, for Cloister's two-factor authorization.
//!
//! A request is allowed only when the caller's *identity policy* allows it AND the
//! key's *key policy* allows it; an explicit `Deny` in either wins. Within one
//! policy, statements are ORed; within a statement, Principal, Action, Resource
//! and every condition must all match. Within a condition, several values for one
//! key are ORed and several keys (and operators) are ANDed — AWS's semantics.
//!
//! Supported grammar: `Version` ("2012-10-17" or "2008-10-17"), `Id`, `Statement`
//! (object or list) with `Sid`, `Effect`, `Principal` (key policies only: `"*"`
//! or `{"AWS": name | [names]}`), `Action` / `NotAction`, `Resource` /
//! `NotResource` (wildcards `*` and `?`), and `Condition` with `StringEquals`,
//! `StringNotEquals`, `StringEqualsIgnoreCase`, `StringNotEqualsIgnoreCase`,
//! `StringLike`, `StringNotLike` (each also `...IfExists`) and `Null`.
//! Condition keys: `kms:RecipientAttestation:ImageSha384`,
//! `kms:RecipientAttestation:PCR0`..`PCR31`, `kms:EncryptionContext:<key>`,
//! `kms:CallerAccount` (the account of a principal named by its IAM ARN),
//! `kms:CallerPrincipal`; the prefix `cloister:` is an alias of `kms:`.
//! A key policy's `Principal` names principals by name; as in AWS,
//! `arn:aws:iam::ACCOUNT:root` (or `ACCOUNT`) names every principal whose
//! name is an IAM ARN of that account.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde_json::Value;

/// Which kind of policy a document is; they differ in whether `Principal` is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Attached to a principal; has no `Principal` element.
    Identity,
    /// Attached to a key; every statement names a `Principal`.
    Key,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::Identity => "identity policy",
            PolicyKind::Key => "key policy",
        })
    }
}

/// Why a policy document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {problem}")]
pub struct PolicyError {
    pub kind: PolicyKind,
    pub problem: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Matcher {
    /// `Action` / `Resource`: matches when any pattern matches.
    Any(Vec<String>),
    /// `NotAction` / `NotResource`: matches when no pattern matches.
    None(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    StringEquals,
    StringNotEquals,
    StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase,
    StringLike,
    StringNotLike,
    Null,
}

impl Operator {
    fn parse(name: &str) -> Option<(Operator, bool)> {
        let (base, if_exists) = match name.strip_suffix("IfExists") {
            Some(base) => (base, true),
            None => (name, false),
        };
        let op = match base {
            "StringEquals" => Operator::StringEquals,
            "StringNotEquals" => Operator::StringNotEquals,
            "StringEqualsIgnoreCase" => Operator::StringEqualsIgnoreCase,
            "StringNotEqualsIgnoreCase" => Operator::StringNotEqualsIgnoreCase,
            "StringLike" => Operator::StringLike,
            "StringNotLike" => Operator::StringNotLike,
            "Null" if !if_exists => Operator::Null,
            _ => return None,
        };
        Some((op, if_exists))
    }

    fn negated(self) -> bool {
        matches!(
            self,
            Operator::StringNotEquals
                | Operator::StringNotEqualsIgnoreCase
                | Operator::StringNotLike
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    operator_name: String,
    operator: Operator,
    if_exists: bool,
    /// The key as written, for messages.
    key: String,
    /// The canonical key, as request contexts are keyed.
    canonical: String,
    values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Statement {
    sid: Option<String>,
    index: usize,
    effect: Effect,
    /// `None` = anyone (`"*"`); only key policies have principals.
    principals: Option<Vec<String>>,
    action: Matcher,
    resource: Matcher,
    conditions: Vec<Condition>,
}

impl Statement {
    fn label(&self) -> String {
        match &self.sid {
            Some(sid) => format!("statement {sid:?}"),
            None => format!("statement #{}", self.index + 1),
        }
    }
}

/// A parsed, validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub kind: PolicyKind,
    statements: Vec<Statement>,
}

/// What a request looks like to a policy.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// e.g. `kms:Decrypt`.
    pub action: String,
    /// The key ARN, or `*` for actions on no particular key.
    pub resource: String,
    /// The authenticated principal's name.
    pub principal: String,
    /// Condition key values, keyed by [`canonical_condition_key`].
    pub values: BTreeMap<String, String>,
}

impl RequestContext {
    /// Sets a condition key's value (the key is canonicalised).
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        if let Some(k) = canonical_condition_key(key) {
            self.values.insert(k, value.into());
        }
    }
}

/// The outcome of evaluating one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evaluation {
    /// A statement allows the request.
    Allow { statement: String },
    /// A Deny statement matches: the request is refused whatever else allows it.
    ExplicitDeny { statement: String },
    /// Nothing allows the request; `why` names the closest statement's failure.
    ImplicitDeny { why: String },
}

/// The largest policy document accepted (AWS KMS's key policy limit).
pub const MAX_POLICY_BYTES: usize = 32 * 1024;

/// Maps a condition key to its canonical form: the `cloister:` prefix to `kms:`,
/// everything lower case except the encryption-context key name (AWS treats
/// context keys case-sensitively). `None` for keys Cloister does not know.
pub fn canonical_condition_key(key: &str) -> Option<String> {
    let (prefix, rest) = key.split_once(':')?;
    if !prefix.eq_ignore_ascii_case("kms") && !prefix.eq_ignore_ascii_case("cloister") {
        return None;
    }
    const CONTEXT: &str = "encryptioncontext:";
    if let (Some(head), Some(name)) = (rest.get(..CONTEXT.len()), rest.get(CONTEXT.len()..))
        && !name.is_empty()
        && head.eq_ignore_ascii_case(CONTEXT)
    {
        return Some(format!("kms:encryptioncontext:{name}"));
    }
    let rest = rest.to_ascii_lowercase();
    let known = match rest.as_str() {
        "callerprincipal" | "calleraccount" | "recipientattestation:imagesha384" => true,
        r => r
            .strip_prefix("recipientattestation:pcr")
            .is_some_and(|n| n.parse::<u8>().is_ok_and(|i| i < 32 && i.to_string() == n)),
    };
    known.then(|| format!("kms:{rest}"))
}

/// Whether a canonical key is one of the attestation keys.
pub fn is_attestation_key(canonical: &str) -> bool {
    canonical.starts_with("kms:recipientattestation:")
}

/// `*` matches any run of characters, `?` any one character. Never
/// backtracks: the pattern runs as a bit-parallel automaton (one bit per
/// pattern position), one step per character of the value, so the cost is
/// O(value × pattern / 64) word operations whatever the pattern.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    // Runs of `*` are one `*`, so a star's empty match is a single step.
    let mut p: Vec<char> = Vec::with_capacity(pattern.len());
    for c in pattern.chars() {
        if !(c == '*' && p.last() == Some(&'*')) {
            p.push(c);
        }
    }
    let m = p.len();
    let words = m / 64 + 1; // bits 0..=m: bit i = "the first i pattern characters matched"
    let set = |v: &mut [u64], i: usize| v[i / 64] |= 1 << (i % 64);
    let (mut star, mut any) = (vec![0u64; words], vec![0u64; words]);
    let in_text: std::collections::HashSet<char> = text.chars().collect();
    let mut literal: HashMap<char, Vec<u64>> = HashMap::new();
    for (i, c) in p.iter().enumerate() {
        match c {
            '*' => set(&mut star, i),
            '?' => set(&mut any, i),
            c if in_text.contains(c) => set(literal.entry(*c).or_insert(vec![0; words]), i),
            _ => {}
        }
    }
    // A star at i also lets position i + 1 be reached without a character.
    let close = |s: &mut [u64]| {
        let mut carry = 0;
        for (w, star) in s.iter_mut().zip(&star) {
            let skip = *w & star;
            *w |= (skip << 1) | carry;
            carry = skip >> 63;
        }
    };
    let mut state = vec![0u64; words];
    set(&mut state, 0);
    close(&mut state);
    let mut next = vec![0u64; words];
    for c in text.chars() {
        let lit = literal.get(&c);
        let mut carry = 0;
        for w in 0..words {
            let advance = state[w] & (any[w] | lit.map_or(0, |l| l[w]));
            next[w] = (state[w] & star[w]) | (advance << 1) | carry;
            carry = advance >> 63;
        }
        close(&mut next);
        if next.iter().all(|w| *w == 0) {
            return false;
        }
        std::mem::swap(&mut state, &mut next);
    }
    (state[m / 64] >> (m % 64)) & 1 == 1
}

fn err(kind: PolicyKind, problem: impl Into<String>) -> PolicyError {
    PolicyError {
        kind,
        problem: problem.into(),
    }
}

/// A string or a list of strings; numbers and booleans become their text (AWS
/// accepts `true` and `"true"` alike in conditions).
fn strings(kind: PolicyKind, what: &str, v: &Value) -> Result<Vec<String>, PolicyError> {
    let one = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(err(
            kind,
            format!("{what} must be a string or a list of strings"),
        )),
    };
    match v {
        Value::Array(items) if items.is_empty() => {
            Err(err(kind, format!("{what} is an empty list")))
        }
        Value::Array(items) => items.iter().map(one).collect(),
        v => one(v).map(|s| vec![s]),
    }
}

impl Policy {
    /// Parses and validates a policy document. Every problem is refused here, at
    /// put time, so that evaluation never meets an invalid policy.
    pub fn parse(json: &str, kind: PolicyKind) -> Result<Policy, PolicyError> {
        if json.len() > MAX_POLICY_BYTES {
            return Err(err(
                kind,
                format!(
                    "it is {} bytes; a policy is at most {MAX_POLICY_BYTES} (as in AWS KMS)",
                    json.len()
                ),
            ));
        }
        let doc: Value =
            serde_json::from_str(json).map_err(|e| err(kind, format!("not JSON: {e}")))?;
        let Value::Object(top) = doc else {
            return Err(err(kind, "the policy must be a JSON object"));
        };
        for k in top.keys() {
            if !matches!(k.as_str(), "Version" | "Id" | "Statement") {
                return Err(err(
                    kind,
                    format!("unknown element {k:?} (expected Version, Id, Statement)"),
                ));
            }
        }
        match top.get("Version") {
            Some(Value::String(v)) if v == "2012-10-17" || v == "2008-10-17" => {}
            Some(v) => return Err(err(kind, format!("Version {v} is not \"2012-10-17\""))),
            None => return Err(err(kind, "Version is missing (use \"2012-10-17\")")),
        }
        let statements = match top.get("Statement") {
            Some(Value::Array(list)) if !list.is_empty() => list.iter().collect::<Vec<_>>(),
            Some(Value::Array(_)) => return Err(err(kind, "Statement is an empty list")),
            Some(v @ Value::Object(_)) => vec![v],
            Some(_) => {
                return Err(err(
                    kind,
                    "Statement must be an object or a list of objects",
                ));
            }
            None => return Err(err(kind, "Statement is missing")),
        };
        let mut sids = std::collections::HashSet::new();
        let statements = statements
            .into_iter()
            .enumerate()
            .map(|(i, s)| Self::parse_statement(kind, i, s))
            .collect::<Result<Vec<_>, _>>()?;
        for s in &statements {
            if let Some(sid) = &s.sid
                && !sids.insert(sid.clone())
            {
                return Err(err(kind, format!("Sid {sid:?} is used by two statements")));
            }
        }
        Ok(Policy { kind, statements })
    }

    fn parse_statement(
        kind: PolicyKind,
        index: usize,
        v: &Value,
    ) -> Result<Statement, PolicyError> {
        let at = |problem: String| err(kind, format!("statement #{}: {problem}", index + 1));
        let Value::Object(s) = v else {
            return Err(at("a statement must be a JSON object".into()));
        };
        for k in s.keys() {
            if !matches!(
                k.as_str(),
                "Sid"
                    | "Effect"
                    | "Principal"
                    | "Action"
                    | "NotAction"
                    | "Resource"
                    | "NotResource"
                    | "Condition"
            ) {
                let hint = if k == "NotPrincipal" {
                    " (NotPrincipal is not supported)"
                } else {
                    ""
                };
                return Err(at(format!("unknown element {k:?}{hint}")));
            }
        }
        let sid = match s.get("Sid") {
            None => None,
            Some(Value::String(sid)) => Some(sid.clone()),
            Some(_) => return Err(at("Sid must be a string".into())),
        };
        let effect = match s.get("Effect") {
            Some(Value::String(e)) if e == "Allow" => Effect::Allow,
            Some(Value::String(e)) if e == "Deny" => Effect::Deny,
            Some(e) => return Err(at(format!("Effect {e} must be \"Allow\" or \"Deny\""))),
            None => return Err(at("Effect is missing".into())),
        };
        let principals = match (kind, s.get("Principal")) {
            (PolicyKind::Identity, Some(_)) => {
                return Err(at("an identity policy has no Principal: it applies to the principal it is attached to".into()));
            }
            (PolicyKind::Identity, None) => None,
            (PolicyKind::Key, None) => {
                return Err(at("a key policy statement needs a Principal".into()));
            }
            (PolicyKind::Key, Some(Value::String(p))) if p == "*" => None,
            (PolicyKind::Key, Some(Value::Object(map))) => {
                let mut names = Vec::new();
                for (k, v) in map {
                    if k != "AWS" {
                        return Err(at(format!(
                            "Principal type {k:?} is not supported (use \"AWS\")"
                        )));
                    }
                    names.extend(strings(kind, "Principal.AWS", v).map_err(|e| at(e.problem))?);
                }
                if names.is_empty() {
                    return Err(at("Principal names no one".into()));
                }
                if names.iter().any(|n| n == "*") {
                    None
                } else {
                    Some(names)
                }
            }
            (PolicyKind::Key, Some(_)) => {
                return Err(at("Principal must be \"*\" or {\"AWS\": ...}".into()));
            }
        };
        let action = match (s.get("Action"), s.get("NotAction")) {
            (Some(a), None) => Matcher::Any(strings(kind, "Action", a).map_err(|e| at(e.problem))?),
            (None, Some(a)) => {
                Matcher::None(strings(kind, "NotAction", a).map_err(|e| at(e.problem))?)
            }
            (Some(_), Some(_)) => return Err(at("Action and NotAction cannot both appear".into())),
            (None, None) => return Err(at("Action (or NotAction) is missing".into())),
        };
        let (Matcher::Any(actions) | Matcher::None(actions)) = &action;
        for a in actions {
            let service = a.split_once(':').map(|(svc, _)| svc.to_ascii_lowercase());
            if a != "*" && !matches!(service.as_deref(), Some("kms") | Some("cloister")) {
                return Err(at(format!(
                    "action {a:?} must be \"*\" or start with \"kms:\" or \"cloister:\""
                )));
            }
        }
        let resource = match (s.get("Resource"), s.get("NotResource")) {
            (Some(r), None) => {
                Matcher::Any(strings(kind, "Resource", r).map_err(|e| at(e.problem))?)
            }
            (None, Some(r)) => {
                Matcher::None(strings(kind, "NotResource", r).map_err(|e| at(e.problem))?)
            }
            (Some(_), Some(_)) => {
                return Err(at("Resource and NotResource cannot both appear".into()));
            }
            (None, None) => {
                return Err(at("Resource (or NotResource) is missing; use \"*\"".into()));
            }
        };
        let mut conditions = Vec::new();
        match s.get("Condition") {
            None => {}
            Some(Value::Object(ops)) => {
                for (op_name, block) in ops {
                    if op_name.contains(':') {
                        return Err(at(format!(
                            "set operator {op_name:?} is not supported: Cloister's condition keys are single-valued"
                        )));
                    }
                    let (operator, if_exists) = Operator::parse(op_name).ok_or_else(|| {
                        at(format!("condition operator {op_name:?} is not supported"))
                    })?;
                    let Value::Object(keys) = block else {
                        return Err(at(format!("{op_name} must map condition keys to values")));
                    };
                    if keys.is_empty() {
                        return Err(at(format!("{op_name} has no condition keys")));
                    }
                    for (key, values) in keys {
                        let canonical = canonical_condition_key(key).ok_or_else(|| {
                            at(format!(
                                "condition key {key:?} is not known (kms:RecipientAttestation:ImageSha384, \
                                 kms:RecipientAttestation:PCR0..PCR31, kms:EncryptionContext:<key>, \
                                 kms:CallerAccount, kms:CallerPrincipal)"
                            ))
                        })?;
                        let values = strings(kind, &format!("{op_name} {key}"), values)
                            .map_err(|e| at(e.problem))?;
                        if operator == Operator::Null
                            && values.iter().any(|v| v != "true" && v != "false")
                        {
                            return Err(at(format!("Null {key} takes \"true\" or \"false\"")));
                        }
                        conditions.push(Condition {
                            operator_name: op_name.clone(),
                            operator,
                            if_exists,
                            key: key.clone(),
                            canonical,
                            values,
                        });
                    }
                }
            }
            Some(_) => return Err(at("Condition must be an object".into())),
        }
        Ok(Statement {
            sid,
            index,
            effect,
            principals,
            action,
            resource,
            conditions,
        })
    }

    /// Evaluates the policy for one request.
    pub fn evaluate(&self, ctx: &RequestContext) -> Evaluation {
        let mut allow = None;
        let mut closest: Option<(u8, String)> = None;
        for s in &self.statements {
            match statement_matches(s, ctx) {
                Ok(()) => match s.effect {
                    Effect::Deny => {
                        return Evaluation::ExplicitDeny {
                            statement: s.label(),
                        };
                    }
                    Effect::Allow => {
                        allow.get_or_insert_with(|| s.label());
                    }
                },
                Err((rank, why)) if s.effect == Effect::Allow => {
                    if closest.as_ref().is_none_or(|(r, _)| rank > *r) {
                        closest = Some((rank, format!("{} {why}", s.label())));
                    }
                }
                Err(_) => {}
            }
        }
        match allow {
            Some(statement) => Evaluation::Allow { statement },
            None => Evaluation::ImplicitDeny {
                why: closest
                    .map_or_else(|| "no statement allows anything".to_owned(), |(_, why)| why),
            },
        }
    }

    /// Warnings about policies that are valid but probably not what was meant.
    pub fn lint(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let allows = |action: &str| -> Vec<&Statement> {
            self.statements
                .iter()
                .filter(|s| s.effect == Effect::Allow && action_matches(&s.action, action))
                .collect()
        };
        // An Allow that requires an attestation document (a positive string
        // condition on an attestation key, without IfExists; `Null` is not one).
        let pins = |s: &Statement| {
            s.conditions.iter().any(|c| {
                is_attestation_key(&c.canonical)
                    && !c.if_exists
                    && !c.operator.negated()
                    && c.operator != Operator::Null
            })
        };
        // A Deny of `action`, on any key, for every principal `s` names, that
        // holds whenever a request carries no attestation document.
        let denied_unattested = |action: &str, s: &Statement| {
            self.statements.iter().any(|d| {
                d.effect == Effect::Deny
                    && action_matches(&d.action, action)
                    && resource_matches(&d.resource, "arn:cloister:kms:local:key/any")
                    && principals_cover(d, s)
                    && d.conditions.iter().all(|c| {
                        is_attestation_key(&c.canonical)
                            && (c.if_exists
                                || c.operator.negated()
                                || (c.operator == Operator::Null
                                    && c.values.iter().any(|v| v == "true")))
                    })
            })
        };
        let labels = |list: &[&Statement]| {
            list.iter()
                .map(|s| s.label())
                .collect::<Vec<_>>()
                .join(", ")
        };
        const ATTESTED: [&str; 3] = ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateRandom"];
        for action in ATTESTED {
            let pinned: Vec<&Statement> = allows(action).into_iter().filter(|s| pins(s)).collect();
            for open in allows(action).into_iter().filter(|s| {
                !s.conditions
                    .iter()
                    .any(|c| is_attestation_key(&c.canonical))
            }) {
                let moot: Vec<&Statement> = pinned
                    .iter()
                    .copied()
                    .filter(|p| principals_overlap(p, open))
                    .collect();
                if moot.is_empty() || denied_unattested(action, open) {
                    continue;
                }
                warnings.push(format!(
                    "{} allows {action} without attestation conditions, so the attestation conditions of {} \
                     are moot for {action}: statements are ORed, and a caller without an enclave is \
                     allowed by the unconditioned one",
                    open.label(),
                    labels(&moot)
                ));
            }
        }
        // ReEncrypt takes no attestation document: whoever may re-encrypt a
        // ciphertext may move it under a key it decrypts without an enclave.
        let decrypt_pinned: Vec<&Statement> = allows("kms:Decrypt")
            .into_iter()
            .filter(|s| pins(s))
            .collect();
        for re in allows("kms:ReEncryptFrom").into_iter().filter(|s| !pins(s)) {
            let bypassed: Vec<&Statement> = decrypt_pinned
                .iter()
                .copied()
                .filter(|p| principals_overlap(p, re))
                .collect();
            if bypassed.is_empty() || denied_unattested("kms:ReEncryptFrom", re) {
                continue;
            }
            warnings.push(format!(
                "{} allows kms:ReEncryptFrom to principals that {} lets decrypt only in an attested enclave: \
                 ReEncrypt carries no attestation document, so they can re-encrypt the ciphertext under a key \
                 they decrypt without one and read the plaintext; leave kms:ReEncrypt* out (or deny it)",
                re.label(),
                labels(&bypassed)
            ));
        }
        // Whoever may replace the key policy may drop its pin.
        let release_pinned: Vec<&Statement> = ATTESTED
            .iter()
            .flat_map(|a| allows(a))
            .filter(|s| pins(s))
            .collect();
        for put in allows("kms:PutKeyPolicy") {
            let undone: Vec<&Statement> = release_pinned
                .iter()
                .copied()
                .filter(|p| principals_overlap(p, put))
                .collect();
            if undone.is_empty() {
                continue;
            }
            warnings.push(format!(
                "{} allows kms:PutKeyPolicy to principals that {} lets have keys only in an attested enclave: \
                 they can replace this policy with one that drops the attestation condition; give \
                 kms:PutKeyPolicy to an administrator who is not the enclave's parent",
                put.label(),
                labels(&undone)
            ));
        }
        // Negated attestation conditions alone hold for a request with no
        // attestation document (AWS: a missing key satisfies a negated operator).
        for s in self.statements.iter().filter(|s| s.effect == Effect::Allow) {
            let attestation: Vec<&Condition> = s
                .conditions
                .iter()
                .filter(|c| is_attestation_key(&c.canonical))
                .collect();
            if !attestation.is_empty() && attestation.iter().all(|c| c.operator.negated()) {
                warnings.push(format!(
                    "{}: its only attestation conditions are negated ({}): a request without an attestation \
                     document satisfies them, as does any image not listed; require the image with \
                     StringEquals or StringEqualsIgnoreCase",
                    s.label(),
                    attestation
                        .iter()
                        .map(|c| format!("{} {}", c.operator_name, c.key))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        for s in &self.statements {
            for c in &s.conditions {
                if is_attestation_key(&c.canonical) {
                    if c.if_exists && !c.operator.negated() {
                        warnings.push(format!(
                            "{}: {} {} is satisfied by a request WITHOUT an attestation document; \
                             drop IfExists to require one",
                            s.label(),
                            c.operator_name,
                            c.key
                        ));
                    }
                    if matches!(
                        c.operator,
                        Operator::StringEquals | Operator::StringNotEquals
                    ) && c
                        .values
                        .iter()
                        .any(|v| v.chars().any(|ch| ch.is_ascii_uppercase()))
                    {
                        warnings.push(format!(
                            "{}: {} {} compares with upper-case hex, but measurements are lower-case hex; \
                             use lower case or StringEqualsIgnoreCase",
                            s.label(),
                            c.operator_name,
                            c.key
                        ));
                    }
                }
            }
            if self.kind == PolicyKind::Key
                && s.effect == Effect::Allow
                && s.principals.is_none()
                && s.conditions.is_empty()
            {
                warnings.push(format!(
                    "{} allows every principal with no condition: only the identity policies stand between \
                     any caller and this key",
                    s.label()
                ));
            }
        }
        warnings
    }
}

/// Whether some principal is named by both statements (a statement without
/// `Principal`, or an identity policy's, names every principal; an account
/// entry names the account's principals).
fn principals_overlap(a: &Statement, b: &Statement) -> bool {
    match (&a.principals, &b.principals) {
        (Some(x), Some(y)) => x
            .iter()
            .any(|n| y.iter().any(|m| entry_covers(n, m) || entry_covers(m, n))),
        _ => true,
    }
}

/// Whether every principal `b` names is named by `a`.
fn principals_cover(a: &Statement, b: &Statement) -> bool {
    match (&a.principals, &b.principals) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(x), Some(y)) => y.iter().all(|m| x.iter().any(|n| entry_covers(n, m))),
    }
}

/// Whether the `Principal` entry `x` names every principal the entry `y` names.
fn entry_covers(x: &str, y: &str) -> bool {
    principal_named(x, y) || account_entry(x).is_some_and(|a| account_entry(y) == Some(a))
}

fn action_matches(m: &Matcher, action: &str) -> bool {
    // Actions are case-insensitive in AWS.
    let a = action.to_ascii_lowercase();
    match m {
        Matcher::Any(p) => p
            .iter()
            .any(|p| wildcard_match(&p.to_ascii_lowercase(), &a)),
        Matcher::None(p) => !p
            .iter()
            .any(|p| wildcard_match(&p.to_ascii_lowercase(), &a)),
    }
}

fn resource_matches(m: &Matcher, resource: &str) -> bool {
    match m {
        Matcher::Any(p) => p.iter().any(|p| wildcard_match(p, resource)),
        Matcher::None(p) => !p.iter().any(|p| wildcard_match(p, resource)),
    }
}

/// The AWS account of a principal named by its IAM or STS ARN
/// (`arn:aws:iam::111122223333:role/x`), if it is so named.
pub fn account_of(principal: &str) -> Option<&str> {
    let mut parts = principal.splitn(6, ':');
    let (Some("arn"), Some(_partition), Some("iam" | "sts"), Some(""), Some(account)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    is_account_id(account).then_some(account)
}

fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

/// The account a `Principal` entry names as a whole: `arn:aws:iam::ACCOUNT:root`
/// or a bare `ACCOUNT`.
fn account_entry(entry: &str) -> Option<&str> {
    if is_account_id(entry) {
        return Some(entry);
    }
    let (head, account) = entry.strip_suffix(":root")?.rsplit_once(':')?;
    (head.starts_with("arn:") && head.ends_with(":iam:") && is_account_id(account))
        .then_some(account)
}

/// Whether a policy's `Principal` entry names a principal: by its name, or,
/// as AWS reads an account entry, as any principal of that account (whose own
/// identity policy must allow too).
fn principal_named(entry: &str, principal: &str) -> bool {
    entry == principal || account_entry(entry).is_some_and(|a| account_of(principal) == Some(a))
}

/// `Ok` when the statement applies; otherwise how far it got (for choosing the
/// most useful explanation) and why it stopped.
fn statement_matches(s: &Statement, ctx: &RequestContext) -> Result<(), (u8, String)> {
    if let Some(names) = &s.principals
        && !names.iter().any(|n| principal_named(n, &ctx.principal))
    {
        return Err((0, format!("does not name principal {:?}", ctx.principal)));
    }
    if !action_matches(&s.action, &ctx.action) {
        return Err((1, format!("does not cover action {}", ctx.action)));
    }
    if !resource_matches(&s.resource, &ctx.resource) {
        return Err((2, format!("does not cover resource {}", ctx.resource)));
    }
    for c in &s.conditions {
        condition_holds(c, ctx).map_err(|why| (3, why))?;
    }
    Ok(())
}

fn condition_holds(c: &Condition, ctx: &RequestContext) -> Result<(), String> {
    let fail = |seen: String| {
        Err(format!(
            "failed condition {} {}: requires {} {:?}, the request has {seen}",
            c.operator_name,
            c.key,
            if c.operator.negated() {
                "none of"
            } else {
                "one of"
            },
            c.values
        ))
    };
    let Some(value) = ctx.values.get(&c.canonical) else {
        if c.operator == Operator::Null {
            return if c.values.iter().any(|v| v == "true") {
                Ok(())
            } else {
                Err(format!(
                    "failed condition Null {}: requires the key to be present, the request has none",
                    c.key
                ))
            };
        }
        // AWS: a missing key fails a positive operator and satisfies a negated
        // one; `...IfExists` satisfies any operator.
        if c.if_exists || c.operator.negated() {
            return Ok(());
        }
        let hint = if is_attestation_key(&c.canonical) {
            " (no attestation document)"
        } else {
            ""
        };
        return fail(format!("no {}{hint}", c.key));
    };
    let any = |f: &dyn Fn(&str) -> bool| c.values.iter().any(|v| f(v));
    let holds = match c.operator {
        Operator::StringEquals => any(&|v| v == value),
        Operator::StringNotEquals => !any(&|v| v == value),
        Operator::StringEqualsIgnoreCase => any(&|v| v.to_lowercase() == value.to_lowercase()),
        Operator::StringNotEqualsIgnoreCase => !any(&|v| v.to_lowercase() == value.to_lowercase()),
        Operator::StringLike => any(&|v| wildcard_match(v, value)),
        Operator::StringNotLike => !any(&|v| wildcard_match(v, value)),
        Operator::Null => c.values.iter().any(|v| v == "false"),
    };
    if holds {
        Ok(())
    } else {
        fail(format!("{value:?}"))
    }
}

/// The result of the two-factor check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Which policy and statement decided, and why.
    pub reason: String,
}

/// Two-factor authorization: the identity policy AND (when the action is on a
/// key) the key policy must allow; an explicit Deny in either wins.
pub fn authorize(
    identity: &Policy,
    key: Option<(&str, &Policy)>,
    ctx: &RequestContext,
) -> Decision {
    let id = identity.evaluate(ctx);
    let key_eval = key.map(|(key_id, p)| (key_id, p.evaluate(ctx)));
    let deny = |reason: String| Decision {
        allowed: false,
        reason,
    };
    if let Evaluation::ExplicitDeny { statement } = &id {
        return deny(format!(
            "explicit Deny in the identity policy of {:?}, {statement}",
            ctx.principal
        ));
    }
    if let Some((key_id, Evaluation::ExplicitDeny { statement })) = &key_eval {
        return deny(format!(
            "explicit Deny in the key policy of {key_id}, {statement}"
        ));
    }
    let id_allow = match id {
        Evaluation::Allow { statement } => statement,
        Evaluation::ImplicitDeny { why } => {
            return deny(format!(
                "the identity policy of {:?} does not allow {} on {}: {why}",
                ctx.principal, ctx.action, ctx.resource
            ));
        }
        Evaluation::ExplicitDeny { .. } => unreachable!("handled above"),
    };
    match key_eval {
        None => Decision {
            allowed: true,
            reason: format!("allowed by the identity policy ({id_allow})"),
        },
        Some((key_id, Evaluation::Allow { statement })) => Decision {
            allowed: true,
            reason: format!(
                "allowed by the identity policy ({id_allow}) and the key policy of {key_id} ({statement})"
            ),
        },
        Some((key_id, Evaluation::ImplicitDeny { why })) => deny(format!(
            "the key policy of {key_id} does not allow {} by {:?}: {why}",
            ctx.action, ctx.principal
        )),
        Some((_, Evaluation::ExplicitDeny { .. })) => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, by dynamic programming (quadratic; small inputs only).
    fn reference(p: &[char], t: &[char]) -> bool {
        let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
        m[0][0] = true;
        for i in 1..=p.len() {
            for j in 0..=t.len() {
                m[i][j] = match p[i - 1] {
                    '*' => m[i - 1][j] || (j > 0 && m[i][j - 1]),
                    '?' => j > 0 && m[i - 1][j - 1],
                    c => j > 0 && m[i - 1][j - 1] && t[j - 1] == c,
                };
            }
        }
        m[p.len()][t.len()]
    }

    fn all_strings(alphabet: &[char], max: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..max {
            last = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            out.extend(last.iter().cloned());
        }
        out
    }

    #[test]
    fn wildcards_match_as_defined_on_every_small_case() {
        let patterns = all_strings(&['a', 'é', '*', '?'], 5);
        let texts = all_strings(&['a', 'é', 'b'], 5);
        for p in &patterns {
            let pc: Vec<char> = p.chars().collect();
            for t in &texts {
                let tc: Vec<char> = t.chars().collect();
                assert_eq!(wildcard_match(p, t), reference(&pc, &tc), "{p:?} vs {t:?}");
            }
        }
        // Patterns longer than one 64-bit word.
        let long = format!("{}*{}", "a?".repeat(40), "b".repeat(30));
        let text = format!("{}{}{}", "ax".repeat(40), "zzz", "b".repeat(30));
        assert!(wildcard_match(&long, &text));
        assert!(!wildcard_match(&long, &text[1..]));
    }

    #[test]
    fn pathological_patterns_cost_no_more_than_a_scan() {
        // A policy's worth (eight patterns of 4,000 characters, as a 32 KB
        // policy holds) against the longest value an encryption context
        // holds: a backtracking matcher spends O(value × pattern) on each,
        // over 3 s here in a debug build; this one about 0.4 s (a few ms in release).
        let value = "a".repeat(8192);
        let patterns = [
            format!("*{}b", "a".repeat(4000)),
            format!("{}b", "*a".repeat(2000)),
            format!("*{}*b", "?".repeat(4000)),
        ];
        let started = std::time::Instant::now();
        for pattern in patterns.iter().cycle().take(8) {
            assert!(!wildcard_match(pattern, &value));
        }
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_millis(1500), "{took:?}");
    }

    #[test]
    fn account_principals_name_the_account_s_principals_only() {
        assert_eq!(
            account_of("arn:aws:iam::111122223333:role/app"),
            Some("111122223333")
        );
        assert_eq!(
            account_of("arn:aws:sts::111122223333:assumed-role/r/s"),
            Some("111122223333")
        );
        for not in [
            "app",
            "arn:aws:iam::1111:role/app",
            "arn:aws:s3:::bucket",
            "arn:aws:iam:us-east-1:111122223333:role/app",
            "arn:aws:iam::11112222333x:role/app",
        ] {
            assert_eq!(account_of(not), None, "{not}");
        }
        let role = "arn:aws:iam::111122223333:role/app";
        assert!(principal_named(role, role));
        assert!(principal_named("arn:aws:iam::111122223333:root", role));
        assert!(principal_named("111122223333", role));
        assert!(!principal_named("arn:aws:iam::999999999999:root", role));
        assert!(!principal_named("999999999999", role));
        assert!(!principal_named(
            "arn:aws:iam::111122223333:role/other",
            role
        ));
        assert!(!principal_named("arn:aws:s3::111122223333:root", role));
        // A principal named without an ARN belongs to no account.
        assert!(!principal_named("111122223333", "app"));
        assert!(!principal_named("arn:aws:iam::111122223333:root", "app"));
        assert_eq!(
            canonical_condition_key("kms:CallerAccount").as_deref(),
            Some("kms:calleraccount")
        );
    }

    #[test]
    fn lint_reads_account_principals_and_warns_when_the_pinned_can_replace_the_policy() {
        let pinned = |admin: &str, admin_actions: &str| {
            Policy::parse(
                &format!(
                    r#"{{"Version":"2012-10-17","Statement":[
                    {{"Sid":"Admin","Effect":"Allow","Principal":{{"AWS":"{admin}"}},"Action":{admin_actions},"Resource":"*"}},
                    {{"Sid":"Enclave","Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::111122223333:role/parent"}},
                      "Action":"kms:Decrypt","Resource":"*",
                      "Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"ab"}}}}}}]}}"#
                ),
                PolicyKind::Key,
            )
            .unwrap()
            .lint()
        };
        // The account's root names the parent: its unconditioned Decrypt and
        // its PutKeyPolicy both undo the pin.
        let w = pinned(
            "arn:aws:iam::111122223333:root",
            r#"["kms:Decrypt","kms:Put*"]"#,
        );
        assert!(w.iter().any(|w| w.contains("are moot")), "{w:?}");
        assert!(w.iter().any(|w| w.contains("kms:PutKeyPolicy")), "{w:?}");
        let w = pinned("111122223333", r#""kms:PutKeyPolicy""#);
        assert!(w.iter().any(|w| w.contains("kms:PutKeyPolicy")), "{w:?}");
        // An administrator role of its own, or another account, does not.
        let w = pinned(
            "arn:aws:iam::111122223333:role/admin",
            r#"["kms:Decrypt","kms:Put*"]"#,
        );
        assert!(w.is_empty(), "{w:?}");
        let w = pinned(
            "arn:aws:iam::999999999999:root",
            r#"["kms:Decrypt","kms:Put*"]"#,
        );
        assert!(w.is_empty(), "{w:?}");
    }
}
