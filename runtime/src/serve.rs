//! The runtime process's life: boot from the supervisor's channel, harden
//! (network namespace, uid, process flags), start the enclave, serve calls on
//! its socket until SIGTERM (or until the supervisor dies: the runtime asked the
//! kernel to kill it then).

use std::sync::Arc;

use anyhow::Context;
use ed25519_dalek::SigningKey;

use cloister_image::Image;
use cloister_proto::call::{self, CallKind, CallStatus, MAX_REQUEST};
use cloister_proto::{Address, ErrorCode, frame};

use crate::channel::{Boot, FromRuntime, RuntimeEnd, Start};
use crate::engine::{Enclave, EnclaveConfig, KmsAccess};
use crate::hardening;

/// The `cloister-runtime` binary's main.
pub fn main() -> anyhow::Result<()> {
    let channel = Arc::new(RuntimeEnd::new());
    let mut report = hardening::Report::default();
    // The supervisor may start this process ahead of the launch it will serve:
    // everything before the start message is the same for every enclave.
    hardening::own_network_namespace(&mut report);
    let start = channel.start().context(
        "no boot message from the supervisor (this binary is started by `cloister supervisor`)",
    )?;
    let result = match start {
        Start::Boot(boot) => hardening::before_threads(&mut report, boot.uid)
            .map_err(anyhow::Error::msg)
            .and_then(|()| run(channel.clone(), *boot, report)),
        Start::Compile { uid, component } => hardening::before_threads(&mut report, uid)
            .map_err(anyhow::Error::msg)
            .and_then(|()| {
                // Untrusted input to Cranelift: under the same confinement as a guest.
                hardening::after_start(&mut report);
                let code = crate::engine::compile(&component)?;
                Ok(channel.send_compiled(code)?)
            }),
    };
    if let Err(e) = &result {
        let _ = channel.send(&FromRuntime::Failed {
            message: format!("{e:#}"),
        });
    }
    result
}

fn kms_access(boot: &mut Boot) -> anyhow::Result<Option<KmsAccess>> {
    let Some(route) = boot.kms.take() else {
        return Ok(None);
    };
    let key: [u8; 32] = route
        .principal_key
        .as_bytes()
        .try_into()
        .context("the principal key is not 32 bytes")?;
    Ok(Some(KmsAccess {
        proxy: route.proxy.parse()?,
        principal: route.principal,
        key: SigningKey::from_bytes(&key),
    }))
}

fn run(
    channel: Arc<RuntimeEnd>,
    mut boot: Boot,
    mut report: hardening::Report,
) -> anyhow::Result<()> {
    let image = Image::parse(&boot.image)?;
    let console = match (&boot.console, boot.debug) {
        (Some(path), true) => Some(
            std::fs::File::create(path).with_context(|| format!("console {}", path.display()))?,
        ),
        _ => None,
    };
    let kms = kms_access(&mut boot)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let enclave = Arc::new(Enclave::start(EnclaveConfig {
            image,
            code: boot.code.into_vec(),
            debug: boot.debug,
            memory_mib: boot.memory_mib,
            nsm: channel.clone(),
            kms,
            console,
        })?);
        let listener = cloister_proto::listen(&Address::Unix(boot.socket.clone())).await?;
        // vsock only where the kernel has loopback; never probed otherwise.
        let vsock = match (boot.vsock_port, cloister_proto::vsock_loopback_available()) {
            (Some(port), Ok(())) => {
                // Any local uid can reach a vsock port: unlike the Unix socket,
                // which only the supervisor can enter, this one is not guarded.
                match cloister_proto::listen(&Address::Vsock {
                    cid: u32::MAX,
                    port,
                })
                .await
                {
                    Ok(l) => Some((l, format!("vsock:1:{port}"))),
                    Err(e) => {
                        eprintln!("cloister-runtime: not listening on vsock: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        hardening::after_start(&mut report);
        channel.send(&FromRuntime::Ready {
            hardening: report,
            vsock: vsock.as_ref().map(|(_, a)| a.clone()),
        })?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        if let Some((v, _)) = vsock {
            let enclave = enclave.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = v.accept().await {
                    tokio::spawn(serve_call(enclave.clone(), stream));
                }
            });
        }
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    tokio::spawn(serve_call(enclave.clone(), stream));
                }
                _ = term.recv() => break,
            }
        }
        Ok::<(), anyhow::Error>(())
    })
}

async fn serve_call(enclave: Arc<Enclave>, mut stream: cloister_proto::Stream) {
    let status = |code: &str, message: String| CallStatus::Err {
        code: code.to_owned(),
        message,
    };
    let read = async {
        let Some(kind) = frame::recv::<_, CallKind>(&mut stream, call::CHUNK as u32).await? else {
            return Ok(None);
        };
        let request = call::read_chunks(&mut stream, MAX_REQUEST).await?;
        Ok::<_, call::CallError>(Some((kind, request)))
    };
    let (kind, request) = match read.await {
        Ok(Some(read)) => read,
        Ok(None) => return,
        Err(e) => {
            let _ = frame::send(
                &mut stream,
                &status(e.code(), e.to_string()),
                call::CHUNK as u32,
            )
            .await;
            return;
        }
    };
    // The call runs on a thread of its own (a busy guest must not hold up the
    // I/O threads, an NSM request blocks); its imports' I/O and its deadline
    // use this runtime's timers.
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::spawn_blocking(move || {
        let coded = |e: &dyn ErrorCode, text: String| (e.code(), text);
        match kind {
            CallKind::Workload => handle
                .block_on(enclave.call(request))
                .map_err(|e| coded(&e, e.to_string())),
            CallKind::Channel => handle
                .block_on(enclave.channel_call(&request))
                .map_err(|e| coded(&e, e.to_string())),
            CallKind::ChannelKeys => enclave.channel_keys().map_err(|e| coded(&e, e.to_string())),
            CallKind::ChannelAttestation { nonce } => match nonce {
                Some(n) if (call::MIN_NONCE..=call::MAX_NONCE).contains(&n.len()) => enclave
                    .channel_document(Some(n.into_vec()))
                    .map_err(|e| coded(&e, e.to_string())),
                other => Err((
                    "E-CHANNEL-ATTESTATION",
                    format!(
                        "the nonce is {} bytes: a channel document answers a client's challenge of {} to {} bytes",
                        other.map_or(0, |n| n.len()),
                        call::MIN_NONCE,
                        call::MAX_NONCE
                    ),
                )),
            },
        }
    })
    .await;
    let answer = match &result {
        Ok(Ok(_)) => CallStatus::Ok,
        Ok(Err((code, message))) => status(code, message.clone()),
        Err(e) => status("E-ENCLAVE-TRAP", format!("the call's thread failed: {e}")),
    };
    if frame::send(&mut stream, &answer, call::CHUNK as u32)
        .await
        .is_err()
    {
        return;
    }
    if let Ok(Ok(response)) = result {
        let _ = call::write_chunks(&mut stream, &response).await;
    }
}
