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
use crate::ws::codec::{
    self, close_code, Decoder, FrameError, FrameHeader, OpCode, Role, RsvPolicy, Utf8Check,
    MAX_CONTROL_FRAME, MAX_CONTROL_PAYLOAD,
};
use crate::ws::keepalive::{Keepalive, KeepaliveAction};
use crate::ws::peer::{self, PeerState};
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
    /// Frames each side sent after wsgate's close went to the other (read and dropped),
    /// indexed by direction: client to upstream, then upstream to client.
    pub undeliverable: [u64; 2],
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
    /// `close_on_expiry`: milliseconds from the tunnel's start to its token's expiry
    /// (`exp` + leeway); 0 for none. Four bytes that fit the struct's padding, so a tunnel
    /// with a token costs no more than one without.
    pub expires_in_ms: u32,
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
            expires_in_ms: 0,
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

    /// The same settings for a tunnel to be closed at `expiry` (its token's `exp` plus
    /// leeway); `None` keeps it open. Past 49 days (what 32 bits of milliseconds hold) the
    /// other timeouts end a connection first in any real deployment, so none is kept.
    pub fn expiring(mut self, expiry: Option<Duration>) -> Self {
        self.expires_in_ms = match expiry {
            Some(d) => u32::try_from(d.as_millis()).map_or(0, |ms| ms.max(1)),
            None => 0,
        };
        self
    }

    fn expiry(&self) -> Option<Duration> {
        (self.expires_in_ms != 0).then(|| Duration::from_millis(u64::from(self.expires_in_ms)))
    }
}

/// A close frame wsgate writes into one output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CloseFrame {
    pub code: u16,
    pub reason: &'static str,
}

impl CloseFrame {
    const fn new(code: u16, reason: &'static str) -> Self {
        CloseFrame { code, reason }
    }
}

/// Why wsgate closes a tunnel (design.md's tunnel table, one row each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client did not answer a keepalive ping within `pong_timeout`.
    PingTimeout,
    /// The upstream did not answer a keepalive ping within `pong_timeout`.
    UpstreamUnresponsive,
    /// No data frame either way for `idle`.
    Idle,
    /// The client broke the protocol or a limit.
    Client(Violation),
    /// The upstream broke the protocol.
    Upstream(Violation),
    /// The client's connection was lost without a close frame.
    ClientGone,
    /// The upstream's connection was lost without a close frame.
    UpstreamGone,
    /// SIGTERM: the drain.
    Drain,
    /// `DELETE /connections/{id}`.
    Operator,
    /// `close_on_expiry`: the token the handshake carried expired.
    TokenExpired,
}

impl CloseReason {
    /// The close frames for this reason: to the client, then to the upstream; `None` where
    /// that side is gone and gets none.
    pub(crate) fn frames(self) -> (Option<CloseFrame>, Option<CloseFrame>) {
        use close_code::{BAD_GATEWAY, GOING_AWAY};
        const CLIENT_ERROR: CloseFrame = CloseFrame::new(GOING_AWAY, "client error");
        const BAD_GATEWAY_FRAME: CloseFrame = CloseFrame::new(BAD_GATEWAY, "bad gateway");
        let both = |frame| (Some(frame), Some(frame));
        match self {
            CloseReason::PingTimeout => (
                Some(CloseFrame::new(GOING_AWAY, "ping timeout")),
                Some(CloseFrame::new(GOING_AWAY, "client unresponsive")),
            ),
            CloseReason::UpstreamUnresponsive => (
                Some(CloseFrame::new(BAD_GATEWAY, "upstream unresponsive")),
                Some(CloseFrame::new(GOING_AWAY, "ping timeout")),
            ),
            CloseReason::Idle => both(CloseFrame::new(GOING_AWAY, "idle timeout")),
            CloseReason::Client(v) => (Some(v.close_frame()), Some(CLIENT_ERROR)),
            CloseReason::Upstream(v) => (Some(BAD_GATEWAY_FRAME), Some(v.close_frame())),
            CloseReason::ClientGone => (None, Some(CloseFrame::new(GOING_AWAY, "client gone"))),
            CloseReason::UpstreamGone => (Some(BAD_GATEWAY_FRAME), None),
            CloseReason::Drain => both(CloseFrame::new(GOING_AWAY, "going away")),
            CloseReason::Operator => both(CloseFrame::new(GOING_AWAY, "closed by operator")),
            CloseReason::TokenExpired => (
                Some(CloseFrame::new(
                    close_code::POLICY_VIOLATION,
                    "token expired",
                )),
                Some(CloseFrame::new(GOING_AWAY, "token expired")),
            ),
        }
    }

    /// Closes where the client hears first and its last messages still reach the upstream:
    /// the upstream's close is held until the client answers (or `timeouts.close` passes).
    /// The others close both sides at once: a side is gone, silent or broke a rule.
    fn client_first(self) -> bool {
        matches!(
            self,
            CloseReason::Drain
                | CloseReason::Operator
                | CloseReason::Idle
                | CloseReason::TokenExpired
        )
    }

