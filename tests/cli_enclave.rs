//! Enclaves end to end: build -> describe -> run -> call -> terminate, across real
//! processes, with a guest that calls every import, hostile guests, debug mode,
//! parallel launches, hardening read from /proc, and attested KMS access through
//! the proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use serde_json::Value;

mod common;
use common::{Host, Server, cloister, failed_with, guest, json_of, s};

fn pcr_of(h: &Host, args: &[&str]) -> String {
    let mut a = vec!["pcr"];
    a.extend_from_slice(args);
    h.ok(&a)["PCR"].as_str().unwrap().to_owned()
}

#[test]
fn images_are_deterministic_measured_and_checked() {
    let h = Host::new();
    let (a, built) = h.build("a.cimg", &[]);
    let (b, _) = h.build("b.cimg", &[]);
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "two builds differ"
    );
    let m = &built["Measurements"];
    assert_eq!(m["HashAlgorithm"], "Sha384");
    assert_eq!(
        m["PCR2"],
        pcr_of(&h, &["--input", s(&guest("test_guest"))]).as_str()
    );
    assert!(m.get("PCR8").is_none());

    let d = h.ok(&["describe-image", "--image", s(&a)]);
    assert_eq!(d["Measurements"], *m);
    assert_eq!(d["Signature"]["Signed"], false);
    assert_eq!(d["Manifest"]["Name"], "test");

    // Another version is another PCR0, the same PCR2.
    let (_, v2) = h.build("v2.cimg", &["--metadata", "{\"build\":2}"]);
    assert_ne!(v2["Measurements"]["PCR0"], m["PCR0"]);
    assert_eq!(v2["Measurements"]["PCR2"], m["PCR2"]);

    // Signed with an Ed25519 certificate: PCR8 is the certificate's measurement.
    let cert = h.path("platform/root.pem");
    let key = h.path("platform/root.key");
    let (signed, sb) = h.build(
        "signed.cimg",
        &["--signing-certificate", s(&cert), "--private-key", s(&key)],
    );
    assert_eq!(
        sb["Measurements"]["PCR8"],
        pcr_of(&h, &["--signing-certificate", s(&cert)]).as_str()
    );
    assert_eq!(
        sb["Measurements"]["PCR0"], m["PCR0"],
        "PCR0 excludes the signature section"
    );
    let d = h.ok(&["describe-image", "--image", s(&signed)]);
    assert_eq!(d["Signature"]["SignatureValid"], true);
    assert!(
        d["Signature"]["CertificateSubject"]
            .as_str()
            .unwrap()
            .contains("Cloister Platform Root CA")
    );

    // Damaged images are refused with the reason.
    let bytes = std::fs::read(&signed).unwrap();
    let damaged = h.path("damaged.cimg");
    std::fs::write(&damaged, &bytes[..bytes.len() - 10]).unwrap();
    failed_with(
        &h.run(&["describe-image", "--image", s(&damaged)]),
        "E-IMAGE-FORMAT",
    );
    let mut altered = bytes.clone();
    altered[200] ^= 1;
    std::fs::write(&damaged, &altered).unwrap();
    let out = h.run(&["describe-image", "--image", s(&damaged)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("error[E-IMAGE-SIGNATURE]"));
    failed_with(
        &h.run(&["run-enclave", "--image", s(&damaged)]),
        "E-IMAGE-SIGNATURE",
    );
    let other_key = h.path("other.key");
    cloister_attestation::keyfile::write_signing_key(
        &other_key,
        &ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng),
        false,
    )
    .unwrap();
    let wasm = guest("test_guest");
    failed_with(
        &h.run(&[
            "build-enclave",
            "--wasm",
            s(&wasm),
            "--name",
            "t",
            "--version",
            "1",
            "--signing-certificate",
            s(&cert),
            "--private-key",
            s(&other_key),
            "--output",
            s(&h.path("x.cimg")),
        ]),
        "E-IMAGE-SIGNATURE",
    );
    // A core module is not a component.
    std::fs::write(h.path("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    failed_with(
        &h.run(&[
            "build-enclave",
            "--wasm",
            s(&h.path("core.wasm")),
            "--name",
            "t",
            "--version",
            "1",
            "--output",
            s(&h.path("y.cimg")),
        ]),
        "E-IMAGE-COMPONENT",
    );
    assert!(!h.path("y.cimg").exists());
}

