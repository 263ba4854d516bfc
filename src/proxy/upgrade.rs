//! The upstream half of a WebSocket upgrade, spoken directly on the socket: the request
//! head written in one call, the answer's head parsed with httparse, and a refusal's body
//! (Content-Length, chunked, or read to close) streamed back to the client. A general HTTP
//! client would add a connection task, channels and an upgrade hand-off to every handshake;
//! an upgrade needs none of them, and a 101 leaves the bare socket for the tunnel.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use http_body::Frame;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::proxy::headers::Forwarding;
use crate::upstream::UpstreamStream;

/// The largest response head accepted from an upstream (as for client request heads).
pub const MAX_HEAD: usize = 64 * 1024;
/// Header lines accepted in a response head.
const MAX_HEADERS: usize = 100;
/// First read buffer: a 101 or a short refusal fits in one read.
const INITIAL_READ: usize = 4096;
/// Longest chunk-size line (with extensions) and most trailer bytes accepted in a body.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;

/// The request head for an upgrade: `GET target HTTP/1.1`, then `headers` as they are but
/// those `forwarding` replaces, then the forwarding headers.
pub fn encode_request(target: &str, headers: &HeaderMap, forwarding: &Forwarding<'_>) -> Vec<u8> {
    let len = forwarding.lines().fold(
        headers
            .iter()
            .filter(|(name, _)| !forwarding.replaces(name))
            .fold(target.len() + 17, |len, (name, value)| {
                len + name.as_str().len() + value.len() + 4
            }),
        |len, (name, value)| len + name.len() + value.len() + 4,
    );
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut line = |name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in headers {
        if !forwarding.replaces(name) {
            line(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    for (name, value) in forwarding.lines() {
        line(name.as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// An upstream's answer head, and whatever it sent after it in the same reads.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// Bytes past the head: WebSocket frames after a 101, the body otherwise.
    pub rest: BytesMut,
}

/// Why an upstream's answer could not be used; each reads after "server X ".
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("closed the connection without answering")]
    Closed,
    #[error("closed the connection in the middle of its response head")]
    Truncated,
    #[error("sent a response head over {} KiB", MAX_HEAD / 1024)]
    TooLarge,
    #[error("sent an invalid response head: {0}")]
    Invalid(&'static str),
    #[error("failed mid-handshake: {0}")]
    Io(#[from] io::Error),
}

/// Reads the upstream's answer head, skipping interim 1xx answers other than 101.
pub async fn read_response<S: AsyncRead + Unpin>(io: &mut S) -> Result<ResponseHead, HeadError> {
    let mut buf = BytesMut::with_capacity(INITIAL_READ);
    loop {
        while !buf.is_empty() {
            match parse_head(&buf)? {
                Some((len, status, _)) if status.is_informational() && status.as_u16() != 101 => {
                    buf.advance(len);
                }
                Some((len, status, headers)) => {
                    let rest = buf.split_off(len);
                    return Ok(ResponseHead {
                        status,
                        headers,
                        rest,
                    });
                }
                None => break,
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(INITIAL_READ);
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Err(if buf.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Truncated
            });
        }
    }
}

/// Parses one complete head at the start of `buf`: its length, status and headers.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, StatusCode, HeaderMap)>, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HeadError::Invalid(parse_error(e))),
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(HeadError::Invalid("bad status code"))?;
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| HeadError::Invalid("bad header name"))?;
        let value =
            HeaderValue::from_bytes(h.value).map_err(|_| HeadError::Invalid("bad header value"))?;
        headers.append(name, value);
    }
    Ok(Some((len, status, headers)))
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::Status => "bad status line",
        httparse::Error::Version => "not HTTP/1.x",
        httparse::Error::HeaderName => "bad header name",
        httparse::Error::HeaderValue => "bad header value",
        httparse::Error::NewLine | httparse::Error::Token => "malformed line",
        httparse::Error::TooManyHeaders => "more than 100 header lines",
    }
}

/// How a non-101 answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    ToClose,
}

/// The framing of a non-101 answer. A `Transfer-Encoding` wins over `Content-Length`
/// (which the caller must then drop); differing lengths are refused, as smuggling bait.
pub fn framing(status: StatusCode, headers: &HeaderMap) -> Result<Framing, HeadError> {
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => Framing::Chunked,
            _ => Framing::ToClose,
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            let n = std::str::from_utf8(item)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(HeadError::Invalid("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Invalid("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::ToClose, Framing::Length))
}