    /// Which sides went silent: a ping timeout names one, an idle timeout both.
    fn silent(self) -> (bool, bool) {
        match self {
            CloseReason::PingTimeout => (true, false),
            CloseReason::UpstreamUnresponsive => (false, true),
            CloseReason::Idle => (true, true),
            _ => (false, false),
        }
    }
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

/// Where the peer a direction reads from stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Frames may still come.
    Open,
    /// It sent a close frame with this code (1005 for one without a code).
    Closed(u16),
    /// It ended without a close frame: EOF, or a reset.
    Dropped { reset: bool },
    /// It broke the protocol or a limit: nothing more of it is relayed.
    Violated(Violation),
    /// wsgate stopped reading it: the peer is gone (writing to it failed), or it did not
    /// answer wsgate's close in time.
    Abandoned,
}

/// Where the peer a direction writes to stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    /// Frames are relayed to it.
    Open,
    /// wsgate will close it once the source has ended (client-first closes): the source's
    /// own close frame is consumed instead of forwarded.
    CloseHeld,
    /// The source's close frame is approved for it, behind the bytes before it.
    CloseForwarded,
    /// wsgate's close frame waits for the next frame boundary; nothing is queued after it.
    CloseQueued,
    /// wsgate's close frame was written: whatever the source still sends is dropped.
    CloseSent,
    /// A frame to it was cut off unfinished (the source broke a rule inside it): no close
    /// frame can follow, and nothing more is written.
    Cut,
    /// Writing to it failed: the peer is gone.
    Failed,
}

impl Dest {
    /// Whether wsgate may still queue a close frame for it.
    fn takes_close(self) -> bool {
        matches!(self, Dest::Open | Dest::CloseHeld)
    }

    /// Whether bytes can still reach it.
    fn writable(self) -> bool {
        !matches!(self, Dest::Cut | Dest::Failed)
    }
}

/// A pipe borrowed for splicing large frames, and the frame moving through it.
struct Spliced {
    pipe: Pipe,
    /// Bytes in the pipe not yet written to `dst`.
    piped: usize,
    /// Bytes of the frame being spliced (header included) still to move from `src`.
    left: u64,
    /// Of those, header bytes (a frame is handed to the ordinary path only past its header).
    header: u8,
}

/// The UTF-8 check of the uncompressed text message a direction is in.
#[derive(Debug, Default)]
struct TextCheck {
    /// The current message is uncompressed text: its payload is checked.
    active: bool,
    /// The frame being checked is the message's last.
    fin: bool,
    /// The frame is held whole in the buffer, header at `scan`, until its payload is
    /// checked: its header length. 0: the frame is too big to hold and is checked piece
    /// by piece as it streams through.
    held_header: u8,
    /// Payload bytes of the current frame already checked (held frames: at most a buffer).
    checked: u16,
    /// The current frame's mask key (client frames); all zero (no-op) for upstream frames.
    key: [u8; 4],
    /// Payload offset of the next byte to check, modulo 4 (streamed frames).
    offset: u8,
    utf8: Utf8Check,
}

impl TextCheck {
    /// Whether a data frame with this header is checked: an uncompressed text message's
    /// frames. An extension wsgate does not know may transform payload: never checked.
    fn checks(&self, header: &FrameHeader, rsv: RsvPolicy) -> bool {
        match header.opcode {
            OpCode::Binary => false,
            OpCode::Continuation => self.active,
            OpCode::Text => match rsv {
                RsvPolicy::NoExtension => true,
                RsvPolicy::Deflate => header.rsv & codec::RSV1 == 0,
                RsvPolicy::Unknown => false,
            },
            // Control frames are not parts of messages.
            OpCode::Close | OpCode::Ping | OpCode::Pong => false,
        }
    }

    /// Checks `bytes` (masked as they came), `offset` being their position in the payload.
    fn feed(&mut self, bytes: &mut [u8], offset: u64) -> Result<(), FrameError> {
        if self.key == [0; 4] {
            return self.utf8.feed(bytes);
        }
        if !self.utf8.in_code_point() && codec::masked_is_ascii(bytes, self.key, offset) {
            return Ok(());
        }
        // Unmasked in place for the check, masked again before the bytes go out: cheaper
        // than a copy, and the bytes are in cache from the read.
        codec::apply_mask(bytes, self.key, offset);
        let checked = self.utf8.feed(bytes);
        codec::apply_mask(bytes, self.key, offset);
        checked
    }

    /// The frame is complete: ends the message when it was the last.
    fn frame_done(&mut self) -> Result<(), FrameError> {
        self.held_header = 0;
        self.checked = 0;
        if self.fin {
            self.active = false;
            self.utf8.finish()
        } else {
            Ok(())
        }
    }
}

