//! The broker's network service: framed requests over any Cloister transport,
//! bounded connections, idle timeouts, graceful shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use cloister_proto::frame::{self, FrameError};
use cloister_proto::{Listener, Stream};

use crate::aws;
use crate::error::{self, KmsError};
use crate::protocol::{MAX_MESSAGE, MAX_REQUEST, Response};
use crate::service::{Broker, Bucket, Prepared, now_ms};

#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Connections open at once. When all are taken, a newcomer takes the
    /// slot of the connection idle longest (it is closed); when none is idle,
    /// the newcomer is refused.
    pub max_connections: usize,
    /// Connections one peer may hold at once (the peer is the uid on a Unix
    /// socket, the CID on vsock, the IPv4 address or IPv6 /64 on TCP, with all
    /// of loopback one peer); past it, the peer's own longest-idle connection
    /// (or TLS handshake in progress) is closed, or the newcomer refused.
    pub max_connections_per_peer: usize,
    /// Requests from one peer that fail before their sender is authenticated
    /// (malformed, unknown principal, bad signature, expired, replayed), per
    /// second; past it (after a burst of twice as many), the peer's connection
    /// is closed after the answer, and its new connections are refused
    /// (LimitExceededException) until its allowance has refilled.
    pub unauthenticated_per_peer_per_sec: f64,
    /// How long a connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long a request may take to arrive once its first byte has, and
    /// how long a TLS handshake may take.
    pub frame_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 1024,
            max_connections_per_peer: 256,
            unauthenticated_per_peer_per_sec: 50.0,
            idle_timeout: Duration::from_secs(120),
            frame_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// The AWS KMS JSON API (SigV4) on a TCP listener: HTTPS, or plain HTTP on
/// a loopback address when asked.
pub struct AwsApi {
    pub listener: Listener,
    /// Plain HTTP instead of TLS (refused unless the listener is on loopback).
    pub plain_http: bool,
    /// The region SigV4 credential scopes must name.
    pub region: String,
}

/// What a listener speaks.
#[derive(Clone)]
enum Protocol {
    /// Cloister's framed, signed requests and responses.
    Cloister,
    /// The AWS KMS JSON API, answering for this region.
    Aws(Arc<str>),
}

/// Serves until `shutdown` resolves, then stops accepting, lets requests in
/// flight finish, and writes the audit log's shutdown checkpoint. TCP listeners
/// speak TLS (`tls` is required for them); Unix and vsock listeners do not.
/// The AWS API listeners speak TLS with the same certificate unless plain
/// HTTP was asked for on loopback.
pub async fn serve(
    broker: Arc<Broker>,
    listeners: Vec<Listener>,
    aws: Vec<AwsApi>,
    limits: ServerLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), KmsError> {
    if tls.is_none()
        && (listeners.iter().any(|l| matches!(l, Listener::Tcp(_)))
            || aws.iter().any(|a| !a.plain_http))
    {
        return Err(error::validation(
            "a TCP listener needs a TLS certificate and key",
        ));
    }
    for a in &aws {
        let Listener::Tcp(l) = &a.listener else {
            return Err(error::validation(
                "the AWS API listens on TCP (tcp:HOST:PORT)",
            ));
        };
        if a.plain_http && !l.local_addr().is_ok_and(|addr| addr.ip().is_loopback()) {
            return Err(error::validation(
                "plain HTTP for the AWS API is allowed on a loopback address only (127.0.0.1 or ::1); elsewhere it is HTTPS",
            ));
        }
    }
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let (stop_tx, stop_rx) = watch::channel(false);
    let drain_timeout = limits.drain_timeout;
    let slots = Arc::new(Slots {
        table: Default::default(),
        limits,
    });
    let mut tasks = JoinSet::new();
    for listener in listeners {
        tasks.spawn(accept_loop(
            broker.clone(),
            listener,
            Protocol::Cloister,
            slots.clone(),
            tls.clone(),
            stop_rx.clone(),
        ));
    }
    for a in aws {
        tasks.spawn(accept_loop(
            broker.clone(),
            a.listener,
            Protocol::Aws(a.region.into()),
            slots.clone(),
            if a.plain_http { None } else { tls.clone() },
            stop_rx.clone(),
        ));
    }
    tasks.spawn(purge_loop(broker.clone(), stop_rx.clone()));
    shutdown.await;
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    let b = broker.clone();
    tokio::task::spawn_blocking(move || {
        b.record_uncounted()?;
        b.audit().shutdown()
    })
    .await
    .map_err(|e| error::internal(e.to_string()))??;
    Ok(())
}

