//! The broker's network service: framed requests over any Cloister transport,
//! bounded connections, idle timeouts, graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use tokio::io::{AsyncRead, AsyncWrite};

use cloister_proto::frame::{self, FrameError};
use cloister_proto::{Listener, Stream};

use crate::error::{self, KmsError};
use crate::protocol::{MAX_MESSAGE, Response};
use crate::service::{Broker, Prepared, now_ms};

#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 512,
            idle_timeout: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves until `shutdown` resolves, then stops accepting, lets requests in
/// flight finish, and writes the audit log's shutdown checkpoint. TCP listeners
/// speak TLS (`tls` is required for them); Unix and vsock listeners do not.
pub async fn serve(
    broker: Arc<Broker>,
    listeners: Vec<Listener>,
    limits: ServerLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), KmsError> {
    if tls.is_none() && listeners.iter().any(|l| matches!(l, Listener::Tcp(_))) {
        return Err(error::validation(
            "a TCP listener needs a TLS certificate and key",
        ));
    }
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut tasks = JoinSet::new();
    for listener in listeners {
        tasks.spawn(accept_loop(
            broker.clone(),
            listener,
            permits.clone(),
            limits.clone(),
            tls.clone(),
            stop_rx.clone(),
        ));
    }
    tasks.spawn(purge_loop(broker.clone(), stop_rx.clone()));
    shutdown.await;
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    let audit = broker.audit().clone();
    tokio::task::spawn_blocking(move || audit.shutdown())
        .await
        .map_err(|e| error::internal(e.to_string()))??;
    Ok(())
}

async fn purge_loop(broker: Arc<Broker>, mut stop: watch::Receiver<bool>) {
    loop {
        let b = broker.clone();
        let _ = tokio::task::spawn_blocking(move || b.purge_due_keys(now_ms())).await;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn accept_loop(
    broker: Arc<Broker>,
    listener: Listener,
    permits: Arc<Semaphore>,
    limits: ServerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        let Ok((mut stream, _peer)) = accepted else {
            // Transient accept errors (EMFILE, aborted handshakes): back off briefly.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let refusal = broker.sign(&Response {
                request_id: String::new(),
                request_digest: Vec::new(),
                result: Err(error::limit_exceeded(
                    "the broker is at its connection limit; retry later",
                )),
            });
            tokio::spawn(async move {
                let _ = frame::send(&mut stream, &refusal, MAX_MESSAGE).await;
            });
            continue;
        };
        let broker = broker.clone();
        let limits = limits.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            match (stream, tls) {
                (Stream::Tcp(tcp), Some(acceptor)) => {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                    if let Ok(Ok(tls_stream)) = handshake {
                        connection(broker, tls_stream, limits, stop).await;
                    }
                }
                (stream, _) => connection(broker, stream, limits, stop).await,
            }
            drop(permit);
        });
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    broker: Arc<Broker>,
    mut stream: S,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout(limits.idle_timeout, frame::read_frame(&mut stream, MAX_MESSAGE)) => r,
            _ = stop.changed() => return,
        };
        let request = match read {
            Err(_) | Ok(Ok(None)) => return, // idle or closed
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Err(e)) => {
                // The stream is no longer in step with frames: answer and close.
                let reply = broker.sign(&Response {
                    request_id: String::new(),
                    request_digest: Vec::new(),
                    result: Err(frame_error(&e)),
                });
                let _ = frame::send(&mut stream, &reply, MAX_MESSAGE).await;
                return;
            }
        };
        // Operations that change nothing stored run on this task (no thread
        // hand-off) and await their audit record; the rest, whose keystore
        // transactions block on the audit writer, run where blocking is allowed.
        let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            broker.prepare(&request, true)
        }))
        .unwrap_or_else(|_| {
            Some(Prepared::Done(Response {
                request_id: String::new(),
                request_digest: Vec::new(),
                result: Err(error::internal("request handler failed")),
            }))
        });
        let response = match prepared {
            Some(Prepared::Done(response)) => broker.sign(&response),
            Some(Prepared::Audit { record, response }) => {
                let audited = broker.audit().record_async(record).await;
                broker.sign(&Prepared::finish(audited, response))
            }
            None => {
                let b = broker.clone();
                match tokio::task::spawn_blocking(move || {
                    let response = b.handle(&request);
                    b.sign(&response)
                })
                .await
                {
                    Ok(r) => r,
                    Err(e) => broker.sign(&Response {
                        request_id: String::new(),
                        request_digest: Vec::new(),
                        result: Err(error::internal(format!("request handler failed: {e}"))),
                    }),
                }
            }
        };
        if frame::send(&mut stream, &response, MAX_MESSAGE)
            .await
            .is_err()
        {
            return;
        }
    }
}

fn frame_error(e: &FrameError) -> KmsError {
    match e {
        FrameError::TooLarge { .. } => error::validation(format!("request refused: {e}")),
        _ => error::validation(format!("malformed request frame: {e}")),
    }
}
