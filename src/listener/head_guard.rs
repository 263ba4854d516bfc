//! A guard on the client stream that follows HTTP/1.1 request framing as bytes pass to hyper
//! and makes a request framed by both `Content-Length` and `Transfer-Encoding` fail to parse,
//! so hyper answers 400 and nothing is forwarded.
//!
//! hyper alone accepts such a request (Transfer-Encoding wins, RFC 9112 §6.3) and closes the
//! connection after it, which already prevents smuggling through wsgate itself; but a request
//! whose length two parsers could read differently is refused outright, the way HAProxy and
//! Envoy do. The guard keeps a few bytes of state, scans request heads byte by byte, and
//! skips bodies by length or by chunk sizes. Once a request asks for an upgrade it steps
//! aside: what follows is not HTTP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest header name the guard needs to recognise ("transfer-encoding").
const NAME_CAP: usize = 17;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside the request line.
    RequestLine,
    /// At the first byte of a header line (or of the empty line ending the head).
    LineStart,
    /// Saw '\r' at a line start: the head ends at the next '\n'.
    HeadEnd,
    /// Reading a header name.
    Name,
    /// Inside a header value; `Content-Length` digits are collected.
    Value,
    /// Skipping a body of known length.
    Body(u64),
    /// Reading a chunk-size line's hex digits.
    ChunkSize(u64),
    /// Skipping a chunk extension up to the end of the line.
    ChunkExt(u64),
    /// Skipping chunk data.
    ChunkData(u64),
    /// Skipping the CRLF after chunk data.
    ChunkDataEnd,
    /// At the start of a trailer line (an empty one ends the message).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// Not following anymore: after an upgrade, or input hyper will reject on its own.
    Off,
}

/// What one request head said about its framing.
#[derive(Debug, Default, Clone, Copy)]
struct Head {
    content_length: Option<u64>,
    chunked: bool,
    upgrade: bool,
}

/// The scanner, separate from I/O so it can be tested byte by byte.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    head: Head,
    name: [u8; NAME_CAP],
    name_len: usize,
    /// The header whose value is being read is Content-Length.
    in_content_length: bool,
    value: u64,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            state: State::RequestLine,
            head: Head::default(),
            name: [0; NAME_CAP],
            name_len: 0,
            in_content_length: false,
            value: 0,
        }
    }
}

impl Scanner {
    /// Follows `bytes` (just read, not yet seen by hyper); may rewrite one byte so that a
    /// request with both framing headers fails to parse.
    pub fn feed(&mut self, bytes: &mut [u8]) {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Off => return,
                State::Body(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if left == take {
                        State::RequestLine
                    } else {
                        State::Body(left - take)
                    };
                    continue;
                }
                State::ChunkData(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if left == take {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(left - take)
                    };
                    continue;
                }
                _ => {}
            }
            if self.only_line_end_matters() {
                i = match bytes[i..].iter().position(|&b| b == b'\n') {
                    Some(n) => i + n,
                    None => return,
                };
            }
            self.step(bytes, i);
            i += 1;
        }
    }

    /// Inside a line whose bytes up to its end change nothing: the scan can jump to it.
    fn only_line_end_matters(&self) -> bool {
        match self.state {
            State::RequestLine | State::ChunkExt(_) | State::Trailer => true,
            State::Value => !self.in_content_length,
            _ => false,
        }
    }

    fn step(&mut self, bytes: &mut [u8], i: usize) {
        let b = bytes[i];
        self.state = match self.state {
            State::RequestLine => match b {
                b'\n' => State::LineStart,
                _ => State::RequestLine,
            },
            State::LineStart => match b {
                b'\r' => State::HeadEnd,
                b'\n' => self.end_of_head(),
                _ => {
                    self.name_len = 0;
                    self.push_name(b);
                    State::Name
                }
            },
            State::HeadEnd => match b {
                b'\n' => self.end_of_head(),
                _ => State::Off,
            },
            State::Name => match b {
                b':' => self.end_of_name(bytes, i),
                b'\n' => State::Off,
                _ => {
                    self.push_name(b);
                    State::Name
                }
            },
            State::Value => match b {
                b'\n' => {
                    if self.in_content_length {
                        self.head.content_length = Some(self.value);
                    }
                    State::LineStart
                }
                b'0'..=b'9' if self.in_content_length => {
                    match self
                        .value
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(b - b'0')))
                    {
                        Some(v) => {
                            self.value = v;
                            State::Value
                        }
                        None => State::Off,
                    }
                }
                _ => State::Value,
            },
            State::ChunkSize(size) => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    let digit = (b as char).to_digit(16).map_or(0, u64::from);
                    match size.checked_mul(16).and_then(|v| v.checked_add(digit)) {
                        Some(v) => State::ChunkSize(v),
                        None => State::Off,
                    }
                }
                b';' | b' ' | b'\t' => State::ChunkExt(size),
                b'\r' => State::ChunkExt(size),
                b'\n' => Self::chunk_start(size),
                _ => State::Off,
            },
            State::ChunkExt(size) => match b {
                b'\n' => Self::chunk_start(size),
                _ => State::ChunkExt(size),
            },
            State::ChunkDataEnd => match b {
                b'\r' => State::ChunkDataEnd,
                b'\n' => State::ChunkSize(0),
                _ => State::Off,
            },
            State::TrailerStart => match b {
                b'\r' => State::TrailerStart,
                b'\n' => State::RequestLine,
                _ => State::Trailer,
            },
            State::Trailer => match b {
                b'\n' => State::TrailerStart,
                _ => State::Trailer,
            },
            // Handled in `feed`.
            State::Body(_) | State::ChunkData(_) | State::Off => self.state,
        };
    }

    fn push_name(&mut self, b: u8) {
        if self.name_len < NAME_CAP {
            self.name[self.name_len] = b.to_ascii_lowercase();
        }
        self.name_len += 1;
    }

    fn end_of_name(&mut self, bytes: &mut [u8], colon: usize) -> State {
        let name = &self.name[..self.name_len.min(NAME_CAP)];
        let exact = self.name_len <= NAME_CAP;
        self.in_content_length = false;
        match name {
            b"content-length" if exact => {
                if self.head.chunked {
                    return refuse(bytes, colon);
                }
                self.in_content_length = true;
                self.value = 0;
            }
            b"transfer-encoding" if exact => {
                if self.head.content_length.is_some() {
                    return refuse(bytes, colon);
                }
                self.head.chunked = true;
            }
            b"upgrade" if exact => self.head.upgrade = true,
            _ => {}
        }
        State::Value
    }

    fn end_of_head(&mut self) -> State {
        let head = std::mem::take(&mut self.head);
        if head.upgrade {
            // A 101 turns the stream into something else; hyper takes it from here.
            State::Off
        } else if head.chunked {
            State::ChunkSize(0)
        } else {
            match head.content_length {
                Some(0) | None => State::RequestLine,
                Some(n) => State::Body(n),
            }
        }
    }

    fn chunk_start(size: u64) -> State {
        if size == 0 {
            State::TrailerStart
        } else {
            State::ChunkData(size)
        }
    }
}