/// The upkeep every minute, and a shared store's heartbeat every second.
async fn purge_loop(broker: Arc<Broker>, mut stop: watch::Receiver<bool>) {
    let upkeep_every = (60 / crate::service::HEARTBEAT.as_secs().max(1)).max(1);
    let mut tick = 0u64;
    loop {
        let b = broker.clone();
        let upkeep = tick.is_multiple_of(upkeep_every);
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = b.heartbeat(now_ms()) {
                eprintln!("cloister kms: heartbeat: {e}");
            }
            if upkeep && let Err(e) = b.upkeep(now_ms()) {
                eprintln!("cloister kms: upkeep: {e}");
            }
        })
        .await;
        tick += 1;
        tokio::select! {
            _ = tokio::time::sleep(crate::service::HEARTBEAT) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The connections open, by peer, and the idle ones that a newcomer may
/// displace (see [`ServerLimits::max_connections`]).
struct Slots {
    table: std::sync::Mutex<SlotTable>,
    limits: ServerLimits,
}

#[derive(Default)]
struct SlotTable {
    next_id: u64,
    open: HashMap<u64, Slot>,
    per_peer: HashMap<String, Peer>,
}

struct Slot {
    peer: String,
    idle_since: Option<Instant>,
    close: Arc<Notify>,
}

/// What the server knows of a peer while it has connections (or owes
/// failures): how many are open, and its allowance of unauthenticated failures.
struct Peer {
    connections: usize,
    /// Refills at `unauthenticated_per_peer_per_sec`, up to twice that.
    allowance: Bucket,
}

/// A connection's slot; dropping it frees the slot.
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
    peer: String,
    close: Arc<Notify>,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection from `peer`, displacing the longest-idle
    /// connection (the peer's own when it is at its limit) if need be.
    fn acquire(self: &Arc<Self>, peer: String) -> Result<SlotGuard, &'static str> {
        let mut t = self.lock();
        let now = now_ms();
        let limits = &self.limits;
        let rate = limits.unauthenticated_per_peer_per_sec;
        if t.per_peer.len() > 4 * limits.max_connections {
            // Forget peers that have gone and are owed nothing.
            t.per_peer
                .retain(|_, p| p.connections > 0 || !p.allowance_full(now, rate));
        }
        let p = t.per_peer.entry(peer.clone()).or_insert(Peer {
            connections: 0,
            allowance: Bucket::full(2.0 * rate, now),
        });
        if p.allowance.refill(now, rate, 2.0 * rate) < 1.0 {
            return Err("too many unauthenticated requests from this peer; retry later");
        }
        let connections = p.connections;
        let displaced = if connections >= limits.max_connections_per_peer {
            Some(t.longest_idle(Some(&peer)).ok_or(
                "this peer has as many connections open as the broker allows one peer, none idle",
            )?)
        } else if t.open.len() >= limits.max_connections {
            Some(
                t.longest_idle(None)
                    .ok_or("the broker is at its connection limit and none is idle; retry later")?,
            )
        } else {
            None
        };
        if let Some(id) = displaced {
            t.remove(id, limits.unauthenticated_per_peer_per_sec);
        }
        let id = t.next_id;
        t.next_id += 1;
        let close = Arc::new(Notify::new());
        t.open.insert(
            id,
            Slot {
                peer: peer.clone(),
                idle_since: None,
                close: close.clone(),
            },
        );
        if let Some(p) = t.per_peer.get_mut(&peer) {
            p.connections += 1;
        }
        Ok(SlotGuard {
            slots: self.clone(),
            id,
            peer,
            close,
        })
    }
}

impl Peer {
    fn allowance_full(&mut self, now: u64, rate: f64) -> bool {
        self.allowance.refill(now, rate, 2.0 * rate) >= 2.0 * rate
    }
}

impl SlotTable {
    fn longest_idle(&self, peer: Option<&str>) -> Option<u64> {
        self.open
            .iter()
            .filter(|(_, s)| peer.is_none_or(|p| s.peer == p))
            .filter_map(|(id, s)| Some((s.idle_since?, *id)))
            .min()
            .map(|(_, id)| id)
    }

    /// Frees a slot (closing its connection, if it still runs). A peer is
    /// forgotten once it has no connection and its allowance is full again
    /// (so reconnecting does not refill it).
    fn remove(&mut self, id: u64, rate: f64) {
        if let Some(slot) = self.open.remove(&id) {
            slot.close.notify_one();
            if let Some(p) = self.per_peer.get_mut(&slot.peer) {
                p.connections -= 1;
                if p.connections == 0 && p.allowance_full(now_ms(), rate) {
                    self.per_peer.remove(&slot.peer);
                }
            }
        }
    }
}

