//! Confidential inference end to end (examples/inference): a model owner and a
//! data owner each seal their bytes under their own KMS key, whose policy pins
//! the inference image's PCR0; the enclave opens both, runs the model with
//! tract, and seals the predictions for the data owner. The predictions equal
//! scikit-learn's; either owner can revoke; another model, or a model sealed for
//! another image, is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

mod common;
use common::inference::{
    MODEL_CONTEXT, MODELS, RECORDS_CONTEXT, TOLERANCE, World, example, sha256_hex,
};
use common::{failed_with, s};

/// `record_id -> probabilities` of a CSV with a header.
fn table(csv: &str) -> (String, Vec<(String, Vec<f64>)>) {
    let mut lines = csv.lines();
    let header = lines.next().unwrap().to_owned();
    let rows = lines
        .map(|l| {
            let mut f = l.split(',');
            let id = f.next().unwrap().to_owned();
            (id, f.map(|v| v.parse().unwrap()).collect())
        })
        .collect();
    (header, rows)
}

#[test]
fn three_models_score_sealed_records_as_scikit_learn_does_and_the_parent_sees_neither() {
    let w = World::new();
    let images: Vec<(PathBuf, String)> = MODELS.iter().map(|m| w.image(m, &[])).collect();
    let pcr0s: Vec<&str> = images.iter().map(|(_, p)| p.as_str()).collect();
    let [_, _, predictions_key] = w.create_keys(&pcr0s);
    // The held-out records, and rows that are not records of the model's width
    // of finite numbers: counted as malformed, not scored.
    let heldout_text = std::fs::read_to_string(example("data/heldout.csv")).unwrap();
    let ones = |n: usize| vec!["1"; n].join(",");
    let malformed = [
        format!("bad-nan,{},NaN", ones(29)),
        format!("bad-inf,{},inf", ones(29)),
        format!("bad-short,{}", ones(29)),
        format!("bad-long,{}", ones(31)),
        format!("bad-text,{},x", ones(29)),
        format!(",{}", ones(30)),
    ];
    let heldout = w.h.path("records.csv");
    std::fs::write(
        &heldout,
        format!("{heldout_text}{}\n", malformed.join("\n")),
    )
    .unwrap();
    let records = w.seal(
        "data-owner",
        "alias/records",
        &format!("{RECORDS_CONTEXT},study=breast-cancer"),
        &heldout,
        "records.sealed",
    );

    for (model, (image, _)) in MODELS.iter().zip(&images) {
        let onnx_path = example(&format!("models/{model}.onnx"));
        let onnx = std::fs::read(&onnx_path).unwrap();
        let sealed_model = w.seal(
            "model-owner",
            "alias/model",
            &format!("{MODEL_CONTEXT},model={model}"),
            &onnx_path,
            &format!("{model}.sealed"),
        );
        w.launch(model, image);
        let (summary, predictions, response) = w.score(model, &sealed_model, &records);
        assert_eq!(summary["model_sha256"], sha256_hex(&onnx), "{model}");
        // Sealed under the key and context the image names, not the inputs'.
        let nl = response.iter().position(|b| *b == b'\n').unwrap();
        let header = cloister_sealed::Header::read(&mut &response[nl + 1..]).unwrap();
        assert!(
            header.key_id.ends_with(&predictions_key),
            "{}",
            header.key_id
        );
        assert_eq!(
            header.encryption_context,
            [("purpose".to_owned(), "predictions".to_owned())]
        );
        assert_eq!(summary["scored"], 143, "{model}");
        assert_eq!(summary["malformed"], malformed.len(), "{model}");

        let expected =
            std::fs::read_to_string(example(&format!("data/expected-{model}.csv"))).unwrap();
        let (want_header, want) = table(&expected);
        let (got_header, got) = table(&predictions);
        assert_eq!(got_header, want_header);
        assert_eq!(got.len(), want.len(), "{model}");
        let mut worst = 0f64;
        for ((gid, gp), (wid, wp)) in got.iter().zip(&want) {
            assert_eq!(gid, wid, "{model}: rows in another order");
            assert_eq!(gp.len(), 2);
            for (g, e) in gp.iter().zip(wp) {
                worst = worst.max((g - e).abs());
            }
        }
        assert!(
            worst <= TOLERANCE,
            "{model}: differs from scikit-learn by {worst:e}"
        );

        // What the parent relayed holds neither the model nor a record.
        let captured = w.captured.lock().unwrap().clone();
        let request = std::fs::read(&sealed_model).unwrap();
        let first_record = heldout_text.lines().nth(1).unwrap();
        for (what, haystack) in [
            ("proxy stream", &captured),
            ("sealed model", &request),
            ("response", &response),
        ] {
            for needle in [
                &onnx[onnx.len() - 64..],
                first_record.as_bytes(),
                b"mean_radius",
                predictions.lines().nth(1).unwrap().as_bytes(),
            ] {
                assert!(
                    !haystack.windows(needle.len()).any(|x| x == needle),
                    "{model}: the {what} holds plaintext {:?}",
                    String::from_utf8_lossy(&needle[..needle.len().min(40)])
                );
            }
        }
    }

    // These images do not take records in the clear, over the channel or not:
    // the parent cannot query the model with records of its choosing.
    let clear = w.h.path("clear.csv");
    std::fs::write(
        &clear,
        format!("{}\n", heldout_text.lines().nth(1).unwrap()),
    )
    .unwrap();
    let out = w.h.run(&[
        "call",
        "--enclave-name",
        MODELS[0],
        "--part",
        &format!("model={}", s(&w.h.path(&format!("{}.sealed", MODELS[0])))),
        "--part",
        &format!("records={}", s(&clear)),
    ]);
    let e = failed_with(&out, "E-ENCLAVE-WORKLOAD");
    assert!(
        e.contains("E-INFERENCE-RECORD") && e.contains("clear-records=allow"),
        "{e}"
    );

    // The runtime keeps its broker connection between KMS calls and calls: one
    // more call (three attested releases) opens none. When the connection is
    // cut while idle (a proxy or broker closing it), the next call still
    // succeeds, on exactly one new connection.
    let model = MODELS[0];
    let sealed_model = w.h.path(&format!("{model}.sealed"));
    let before = w.relay.accepted();
    assert_eq!(w.score(model, &sealed_model, &records).0["scored"], 143);
    assert_eq!(w.relay.accepted(), before, "a call opened a new connection");
    w.relay.cut();
    assert_eq!(w.score(model, &sealed_model, &records).0["scored"], 143);
    assert_eq!(w.relay.accepted(), before + 1);
}

