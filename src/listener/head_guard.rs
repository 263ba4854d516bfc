//! The gate between a client stream and hyper: request heads are held back until they are
//! complete, counted exactly against `[limits] max_request_head` and `max_request_headers`,
//! and checked for ambiguous framing before hyper sees a byte of them.
//!
//! Holding heads back does three things:
//! - Limits are exact: a head of `max_request_head` bytes passes, one byte more gets 431,
//!   whatever the read sizes were (hyper's own limit counts its read buffer, not the head).
//! - A connection waiting for its head costs only the bytes it has sent: hyper's 8 KiB
//!   read and write buffers are allocated once a head is complete (see `listener`).
//! - A refused head never reaches hyper: the gate hands hyper a stand-in request instead,
//!   and the service, seeing the connection's refusal, answers it with the status and a
//!   one-line reason, then closes.
//!
//! Bodies pass straight through into hyper's buffer; the scanner follows them by length or
//! by chunk sizes to find where the next head starts. A request framed by both
//! `Content-Length` and `Transfer-Encoding` is refused outright, as HAProxy and Envoy do,
//! since two parsers could read its length differently. Once a request asks for an upgrade
//! the gate steps aside: what follows is not HTTP.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::HeadRefusal;
use crate::gateway::ConnContext;

use super::pending::{PendingHeads, Ticket};

/// Longest header name the scanner needs to recognise ("transfer-encoding").
const NAME_CAP: usize = 17;

/// Bytes read from the socket in one go while a head is incomplete. The read lands on the
/// stack and only what arrived is kept, so a connection trickling its head holds its head
/// and nothing more; 4 KiB takes a typical browser head (0.5-2 KiB) in one system call.
const HEAD_READ_CHUNK: usize = 4096;

/// The HTTP/2 connection preface (RFC 9113 §3.4): on a plain listener with `http2 = true`
/// it marks a client speaking h2c with prior knowledge.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What hyper is handed in place of a refused head: the smallest request it parses. The
/// service answers it from the connection's refusal, never from its content.
const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

/// The per-request head limits (`[limits] max_request_head`, `max_request_headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Bytes of request line, header lines and the empty line ending them.
    pub max_head: usize,
    /// Header lines.
    pub max_headers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a request line; empty lines here are skipped (RFC 9112 §2.2).
    Idle,
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
    /// The head being read was refused; nothing after it is looked at.
    Refused(HeadRefusal),
}

impl State {
    fn in_head(self) -> bool {
        matches!(
            self,
            State::Idle
                | State::RequestLine
                | State::LineStart
                | State::HeadEnd
                | State::Name
                | State::Value
        )
    }
}

/// What one request head said about its framing.
#[derive(Debug, Default, Clone, Copy)]
struct Head {
    content_length: Option<u64>,
    content_length_seen: bool,
    chunked: bool,
    upgrade: bool,
}

/// Where the bytes of one [`Scanner::feed`] call stand once it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belongs to complete heads, bodies, or passes through: all may go on.
    Released,
    /// A head that is not complete yet (or was refused) starts at this offset of the slice.
    HeadFrom(usize),
    /// The slice continues a head that started in an earlier one.
    HeadContinues,
}

/// The scanner, separate from I/O so it can be tested (and fuzzed) byte by byte.
#[derive(Debug)]
pub struct Scanner {
    limits: HeadLimits,
    state: State,
    head: Head,
    /// Bytes of the current head so far.
    head_len: usize,
    /// Header lines of the current head so far.
    header_lines: usize,
    /// Heads completed on this connection (the next one's number).
    heads_done: u32,
    /// Offset in the slice being fed from which head bytes are not counted yet.
    counted_from: usize,
    name: [u8; NAME_CAP],
    name_len: usize,
    /// The header whose value is being read is Content-Length.
    in_content_length: bool,
    value: u64,
}

impl Scanner {
    pub fn new(limits: HeadLimits) -> Self {
        Scanner {
            limits,
            state: State::Idle,
            head: Head::default(),
            head_len: 0,
            header_lines: 0,
            heads_done: 0,
            counted_from: 0,
            name: [0; NAME_CAP],
            name_len: 0,
            in_content_length: false,
            value: 0,
        }
    }