impl SlotGuard {
    fn set_idle(&self, idle: bool) {
        if let Some(slot) = self.slots.lock().open.get_mut(&self.id) {
            slot.idle_since = idle.then(Instant::now);
        }
    }

    /// Counts an unauthenticated failure; false once the peer has used up
    /// its allowance (its connection is then closed).
    fn failed_unauthenticated(&self) -> bool {
        let rate = self.slots.limits.unauthenticated_per_peer_per_sec;
        let mut t = self.slots.lock();
        let Some(p) = t.per_peer.get_mut(&self.peer) else {
            return false;
        };
        let now = now_ms();
        p.allowance.take(now, rate, 2.0 * rate) && p.allowance.refill(now, rate, 2.0 * rate) >= 1.0
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let rate = self.slots.limits.unauthenticated_per_peer_per_sec;
        self.slots.lock().remove(self.id, rate);
    }
}

async fn accept_loop(
    broker: Arc<Broker>,
    listener: Listener,
    protocol: Protocol,
    slots: Arc<Slots>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut refusals = HashMap::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        let Ok((mut stream, _)) = accepted else {
            // Transient accept errors (EMFILE, aborted handshakes): back off briefly.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let slot = match slots.acquire(stream.peer_identity()) {
            Ok(slot) => slot,
            // An HTTP client is refused by closing: nothing else is said
            // before a TLS handshake.
            Err(_) if matches!(protocol, Protocol::Aws(_)) => continue,
            Err(why) => {
                // A refusal names no request, so each reason is signed once:
                // refusing a flood of connections costs no signatures.
                let refusal = refusals
                    .entry(why)
                    .or_insert_with(|| {
                        broker.sign(&Response {
                            request_id: String::new(),
                            request_digest: Vec::new(),
                            result: Err(error::limit_exceeded(why)),
                        })
                    })
                    .clone();
                let timeout = slots.limits.frame_timeout;
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        timeout,
                        frame::send(&mut stream, &refusal, MAX_MESSAGE),
                    )
                    .await;
                });
                continue;
            }
        };
        let broker = broker.clone();
        let limits = slots.limits.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        let protocol = protocol.clone();
        connections.spawn(async move {
            match (stream, tls) {
                (Stream::Tcp(tcp), Some(acceptor)) => {
                    // A handshake in progress may be displaced (as an idle
                    // connection), and one that fails or stalls counts against
                    // the peer's allowance: slots cannot be held by silence.
                    slot.set_idle(true);
                    let handshake = tokio::select! {
                        h = tokio::time::timeout(limits.frame_timeout, acceptor.accept(tcp)) => h,
                        _ = slot.close.notified() => return,
                    };
                    match handshake {
                        Ok(Ok(tls_stream)) => {
                            speak(protocol, broker, tls_stream, slot, limits, stop).await;
                        }
                        _ => {
                            let _ = slot.failed_unauthenticated();
                        }
                    }
                }
                (stream, _) => speak(protocol, broker, stream, slot, limits, stop).await,
            }
        });
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

async fn speak<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    protocol: Protocol,
    broker: Arc<Broker>,
    stream: S,
    slot: SlotGuard,
    limits: ServerLimits,
    stop: watch::Receiver<bool>,
) {
    match protocol {
        Protocol::Cloister => connection(broker, stream, slot, limits, stop).await,
        Protocol::Aws(region) => aws_connection(broker, stream, slot, limits, region, stop).await,
    }
}

