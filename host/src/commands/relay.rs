//! `cloister relay`: the attested channel's HTTP face on the parent, so that
//! standard Oblivious HTTP clients (and any HTTP client that follows
//! docs/attested-channel.md) reach an enclave.
//!
//! It is an Oblivious Relay in RFC 9458's sense: it forwards encapsulated
//! requests to the enclave (through the supervisor, as `cloister call` does)
//! and encapsulated responses back, and can read neither. It runs as the parent
//! and is trusted with nothing.
//!
//! - `GET /.well-known/ohttp-gateway`: the key configuration
//!   (`application/ohttp-keys`, RFC 9540).
//! - `GET /.well-known/cloister-attestation?nonce=HEX`: a fresh attestation
//!   document binding that key (`application/cose`).
//! - `POST /.well-known/ohttp-gateway` (or `POST /`) with a
//!   `message/ohttp-req` body: the `message/ohttp-res` answer.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use cloister_proto::call::{CallKind, MAX_NONCE, MAX_REQUEST, MIN_NONCE};
use cloister_proto::{Address, ErrorCode};
use cloister_supervisor::protocol::{self as control, Which as Target};

use crate::errors::UsageError;

/// How long a client has to send a request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole exchange (body, enclave, answer) may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 512;

pub const KEYS_PATH: &str = "/.well-known/ohttp-gateway";
pub const ATTESTATION_PATH: &str = "/.well-known/cloister-attestation";

#[derive(Args)]
pub struct RelayArgs {
    #[command(flatten)]
    which: super::enclave::Which,
    /// Where to serve HTTP: tcp:HOST:PORT (port 0 = any free port) or unix:PATH.
    /// The content is end-to-end encrypted; the relay (the parent) sees
    /// ciphertext, sizes and timing.
    #[arg(long)]
    listen: String,
}

struct Relay {
    supervisor: Address,
    which: Target,
}

fn text(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{code}: {message}\n"))));
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert(
        "content-type",
        "text/plain; charset=utf-8".parse().expect("static"),
    );
    if let Ok(v) = code.parse() {
        headers.insert("cloister-error", v);
    }
    r
}

fn bytes(content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert("content-type", content_type.parse().expect("static"));
    r.headers_mut()
        .insert("cache-control", "no-store".parse().expect("static"));
    r
}

/// The HTTP status for a refusal the enclave (or the supervisor) made in the clear.
fn status_of(code: &str) -> StatusCode {
    match code {
        "E-CHANNEL-MALFORMED" | "E-CHANNEL-DECRYPT" => StatusCode::BAD_REQUEST,
        "E-CHANNEL-REPLAYED" => StatusCode::CONFLICT,
        "E-CHANNEL-KEY-UNKNOWN" => StatusCode::UNPROCESSABLE_ENTITY,
        "E-ENCLAVE-REQUEST-TOO-LARGE" => StatusCode::PAYLOAD_TOO_LARGE,
        "E-ENCLAVE-BUSY" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

impl Relay {
    async fn forward(
        &self,
        kind: CallKind,
        request: &[u8],
    ) -> Result<Vec<u8>, Response<Full<Bytes>>> {
        control::call_enclave(&self.supervisor, self.which.clone(), &kind, request)
            .await
            .map_err(|e| text(status_of(e.code()), e.code(), &e.to_string()))
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        let answer = match (req.method(), path.as_str()) {
            (&Method::GET, KEYS_PATH) => self
                .forward(CallKind::ChannelKeys, &[])
                .await
                .map(|keys| bytes("application/ohttp-keys", keys)),
            (&Method::GET, ATTESTATION_PATH) => match nonce_of(&query) {
                Ok(nonce) => self
                    .forward(
                        CallKind::ChannelAttestation {
                            nonce: Some(serde_bytes::ByteBuf::from(nonce)),
                        },
                        &[],
                    )
                    .await
                    .map(|doc| bytes("application/cose; cose-type=\"cose-sign1\"", doc)),
                Err(message) => Err(text(StatusCode::BAD_REQUEST, "E-CLI-USAGE", &message)),
            },
            (&Method::POST, KEYS_PATH | "/") => self.encapsulated(req).await,
            (_, KEYS_PATH | ATTESTATION_PATH | "/") => Err(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "E-CLI-USAGE",
                "GET the key configuration or the attestation document; POST message/ohttp-req",
            )),
            _ => Err(text(
                StatusCode::NOT_FOUND,
                "E-CLI-USAGE",
                &format!("no such resource {path} (see docs/attested-channel.md)"),
            )),
        };
        answer.unwrap_or_else(|refusal| refusal)
    }

    async fn encapsulated(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Response<Full<Bytes>>> {
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !content_type.eq_ignore_ascii_case("message/ohttp-req") {
            return Err(text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "E-CHANNEL-MALFORMED",
                "POST a message/ohttp-req body (RFC 9458)",
            ));
        }
        let body = Limited::new(req.into_body(), MAX_REQUEST)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "E-ENCLAVE-REQUEST-TOO-LARGE",
                        &format!("the request body is over {MAX_REQUEST} bytes"),
                    )
                } else {
                    text(
                        StatusCode::BAD_REQUEST,
                        "E-PROTO-IO",
                        &format!("the request body could not be read: {e}"),
                    )
                }
            })?
            .to_bytes();
        let answer = self.forward(CallKind::Channel, &body).await?;
        Ok(bytes("message/ohttp-res", answer))
    }
}

/// `nonce=HEX` from a query string ([`MIN_NONCE`] to [`MAX_NONCE`] bytes).
fn nonce_of(query: &str) -> Result<Vec<u8>, String> {
    let value = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("nonce="))
        .ok_or("the query has no nonce=HEX: a document answers a client's challenge")?;
    let nonce = hex::decode(value).map_err(|_| format!("nonce {value:?} is not hex"))?;
    if !(MIN_NONCE..=MAX_NONCE).contains(&nonce.len()) {
        return Err(format!(
            "the nonce is {} bytes, expected {MIN_NONCE} to {MAX_NONCE}",
            nonce.len()
        ));
    }
    Ok(nonce)
}

pub fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let listen: Address = args.listen.parse()?;
    if matches!(listen, Address::Vsock { .. }) {
        bail!(UsageError("--listen: tcp:HOST:PORT or unix:PATH".into()));
    }
    let which = args.which.to_control();
    let relay = Arc::new(Relay {
        supervisor: control::default_address().parse()?,
        which,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = cloister_proto::listen(&listen).await?;
        super::print_json(&json!({
            "Listening": listener.local_address()?.to_string(),
            "Enclave": relay.which.describe(),
            "KeyConfiguration": KEYS_PATH,
            "Attestation": ATTESTATION_PATH,
        }))?;
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p?,
                _ = term.recv() => return Ok::<(), anyhow::Error>(()),
            };
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
                _ = term.recv() => return Ok(()),
            };
            let relay = relay.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let relay = relay.clone();
                    async move {
                        let answer = tokio::time::timeout(EXCHANGE_TIMEOUT, relay.handle(req))
                            .await
                            .unwrap_or_else(|_| {
                                text(
                                    StatusCode::GATEWAY_TIMEOUT,
                                    "E-ENCLAVE-DEADLINE",
                                    "the exchange took too long",
                                )
                            });
                        Ok::<_, Infallible>(answer)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
