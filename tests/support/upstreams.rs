//! Upstream servers for the proxy to talk to, each on `127.0.0.1:0` and each recording what
//! it saw so tests can assert on it:
//! - [`spawn_ws_upstream`]: a tokio-tungstenite echo server (records request heads, picks
//!   a subprotocol, records the close frames it receives, closes on command);
//! - [`spawn_raw_upstream`]: reads one request head and writes a canned answer (a 101 with
//!   extensions, a 101 with a wrong accept key, a 401 with a body, ...);
//! - [`spawn_silent_upstream`]: accepts TCP and never answers;
//! - [`spawn_http_upstream`]: a hyper HTTP/1.1 server that tags answers with `x-server`
//!   and echoes request bodies as they stream in;
//! - [`closed_port`]: an address nothing listens on.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha1::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedSender;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::clients::{parse_head, read_head, RawHead};
use super::{recorder, AbortOnDrop, Recorder};

/// A request head as an upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

impl Seen {
    /// The header's only value as text; panics if it is repeated (tests want to know).
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        assert!(
            values.next().is_none(),
            "header {name} was sent more than once: {:?}",
            self.headers
        );
        Some(first.to_str().expect("header is text"))
    }

    /// True when a comma-separated header lists `token` (any case, any line).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind an upstream");
    let addr = listener.local_addr().expect("upstream address");
    (listener, addr)
}

/// An address on which nothing listens: connecting is refused at once.
pub async fn closed_port() -> SocketAddr {
    let (listener, addr) = bind().await;
    drop(listener);
    addr
}

// ---------------------------------------------------------------------------------------
// WebSocket echo upstream

/// The text message that makes [`spawn_ws_upstream`] close the connection itself.
const CLOSE_COMMAND: &str = "wsgate-test:close";

/// A message asking the echo upstream to send a close frame with `code` and `reason`.
pub fn close_command(code: u16, reason: &str) -> Message {
    Message::text(format!("{CLOSE_COMMAND} {code} {reason}"))
}

/// A tokio-tungstenite echo server.
pub struct WsUpstream {
    pub addr: SocketAddr,
    /// Every upgrade request, as received.
    pub requests: Recorder<Seen>,
    /// Every close frame received from a peer (`None` for a close without a body).
    pub closes: Recorder<Option<CloseFrame>>,
    connections: Arc<AtomicUsize>,
    _task: AbortOnDrop,
}

impl WsUpstream {
    /// `ws://ADDR{path}`: to run a scenario directly against the upstream.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// An echo upstream that accepts no subprotocol.
pub async fn spawn_ws_upstream() -> WsUpstream {
    spawn_ws_upstream_with_protocols(&[]).await
}

/// An echo upstream that answers with the first of `supported` the client offered.
pub async fn spawn_ws_upstream_with_protocols(supported: &[&str]) -> WsUpstream {
    let (listener, addr) = bind().await;
    let (requests_tx, requests) = recorder();
    let (closes_tx, closes) = recorder();
    let connections = Arc::new(AtomicUsize::new(0));
    let supported: Arc<Vec<String>> = Arc::new(supported.iter().map(|s| s.to_string()).collect());
    let counter = connections.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_ws(
                stream,
                supported.clone(),
                requests_tx.clone(),
                closes_tx.clone(),
            ));
        }
    });
    WsUpstream {
        addr,
        requests,
        closes,
        connections,
        _task: AbortOnDrop(task),
    }
}