#[test]
fn either_owner_revokes_the_other_is_untouched_and_other_models_are_refused() {
    let w = World::new();
    // This image also answers records sent in the clear (over the attested
    // channel); the model owner's policy approves it knowing so (PCR0).
    let (image, pcr0) = w.image("logreg", &["--config", "clear-records=allow"]);
    let (_, forest_pcr0) = w.image("forest", &[]);
    let [model_key, records_key, _] = w.create_keys(&[&pcr0]);
    // A key of the model owner's for another image (the forest's) only.
    w.create_key(
        "model-owner",
        "alias/model-for-forest",
        "kms:Decrypt",
        &[&forest_pcr0],
    );
    let model = w.seal(
        "model-owner",
        "alias/model",
        &format!("{MODEL_CONTEXT},model=logreg"),
        &example("models/logreg.onnx"),
        "logreg.sealed",
    );
    let records = w.seal(
        "data-owner",
        "alias/records",
        &format!("{RECORDS_CONTEXT},study=breast-cancer"),
        &example("data/heldout.csv"),
        "records.sealed",
    );
    w.launch("inference", &image);
    let (summary, _, _) = w.score("inference", &model, &records);
    assert_eq!(summary["scored"], 143);

    // One record over the attested channel (the client verified the image
    // first): its prediction in the clear to the client alone, as scikit-learn's.
    let heldout = std::fs::read_to_string(example("data/heldout.csv")).unwrap();
    let one = w.h.path("one-record.csv");
    std::fs::write(&one, format!("{}\n", heldout.lines().nth(1).unwrap())).unwrap();
    let attested = |model: &std::path::Path| {
        w.h.run(&[
            "call",
            "--enclave-name",
            "inference",
            "--part",
            &format!("model={}", s(model)),
            "--part",
            &format!("records={}", s(&one)),
            "--attested",
            "--root",
            s(&w.h.path("platform/root.pem")),
            "--expect-image",
            s(&image),
        ])
    };
    let out = attested(&model);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, got) = table(&String::from_utf8(out.stdout).unwrap());
    let expected = std::fs::read_to_string(example("data/expected-logreg.csv")).unwrap();
    let (_, want) = table(&expected);
    let want = want
        .iter()
        .find(|(id, _)| *id == got[0].0)
        .expect("a held-out id");
    assert_eq!(got.len(), 1);
    for (g, e) in got[0].1.iter().zip(&want.1) {
        assert!((g - e).abs() <= TOLERANCE, "{g} vs scikit-learn's {e}");
    }

    // The model owner disables their key: the next run is denied, and says why.
    w.owner_ok(
        "model-owner",
        &["kms", "disable-key", "--key-id", &model_key],
    );
    let e = failed_with(&w.call("inference", &model, &records), "E-ENCLAVE-WORKLOAD");
    assert!(e.contains("E-KMS-DISABLED"), "{e}");
    // ... over the channel too (the refusal reaches the client encrypted).
    let e = failed_with(&attested(&model), "E-CHANNEL-REFUSED");
    assert!(e.contains("E-KMS-DISABLED"), "{e}");
    // The data owner's key is untouched: they still open their own file.
    w.owner_ok(
        "data-owner",
        &[
            "decrypt",
            "--in",
            s(&records),
            "--out",
            s(&w.h.path("records-again.csv")),
        ],
    );
    w.owner_ok(
        "model-owner",
        &["kms", "enable-key", "--key-id", &model_key],
    );
    w.score("inference", &model, &records);

    // The data owner withdraws the enclave's statement from their key policy.
    let owner_only = w.h.path("owner-only.json");
    std::fs::write(
        &owner_only,
        r#"{"Version":"2012-10-17","Statement":{"Sid":"Owner","Effect":"Allow","Principal":{"AWS":"data-owner"},"Action":"kms:*","Resource":"*"}}"#,
    )
    .unwrap();
    let put_records_policy = |file: &std::path::Path| {
        w.owner_ok(
            "data-owner",
            &[
                "kms",
                "put-key-policy",
                "--key-id",
                &records_key,
                "--policy",
                &format!("file://{}", s(file)),
            ],
        )
    };
    put_records_policy(&owner_only);
    let e = failed_with(&w.call("inference", &model, &records), "E-ENCLAVE-WORKLOAD");
    assert!(
        e.contains("E-KMS-ACCESS-DENIED") && e.contains("does not name principal"),
        "{e}"
    );
    // The model owner's key is untouched.
    w.owner_ok(
        "model-owner",
        &[
            "decrypt",
            "--in",
            s(&model),
            "--out",
            s(&w.h.path("model-again.onnx")),
        ],
    );
    put_records_policy(&w.h.path("alias-records.policy.json"));
    w.score("inference", &model, &records);

    // Another model, sealed under the right key: this image runs only its own.
    let forest = w.seal(
        "model-owner",
        "alias/model",
        &format!("{MODEL_CONTEXT},model=forest"),
        &example("models/forest.onnx"),
        "forest.sealed",
    );
    let e = failed_with(
        &w.call("inference", &forest, &records),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(e.contains("E-INFERENCE-MODEL-MISMATCH"), "{e}");
    // The refusal names the pinned hash, never the hash of what was opened.
    let forest_sha = sha256_hex(&std::fs::read(example("models/forest.onnx")).unwrap());
    assert!(!e.contains(&forest_sha), "{e}");
    // The right model, sealed under a key that only another image may use.
    let elsewhere = w.seal(
        "model-owner",
        "alias/model-for-forest",
        &format!("{MODEL_CONTEXT},model=logreg"),
        &example("models/logreg.onnx"),
        "elsewhere.sealed",
    );
    let e = failed_with(
        &w.call("inference", &elsewhere, &records),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(
        e.contains("E-KMS-ACCESS-DENIED") && e.contains("ImageSha384"),
        "{e}"
    );
    // Parts missing, swapped or not parts at all.
    let e = failed_with(
        &w.h.run(&[
            "call",
            "--enclave-name",
            "inference",
            "--part",
            &format!("records={}", s(&records)),
        ]),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(
        e.contains("E-REQUEST-PARTS") && e.contains("no part \"model\""),
        "{e}"
    );
    // Swapped: each part's encryption context is checked before its key is
    // asked for, so neither file is opened as the other.
    let e = failed_with(&w.call("inference", &records, &model), "E-ENCLAVE-WORKLOAD");
    assert!(
        e.contains("E-WORKLOAD-INPUT") && e.contains("purpose=model"),
        "{e}"
    );
    let e = failed_with(&w.call("inference", &model, &model), "E-ENCLAVE-WORKLOAD");
    assert!(
        e.contains("E-WORKLOAD-INPUT") && e.contains("purpose=records"),
        "{e}"
    );
    let e = failed_with(
        &w.h.call(
            &["--enclave-name", "inference"],
            &std::fs::read(&model).unwrap(),
        ),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(e.contains("E-REQUEST-PARTS"), "{e}");
    // A part given twice is the caller's mistake, refused before anything is sent.
    let e = failed_with(
        &w.h.run(&[
            "call",
            "--enclave-name",
            "inference",
            "--part",
            &format!("model={}", s(&model)),
            "--part",
            &format!("model={}", s(&model)),
        ]),
        "E-CLI-USAGE",
    );
    assert!(e.contains("given twice"), "{e}");
}