    /// Refuses the head being read (a decision made outside the scanner).
    pub fn refuse(&mut self, refusal: HeadRefusal) {
        self.state = State::Refused(refusal);
    }

    /// True while a head is expected or being read.
    pub fn in_head(&self) -> bool {
        self.state.in_head()
    }

    /// Bytes of the head being read so far (0 before its first byte).
    pub fn head_len(&self) -> usize {
        if self.in_head() {
            self.head_len
        } else {
            0
        }
    }

    /// The refusal of the head being read, if it was refused.
    pub fn refusal(&self) -> Option<HeadRefusal> {
        match self.state {
            State::Refused(r) => Some(r),
            _ => None,
        }
    }

    /// Heads completed so far; a refused head gets this number.
    pub fn heads_done(&self) -> u32 {
        self.heads_done
    }

    /// Follows `bytes` (just read, in order) and says which of them may go on to hyper.
    pub fn feed(&mut self, bytes: &[u8]) -> Tail {
        let mut tail = if self.in_head() {
            Tail::HeadContinues
        } else {
            Tail::Released
        };
        // Head bytes are counted in bulk: at a head's end and at the end of the slice, which
        // decides exactly as counting byte by byte would (nothing is released in between).
        self.counted_from = 0;
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                // Whatever hyper will refuse on its own, and what follows an upgrade, passes.
                State::Off => return Tail::Released,
                State::Refused(_) => return tail,
                State::Body(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    if left == take {
                        self.start_head(&mut tail, i);
                    } else {
                        self.state = State::Body(left - take);
                    }
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
                match bytes[i..].iter().position(|&b| b == b'\n') {
                    Some(n) => i += n,
                    None => break,
                }
            }
            self.step(bytes[i], &mut tail, i + 1);
            i += 1;
        }
        match self.state {
            State::Off => Tail::Released,
            _ if self.in_head() => {
                self.count_head_bytes(bytes.len());
                tail
            }
            _ => tail,
        }
    }

    /// Counts the head's bytes of the slice up to offset `end`; true (and refused) when that
    /// makes the head too large.
    fn count_head_bytes(&mut self, end: usize) -> bool {
        self.head_len += end - self.counted_from;
        self.counted_from = end;
        if self.head_len > self.limits.max_head {
            self.state = State::Refused(HeadRefusal::TooLarge {
                limit: self.limits.max_head,
            });
            true
        } else {
            false
        }
    }

    /// A new head may start at offset `at` of the slice being fed.
    fn start_head(&mut self, tail: &mut Tail, at: usize) {
        self.state = State::Idle;
        self.head_len = 0;
        self.counted_from = at;
        self.header_lines = 0;
        *tail = Tail::HeadFrom(at);
    }

    /// Inside a line whose bytes up to its end change nothing: the scan can jump to it.
    fn only_line_end_matters(&self) -> bool {
        match self.state {
            State::RequestLine | State::ChunkExt(_) | State::Trailer => true,
            State::Value => !self.in_content_length,
            _ => false,
        }
    }

    /// One byte; `next` is the offset just after it (where a following head would start).
    fn step(&mut self, b: u8, tail: &mut Tail, next: usize) {
        self.state = match self.state {
            State::Idle => match b {
                b'\r' | b'\n' => State::Idle,
                _ => State::RequestLine,
            },
            State::RequestLine => match b {
                b'\n' => State::LineStart,
                _ => State::RequestLine,
            },
            State::LineStart => match b {
                b'\r' => State::HeadEnd,
                b'\n' => return self.end_of_head(tail, next),
                _ => {
                    self.header_lines += 1;
                    if self.header_lines > self.limits.max_headers {
                        State::Refused(HeadRefusal::TooManyHeaders {
                            limit: self.limits.max_headers,
                        })
                    } else {
                        self.name_len = 0;
                        self.push_name(b);
                        State::Name
                    }
                }
            },
            State::HeadEnd => match b {
                b'\n' => return self.end_of_head(tail, next),
                _ => State::Off,
            },
            State::Name => match b {
                b':' => self.end_of_name(),
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
                b';' | b' ' | b'\t' | b'\r' => State::ChunkExt(size),
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
                b'\n' => return self.start_head(tail, next),
                _ => State::Trailer,
            },
            State::Trailer => match b {
                b'\n' => State::TrailerStart,
                _ => State::Trailer,
            },
            // Handled in `feed`.
            State::Body(_) | State::ChunkData(_) | State::Off | State::Refused(_) => self.state,
        };
    }

    fn push_name(&mut self, b: u8) {
        if self.name_len < NAME_CAP {
            self.name[self.name_len] = b.to_ascii_lowercase();
        }
        self.name_len += 1;
    }

    fn end_of_name(&mut self) -> State {
        let name = &self.name[..self.name_len.min(NAME_CAP)];
        let exact = self.name_len <= NAME_CAP;
        self.in_content_length = false;
        match name {
            b"content-length" if exact => {
                if self.head.chunked {
                    return State::Refused(HeadRefusal::AmbiguousLength);
                }
                if self.head.content_length_seen {
                    // hyper folds equal copies into one; the upstream might not.
                    return State::Refused(HeadRefusal::DuplicateLength);
                }
                self.head.content_length_seen = true;
                self.in_content_length = true;
                self.value = 0;
            }
            b"transfer-encoding" if exact => {
                if self.head.content_length_seen {
                    return State::Refused(HeadRefusal::AmbiguousLength);
                }
                self.head.chunked = true;
            }
            b"upgrade" if exact => self.head.upgrade = true,
            _ => {}
        }
        State::Value
    }

    fn end_of_head(&mut self, tail: &mut Tail, next: usize) {
        if self.count_head_bytes(next) {
            return;
        }
        self.heads_done = self.heads_done.wrapping_add(1);
        *tail = Tail::Released;
        let head = std::mem::take(&mut self.head);
        self.state = if head.upgrade {
            // A 101 turns the stream into something else; hyper takes it from here.
            State::Off
        } else if head.chunked {
            State::ChunkSize(0)
        } else {
            match head.content_length {
                Some(0) | None => return self.start_head(tail, next),
                Some(n) => State::Body(n),
            }
        };
    }

    fn chunk_start(size: u64) -> State {
        if size == 0 {
            State::TrailerStart
        } else {
            State::ChunkData(size)
        }
    }
}

