//! WebSocket frame codec (RFC 6455 §5): incremental header parsing, per-direction validation,
//! and encoding of the control frames wsgate writes itself. Payload bytes are never collected.
//!
//! The relay keeps bytes in its own read buffer and calls [`Decoder::parse_header`] on whatever
//! it holds; `Ok(None)` means "need more bytes" (a parser state, not an error). Once a header is
//! accepted the relay forwards `payload_len` bytes as they arrive, unmasking them piece by piece
//! with [`apply_mask`] only when it needs to look at them (close frames, wsgate's own pongs).
//! Nothing in this module allocates.

use thiserror::Error;

/// Shortest possible frame header: the two fixed bytes (FIN/RSV/opcode, MASK/length).
pub const MIN_HEADER_LEN: usize = 2;

/// Length of a masking key (RFC 6455 §5.3).
const MASK_KEY_LEN: usize = 4;

/// Longest possible frame header (14): 2 fixed bytes + 8-byte extended length + 4-byte mask key.
pub const MAX_HEADER_LEN: usize = MIN_HEADER_LEN + 8 + MASK_KEY_LEN;

/// Largest payload of a control frame (ping, pong, close): RFC 6455 §5.5 caps it at 125 bytes so
/// that a control frame always fits the 7-bit length field.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Largest control frame wsgate writes (131): 2-byte header + 4-byte mask + 125 payload.
pub const MAX_CONTROL_FRAME: usize = MIN_HEADER_LEN + MASK_KEY_LEN + MAX_CONTROL_PAYLOAD;

/// Longest close reason (123): the control payload limit less the 2-byte status code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// Largest payload length the wire format allows: RFC 6455 §5.2 requires the most significant
/// bit of the 64-bit length to be 0, so lengths stop at `i64::MAX`.
pub const MAX_PAYLOAD_LEN: u64 = i64::MAX as u64;

/// `max_payload` value for [`Decoder::new`] that disables the size limit (frames are still
/// bounded by [`MAX_PAYLOAD_LEN`]).
pub const NO_PAYLOAD_LIMIT: u64 = u64::MAX;

/// 7-bit length value meaning "a 16-bit length follows".
const LEN_16_MARKER: u8 = 126;

/// 7-bit length value meaning "a 64-bit length follows".
const LEN_64_MARKER: u8 = 127;

const FIN_BIT: u8 = 0x80;
const RSV_SHIFT: u8 = 4;
const RSV_MASK: u8 = 0x07;
/// RSV1 in [`FrameHeader::rsv`]: permessage-deflate's "this message is compressed".
pub const RSV1: u8 = 0b100;
const OPCODE_MASK: u8 = 0x0F;
const MASK_BIT: u8 = 0x80;
const LEN7_MASK: u8 = 0x7F;

/// Close status codes wsgate sends or inspects (RFC 6455 §7.4.1 and the IANA registry).
pub mod close_code {
    /// Normal closure: the purpose of the connection is fulfilled.
    pub const NORMAL: u16 = 1000;
    /// Going away: idle/ping timeouts, drain, operator close, and the upstream notice after a
    /// client error.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error: unmasked client frame, bad opcode, bad control frame, bad fragmentation.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Invalid frame payload data: a close reason that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation: the client exceeded `max_frame_rate`.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// Message too big: a frame over `max_frame_size`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Bad gateway: the upstream connection was lost without a close frame.
    pub const BAD_GATEWAY: u16 = 1014;

    /// Whether `code` may appear in a close frame on the wire: 1000-1003, 1007-1014
    /// (1004 is reserved; 1005, 1006 and 1015 are for local reporting only; 1016-2999 are
    /// unassigned protocol codes) and the registered/private ranges 3000-4999.
    pub const fn is_valid(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Frame opcode (RFC 6455 §5.2). Reserved opcodes (3-7, 11-15) are refused by the decoder and
/// have no variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// The opcode for a 4-bit wire value, or `None` for a reserved one.
    pub const fn from_u8(value: u8) -> Option<OpCode> {
        match value {
            0x0 => Some(OpCode::Continuation),
            0x1 => Some(OpCode::Text),
            0x2 => Some(OpCode::Binary),
            0x8 => Some(OpCode::Close),
            0x9 => Some(OpCode::Ping),
            0xA => Some(OpCode::Pong),
            _ => None,
        }
    }

    /// The 4-bit wire value.
    pub const fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong: at most 125 bytes, never fragmented, allowed between fragments.
    pub const fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }

    /// The `opcode` label of `wsgate_frames_total`.
    pub const fn label(self) -> &'static str {
        match self {
            OpCode::Continuation => "continuation",
            OpCode::Text => "text",
            OpCode::Binary => "binary",
            OpCode::Close => "close",
            OpCode::Ping => "ping",
            OpCode::Pong => "pong",
        }
    }
}

/// Which peer sent the bytes being parsed; decides the masking rule (RFC 6455 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Bytes from the WebSocket client: every frame MUST be masked.
    Client,
    /// Bytes from the upstream server: no frame may be masked.
    Server,
}

/// One parsed frame header. The relay forwards the header bytes it parsed unchanged; these
/// fields tell it what follows and how to account for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// Last frame of a message.
    pub fin: bool,
    /// The three RSV bits as 0..=7 (RSV1 = 4), passed through untouched because negotiated
    /// extensions such as permessage-deflate use them.
    pub rsv: u8,
    pub opcode: OpCode,
    /// Masking key, present exactly when the sender is the client.
    pub mask: Option<[u8; 4]>,
    /// Payload bytes that follow the header.
    pub payload_len: u64,
    /// Bytes the header itself occupies (2..=14), so the relay knows where payload starts.
    pub header_len: u8,
}

impl FrameHeader {
    /// Header plus payload: the bytes this frame occupies on the wire.
    pub fn frame_len(&self) -> u64 {
        u64::from(self.header_len).saturating_add(self.payload_len)
    }
}

/// Why a frame is refused, each mapped to the close code the proxy sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Unmasked client frame, masked server frame, reserved opcode, fragmented or >125-byte
    /// control frame, continuation without a started message, new data frame inside an
    /// unfinished fragmented message, 64-bit length with the top bit set, a 1-byte close payload
    /// or a close code that may not be sent. The string is a short reason for logs.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A frame whose payload is larger than the configured limit (seen from its header).
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    TooBig { len: u64, max: u64 },
    /// A text message or a close reason that is not valid UTF-8.
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
}

