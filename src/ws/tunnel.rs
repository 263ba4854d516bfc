//! The frame-aware relay between a client and an upstream.
//!
//! Each direction reads into a borrowed buffer, parses frame headers as they arrive and
//! writes the same bytes out unchanged (masks included) in one write per read batch; the
//! payload is copied once, by the read. wsgate's own frames (keepalive pings, close frames)
//! are written only on frame boundaries of the outgoing stream. A direction reads only once
//! everything it read before is written (backpressure), and returns its buffer to the pool
//! whenever its source has nothing to read, so an idle tunnel holds no buffer.
//!
//! The whole tunnel is one hand-written future: both directions, the keepalive timers and
//! the close handshake share one task and one timer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Duration, Instant, Sleep};

use crate::config::{Limits, Rate, Timeouts};
use crate::metrics;
use crate::ws::buffer::RelayBuf;
use crate::ws::codec::{self, Decoder, FrameError, OpCode, Role, RsvPolicy, MAX_CONTROL_FRAME};
use crate::ws::keepalive::{Keepalive, KeepaliveAction};
use crate::ws::record::{CloseRequest, ConnRecord, Direction, Initiator};
use crate::ws::splice::{self, Flow, Pipe, SpliceIo, SPLICE_MIN_FRAME, SPLICE_MIN_REST};

/// How long a closing tunnel keeps reading (and discarding) after shutting its sockets, so
/// unread input does not turn the close into a TCP reset that could destroy the close frame
/// the peer has not read yet (nginx's lingering close).
const LINGER: Duration = Duration::from_secs(2);

/// The code reported for a close frame that carried none (RFC 6455 §7.1.5).
const NO_STATUS_RECEIVED: u16 = 1005;

/// Room for the control frames wsgate may queue on one output: a keepalive ping and a close.
const INJECT_CAPACITY: usize = 2 * MAX_CONTROL_FRAME;

/// Frames counted per opcode, indexed by [`opcode_index`] (the order of [`metrics::OPCODES`]).
/// `u32` is plenty: counts are flushed once per wake-up, which reads at most
/// `MAX_TURNS_PER_POLL` buffers of 32 KiB (at most half a million frames).
pub type OpcodeCounts = [u32; 6];

fn opcode_index(op: OpCode) -> usize {
    match op {
        OpCode::Continuation => 0,
        OpCode::Text => 1,
        OpCode::Binary => 2,
        OpCode::Close => 3,
        OpCode::Ping => 4,
        OpCode::Pong => 5,
    }
}

/// How a tunnel ended. Bytes, frames and the ping round trip are in the connection record.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Who sent the first close frame (or dropped first).
    pub initiator: Initiator,
    /// The first close frame's code (1005 when it carried none); `None` when the connection
    /// was dropped without one.
    pub code: Option<u16>,
    pub reason: String,
    pub pong_timeouts: u64,
    pub idle_timeouts: u64,
    /// How the client's side ended, then the upstream's.
    pub client_end: SideEnd,
    pub upstream_end: SideEnd,
}

/// How one side of a tunnel ended, for the access log: an operator can tell a client's
/// reset from a NAT's silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SideEnd {
    /// It sent a close frame.
    Close,
    /// It closed its socket without a close frame.
    Eof,
    /// Its socket failed (a reset).
    Reset,
    /// It broke the protocol (or a limit) and wsgate closed it.
    Protocol,
    /// It went silent: a ping or idle timeout.
    Timeout,
    /// Neither: wsgate ended it (an operator, a drain, the other side, a close wait).
    Closed,
}

impl SideEnd {
    pub fn label(self) -> &'static str {
        match self {
            SideEnd::Close => "close",
            SideEnd::Eof => "eof",
            SideEnd::Reset => "reset",
            SideEnd::Protocol => "protocol",
            SideEnd::Timeout => "timeout",
            SideEnd::Closed => "closed",
        }
    }
}

/// Per-connection settings, fixed when the tunnel starts.
#[derive(Debug, Clone, Copy)]
pub struct TunnelSettings {
    pub timeouts: Timeouts,
    pub max_frame_size: u64,
    pub max_frame_rate: Option<Rate>,
    /// Large frames between two plain TCP sockets may be spliced (see [`splice`]).
    pub splice: bool,
    /// The RSV bits the extensions agreed in the 101 allow, both ways.
    pub rsv: RsvPolicy,
}

impl TunnelSettings {
    /// A route's timeouts, the `[limits]` and the `[runtime] splice` switch in force; no
    /// extension agreed (see [`TunnelSettings::with_extensions`]).
    pub fn new(timeouts: Timeouts, limits: &Limits, splice: bool) -> Self {
        TunnelSettings {
            timeouts,
            max_frame_size: limits.max_frame_size,
            max_frame_rate: limits.max_frame_rate,
            splice,
            rsv: RsvPolicy::NoExtension,
        }
    }
}

impl TunnelSettings {
    /// The same settings for a tunnel whose 101 agreed these extensions
    /// (`Sec-WebSocket-Extensions` values).
    pub fn with_extensions<'a>(mut self, agreed: impl IntoIterator<Item = &'a str>) -> Self {
        self.rsv = RsvPolicy::from_agreed(agreed);
        self
    }
}

/// A close wsgate writes into one output stream.
#[derive(Debug, Clone, Copy)]
struct CloseFrame {
    code: u16,
    reason: &'static str,
}

/// Control frames queued for one output, written at its next frame boundary. Boxed and
/// only present while frames wait, so an idle tunnel does not carry the room for them.
struct Inject {
    bytes: [u8; INJECT_CAPACITY],
    len: usize,
    written: usize,
    /// The queue holds a close frame: when it is written, this output is closed.
    has_close: bool,
}

impl Inject {
    fn pending(&self) -> bool {
        self.written < self.len
    }
}