/// What a [`HeadGuard`] needs besides its stream: limits, the connection it serves, and the
/// table of connections waiting for heads.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    pub limits: HeadLimits,
    /// The connection may open with the HTTP/2 preface (a plain listener with `http2`).
    pub h2c: bool,
    pub conn: Arc<ConnContext>,
    pub pending: Arc<PendingHeads>,
    pub max_pending: usize,
}

/// A client stream whose request heads are held back until complete and checked.
#[derive(Debug)]
pub struct HeadGuard<S> {
    inner: S,
    scanner: Scanner,
    /// Bytes read but not yet handed to hyper: `held[..released]` may go, the rest is an
    /// incomplete head. Freed whenever it empties, so an idle connection holds nothing.
    held: Vec<u8>,
    released: usize,
    /// Of `held[..released]`, the bytes hyper has taken already.
    delivered: usize,
    /// The stream ended (or the connection was evicted) while a head was incomplete.
    ended: bool,
    conn: Arc<ConnContext>,
    pending: Arc<PendingHeads>,
    max_pending: usize,
    /// Present while the connection waits for a head.
    ticket: Option<Ticket>,
    /// Whether the connection is, may still be or is not HTTP/2 with prior knowledge.
    h2c: H2c,
    /// The listener serves h2c (`http2 = true` on a plain listener).
    h2c_allowed: bool,
}

/// The h2c decision: made on the first bytes, before any is scanned as HTTP/1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum H2c {
    /// HTTP/1 only (or decided so).
    No,
    /// The bytes so far are a prefix of the HTTP/2 preface.
    Undecided,
    /// The connection opened with the preface: the gate steps aside for HTTP/2.
    Yes,
}

impl<S> HeadGuard<S> {
    /// Guards `inner`; `ticket` is the connection's place among those waiting for a head, if
    /// it took one already (at accept, so TLS handshakes count too).
    pub fn new(inner: S, settings: GuardSettings, ticket: Option<Ticket>) -> Self {
        HeadGuard {
            inner,
            scanner: Scanner::new(settings.limits),
            held: Vec::new(),
            released: 0,
            delivered: 0,
            ended: false,
            conn: settings.conn,
            pending: settings.pending,
            max_pending: settings.max_pending,
            ticket,
            h2c: H2c::Undecided,
            h2c_allowed: settings.h2c,
        }
    }