fn proc_status(pid: u64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

#[test]
fn run_call_attest_terminate() {
    let h = Host::new();
    let (image, built) = h.build("t.cimg", &[]);
    let role = "arn:aws:iam::123456789012:role/Parent";
    let run = h.ok(&[
        "run-enclave",
        "--image",
        s(&image),
        "--enclave-name",
        "app",
        "--parent-role",
        role,
        "--instance-id",
        "i-0123",
    ]);
    assert_eq!(run["State"], "RUNNING");
    assert_eq!(run["Flags"], "NONE");
    assert_eq!(run["EnclaveCID"], 16);
    let m = &run["Measurements"];
    for pcr in ["PCR0", "PCR1", "PCR2"] {
        assert_eq!(
            m[pcr], built["Measurements"][pcr],
            "{pcr} differs from build-enclave's"
        );
    }
    assert_eq!(m["PCR3"], pcr_of(&h, &["--string", role]).as_str());
    assert_eq!(m["PCR4"], pcr_of(&h, &["--string", "i-0123"]).as_str());

    // Hardening, read from /proc.
    let pid = run["ProcessID"].as_u64().unwrap();
    let status = proc_status(pid);
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    assert_eq!(run["Hardening"]["not_dumpable"], true);
    if nix::unistd::geteuid().is_root() {
        // As root the supervisor can give the runtime both: a network namespace
        // of its own, entered before it drops to its own unprivileged uid.
        assert!(
            run["Hardening"]["network_namespace"]
                .as_str()
                .unwrap()
                .starts_with("own"),
            "{}",
            run["Hardening"]
        );
        assert_ne!(run["Hardening"]["uid"], 0);
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(!uid_line.contains("\t0\t"), "{uid_line}");
    }
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    if run["Hardening"]["network_namespace"]
        .as_str()
        .unwrap()
        .starts_with("own")
    {
        assert_ne!(ours, theirs, "the runtime claims its own network namespace");
    } else {
        eprintln!(
            "no network namespace here: {}",
            run["Hardening"]["network_namespace"]
        );
    }

    // Calls, by name and by CID; large inputs are streamed in frames.
    assert_eq!(
        h.call_ok(&["--enclave-name", "app"], b"echo:hello"),
        b"hello"
    );
    let big: Vec<u8> = (0..5 << 20).map(|i| (i % 251) as u8).collect();
    let mut req = b"echo:".to_vec();
    req.extend_from_slice(&big);
    assert_eq!(h.call_ok(&["--enclave-cid", "16"], &req), big);
    let pcr16 = h.call_ok(&["--enclave-name", "app"], b"extend:measure me");
    assert_eq!(pcr16.len(), 96);

    // The enclave attests itself; the document verifies with the platform root
    // and carries the measurements run-enclave printed and the caller's nonce.
    let doc = h.call_ok(&["--enclave-name", "app"], b"attest:0badc0de");
    std::fs::write(h.path("doc.cose"), &doc).unwrap();
    let v = h.ok(&[
        "attestation",
        "verify",
        "--doc",
        s(&h.path("doc.cose")),
        "--root",
        s(&h.path("platform/root.pem")),
        "--expect-pcr",
        &format!("0={}", m["PCR0"].as_str().unwrap()),
        "--expect-pcr",
        &format!("3={}", m["PCR3"].as_str().unwrap()),
        "--expect-nonce",
        "0badc0de",
    ]);
    assert_eq!(v["Debug"], false);
    assert_eq!(
        v["PCRs"]["PCR16"],
        String::from_utf8(pcr16).unwrap().as_str()
    );

    // The platform owner's tool predicts the same PCR0..4 from the image alone.
    let predicted = h.path("predicted.cose");
    let pcr3 = format!("3={}", m["PCR3"].as_str().unwrap());
    let pcr4 = format!("4={}", m["PCR4"].as_str().unwrap());
    h.ok(&[
        "platform",
        "attest",
        "--dir",
        s(&h.path("platform")),
        "--image",
        s(&image),
        "--pcr",
        &pcr3,
        "--pcr",
        &pcr4,
        "--out",
        s(&predicted),
    ]);
    let p = h.ok(&[
        "attestation",
        "verify",
        "--doc",
        s(&predicted),
        "--root",
        s(&h.path("platform/root.pem")),
    ]);
    for i in 0..5 {
        let k = format!("PCR{i}");
        assert_eq!(p["PCRs"][&k], v["PCRs"][&k], "{k}");
    }
    failed_with(
        &h.run(&[
            "platform",
            "attest",
            "--dir",
            s(&h.path("platform")),
            "--image",
            s(&image),
            "--pcr",
            &format!("0={}", "00".repeat(48)),
            "--out",
            s(&predicted),
        ]),
        "E-CLI-USAGE",
    );

    // The other NSM imports: random bytes, and locking PCR16..31 at once.
    assert_eq!(
        h.call_ok(&["--enclave-name", "app"], b"random:48").len(),
        48
    );
    assert_ne!(
        h.call_ok(&["--enclave-name", "app"], b"random:32"),
        h.call_ok(&["--enclave-name", "app"], b"random:32")
    );
    assert_eq!(
        h.call_ok(&["--enclave-name", "app"], b"lock-all"),
        b"locked"
    );
    let e = failed_with(
        &h.call(&["--enclave-name", "app"], b"extend:after lock"),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(e.contains("E-ATTEST-PCR-LOCKED"), "{e}");
    let locked = String::from_utf8(h.call_ok(&["--enclave-name", "app"], b"pcr:31")).unwrap();
    assert!(locked.ends_with(" true"), "{locked}");

    // Production enclaves have no console, and no files, environment or network.
    failed_with(
        &h.run(&["console", "--enclave-name", "app"]),
        "E-ENCLAVE-NOT-DEBUG",
    );
    assert_eq!(h.call_ok(&["--enclave-name", "app"], b"env"), b"0");
    let f =
        String::from_utf8(h.call_ok(&["--enclave-name", "app"], b"read-file:/etc/passwd")).unwrap();
    assert!(f.starts_with("no file access"), "{f}");

    let list = h.ok(&["describe-enclaves"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["EnclaveName"], "app");
    failed_with(
        &h.run(&["run-enclave", "--image", s(&image), "--enclave-name", "app"]),
        "E-ENCLAVE-IN-USE",
    );
    failed_with(
        &h.run(&["run-enclave", "--image", s(&image), "--enclave-cid", "16"]),
        "E-ENCLAVE-IN-USE",
    );
    // Without --enclave-name, enclaves of one image are named after it: test,
    // then test-2.
    for name in ["test", "test-2"] {
        let v = h.ok(&["run-enclave", "--image", s(&image)]);
        assert_eq!(v["EnclaveName"], name, "{v}");
    }
    for name in ["test", "test-2"] {
        h.ok(&["terminate-enclave", "--enclave-name", name]);
    }
    let e = failed_with(
        &h.run(&[
            "run-enclave",
            "--image",
            s(&image),
            "--memory-mib",
            "1000000",
        ]),
        "E-ENCLAVE-START",
    );
    assert!(e.contains("choose 1 to 4096"), "{e}");

    let t = h.ok(&["terminate-enclave", "--enclave-name", "app"]);
    assert_eq!(t[0]["Terminated"], true);
    // Gone, or a zombie waiting for init to reap it.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || proc_status(pid).contains("State:\tZ"),
        "{}",
        proc_status(pid)
    );
    assert_eq!(h.ok(&["describe-enclaves"]), Value::Array(vec![]));
    failed_with(
        &h.call(&["--enclave-name", "app"], b"echo:x"),
        "E-ENCLAVE-NOT-FOUND",
    );
    failed_with(
        &h.call(&["--enclave-name", "never"], b"echo:x"),
        "E-ENCLAVE-NOT-FOUND",
    );
}

/// The supervisor keeps one runtime process started ahead of the next launch
/// (a spare: exec'd, in its own network namespace, waiting for its start
/// message), and a launch takes it; but not after the runtime binary changed:
/// the spare runs the old binary, which the new measurement (PCR1) does not
/// describe, so it is killed and the launch starts the new binary.
#[test]
fn a_launch_takes_the_spare_runtime_unless_the_binary_changed() {
    use std::os::unix::fs::MetadataExt;
    let mut h = Host::new();
    let installed = Path::new(common::bin()).with_file_name("cloister-runtime");
    let runtime = h.path("cloister-runtime");
    std::fs::copy(&installed, &runtime).unwrap();
    h.start_supervisor(&["--runtime", s(&runtime)]);
    let supervisor = h.supervisor.as_ref().unwrap().pid().to_string();
    let children = || -> Vec<u64> {
        let out = std::process::Command::new("pgrep")
            .args(["-P", &supervisor])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    };
    let alive = |pid: u64| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").starts_with(" Z"))
    };
    let wait_for = |what: &str, f: &dyn Fn() -> Option<u64>| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "no {what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let exe_inode = |pid: u64| std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino();
    let (image, _) = h.build("t.cimg", &[]);
    // Warm the code cache first: a cold launch compiles in a child of its own.
    h.ok(&["run-enclave", "--image", s(&image), "--enclave-name", "w"]);
    h.ok(&["terminate-enclave", "--enclave-name", "w"]);
    let spare = wait_for("spare", &|| match children()[..] {
        [one] => Some(one),
        _ => None,
    });
    let run = h.ok(&["run-enclave", "--image", s(&image), "--enclave-name", "a"]);
    assert_eq!(
        run["ProcessID"].as_u64(),
        Some(spare),
        "the launch took the spare"
    );
    let stale = wait_for("next spare", &|| {
        children().into_iter().find(|p| *p != spare && alive(*p))
    });
    assert_eq!(exe_inode(stale), std::fs::metadata(&runtime).unwrap().ino());
    // The runtime binary is replaced (a new file, as an upgrade writes it).
    let new = h.path("cloister-runtime.new");
    std::fs::copy(&installed, &new).unwrap();
    std::fs::rename(&new, &runtime).unwrap();
    let run = h.ok(&["run-enclave", "--image", s(&image), "--enclave-name", "b"]);
    let b = run["ProcessID"].as_u64().unwrap();
    assert_ne!(b, stale, "a spare of the replaced binary was used");
    assert_eq!(
        exe_inode(b),
        std::fs::metadata(&runtime).unwrap().ino(),
        "enclave b runs the binary its PCR1 measures"
    );
    wait_for("end of the stale spare", &|| (!alive(stale)).then_some(0));
    // Enclaves started from spares outlive the supervisor threads that
    // started them (a parent-death signal follows the forking thread, and
    // tokio ends idle blocking threads after 10 s).
    std::thread::sleep(std::time::Duration::from_secs(11));
    for which in ["a", "b"] {
        assert_eq!(
            h.call_ok(&["--enclave-name", which], b"echo:hello"),
            b"hello",
            "enclave {which}"
        );
    }
}

/// A call never sees an earlier call's memory, though the runtime reuses call
/// slots: the first `WARM_MEMORY_BYTES` (64 MiB) of a slot's memory are zeroed
/// in place when its call ends, the rest returned to the kernel. A marker left
/// over 120 MiB (both parts) is gone for the next call, which reads all of its
/// memory; in one call the same scan finds the marker it left (the control).
#[test]
fn a_call_never_sees_an_earlier_calls_memory() {
    let h = Host::new();
    let (image, _) = h.build(
        "t.cimg",
        &["--memory-mib", "160", "--cpu-ms-per-call", "20000"],
    );
    h.ok(&["run-enclave", "--image", s(&image), "--enclave-name", "m"]);
    let w = ["--enclave-name", "m"];
    let marker = "8d1c5e07a93f42b6e0d15c7a2b9f6e31";
    let scan = format!("scan-memory:140;{marker}");
    for round in 0..2 {
        let left = format!("leave-marker:120;{marker}");
        assert_eq!(h.call_ok(&w, left.as_bytes()), b"left");
        assert_eq!(
            h.call_ok(&w, scan.as_bytes()),
            b"0",
            "an earlier call's bytes (round {round})"
        );
    }
    let control = String::from_utf8(h.call_ok(&w, format!("{scan};fill").as_bytes())).unwrap();
    assert!(control.parse::<usize>().unwrap() >= 65536, "{control}");
}

#[test]
fn hostile_guests_are_stopped_and_the_enclave_keeps_serving() {
    let h = Host::new();
    let (image, _) = h.build(
        "t.cimg",
        &["--cpu-ms-per-call", "3000", "--memory-mib", "32"],
    );
    h.ok(&["run-enclave", "--image", s(&image), "--enclave-name", "h"]);
    let w = ["--enclave-name", "h"];
    failed_with(&h.call(&w, b"loop"), "E-ENCLAVE-CPU-LIMIT");
    failed_with(&h.call(&w, b"alloc"), "E-ENCLAVE-MEMORY-LIMIT");
    failed_with(&h.call(&w, b"big:17000000"), "E-ENCLAVE-RESPONSE-TOO-LARGE");
    failed_with(&h.call(&w, b"panic"), "E-ENCLAVE-TRAP");
    let e = failed_with(&h.call(&w, b"fail:on purpose"), "E-ENCLAVE-WORKLOAD");
    assert!(e.contains("E-TEST-FAIL") && e.contains("on purpose"), "{e}");
    failed_with(&h.call(&w, b"bad-handle"), "E-ENCLAVE-WORKLOAD");
    // The guest may not put a key of its choosing (its caller's) in a document.
    let e = failed_with(
        &h.call(&w, &[b"attest-key:".as_slice(), &[b'a'; 64]].concat()),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(
        e.contains("E-ENCLAVE-ARGUMENT") && e.contains("reserved"),
        "{e}"
    );
    let e = failed_with(&h.call(&w, b"kms-random:8"), "E-ENCLAVE-WORKLOAD");
    assert!(
        e.contains("E-ENCLAVE-NO-KMS") && e.contains("names no key broker"),
        "{e}"
    );
    // Calls blocked in a sleep are stopped at the deadline too, so that sleepers
    // cannot hold every call slot (max 4 here): all four are stopped, then the
    // enclave answers again.
    let env = h.env();
    // One request file, written once: rewriting it while a sleeper reads it
    // would hand that sleeper an empty request.
    let sleep_req = h.path("sleep.req");
    std::fs::write(&sleep_req, b"sleep:60000").unwrap();
    let sleepers: Vec<_> = (0..4)
        .map(|_| {
            let env = env.clone();
            let req = sleep_req.clone();
            std::thread::spawn(move || {
                let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                common::cloister_env(&["call", "--enclave-name", "h", "--input", s(&req)], &env)
            })
        })
        .collect();
    let started = std::time::Instant::now();
    for t in sleepers {
        let e = failed_with(&t.join().unwrap(), "E-ENCLAVE-DEADLINE");
        assert!(e.contains("3000 ms"), "{e}");
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "sleepers were not stopped at their deadline"
    );
    // Locked PCRs stay locked across calls; build-time PCRs cannot be touched.
    h.call_ok(&w, b"lock");
    let e = failed_with(&h.call(&w, b"extend:x"), "E-ENCLAVE-WORKLOAD");
    assert!(e.contains("E-ATTEST-PCR-LOCKED"), "{e}");
    assert_eq!(h.call_ok(&w, b"echo:still serving"), b"still serving");
}

#[test]
fn debug_mode_reads_zeros_and_keeps_its_console() {
    let h = Host::new();
    let (image, _) = h.build("t.cimg", &[]);
    let run = h.ok(&["run-enclave", "--image", s(&image), "--debug-mode"]);
    assert_eq!(run["Flags"], "DEBUG_MODE");
    let zero = "00".repeat(48);
    assert!(
        run["Measurements"]
            .as_object()
            .unwrap()
            .values()
            .all(|v| v == &Value::String(zero.clone()))
    );
    let w = ["--enclave-name", "test"];
    h.call_ok(&w, b"console:hello from the guest");
    h.call_ok(&w, b"print:to stdout");
    let doc = h.call_ok(&w, b"attest:00");
    std::fs::write(h.path("doc.cose"), &doc).unwrap();
    let v = h.ok(&[
        "attestation",
        "verify",
        "--doc",
        s(&h.path("doc.cose")),
        "--root",
        s(&h.path("platform/root.pem")),
    ]);
    assert_eq!(v["Debug"], true);
    let console = String::from_utf8(h.run(&["console", "--enclave-name", "test"]).stdout).unwrap();
    assert!(
        console.contains("hello from the guest")
            && console.contains("stdout: to stdout")
            && console.contains("stderr: to stdout"),
        "{console}"
    );
    // Terminated, the enclave and its console are gone (as on Nitro).
    h.ok(&["terminate-enclave", "--all"]);
    failed_with(
        &h.run(&["console", "--enclave-name", "test"]),
        "E-ENCLAVE-NOT-FOUND",
    );
}

#[test]
fn ten_parallel_launches_get_distinct_cids() {
    let h = Host::new();
    let (image, _) = h.build("t.cimg", &[]);
    let env = h.env();
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let image = image.clone();
            let env = env.clone();
            std::thread::spawn(move || {
                let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let out = common::cloister_env(
                    &[
                        "run-enclave",
                        "--image",
                        s(&image),
                        "--enclave-name",
                        &format!("p{i}"),
                    ],
                    &env,
                );
                json_of(&out, "parallel run-enclave")["EnclaveCID"]
                    .as_u64()
                    .unwrap()
            })
        })
        .collect();
    let mut cids: Vec<u64> = handles.into_iter().map(|t| t.join().unwrap()).collect();
    cids.sort();
    assert_eq!(cids, (16..26).collect::<Vec<u64>>());
    assert_eq!(h.ok(&["describe-enclaves"]).as_array().unwrap().len(), 10);
    assert_eq!(
        h.ok(&["terminate-enclave", "--all"])
            .as_array()
            .unwrap()
            .len(),
        10
    );
}