/// What one direction noticed while reading, for the tunnel to act on.
#[derive(Debug, Default)]
struct Events {
    /// Any frame arrived (keepalive).
    heard: bool,
    /// A data frame arrived (idle timer).
    data: bool,
    /// wsgate's own pong arrived, with its round trip.
    pong_rtt: Option<Duration>,
}

/// One direction: reads `src`, writes `dst`.
struct Half {
    direction: Direction,
    decoder: Decoder,
    /// Borrowed while bytes are in flight; `[0, wpos)` written, `[wpos, scan)` approved
    /// for writing, `[scan, filled)` read but not yet parsed (a partial header or control frame).
    buf: Option<RelayBuf>,
    wpos: usize,
    scan: usize,
    filled: usize,
    /// Payload bytes of the current data frame still to come.
    frame_left: u64,
    inject: Option<Box<Inject>>,
    /// wsgate queued a close on this output: nothing else may be queued after it.
    close_queued: bool,
    /// wsgate's close went out on `dst`: whatever `src` still sends is read and dropped.
    discarding: bool,
    /// A close frame (forwarded or wsgate's) was written or approved towards `dst`.
    dst_closed: bool,
    /// `src` has nothing more to say: it sent a close frame, EOF, an error, or broke the protocol.
    src_done: bool,
    /// `src` sent a close frame: its code (1005 for a close frame without one).
    src_close: Option<u16>,
    /// `src` ended without a close frame (EOF or error).
    src_dropped: bool,
    /// `src` reached EOF or failed.
    src_eof: bool,
    /// `src` failed with an error (a reset) rather than an orderly end.
    src_reset: bool,
    /// `src` broke the protocol or a limit.
    violation: Option<Violation>,
    /// Bytes read past the handshake that did not fit the first buffer (rare: boxed).
    early: Option<Box<Bytes>>,
    /// Bytes not yet added to the connection record and metrics.
    unflushed_bytes: u64,
    /// Of those, bytes that were spliced.
    unflushed_spliced: u32,
    /// Frames per opcode not yet added to the connection record and metrics.
    unflushed_frames: OpcodeCounts,
    /// Writing to `dst` failed: the peer is gone.
    dst_failed: bool,
    /// Shut down after the tunnel finished.
    dst_shut: bool,
    /// `src` said "nothing now" during this wake-up (its waker is registered): no need to
    /// ask it again until the next one.
    src_quiet: bool,
    /// Frame-rate limiter (client direction only).
    /// Boxed: only client directions with a `max_frame_rate` have one, and the tunnel
    /// stays small enough for the allocator's fastest size classes.
    rate: Option<Box<TokenBucket>>,
    /// Both sockets are plain TCP and splicing is on: large frames may bypass `buf`.
    splice_capable: bool,
    /// The last data frame was large: the next header is peeked, and a large frame spliced.
    splice_hint: bool,
    /// Bytes of the frame being spliced (header included) still to move from `src` to the pipe.
    splice_left: u64,
    /// Of those, header bytes (a frame is handed to the ordinary path only past its header).
    splice_header: u8,
    /// Borrowed while a spliced frame is in flight; holds `piped` bytes not yet written to `dst`.
    pipe: Option<Pipe>,
    piped: usize,
}

/// What the splice path did in one read step.
enum SpliceStep {
    /// `src` has nothing now (its waker is registered).
    Pending,
    /// Bytes moved, or the input ended or broke a rule.
    Progress,
    /// Not a frame to splice (small, control, incomplete header, no pipe): read it as usual.
    Declined,
}

impl Half {
    fn new(
        direction: Direction,
        role: Role,
        max_payload: u64,
        rate: Option<Rate>,
        rsv: RsvPolicy,
        now: Instant,
    ) -> Self {
        Half {
            direction,
            decoder: Decoder::new(role, max_payload).with_rsv(rsv),
            buf: None,
            wpos: 0,
            scan: 0,
            filled: 0,
            frame_left: 0,
            inject: None,
            close_queued: false,
            discarding: false,
            dst_closed: false,
            src_done: false,
            src_close: None,
            src_dropped: false,
            src_eof: false,
            violation: None,
            src_reset: false,
            early: None,
            unflushed_bytes: 0,
            unflushed_spliced: 0,
            unflushed_frames: [0; 6],
            dst_failed: false,
            dst_shut: false,
            src_quiet: false,
            rate: rate.map(|r| Box::new(TokenBucket::new(r, now))),
            splice_capable: false,
            splice_hint: false,
            splice_left: 0,
            splice_header: 0,
            pipe: None,
            piped: 0,
        }
    }

    /// Bytes already read before the tunnel started (hyper may read past the handshake).
    fn prefill(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.early = Some(Box::new(bytes));
        self.take_early();
    }

    /// Moves early bytes into the relay buffer, as many as fit. Anything left (more than a
    /// whole buffer arrived with the handshake) stays for the next turn, instead of the
    /// socket being read.
    fn take_early(&mut self) {
        let Some(mut early) = self.early.take() else {
            return;
        };
        let buf = self.buf.get_or_insert_with(RelayBuf::take);
        let n = early.len().min(buf.len() - self.filled);
        buf[self.filled..self.filled + n].copy_from_slice(&early[..n]);
        self.filled += n;
        let rest = early.split_off(n);
        // Keep a slice only when something is left: it pins hyper's whole read buffer.
        self.early = (!rest.is_empty()).then(|| Box::new(rest));
    }

    fn inject_pending(&self) -> bool {
        self.inject.as_ref().is_some_and(|i| i.pending())
    }

    /// Queues a control frame of wsgate's for this output; ignored once a close is queued.
    fn queue(&mut self, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
        if self.close_queued {
            return;
        }
        let inject = self.inject.get_or_insert_with(|| {
            Box::new(Inject {
                bytes: [0; INJECT_CAPACITY],
                len: 0,
                written: 0,
                has_close: false,
            })
        });
        if inject.len + MAX_CONTROL_FRAME > INJECT_CAPACITY {
            return;
        }
        let mut frame = [0u8; MAX_CONTROL_FRAME];
        let n = codec::encode_control(opcode, payload, mask, &mut frame);
        inject.bytes[inject.len..inject.len + n].copy_from_slice(&frame[..n]);
        inject.len += n;
        if opcode == OpCode::Close {
            inject.has_close = true;
            self.close_queued = true;
        }
    }

