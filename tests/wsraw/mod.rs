//! A raw WebSocket toolkit for the tunnel and echo suites, written over plain tokio
//! `TcpStream`s with no WebSocket library, so a test can put any byte on the wire (unmasked
//! client frames, reserved opcodes, a header split at every byte, RSV bits) and see every
//! byte wsgate sends back (masks, close codes a library would reject such as 1014).
//!
//! - [`encode`] and friends build frames; [`WsConn`] writes bytes and reads frames back,
//!   each frame as it came (fragments are not joined), with its exact wire bytes.
//! - [`connect`] is a client: it sends an upgrade with a random key and checks the 101.
//! - [`WsUpstream`] is a server: it answers every upgrade with a correct 101 and hands the
//!   socket to the test, which then scripts the upstream frame by frame.
//!
//! Every wait is bounded by [`LIMIT`], so a broken proxy fails a test with a message
//! naming what never arrived instead of hanging the suite.

// Each suite uses a different subset of the toolkit.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Upper bound for any single wait. It only turns a hang into a failure; it never decides
/// a pass.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Pause between two single-byte writes in [`WsConn::send_bytewise`], so each byte leaves
/// in its own TCP segment and the proxy's reads really see the frame in pieces. Pacing,
/// not synchronisation: nothing waits on it to happen.
const BYTEWISE_PAUSE: Duration = Duration::from_millis(1);

/// Largest request or response head the handshakes accept.
const MAX_HEAD: usize = 64 * 1024;

/// RFC 6455 §1.3: appended to the key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Opcodes (RFC 6455 §5.2), as plain numbers so tests can also send reserved ones.
pub mod op {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// RSV1, as the `rsv` argument of [`encode`] (the three RSV bits as 0..=7).
pub const RSV1: u8 = 0b100;

/// Awaits `fut`, failing the test with `what` if it takes longer than [`LIMIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {LIMIT:?} waiting for {what}"),
    }
}

// ---------------------------------------------------------------------------------------
// Encoding

/// A random masking key.
pub fn random_mask() -> [u8; 4] {
    rand::random()
}

/// XORs `data` with `key` (its first byte being payload byte 0).
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// A frame header announcing `len` payload bytes, in the shortest length form.
pub fn encode_header(fin: bool, rsv: u8, opcode: u8, len: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.push((u8::from(fin) << 7) | ((rsv & 0b111) << 4) | (opcode & 0x0F));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out
}

/// A whole frame: header, then `payload` masked with `mask` when given.
pub fn encode(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = encode_header(fin, rsv, opcode, payload.len() as u64, mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key);
    }
    out
}

/// A final, masked frame with a random key, as a client sends it.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode(true, 0, opcode, payload, Some(random_mask()))
}

/// A final, unmasked frame, as a server sends it.
pub fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode(true, 0, opcode, payload, None)
}

/// A close payload: the code big-endian, then the reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// A masked close frame from a client.
pub fn client_close(code: u16, reason: &str) -> Vec<u8> {
    client_frame(op::CLOSE, &close_payload(code, reason))
}

/// An unmasked close frame from a server.
pub fn server_close(code: u16, reason: &str) -> Vec<u8> {
    server_frame(op::CLOSE, &close_payload(code, reason))
}

// ---------------------------------------------------------------------------------------
// Decoding

/// One frame as read off the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// The three RSV bits as 0..=7 (RSV1 = 4).
    pub rsv: u8,
    pub opcode: u8,
    /// The masking key, if the frame was masked.
    pub mask: Option<[u8; 4]>,
    /// The payload, unmasked.
    pub payload: Vec<u8>,
    /// The frame exactly as it was on the wire (header and masked payload).
    pub raw: Vec<u8>,
}

impl Frame {
    /// The status code of a close frame (`None` for an empty close or another opcode).
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == op::CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    /// The reason text of a close frame.
    pub fn close_reason(&self) -> String {
        if self.opcode == op::CLOSE && self.payload.len() >= 2 {
            String::from_utf8_lossy(&self.payload[2..]).into_owned()
        } else {
            String::new()
        }
    }

    /// `(code, reason)` of a close frame; panics with the frame if it is not one.
    pub fn close(&self) -> (u16, String) {
        assert_eq!(
            self.opcode,
            op::CLOSE,
            "expected a close frame, got {self:?}"
        );
        (
            self.close_code()
                .unwrap_or_else(|| panic!("close frame without a code: {self:?}")),
            self.close_reason(),
        )
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.opcode {
            op::CONTINUATION => "continuation".to_string(),
            op::TEXT => "text".to_string(),
            op::BINARY => "binary".to_string(),
            op::CLOSE => "close".to_string(),
            op::PING => "ping".to_string(),
            op::PONG => "pong".to_string(),
            other => format!("opcode {other:#x}"),
        };
        let mut d = f.debug_struct("Frame");
        d.field("op", &name)
            .field("fin", &self.fin)
            .field("rsv", &self.rsv)
            .field("mask", &self.mask)
            .field("len", &self.payload.len());
        if self.opcode == op::CLOSE {
            d.field("code", &self.close_code())
                .field("reason", &self.close_reason());
        } else if self.payload.len() <= 64 {
            d.field("payload", &String::from_utf8_lossy(&self.payload));
        }
        d.finish()
    }
}

