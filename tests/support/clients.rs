//! Clients: a raw byte-level HTTP client (odd or partial request heads, exact responses,
//! watching for the connection to close), a hyper HTTP/1.1 client on one keep-alive
//! connection, and WebSocket helpers built on tokio-tungstenite.

use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{sha1_hex, within, AbortOnDrop};

/// Largest head the raw helpers read before giving up (the proxy allows 64 KiB).
const MAX_HEAD: usize = 128 * 1024;

/// A parsed request or response head.
#[derive(Debug, Clone)]
pub struct RawHead {
    /// The request line or status line.
    pub first_line: String,
    /// In the order received, names as sent.
    pub headers: Vec<(String, String)>,
}

impl RawHead {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }

    /// Every value of header `name` (any case), one per header line.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Splits a head (without its final blank line) into first line and headers.
pub fn parse_head(text: &str) -> RawHead {
    let mut lines = text.split("\r\n");
    let first_line = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (name, value) = l.split_once(':').unwrap_or((l, ""));
            (name.trim().to_string(), value.trim().to_string())
        })
        .collect();
    RawHead {
        first_line,
        headers,
    }
}

/// Reads until the end of a head. Returns the head's text (without the blank line) and
/// leaves any bytes after it in `buf`; `None` if the peer closed first.
pub async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<String>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("head too large"));
        }
        let mut chunk = [0u8; 8192];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A response read byte by byte off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub head: RawHead,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Anything a raw client can talk over: TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How a connection ended when read to its end.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Orderly close (FIN).
    Eof,
    /// Reset or another read error.
    Error(std::io::ErrorKind),
}

/// An HTTP/1.1 client that writes exactly the bytes it is given.
pub struct RawClient {
    io: Box<dyn Io>,
    buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let tcp = within("a TCP connection", TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        RawClient::over(tcp)
    }

    /// A raw client over an established stream (e.g. a TLS connection).
    pub fn over(io: impl Io + 'static) -> RawClient {
        RawClient {
            io: Box::new(io),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        within("a write", async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        })
        .await
        .expect("write to the proxy");
    }

    /// Reads one response: its head, then a body by Content-Length or chunked encoding
    /// (none for 1xx, 204 and 304; to the end of the stream when neither is given).
    pub async fn read_response(&mut self) -> RawResponse {
        within("a response", self.read_response_inner())
            .await
            .expect("read a response")
    }

    async fn read_response_inner(&mut self) -> std::io::Result<RawResponse> {
        let head = read_head(&mut self.io, &mut self.buf)
            .await?
            .ok_or_else(|| std::io::Error::other("closed before a response head"))?;
        let head = parse_head(&head);
        let status: u16 = head
            .first_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                std::io::Error::other(format!("bad status line {:?}", head.first_line))
            })?;
        let body = if (100..200).contains(&status) || status == 204 || status == 304 {
            Vec::new()
        } else if let Some(len) = head.header("content-length") {
            let len: usize = len.parse().map_err(std::io::Error::other)?;
            self.fill(len).await?;
            self.buf.drain(..len).collect()
        } else if head
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            self.read_chunked().await?
        } else {
            let mut rest = std::mem::take(&mut self.buf);
            self.io.read_to_end(&mut rest).await?;
            rest
        };
        Ok(RawResponse { status, head, body })
    }

    /// Reads until `buf` holds at least `len` bytes.
    async fn fill(&mut self, len: usize) -> std::io::Result<()> {
        while self.buf.len() < len {
            let mut chunk = [0u8; 8192];
            let n = self.io.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }

    async fn read_line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return Ok(line);
            }
            let want = self.buf.len() + 1;
            self.fill(want).await?;
        }
    }

    async fn read_chunked(&mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let size_line = self.read_line().await?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(std::io::Error::other)?;
            if size == 0 {
                // Trailers, then the blank line.
                while !self.read_line().await?.is_empty() {}
                return Ok(body);
            }
            self.fill(size + 2).await?;
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Reads a response head and leaves the body to [`RawClient::read_until`] (streams).
    pub async fn read_head_only(&mut self) -> RawResponse {
        let head = within("a response head", read_head(&mut self.io, &mut self.buf))
            .await
            .expect("read a response head")
            .expect("a response head before the end of the stream");
        let head = parse_head(&head);
        let status = head
            .first_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        RawResponse {
            status,
            head,
            body: Vec::new(),
        }
    }

    /// Reads until `pattern` arrives; returns the text up to and including it (raw: a
    /// chunked body's size lines included).
    pub async fn read_until(&mut self, pattern: &[u8]) -> String {
        within("a pattern in the stream", async {
            loop {
                if let Some(at) = self.buf.windows(pattern.len()).position(|w| w == pattern) {
                    let taken: Vec<u8> = self.buf.drain(..at + pattern.len()).collect();
                    return String::from_utf8_lossy(&taken).into_owned();
                }
                let want = self.buf.len() + 1;
                self.fill(want).await.expect("read the stream");
            }
        })
        .await
    }

    /// Reads until the peer closes the connection; returns what arrived and how it ended.
    pub async fn read_until_closed(&mut self) -> (Vec<u8>, Ended) {
        within("the connection to close", async {
            let mut got = std::mem::take(&mut self.buf);
            loop {
                let mut chunk = [0u8; 8192];
                match self.io.read(&mut chunk).await {
                    Ok(0) => return (got, Ended::Eof),
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) => return (got, Ended::Error(e.kind())),
                }
            }
        })
        .await
    }
}