    /// Between two frames of the input (bytes may still wait in the pipe).
    fn at_boundary(&self) -> bool {
        self.frame_left == 0 && self.splice_left == 0
    }

    /// Whether everything approved and queued is written (or can never be: `dst` failed, or
    /// `src` ended in the middle of a frame so no boundary will come for wsgate's frames).
    fn flushed(&self) -> bool {
        self.wpos == self.scan
            && self.piped == 0
            && (!self.inject_pending() || self.dst_failed || (self.src_done && !self.at_boundary()))
    }

    /// Reading waits until everything approved is written and no queued frame of wsgate's
    /// could go out now; a queued frame waiting for a boundary needs more input to get one.
    fn can_read(&self) -> bool {
        self.wpos == self.scan
            && self.piped == 0
            && (self.dst_failed || !self.inject_pending() || !self.at_boundary())
    }

    /// Writes approved bytes, then queued control frames at a frame boundary.
    /// Returns whether anything was written (or failed).
    fn poll_write<W: AsyncWrite + SpliceIo + Unpin>(
        &mut self,
        dst: &mut W,
        cx: &mut Context<'_>,
    ) -> bool {
        if self.dst_failed {
            let progressed = self.wpos != self.scan || self.piped > 0;
            self.wpos = self.scan;
            self.drop_pipe();
            return progressed;
        }
        let mut progressed = false;
        loop {
            if self.piped > 0 {
                let (Some(pipe), Some(tcp)) = (self.pipe.as_ref(), dst.tcp()) else {
                    self.dst_failed = true;
                    self.drop_pipe();
                    return true;
                };
                match splice::poll_splice(tcp, cx, pipe, Flow::Out, self.piped) {
                    Poll::Pending => return progressed,
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        self.dst_failed = true;
                        self.drop_pipe();
                        return true;
                    }
                    Poll::Ready(Ok(n)) => {
                        progressed = true;
                        self.piped -= n.min(self.piped);
                    }
                }
            } else if self.wpos < self.scan {
                let Some(buf) = self.buf.as_ref() else {
                    self.wpos = self.scan;
                    continue;
                };
                let Poll::Ready(result) =
                    Pin::new(&mut *dst).poll_write(cx, &buf[self.wpos..self.scan])
                else {
                    return progressed;
                };
                progressed = true;
                match result {
                    Ok(0) | Err(_) => {
                        self.dst_failed = true;
                        self.wpos = self.scan;
                        return true;
                    }
                    Ok(n) => self.wpos += n,
                }
            } else if self.inject_pending() && self.at_boundary() {
                let Some(inject) = self.inject.as_mut() else {
                    continue;
                };
                let Poll::Ready(result) =
                    Pin::new(&mut *dst).poll_write(cx, &inject.bytes[inject.written..inject.len])
                else {
                    return progressed;
                };
                progressed = true;
                match result {
                    Ok(0) | Err(_) => {
                        self.dst_failed = true;
                        return true;
                    }
                    Ok(n) => {
                        inject.written += n;
                        if !inject.pending() {
                            if inject.has_close {
                                self.dst_closed = true;
                                self.discarding = true;
                            }
                            self.inject = None;
                        }
                    }
                }
            } else {
                return progressed;
            }
        }
    }

    /// Reads once from `src` (when everything before is written) and parses what came.
    /// Returns whether anything happened.
    fn poll_read<R: AsyncRead + SpliceIo + Unpin>(
        &mut self,
        src: &mut R,
        cx: &mut Context<'_>,
        keepalive: &mut Keepalive,
        now: Instant,
        events: &mut Events,
    ) -> bool {
        if self.src_done || !self.can_read() {
            return false;
        }
        // Everything approved is written: move the unparsed tail (< one control frame) to the front.
        if self.scan > 0 {
            if let Some(buf) = self.buf.as_mut() {
                buf.copy_within(self.scan..self.filled, 0);
            }
            self.filled -= self.scan;
            self.wpos = 0;
            self.scan = 0;
        }
        // Bytes left unparsed last time (behind a queued close, say) come first.
        if self.filled > 0 {
            let before = (self.scan, self.filled);
            self.parse(keepalive, now, events);
            if (self.scan, self.filled) != before || self.src_done {
                return true;
            }
        }
        if self.early.is_some() {
            self.take_early();
            self.parse(keepalive, now, events);
            return true;
        }
        if self.src_quiet {
            return false;
        }
        // Cheapest tests first: small frames fail the first group at once.
        if (self.splice_left > 0
            || (self.splice_hint && self.frame_left == 0)
            || self.frame_left >= SPLICE_MIN_REST)
            && self.filled == 0
            && !self.discarding
            && self.splice_capable
        {
            if let Some(tcp) = src.tcp() {
                match self.poll_splice_in(tcp, cx, now, events) {
                    SpliceStep::Pending => {
                        self.src_quiet = true;
                        return false;
                    }
                    SpliceStep::Progress => return true,
                    SpliceStep::Declined => {}
                }
            }
        }
        let buf = self.buf.get_or_insert_with(RelayBuf::take);
        let mut read_buf = ReadBuf::new(&mut buf[self.filled..]);
        match Pin::new(&mut *src).poll_read(cx, &mut read_buf) {
            // The buffer stays until the tunnel sleeps (`release_idle_buf`): a busy tunnel
            // reads again in the next turn.
            Poll::Pending => {
                self.src_quiet = true;
                false
            }
            Poll::Ready(Ok(())) if read_buf.filled().is_empty() => {
                self.end_of_input();
                true
            }
            Poll::Ready(Ok(())) => {
                let n = read_buf.filled().len();
                self.filled += n;
                self.parse(keepalive, now, events);
                true
            }
            Poll::Ready(Err(_)) => {
                self.src_reset = true;
                self.end_of_input();
                true
            }
        }
    }

    /// The splice path: the next frame, when it is a large data frame, moves from `src` into
    /// a pipe without entering wsgate's memory; `poll_write` moves it on to `dst`.
    fn poll_splice_in(
        &mut self,
        src: &tokio::net::TcpStream,
        cx: &mut Context<'_>,
        now: Instant,
        events: &mut Events,
    ) -> SpliceStep {
        if self.pipe.is_none() {
            match Pipe::take() {
                Ok(pipe) => self.pipe = Some(pipe),
                // Out of descriptors, say: the relay buffer still works.
                Err(_) => return SpliceStep::Declined,
            }
        }
        let mut started = false;
        if self.frame_left > 0 {
            // The rest of a frame whose header went through the buffer: at least
            // SPLICE_MIN_REST bytes of payload, so splicing it costs no more system calls
            // than reading and writing it.
            self.splice_left = self.frame_left;
            self.splice_header = 0;
            self.frame_left = 0;
        } else if self.splice_left == 0 {
            let mut head = [0u8; codec::MAX_HEADER_LEN];
            let n = match splice::poll_peek(src, cx, &mut head) {
                Poll::Pending => return SpliceStep::Pending,
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(_)) => return SpliceStep::Declined,
            };
            // Parsed on a copy: a frame the ordinary path reads is parsed again there.
            let mut decoder = self.decoder.clone();
            let header = match decoder.parse_header(&head[..n]) {
                Ok(Some(h))
                    if !h.opcode.is_control()
                        && u64::from(h.header_len) + h.payload_len >= SPLICE_MIN_FRAME =>
                {
                    h
                }
                Ok(Some(_)) => {
                    self.splice_hint = false;
                    return SpliceStep::Declined;
                }
                // End of input, an incomplete header or a broken one: the ordinary read
                // reports it.
                Ok(None) | Err(_) => return SpliceStep::Declined,
            };
            if !self.accept_data_frame(header.opcode, now, events) {
                return SpliceStep::Progress;
            }
            self.decoder = decoder;
            self.splice_left = u64::from(header.header_len) + header.payload_len;
            self.splice_header = header.header_len;
            started = true;
        }
        let Some(pipe) = self.pipe.as_ref() else {
            return SpliceStep::Declined;
        };
        let len = self.splice_left.min(pipe.capacity() as u64) as usize;
        match splice::poll_splice(src, cx, pipe, Flow::In, len) {
            Poll::Pending if started => {
                self.src_quiet = true;
                SpliceStep::Progress
            }
            Poll::Pending => SpliceStep::Pending,
            Poll::Ready(Ok(0)) => {
                self.end_of_input();
                SpliceStep::Progress
            }
            Poll::Ready(Err(_)) => {
                self.src_reset = true;
                self.end_of_input();
                SpliceStep::Progress
            }
            Poll::Ready(Ok(n)) => {
                let n = n.min(len);
                self.splice_left -= n as u64;
                self.splice_header -= n.min(usize::from(self.splice_header)) as u8;
                self.piped += n;
                self.unflushed_bytes += n as u64;
                // At most MAX_TURNS_PER_POLL pipe loads between two flushes.
                self.unflushed_spliced = self.unflushed_spliced.saturating_add(n as u32);
                SpliceStep::Progress
            }
        }
    }

    /// `dst` failed: bytes in the pipe can never be written, and the pipe is not reusable.
    fn drop_pipe(&mut self) {
        self.piped = 0;
        self.pipe = None;
    }

    /// Nothing in flight: the buffer and the pipe go back to their pools while the source
    /// is quiet.
    fn release_idle_buf(&mut self) {
        if self.filled == 0 {
            self.buf = None;
        }
        if self.pipe.is_some() {
            self.release_idle_pipe();
        }
    }

    #[cold]
    fn release_idle_pipe(&mut self) {
        if self.piped == 0 {
            if self.splice_left > 0 && self.splice_header == 0 {
                // Only payload is left of the frame being spliced: the ordinary path takes
                // it over, so a sender pausing mid-frame does not hold two descriptors.
                self.frame_left = self.splice_left;
                self.splice_left = 0;
            }
            if self.splice_left == 0 {
                if let Some(pipe) = self.pipe.take() {
                    pipe.put_back();
                }
            }
        }
    }

    fn end_of_input(&mut self) {
        self.src_done = true;
        self.src_eof = true;
        if self.src_close.is_none() {
            self.src_dropped = true;
        }
        // An unfinished partial frame can never be completed; drop it.
        self.filled = self.scan;
    }

    /// Parses frames in `[scan, filled)`, approving whole headers, payload as it arrives and
    /// whole control frames; consumes wsgate's own pongs.
    fn parse(&mut self, keepalive: &mut Keepalive, now: Instant, events: &mut Events) {
        // Out of `self` while parsing, so the frame bookkeeping below can borrow `self`.
        let Some(mut buf) = self.buf.take() else {
            return;
        };
        self.parse_frames(&mut buf, keepalive, now, events);
        self.buf = Some(buf);
    }

    /// Counts a data frame and charges the frame-rate limiter. Over the limit, the input
    /// is done (with a violation) and the answer is false.
    fn accept_data_frame(&mut self, opcode: OpCode, now: Instant, events: &mut Events) -> bool {
        if let Some(bucket) = self.rate.as_mut() {
            if !bucket.take(now) {
                self.violation = Some(Violation::RateLimit);
                self.src_done = true;
                return false;
            }
        }
        self.unflushed_frames[opcode_index(opcode)] += 1;
        events.heard = true;
        events.data = true;
        true
    }

    fn parse_frames(
        &mut self,
        buf: &mut RelayBuf,
        keepalive: &mut Keepalive,
        now: Instant,
        events: &mut Events,
    ) {
        let batch_start = self.scan;
        loop {
            if self.frame_left > 0 {
                let available = (self.filled - self.scan) as u64;
                let take = available.min(self.frame_left);
                self.scan += take as usize;
                self.frame_left -= take;
                if self.frame_left > 0 {
                    break;
                }
                continue;
            }
            if self.scan == self.filled {
                break;
            }
            // At a boundary with wsgate's own frames queued: stop here so they go out next,
            // even while the peer streams large frames back to back.
            if self.inject.as_ref().is_some_and(|i| i.pending()) && !self.discarding {
                break;
            }
            let header = match self.decoder.parse_header(&buf[self.scan..self.filled]) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err(e) => {
                    self.violation = Some(Violation::Frame(e));
                    self.src_done = true;
                    self.filled = self.scan;
                    break;
                }
            };
            let header_len = header.header_len as usize;
            if header.opcode.is_control() {
                let total = header_len + header.payload_len as usize;
                if self.filled - self.scan < total {
                    // Wait for the whole control frame; the codec keeps no state for these.
                    break;
                }
                let mut payload = [0u8; 125];
                let len = header.payload_len as usize;
                payload[..len].copy_from_slice(&buf[self.scan + header_len..self.scan + total]);
                if let Some(key) = header.mask {
                    codec::apply_mask(&mut payload[..len], key, 0);
                }
                let payload = &payload[..len];
                events.heard = true;
                if header.opcode == OpCode::Pong {
                    if let Some(rtt) = keepalive.is_our_pong(payload, now) {
                        // wsgate's own: cut out of the stream, neither relayed nor counted.
                        events.pong_rtt = Some(rtt);
                        buf.copy_within(self.scan + total..self.filled, self.scan);
                        self.filled -= total;
                        continue;
                    }
                }
                self.unflushed_frames[opcode_index(header.opcode)] += 1;
                if header.opcode == OpCode::Close {
                    match codec::parse_close_payload(payload) {
                        Ok(code) => {
                            // A close frame without a code is reported as 1005 (RFC 6455
                            // §7.1.5), telling it apart from a dropped socket.
                            self.src_close = Some(code.map_or(NO_STATUS_RECEIVED, |(c, _)| c));
                            self.src_done = true;
                            if !self.discarding {
                                self.dst_closed = true;
                            }
                            self.scan += total;
                            // Nothing may follow a close frame.
                            self.filled = self.scan;
                            break;
                        }
                        Err(e) => {
                            self.violation = Some(Violation::Frame(e));
                            self.src_done = true;
                            self.filled = self.scan;
                            break;
                        }
                    }
                }
                self.scan += total;
            } else {
                if !self.accept_data_frame(header.opcode, now, events) {
                    self.filled = self.scan;
                    break;
                }
                if self.splice_capable {
                    self.splice_hint = header_len as u64 + header.payload_len >= SPLICE_MIN_FRAME;
                }
                self.scan += header_len;
                self.frame_left = header.payload_len;
            }
        }
        let relayed = (self.scan - batch_start) as u64;
        self.unflushed_bytes += relayed;
        if self.discarding {
            // wsgate's close already went out on this output: drop what the peer still sends.
            self.wpos = self.scan;
        }
    }
}