/// Parses one frame from the start of `buf`: `Some((frame, bytes used))`, or `None` when
/// `buf` does not hold a whole frame yet.
pub fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    let mut at = 2;
    let len = match b1 & 0x7F {
        126 => {
            let b = buf.get(at..at + 2)?;
            at += 2;
            u64::from(u16::from_be_bytes([b[0], b[1]]))
        }
        127 => {
            let b = buf.get(at..at + 8)?;
            at += 8;
            u64::from_be_bytes(b.try_into().unwrap())
        }
        n => u64::from(n),
    };
    let mask = if b1 & 0x80 != 0 {
        let key: [u8; 4] = buf.get(at..at + 4)?.try_into().unwrap();
        at += 4;
        Some(key)
    } else {
        None
    };
    let len = usize::try_from(len).expect("frame length fits in memory");
    let end = at.checked_add(len)?;
    let mut payload = buf.get(at..end)?.to_vec();
    if let Some(key) = mask {
        apply_mask(&mut payload, key);
    }
    let frame = Frame {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0b111,
        opcode: b0 & 0x0F,
        mask,
        payload,
        raw: buf[..end].to_vec(),
    };
    Some((frame, end))
}

/// Parses a whole byte stream into frames (panics on a trailing partial frame).
pub fn parse_all(mut bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let (frame, used) = parse_frame(bytes)
            .unwrap_or_else(|| panic!("{} bytes of a partial frame", bytes.len()));
        frames.push(frame);
        bytes = &bytes[used..];
    }
    frames
}

// ---------------------------------------------------------------------------------------
// Connections

/// How a connection ended when read to its end.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Orderly close (FIN).
    Eof,
    /// Reset or another read error.
    Error(std::io::ErrorKind),
}

/// The reading half of a WebSocket connection, with whatever it read ahead.
pub struct WsReader {
    io: OwnedReadHalf,
    buf: Vec<u8>,
}

impl WsReader {
    /// Reads more bytes into the buffer; `Ok(false)` at EOF.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = self.io.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The next frame; `Ok(None)` at EOF on a frame boundary, an error on EOF inside a frame.
    pub async fn try_frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("EOF after {} bytes of a partial frame", self.buf.len()),
                ));
            }
        }
    }

    /// The next frame; fails the test on EOF, an error, or after [`LIMIT`].
    pub async fn frame(&mut self, what: &str) -> Frame {
        match within(what, self.try_frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => panic!("the connection ended before {what}"),
            Err(e) => panic!("read failed before {what}: {e}"),
        }
    }

    /// Exactly `n` bytes, whatever frames they hold.
    pub async fn bytes(&mut self, n: usize, what: &str) -> Vec<u8> {
        within(what, async {
            while self.buf.len() < n {
                match self.fill().await {
                    Ok(true) => {}
                    Ok(false) => panic!(
                        "the connection ended after {} of {n} bytes of {what}",
                        self.buf.len()
                    ),
                    Err(e) => panic!(
                        "read failed after {} of {n} bytes of {what}: {e}",
                        self.buf.len()
                    ),
                }
            }
            self.buf.drain(..n).collect()
        })
        .await
    }

    /// Reads to the end of the stream; returns the whole frames that came and how it ended.
    /// Fails the test if a partial frame is left over.
    pub async fn until_eof(&mut self, what: &str) -> (Vec<Frame>, Ended) {
        within(what, async {
            let mut frames = Vec::new();
            loop {
                while let Some((frame, used)) = parse_frame(&self.buf) {
                    self.buf.drain(..used);
                    frames.push(frame);
                }
                match self.fill().await {
                    Ok(true) => {}
                    Ok(false) => {
                        assert!(
                            self.buf.is_empty(),
                            "{what}: EOF after {} bytes of a partial frame",
                            self.buf.len()
                        );
                        return (frames, Ended::Eof);
                    }
                    Err(e) => return (frames, Ended::Error(e.kind())),
                }
            }
        })
        .await
    }
}

/// The writing half of a WebSocket connection.
pub struct WsWriter {
    io: OwnedWriteHalf,
}

impl WsWriter {
    /// Writes `bytes` in one go.
    pub async fn send(&mut self, bytes: &[u8]) {
        within("a write", self.io.write_all(bytes))
            .await
            .expect("write to the peer");
    }