    /// True when the connection opened with the HTTP/2 preface: serve it as HTTP/2 from
    /// [`HeadGuard::into_inner`] (the preface included), not through the gate.
    pub fn is_h2c(&self) -> bool {
        self.h2c == H2c::Yes
    }

    /// The stream, and any bytes read from it that hyper has not taken (after an upgrade,
    /// the first bytes of the new protocol).
    pub fn into_inner(self) -> (S, Bytes) {
        let rest = Bytes::copy_from_slice(&self.held[self.delivered..]);
        (self.inner, rest)
    }

    /// True when a head is complete (or refused) and ready for hyper.
    fn head_ready(&self) -> bool {
        self.delivered < self.released || self.ended
    }

    /// Applies the outcome of feeding `held[base..]`.
    fn after_feed(&mut self, base: usize, tail: Tail) {
        match tail {
            Tail::Released => self.released = self.held.len(),
            Tail::HeadFrom(at) => self.released = base + at,
            Tail::HeadContinues => {}
        }
        if let Some(refusal) = self.scanner.refusal() {
            // The refused head goes nowhere; hyper gets a stand-in the service refuses.
            let _ = self
                .conn
                .head_refusal
                .set((self.scanner.heads_done(), refusal));
            self.held.truncate(self.released);
            self.held.extend_from_slice(STAND_IN);
            self.released = self.held.len();
        }
        self.update_ticket();
    }

    /// Enters the table of connections waiting for a head, unless already there.
    pub fn wait_in_line(&mut self) {
        if self.ticket.is_none() && self.scanner.in_head() {
            self.ticket = Some(self.pending.enter(self.max_pending));
        }
    }

    /// A connection waits for a head from its first byte (or, for its first head, from
    /// accept) until the head is complete.
    fn update_ticket(&mut self) {
        let waiting = self.scanner.in_head() && (self.scanner.head_len() > 0);
        if !waiting {
            self.ticket = None;
        } else if self.ticket.is_none() {
            self.ticket = Some(self.pending.enter(self.max_pending));
        }
    }

    /// Hands over released bytes; false when there were none.
    fn deliver(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.delivered >= self.released {
            return false;
        }
        let n = buf.remaining().min(self.released - self.delivered);
        buf.put_slice(&self.held[self.delivered..self.delivered + n]);
        self.delivered += n;
        if self.delivered == self.released {
            self.held.drain(..self.released);
            self.released = 0;
            self.delivered = 0;
            if self.held.is_empty() {
                self.held = Vec::new();
            }
        }
        true
    }
}