/// Token bucket for `max_frame_rate`: burst of one period's worth.
#[derive(Debug)]
struct TokenBucket {
    capacity: f64,
    tokens: f64,
    per_second: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: Rate, now: Instant) -> Self {
        let capacity = rate.count as f64;
        TokenBucket {
            capacity,
            tokens: capacity,
            per_second: capacity / rate.per.as_secs_f64().max(f64::MIN_POSITIVE),
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A broken rule on one input.
#[derive(Debug, Clone, Copy)]
enum Violation {
    Frame(FrameError),
    RateLimit,
}

/// Where the tunnel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Relaying,
    /// Flushing and shutting both outputs.
    ShuttingDown,
    /// Reading and dropping what is left so the sockets close without a reset.
    Lingering,
    Done,
}

/// Most loop turns one poll may take before yielding to other tasks.
const MAX_TURNS_PER_POLL: u32 = 32;

/// The relay of one upgraded connection; resolves when both sockets are shut.
pub struct Tunnel<C, U> {
    client: C,
    upstream: U,
    /// Client -> upstream.
    c2u: Half,
    /// Upstream -> client.
    u2c: Half,
    client_ka: Keepalive,
    upstream_ka: Keepalive,
    settings: TunnelSettings,
    record: Arc<ConnRecord>,
    last_data: Instant,
    timer: Pin<Box<Sleep>>,
    timer_at: Instant,
    /// Set once a close started: by then both sides must be done.
    deadline: Option<Instant>,
    /// wsgate decided to close (timeouts, violations, requests).
    proxy_closing: bool,
    /// Who closed first, with what code and reason.
    first_close: Option<(Initiator, Option<u16>, &'static str)>,
    phase: Phase,
    linger_until: Option<Instant>,
    pong_timeouts: u64,
    idle_timeouts: u64,
    /// When the tunnel started, on the tokio clock.
    start_clock: Instant,
}

impl<C, U> Tunnel<C, U>
where
    C: AsyncRead + AsyncWrite + SpliceIo + Unpin,
    U: AsyncRead + AsyncWrite + SpliceIo + Unpin,
{
    /// `client_early` and `upstream_early` are bytes read past the handshake by the HTTP layer.
    pub fn new(
        client: C,
        client_early: Bytes,
        upstream: U,
        upstream_early: Bytes,
        settings: TunnelSettings,
        record: Arc<ConnRecord>,
    ) -> Self {
        let now = Instant::now();
        let t = &settings.timeouts;
        let mut c2u = Half::new(
            Direction::ClientToUpstream,
            Role::Client,
            settings.max_frame_size,
            settings.max_frame_rate,
            settings.rsv,
            now,
        );
        c2u.prefill(client_early);
        let mut u2c = Half::new(
            Direction::UpstreamToClient,
            Role::Server,
            u64::MAX,
            None,
            settings.rsv,
            now,
        );
        u2c.prefill(upstream_early);
        let splice_capable = settings.splice
            && splice::SUPPORTED
            && client.tcp().is_some()
            && upstream.tcp().is_some();
        c2u.splice_capable = splice_capable;
        u2c.splice_capable = splice_capable;
        let first = now + t.idle;
        Tunnel {
            client,
            upstream,
            c2u,
            u2c,
            client_ka: Keepalive::new(t.ping_interval, t.pong_timeout, now),
            upstream_ka: Keepalive::new(t.upstream_ping_interval, t.pong_timeout, now),
            settings,
            record,
            last_data: now,
            timer: Box::pin(tokio::time::sleep_until(first)),
            timer_at: first,
            deadline: None,
            proxy_closing: false,
            first_close: None,
            phase: Phase::Relaying,
            linger_until: None,
            pong_timeouts: 0,
            idle_timeouts: 0,
            start_clock: now,
        }
    }

    /// wsgate closes: `to_client` and `to_upstream` go out at the next frame boundaries.
    fn proxy_close(&mut self, to_client: CloseFrame, to_upstream: CloseFrame, now: Instant) {
        if self.proxy_closing {
            return;
        }
        self.proxy_closing = true;
        if self.first_close.is_none() {
            self.first_close = Some((Initiator::Proxy, Some(to_client.code), to_client.reason));
        }
        let mut payload = [0u8; 125];
        if !self.u2c.dst_closed && !self.u2c.dst_failed {
            let n = codec::close_payload(to_client.code, to_client.reason, &mut payload);
            self.u2c.queue(OpCode::Close, &payload[..n], None);
        }
        if !self.c2u.dst_closed && !self.c2u.dst_failed {
            let n = codec::close_payload(to_upstream.code, to_upstream.reason, &mut payload);
            self.c2u
                .queue(OpCode::Close, &payload[..n], Some(codec::random_mask()));
        }
        self.start_deadline(now);
    }

    fn start_deadline(&mut self, now: Instant) {
        if self.deadline.is_none() {
            self.deadline = Some(now + self.settings.timeouts.close);
        }
    }

    /// Acts on what the two directions noticed.
    fn handle_events(&mut self, client: Events, upstream: Events, now: Instant) {
        if client.heard {
            self.client_ka.heard(now);
        }
        if upstream.heard {
            self.upstream_ka.heard(now);
        }
        if client.data || upstream.data {
            self.last_data = now;
        }
        if let Some(rtt) = client.pong_rtt {
            self.record
                .ping_rtt_us
                .store(rtt.as_micros() as u64, Ordering::Relaxed);
            self.record.metrics.ping_rtt.observe(rtt.as_secs_f64());
        }
        if client.heard || upstream.heard {
            let ms = now.saturating_duration_since(self.started()).as_millis() as u64;
            self.record.last_activity_ms.store(ms, Ordering::Relaxed);
        }

        // Close frames from the peers: forwarded as they are; the other side answers.
        if let Some(code) = self.c2u.src_close {
            if self.first_close.is_none() {
                self.first_close = Some((Initiator::Client, Some(code), ""));
            }
            self.start_deadline(now);
        }
        if let Some(code) = self.u2c.src_close {
            if self.first_close.is_none() {
                self.first_close = Some((Initiator::Upstream, Some(code), ""));
            }
            self.start_deadline(now);
        }

        if let Some(v) = self.c2u.violation.take() {
            let (code, reason) = match v {
                Violation::Frame(e) => (e.close_code(), e.close_reason()),
                Violation::RateLimit => (1008, "rate limit"),
            };
            self.proxy_close(
                CloseFrame { code, reason },
                CloseFrame {
                    code: 1001,
                    reason: "client error",
                },
                now,
            );
        }
        if let Some(_v) = self.u2c.violation.take() {
            self.proxy_close(
                CloseFrame {
                    code: 1014,
                    reason: "bad gateway",
                },
                CloseFrame {
                    code: 1002,
                    reason: "protocol error",
                },
                now,
            );
        }

        // A side that vanished without a close frame.
        let client_gone =
            (self.c2u.src_dropped || self.u2c.dst_failed) && self.c2u.src_close.is_none();
        let upstream_gone =
            (self.u2c.src_dropped || self.c2u.dst_failed) && self.u2c.src_close.is_none();
        if client_gone && !self.proxy_closing {
            if self.first_close.is_none() {
                self.first_close = Some((Initiator::Client, None, "client gone"));
            }
            self.proxy_close_one_side_gone(
                CloseFrame {
                    code: 1001,
                    reason: "client gone",
                },
                Direction::ClientToUpstream,
                now,
            );
        } else if upstream_gone && !self.proxy_closing {
            if self.first_close.is_none() {
                self.first_close = Some((Initiator::Upstream, None, "upstream gone"));
            }
            self.proxy_close_one_side_gone(
                CloseFrame {
                    code: 1014,
                    reason: "bad gateway",
                },
                Direction::UpstreamToClient,
                now,
            );
        }
    }

    /// One peer vanished: tell the other one (if no close went its way yet) and stop.
    fn proxy_close_one_side_gone(&mut self, frame: CloseFrame, towards: Direction, now: Instant) {
        self.proxy_closing = true;
        let half = match towards {
            Direction::ClientToUpstream => &mut self.c2u,
            Direction::UpstreamToClient => &mut self.u2c,
        };
        if !half.dst_closed && !half.dst_failed {
            let mut payload = [0u8; 125];
            let n = codec::close_payload(frame.code, frame.reason, &mut payload);
            let mask = match towards {
                Direction::ClientToUpstream => Some(codec::random_mask()),
                Direction::UpstreamToClient => None,
            };
            half.queue(OpCode::Close, &payload[..n], mask);
        }
        // The vanished side left a frame unfinished towards the other peer: no close frame
        // can follow it, so there is nothing to wait for; both sockets are shut at once.
        let mid_frame = !half.at_boundary();
        // The vanished side will say nothing more.
        match towards {
            Direction::ClientToUpstream => self.c2u.src_done = true,
            Direction::UpstreamToClient => self.u2c.src_done = true,
        }
        if mid_frame {
            self.deadline = Some(now);
        } else {
            self.start_deadline(now);
        }
    }

    fn started(&self) -> Instant {
        self.start_clock
    }

    /// Fires the keepalive and idle timers.
    fn run_timers(&mut self, now: Instant) {
        if self.proxy_closing || self.deadline.is_some() {
            return;
        }
        match self.client_ka.poll(now) {
            KeepaliveAction::Ping(token) => {
                self.record.metrics.pings_sent.inc();
                self.u2c.queue(OpCode::Ping, &token, None)
            }
            KeepaliveAction::Dead => {
                self.pong_timeouts += 1;
                self.proxy_close(
                    CloseFrame {
                        code: 1001,
                        reason: "ping timeout",
                    },
                    CloseFrame {
                        code: 1001,
                        reason: "client unresponsive",
                    },
                    now,
                );
                return;
            }
            KeepaliveAction::None => {}
        }
        match self.upstream_ka.poll(now) {
            KeepaliveAction::Ping(token) => {
                self.record.metrics.pings_sent.inc();
                self.c2u
                    .queue(OpCode::Ping, &token, Some(codec::random_mask()))
            }
            KeepaliveAction::Dead => {
                self.proxy_close(
                    CloseFrame {
                        code: 1014,
                        reason: "upstream unresponsive",
                    },
                    CloseFrame {
                        code: 1001,
                        reason: "ping timeout",
                    },
                    now,
                );
                return;
            }
            KeepaliveAction::None => {}
        }
        if now >= self.last_data + self.settings.timeouts.idle {
            self.idle_timeouts += 1;
            let idle = CloseFrame {
                code: 1001,
                reason: "idle timeout",
            };
            self.proxy_close(idle, idle, now);
        }
    }

    /// The next instant a timer has something to do.
    fn next_deadline(&self) -> Instant {
        if let Some(deadline) = self.deadline {
            return deadline;
        }
        let mut next = self.last_data + self.settings.timeouts.idle;
        for d in [
            self.client_ka.next_deadline(),
            self.upstream_ka.next_deadline(),
        ]
        .into_iter()
        .flatten()
        {
            next = next.min(d);
        }
        next
    }

    /// Adds what was relayed since the last call to the record and the route's metrics:
    /// a handful of atomic adds per read batch, never per frame.
    fn flush_record(&mut self) {
        for half in [&mut self.c2u, &mut self.u2c] {
            let d = metrics::direction_index(half.direction);
            let route = &self.record.metrics;
            let stats = self.record.stats(half.direction);
            if half.unflushed_bytes > 0 {
                stats
                    .bytes
                    .fetch_add(half.unflushed_bytes, Ordering::Relaxed);
                route.bytes[d].inc_by(half.unflushed_bytes);
                half.unflushed_bytes = 0;
            }
            if half.unflushed_spliced > 0 {
                route.spliced_bytes[d].inc_by(u64::from(half.unflushed_spliced));
                half.unflushed_spliced = 0;
            }
            let mut total = 0;
            for (i, n) in half.unflushed_frames.iter_mut().enumerate() {
                if *n > 0 {
                    route.frames[d][i].inc_by(u64::from(*n));
                    total += u64::from(*n);
                    *n = 0;
                }
            }
            if total > 0 {
                stats.frames.fetch_add(total, Ordering::Relaxed);
            }
        }
    }

    fn outcome(&self) -> Outcome {
        let (initiator, code, reason) = self.first_close.unwrap_or((Initiator::Proxy, None, ""));
        // Which sides went silent: a ping timeout names one, an idle timeout both.
        let (client_silent, upstream_silent) = match reason {
            "ping timeout" => (true, false),
            "upstream unresponsive" => (false, true),
            "idle timeout" => (true, true),
            _ => (false, false),
        };
        let end = |half: &Half, timed_out: bool| {
            if half.src_close.is_some() {
                SideEnd::Close
            } else if half.violation.is_some() {
                SideEnd::Protocol
            } else if half.src_reset {
                SideEnd::Reset
            } else if half.src_eof && !timed_out {
                SideEnd::Eof
            } else if timed_out {
                SideEnd::Timeout
            } else {
                SideEnd::Closed
            }
        };
        Outcome {
            initiator,
            code,
            reason: reason.to_string(),
            pong_timeouts: self.pong_timeouts,
            idle_timeouts: self.idle_timeouts,
            client_end: end(&self.c2u, client_silent),
            upstream_end: end(&self.u2c, upstream_silent),
        }
    }

    /// Relaying: moves bytes both ways until nothing more can happen right now.
    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // One clock reading per wake-up: the turns below take microseconds.
        let now = Instant::now();
        if !self.proxy_closing {
            if let Some(request) = self.record.poll_close_request(cx.waker()) {
                let reason = match request {
                    CloseRequest::Operator => "closed by operator",
                    CloseRequest::Drain => "going away",
                };
                let frame = CloseFrame { code: 1001, reason };
                self.proxy_close(frame, frame, now);
            }
        }
        // Timers once per wake-up: with the clock fixed, traffic in the turns below can
        // only push their deadlines later.
        self.run_timers(now);
        self.c2u.src_quiet = false;
        self.u2c.src_quiet = false;
        let polled = self.relay_turns(cx, now);
        // Counters once per wake-up, however many turns it took.
        self.flush_record();
        if polled.is_pending() {
            // Going to sleep: a quiet direction gives its buffer back.
            self.c2u.release_idle_buf();
            self.u2c.release_idle_buf();
        }
        polled
    }

    fn relay_turns(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<()> {
        for _ in 0..MAX_TURNS_PER_POLL {
            // Read, then write what was read (and any frame of wsgate's it caused) in the same
            // turn: a message crosses in one turn, and the next only finds the sockets quiet.
            let mut from_client = Events::default();
            let mut from_upstream = Events::default();
            let mut progressed = self.c2u.poll_read(
                &mut self.client,
                cx,
                &mut self.client_ka,
                now,
                &mut from_client,
            );
            progressed |= self.u2c.poll_read(
                &mut self.upstream,
                cx,
                &mut self.upstream_ka,
                now,
                &mut from_upstream,
            );
            self.handle_events(from_client, from_upstream, now);
            progressed |= self.c2u.poll_write(&mut self.upstream, cx);
            progressed |= self.u2c.poll_write(&mut self.client, cx);

            let both_done = self.c2u.src_done && self.u2c.src_done;
            if both_done && self.c2u.flushed() && self.u2c.flushed() {
                return Poll::Ready(());
            }
            if self.deadline.is_some_and(|d| now >= d) {
                return Poll::Ready(());
            }
            if progressed {
                continue;
            }
            // Traffic only pushes deadlines later, so the timer is re-armed lazily: moved
            // earlier at once, moved later only after it fires. Busy tunnels then touch the
            // timer wheel about once per interval instead of once per read.
            let next = self.next_deadline();
            if next < self.timer_at || self.timer.is_elapsed() {
                self.timer_at = next;
                self.timer.as_mut().reset(next);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // A deadline passed: the next wake-up reads the clock and runs the timers.
            break;
        }
        // Busy, or a timer is due: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Shuts both outputs (FIN, or TLS close_notify then FIN).
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.u2c.dst_shut {
            match Pin::new(&mut self.client).poll_shutdown(cx) {
                Poll::Ready(_) => self.u2c.dst_shut = true,
                Poll::Pending => {}
            }
        }
        if !self.c2u.dst_shut {
            match Pin::new(&mut self.upstream).poll_shutdown(cx) {
                Poll::Ready(_) => self.c2u.dst_shut = true,
                Poll::Pending => {}
            }
        }
        if self.u2c.dst_shut && self.c2u.dst_shut {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Reads and drops input until both peers closed their side, so no reset is sent.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut scratch = [0u8; 512];
        if !self.c2u.src_eof {
            self.c2u.src_eof = drain_to_eof(&mut self.client, &mut scratch, cx);
        }
        if !self.u2c.src_eof {
            self.u2c.src_eof = drain_to_eof(&mut self.upstream, &mut scratch, cx);
        }
        if self.c2u.src_eof && self.u2c.src_eof {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Arms the timer for `at`; true when `at` has passed.
    fn timer_expired(&mut self, at: Instant, cx: &mut Context<'_>) -> bool {
        if at != self.timer_at {
            self.timer_at = at;
            self.timer.as_mut().reset(at);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }
}

/// Reads and drops bytes until EOF (true) or until nothing is ready (false).
fn drain_to_eof<R: AsyncRead + Unpin>(
    src: &mut R,
    scratch: &mut [u8],
    cx: &mut Context<'_>,
) -> bool {
    loop {
        let mut read_buf = ReadBuf::new(scratch);
        match Pin::new(&mut *src).poll_read(cx, &mut read_buf) {
            Poll::Ready(Ok(())) if read_buf.filled().is_empty() => return true,
            Poll::Ready(Ok(())) => continue,
            Poll::Ready(Err(_)) => return true,
            Poll::Pending => return false,
        }
    }
}

impl<C, U> Future for Tunnel<C, U>
where
    C: AsyncRead + AsyncWrite + SpliceIo + Unpin,
    U: AsyncRead + AsyncWrite + SpliceIo + Unpin,
{
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        loop {
            match this.phase {
                Phase::Relaying => {
                    // (poll_relay has flushed the counters on its way out.)
                    ready!(this.poll_relay(cx));
                    // Relay buffers are not needed any more.
                    this.c2u.buf = None;
                    this.u2c.buf = None;
                    // Both peers finished with a close frame or EOF: nothing unread is left,
                    // so dropping the sockets sends a plain FIN. Otherwise input may still
                    // arrive, and closing over it would send a reset that can destroy the
                    // close frame just written: shut down and read what is left first.
                    let finished = |h: &Half| h.src_close.is_some() || h.src_eof;
                    this.phase = if finished(&this.c2u) && finished(&this.u2c) {
                        Phase::Done
                    } else {
                        this.linger_until = Some(Instant::now() + LINGER);
                        Phase::ShuttingDown
                    };
                }
                Phase::ShuttingDown => {
                    let until = this.linger_until.unwrap_or_else(Instant::now);
                    if this.poll_shutdown(cx).is_ready() || this.timer_expired(until, cx) {
                        this.phase = Phase::Lingering;
                    } else {
                        return Poll::Pending;
                    }
                }
                Phase::Lingering => {
                    let until = this.linger_until.unwrap_or_else(Instant::now);
                    if this.poll_linger(cx).is_ready() || this.timer_expired(until, cx) {
                        this.phase = Phase::Done;
                    } else {
                        return Poll::Pending;
                    }
                }
                Phase::Done => return Poll::Ready(this.outcome()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Tunnel;
    use crate::upstream::UpstreamStream;
    use tokio::net::TcpStream;

    /// Every live WebSocket carries one boxed tunnel, most of what an idle connection costs
    /// (see docs/performance.md). At 1,032 bytes or less glibc also serves it from its
    /// per-thread cache, the cheapest malloc/free of a handshake.
    #[test]
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    fn a_proxied_tunnel_fits_the_allocators_thread_cache() {
        let size = std::mem::size_of::<Tunnel<TcpStream, UpstreamStream>>();
        assert!(
            size <= 1032,
            "Tunnel<TcpStream, UpstreamStream> is {size} bytes"
        );
    }
}