/// The broker, a proxy to it, and an enclave whose parent role may decrypt only
/// from an enclave of the right image.
#[test]
fn an_enclave_gets_its_key_through_the_proxy_and_only_its_image_does() {
    let h = Host::new();
    let broker = common::Broker::start(&h);
    let kms_dir = broker.data.clone();
    let proxy_sock = broker.proxy_sock.clone();
    let admin = |args: &[&str]| broker.admin(args);
    let role = "arn:aws:iam::123456789012:role/Parent";
    let parent_key = h.path("parent.key");
    broker.add_principal(role, &parent_key);

    let trust = broker.trust_args();
    let trust: Vec<&str> = trust.iter().map(String::as_str).collect();
    let (image, built) = h.build("good.cimg", &trust);
    let pcr0 = built["Measurements"]["PCR0"].as_str().unwrap().to_owned();
    let policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[
          {{"Sid":"Admin","Effect":"Allow","Principal":{{"AWS":"admin"}},"Action":["kms:Encrypt","kms:DescribeKey"],"Resource":"*"}},
          {{"Sid":"Enclave","Effect":"Allow","Principal":{{"AWS":"{role}"}},"Action":["kms:Decrypt","kms:GenerateDataKey"],"Resource":"*",
            "Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"{pcr0}"}}}}}}]}}"#
    );
    std::fs::write(h.path("policy.json"), policy).unwrap();
    let key_id = admin(&[
        "kms",
        "create-key",
        "--policy",
        &format!("file://{}", s(&h.path("policy.json"))),
    ])["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(h.path("dk.bin"), [0x11u8; 32]).unwrap();
    let enc = admin(&[
        "kms",
        "encrypt",
        "--key-id",
        &key_id,
        "--plaintext",
        &format!("fileb://{}", s(&h.path("dk.bin"))),
        "--encryption-context",
        "set=a",
    ]);
    use base64::Engine;
    let blob = base64::engine::general_purpose::STANDARD
        .decode(enc["CiphertextBlob"].as_str().unwrap())
        .unwrap();
    let blob_hex: String = blob.iter().map(|b| format!("{b:02x}")).collect();

    let kms_args = [
        "--kms-proxy",
        &format!("unix:{}", s(&proxy_sock)),
        "--kms-principal",
        role,
        "--kms-principal-key",
        s(&parent_key),
    ]
    .map(str::to_owned);
    let launch = |name: &str, image: &Path, extra: &[&str]| {
        let mut args = common::run_enclave_args(image, name, role, &proxy_sock, &parent_key);
        args.extend(extra.iter().map(|a| a.to_string()));
        h.ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    launch("good", &image, &[]);
    // The runtime refuses a PCR3 that is not the principal it signs as.
    let mut mismatched = vec![
        "run-enclave",
        "--image",
        s(&image),
        "--enclave-name",
        "liar",
        "--parent-role",
        "arn:aws:iam::123456789012:role/Admin",
    ];
    mismatched.extend(kms_args.iter().map(String::as_str));
    let e = failed_with(&h.run(&mismatched), "E-ENCLAVE-START");
    assert!(e.contains("PCR3 must measure the principal"), "{e}");
    let out = String::from_utf8(h.call_ok(
        &["--enclave-name", "good"],
        format!("kms-decrypt:{blob_hex};set=a").as_bytes(),
    ))
    .unwrap();
    let (sealed_hex, opened) = out.split_once('|').unwrap();
    assert_eq!(opened, "sealed in the enclave");
    // The enclave sealed with the data key: check it natively with the key we know.
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let sealed: Vec<u8> = (0..sealed_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&sealed_hex[i..i + 2], 16).unwrap())
        .collect();
    let plain = aes_gcm::Aes256Gcm::new_from_slice(&[0x11; 32])
        .unwrap()
        .decrypt(
            aes_gcm::Nonce::from_slice(&[7; 12]),
            Payload {
                msg: &sealed,
                aad: b"aad",
            },
        )
        .unwrap();
    assert_eq!(plain, b"sealed in the enclave");

    let gdk = String::from_utf8(h.call_ok(
        &["--enclave-name", "good"],
        format!("kms-gdk:{key_id}").as_bytes(),
    ))
    .unwrap();
    assert!(gdk.starts_with("arn:cloister:kms:local:key/"), "{gdk}");
    assert_eq!(
        h.call_ok(&["--enclave-name", "good"], b"kms-random:24")
            .len(),
        24
    );

    // A modified image and a debug-mode enclave are refused, with the reason.
    let mut patched = trust.clone();
    patched.extend(["--metadata", "{\"patched\":true}"]);
    let (modified, _) = h.build("modified.cimg", &patched);
    launch("modified", &modified, &[]);
    let e = failed_with(
        &h.call(
            &["--enclave-name", "modified"],
            format!("kms-decrypt:{blob_hex};set=a").as_bytes(),
        ),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(
        e.contains("E-KMS-ACCESS-DENIED") && e.contains("ImageSha384"),
        "{e}"
    );
    launch("debug", &image, &["--debug-mode"]);
    let e = failed_with(
        &h.call(
            &["--enclave-name", "debug"],
            format!("kms-decrypt:{blob_hex};set=a").as_bytes(),
        ),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(e.contains("E-KMS-ACCESS-DENIED"), "{e}");

    // The broker's audit log names each enclave's PCR0.
    let log = std::fs::read_to_string(kms_dir.join("audit.log")).unwrap();
    let decrypts: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["action"] == "kms:Decrypt")
        .collect();
    assert_eq!(decrypts.len(), 3);
    assert_eq!(decrypts[0]["decision"], "Allow");
    assert_eq!(decrypts[0]["recipient_pcr0"], pcr0.as_str());
    assert_eq!(decrypts[1]["decision"], "Deny");
    assert_eq!(decrypts[2]["recipient_pcr0"], "00".repeat(48).as_str());
}

/// The runtime reuses its recipient key and document across KMS calls for a
/// while; a broker that allows younger documents refuses the kept one
/// (E-ATTEST-STALE, audited) and the call succeeds with a fresh document; a
/// PCR the workload extends is in the next call's document, never the kept one.
#[test]
fn a_kept_recipient_document_too_old_for_the_broker_or_its_pcrs_is_replaced() {
    let h = Host::new();
    let broker = common::Broker::start_with(&h, &["--max-document-age", "4"]);
    let role = "arn:aws:iam::123456789012:role/Parent";
    let parent_key = h.path("parent.key");
    broker.add_principal(role, &parent_key);
    // Data keys only while PCR16 is as the enclave started (all zero).
    let policy = h.path("pcr16.json");
    std::fs::write(
        &policy,
        format!(
            r#"{{"Version":"2012-10-17","Statement":[
              {{"Sid":"Admin","Effect":"Allow","Principal":{{"AWS":"admin"}},"Action":"kms:*","Resource":"*"}},
              {{"Sid":"Unextended","Effect":"Allow","Principal":{{"AWS":"{role}"}},"Action":"kms:GenerateDataKey","Resource":"*",
                "Condition":{{"StringEquals":{{"kms:RecipientAttestation:PCR16":"{}"}}}}}}]}}"#,
            "00".repeat(48)
        ),
    )
    .unwrap();
    let key_id = broker.create_key("admin", &broker.data.join("admin.key"), &policy, "alias/k");
    let trust = broker.trust_args();
    let trust: Vec<&str> = trust.iter().map(String::as_str).collect();
    let (image, _) = h.build("kms.cimg", &trust);
    let args = common::run_enclave_args(&image, "kms", role, &broker.proxy_sock, &parent_key);
    h.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let gdk = || {
        h.call(
            &["--enclave-name", "kms"],
            format!("kms-gdk:{key_id}").as_bytes(),
        )
    };
    let granted = |out: std::process::Output, n: usize| {
        assert!(
            String::from_utf8(out.stdout).unwrap().starts_with("arn:"),
            "call {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    granted(gdk(), 1);
    granted(gdk(), 2);
    std::thread::sleep(std::time::Duration::from_millis(5100));
    granted(gdk(), 3);
    h.call_ok(
        &["--enclave-name", "kms"],
        b"extend:a plugin the workload loaded",
    );
    let e = failed_with(&gdk(), "E-ENCLAVE-WORKLOAD");
    assert!(
        e.contains("E-KMS-ACCESS-DENIED") && e.contains("PCR16"),
        "{e}"
    );
    let log = std::fs::read_to_string(broker.data.join("audit.log")).unwrap();
    let calls: Vec<(String, String)> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["action"] == "kms:GenerateDataKey")
        .map(|l| {
            (
                l["decision"].as_str().unwrap().to_owned(),
                l["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let decisions: Vec<&str> = calls.iter().map(|(d, _)| d.as_str()).collect();
    // Reused (no refusal between 1 and 2), stale then fresh, then the new PCR16.
    assert_eq!(
        decisions,
        ["Allow", "Allow", "Deny", "Allow", "Deny"],
        "{calls:?}"
    );
    assert!(calls[2].1.contains("E-ATTEST-STALE"), "{calls:?}");
    assert!(calls[4].1.contains("PCR16"), "{calls:?}");
}

#[test]
fn the_proxy_relays_only_to_allowed_destinations() {
    let h = Host::new();
    let allowlist = h.path("allowlist.json");
    std::fs::write(&allowlist, r#"{"allowlist": ["unix:/tmp/b.sock"]}"#).unwrap();
    let proxy = |to: &str| {
        cloister(&[
            "proxy",
            "--listen",
            &format!("unix:{}", s(&h.path("p.sock"))),
            "--to",
            to,
            "--allowlist",
            s(&allowlist),
        ])
    };
    // A destination the administrator's file does not name is refused.
    let e = failed_with(&proxy("unix:/tmp/a.sock"), "E-PROXY-NOT-ALLOWED");
    assert!(
        e.contains("unix:/tmp/a.sock") && e.contains("not in the allowlist"),
        "{e}"
    );
    assert!(!h.path("p.sock").exists());
    // An allowlist others could write is no allowlist.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&allowlist, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = failed_with(&proxy("unix:/tmp/b.sock"), "E-CLI-USAGE");
    assert!(e.contains("writable by no one else"), "{e}");
    std::fs::set_permissions(&allowlist, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&allowlist, r#"{"allow": []}"#).unwrap();
    failed_with(&proxy("unix:/tmp/b.sock"), "E-CLI-USAGE");
    std::fs::remove_file(&allowlist).unwrap();
    failed_with(&proxy("unix:/tmp/b.sock"), "E-CLI-INPUT");
    failed_with(
        &h.run(&["run-enclave", "--image", "/nonexistent.cimg"]),
        "E-CLI-INPUT",
    );
}

/// The broker on TCP with TLS; the enclave reaches it through a Unix-socket proxy
/// and speaks TLS end to end, so the proxy relays ciphertext only. Compiled code is
/// cached, so a second enclave of the image starts from the cache.
#[test]
fn tls_to_the_broker_end_to_end_through_the_proxy() {
    let h = Host::new();
    let kms_dir = h.path("kms");
    h.ok(&["kms", "init", "--data-dir", s(&kms_dir)]);
    let kms_sock = h.path("kms.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    let _kms = Server::start(
        &[
            "kms",
            "serve",
            "--data-dir",
            s(&kms_dir),
            "--listen",
            &format!("unix:{}", s(&kms_sock)),
            "--listen",
            &tcp,
        ],
        &[],
        &kms_sock,
    );
    let proxy_sock = h.path("proxy.sock");
    let allowlist = h.path("allowlist.json");
    std::fs::write(&allowlist, format!(r#"{{"allowlist": ["{tcp}"]}}"#)).unwrap();
    let _proxy = Server::start(
        &[
            "proxy",
            "--listen",
            &format!("unix:{}", s(&proxy_sock)),
            "--to",
            &tcp,
            "--allowlist",
            s(&allowlist),
        ],
        &[],
        &proxy_sock,
    );
    let env = [
        ("CLOISTER_KMS_ENDPOINT", format!("unix:{}", s(&kms_sock))),
        ("CLOISTER_PRINCIPAL", "admin".to_string()),
        (
            "CLOISTER_PRINCIPAL_KEY",
            s(&kms_dir.join("admin.key")).to_string(),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    json_of(
        &common::cloister_env(
            &[
                "kms",
                "trust",
                "add",
                "--root",
                s(&h.path("platform/root.pem")),
            ],
            &env,
        ),
        "trust add",
    );

    // Which broker the enclave trusts, and its TLS CA, are in the image (PCR0).
    let ca = kms_dir.join("tls/ca.pem");
    let broker_pub = kms_dir.join("broker.pub");
    let (image, _) = h.build(
        "t.cimg",
        &[
            "--kms-broker-key",
            s(&broker_pub),
            "--kms-ca",
            s(&ca),
            "--kms-tls-name",
            "127.0.0.1",
        ],
    );
    let proxy = format!("unix:{}", s(&proxy_sock));
    let admin_key = kms_dir.join("admin.key");
    let run = |image: &Path, name: &str| {
        h.ok(&[
            "run-enclave",
            "--image",
            s(image),
            "--enclave-name",
            name,
            "--kms-proxy",
            &proxy,
            "--kms-principal",
            "admin",
            "--kms-principal-key",
            s(&admin_key),
        ])
    };
    run(&image, "tls");
    assert_eq!(
        h.call_ok(&["--enclave-name", "tls"], b"kms-random:16")
            .len(),
        16
    );
    // The parent has no say in the CA: run-enclave takes none.
    let out = h.run(&["run-enclave", "--image", s(&image), "--kms-ca", s(&ca)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kms-ca"));

    // An image without the CA speaks plain to the TLS listener: no answer.
    let (plain_image, _) = h.build("plain.cimg", &["--kms-broker-key", s(&broker_pub)]);
    run(&plain_image, "plain");
    let e = failed_with(
        &h.call(&["--enclave-name", "plain"], b"kms-random:16"),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(e.contains("E-PROTO") || e.contains("E-KMS"), "{e}");

    let cached = std::fs::read_dir(h.path("state/cache"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(cached > 0, "no compiled code was cached");
}

#[test]
fn run_enclave_takes_a_config_file_like_nitro_cli() {
    let h = Host::new();
    let (image, _) = h.build("t.cimg", &[]);
    let config = h.path("enclave.json");
    std::fs::write(
        &config,
        serde_json::json!({"eif_path": image, "enclave_name": "configured", "enclave_cid": 42, "debug_mode": true}).to_string(),
    )
    .unwrap();
    let run = h.ok(&["run-enclave", "--config", s(&config)]);
    assert_eq!(run["EnclaveName"], "configured");
    assert_eq!(run["EnclaveCID"], 42);
    assert_eq!(run["Flags"], "DEBUG_MODE");
    // A flag overrides the file.
    let run = h.ok(&[
        "run-enclave",
        "--config",
        s(&config),
        "--enclave-name",
        "second",
        "--enclave-cid",
        "43",
    ]);
    assert_eq!(run["EnclaveName"], "second");
    std::fs::write(&config, r#"{"eif_path": "x", "cpu_count": 2}"#).unwrap();
    let e = failed_with(
        &h.run(&["run-enclave", "--config", s(&config)]),
        "E-CLI-USAGE",
    );
    assert!(e.contains("cpu_count"), "{e}");
}

/// Reported as ignored where it cannot run; `scripts/test` runs it
/// (`--ignored`) where the kernel has vsock loopback.
#[test]
#[ignore = "needs vsock loopback (/sys/module/vsock_loopback); scripts/test runs it where present"]
fn enclaves_listen_on_vsock_loopback() {
    // Never open a vsock socket without loopback: it would leave the machine.
    cloister_proto::vsock_loopback_available().expect("this test needs vsock loopback");
    let h = Host::new();
    let (image, _) = h.build("t.cimg", &[]);
    let run = h.ok(&["run-enclave", "--image", s(&image), "--enclave-name", "v"]);
    assert!(run["Vsock"].as_str().unwrap().starts_with("vsock:1:"));
    let req = h.path("r.bin");
    std::fs::write(&req, b"echo:over vsock").unwrap();
    let out = h.run(&["call", "--enclave-name", "v", "--vsock", "--input", s(&req)]);
    assert_eq!(out.stdout, b"over vsock");
}

/// Guest bytes are compiled in a confined process of their own, not in the
/// supervisor: a component that does not compile is refused with the
/// compiler's reason, and the supervisor keeps serving.
#[test]
fn a_component_that_does_not_compile_is_refused_at_launch() {
    let h = Host::new();
    let wasm = h.path("broken.wasm");
    std::fs::write(&wasm, b"\0asm\x0d\0\x01\0 not a component body").unwrap();
    let image = h.path("broken.cimg");
    h.ok(&[
        "build-enclave",
        "--wasm",
        s(&wasm),
        "--name",
        "broken",
        "--version",
        "1",
        "--output",
        s(&image),
    ]);
    let e = failed_with(
        &h.run(&["run-enclave", "--image", s(&image)]),
        "E-ENCLAVE-START",
    );
    assert!(e.contains("failed to parse WebAssembly"), "{e}");
    let (good, _) = h.build("t.cimg", &[]);
    h.ok(&[
        "run-enclave",
        "--image",
        s(&good),
        "--enclave-name",
        "after",
    ]);
    assert_eq!(
        h.call_ok(&["--enclave-name", "after"], b"echo:still here"),
        b"still here"
    );
}