    /// Writes `bytes` without failing the test (the peer may be gone).
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        within("a write", self.io.write_all(bytes)).await
    }

    /// Writes `bytes` one byte per write, pausing between them.
    pub async fn send_bytewise(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.send(std::slice::from_ref(b)).await;
            tokio::time::sleep(BYTEWISE_PAUSE).await;
        }
    }
}

/// One side of an upgraded WebSocket connection (client or upstream).
pub struct WsConn {
    /// The request head (upstream side) or response head (client side), without the
    /// final blank line.
    pub head: String,
    pub reader: WsReader,
    pub writer: WsWriter,
}

impl WsConn {
    fn new(stream: TcpStream, head: String, early: Vec<u8>) -> WsConn {
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        let (rd, wr) = stream.into_split();
        WsConn {
            head,
            reader: WsReader { io: rd, buf: early },
            writer: WsWriter { io: wr },
        }
    }

    /// The request target of the head (upstream side): `GET /ws HTTP/1.1` -> `/ws`.
    pub fn path(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or_default()
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.send(bytes).await
    }

    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.try_send(bytes).await
    }

    pub async fn send_bytewise(&mut self, bytes: &[u8]) {
        self.writer.send_bytewise(bytes).await
    }

    pub async fn frame(&mut self, what: &str) -> Frame {
        self.reader.frame(what).await
    }

    pub async fn bytes(&mut self, n: usize, what: &str) -> Vec<u8> {
        self.reader.bytes(n, what).await
    }

    pub async fn until_eof(&mut self, what: &str) -> (Vec<Frame>, Ended) {
        self.reader.until_eof(what).await
    }

    /// Reads the next frame and asserts it is a close with `code` and `reason`; returns it.
    pub async fn expect_close(&mut self, code: u16, reason: &str, what: &str) -> Frame {
        let frame = self.frame(what).await;
        assert_eq!(
            frame.close(),
            (code, reason.to_string()),
            "{what}: {frame:?}"
        );
        frame
    }

    /// Ends the connection with a TCP reset (SO_LINGER 0), as a crashed peer does.
    pub fn reset(self) {
        let stream = self
            .reader
            .io
            .reunite(self.writer.io)
            .expect("the two halves of one stream");
        stream.set_zero_linger().expect("SO_LINGER 0");
        drop(stream);
    }

    pub fn split(self) -> (WsReader, WsWriter) {
        (self.reader, self.writer)
    }
}

/// Reads until the end of a head; returns it (without the blank line) and the bytes after.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Ok((head, buf[end + 4..].to_vec()));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("head too large"));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {} bytes of a head", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of header `name` (any case) in a head.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID);
    BASE64.encode(sha.finalize())
}

/// Opens a WebSocket to `addr` at `path` and checks the 101 and its accept key.
pub async fn connect(addr: SocketAddr, path: &str) -> WsConn {
    connect_with(addr, path, "").await
}

/// [`connect`] with extra request header lines (each ending in CRLF), e.g. an extension offer.
pub async fn connect_with(addr: SocketAddr, path: &str, extra: &str) -> WsConn {
    within("a WebSocket handshake", async {
        let mut stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        let key = BASE64.encode(rand::random::<[u8; 16]>());
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{extra}\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the upgrade request");
        let (head, early) = read_head(&mut stream)
            .await
            .unwrap_or_else(|e| panic!("no answer to the upgrade of {path}: {e}"));
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "expected a 101 for {path}, got:\n{head}"
        );
        assert_eq!(
            header(&head, "sec-websocket-accept"),
            Some(accept_key(&key).as_str()),
            "wrong accept key in:\n{head}"
        );
        WsConn::new(stream, head, early)
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Upstream

/// A WebSocket server that answers every upgrade with a correct 101 and hands each
/// upgraded socket to the test through [`WsUpstream::accept`]. Stops when dropped.
pub struct WsUpstream {
    pub addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<WsConn>,
    task: JoinHandle<()>,
}

impl WsUpstream {
    pub async fn spawn() -> WsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let (tx, conns) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let Ok((head, early)) = read_head(&mut stream).await else {
                        return;
                    };
                    let key = header(&head, "sec-websocket-key").unwrap_or_default();
                    // Agrees to whatever extensions the client offered.
                    let extensions = header(&head, "sec-websocket-extensions")
                        .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
                        .unwrap_or_default();
                    let answer = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
                         Upgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n{extensions}\r\n",
                        accept_key(key)
                    );
                    if stream.write_all(answer.as_bytes()).await.is_ok() {
                        let _ = tx.send(WsConn::new(stream, head, early));
                    }
                });
            }
        });
        WsUpstream { addr, conns, task }
    }

    /// The next upgraded connection.
    pub async fn accept(&mut self) -> WsConn {
        within("an upgraded upstream connection", self.conns.recv())
            .await
            .expect("the upstream accept loop stopped")
    }
}

impl Drop for WsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