// The handshake callback's error type is tungstenite's, large or not.
#[allow(clippy::result_large_err)]
async fn serve_ws(
    stream: TcpStream,
    supported: Arc<Vec<String>>,
    requests: UnboundedSender<Seen>,
    closes: UnboundedSender<Option<CloseFrame>>,
) {
    let callback =
        move |req: &WsRequest, mut resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
            let _ = requests.send(Seen {
                method: req.method().clone(),
                uri: req.uri().clone(),
                headers: req.headers().clone(),
            });
            let offered: Vec<String> = req
                .headers()
                .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|p| p.trim().to_string())
                .collect();
            if let Some(pick) = supported.iter().find(|p| offered.contains(p)) {
                resp.headers_mut().insert(
                    http::header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_str(pick).expect("protocol name"),
                );
            }
            Ok(resp)
        };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(ref text) if text.starts_with(CLOSE_COMMAND) => {
                let rest = text[CLOSE_COMMAND.len()..].trim_start();
                let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
                let frame = CloseFrame {
                    code: CloseCode::from(code.parse::<u16>().expect("close code")),
                    reason: reason.to_string().into(),
                };
                if ws.close(Some(frame)).await.is_err() {
                    break;
                }
            }
            Message::Text(_) | Message::Binary(_) => {
                if ws.send(msg).await.is_err() {
                    break;
                }
            }
            Message::Close(frame) => {
                let _ = closes.send(frame);
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Raw upstream: one request head in, canned bytes out

/// Builds the raw answer to a request head.
pub type Responder = Arc<dyn Fn(&RawHead) -> Vec<u8> + Send + Sync>;

/// An upstream that reads a request head, records it and writes `respond(head)`, then
/// keeps the connection open until the peer closes it.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub heads: Recorder<RawHead>,
    _task: AbortOnDrop,
}

pub async fn spawn_raw_upstream(respond: Responder) -> RawUpstream {
    raw_upstream(respond, true).await
}

/// Like [`spawn_raw_upstream`], but closes each connection right after its answer (for
/// bodies delimited by the end of the connection).
pub async fn spawn_raw_upstream_closing(respond: Responder) -> RawUpstream {
    raw_upstream(respond, false).await
}

async fn raw_upstream(respond: Responder, hold: bool) -> RawUpstream {
    let (listener, addr) = bind().await;
    let (heads_tx, heads) = recorder();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let respond = respond.clone();
            let heads_tx = heads_tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Ok(Some(head)) = read_head(&mut stream, &mut buf).await else {
                    return;
                };
                let head = parse_head(&head);
                let answer = respond(&head);
                let _ = heads_tx.send(head);
                if stream.write_all(&answer).await.is_err() || !hold {
                    return;
                }
                // Hold the connection until the peer is done with it.
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    RawUpstream {
        addr,
        heads,
        _task: AbortOnDrop(task),
    }
}

/// A correct 101 for the request's key, plus `extra` headers.
pub fn answer_101(extra: &[(&str, &str)]) -> Responder {
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    Arc::new(move |head: &RawHead| {
        let key = head.header("sec-websocket-key").unwrap_or_default();
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n",
            derive_accept_key(key.as_bytes())
        );
        for (name, value) in &extra {
            answer.push_str(&format!("{name}: {value}\r\n"));
        }
        answer.push_str("\r\n");
        answer.into_bytes()
    })
}

/// A 101 whose `Sec-WebSocket-Accept` does not belong to the request's key.
pub fn answer_101_wrong_accept() -> Responder {
    Arc::new(|_: &RawHead| {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(b"not the key the client sent")
        )
        .into_bytes()
    })
}

/// Exactly `bytes`, whatever the request.
pub fn answer_bytes(bytes: &[u8]) -> Responder {
    let answer = bytes.to_vec();
    Arc::new(move |_: &RawHead| answer.clone())
}

/// A complete non-101 answer: `status_line` (e.g. "401 Unauthorized"), `headers`, `body`
/// with its Content-Length.
pub fn answer_status(status_line: &str, headers: &[(&str, &str)], body: &str) -> Responder {
    let mut answer = format!("HTTP/1.1 {status_line}\r\n");
    for (name, value) in headers {
        answer.push_str(&format!("{name}: {value}\r\n"));
    }
    answer.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    answer_bytes(answer.as_bytes())
}

// ---------------------------------------------------------------------------------------
// Silent upstream

/// Accepts TCP connections and never sends a byte.
pub struct SilentUpstream {
    pub addr: SocketAddr,
    /// One event per accepted connection.
    pub accepted: Recorder<()>,
    _task: AbortOnDrop,
}