/// Breaks the header line at `colon` (a space before the colon is not a valid header name),
/// so hyper's parser refuses the request with 400.
fn refuse(bytes: &mut [u8], colon: usize) -> State {
    bytes[colon] = b' ';
    State::Off
}

/// A client stream whose request framing is checked on the way in.
#[derive(Debug)]
pub struct HeadGuard<S> {
    inner: S,
    scanner: Scanner,
}

impl<S> HeadGuard<S> {
    pub fn new(inner: S) -> Self {
        HeadGuard {
            inner,
            scanner: Scanner::default(),
        }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.scanner.feed(&mut buf.filled_mut()[before..]);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes and returns what hyper would see.
    fn scan(input: &str, step: usize) -> (String, State) {
        let mut bytes = input.as_bytes().to_vec();
        let mut scanner = Scanner::default();
        for chunk in bytes.chunks_mut(step) {
            scanner.feed(chunk);
        }
        (String::from_utf8(bytes).unwrap(), scanner.state)
    }

    #[test]
    fn refuses_both_framing_headers_in_either_order_at_any_split() {
        for step in 1..8 {
            let (seen, _) = scan(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                step,
            );
            assert!(seen.contains("Transfer-Encoding  chunked"), "{seen}");
            let (seen, _) = scan(
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n",
                step,
            );
            assert!(seen.contains("content-length  5"), "{seen}");
        }
    }

    #[test]
    fn follows_bodies_to_the_next_request() {
        let second = "GET /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for first in [
            "POST /a HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello\r\n\r\nx:",
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            for step in [1, 3, 64] {
                let (seen, _) = scan(&format!("{first}{second}"), step);
                assert!(seen.ends_with("Transfer-Encoding  chunked\r\n\r\n"), "{seen}");
            }
        }
    }

    #[test]
    fn leaves_ordinary_requests_alone() {
        let input = "POST / HTTP/1.1\r\nContent-Length: 3\r\nX-Transfer-Encoding: no\r\n\r\nabcGET / HTTP/1.1\r\n\r\n";
        let (seen, state) = scan(input, 2);
        assert_eq!(seen, input);
        assert_eq!(state, State::RequestLine);
    }

    #[test]
    fn steps_aside_after_an_upgrade_request() {
        let input = "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x01\x05content-length: 1\r\ntransfer-encoding: x\r\n";
        let (seen, state) = scan(input, 5);
        assert_eq!(seen, input);
        assert_eq!(state, State::Off);
    }
}