/// An HTTP/1.1 connection of the AWS API. The slot is idle (displaceable)
/// between requests; the connection closes when idle too long, when its
/// slot is taken, or (after the request in flight) at shutdown.
async fn aws_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    broker: Arc<Broker>,
    stream: S,
    slot: SlotGuard,
    limits: ServerLimits,
    region: Arc<str>,
    mut stop: watch::Receiver<bool>,
) {
    let slot = Arc::new(slot);
    slot.set_idle(true);
    let service = {
        let slot = slot.clone();
        let limits = limits.clone();
        hyper::service::service_fn(move |req| {
            let (broker, slot, limits, region) =
                (broker.clone(), slot.clone(), limits.clone(), region.clone());
            async move {
                let response = aws_request(&broker, &slot, &limits, &region, req).await;
                slot.set_idle(true);
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    // hyper's header timeout runs from when it waits for a request's head:
    // a keep-alive connection idle for `frame_timeout` closes too.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.frame_timeout)
        .max_buf_size(AWS_READ_BUFFER)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = slot.close.notified() => return,
        _ = stop.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.drain_timeout, conn).await;
}

/// The read buffer of an AWS API connection: a request head and some of its
/// body (hyper's default is ~400 KB per connection).
const AWS_READ_BUFFER: usize = 64 * 1024;

/// One request of the AWS API: read (bounded in size and time; the slot stays
/// idle, so displaceable, until the body has arrived), handled as
/// [`Broker::prepare_aws`] says and audited on the blocking pool (so a client
/// that leaves mid-request cannot cancel its record), answered.
async fn aws_request(
    broker: &Arc<Broker>,
    slot: &SlotGuard,
    limits: &ServerLimits,
    region: &Arc<str>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt;
    // Displaceable until the body is in, as the youngest idle slot.
    slot.set_idle(true);
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_REQUEST as usize);
    let read = tokio::time::timeout(limits.frame_timeout, limited.collect()).await;
    let body = match read {
        Ok(Ok(collected)) => collected.to_bytes().to_vec(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return aws_refusal(
                broker,
                slot,
                error::validation(format!(
                    "the request body is larger than {MAX_REQUEST} bytes"
                )),
            )
            .await;
        }
        Ok(Err(e)) => {
            let e = error::serialization(format!("the request body could not be read: {e}"));
            return aws_refusal(broker, slot, e).await;
        }
        Err(_) => {
            let e = error::serialization("the request body did not arrive in time");
            return aws_refusal(broker, slot, e).await;
        }
    };
    slot.set_idle(false);
    let request = aws::HttpRequest {
        method: parts.method.as_str().to_owned(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned()),
        headers: parts
            .headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        body,
    };
    let b = broker.clone();
    let region = region.clone();
    let handled = tokio::task::spawn_blocking(move || {
        let call = b.prepare_aws(&request, &region);
        let charged = call.prepared.charges_peer();
        let response = match call.prepared {
            Prepared::Done { response, .. } => response,
            Prepared::Audit { record, response } => {
                Prepared::finish(b.audit().record(record), response)
            }
        };
        (aws::respond(&request.body, response), charged)
    })
    .await;
    let Ok((response, charged)) = handled else {
        let e = error::internal("the broker is shutting down; retry");
        return http_response(aws::error_response(String::new(), &e), true);
    };
    // A peer that keeps sending what no access key signed is cut off.
    let close = charged && !slot.failed_unauthenticated();
    http_response(response, close)
}

/// Answers (and audits, within the unauthenticated-failure rate) a request
/// that could not be read; its connection closes.
async fn aws_refusal(
    broker: &Arc<Broker>,
    slot: &SlotGuard,
    e: KmsError,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let _ = slot.failed_unauthenticated();
    let b = broker.clone();
    let response = tokio::task::spawn_blocking(move || b.refuse_aws(e))
        .await
        .unwrap_or_else(|_| {
            aws::error_response(
                String::new(),
                &error::internal("the broker is shutting down; retry"),
            )
        });
    http_response(response, true)
}

fn http_response(
    r: aws::HttpResponse,
    close: bool,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let mut builder = hyper::Response::builder()
        .status(r.status)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-requestid", r.request_id);
    if let Some(code) = r.error_code {
        builder = builder.header("x-cloister-error-code", code);
    }
    if close {
        builder = builder.header("connection", "close");
    }
    builder
        .body(http_body_util::Full::new(bytes::Bytes::from(r.body)))
        .unwrap_or_default()
}

/// Why a connection stopped reading requests.
enum ReadEnd {
    /// Closed by the peer between requests, or idle too long.
    Quiet,
    /// A request began but did not arrive in time.
    Slow,
    Frame(FrameError),
}

/// Reads one request: waits up to `idle_timeout` for it to begin, then up to
/// `frame_timeout` for the rest. The slot stays idle (displaceable) until the
/// whole request has arrived: a peer cannot hold slots by trickling requests.
async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    slot: &SlotGuard,
    limits: &ServerLimits,
) -> Result<Vec<u8>, ReadEnd> {
    let mut header = [0u8; frame::HEADER_LEN];
    slot.set_idle(true);
    match tokio::time::timeout(limits.idle_timeout, stream.read(&mut header[..1])).await {
        Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadEnd::Quiet),
        // Still displaceable, but as the youngest idle slot: a request under
        // way goes after connections that have been quiet.
        Ok(Ok(_)) => slot.set_idle(true),
    }
    let rest = async {
        stream.read_exact(&mut header[1..]).await?;
        let len = frame::check_header(&header, MAX_REQUEST)?;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await?;
        Ok::<_, FrameError>(payload)
    };
    match tokio::time::timeout(limits.frame_timeout, rest).await {
        Err(_) => Err(ReadEnd::Slow),
        Ok(Ok(payload)) => {
            slot.set_idle(false);
            Ok(payload)
        }
        Ok(Err(FrameError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(ReadEnd::Frame(FrameError::Truncated {
                got: 0,
                expected: frame::HEADER_LEN,
            }))
        }
        Ok(Err(e)) => Err(ReadEnd::Frame(e)),
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    broker: Arc<Broker>,
    mut stream: S,
    slot: SlotGuard,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let read = tokio::select! {
            r = read_request(&mut stream, &slot, &limits) => r,
            _ = slot.close.notified() => return,
            _ = stop.changed() => return,
        };
        let request = match read {
            Ok(bytes) => bytes,
            Err(ReadEnd::Quiet) => return,
            Err(ReadEnd::Slow) => {
                let _ = slot.failed_unauthenticated();
                return;
            }
            Err(ReadEnd::Frame(e)) => {
                // The stream is no longer in step with frames: answer and close.
                let _ = slot.failed_unauthenticated();
                let reply = broker.sign(&Response {
                    request_id: String::new(),
                    request_digest: Vec::new(),
                    result: Err(frame_error(&e)),
                });
                let _ = tokio::time::timeout(
                    limits.frame_timeout,
                    frame::send(&mut stream, &reply, MAX_MESSAGE),
                )
                .await;
                return;
            }
        };
        // Operations that change nothing stored run on this task (no thread
        // hand-off) and await their audit record; the rest, whose keystore
        // transactions block on the audit writer, run where blocking is allowed.
        let (response, charged) = match broker.prepare(&request, true) {
            Some(prepared) => {
                let charged = prepared.charges_peer();
                let response = match prepared {
                    Prepared::Done { response, .. } => response,
                    Prepared::Audit { record, response } => {
                        Prepared::finish(broker.audit().record_async(record).await, response)
                    }
                };
                (broker.sign(&response), charged)
            }
            None => {
                let b = broker.clone();
                match tokio::task::spawn_blocking(move || {
                    let (response, charged) = b.handle(&request);
                    (b.sign(&response), charged)
                })
                .await
                {
                    Ok(r) => r,
                    // Cancelled at shutdown (a panic is caught in `handle`).
                    Err(_) => (
                        broker.sign(&Response {
                            request_id: String::new(),
                            request_digest: Vec::new(),
                            result: Err(error::internal("the broker is shutting down; retry")),
                        }),
                        false,
                    ),
                }
            }
        };
        let sent = tokio::time::timeout(
            limits.frame_timeout,
            frame::send(&mut stream, &response, MAX_MESSAGE),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        // A connection that sent a request no principal signed (or a replay)
        // ends when its peer's allowance of such failures is used up.
        if charged && !slot.failed_unauthenticated() {
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

/// Liveness and readiness for a load balancer or Kubernetes, over plain
/// HTTP (they carry no secret): `GET /healthz` answers 200 while the process
/// serves; `GET /readyz` answers 200 once the keystore's store answers within
/// [`READY_TIMEOUT`] and the copy in memory is current, 503 with the reason
/// otherwise (a replica whose database is unreachable leaves the rotation).
pub async fn serve_health(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
) -> Result<(), KmsError> {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, say: not a reason to spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let broker = broker.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let broker = broker.clone();
                async move {
                    let (status, body) = match (req.method(), req.uri().path()) {
                        (&hyper::Method::GET, "/healthz") => (200, "ok\n".to_owned()),
                        (&hyper::Method::GET, "/readyz") => readiness(broker).await,
                        _ => (404, "GET /healthz or /readyz\n".to_owned()),
                    };
                    hyper::Response::builder()
                        .status(status)
                        .header("content-type", "text/plain; charset=utf-8")
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        .map_err(|e| e.to_string())
                }
            });
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            )
            .await;
        });
    }
}

/// How long the store may take to answer a readiness probe.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

async fn readiness(broker: Arc<Broker>) -> (u16, String) {
    let check = tokio::task::spawn_blocking(move || {
        broker.keystore().store().ping()?;
        broker.keystore().refresh()
    });
    match tokio::time::timeout(READY_TIMEOUT, check).await {
        Ok(Ok(Ok(()))) => (200, "ready\n".into()),
        Ok(Ok(Err(e))) => (503, format!("not ready: {e}\n")),
        Ok(Err(e)) => (503, format!("not ready: {e}\n")),
        Err(_) => (
            503,
            format!(
                "not ready: the store did not answer within {} s\n",
                READY_TIMEOUT.as_secs()
            ),
        ),
    }
}