impl FrameError {
    /// The close code wsgate sends to the peer that caused the error.
    pub const fn close_code(&self) -> u16 {
        match self {
            FrameError::Protocol(_) => close_code::PROTOCOL_ERROR,
            FrameError::TooBig { .. } => close_code::MESSAGE_TOO_BIG,
            FrameError::InvalidUtf8 => close_code::INVALID_PAYLOAD,
        }
    }

    /// The close reason wsgate sends with [`FrameError::close_code`] (the design's tunnel table).
    pub const fn close_reason(&self) -> &'static str {
        match self {
            FrameError::Protocol(_) => "protocol error",
            FrameError::TooBig { .. } => "frame too big",
            FrameError::InvalidUtf8 => "invalid UTF-8",
        }
    }
}

/// Which RSV bits the extensions agreed in the 101 allow (RFC 6455 §5.2: a bit no
/// negotiated extension defines must fail the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsvPolicy {
    /// No extension: every RSV bit is a protocol error.
    NoExtension,
    /// permessage-deflate (RFC 7692 §6): RSV1 on the first frame of a data message only.
    Deflate,
    /// An extension wsgate does not know: its RSV bits pass untouched.
    Unknown,
}

impl RsvPolicy {
    /// The policy for a `Sec-WebSocket-Extensions` answer (all of its lines, joined).
    pub fn from_agreed<'a>(values: impl IntoIterator<Item = &'a str>) -> RsvPolicy {
        let mut policy = RsvPolicy::NoExtension;
        for name in values
            .into_iter()
            .flat_map(|v| v.split(','))
            .map(|ext| ext.split(';').next().unwrap_or_default().trim())
            .filter(|name| !name.is_empty())
        {
            policy = match (policy, name.eq_ignore_ascii_case("permessage-deflate")) {
                (RsvPolicy::NoExtension, true) => RsvPolicy::Deflate,
                _ => RsvPolicy::Unknown,
            };
        }
        policy
    }
}

/// Stateful per-direction decoder: tracks whether a fragmented data message is open.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// Which peer's bytes this decoder sees (decides the masking rule).
    role: Role,
    /// Which RSV bits may be set.
    rsv: RsvPolicy,
    /// Largest accepted payload of any frame; larger ones are [`FrameError::TooBig`].
    max_payload: u64,
    /// A text/binary frame without FIN was accepted and its final continuation has not been.
    fragmented: bool,
}

impl Decoder {
    /// A decoder for frames sent by `role`. `max_payload` applies to data and control frames'
    /// `payload_len`; [`NO_PAYLOAD_LIMIT`] disables it.
    pub fn new(role: Role, max_payload: u64) -> Self {
        Decoder {
            role,
            rsv: RsvPolicy::Unknown,
            max_payload,
            fragmented: false,
        }
    }

    /// The same decoder, checking RSV bits against the extensions agreed in the 101.
    pub fn with_rsv(mut self, rsv: RsvPolicy) -> Self {
        self.rsv = rsv;
        self
    }

    /// The RSV bits this decoder allows.
    pub fn rsv(&self) -> RsvPolicy {
        self.rsv
    }

    /// The peer whose frames this decoder validates.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether a fragmented data message has started and not yet finished.
    pub fn in_fragmented_message(&self) -> bool {
        self.fragmented
    }

    /// Parse one header from the start of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds fewer bytes than the header needs (the caller keeps
    /// the bytes and calls again with more). Never reads payload. Updates the fragmentation state
    /// only when it returns `Ok(Some(_))`.
    ///
    /// Validation order: opcode, control frame FIN, mask rule, then (once the whole header is
    /// there) length top bit, control frame length ≤ 125, size limit, fragmentation. The first
    /// three need only the first two bytes and are reported as soon as those are present; for
    /// any prefix of a buffer the answer is either `Ok(None)` or the same as for the whole
    /// buffer. Non-minimal length encodings are accepted, for control frames too.
    pub fn parse_header(&mut self, buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
        let (b0, b1) = match buf {
            [b0, b1, ..] => (*b0, *b1),
            _ => return Ok(None),
        };
        let fin = b0 & FIN_BIT != 0;
        let rsv = (b0 >> RSV_SHIFT) & RSV_MASK;
        let masked = b1 & MASK_BIT != 0;
        let len7 = b1 & LEN7_MASK;

        let opcode =
            OpCode::from_u8(b0 & OPCODE_MASK).ok_or(FrameError::Protocol("reserved opcode"))?;
        if opcode.is_control() && !fin {
            return Err(FrameError::Protocol("fragmented control frame"));
        }
        match (self.role, masked) {
            (Role::Client, false) => return Err(FrameError::Protocol("unmasked client frame")),
            (Role::Server, true) => return Err(FrameError::Protocol("masked server frame")),
            _ => {}
        }
        match self.rsv {
            RsvPolicy::Unknown => {}
            RsvPolicy::NoExtension if rsv != 0 => {
                return Err(FrameError::Protocol("RSV bit set without an extension"))
            }
            RsvPolicy::NoExtension => {}
            RsvPolicy::Deflate if rsv & 0b011 != 0 => {
                return Err(FrameError::Protocol("RSV2 or RSV3 set"))
            }
            RsvPolicy::Deflate if rsv != 0 && !matches!(opcode, OpCode::Text | OpCode::Binary) => {
                return Err(FrameError::Protocol(
                    "RSV1 outside the first frame of a message",
                ))
            }
            RsvPolicy::Deflate => {}
        }

        let (payload_len, len_bytes) = match len7 {
            LEN_16_MARKER => match read_array::<2>(buf, MIN_HEADER_LEN) {
                Some(b) => (u64::from(u16::from_be_bytes(b)), 2),
                None => return Ok(None),
            },
            LEN_64_MARKER => match read_array::<8>(buf, MIN_HEADER_LEN) {
                Some(b) => (u64::from_be_bytes(b), 8),
                None => return Ok(None),
            },
            n => (u64::from(n), 0),
        };
        let mask_at = MIN_HEADER_LEN + len_bytes;
        let mask = if masked {
            match read_array::<MASK_KEY_LEN>(buf, mask_at) {
                Some(key) => Some(key),
                None => return Ok(None),
            }
        } else {
            None
        };
        let header_len = mask_at + if masked { MASK_KEY_LEN } else { 0 };

        if payload_len > MAX_PAYLOAD_LEN {
            return Err(FrameError::Protocol("64-bit length with the top bit set"));
        }
        // Judged on the decoded length: a control frame may use a (non-minimal) extended form.
        if opcode.is_control() && payload_len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(FrameError::Protocol("control frame over 125 bytes"));
        }
        if payload_len > self.max_payload {
            return Err(FrameError::TooBig {
                len: payload_len,
                max: self.max_payload,
            });
        }
        match opcode {
            OpCode::Continuation if !self.fragmented => {
                return Err(FrameError::Protocol(
                    "continuation without a started message",
                ));
            }
            OpCode::Text | OpCode::Binary if self.fragmented => {
                return Err(FrameError::Protocol(
                    "new data frame inside a fragmented message",
                ));
            }
            OpCode::Continuation | OpCode::Text | OpCode::Binary => self.fragmented = !fin,
            OpCode::Close | OpCode::Ping | OpCode::Pong => {}
        }