/// A refusal's body read straight off the upstream socket, de-chunked when chunked (the
/// client side frames it again as it needs). Trailers are read and dropped.
pub struct RawBody {
    io: UpstreamStream,
    decoder: BodyDecoder,
}

/// The body decoding of [`RawBody`] without I/O: bytes are pushed in, data comes out. Kept
/// apart so it can be tested (and fuzzed) with any cut of the input.
#[derive(Debug)]
pub struct BodyDecoder {
    buf: BytesMut,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    ToClose,
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers(usize),
    Done,
}

/// What [`BodyDecoder::step`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes, in order.
    Data(Bytes),
    /// Progress without data (a chunk-size line, a trailer): call again.
    Again,
    /// Nothing more can be decoded until more bytes are pushed.
    NeedMore,
    /// The body is complete.
    End,
}

impl BodyDecoder {
    /// A decoder for a body framed as `framing`, starting with the bytes in `rest`.
    pub fn new(rest: BytesMut, framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::ToClose => State::ToClose,
        };
        BodyDecoder { buf: rest, state }
    }

    pub fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    pub fn exact_len(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Appends bytes read from the upstream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The input ended: fine for a body read to the close, an error anywhere else.
    pub fn end_of_input(&mut self) -> io::Result<()> {
        let to_close = self.state == State::ToClose;
        self.state = State::Done;
        if to_close {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the upstream closed the connection in the middle of the body",
            ))
        }
    }

    /// The next line in the buffer (without its line end), once a whole one is there.
    fn take_line(&mut self, limit: usize) -> io::Result<Option<Bytes>> {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                Ok(Some(line.freeze()))
            }
            None if self.buf.len() > limit => Err(invalid("chunk line too long")),
            None => Ok(None),
        }
    }

    /// Advances the state machine over what is buffered; a data frame when it has one.
    /// After an error the decoder is done.
    pub fn step(&mut self) -> io::Result<Step> {
        let step = self.advance();
        if step.is_err() {
            self.state = State::Done;
        }
        step
    }

    fn advance(&mut self) -> io::Result<Step> {
        match self.state {
            State::Done => Ok(Step::End),
            State::Length(n) | State::ChunkData(n) if !self.buf.is_empty() => {
                let take = n.min(self.buf.len() as u64);
                let data = self.buf.split_to(take as usize).freeze();
                let left = n - take;
                self.state = match self.state {
                    State::Length(_) if left == 0 => State::Done,
                    State::Length(_) => State::Length(left),
                    _ if left == 0 => State::ChunkEnd,
                    _ => State::ChunkData(left),
                };
                Ok(Step::Data(data))
            }
            State::ToClose if !self.buf.is_empty() => Ok(Step::Data(self.buf.split().freeze())),
            State::ChunkSize => match self.take_line(MAX_CHUNK_LINE)? {
                Some(line) => {
                    let digits = line
                        .split(|&b| b == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .filter(|s| !s.is_empty() && s.len() <= 16)
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or_else(|| invalid("bad chunk size"))?;
                    self.state = if size == 0 {
                        State::Trailers(0)
                    } else {
                        State::ChunkData(size)
                    };
                    Ok(Step::Again)
                }
                None => Ok(Step::NeedMore),
            },
            // Exactly CRLF (or a bare LF) after the data; decided from the first bytes, so
            // the verdict is the same however the input was cut.
            State::ChunkEnd => match &self.buf[..] {
                [] | [b'\r'] => Ok(Step::NeedMore),
                [b'\n', ..] | [b'\r', b'\n', ..] => {
                    let end = if self.buf[0] == b'\n' { 1 } else { 2 };
                    self.buf.advance(end);
                    self.state = State::ChunkSize;
                    Ok(Step::Again)
                }
                _ => Err(invalid("chunk data longer than its size")),
            },
            State::Trailers(seen) if seen > MAX_TRAILERS => Err(invalid("trailers over 64 KiB")),
            State::Trailers(seen) => match self.take_line(MAX_TRAILERS - seen)? {
                Some(line) if line.is_empty() => {
                    self.state = State::Done;
                    Ok(Step::End)
                }
                Some(line) => {
                    self.state = State::Trailers(seen + line.len() + 2);
                    Ok(Step::Again)
                }
                None => Ok(Step::NeedMore),
            },
            State::Length(_) | State::ChunkData(_) | State::ToClose => Ok(Step::NeedMore),
        }
    }
}