/// One direction: reads `src`, writes `dst`.
struct Half {
    direction: Direction,
    source: Source,
    dest: Dest,
    decoder: Decoder,
    /// Borrowed while bytes are in flight; `[0, wpos)` written, `[wpos, scan)` approved
    /// for writing, `[scan, filled)` read but not yet approved (a partial header, a control
    /// frame or a held text frame).
    buf: Option<RelayBuf>,
    wpos: usize,
    scan: usize,
    filled: usize,
    /// Payload bytes of the current data frame still to approve.
    frame_left: u64,
    text: TextCheck,
    inject: Option<Box<Inject>>,
    /// Bytes read past the handshake that did not fit the first buffer (rare: boxed).
    early: Option<Box<Bytes>>,
    /// Bytes not yet added to the connection record and metrics.
    unflushed_bytes: u64,
    /// Of those, bytes that were spliced.
    unflushed_spliced: u32,
    /// Frames per opcode not yet added to the connection record and metrics.
    unflushed_frames: OpcodeCounts,
    /// Frames the source sent after wsgate's close went to `dst`: read and dropped.
    undeliverable: u32,
    /// `src` said "nothing now" during this wake-up (its waker is registered): no need to
    /// ask it again until the next one.
    src_quiet: bool,
    /// Both sockets are plain TCP and splicing is on: large frames may bypass `buf`.
    splice_capable: bool,
    /// The last data frame was large: the next header is peeked, and a large frame spliced.
    splice_hint: bool,
    /// Frame-rate limiter (client direction only).
    /// Boxed: only client directions with a `max_frame_rate` have one, and the tunnel
    /// stays small enough for the allocator's fastest size classes.
    rate: Option<Box<TokenBucket>>,
    /// The pipe of the splice path, borrowed while a spliced frame is in flight.
    splice: Option<Spliced>,
}