        Ok(Some(FrameHeader {
            fin,
            rsv,
            opcode,
            mask,
            payload_len,
            // At most MAX_HEADER_LEN (14): always fits.
            header_len: header_len as u8,
        }))
    }
}

/// `N` bytes of `buf` starting at `at`, or `None` if `buf` is too short.
fn read_array<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// XOR `buf` with `key`, where `offset` is the position of `buf[0]` within the frame payload (so
/// payload can be unmasked piece by piece as it arrives). Applying it twice is the identity.
///
/// Works on 8-byte words; the compiler vectorises the loop further.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: u64) {
    // Rotate the key so that key[0] lines up with buf[0].
    let shift = (offset % MASK_KEY_LEN as u64) as usize;
    let mut k = key;
    k.rotate_left(shift);
    let word = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);

    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    // The words covered a multiple of 4 bytes, so the tail starts at key phase 0 again.
    for (b, m) in chunks.into_remainder().iter_mut().zip(k.iter().cycle()) {
        *b ^= m;
    }
}

/// Encode a frame header into `out`; returns the bytes written (2..=14). The length uses the
/// shortest form. `rsv` is the three RSV bits as 0..=7 (extra bits are dropped); `payload_len`
/// must be at most [`MAX_PAYLOAD_LEN`] (debug assertion).
pub fn encode_header(
    fin: bool,
    rsv: u8,
    opcode: OpCode,
    payload_len: u64,
    mask: Option<[u8; 4]>,
    out: &mut [u8; MAX_HEADER_LEN],
) -> usize {
    debug_assert!(rsv <= RSV_MASK, "rsv is three bits");
    debug_assert!(payload_len <= MAX_PAYLOAD_LEN, "payload length over 2^63-1");
    out[0] = if fin { FIN_BIT } else { 0 } | (rsv & RSV_MASK) << RSV_SHIFT | opcode.as_u8();
    let mask_bit = if mask.is_some() { MASK_BIT } else { 0 };
    let mut at = MIN_HEADER_LEN;
    if payload_len < u64::from(LEN_16_MARKER) {
        out[1] = mask_bit | payload_len as u8;
    } else if let Ok(len16) = u16::try_from(payload_len) {
        out[1] = mask_bit | LEN_16_MARKER;
        out[at..at + 2].copy_from_slice(&len16.to_be_bytes());
        at += 2;
    } else {
        out[1] = mask_bit | LEN_64_MARKER;
        out[at..at + 8].copy_from_slice(&payload_len.to_be_bytes());
        at += 8;
    }
    if let Some(key) = mask {
        out[at..at + MASK_KEY_LEN].copy_from_slice(&key);
        at += MASK_KEY_LEN;
    }
    at
}

/// Encode a control frame (ping/pong/close) with FIN set into `out`, masked with `mask` when
/// `Some` (frames towards the upstream) and unmasked when `None` (frames towards the client).
/// Returns bytes written. `payload` must be at most 125 bytes (debug assertion; truncated in
/// release builds).
pub fn encode_control(
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
    out: &mut [u8; MAX_CONTROL_FRAME],
) -> usize {
    debug_assert!(opcode.is_control(), "{opcode:?} is not a control opcode");
    debug_assert!(
        payload.len() <= MAX_CONTROL_PAYLOAD,
        "control payload of {} bytes",
        payload.len()
    );
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let mut header = [0u8; MAX_HEADER_LEN];
    let header_len = encode_header(true, 0, opcode, payload.len() as u64, mask, &mut header);
    out[..header_len].copy_from_slice(&header[..header_len]);
    let end = header_len + payload.len();
    let body = &mut out[header_len..end];
    body.copy_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(body, key, 0);
    }
    end
}

/// Close payload: 2-byte big-endian `code` + UTF-8 `reason` truncated on a char boundary to fit
/// [`MAX_CLOSE_REASON`] bytes. Returns the length written into `out[..]`.
pub fn close_payload(code: u16, reason: &str, out: &mut [u8; MAX_CONTROL_PAYLOAD]) -> usize {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out[..2].copy_from_slice(&code.to_be_bytes());
    out[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    2 + end
}

/// Parse a close frame's (already unmasked) payload: `Ok(None)` when empty,
/// `Ok(Some((code, reason)))` when valid. A 1-byte payload or a code that may not appear on the
/// wire (see [`close_code::is_valid`]) is [`FrameError::Protocol`]; a reason that is not UTF-8
/// is [`FrameError::InvalidUtf8`] (close 1007).
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<(u16, &str)>, FrameError> {
    let (code, reason) = match payload {
        [] => return Ok(None),
        [_] => return Err(FrameError::Protocol("close payload of 1 byte")),
        [hi, lo, reason @ ..] => (u16::from_be_bytes([*hi, *lo]), reason),
    };
    if !close_code::is_valid(code) {
        return Err(FrameError::Protocol("close code not allowed on the wire"));
    }
    let reason = std::str::from_utf8(reason).map_err(|_| FrameError::InvalidUtf8)?;
    Ok(Some((code, reason)))
}

/// Incremental UTF-8 check of one text message, fed its payload in whatever pieces the
/// reads and fragments cut it into: a code point split across two pieces is fine, an
/// invalid sequence is reported as soon as the piece holding it arrives (fail fast), and a
/// message that ends inside a code point is reported by [`Utf8Check::finish`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Utf8Check {
    /// The start of a code point the last piece ended in (at most 3 bytes).
    carry: [u8; 4],
    carry_len: u8,
}