pub async fn spawn_silent_upstream() -> SilentUpstream {
    let (listener, addr) = bind().await;
    let (accepted_tx, accepted) = recorder();
    let task = tokio::spawn(async move {
        // Keep every socket open (and unanswered) until the fixture is dropped.
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
            let _ = accepted_tx.send(());
        }
    });
    SilentUpstream {
        addr,
        accepted,
        _task: AbortOnDrop(task),
    }
}

// ---------------------------------------------------------------------------------------
// HTTP upstream

/// What the HTTP upstream read from a request body: its length and SHA-1 (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyDigest {
    pub len: u64,
    pub sha1: String,
}

/// A hyper HTTP/1.1 server. Every answer carries `x-server: <its port>` and
/// `x-upstream-says: hello`, plus hop-by-hop headers a proxy must drop
/// (`Connection: x-resp-hop`, `X-Resp-Hop`, `Keep-Alive`). The status is taken from the
/// request's `x-reply-status` header (default 200). POST and PUT bodies are echoed back as
/// they stream in; other requests get `hello from <port>: <METHOD> <target>`.
pub struct HttpUpstream {
    pub addr: SocketAddr,
    pub requests: Recorder<Seen>,
    /// One digest per echoed request body, sent once the body has been read to its end.
    pub bodies: Recorder<BodyDigest>,
    _task: AbortOnDrop,
}

impl HttpUpstream {
    /// The value this server puts in `x-server`.
    pub fn id(&self) -> String {
        self.addr.port().to_string()
    }
}

type UpstreamBody = BoxBody<Bytes, hyper::Error>;

pub async fn spawn_http_upstream() -> HttpUpstream {
    let (listener, addr) = bind().await;
    let (requests_tx, requests) = recorder();
    let (bodies_tx, bodies) = recorder();
    let port = addr.port();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let requests_tx = requests_tx.clone();
            let bodies_tx = bodies_tx.clone();
            let service = hyper::service::service_fn(move |req| {
                let answer = http_answer(req, port, &requests_tx, &bodies_tx);
                async move { Ok::<_, Infallible>(answer) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    HttpUpstream {
        addr,
        requests,
        bodies,
        _task: AbortOnDrop(task),
    }
}

fn http_answer(
    req: Request<Incoming>,
    port: u16,
    requests: &UnboundedSender<Seen>,
    bodies: &UnboundedSender<BodyDigest>,
) -> Response<UpstreamBody> {
    let _ = requests.send(Seen {
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
    });
    let status = req
        .headers()
        .get("x-reply-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|v| StatusCode::from_u16(v).ok())
        .unwrap_or(StatusCode::OK);
    let body: UpstreamBody = if req.method() == Method::POST || req.method() == Method::PUT {
        DigestingBody {
            inner: req.into_body(),
            sha1: sha1::Sha1::new(),
            len: 0,
            done: Some(bodies.clone()),
        }
        .boxed()
    } else {
        let text = format!("hello from {port}: {} {}", req.method(), req.uri());
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed()
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    let header = |name: &'static str| HeaderName::from_static(name);
    h.insert(header("x-server"), HeaderValue::from(port));
    h.insert(header("x-upstream-says"), HeaderValue::from_static("hello"));
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("x-resp-hop"),
    );
    h.insert(header("x-resp-hop"), HeaderValue::from_static("1"));
    h.insert(header("keep-alive"), HeaderValue::from_static("timeout=30"));
    response
}

/// Streams a request body back out while hashing it; reports the digest at its end.
struct DigestingBody {
    inner: Incoming,
    sha1: sha1::Sha1,
    len: u64,
    done: Option<UnboundedSender<BodyDigest>>,
}

impl Body for DigestingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.sha1.update(data);
                    this.len += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => {
                if let Some(done) = this.done.take() {
                    let _ = done.send(BodyDigest {
                        len: this.len,
                        sha1: super::hex(&this.sha1.finalize_reset()),
                    });
                }
                Poll::Ready(None)
            }
        }
    }

    // `is_end_stream` keeps its default (false) so the body is polled to its `None`,
    // which is where the digest is reported.

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
