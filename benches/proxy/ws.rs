//! Just enough WebSocket for the harness: the HTTP/1.1 upgrade (both sides), frame headers and
//! masking. Written here, not borrowed from wsgate, so the load never shares a bug with the
//! proxy it measures.

use std::io;

use base64::Engine as _;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// RFC 6455 section 1.3.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest request or response head the harness reads; real ones here are a few hundred bytes.
pub const MAX_HEAD: usize = 16 * 1024;

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The mask key of every client frame the harness sends. Any key is valid; a fixed one lets a
/// connection build its message once and resend the same bytes.
pub const CLIENT_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Checks [`accept_key`] against the example of RFC 6455 section 1.3: a harness whose
/// client and upstream agreed on a wrong key would still work directly but fail through
/// every proxy that checks the answer.
pub fn self_check() -> anyhow::Result<()> {
    let got = accept_key(b"dGhlIHNhbXBsZSBub25jZQ==");
    anyhow::ensure!(
        got == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
        "accept_key is wrong: {got}"
    );
    Ok(())
}

/// A fresh `Sec-WebSocket-Key` (16 random bytes, base64).
pub fn new_key() -> String {
    let bytes: [u8; 16] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    pub header_len: usize,
}

/// Parses the frame header at the start of `buf`; `None` when more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Option<Head> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (payload_len, mut at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        if buf.len() < at + 4 {
            return None;
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Some(Head {
        fin,
        opcode,
        mask,
        payload_len,
        header_len: at,
    })
}

/// Appends a frame header to `out`.
pub fn put_head(out: &mut Vec<u8>, fin: bool, opcode: u8, len: u64, mask: Option<[u8; 4]>) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u16::MAX as u64 {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(m) = mask {
        out.extend_from_slice(&m);
    }
}

/// XORs `data` with `mask`, `offset` bytes into the payload; eight bytes at a time.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut rotated = [0u8; 4];
    for (i, r) in rotated.iter_mut().enumerate() {
        *r = mask[(offset + i) % 4];
    }
    let word = u32::from_ne_bytes(rotated);
    let wide = (word as u64) | ((word as u64) << 32);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= rotated[i % 4];
    }
}

/// A whole client frame (masked with [`CLIENT_MASK`]).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    put_head(
        &mut out,
        true,
        opcode,
        payload.len() as u64,
        Some(CLIENT_MASK),
    );
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], CLIENT_MASK, 0);
    out
}

/// Reads an HTTP head (up to and including the blank line) into `buf`. Returns the head's
/// length; bytes after it (early frames) stay in `buf`.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = find_blank_line(buf) {
            return Ok(end);
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed during the HTTP head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// [`read_head`] within `limit`: a client silent in a head is dropped.
async fn head_within<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    limit: std::time::Duration,
) -> io::Result<usize> {
    tokio::time::timeout(limit, read_head(s, buf))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "slow head"))?
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The value of header `name` (case-insensitive) in an HTTP head.
pub fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(name.as_bytes()) {
            return Some(line[colon + 1..].trim_ascii());
        }
    }
    None
}

/// Client side of the upgrade: sends the request (with `extra`, whole header lines each ending
/// in CRLF, e.g. an `Authorization`), checks the 101 and its accept key. Returns bytes that
/// arrived after the response head.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
    extra: &str,
) -> io::Result<Vec<u8>> {
    let key = new_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://{host}\r\n\
         {extra}\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let end = read_head(s, &mut buf).await?;
    let head = &buf[..end];
    if !head.starts_with(b"HTTP/1.1 101") {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        // An auth refusal says why in its challenge.
        let challenge = header(head, "www-authenticate")
            .map(|v| format!(" (WWW-Authenticate: {})", String::from_utf8_lossy(v)))
            .unwrap_or_default();
        return Err(io::Error::other(format!(
            "upgrade refused: {}{challenge}",
            String::from_utf8_lossy(line)
        )));
    }
    let expected = accept_key(key.as_bytes());
    if header(head, "sec-websocket-accept") != Some(expected.as_bytes()) {
        return Err(io::Error::other("wrong Sec-WebSocket-Accept"));
    }
    Ok(buf.split_off(end))
}

/// The plain HTTP answer of the echo upstream: a small page, as a static file would be.
pub const PLAIN_BODY: &[u8] = b"hello from the benchmark upstream\n";

/// Server side of the upgrade: reads the request, answers 101. Returns early frame bytes.
/// A request that is not an upgrade gets [`PLAIN_BODY`] instead, and the connection serves
/// such requests (keep-alive) until the client closes it; the answer is then an error.
/// `answered` is called after each answer is written, with `true` for the 101.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    head_timeout: std::time::Duration,
    answered: &mut (dyn FnMut(bool) + Send),
) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut end = head_within(s, &mut buf, head_timeout).await?;
    while header(&buf[..end], "sec-websocket-key").is_none() {
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            PLAIN_BODY.len()
        );
        let mut out = answer.into_bytes();
        out.extend_from_slice(PLAIN_BODY);
        s.write_all(&out).await?;
        answered(false);
        // Requests carry no body here: the next head follows at once.
        buf.drain(..end);
        end = head_within(s, &mut buf, head_timeout).await?;
    }
    let Some(key) = header(&buf[..end], "sec-websocket-key") else {
        return Err(io::Error::other("not a WebSocket upgrade"));
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    );
    s.write_all(response.as_bytes()).await?;
    answered(true);
    Ok(buf.split_off(end))
}

/// The reading side of a client connection: frames from the server, unmasked.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// A frame read by [`FrameReader::read_frame`]; its payload is `reader.payload(&frame)`.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub opcode: u8,
    at: usize,
    len: usize,
}

impl FrameReader {
    /// `early`: bytes that came with the handshake response; `capacity`: the largest frame
    /// expected (the buffer grows past it if needed).
    pub fn new(early: Vec<u8>, capacity: usize) -> Self {
        let mut buf = early;
        let end = buf.len();
        buf.resize(capacity.max(end) + 64, 0);
        FrameReader { buf, start: 0, end }
    }

    pub fn payload(&self, frame: &Frame) -> &[u8] {
        &self.buf[frame.at..frame.at + frame.len]
    }

    /// The next whole frame. Pings are answered with pongs on `w` (which may be the same
    /// stream); pongs are skipped. EOF before a whole frame is an `UnexpectedEof` error.
    pub async fn read_frame<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
    ) -> io::Result<Frame> {
        loop {
            if let Some(head) = parse_head(&self.buf[self.start..self.end]) {
                let total = head.header_len + head.payload_len as usize;
                if self.end - self.start >= total {
                    let at = self.start + head.header_len;
                    let len = head.payload_len as usize;
                    self.start += total;
                    if let Some(m) = head.mask {
                        apply_mask(&mut self.buf[at..at + len], m, 0);
                    }
                    match head.opcode {
                        OP_PING => {
                            let pong = client_frame(OP_PONG, &self.buf[at..at + len]);
                            s.write_all(&pong).await?;
                            continue;
                        }
                        OP_PONG => continue,
                        opcode => return Ok(Frame { opcode, at, len }),
                    }
                }
                if total > self.buf.len() {
                    self.buf.resize(total + 64, 0);
                }
            }
            // Need more: compact, then read.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                let len = self.buf.len();
                self.buf.resize(len * 2, 0);
            }
            let n = s.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-stream",
                ));
            }
            self.end += n;
        }
    }
}