impl<S: AsyncRead + Unpin> HeadGuard<S> {
    /// Waits until the first head is complete (or refused) and ready for hyper, so hyper's
    /// buffers are allocated only then. An error means the client left (or was evicted)
    /// before finishing it.
    pub async fn first_head(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_first_head(cx)).await
    }

    /// Poll form of [`HeadGuard::first_head`].
    pub fn poll_first_head(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.h2c == H2c::Yes {
                self.ticket = None;
                return Poll::Ready(Ok(()));
            }
            if self.head_ready() || !self.scanner.in_head() {
                return Poll::Ready(if self.ended && self.delivered >= self.released {
                    Err(io::ErrorKind::UnexpectedEof.into())
                } else {
                    Ok(())
                });
            }
            ready!(self.poll_fill(cx))?;
        }
    }

    /// Reads more of an incomplete head into `held`.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(ticket) = &self.ticket {
            if ticket.poll_evicted(cx).is_ready() {
                self.ended = true;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    Evicted,
                )));
            }
        }
        // Uninitialised: zeroing 4 KiB for every read would cost more than the read's copy.
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); HEAD_READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut read))?;
        let got = read.filled();
        if got.is_empty() {
            // The client left mid-head: hyper sees the end of the stream.
            self.ended = true;
            self.ticket = None;
            return Poll::Ready(Ok(()));
        }
        let mut base = self.held.len();
        self.held.extend_from_slice(got);
        if self.h2c == H2c::Undecided {
            let seen = self.held.len().min(H2_PREFACE.len());
            if self.held[..seen] != H2_PREFACE[..seen] {
                // HTTP/1 after all: everything read so far is scanned as such.
                self.h2c = H2c::No;
                base = 0;
            } else if seen == H2_PREFACE.len() && self.h2c_allowed {
                self.h2c = H2c::Yes;
                return Poll::Ready(Ok(()));
            } else if seen == H2_PREFACE.len() {
                // HTTP/2 on an HTTP/1.1 listener: answered 505 with a reason, not left to
                // hyper (which would close without a word).
                self.h2c = H2c::No;
                self.scanner.refuse(HeadRefusal::Http2Preface);
                self.after_feed(0, Tail::HeadFrom(0));
                return Poll::Ready(Ok(()));
            } else {
                return Poll::Ready(Ok(()));
            }
        }
        let tail = self.scanner.feed(&self.held[base..]);
        self.after_feed(base, tail);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.deliver(buf) || this.ended {
                return Poll::Ready(Ok(()));
            }
            if this.scanner.refusal().is_some() {
                // After a refusal's stand-in, nothing: the answer closes the connection,
                // and an end of stream now would make hyper drop that answer.
                return Poll::Pending;
            }
            if this.scanner.in_head() {
                ready!(this.poll_fill(cx))?;
                continue;
            }
            // A body, or a stream the gate no longer follows: straight into hyper's buffer.
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            if buf.filled().len() == before {
                return Poll::Ready(Ok(()));
            }
            match this.scanner.feed(&buf.filled()[before..]) {
                Tail::Released => return Poll::Ready(Ok(())),
                Tail::HeadFrom(at) => {
                    // The next head started inside this read: hold it back.
                    let split = before + at;
                    this.held.extend_from_slice(&buf.filled()[split..]);
                    buf.set_filled(split);
                    this.after_feed(0, Tail::HeadFrom(0));
                    if split > before {
                        return Poll::Ready(Ok(()));
                    }
                }
                Tail::HeadContinues => {}
            }
        }
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

/// The error a gate returns once its connection was closed to make room for newer ones.
#[derive(Debug, thiserror::Error)]
#[error("closed to make room: too many connections waiting for a request head")]
pub struct Evicted;

/// True for the error of an evicted connection, wherever it surfaced (hyper wraps it).
pub fn is_eviction(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<Evicted>()) {
                return true;
            }
        }
        if e.is::<Evicted>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Counts the requests of a connection, in the order hyper hands them to the service, and