/// A request head (and no body) with the given headers, in order.
pub fn http_request(method: &str, target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut text = format!("{method} {target} HTTP/1.1\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// The RFC 6455 §1.3 sample key: 16 bytes in base64.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The headers of a valid upgrade request for `host`; tests edit the list to break it.
pub fn ws_headers(host: &str) -> Vec<(&str, &str)> {
    vec![
        ("Host", host),
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", WS_KEY),
    ]
}

/// Replaces the value of `name` in a header list (or adds it).
pub fn set_header<'a>(headers: &mut Vec<(&'a str, &'a str)>, name: &'a str, value: &'a str) {
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    headers.push((name, value));
}

/// Removes `name` from a header list.
pub fn remove_header(headers: &mut Vec<(&str, &str)>, name: &str) {
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
}

/// The value of the counter `name{direction="…",route="…"}` in the `GET /metrics` answer
/// of the admin listener at `admin`; fails the test when the series is missing.
pub async fn route_counter(admin: SocketAddr, name: &str, route: &str, direction: &str) -> u64 {
    let request = http_request("GET", "/metrics", &[("Host", "admin")]);
    let text = raw_exchange(admin, &request).await.body_text();
    let prefix = format!("{name}{{direction=\"{direction}\",route=\"{route}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in the metrics:\n{text}"))
}

/// Sends one request on a fresh connection and reads the response.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut client = RawClient::connect(addr).await;
    client.send(request).await;
    client.read_response().await
}

// ---------------------------------------------------------------------------------------
// hyper client

/// The request body type of [`HttpClient`]: empty, or streamed from a channel.
pub type ClientBody = BoxBody<Bytes, std::io::Error>;

pub fn empty_body() -> ClientBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body fed chunk by chunk through the returned sender; it ends when the sender drops.
pub fn channel_body(capacity: usize) -> (mpsc::Sender<Bytes>, ClientBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(capacity);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(Frame::data(chunk)), rx))
    });
    (tx, BodyExt::boxed(StreamBody::new(stream)))
}

/// One HTTP/1.1 connection; requests are sent on it one after another (keep-alive).
pub struct HttpClient {
    sender: SendRequest<ClientBody>,
    _conn: AbortOnDrop,
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> HttpClient {
        let tcp = within("a TCP connection", TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("HTTP/1.1 client handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        HttpClient {
            sender,
            _conn: AbortOnDrop(conn),
        }
    }

    /// Sends a request and returns the response with its body unread.
    pub async fn send(&mut self, req: Request<ClientBody>) -> Response<Incoming> {
        within("a response", async {
            self.sender.ready().await?;
            self.sender.send_request(req).await
        })
        .await
        .expect("the request failed on the client connection")
    }

    /// `GET target` with `Host: host` and `headers`; returns the response with its body read.
    pub async fn get(
        &mut self,
        host: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Response<Bytes> {
        let mut req = Request::get(target).header(http::header::HOST, host);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let response = self.send(req.body(empty_body()).expect("request")).await;
        read_body(response).await
    }
}

/// Reads a response body to its end.
pub async fn read_body(response: Response<Incoming>) -> Response<Bytes> {
    let (parts, body) = response.into_parts();
    let body = within("a response body", body.collect())
        .await
        .expect("read the response body")
        .to_bytes();
    Response::from_parts(parts, body)
}

// ---------------------------------------------------------------------------------------
// WebSocket helpers

/// Connects a tokio-tungstenite client (plain `ws://` URLs, or any client request).
pub async fn ws_connect<R>(
    request: R,
) -> (
    WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    tokio_tungstenite::tungstenite::handshake::client::Response,
)
where
    R: IntoClientRequest + Unpin,
{
    within(
        "a WebSocket handshake",
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("the WebSocket handshake failed")
}

/// Sends each message, collects the echo of each (pings and pongs skipped), then closes
/// with 1000 and reads to the end. Returns the echoes in order.
pub async fn echo_transcript<S>(ws: &mut WebSocketStream<S>, messages: &[Message]) -> Vec<Message>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut echoes = Vec::new();
    for message in messages {
        within("sending a message", ws.send(message.clone()))
            .await
            .expect("send a message");
        echoes.push(next_data(ws).await);
    }
    within("the close handshake", ws.close(None))
        .await
        .expect("send close");
    within("the end of the stream", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    echoes
}

/// The next text or binary message.
pub async fn next_data<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    within("a data message", async {
        loop {
            match ws.next().await {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return m,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a data message, got {other:?}"),
            }
        }
    })
    .await
}

/// Reads until the peer's close frame; returns it (`None` for a close without a body) and
/// then reads on to the end of the stream, so the close handshake completes.
pub async fn next_close<S>(ws: &mut WebSocketStream<S>) -> Option<CloseFrame>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    within("a close frame", async {
        let frame = loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        while let Some(Ok(_)) = ws.next().await {}
        frame
    })
    .await
}

/// A short description of a message (kind, length, SHA-1) for comparing big payloads.
pub fn describe(message: &Message) -> String {
    match message {
        Message::Text(t) => format!("text {} bytes sha1 {}", t.len(), sha1_hex(t.as_bytes())),
        Message::Binary(b) => format!("binary {} bytes sha1 {}", b.len(), sha1_hex(b)),
        other => format!("{other:?}"),
    }
}

/// Asserts two message lists are identical, printing summaries rather than megabytes.
pub fn assert_same_messages(what: &str, got: &[Message], want: &[Message]) {
    let got_d: Vec<String> = got.iter().map(describe).collect();
    let want_d: Vec<String> = want.iter().map(describe).collect();
    assert_eq!(got_d, want_d, "{what}");
    assert!(got == want, "{what}: same summaries but different messages");
}