impl Utf8Check {
    /// Checks the next piece of the message's (unmasked) payload.
    pub fn feed(&mut self, mut piece: &[u8]) -> Result<(), FrameError> {
        if self.carry_len > 0 {
            let have = usize::from(self.carry_len);
            // The carry starts with a lead byte std accepted as the start of a sequence.
            let width = match self.carry[0] {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = (width - have).min(piece.len());
            self.carry[have..have + take].copy_from_slice(&piece[..take]);
            let have = have + take;
            piece = &piece[take..];
            match std::str::from_utf8(&self.carry[..have]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still short (the piece ran out), and a valid prefix so far.
                    self.carry_len = have as u8;
                    return Ok(());
                }
                Err(_) => return Err(FrameError::InvalidUtf8),
            }
        }
        // The last code point may be cut off by the end of the piece: the body before it
        // is checked with SIMD where the CPU has it (detected once at run time), the at
        // most 3 bytes after by std, which tells a cut-off sequence from a bad one.
        let (body, tail) = piece.split_at(unfinished_tail(piece));
        if simdutf8::basic::from_utf8(body).is_err() {
            return Err(FrameError::InvalidUtf8);
        }
        match std::str::from_utf8(tail) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() && e.valid_up_to() == 0 => {
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(FrameError::InvalidUtf8),
        }
    }

    /// Whether the last piece ended inside a code point.
    pub fn in_code_point(&self) -> bool {
        self.carry_len > 0
    }

    /// The message ended: it must not end inside a code point. Resets the check.
    pub fn finish(&mut self) -> Result<(), FrameError> {
        let complete = self.carry_len == 0;
        *self = Utf8Check::default();
        if complete {
            Ok(())
        } else {
            Err(FrameError::InvalidUtf8)
        }
    }
}

/// Whether `masked`, unmasked with `key` from payload position `offset`, is all ASCII:
/// one read-only pass, so ASCII text (most JSON) from a client is checked without
/// unmasking it.
pub fn masked_is_ascii(masked: &[u8], key: [u8; 4], offset: u64) -> bool {
    let shift = (offset % MASK_KEY_LEN as u64) as usize;
    let mut k = key;
    k.rotate_left(shift);
    let word = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    let mut high = 0u64;
    let mut chunks = masked.chunks_exact(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        high |= u64::from_ne_bytes(w) ^ word;
    }
    let mut tail = 0u8;
    // The words covered a multiple of 4 bytes, so the tail starts at key phase 0 again.
    for (b, m) in chunks.remainder().iter().zip(k.iter().cycle()) {
        tail |= b ^ m;
    }
    high & 0x8080_8080_8080_8080 == 0 && tail & 0x80 == 0
}

/// Where the last code point of `bytes` starts when it may be cut off by the end of `bytes`
/// (a lead byte too close to the end for its length, with only continuation bytes after
/// it); `bytes.len()` otherwise.
fn unfinished_tail(bytes: &[u8]) -> usize {
    let len = bytes.len();
    for back in 1..=len.min(3) {
        let b = bytes[len - back];
        if b & 0xC0 == 0x80 {
            // A continuation byte: its lead is further back.
            continue;
        }
        let width = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xFF => 4,
            _ => 1,
        };
        return if width > back { len - back } else { len };
    }
    len
}

/// A fresh random mask key for a frame wsgate sends to the upstream.
pub fn random_mask() -> [u8; 4] {
    rand::random()
}

/// A complete control frame held by value (no allocation), for the relay to queue and write on
/// the next frame boundary.
#[derive(Clone, Copy)]
pub struct ControlFrame {
    bytes: [u8; MAX_CONTROL_FRAME],
    /// Bytes of `bytes` in use (at most [`MAX_CONTROL_FRAME`]).
    len: u8,
}

impl ControlFrame {
    /// A ping, pong or close frame with `payload` (at most 125 bytes; see [`encode_control`]).
    pub fn new(opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) -> Self {
        let mut bytes = [0u8; MAX_CONTROL_FRAME];
        let len = encode_control(opcode, payload, mask, &mut bytes);
        ControlFrame {
            bytes,
            // At most MAX_CONTROL_FRAME (131): always fits.
            len: len as u8,
        }
    }

    /// A close frame with `code` and `reason` (truncated to [`MAX_CLOSE_REASON`] bytes).
    pub fn close(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Self {
        let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
        let n = close_payload(code, reason, &mut payload);
        ControlFrame::new(OpCode::Close, &payload[..n], mask)
    }

    /// The encoded frame, ready to write.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl AsRef<[u8]> for ControlFrame {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Debug for ControlFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ControlFrame")
            .field(&self.as_bytes())
            .finish()
    }
}

impl PartialEq for ControlFrame {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for ControlFrame {}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn client() -> Decoder {
        Decoder::new(Role::Client, NO_PAYLOAD_LIMIT)
    }

    fn server() -> Decoder {
        Decoder::new(Role::Server, NO_PAYLOAD_LIMIT)
    }

    /// Header bytes for a frame, built by hand (not with `encode_header`).
    fn raw(b0: u8, len: u64, len_form: u8, mask: Option<[u8; 4]>) -> Vec<u8> {
        let m = if mask.is_some() { 0x80 } else { 0 };
        let mut v = vec![b0];
        match len_form {
            7 => v.push(m | len as u8),
            16 => {
                v.push(m | 126);
                v.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                v.push(m | 127);
                v.extend_from_slice(&len.to_be_bytes());
            }
        }
        if let Some(k) = mask {
            v.extend_from_slice(&k);
        }
        v
    }

    fn parse(dec: &mut Decoder, buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
        dec.parse_header(buf)
    }