impl RawBody {
    pub fn new(io: UpstreamStream, rest: BytesMut, framing: Framing) -> Self {
        RawBody {
            io,
            decoder: BodyDecoder::new(rest, framing),
        }
    }

    pub fn is_end_stream(&self) -> bool {
        self.decoder.is_end_stream()
    }

    pub fn exact_len(&self) -> Option<u64> {
        self.decoder.exact_len()
    }

    /// Reads more into the decoder's buffer; false at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let buf = &mut self.decoder.buf;
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            buf
        ))?;
        Poll::Ready(Ok(n > 0))
    }

    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            match self.decoder.step() {
                Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Step::End) => return Poll::Ready(None),
                Ok(Step::Again) => {}
                Ok(Step::NeedMore) => match ready!(self.poll_fill(cx)) {
                    Ok(true) => {}
                    Ok(false) => {
                        return Poll::Ready(self.decoder.end_of_input().err().map(Err));
                    }
                    Err(e) => {
                        self.decoder.state = State::Done;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the upstream sent a malformed body: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn request_head_is_the_target_and_headers_in_order() {
        use crate::proxy::headers::{add_forwarding, ClientInfo};
        let map = headers(&[
            ("host", "a.test"),
            ("x-forwarded-for", "203.0.113.9"),
            ("upgrade", "websocket"),
            ("x", "1"),
            ("x-forwarded-host", "spoofed.test"),
        ]);
        let client = ClientInfo {
            ip: "192.0.2.1".parse().unwrap(),
            proto: "http",
            host: Some("a.test"),
        };
        let head = encode_request("/chat?room=1", &map, &Forwarding::new(&map, client));
        assert_eq!(
            String::from_utf8_lossy(&head),
            "GET /chat?room=1 HTTP/1.1\r\nhost: a.test\r\nupgrade: websocket\r\nx: 1\r\n\
             x-forwarded-for: 203.0.113.9, 192.0.2.1\r\n\
             forwarded: for=192.0.2.1;host=a.test;proto=http\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: a.test\r\n\r\n"
        );
        assert_eq!(head.capacity(), head.len(), "sized exactly, one allocation");

        // The same values as the header-map path of plain requests.
        let mut applied = map.clone();
        add_forwarding(&mut applied, client);
        let forwarding = Forwarding::new(&map, client);
        for (name, value) in forwarding.lines() {
            assert_eq!(applied[name], value, "{name}");
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = StatusCode::OK;
        assert_eq!(framing(ok, &headers(&[])).unwrap(), Framing::ToClose);
        assert_eq!(
            framing(ok, &headers(&[("content-length", "12")])).unwrap(),
            Framing::Length(12)
        );
        assert_eq!(
            framing(ok, &headers(&[("content-length", "12, 12")])).unwrap(),
            Framing::Length(12)
        );
        assert!(framing(
            ok,
            &headers(&[("content-length", "12"), ("content-length", "13")])
        )
        .is_err());
        assert!(framing(ok, &headers(&[("content-length", "+12")])).is_err());
        assert_eq!(
            framing(
                ok,
                &headers(&[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "3")
                ])
            )
            .unwrap(),
            Framing::Chunked
        );
        assert_eq!(
            framing(ok, &headers(&[("transfer-encoding", "gzip")])).unwrap(),
            Framing::ToClose
        );
        assert_eq!(
            framing(
                StatusCode::NOT_MODIFIED,
                &headers(&[("content-length", "5")])
            )
            .unwrap(),
            Framing::Empty
        );
    }

    #[tokio::test]
    async fn head_is_split_from_what_follows_and_interim_answers_are_skipped() {
        let wire: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi";
        let mut io = wire;
        let head = read_response(&mut io).await.unwrap();
        assert_eq!(head.status, 101);
        assert_eq!(head.headers["upgrade"], "websocket");
        assert_eq!(&head.rest[..], b"\x81\x02hi");
    }

    #[tokio::test]
    async fn bad_heads_are_named() {
        let cases: [(&[u8], &str); 4] = [
            (b"", "without answering"),
            (
                b"HTTP/1.1 101 Switching",
                "in the middle of its response head",
            ),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "invalid response head"),
            (
                b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
                "invalid response head",
            ),
        ];
        for (wire, needle) in cases {
            let mut io = wire;
            let err = read_response(&mut io).await.unwrap_err().to_string();
            assert!(err.contains(needle), "{wire:?}: {err}");
        }
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let mut io = huge.as_bytes();
        let err = read_response(&mut io).await.unwrap_err();
        assert!(matches!(err, HeadError::TooLarge), "{err}");
    }
}
