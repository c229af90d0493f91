//! A test workload. The request is `COMMAND` or `COMMAND:ARGUMENT`; each command
//! exercises one import, or misbehaves the way a hostile guest would.

use cloister_guest::{Error, Handler, error, keys, kms, nsm};

struct TestGuest;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, Error> {
    if !s.len().is_multiple_of(2) {
        return Err(error("E-TEST", "odd hex"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| error("E-TEST", "bad hex")))
        .collect()
}

fn context(arg: &str) -> Vec<(String, String)> {
    arg.split(',')
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Occurrences of `marker` anywhere in linear memory (grown to at least
/// `bytes`), but at `marker`'s own address.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
fn scan_memory(marker: &[u8], bytes: usize) -> usize {
    use core::arch::wasm32::{memory_grow, memory_size};
    let pages = memory_size(0);
    let want = bytes.div_ceil(65536);
    if pages < want {
        memory_grow(0, want - pages);
    }
    let size = memory_size(0) * 65536;
    // SAFETY: a wasm32 linear memory is readable from 0 to its size; the
    // reads are volatile so that nothing assumes what the allocator owns.
    let read = |at: usize| unsafe { core::ptr::read_volatile(at as *const u8) };
    let own = marker.as_ptr() as usize;
    let mut found = 0;
    let mut at = 8;
    while at + marker.len() <= size {
        if read(at) == marker[0]
            && at != own
            && (1..marker.len()).all(|i| read(at + i) == marker[i])
        {
            found += 1;
        }
        at += 1;
    }
    found
}

#[cfg(not(target_arch = "wasm32"))]
fn scan_memory(_: &[u8], _: usize) -> usize {
    0
}

impl Handler for TestGuest {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>, Error> {
        let text = String::from_utf8_lossy(&request).into_owned();
        let (cmd, arg) = text.split_once(':').unwrap_or((text.as_str(), ""));
        match cmd {
            "echo" => Ok(request[5.min(request.len())..].to_vec()),
            "pcr" => {
                let p = nsm::describe_pcr(arg.parse().unwrap_or(0))?;
                Ok(format!("{} {}", hex(&p.value), p.locked).into_bytes())
            }
            "extend" => Ok(hex(&nsm::extend_pcr(16, arg.as_bytes())?).into_bytes()),
            "lock" => {
                nsm::lock_pcr(16)?;
                Ok(b"locked".to_vec())
            }
            "lock-all" => {
                nsm::lock_pcrs(32)?;
                Ok(b"locked".to_vec())
            }
            "random" => Ok(nsm::get_random(arg.parse().unwrap_or(16))?),
            "attest" => Ok(nsm::attestation(None, Some(&unhex(arg)?), None)?),
            // A caller's key in the document: what a key broker would release to.
            "attest-key" => Ok(nsm::attestation(None, None, Some(&unhex(arg)?))?),
            "console" => {
                cloister_guest::console::log(arg);
                Ok(b"logged".to_vec())
            }
            "print" => {
                println!("stdout: {arg}");
                eprintln!("stderr: {arg}");
                Ok(b"printed".to_vec())
            }
            "env" => Ok(format!("{}", std::env::vars().count()).into_bytes()),
            "read-file" => match std::fs::read(arg) {
                Ok(_) => Ok(b"READ A FILE".to_vec()),
                Err(e) => Ok(format!("no file access: {e}").into_bytes()),
            },
            // KMS: decrypt a data key blob (hex) then seal a message with it.
            "kms-decrypt" => {
                let (blob, ctx) = arg.split_once(';').unwrap_or((arg, ""));
                let key = kms::decrypt(&unhex(blob)?, &context(ctx))?;
                let sealed = keys::seal(key, &[7u8; 12], b"sealed in the enclave", b"aad")?;
                let opened = keys::open(key, &[7u8; 12], &sealed, b"aad")?;
                keys::forget(key);
                Ok(format!("{}|{}", hex(&sealed), String::from_utf8_lossy(&opened)).into_bytes())
            }
            // The benchmark's key release: N attested decrypts of one blob
            // (hex), each timed in the guest (microseconds, comma-separated).
            "kms-decrypt-timed" => {
                let (n, blob) = arg.split_once(';').unwrap_or(("1", arg));
                let blob = unhex(blob)?;
                let mut times = Vec::new();
                for _ in 0..n.parse::<u32>().unwrap_or(1) {
                    let t = std::time::Instant::now();
                    let key = kms::decrypt(&blob, &[])?;
                    times.push(t.elapsed().as_micros().to_string());
                    keys::forget(key);
                }
                Ok(times.join(",").into_bytes())
            }
            // Leaves MIB MiB of the marker (hex) in linear memory at the end of
            // the call: `scan-memory` in a later call must not find it.
            "leave-marker" => {
                let (mib, marker) = arg.split_once(';').unwrap_or(("1", arg));
                let marker = unhex(marker)?;
                let bytes = mib.parse::<usize>().unwrap_or(1) << 20;
                let filled: Vec<u8> = marker.iter().copied().cycle().take(bytes).collect();
                std::mem::forget(filled);
                Ok(b"left".to_vec())
            }
            // Grows linear memory to MIB MiB and counts the marker (hex) in all of
            // it, but for the copy this call decoded from its request (with
            // `;fill`, after leaving 1 MiB of it in this call: the control).
            "scan-memory" => {
                let mut parts = arg.split(';');
                let (mib, marker) = (parts.next().unwrap_or("1"), parts.next().unwrap_or(""));
                let marker = unhex(marker)?;
                if parts.next() == Some("fill") {
                    let filled: Vec<u8> = marker.iter().copied().cycle().take(1 << 20).collect();
                    std::mem::forget(filled);
                }
                Ok(
                    scan_memory(&marker, mib.parse::<usize>().unwrap_or(1) << 20)
                        .to_string()
                        .into_bytes(),
                )
            }
            "kms-gdk" => {
                let dk = kms::generate_data_key(arg, &[])?;
                Ok(format!("{}|{}", dk.key_id, hex(&dk.ciphertext_blob)).into_bytes())
            }
            "kms-random" => Ok(kms::generate_random(arg.parse().unwrap_or(8))?),
            "bad-handle" => Ok(keys::seal(9999, &[0; 12], b"x", b"")?),
            // Hostile behaviour.
            "loop" => loop {
                std::hint::black_box(0u64);
            },
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "big" => Ok(vec![0x42; arg.parse().unwrap_or(1 << 20)]),
            "panic" => panic!("the guest panicked on purpose"),
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_millis(
                    arg.parse().unwrap_or(60_000),
                ));
                Ok(b"slept".to_vec())
            }
            // A key obtained, then a trap: the key must not outlive the call.
            "kms-decrypt-then-trap" => {
                let key = kms::decrypt(&unhex(arg)?, &[])?;
                panic!("trapped holding key handle {key}")
            }
            "config" => Ok(cloister_guest::config::get(arg)
                .unwrap_or_else(|| "(unset)".into())
                .into_bytes()),
            "fail" => Err(error("E-TEST-FAIL", arg)),
            _ => Err(error("E-TEST-UNKNOWN", format!("unknown command {cmd:?}"))),
        }
    }
}

cloister_guest::export_workload!(TestGuest);