/// What the splice path did in one read step.
enum SpliceStep {
    /// `src` has nothing now (its waker is registered).
    Pending,
    /// Bytes moved, or the input ended or broke a rule.
    Progress,
    /// Not a frame to splice (small, control, checked text, incomplete header, no pipe):
    /// read it as usual.
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
            source: Source::Open,
            dest: Dest::Open,
            decoder: Decoder::new(role, max_payload).with_rsv(rsv),
            buf: None,
            wpos: 0,
            scan: 0,
            filled: 0,
            frame_left: 0,
            text: TextCheck::default(),
            inject: None,
            early: None,
            unflushed_bytes: 0,
            unflushed_spliced: 0,
            unflushed_frames: [0; 6],
            undeliverable: 0,
            src_quiet: false,
            splice_capable: false,
            splice_hint: false,
            rate: rate.map(|r| Box::new(TokenBucket::new(r, now))),
            splice: None,
        }
    }

    /// `src` has nothing more to say.
    fn src_done(&self) -> bool {
        self.source != Source::Open
    }

    /// wsgate's close went out on `dst`: what `src` still sends is read and dropped.
    fn discarding(&self) -> bool {
        self.dest == Dest::CloseSent
    }

    /// Its source is open but not being read: `dst` is not taking what was read before.
    fn held_up(&self) -> bool {
        self.source == Source::Open
            && self.dest.writable()
            && (self.wpos < self.scan || self.piped() > 0)
    }

    fn piped(&self) -> usize {
        self.splice.as_ref().map_or(0, |s| s.piped)
    }

    /// `src` stops here: the first end wins.
    fn end_source(&mut self, source: Source) {
        if self.source == Source::Open {
            self.source = source;
        }
    }

    /// `src` broke a rule. When part of the frame it broke was already approved, `dst` holds
    /// an unfinished frame: nothing can follow it.
    fn violate(&mut self, violation: Violation, mid_frame: bool) {
        self.end_source(Source::Violated(violation));
        if mid_frame {
            if self.dest.writable() {
                self.dest = Dest::Cut;
            }
        } else {
            // Nothing of the frame went out (a held frame is dropped whole): `dst` is at a
            // frame boundary, where wsgate's close can go.
            self.frame_left = 0;
            self.text.held_header = 0;
        }
        self.filled = self.scan;
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

    /// Queues a control frame of wsgate's for this output; ignored once a close is queued
    /// or sent.
    fn queue(&mut self, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
        if !self.dest.takes_close() {
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
            self.dest = Dest::CloseQueued;
        }
    }

    /// Queues wsgate's close frame (masked towards the upstream).
    fn queue_close(&mut self, frame: CloseFrame) {
        let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
        let n = codec::close_payload(frame.code, frame.reason, &mut payload);
        let mask = match self.direction {
            Direction::ClientToUpstream => Some(codec::random_mask()),
            Direction::UpstreamToClient => None,
        };
        self.queue(OpCode::Close, &payload[..n], mask);
    }

    /// Between two frames of the input (bytes may still wait in the pipe).
    fn at_boundary(&self) -> bool {
        self.frame_left == 0 && self.splice.as_ref().is_none_or(|s| s.left == 0)
    }

    /// Whether everything approved and queued is written (or can never be: `dst` failed or
    /// was cut, or `src` ended in the middle of a frame so no boundary will come for
    /// wsgate's frames).
    fn flushed(&self) -> bool {
        self.wpos == self.scan
            && self.piped() == 0
            && (!self.inject_pending()
                || !self.dest.writable()
                || (self.src_done() && !self.at_boundary()))
    }

    /// Reading waits until everything approved is written and no queued frame of wsgate's
    /// could go out now; a queued frame waiting for a boundary needs more input to get one.
    fn can_read(&self) -> bool {
        self.wpos == self.scan
            && self.piped() == 0
            && (!self.dest.writable() || !self.inject_pending() || !self.at_boundary())
    }

    /// Writes approved bytes, then queued control frames at a frame boundary.
    /// Returns whether anything was written (or failed).
    fn poll_write<W: AsyncWrite + SpliceIo + Unpin>(
        &mut self,
        dst: &mut W,
        cx: &mut Context<'_>,
    ) -> bool {
        if !self.dest.writable() {
            let progressed = self.wpos != self.scan || self.piped() > 0;
            self.wpos = self.scan;
            self.drop_pipe();
            return progressed;
        }
        let mut progressed = false;
        loop {
            // The buffer and the pipe are never both in flight (a direction reads into
            // one only when the other is written out).
            if self.wpos < self.scan {
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
                        self.write_failed();
                        return true;
                    }
                    Ok(n) => self.wpos += n,
                }
            } else if let Some(spliced) = self.splice.as_mut().filter(|s| s.piped > 0) {
                let Some(tcp) = dst.tcp() else {
                    self.write_failed();
                    return true;
                };
                match splice::poll_splice(tcp, cx, &spliced.pipe, Flow::Out, spliced.piped) {
                    Poll::Pending => return progressed,
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        self.write_failed();
                        return true;
                    }
                    Poll::Ready(Ok(n)) => {
                        progressed = true;
                        spliced.piped -= n.min(spliced.piped);
                    }
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
                        self.write_failed();
                        return true;
                    }
                    Ok(n) => {
                        inject.written += n;
                        if !inject.pending() {
                            if inject.has_close {
                                self.dest = Dest::CloseSent;
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

    /// `dst` failed: nothing approved or piped can be written any more.
    fn write_failed(&mut self) {
        self.dest = Dest::Failed;
        self.wpos = self.scan;
        self.drop_pipe();
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
        if self.src_done() || !self.can_read() {
            return false;
        }
        // Everything approved is written: move the unapproved tail to the front.
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
            if (self.scan, self.filled) != before || self.src_done() {
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
        if (self.splice.as_ref().is_some_and(|s| s.left > 0)
            || (self.splice_hint && self.frame_left == 0)
            || (self.frame_left >= SPLICE_MIN_REST && !self.text.active))
            && self.filled == 0
            && !self.discarding()
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
                self.end_of_input(false);
                true
            }
            Poll::Ready(Ok(())) => {
                let n = read_buf.filled().len();
                self.filled += n;
                self.parse(keepalive, now, events);
                true
            }
            Poll::Ready(Err(_)) => {
                self.end_of_input(true);
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
        let spliced = match self.splice.as_mut() {
            Some(spliced) => spliced,
            None => match Pipe::take() {
                Ok(pipe) => self.splice.insert(Spliced {
                    pipe,
                    piped: 0,
                    left: 0,
                    header: 0,
                }),
                // Out of descriptors, say: the relay buffer still works.
                Err(_) => return SpliceStep::Declined,
            },
        };
        let mut started = false;
        if self.frame_left > 0 {
            // The rest of a frame whose header went through the buffer: at least
            // SPLICE_MIN_REST bytes of payload, so splicing it costs no more system calls
            // than reading and writing it.
            spliced.left = self.frame_left;
            spliced.header = 0;
            self.frame_left = 0;
        } else if spliced.left == 0 {
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
                        && !self.text.checks(&h, decoder.rsv())
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
            let Some(spliced) = self.splice.as_mut() else {
                return SpliceStep::Declined;
            };
            spliced.left = u64::from(header.header_len) + header.payload_len;
            spliced.header = header.header_len;
            started = true;
        }
        let Some(spliced) = self.splice.as_mut() else {
            return SpliceStep::Declined;
        };
        let len = spliced.left.min(spliced.pipe.capacity() as u64) as usize;
        match splice::poll_splice(src, cx, &spliced.pipe, Flow::In, len) {
            Poll::Pending if started => {
                self.src_quiet = true;
                SpliceStep::Progress
            }
            Poll::Pending => SpliceStep::Pending,
            Poll::Ready(Ok(0)) => {
                self.end_of_input(false);
                SpliceStep::Progress
            }
            Poll::Ready(Err(_)) => {
                self.end_of_input(true);
                SpliceStep::Progress
            }
            Poll::Ready(Ok(n)) => {
                let n = n.min(len);
                spliced.left -= n as u64;
                spliced.header -= n.min(usize::from(spliced.header)) as u8;
                spliced.piped += n;
                self.unflushed_bytes += n as u64;
                // At most MAX_TURNS_PER_POLL pipe loads between two flushes.
                self.unflushed_spliced = self.unflushed_spliced.saturating_add(n as u32);
                SpliceStep::Progress
            }
        }
    }

    /// `dst` failed: bytes in the pipe can never be written, and the pipe is not reusable.
    fn drop_pipe(&mut self) {
        self.splice = None;
    }

    /// Nothing in flight: the buffer and the pipe go back to their pools while the source
    /// is quiet.
    fn release_idle_buf(&mut self) {
        if self.filled == 0 {
            self.buf = None;
        }
        if self.splice.is_some() {
            self.release_idle_pipe();
        }
    }

    #[cold]
    fn release_idle_pipe(&mut self) {
        let Some(spliced) = self.splice.as_mut() else {
            return;
        };
        if spliced.piped > 0 {
            return;
        }
        if spliced.left > 0 && spliced.header == 0 {
            // Only payload is left of the frame being spliced: the ordinary path takes it
            // over, so a sender pausing mid-frame does not hold two descriptors.
            self.frame_left = spliced.left;
            spliced.left = 0;
        }
        if spliced.left == 0 {
            if let Some(spliced) = self.splice.take() {
                spliced.pipe.put_back();
            }
        }
    }

    fn end_of_input(&mut self, reset: bool) {
        self.end_source(Source::Dropped { reset });
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
                self.end_source(Source::Violated(Violation::RateLimit));
                return false;
            }
        }
        self.count_frame(opcode);
        events.heard = true;
        events.data = true;
        true
    }

    /// Counts a frame as relayed, or as undeliverable once wsgate's close went to `dst`.
    fn count_frame(&mut self, opcode: OpCode) {
        if self.discarding() {
            self.undeliverable = self.undeliverable.saturating_add(1);
        } else {
            self.unflushed_frames[opcode_index(opcode)] += 1;
        }
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
                // (A held frame is always part of a checked text message.)
                if self.text.active && self.text.held_header > 0 {
                    if !self.check_held_text(buf) {
                        break;
                    }
                    continue;
                }
                let available = (self.filled - self.scan) as u64;
                let take = available.min(self.frame_left) as usize;
                if self.text.active && !self.discarding() {
                    let chunk = &mut buf[self.scan..self.scan + take];
                    let mut checked = self.text.feed(chunk, u64::from(self.text.offset));
                    self.text.offset = ((usize::from(self.text.offset) + take) % 4) as u8;
                    if checked.is_ok() && take as u64 == self.frame_left {
                        checked = self.text.frame_done();
                    }
                    if let Err(e) = checked {
                        // The header and the payload before went out already.
                        self.violate(e.into(), true);
                        break;
                    }
                }
                self.scan += take;
                self.frame_left -= take as u64;
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
            if self.inject_pending() && !self.discarding() {
                break;
            }
            let header = match self.decoder.parse_header(&buf[self.scan..self.filled]) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err(e) => {
                    self.violate(e.into(), false);
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
                let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
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
                        cut(buf, self.scan, total, &mut self.filled);
                        continue;
                    }
                }
                if header.opcode == OpCode::Close {
                    let code = match codec::parse_close_payload(payload) {
                        // A close frame without a code is reported as 1005 (RFC 6455
                        // §7.1.5), telling it apart from a dropped socket.
                        Ok(code) => code.map_or(NO_STATUS_RECEIVED, |(c, _)| c),
                        Err(e) => {
                            self.violate(e.into(), false);
                            break;
                        }
                    };
                    // An answer to wsgate's close is expected, not undeliverable.
                    if !self.discarding() {
                        self.unflushed_frames[opcode_index(header.opcode)] += 1;
                    }
                    self.end_source(Source::Closed(code));
                    match self.dest {
                        Dest::Open => {
                            self.dest = Dest::CloseForwarded;
                            self.scan += total;
                        }
                        // The answer to wsgate's close goes no further: wsgate sends its own.
                        Dest::CloseHeld => cut(buf, self.scan, total, &mut self.filled),
                        _ => self.scan += total,
                    }
                    // Nothing may follow a close frame.
                    self.filled = self.scan;
                    break;
                }
                self.count_frame(header.opcode);
                self.scan += total;
            } else {
                self.text.active = self.text.checks(&header, self.decoder.rsv());
                if self.text.active && !self.discarding() {
                    self.text.fin = header.fin;
                    self.text.key = header.mask.unwrap_or_default();
                    self.text.offset = 0;
                    let total = header_len as u64 + header.payload_len;
                    if total <= buf.len() as u64 {
                        // Held whole until checked, so a frame that breaks the rule never
                        // reaches the other side.
                        if !self.accept_data_frame(header.opcode, now, events) {
                            self.filled = self.scan;
                            break;
                        }
                        self.text.held_header = header.header_len;
                        self.text.checked = 0;
                        self.frame_left = header.payload_len;
                        if !self.check_held_text(buf) {
                            break;
                        }
                        continue;
                    }
                }
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
        if self.discarding() {
            // wsgate's close already went out on this output: drop what the peer still sends.
            self.wpos = self.scan;
        } else {
            self.unflushed_bytes += (self.scan - batch_start) as u64;
        }
    }

    /// Checks what arrived of the text frame held at `scan`; approves it whole once it is
    /// complete and valid. False while it waits for more bytes or broke the rule.
    fn check_held_text(&mut self, buf: &mut RelayBuf) -> bool {
        let payload_at = self.scan + usize::from(self.text.held_header);
        let checked = self.text.checked as usize;
        let end = self.filled.min(payload_at + self.frame_left as usize);
        let mut verdict = Ok(());
        if end > payload_at + checked {
            verdict = self
                .text
                .feed(&mut buf[payload_at + checked..end], checked as u64);
            // At most a buffer's length.
            self.text.checked = (end - payload_at) as u16;
        }
        let complete = self.text.checked as u64 == self.frame_left;
        if verdict.is_ok() && complete {
            verdict = self.text.frame_done();
        }
        if let Err(e) = verdict {
            self.violate(e.into(), false);
            return false;
        }
        if !complete {
            return false;
        }
        self.scan = payload_at + self.frame_left as usize;
        self.frame_left = 0;
        true
    }
}

/// Removes the `len` bytes at `at` from the unapproved bytes before `filled`.
fn cut(buf: &mut [u8], at: usize, len: usize, filled: &mut usize) {
    buf.copy_within(at + len..*filled, at);
    *filled -= len;
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

/// A broken rule on one input: what decides the close frame (one byte, where a
/// [`FrameError`] carries details for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Violation {
    /// Framing, masking, opcode, RSV bits, control frame or close code.
    Protocol,
    /// A frame over `max_frame_size`.
    TooBig,
    /// A text message or close reason that is not UTF-8.
    InvalidUtf8,
    /// Over `max_frame_rate`.
    RateLimit,
}

impl Violation {
    /// The close frame to the side that broke the rule.
    fn close_frame(self) -> CloseFrame {
        match self {
            Violation::Protocol => CloseFrame::new(close_code::PROTOCOL_ERROR, "protocol error"),
            Violation::TooBig => CloseFrame::new(close_code::MESSAGE_TOO_BIG, "frame too big"),
            Violation::InvalidUtf8 => CloseFrame::new(close_code::INVALID_PAYLOAD, "invalid UTF-8"),
            Violation::RateLimit => CloseFrame::new(close_code::POLICY_VIOLATION, "rate limit"),
        }
    }
}

impl From<FrameError> for Violation {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Protocol(_) => Violation::Protocol,
            FrameError::TooBig { .. } => Violation::TooBig,
            FrameError::InvalidUtf8 => Violation::InvalidUtf8,
        }
    }
}

