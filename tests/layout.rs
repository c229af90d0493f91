//! The crate layout follows the trust boundaries, and stays that way: the
//! dependency rules below are checked against `cargo metadata` (normal, not
//! dev, dependencies, followed transitively).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Each crate's transitive normal dependencies, by package name.
fn closure() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let name_of: BTreeMap<String, String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_owned(),
                p["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let direct: BTreeMap<String, Vec<String>> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|k| k["kind"].is_null())
                })
                .map(|d| d["pkg"].as_str().unwrap().to_owned())
                .collect();
            (n["id"].as_str().unwrap().to_owned(), deps)
        })
        .collect();
    let mut result = BTreeMap::new();
    for id in direct.keys() {
        let mut seen = BTreeSet::new();
        let mut todo = vec![id.clone()];
        while let Some(next) = todo.pop() {
            for d in direct.get(&next).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        result.insert(
            name_of[id].clone(),
            seen.iter().map(|d| name_of[d].clone()).collect(),
        );
    }
    result
}

#[test]
fn dependencies_follow_the_trust_boundaries() {
    let deps = closure();
    let forbidden: &[(&str, &[&str])] = &[
        // The runtime: no broker server, no SQLite, no CLI, no supervisor.
        (
            "cloister-runtime",
            &[
                "cloister-kms",
                "rusqlite",
                "libsqlite3-sys",
                "clap",
                "cloister-host",
                "cloister-supervisor",
            ],
        ),
        // Callers of the broker link its protocol, not its server.
        (
            "cloister-kms-api",
            &["cloister-kms", "rusqlite", "clap", "wasmtime"],
        ),
        // The supervisor launches runtimes; it holds no broker and no CLI.
        (
            "cloister-supervisor",
            &["cloister-kms", "rusqlite", "clap", "cloister-host"],
        ),
        // Formats stand alone (as age-core apart from age).
        (
            "cloister-image",
            &["wasmtime", "cloister-kms-api", "rusqlite"],
        ),
        (
            "cloister-sealed",
            &[
                "wasmtime",
                "tokio",
                "cloister-kms-api",
                "cloister-attestation",
            ],
        ),
        // The guest SDK builds for wasm32: nothing of the host.
        (
            "cloister-guest",
            &[
                "wasmtime",
                "tokio",
                "cloister-kms-api",
                "cloister-attestation",
            ],
        ),
        ("cloister-kms", &["wasmtime", "cloister-runtime", "clap"]),
        // The attested channel's client library: usable without the rest of
        // Cloister (no runtime, broker, supervisor, CLI, HTTP stack).
        (
            "cloister-channel",
            &[
                "wasmtime",
                "cloister-runtime",
                "cloister-kms",
                "cloister-kms-api",
                "cloister-supervisor",
                "cloister-host",
                "rusqlite",
                "clap",
                "hyper",
            ],
        ),
    ];
    for (krate, banned) in forbidden {
        let have = deps
            .get(*krate)
            .unwrap_or_else(|| panic!("{krate} is not in the workspace"));
        for b in *banned {
            assert!(
                !have.contains(*b),
                "{krate} depends on {b}, across a trust boundary"
            );
        }
    }
    // And the rules can fail: the CLI does link the broker server and the runtime.
    assert!(deps["cloister-host"].contains("cloister-kms"));
    assert!(deps["cloister-host"].contains("cloister-runtime"));
}