/// returns the refusal meant for this one, if its head was refused.
pub fn take_refusal(conn: &ConnContext) -> Option<HeadRefusal> {
    let number = conn.requests.fetch_add(1, Ordering::Relaxed);
    match conn.head_refusal.get() {
        Some(&(at, refusal)) if at == number => Some(refusal),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: HeadLimits = HeadLimits {
        max_head: 64 * 1024,
        max_headers: 100,
    };

    /// Feeds `input` in pieces of `step` bytes; returns the released bytes (as a guard would
    /// hand them on, with the held part released at each head's end) and the scanner.
    fn scan(input: &[u8], step: usize, limits: HeadLimits) -> (Vec<u8>, Scanner) {
        let mut scanner = Scanner::new(limits);
        let mut held: Vec<u8> = Vec::new();
        let mut released = Vec::new();
        for chunk in input.chunks(step) {
            let base = held.len();
            held.extend_from_slice(chunk);
            let cut = match scanner.feed(chunk) {
                Tail::Released => held.len(),
                Tail::HeadFrom(at) => base + at,
                Tail::HeadContinues => 0,
            };
            released.extend(held.drain(..cut));
            if scanner.refusal().is_some() {
                break;
            }
        }
        (released, scanner)
    }

    #[test]
    fn refuses_both_framing_headers_in_either_order_at_any_split() {
        for step in 1..8 {
            for input in [
                &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            ] {
                let (released, scanner) = scan(input, step, LIMITS);
                assert!(released.is_empty(), "step {step}: released {released:?}");
                assert_eq!(scanner.refusal(), Some(HeadRefusal::AmbiguousLength));
            }
        }
    }

    #[test]
    fn refuses_content_length_twice_even_when_equal() {
        for step in [1, 4, 100] {
            let input = b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nhello";
            let (released, scanner) = scan(input, step, LIMITS);
            assert!(released.is_empty());
            assert_eq!(scanner.refusal(), Some(HeadRefusal::DuplicateLength));
        }
    }

    #[test]
    fn follows_bodies_to_the_next_request() {
        let second = b"GET /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for first in [
            &b"POST /a HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello\r\n\r\nx:"[..],
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n",
            b"\r\n\r\nGET /a HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            for step in [1, 3, 64, 4096] {
                let input = [first, &second[..]].concat();
                let (released, scanner) = scan(&input, step, LIMITS);
                assert_eq!(released, first, "step {step}");
                assert_eq!(scanner.refusal(), Some(HeadRefusal::AmbiguousLength));
                assert_eq!(scanner.heads_done(), 1);
            }
        }
    }

    #[test]
    fn an_incomplete_head_is_held_and_a_complete_one_released() {
        let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHo";
        for step in [1, 5, 100] {
            let (released, scanner) = scan(input, step, LIMITS);
            assert_eq!(
                released, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                "step {step}"
            );
            assert!(scanner.in_head());
            assert_eq!(scanner.head_len(), 22);
        }
    }

    /// A head of exactly `len` bytes with header lines padded to reach it.
    fn head_of(len: usize, headers: usize) -> Vec<u8> {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..headers {
            head.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        let pad = len - head.len() - 2;
        let last = headers.saturating_sub(1);
        // Grow the last header's value (or the target when there are no headers) to fit.
        let at = if headers == 0 {
            b"GET /".len()
        } else {
            head.len() - b"\r\n".len()
        };
        let filler = if headers == 0 { b'a' } else { b'x' };
        let _ = last;
        head.splice(at..at, std::iter::repeat_n(filler, pad));
        head.extend_from_slice(b"\r\n");
        assert_eq!(head.len(), len);
        head
    }

    #[test]
    fn head_size_is_counted_exactly_at_any_split() {
        let limits = HeadLimits {
            max_head: 2048,
            max_headers: 100,
        };
        for step in [1, 7, 2048, 4096] {
            let exact = head_of(2048, 3);
            let (released, scanner) = scan(&exact, step, limits);
            assert_eq!(released, exact, "step {step}");
            assert_eq!(scanner.refusal(), None);

            let over = head_of(2049, 3);
            let (released, scanner) = scan(&over, step, limits);
            assert!(released.is_empty());
            assert_eq!(
                scanner.refusal(),
                Some(HeadRefusal::TooLarge { limit: 2048 }),
                "step {step}"
            );
            // A request line alone can be too large too.
            let (_, scanner) = scan(&head_of(2049, 0), step, limits);
            assert_eq!(
                scanner.refusal(),
                Some(HeadRefusal::TooLarge { limit: 2048 })
            );
        }
    }

    #[test]
    fn header_lines_are_counted_exactly() {
        let limits = HeadLimits {
            max_head: 64 * 1024,
            max_headers: 10,
        };
        let (released, scanner) = scan(&head_of(400, 10), 3, limits);
        assert_eq!(released.len(), 400);
        assert_eq!(scanner.refusal(), None);
        let (released, scanner) = scan(&head_of(400, 11), 3, limits);
        assert!(released.is_empty());
        assert_eq!(
            scanner.refusal(),
            Some(HeadRefusal::TooManyHeaders { limit: 10 })
        );
    }

    #[test]
    fn steps_aside_after_an_upgrade_request() {
        let input = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x01\x05content-length: 1\r\ntransfer-encoding: x\r\n";
        let (released, scanner) = scan(input, 5, LIMITS);
        assert_eq!(released, input);
        assert_eq!(scanner.refusal(), None);
        assert!(!scanner.in_head());
    }

    #[test]
    fn malformed_heads_pass_to_hyper_which_refuses_them() {
        let input = b"GET / HTTP/1.1\r\nno colon here\r\n";
        let (released, _) = scan(input, 4, LIMITS);
        assert_eq!(released, input);
    }

    fn guard(
        io: tokio::io::DuplexStream,
        limits: HeadLimits,
    ) -> HeadGuard<tokio::io::DuplexStream> {
        let conn = Arc::new(ConnContext::new(
            Arc::from("test"),
            "127.0.0.1:1".parse().unwrap(),
            false,
        ));
        let pending = Arc::new(PendingHeads::default());
        let settings = GuardSettings {
            limits,
            h2c: false,
            conn,
            pending: pending.clone(),
            max_pending: 10,
        };
        let ticket = pending.enter(10);
        HeadGuard::new(io, settings, Some(ticket))
    }

    async fn read_some(guard: &mut HeadGuard<tokio::io::DuplexStream>) -> Vec<u8> {
        let mut buf = vec![0; 8192];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), guard.read(&mut buf))
            .await
            .expect("read timed out")
            .expect("read failed");
        buf.truncate(n);
        buf
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_head_is_waited_for_then_released_whole() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut guard = guard(server, LIMITS);
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for (i, byte) in head.iter().enumerate() {
            client.write_all(&[*byte]).await.unwrap();
            tokio::task::yield_now().await;
            let waiting =
                tokio::time::timeout(std::time::Duration::from_millis(1), guard.first_head()).await;
            assert_eq!(waiting.is_ok(), i + 1 == head.len(), "after byte {i}");
            assert_eq!(guard.pending.len(), usize::from(i + 1 < head.len()));
        }
        assert_eq!(read_some(&mut guard).await, head);
        assert!(guard.held.capacity() == 0, "an emptied buffer is freed");
    }

    #[tokio::test]
    async fn a_refused_head_becomes_a_stand_in_and_the_refusal_is_recorded() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let limits = HeadLimits {
            max_head: 1024,
            max_headers: 100,
        };
        let mut guard = guard(server, limits);
        let ok = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n";
        client.write_all(ok).await.unwrap();
        client.write_all(&head_of(1025, 2)).await.unwrap();
        guard.first_head().await.unwrap();
        // Both arrived in one read: the first head and, in place of the second, the stand-in.
        assert_eq!(read_some(&mut guard).await, [&ok[..], STAND_IN].concat());
        assert_eq!(
            guard.conn.head_refusal.get(),
            Some(&(1, HeadRefusal::TooLarge { limit: 1024 }))
        );
        assert_eq!(take_refusal(&guard.conn), None, "request 0 was fine");
        assert_eq!(
            take_refusal(&guard.conn),
            Some(HeadRefusal::TooLarge { limit: 1024 })
        );
    }

    #[tokio::test]
    async fn bodies_pass_through_and_the_next_head_is_held() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut guard = guard(server, LIMITS);
        let first = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n";
        client.write_all(first).await.unwrap();
        guard.first_head().await.unwrap();
        assert_eq!(read_some(&mut guard).await, first);
        assert!(guard.pending.is_empty(), "a complete head leaves the table");
        client.write_all(b"bodyGET /2 HT").await.unwrap();
        assert_eq!(read_some(&mut guard).await, b"body");
        assert_eq!(guard.pending.len(), 1, "a started head waits again");
        client.write_all(b"TP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(read_some(&mut guard).await, b"GET /2 HTTP/1.1\r\n\r\n");
        assert!(guard.pending.is_empty());
    }

    #[tokio::test]
    async fn bytes_after_an_upgrade_head_come_back_with_the_stream() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut guard = guard(server, LIMITS);
        let head = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        client
            .write_all(&[&head[..], b"\x81\x00"].concat())
            .await
            .unwrap();
        guard.first_head().await.unwrap();
        let mut small = vec![0; head.len()];
        guard.read_exact(&mut small).await.unwrap();
        assert_eq!(small, head);
        let (_, rest) = guard.into_inner();
        assert_eq!(&rest[..], b"\x81\x00");
    }

    #[tokio::test]
    async fn an_evicted_connection_stops_waiting() {
        let (_client, server) = tokio::io::duplex(1 << 16);
        let guard_one = guard(server, LIMITS);
        let pending = guard_one.pending.clone();
        let mut guard_one = guard_one;
        // Fill the table (max 10) with newer connections: the guard's ticket is the oldest.
        let newer: Vec<_> = (0..10).map(|_| pending.enter(10)).collect();
        let e = guard_one.first_head().await.unwrap_err();
        assert!(is_eviction(&e), "{e}");
        assert_eq!(pending.len(), 10);
        drop(newer);
    }
}