    fn err_code(r: Result<Option<FrameHeader>, FrameError>) -> u16 {
        match r {
            Err(e) => e.close_code(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn rfc_examples() {
        // RFC 6455 §5.7: single-frame unmasked "Hello" and masked "Hello".
        let unmasked = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let h = parse(&mut server(), &unmasked).unwrap().unwrap();
        assert_eq!(
            h,
            FrameHeader {
                fin: true,
                rsv: 0,
                opcode: OpCode::Text,
                mask: None,
                payload_len: 5,
                header_len: 2
            }
        );
        let mut masked = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let h = parse(&mut client(), &masked).unwrap().unwrap();
        assert_eq!(h.mask, Some(KEY));
        assert_eq!(h.header_len, 6);
        assert_eq!(h.frame_len(), 11);
        apply_mask(&mut masked[6..], KEY, 0);
        assert_eq!(&masked[6..], b"Hello");
        // 256 bytes binary, 16-bit length; 64 KiB binary, 64-bit length.
        let h = parse(&mut server(), &[0x82, 0x7E, 0x01, 0x00])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, h.header_len), (256, 4));
        let h = parse(&mut server(), &[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, h.header_len), (65536, 10));
    }

    #[test]
    fn every_length_form_with_and_without_mask() {
        for (len, form, base) in [
            (0u64, 7u8, 2u8),
            (125, 7, 2),
            (126, 16, 4),
            (65535, 16, 4),
            (65536, 64, 10),
            (MAX_PAYLOAD_LEN, 64, 10),
            // Non-minimal encodings are allowed.
            (5, 16, 4),
            (5, 64, 10),
            (300, 64, 10),
        ] {
            let h = parse(&mut server(), &raw(0x82, len, form, None))
                .unwrap()
                .unwrap();
            assert_eq!((h.payload_len, h.header_len, h.mask), (len, base, None));
            let h = parse(&mut client(), &raw(0x82, len, form, Some(KEY)))
                .unwrap()
                .unwrap();
            assert_eq!(
                (h.payload_len, h.header_len, h.mask),
                (len, base + 4, Some(KEY))
            );
        }
    }

    #[test]
    fn control_frames_may_use_extended_lengths() {
        for (len, form) in [(0u64, 16u8), (125, 16), (5, 64), (125, 64)] {
            let h = parse(&mut server(), &raw(0x89, len, form, None))
                .unwrap()
                .unwrap();
            assert_eq!((h.opcode, h.payload_len), (OpCode::Ping, len));
        }
        for (len, form) in [(126u64, 16u8), (65535, 16), (126, 64), (1 << 40, 64)] {
            assert_eq!(
                parse(&mut client(), &raw(0x88, len, form, Some(KEY))),
                Err(FrameError::Protocol("control frame over 125 bytes"))
            );
        }
        // The length is judged only once it is all there.
        assert_eq!(parse(&mut server(), &[0x89, 126, 0]), Ok(None));
    }

    #[test]
    fn rsv_bits_are_checked_against_the_agreed_extensions() {
        assert_eq!(RsvPolicy::from_agreed([]), RsvPolicy::NoExtension);
        assert_eq!(RsvPolicy::from_agreed([""]), RsvPolicy::NoExtension);
        assert_eq!(
            RsvPolicy::from_agreed(["permessage-deflate; server_no_context_takeover"]),
            RsvPolicy::Deflate
        );
        assert_eq!(
            RsvPolicy::from_agreed(["Permessage-Deflate", "x-other"]),
            RsvPolicy::Unknown
        );
        let check = |policy, b0: u8, fragmented: bool| {
            let mut dec = Decoder::new(Role::Server, NO_PAYLOAD_LIMIT).with_rsv(policy);
            if fragmented {
                dec.parse_header(&[0x01, 0]).unwrap().unwrap();
            }
            dec.parse_header(&[b0, 0]).map(|h| h.map(|h| h.rsv))
        };
        use RsvPolicy::*;
        assert!(check(NoExtension, 0x81 | 0x40, false).is_err());
        assert!(check(NoExtension, 0x81 | 0x10, false).is_err());
        assert_eq!(check(NoExtension, 0x81, false), Ok(Some(0)));
        assert_eq!(check(Deflate, 0x81 | 0x40, false), Ok(Some(4)));
        assert_eq!(check(Deflate, 0x82 | 0x40, false), Ok(Some(4)));
        assert!(
            check(Deflate, 0x80 | 0x40, true).is_err(),
            "RSV1 on a continuation"
        );
        assert!(
            check(Deflate, 0x89 | 0x40, false).is_err(),
            "RSV1 on a ping"
        );
        assert!(check(Deflate, 0x81 | 0x20, false).is_err(), "RSV2");
        assert_eq!(check(Unknown, 0x81 | 0x70, false), Ok(Some(7)));
    }

    #[test]
    fn rsv_bits_are_passed_through() {
        for rsv in 0..=7u8 {
            let h = parse(&mut server(), &[0x80 | rsv << 4 | 0x1, 0])
                .unwrap()
                .unwrap();
            assert_eq!(h.rsv, rsv);
            assert!(h.fin);
        }
    }

    #[test]
    fn parse_ignores_payload_and_trailing_bytes() {
        let mut buf = raw(0x82, 3, 7, None);
        buf.extend_from_slice(&[0x81, 0x00, 0xff, 0xff, 0xff]);
        let h = parse(&mut server(), &buf).unwrap().unwrap();
        assert_eq!(
            (h.opcode, h.payload_len, h.header_len),
            (OpCode::Binary, 3, 2)
        );
    }

    #[test]
    fn every_error_with_its_close_code() {
        let cases: Vec<(Decoder, Vec<u8>, FrameError)> = vec![
            (
                server(),
                vec![0x83, 0],
                FrameError::Protocol("reserved opcode"),
            ),
            (
                server(),
                vec![0x8B, 0],
                FrameError::Protocol("reserved opcode"),
            ),
            (
                server(),
                vec![0x09, 0],
                FrameError::Protocol("fragmented control frame"),
            ),
            (
                server(),
                vec![0x88, 126, 0, 126],
                FrameError::Protocol("control frame over 125 bytes"),
            ),
            (
                server(),
                raw(0x8A, 70_000, 64, None),
                FrameError::Protocol("control frame over 125 bytes"),
            ),
            (
                client(),
                vec![0x81, 0x05],
                FrameError::Protocol("unmasked client frame"),
            ),
            (
                server(),
                raw(0x81, 5, 7, Some(KEY)),
                FrameError::Protocol("masked server frame"),
            ),
            (
                server(),
                raw(0x82, 1 << 63, 64, None),
                FrameError::Protocol("64-bit length with the top bit set"),
            ),
            (
                Decoder::new(Role::Client, 1024),
                raw(0x82, 1025, 16, Some(KEY)),
                FrameError::TooBig {
                    len: 1025,
                    max: 1024,
                },
            ),
            (
                Decoder::new(Role::Client, 100),
                raw(0x89, 101, 7, Some(KEY)),
                FrameError::TooBig { len: 101, max: 100 },
            ),
            (
                server(),
                vec![0x80, 0],
                FrameError::Protocol("continuation without a started message"),
            ),
        ];
        for (mut dec, buf, want) in cases {
            let got = parse(&mut dec, &buf);
            assert_eq!(got, Err(want), "{buf:02x?}");
            assert!(!dec.in_fragmented_message());
        }
        assert_eq!(FrameError::Protocol("x").close_code(), 1002);
        assert_eq!(FrameError::TooBig { len: 2, max: 1 }.close_code(), 1009);
        assert_eq!(FrameError::InvalidUtf8.close_code(), 1007);
        assert_eq!(FrameError::Protocol("x").close_reason(), "protocol error");
        assert_eq!(
            FrameError::TooBig { len: 2, max: 1 }.close_reason(),
            "frame too big"
        );
    }

    #[test]
    fn validation_order() {
        // Reserved opcode beats the mask rule and the length.
        assert_eq!(
            parse(&mut client(), &raw(0x03, 1 << 63, 64, None)),
            Err(FrameError::Protocol("reserved opcode"))
        );
        // Control rules beat the mask rule.
        assert_eq!(
            parse(&mut client(), &[0x09, 0x00]),
            Err(FrameError::Protocol("fragmented control frame"))
        );
        // Mask rule beats the control frame length.
        assert_eq!(
            parse(&mut client(), &[0x89, 126, 0, 200]),
            Err(FrameError::Protocol("unmasked client frame"))
        );
        // Mask rule beats the size limit.
        assert_eq!(
            parse(
                &mut Decoder::new(Role::Server, 10),
                &raw(0x82, 11, 7, Some(KEY))
            ),
            Err(FrameError::Protocol("masked server frame"))
        );
        // Top bit beats the size limit.
        assert_eq!(
            parse(
                &mut Decoder::new(Role::Server, 10),
                &raw(0x82, 1 << 63, 64, None)
            ),
            Err(FrameError::Protocol("64-bit length with the top bit set"))
        );
        // Size limit beats fragmentation.
        assert_eq!(
            parse(&mut Decoder::new(Role::Server, 10), &raw(0x00, 11, 7, None)),
            Err(FrameError::TooBig { len: 11, max: 10 })
        );
    }

    #[test]
    fn size_limit_is_inclusive_and_unlimited_means_unlimited() {
        let mut dec = Decoder::new(Role::Client, 1024);
        assert!(parse(&mut dec, &raw(0x82, 1024, 16, Some(KEY)))
            .unwrap()
            .is_some());
        let mut dec = Decoder::new(Role::Client, NO_PAYLOAD_LIMIT);
        let h = parse(&mut dec, &raw(0x82, MAX_PAYLOAD_LEN, 64, Some(KEY)))
            .unwrap()
            .unwrap();
        assert_eq!(h.payload_len, MAX_PAYLOAD_LEN);
        assert_eq!(h.frame_len(), MAX_PAYLOAD_LEN + 14);
    }

    #[test]
    fn fragmentation_sequences() {
        let mut dec = client();
        let frame = |b0: u8| raw(b0, 3, 7, Some(KEY));
        // text (no fin), ping, continuation, pong, close, continuation (fin).
        assert!(parse(&mut dec, &frame(0x01)).unwrap().is_some());
        assert!(dec.in_fragmented_message());
        assert!(parse(&mut dec, &frame(0x89)).unwrap().is_some());
        assert!(dec.in_fragmented_message());
        assert!(parse(&mut dec, &frame(0x00)).unwrap().is_some());
        assert!(parse(&mut dec, &frame(0x8A)).unwrap().is_some());
        assert!(parse(&mut dec, &frame(0x88)).unwrap().is_some());
        assert!(dec.in_fragmented_message());
        let h = parse(&mut dec, &frame(0x80)).unwrap().unwrap();
        assert_eq!((h.opcode, h.fin), (OpCode::Continuation, true));
        assert!(!dec.in_fragmented_message());
        // A new message may start; a single-frame binary too.
        assert!(parse(&mut dec, &frame(0x82)).unwrap().is_some());
        assert!(parse(&mut dec, &frame(0x02)).unwrap().is_some());
        // Text or binary inside the open message: 1002, state unchanged.
        for b0 in [0x01, 0x81, 0x02, 0x82] {
            assert_eq!(err_code(parse(&mut dec, &frame(b0))), 1002);
            assert!(dec.in_fragmented_message());
        }
        assert!(parse(&mut dec, &frame(0x80)).unwrap().is_some());
        // Stray continuation (with or without FIN): 1002.
        for b0 in [0x00, 0x80] {
            assert_eq!(
                parse(&mut dec, &frame(b0)),
                Err(FrameError::Protocol(
                    "continuation without a started message"
                ))
            );
        }
        assert!(!dec.in_fragmented_message());
    }

    #[test]
    fn incomplete_input_is_none_at_every_prefix_and_keeps_state() {
        for (b0, len, form, mask) in [
            (0x01u8, 0u64, 7u8, None),
            (0x01, 100, 7, Some(KEY)),
            (0x02, 200, 16, None),
            (0x02, 200, 16, Some(KEY)),
            (0x81, 70_000, 64, None),
            (0x81, 70_000, 64, Some(KEY)),
        ] {
            let buf = raw(b0, len, form, mask);
            let role = if mask.is_some() {
                Role::Client
            } else {
                Role::Server
            };
            let mut dec = Decoder::new(role, NO_PAYLOAD_LIMIT);
            for n in 0..buf.len() {
                assert_eq!(parse(&mut dec, &buf[..n]), Ok(None), "{buf:02x?}[..{n}]");
                assert!(!dec.in_fragmented_message());
            }
            let h = parse(&mut dec, &buf).unwrap().unwrap();
            assert_eq!(usize::from(h.header_len), buf.len());
            assert_eq!(dec.in_fragmented_message(), b0 & 0x80 == 0);
            // In the open message, the prefixes of a continuation keep it open.
            if dec.in_fragmented_message() {
                let cont = raw(0x80, len, form, mask);
                for n in 0..cont.len() {
                    assert_eq!(parse(&mut dec, &cont[..n]), Ok(None));
                    assert!(dec.in_fragmented_message());
                }
            }
        }
    }

    #[test]
    fn two_byte_errors_are_reported_early() {
        // Bad opcode with a 64-bit length: refused before the length bytes arrive.
        assert_eq!(err_code(parse(&mut server(), &[0x0F, 0x7F])), 1002);
        assert_eq!(parse(&mut server(), &[0x0F]), Ok(None));
    }

    #[test]
    fn apply_mask_offsets_and_lengths() {
        let data: Vec<u8> = (0..100u8).collect();
        for len in 0..data.len() {
            let mut whole = data[..len].to_vec();
            apply_mask(&mut whole, KEY, 0);
            for (i, b) in whole.iter().enumerate() {
                assert_eq!(*b, data[i] ^ KEY[i % 4]);
            }
            for split in 0..=len {
                let mut pieces = data[..len].to_vec();
                let (a, b) = pieces.split_at_mut(split);
                apply_mask(a, KEY, 0);
                apply_mask(b, KEY, split as u64);
                assert_eq!(pieces, whole);
            }
        }
        // Offsets beyond u32 work (payloads longer than 4 GiB).
        let mut a = [1u8, 2, 3];
        apply_mask(&mut a, KEY, (1 << 40) + 1);
        assert_eq!(a, [1 ^ KEY[1], 2 ^ KEY[2], 3 ^ KEY[3]]);
    }

    #[test]
    fn encode_header_forms() {
        let mut out = [0u8; MAX_HEADER_LEN];
        for (len, want) in [(0u64, 2usize), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            assert_eq!(
                encode_header(true, 0, OpCode::Binary, len, None, &mut out),
                want
            );
            assert_eq!(
                encode_header(false, 4, OpCode::Text, len, Some(KEY), &mut out),
                want + 4
            );
            let h = parse(&mut client(), &out).unwrap().unwrap();
            assert_eq!(
                h,
                FrameHeader {
                    fin: false,
                    rsv: 4,
                    opcode: OpCode::Text,
                    mask: Some(KEY),
                    payload_len: len,
                    header_len: (want + 4) as u8,
                }
            );
        }
        assert_eq!(encode_header(true, 0, OpCode::Text, 5, None, &mut out), 2);
        assert_eq!(out[..2], [0x81, 0x05]);
    }

    #[test]
    fn encode_control_round_trip() {
        for mask in [None, Some(KEY)] {
            for opcode in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
                for payload in [&b""[..], b"wsgate", &[0xAB; MAX_CONTROL_PAYLOAD]] {
                    let mut out = [0u8; MAX_CONTROL_FRAME];
                    let n = encode_control(opcode, payload, mask, &mut out);
                    let role = if mask.is_some() {
                        Role::Client
                    } else {
                        Role::Server
                    };
                    let h = Decoder::new(role, NO_PAYLOAD_LIMIT)
                        .parse_header(&out[..n])
                        .unwrap()
                        .unwrap();
                    assert_eq!((h.fin, h.rsv, h.opcode, h.mask), (true, 0, opcode, mask));
                    assert_eq!(h.frame_len(), n as u64);
                    let body = &mut out[usize::from(h.header_len)..n];
                    if mask.is_some() && !payload.is_empty() {
                        assert_ne!(&*body, payload);
                    }
                    if let Some(key) = h.mask {
                        apply_mask(body, key, 0);
                    }
                    assert_eq!(&*body, payload);
                }
            }
        }
        assert_eq!(
            (MAX_HEADER_LEN, MAX_CONTROL_FRAME, MAX_CLOSE_REASON),
            (14, 131, 123)
        );
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "control payload")]
    fn encode_control_rejects_long_payload_in_debug() {
        let mut out = [0u8; MAX_CONTROL_FRAME];
        encode_control(OpCode::Ping, &[0; 126], None, &mut out);
    }

    #[test]
    fn close_payload_encoding() {
        let mut out = [0u8; MAX_CONTROL_PAYLOAD];
        let n = close_payload(1001, "idle timeout", &mut out);
        assert_eq!(&out[..n], b"\x03\xe9idle timeout");
        assert_eq!(
            parse_close_payload(&out[..n]),
            Ok(Some((1001, "idle timeout")))
        );
        let n = close_payload(1000, "", &mut out);
        assert_eq!(&out[..n], [0x03, 0xe8]);
        // Long reasons are cut to 123 bytes, on a char boundary.
        let n = close_payload(1000, &"a".repeat(200), &mut out);
        assert_eq!(n, 125);
        let reason = format!("a{}", "é".repeat(100)); // 1 + 200 bytes
        let n = close_payload(4000, &reason, &mut out);
        assert_eq!(n, 2 + 1 + 122);
        let (code, text) = parse_close_payload(&out[..n]).unwrap().unwrap();
        assert_eq!((code, text.chars().count()), (4000, 62));
        let n = close_payload(1000, &"€".repeat(50), &mut out); // 3-byte chars: 41 fit
        assert_eq!(n, 2 + 123);
    }

    #[test]
    fn close_payload_parsing() {
        assert_eq!(parse_close_payload(b""), Ok(None));
        assert_eq!(err_code_close(b"\x03"), 1002);
        for code in [
            0u16,
            999,
            1004,
            1005,
            1006,
            1015,
            1016,
            2999,
            5000,
            u16::MAX,
        ] {
            assert_eq!(err_code_close(&code.to_be_bytes()), 1002, "{code}");
        }
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            assert_eq!(
                parse_close_payload(&code.to_be_bytes()),
                Ok(Some((code, ""))),
                "{code}"
            );
        }
        assert_eq!(
            parse_close_payload(b"\x03\xe8\xff\xfe"),
            Err(FrameError::InvalidUtf8)
        );
        assert_eq!(err_code_close(b"\x03\xe8\xc3"), 1007);
        let mut p = vec![0x03, 0xe8];
        p.extend_from_slice("bye ✓".as_bytes());
        assert_eq!(parse_close_payload(&p), Ok(Some((1000, "bye ✓"))));
    }

    fn err_code_close(p: &[u8]) -> u16 {
        match parse_close_payload(p) {
            Err(e) => e.close_code(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn control_frame_value() {
        let f = ControlFrame::close(close_code::GOING_AWAY, "going away", None);
        assert_eq!(f.as_bytes(), b"\x88\x0c\x03\xe9going away");
        let f = ControlFrame::close(close_code::GOING_AWAY, "going away", Some(KEY));
        let mut bytes = f.as_bytes().to_vec();
        let h = client().parse_header(&bytes).unwrap().unwrap();
        apply_mask(&mut bytes[6..], KEY, 0);
        assert_eq!(h.payload_len, 12);
        assert_eq!(
            parse_close_payload(&bytes[6..]),
            Ok(Some((1001, "going away")))
        );
        let p = ControlFrame::new(OpCode::Ping, b"wsgate-1", None);
        assert_eq!(p.as_ref(), b"\x89\x08wsgate-1");
        assert!(format!("{p:?}").len() < 100);
        let big = ControlFrame::close(1000, &"x".repeat(500), Some(KEY));
        assert_eq!(big.as_bytes().len(), MAX_CONTROL_FRAME);
    }

    #[test]
    fn opcodes() {
        for v in 0..=0xFFu8 {
            match OpCode::from_u8(v) {
                Some(op) => assert_eq!(op.as_u8(), v),
                None => assert!(matches!(v, 3..=7 | 0xB..), "{v}"),
            }
        }
        let labels: Vec<_> = [
            OpCode::Continuation,
            OpCode::Text,
            OpCode::Binary,
            OpCode::Close,
            OpCode::Ping,
            OpCode::Pong,
        ]
        .iter()
        .map(|o| (o.label(), o.is_control()))
        .collect();
        assert_eq!(
            labels,
            [
                ("continuation", false),
                ("text", false),
                ("binary", false),
                ("close", true),
                ("ping", true),
                ("pong", true)
            ]
        );
    }

    #[test]
    fn random_masks_differ() {
        let masks: std::collections::HashSet<[u8; 4]> = (0..16).map(|_| random_mask()).collect();
        assert!(masks.len() > 1);
    }

    /// Feeds `bytes` in the pieces `cuts` makes, then finishes: the verdict of the check.
    fn utf8_in_pieces(bytes: &[u8], cuts: &[usize]) -> Result<(), FrameError> {
        let mut check = Utf8Check::default();
        let mut at = 0;
        for &cut in cuts.iter().chain([bytes.len()].iter()) {
            let cut = cut.clamp(at, bytes.len());
            check.feed(&bytes[at..cut])?;
            at = cut;
        }
        check.finish()
    }

    #[test]
    fn utf8_check_accepts_code_points_cut_at_every_byte() {
        // 1-, 2-, 3- and 4-byte sequences, the edges of each range included.
        let text = "a\u{7f}\u{80}\u{7ff}\u{800}\u{fffd}\u{ffff}\u{10000}\u{10ffff}κόσμε";
        let bytes = text.as_bytes();
        for i in 0..=bytes.len() {
            assert_eq!(utf8_in_pieces(bytes, &[i]), Ok(()), "cut at {i}");
            for j in i..=bytes.len() {
                assert_eq!(utf8_in_pieces(bytes, &[i, j]), Ok(()), "cuts at {i}, {j}");
            }
        }
        // One byte at a time.
        let cuts: Vec<usize> = (0..bytes.len()).collect();
        assert_eq!(utf8_in_pieces(bytes, &cuts), Ok(()));
    }

    #[test]
    fn utf8_check_refuses_what_std_refuses() {
        let bad: [&[u8]; 8] = [
            b"\xff",             // never valid
            b"\xc0\xaf",         // overlong
            b"\xed\xa0\x80",     // surrogate
            b"\xf4\x90\x80\x80", // above U+10FFFF
            b"\xce\xba\xe1\xbd", // ends inside a code point
            b"\x80",             // continuation without a lead
            b"a\xe0\x80",        // bad second byte
            b"\xf0\x9f\x98",     // truncated 4-byte sequence
        ];
        for bytes in bad {
            for i in 0..=bytes.len() {
                assert_eq!(
                    utf8_in_pieces(bytes, &[i]),
                    Err(FrameError::InvalidUtf8),
                    "{bytes:x?} cut at {i}"
                );
            }
        }
    }

    #[test]
    fn utf8_check_fails_as_soon_as_the_bad_byte_arrives() {
        // Autobahn 6.4.x: the first piece is fine, the second breaks the sequence; the
        // verdict must not wait for the rest of the message.
        let mut check = Utf8Check::default();
        assert_eq!(check.feed("κόσμε".as_bytes()), Ok(()));
        assert_eq!(check.feed(b"\xf4"), Ok(()));
        assert_eq!(check.feed(b"\x90"), Err(FrameError::InvalidUtf8));
    }

    proptest::proptest! {
        #[test]
        fn utf8_check_agrees_with_std_for_any_cuts(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            cuts in proptest::collection::vec(0usize..40, 0..6),
        ) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let expected = std::str::from_utf8(&bytes).is_ok();
            proptest::prop_assert_eq!(utf8_in_pieces(&bytes, &cuts).is_ok(), expected);
        }

        #[test]
        fn utf8_check_accepts_any_text_in_any_pieces(
            text in "\\PC{0,20}",
            cuts in proptest::collection::vec(0usize..80, 0..6),
        ) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            proptest::prop_assert_eq!(utf8_in_pieces(text.as_bytes(), &cuts), Ok(()));
        }
    }

    #[test]
    fn masked_ascii_is_seen_through_the_mask_at_any_offset() {
        let key = [0x81, 0x02, 0xf3, 0x44];
        let text = b"plain ascii text, 37 bytes long!!!!!";
        for offset in 0..4u64 {
            let mut masked = text.to_vec();
            apply_mask(&mut masked, key, offset);
            assert!(masked_is_ascii(&masked, key, offset), "offset {offset}");
            for at in [0, 7, 8, 33, text.len() - 1] {
                let mut bytes = text.to_vec();
                bytes[at] = 0xc3;
                apply_mask(&mut bytes, key, offset);
                assert!(
                    !masked_is_ascii(&bytes, key, offset),
                    "offset {offset}, byte {at}"
                );
            }
        }
    }
}