/// Where the tunnel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Relaying,
    /// Flushing and shutting both outputs; each flag says that output is shut.
    ShuttingDown {
        client: bool,
        upstream: bool,
    },
    /// Reading and dropping what is left so the sockets close without a reset; each flag
    /// says that input reached its end.
    Lingering {
        client: bool,
        upstream: bool,
    },
    Done,
}

/// How often a direction held up by backpressure asks its unread source whether the peer
/// reset or closed (see [`crate::ws::peer`]).
const PEER_PROBE_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Set once a close started: by then both sides must be done. After relaying, the end
    /// of the shutdown and lingering.
    deadline: Option<Instant>,
    /// Why wsgate closes, once it decided to (timeouts, violations, requests, a lost side).
    closing: Option<CloseReason>,
    /// Who closed first, with what code and reason.
    first_close: Option<(Initiator, Option<u16>, &'static str)>,
    phase: Phase,
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
        // The first timer: the earliest of the idle, keepalive and expiry deadlines.
        let first = [
            t.ping_interval.map(|i| now + i),
            t.upstream_ping_interval.map(|i| now + i),
            settings.expiry().map(|e| now + e),
        ]
        .into_iter()
        .flatten()
        .fold(now + t.idle, Instant::min);
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
            closing: None,
            first_close: None,
            phase: Phase::Relaying,
            pong_timeouts: 0,
            idle_timeouts: 0,
            start_clock: now,
        }
    }

    /// wsgate closes, for `reason`: the close frames of design.md's table go out at the
    /// next frame boundaries (the upstream's held until the client answered, for the
    /// client-first reasons). Only the first reason counts.
    fn proxy_close(&mut self, reason: CloseReason, now: Instant) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(reason);
        let (to_client, to_upstream) = reason.frames();
        if self.first_close.is_none() {
            self.first_close = Some(match reason {
                CloseReason::ClientGone => (Initiator::Client, None, "client gone"),
                CloseReason::UpstreamGone => (Initiator::Upstream, None, "upstream gone"),
                _ => (
                    Initiator::Proxy,
                    to_client.map(|f| f.code),
                    to_client.map_or("", |f| f.reason),
                ),
            });
        }
        if let Some(frame) = to_client {
            self.u2c.queue_close(frame);
        }
        if let Some(frame) = to_upstream {
            if reason.client_first() && !self.c2u.src_done() && self.c2u.dest == Dest::Open {
                // Sent by `release_held_close`.
                self.c2u.dest = Dest::CloseHeld;
            } else {
                self.c2u.queue_close(frame);
            }
        }
        // A vanished side says nothing more. When it left a frame unfinished towards the
        // other peer, no close frame can follow it: both sockets are shut at once.
        let gone = match reason {
            CloseReason::ClientGone => Some(&mut self.c2u),
            CloseReason::UpstreamGone => Some(&mut self.u2c),
            _ => None,
        };
        if let Some(half) = gone {
            half.end_source(Source::Abandoned);
            if !half.at_boundary() {
                self.deadline = Some(now);
            }
        }
        self.start_deadline(now);
    }

    /// The client answered wsgate's close (or ended, or ran out of time): the upstream gets
    /// its close now.
    fn release_held_close(&mut self) {
        if self.c2u.dest != Dest::CloseHeld {
            return;
        }
        if let Some((_, Some(frame))) = self.closing.map(CloseReason::frames) {
            self.c2u.queue_close(frame);
        }
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
        if self.c2u.source == Source::Open && self.u2c.source == Source::Open {
            // The common case: nothing ended.
            if self.c2u.dest.writable() && self.u2c.dest.writable() {
                return;
            }
        }
        self.handle_ends(now);
    }

    /// A side closed, dropped, broke a rule or cannot be written.
    #[cold]
    fn handle_ends(&mut self, now: Instant) {
        // Close frames from the peers: forwarded as they are; the other side answers.
        for (source, initiator) in [
            (self.c2u.source, Initiator::Client),
            (self.u2c.source, Initiator::Upstream),
        ] {
            if let Source::Closed(code) = source {
                self.first_close.get_or_insert((initiator, Some(code), ""));
                self.start_deadline(now);
            }
        }
        if let Source::Violated(v) = self.c2u.source {
            self.proxy_close(CloseReason::Client(v), now);
        }
        if let Source::Violated(v) = self.u2c.source {
            self.proxy_close(CloseReason::Upstream(v), now);
        }
        // A side that vanished without a close frame.
        let gone = |half: &Half, other: &Half| {
            (matches!(half.source, Source::Dropped { .. }) || other.dest == Dest::Failed)
                && !matches!(half.source, Source::Closed(_))
        };
        if gone(&self.c2u, &self.u2c) {
            self.proxy_close(CloseReason::ClientGone, now);
        } else if gone(&self.u2c, &self.c2u) {
            self.proxy_close(CloseReason::UpstreamGone, now);
        }
        if self.c2u.dest == Dest::CloseHeld && self.c2u.src_done() {
            self.release_held_close();
        }
    }

    fn started(&self) -> Instant {
        self.start_clock
    }

    /// Fires the keepalive and idle timers.
    fn run_timers(&mut self, now: Instant) {
        // The timer is armed no later than the earliest keepalive or idle deadline, and
        // traffic only moves those later: before it, none is due.
        if now < self.timer_at || self.closing.is_some() || self.deadline.is_some() {
            return;
        }
        // First: a ping due at the same instant is pointless on a connection being closed.
        if self
            .settings
            .expiry()
            .is_some_and(|e| now >= self.start_clock + e)
        {
            self.proxy_close(CloseReason::TokenExpired, now);
            return;
        }
        match self.client_ka.poll(now) {
            KeepaliveAction::Ping(token) => {
                self.record.metrics.pings_sent.inc();
                self.u2c.queue(OpCode::Ping, &token, None)
            }
            KeepaliveAction::Dead => {
                self.pong_timeouts += 1;
                self.proxy_close(CloseReason::PingTimeout, now);
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
                self.proxy_close(CloseReason::UpstreamUnresponsive, now);
                return;
            }
            KeepaliveAction::None => {}
        }
        if now >= self.last_data + self.settings.timeouts.idle {
            self.idle_timeouts += 1;
            self.proxy_close(CloseReason::Idle, now);
        }
    }

    /// The close deadline passed. A client that never answered wsgate's close is given up
    /// on: the upstream gets its held close and one more `timeouts.close` to answer it.
    /// Otherwise the tunnel ends here.
    fn deadline_passed(&mut self, now: Instant) -> bool {
        if self.c2u.dest != Dest::CloseHeld {
            return true;
        }
        self.c2u.end_source(Source::Abandoned);
        self.release_held_close();
        self.deadline = Some(now + self.settings.timeouts.close);
        false
    }

    /// The next probe of a held-up direction's source: on a one-second grid from the
    /// tunnel's start, so no state is kept for it.
    fn next_probe(&self, now: Instant) -> Instant {
        let ticks = now.saturating_duration_since(self.start_clock).as_millis()
            / PEER_PROBE_INTERVAL.as_millis()
            + 1;
        self.start_clock + PEER_PROBE_INTERVAL * ticks as u32
    }

    /// A held-up direction cannot read its source, so it asks the socket: a peer that
    /// reset is gone at once; one that closed its side gets `timeouts.close` for the
    /// stalled side to take what it sent before.
    #[cold]
    fn probe_peers(&mut self, now: Instant) {
        let client = match self.client.socket() {
            Some(tcp) if self.c2u.held_up() => peer::peer_state(tcp),
            _ => PeerState::Open,
        };
        let upstream = match self.upstream.socket() {
            Some(tcp) if self.u2c.held_up() => peer::peer_state(tcp),
            _ => PeerState::Open,
        };
        if client == PeerState::Reset {
            self.c2u.end_of_input(true);
        }
        if upstream == PeerState::Reset {
            self.u2c.end_of_input(true);
        }
        for (state, initiator, reason) in [
            (client, Initiator::Client, "client gone"),
            (upstream, Initiator::Upstream, "upstream gone"),
        ] {
            if state == PeerState::Closed {
                self.first_close.get_or_insert((initiator, None, reason));
                self.start_deadline(now);
            }
        }
        // A reset is acted on like any other end of input.
        self.handle_ends(now);
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
            self.settings.expiry().map(|e| self.start_clock + e),
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
            let total: u64 = half.unflushed_frames.iter().map(|n| u64::from(*n)).sum();
            if half.unflushed_bytes == 0 && total == 0 && half.unflushed_spliced == 0 {
                continue;
            }
            route.traffic.add(
                self.record.identity.id,
                d,
                half.unflushed_bytes,
                u64::from(half.unflushed_spliced),
                &half.unflushed_frames,
            );
            if half.unflushed_bytes > 0 {
                stats
                    .bytes
                    .fetch_add(half.unflushed_bytes, Ordering::Relaxed);
            }
            if total > 0 {
                stats.frames.fetch_add(total, Ordering::Relaxed);
            }
            half.unflushed_bytes = 0;
            half.unflushed_spliced = 0;
            half.unflushed_frames = [0; 6];
        }
    }

    fn outcome(&self) -> Outcome {
        let (initiator, code, reason) = self.first_close.unwrap_or((Initiator::Proxy, None, ""));
        let (client_silent, upstream_silent) = self.closing.map_or((false, false), |r| r.silent());
        let end = |half: &Half, timed_out: bool| match half.source {
            Source::Closed(_) => SideEnd::Close,
            Source::Violated(_) => SideEnd::Protocol,
            Source::Dropped { reset: true } => SideEnd::Reset,
            Source::Dropped { reset: false } if !timed_out => SideEnd::Eof,
            _ if timed_out => SideEnd::Timeout,
            _ => SideEnd::Closed,
        };
        Outcome {
            initiator,
            code,
            reason: reason.to_string(),
            pong_timeouts: self.pong_timeouts,
            idle_timeouts: self.idle_timeouts,
            client_end: end(&self.c2u, client_silent),
            upstream_end: end(&self.u2c, upstream_silent),
            undeliverable: [
                u64::from(self.c2u.undeliverable),
                u64::from(self.u2c.undeliverable),
            ],
        }
    }

    /// Relaying: moves bytes both ways until nothing more can happen right now.
    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // One clock reading per wake-up: the turns below take microseconds.
        let now = Instant::now();
        if self.closing.is_none() {
            if let Some(request) = self.record.poll_close_request(cx.waker()) {
                let reason = match request {
                    CloseRequest::Operator => CloseReason::Operator,
                    CloseRequest::Drain => CloseReason::Drain,
                };
                self.proxy_close(reason, now);
            }
        }
        // Timers once per wake-up: with the clock fixed, traffic in the turns below can
        // only push their deadlines later.
        self.run_timers(now);
        if (self.c2u.held_up() || self.u2c.held_up()) && self.timer.is_elapsed() {
            self.probe_peers(now);
        }
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

            let both_done = self.c2u.src_done() && self.u2c.src_done();
            if both_done && self.c2u.flushed() && self.u2c.flushed() {
                return Poll::Ready(());
            }
            if self.deadline.is_some_and(|d| now >= d) {
                if self.deadline_passed(now) {
                    return Poll::Ready(());
                }
                continue;
            }
            if progressed {
                continue;
            }
            // Traffic only pushes deadlines later, so the timer is re-armed lazily: moved
            // earlier at once, moved later only after it fires. Busy tunnels then touch the
            // timer wheel about once per interval instead of once per read.
            let mut next = self.next_deadline();
            if self.c2u.held_up() || self.u2c.held_up() {
                next = next.min(self.next_probe(now));
            }
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

    /// Shuts both outputs (FIN, or TLS close_notify then FIN); true when both are shut.
    fn poll_shutdown(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut bool,
        upstream: &mut bool,
    ) -> bool {
        if !*client {
            *client = Pin::new(&mut self.client).poll_shutdown(cx).is_ready();
        }
        if !*upstream {
            *upstream = Pin::new(&mut self.upstream).poll_shutdown(cx).is_ready();
        }
        *client && *upstream
    }

    /// Reads and drops input until both peers closed their side, so no reset is sent;
    /// true when both did.
    fn poll_linger(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut bool,
        upstream: &mut bool,
    ) -> bool {
        let mut scratch = [0u8; 512];
        if !*client && drain_to_eof(&mut self.client, &mut scratch, cx) {
            *client = true;
            self.c2u.end_source(Source::Dropped { reset: false });
        }
        if !*upstream && drain_to_eof(&mut self.upstream, &mut scratch, cx) {
            *upstream = true;
            self.u2c.end_source(Source::Dropped { reset: false });
        }
        *client && *upstream
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
                    let finished =
                        |h: &Half| matches!(h.source, Source::Closed(_) | Source::Dropped { .. });
                    this.phase = if finished(&this.c2u) && finished(&this.u2c) {
                        Phase::Done
                    } else {
                        // The close deadline is spent: it now bounds the lingering.
                        this.deadline = Some(Instant::now() + LINGER);
                        Phase::ShuttingDown {
                            client: false,
                            upstream: false,
                        }
                    };
                }
                Phase::ShuttingDown {
                    mut client,
                    mut upstream,
                } => {
                    let until = this.deadline.unwrap_or_else(Instant::now);
                    if this.poll_shutdown(cx, &mut client, &mut upstream)
                        || this.timer_expired(until, cx)
                    {
                        // A side that sent its close frame is read to its EOF too.
                        let ended = |h: &Half| matches!(h.source, Source::Dropped { .. });
                        this.phase = Phase::Lingering {
                            client: ended(&this.c2u),
                            upstream: ended(&this.u2c),
                        };
                    } else {
                        this.phase = Phase::ShuttingDown { client, upstream };
                        return Poll::Pending;
                    }
                }
                Phase::Lingering {
                    mut client,
                    mut upstream,
                } => {
                    let until = this.deadline.unwrap_or_else(Instant::now);
                    if this.poll_linger(cx, &mut client, &mut upstream)
                        || this.timer_expired(until, cx)
                    {
                        this.phase = Phase::Done;
                    } else {
                        this.phase = Phase::Lingering { client, upstream };
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
    /// per-thread cache, the cheapest malloc/free of a handshake; it is 1,016 bytes, and
    /// the state machine, the UTF-8 check and the peer probe were fitted into that.
    #[test]
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    fn a_proxied_tunnel_fits_the_allocators_thread_cache() {
        let size = std::mem::size_of::<Tunnel<TcpStream, UpstreamStream>>();
        assert!(
            size <= 1016,
            "Tunnel<TcpStream, UpstreamStream> is {size} bytes"
        );
    }
}
