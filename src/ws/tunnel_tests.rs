//! The tunnel on its own, over in-memory streams and tokio's paused clock: every row of
//! design.md's tunnel table with exact timing, validation both ways, fragmented messages
//! with control frames between fragments, and headers cut at every byte.
//!
//! The test holds the far ends of two `tokio::io::duplex` pipes and plays the client and
//! the upstream by hand. With the clock paused, tokio jumps straight to the next timer
//! whenever every task waits, so a timer that fires 1 ms early or late fails the test.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

use crate::config::{Limits, Rate, Timeouts};
use crate::metrics::Metrics;
use crate::ws::codec::{self, OpCode, MAX_HEADER_LEN};
use crate::ws::keepalive::PING_PAYLOAD_LEN;
use crate::ws::record::{CloseRequest, ConnRecord, Identity};
use crate::ws::tunnel::{Outcome, SideEnd, Tunnel, TunnelSettings};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const PIPE: usize = 256 * 1024;

/// Timeouts with every timer far away, so a test turns on only the ones it looks at.
fn quiet() -> Timeouts {
    Timeouts {
        idle: Duration::from_secs(10_000),
        ping_interval: None,
        upstream_ping_interval: None,
        pong_timeout: Duration::from_secs(10),
        close: Duration::from_secs(5),
        ..Timeouts::default()
    }
}

struct Harness {
    /// The test's end of the client connection.
    client: DuplexStream,
    /// The test's end of the upstream connection.
    upstream: DuplexStream,
    record: Arc<ConnRecord>,
    tunnel: JoinHandle<Outcome>,
    started: Instant,
}

fn start(timeouts: Timeouts, limits: Limits) -> Harness {
    start_with(TunnelSettings::new(timeouts, &limits, false))
}

fn start_with(settings: TunnelSettings) -> Harness {
    let (client, client_side) = tokio::io::duplex(PIPE);
    let (upstream, upstream_side) = tokio::io::duplex(PIPE);
    let metrics = Metrics::new();
    let identity = Identity {
        id: 1,
        client: SocketAddr::from(([127, 0, 0, 1], 40000)),
        listener: Arc::from("test"),
        route: Arc::from("test"),
        upstream: None,
        server: None,
        http_version: "1.1",
        subprotocol: None,
        started: std::time::Instant::now(),
    };
    let record = Arc::new(ConnRecord::new(identity, Arc::new(metrics.route("test"))));
    let started = Instant::now();
    let tunnel = tokio::spawn(Tunnel::new(
        client_side,
        Bytes::new(),
        upstream_side,
        Bytes::new(),
        settings,
        record.clone(),
    ));
    Harness {
        client,
        upstream,
        record,
        tunnel,
        started,
    }
}

impl Harness {
    fn elapsed(&self) -> Duration {
        Instant::now() - self.started
    }

    async fn outcome(self) -> Outcome {
        let Harness {
            client,
            upstream,
            tunnel,
            ..
        } = self;
        // The peers hang up, so the tunnel's lingering read ends too.
        drop((client, upstream));
        match tunnel.await {
            Ok(outcome) => outcome,
            Err(e) => panic!("tunnel task failed: {e}"),
        }
    }
}

/// One frame as it goes on the wire.
fn frame(opcode: OpCode, fin: bool, rsv: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut head = [0u8; MAX_HEADER_LEN];
    let n = codec::encode_header(fin, rsv, opcode, payload.len() as u64, mask, &mut head);
    let mut out = head[..n].to_vec();
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        codec::apply_mask(&mut out[start..], key, 0);
    }
    out
}

/// A client frame (masked).
fn from_client(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    frame(opcode, fin, 0, payload, Some(MASK))
}

/// An upstream frame (unmasked).
fn from_upstream(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    frame(opcode, fin, 0, payload, None)
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut out = code.to_be_bytes().to_vec();
    out.extend_from_slice(reason.as_bytes());
    out
}

/// A frame as read: opcode, FIN, whether it was masked, the unmasked payload.
#[derive(Debug, PartialEq, Eq)]
struct Read {
    opcode: OpCode,
    fin: bool,
    masked: bool,
    payload: Vec<u8>,
}

impl Read {
    fn close(&self) -> (u16, String) {
        assert_eq!(
            self.opcode,
            OpCode::Close,
            "expected a close frame: {self:?}"
        );
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        (
            code,
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        )
    }
}

async fn read_frame(io: &mut DuplexStream) -> Read {
    let mut head = [0u8; 2];
    io.read_exact(&mut head).await.expect("a frame header");
    let fin = head[0] & 0x80 != 0;
    let opcode = OpCode::from_u8(head[0] & 0x0f).expect("a known opcode");
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7f {
        126 => u64::from(io.read_u16().await.expect("16-bit length")),
        127 => io.read_u64().await.expect("64-bit length"),
        n => u64::from(n),
    };
    let mut key = [0u8; 4];
    if masked {
        io.read_exact(&mut key).await.expect("mask key");
    }
    let mut payload = vec![0u8; len as usize];
    io.read_exact(&mut payload).await.expect("payload");
    if masked {
        codec::apply_mask(&mut payload, key, 0);
    }
    Read {
        opcode,
        fin,
        masked,
        payload,
    }
}

/// Reads until EOF, asserting nothing but EOF comes.
async fn expect_eof(io: &mut DuplexStream) {
    let mut rest = Vec::new();
    io.read_to_end(&mut rest).await.expect("read to EOF");
    assert!(rest.is_empty(), "unexpected bytes before EOF: {rest:x?}");
}

/// The client answers a close the way a browser does: the same code back.
async fn answer_close(io: &mut DuplexStream, code: u16) {
    io.write_all(&from_client(OpCode::Close, true, &code.to_be_bytes()))
        .await
        .expect("write close");
}

// ---- relaying --------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn frames_cross_unchanged_both_ways_and_a_close_handshake_ends_it() {
    let mut h = start(quiet(), Limits::default());
    let text = from_client(OpCode::Text, true, "héllo".as_bytes());
    h.client.write_all(&text).await.unwrap();
    let mut got = vec![0u8; text.len()];
    h.upstream.read_exact(&mut got).await.unwrap();
    assert_eq!(got, text, "masks included, bytes unchanged");

    let reply = from_upstream(OpCode::Binary, true, &[1, 2, 3]);
    h.upstream.write_all(&reply).await.unwrap();
    let mut got = vec![0u8; reply.len()];
    h.client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, reply);

    h.client
        .write_all(&from_client(
            OpCode::Close,
            true,
            &close_payload(1000, "bye"),
        ))
        .await
        .unwrap();
    assert_eq!(
        read_frame(&mut h.upstream).await.close(),
        (1000, "bye".into())
    );
    h.upstream
        .write_all(&from_upstream(OpCode::Close, true, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut h.client).await.close().0, 1000);
    let outcome = h.outcome().await;
    assert_eq!(outcome.code, Some(1000));
    assert_eq!(outcome.client_end, SideEnd::Close);
    assert_eq!(outcome.upstream_end, SideEnd::Close);
}

#[tokio::test(start_paused = true)]
async fn a_header_cut_at_every_byte_crosses_whole() {
    // A 16-bit length and a mask: an 8-byte header, then 200 bytes of text.
    let payload = "ü".repeat(100);
    let bytes = from_client(OpCode::Text, true, payload.as_bytes());
    for cut in 1..bytes.len() {
        let mut h = start(quiet(), Limits::default());
        h.client.write_all(&bytes[..cut]).await.unwrap();
        // Let the tunnel read the first piece on its own.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        h.client.write_all(&bytes[cut..]).await.unwrap();
        let mut got = vec![0u8; bytes.len()];
        h.upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, bytes, "cut at {cut}");
    }
}

#[tokio::test(start_paused = true)]
async fn control_frames_between_fragments_are_relayed_in_order() {
    let mut h = start(quiet(), Limits::default());
    let frames = [
        from_client(OpCode::Text, false, "κό".as_bytes()),
        from_client(OpCode::Ping, true, b"p1"),
        // "σ" split across two fragments, and across two writes below.
        from_client(OpCode::Continuation, false, &"σμ".as_bytes()[..3]),
        from_client(OpCode::Pong, true, b"unsolicited"),
        from_client(OpCode::Continuation, true, &"σμε".as_bytes()[3..]),
    ];
    for f in &frames {
        let (a, b) = f.split_at(f.len() / 2);
        h.client.write_all(a).await.unwrap();
        tokio::task::yield_now().await;
        h.client.write_all(b).await.unwrap();
    }
    let mut text = Vec::new();
    let mut order = Vec::new();
    for _ in 0..frames.len() {
        let f = read_frame(&mut h.upstream).await;
        order.push(f.opcode);
        if !f.opcode.is_control() {
            text.extend_from_slice(&f.payload);
        }
    }
    assert_eq!(
        order,
        [
            OpCode::Text,
            OpCode::Ping,
            OpCode::Continuation,
            OpCode::Pong,
            OpCode::Continuation
        ]
    );
    assert_eq!(String::from_utf8(text).unwrap(), "κόσμε");
}

// ---- keepalive, idle and close timers -----------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_ping_goes_out_at_ping_interval_and_its_pong_is_consumed() {
    let interval = Duration::from_secs(30);
    let mut h = start(
        Timeouts {
            ping_interval: Some(interval),
            ..quiet()
        },
        Limits::default(),
    );
    let ping = read_frame(&mut h.client).await;
    assert_eq!(ping.opcode, OpCode::Ping);
    assert!(!ping.masked);
    assert_eq!(ping.payload.len(), PING_PAYLOAD_LEN);
    assert_eq!(h.elapsed(), interval, "not before, not later");

    // The pong answers it 40 ms later: consumed, its round trip recorded.
    tokio::time::sleep(Duration::from_millis(40)).await;
    h.client
        .write_all(&from_client(OpCode::Pong, true, &ping.payload))
        .await
        .unwrap();
    // The next ping is due one interval after the pong (the last frame heard).
    let second = read_frame(&mut h.client).await;
    assert_eq!(second.opcode, OpCode::Ping);
    assert_eq!(h.elapsed(), interval * 2 + Duration::from_millis(40));
    assert_eq!(
        h.record
            .ping_rtt_us
            .load(std::sync::atomic::Ordering::Relaxed),
        40_000
    );
    // Nothing of it reached the upstream: the next thing it sees is the client's data.
    h.client
        .write_all(&from_client(OpCode::Binary, true, b"x"))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut h.upstream).await.payload, b"x");
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_at_ping_interval_plus_pong_timeout() {
    let (interval, pong) = (Duration::from_secs(30), Duration::from_secs(10));
    let mut h = start(
        Timeouts {
            ping_interval: Some(interval),
            pong_timeout: pong,
            ..quiet()
        },
        Limits::default(),
    );
    assert_eq!(read_frame(&mut h.client).await.opcode, OpCode::Ping);
    assert_eq!(h.elapsed(), interval);
    let close = read_frame(&mut h.client).await;
    assert_eq!(close.close(), (1001, "ping timeout".into()));
    assert_eq!(h.elapsed(), interval + pong);
    // Not client-first: the upstream hears at the same instant.
    let up = read_frame(&mut h.upstream).await;
    assert!(up.masked);
    assert_eq!(up.close(), (1001, "client unresponsive".into()));
    assert_eq!(h.elapsed(), interval + pong);
    let outcome = h.outcome().await;
    assert_eq!(outcome.pong_timeouts, 1);
    assert_eq!(outcome.client_end, SideEnd::Timeout);
}

#[tokio::test(start_paused = true)]
async fn a_silent_upstream_is_closed_at_its_ping_interval_plus_pong_timeout() {
    let (interval, pong) = (Duration::from_secs(20), Duration::from_secs(7));
    let mut h = start(
        Timeouts {
            upstream_ping_interval: Some(interval),
            pong_timeout: pong,
            ..quiet()
        },
        Limits::default(),
    );
    let ping = read_frame(&mut h.upstream).await;
    assert_eq!((ping.opcode, ping.masked), (OpCode::Ping, true));
    assert_eq!(h.elapsed(), interval);
    assert_eq!(
        read_frame(&mut h.upstream).await.close(),
        (1001, "ping timeout".into())
    );
    assert_eq!(h.elapsed(), interval + pong);
    assert_eq!(
        read_frame(&mut h.client).await.close(),
        (1014, "upstream unresponsive".into())
    );
    assert_eq!(h.outcome().await.upstream_end, SideEnd::Timeout);
}

#[tokio::test(start_paused = true)]
async fn an_expiring_token_closes_the_tunnel_at_expiry_exactly() {
    // close_on_expiry: 1008 to the client at the token's exp + leeway, through traffic and
    // keepalive pings, then 1001 to the upstream once the client answered.
    let expiry = Duration::from_secs(90);
    let timeouts = Timeouts {
        ping_interval: Some(Duration::from_secs(30)),
        ..quiet()
    };
    let settings = TunnelSettings::new(timeouts, &Limits::default(), false).expiring(Some(expiry));
    let mut h = start_with(settings);
    for _ in 0..3 {
        // Pings at 30 s and 60 s, answered; the third frame the client sees is the close.
        let read = read_frame(&mut h.client).await;
        if read.opcode == OpCode::Close {
            assert_eq!(read.close(), (1008, "token expired".into()));
            break;
        }
        assert_eq!(read.opcode, OpCode::Ping);
        assert!(h.elapsed() < expiry, "pinged at {:?}", h.elapsed());
        h.client
            .write_all(&from_client(OpCode::Pong, true, &read.payload))
            .await
            .unwrap();
    }
    assert_eq!(h.elapsed(), expiry);
    answer_close(&mut h.client, 1008).await;
    assert_eq!(
        read_frame(&mut h.upstream).await.close(),
        (1001, "token expired".into())
    );
    answer_close(&mut h.upstream, 1001).await;
    let outcome = h.outcome().await;
    assert_eq!(outcome.initiator, crate::ws::side::Initiator::Proxy);
    assert_eq!(outcome.code, Some(1008));
    assert_eq!(outcome.reason, "token expired");
}

#[tokio::test(start_paused = true)]
async fn no_expiry_keeps_the_tunnel_open() {
    let settings = TunnelSettings::new(quiet(), &Limits::default(), false).expiring(None);
    assert_eq!(settings.expires_in_ms, 0);
    let mut h = start_with(settings);
    tokio::time::sleep(Duration::from_secs(5_000)).await;
    h.client
        .write_all(&from_client(OpCode::Text, true, b"still here"))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut h.upstream).await.payload, b"still here");
}

#[tokio::test(start_paused = true)]
async fn idle_closes_the_client_first_and_its_last_message_still_reaches_the_upstream() {
    let idle = Duration::from_secs(60);
    let mut h = start(Timeouts { idle, ..quiet() }, Limits::default());
    // Data at 10 s pushes the idle deadline to 70 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    h.client
        .write_all(&from_client(OpCode::Text, true, b"early"))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut h.upstream).await.payload, b"early");
    let close = read_frame(&mut h.client).await;
    assert_eq!(close.close(), (1001, "idle timeout".into()));
    assert_eq!(h.elapsed(), idle + Duration::from_secs(10));
    // The client had a message in flight: it still reaches the upstream, then the
    // upstream gets wsgate's close (not the client's answer).
    h.client
        .write_all(&from_client(OpCode::Text, true, b"last words"))
        .await
        .unwrap();
    answer_close(&mut h.client, 1001).await;
    assert_eq!(read_frame(&mut h.upstream).await.payload, b"last words");
    assert_eq!(
        read_frame(&mut h.upstream).await.close(),
        (1001, "idle timeout".into())
    );
    // The upstream's message after the client closed cannot be delivered: counted.
    h.upstream
        .write_all(&from_upstream(OpCode::Text, true, b"too late"))
        .await
        .unwrap();
    h.upstream
        .write_all(&from_upstream(OpCode::Close, true, &1001u16.to_be_bytes()))
        .await
        .unwrap();
    expect_eof(&mut h.client).await;
    let outcome = h.outcome().await;
    assert_eq!(outcome.idle_timeouts, 1);
    assert_eq!(outcome.undeliverable, [0, 1]);
    assert_eq!(outcome.code, Some(1001));
}

#[tokio::test(start_paused = true)]
async fn a_drain_waits_timeouts_close_for_the_client_then_closes_the_upstream() {
    let close = Duration::from_secs(5);
    let mut h = start(quiet(), Limits::default());
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.record.request_close(CloseRequest::Drain);
    assert_eq!(
        read_frame(&mut h.client).await.close(),
        (1001, "going away".into())
    );
    assert_eq!(h.elapsed(), Duration::from_secs(3));
    // The client never answers: the upstream gets its close at `close`, not before.
    assert_eq!(
        read_frame(&mut h.upstream).await.close(),
        (1001, "going away".into())
    );
    assert_eq!(h.elapsed(), Duration::from_secs(3) + close);
    // And the upstream does not answer either: both are shut one `close` later.
    expect_eof(&mut h.upstream).await;
    assert_eq!(h.elapsed(), Duration::from_secs(3) + close * 2);
    let outcome = h.outcome().await;
    assert_eq!(outcome.code, Some(1001));
    assert_eq!(outcome.reason, "going away");
}

#[tokio::test(start_paused = true)]
async fn a_close_frame_unanswered_for_timeouts_close_shuts_both_sides() {
    let close = Duration::from_secs(5);
    let mut h = start(quiet(), Limits::default());
    h.client
        .write_all(&from_client(OpCode::Close, true, &close_payload(1000, "")))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut h.upstream).await.close().0, 1000);
    // The upstream never answers: the client's socket is shut at `close`.
    expect_eof(&mut h.client).await;
    assert_eq!(h.elapsed(), close);
}

// ---- validation, client side --------------------------------------------------------------

/// Sends `bytes` from the client and expects the close of the table both ways, with
/// nothing else reaching the upstream first.
async fn client_violation(bytes: &[u8], code: u16, reason: &str) {
    client_violation_with(start(quiet(), Limits::default()), bytes, code, reason).await
}

async fn client_violation_with(mut h: Harness, bytes: &[u8], code: u16, reason: &str) {
    h.client.write_all(bytes).await.unwrap();
    assert_eq!(
        read_frame(&mut h.client).await.close(),
        (code, reason.into())
    );
    let up = read_frame(&mut h.upstream).await;
    assert_eq!(
        up.close(),
        (1001, "client error".into()),
        "upstream after {bytes:x?}"
    );
    assert_eq!(h.elapsed(), Duration::ZERO);
    answer_close(&mut h.client, code).await;
    let outcome = h.outcome().await;
    assert_eq!(outcome.code, Some(code));
    assert_eq!(outcome.client_end, SideEnd::Protocol);
}

#[tokio::test(start_paused = true)]
async fn client_frames_that_break_the_protocol_get_1002() {
    for bytes in [
        from_upstream(OpCode::Text, true, b"unmasked"),
        frame(OpCode::Text, true, 0b100, b"rsv1", Some(MASK)),
        frame(OpCode::Binary, true, 0b001, b"rsv3", Some(MASK)),
        from_client(OpCode::Continuation, true, b"nothing to continue"),
        from_client(OpCode::Ping, false, b"fragmented ping"),
        vec![0x83, 0x80, 0, 0, 0, 0], // reserved opcode 3
        from_client(OpCode::Close, true, &[0x03]),
        from_client(OpCode::Close, true, &1005u16.to_be_bytes()),
        from_client(OpCode::Close, true, &1006u16.to_be_bytes()),
        from_client(OpCode::Close, true, &1015u16.to_be_bytes()),
        from_client(OpCode::Close, true, &999u16.to_be_bytes()),
        from_client(OpCode::Close, true, &5000u16.to_be_bytes()),
    ] {
        client_violation(&bytes, 1002, "protocol error").await;
    }
}

#[tokio::test(start_paused = true)]
async fn invalid_utf8_from_the_client_gets_1007_and_never_reaches_the_upstream() {
    let mut bad_reason = 1000u16.to_be_bytes().to_vec();
    bad_reason.extend_from_slice(b"\xff");
    for bytes in [
        from_client(OpCode::Text, true, b"ok \xc0\xaf"),
        from_client(OpCode::Text, true, b"\xed\xa0\x80"),
        // A message that ends inside a code point, over two frames.
        [
            from_client(OpCode::Text, false, "κ".as_bytes()),
            from_client(OpCode::Continuation, true, b"\xce"),
        ]
        .concat(),
        from_client(OpCode::Close, true, &bad_reason),
    ] {
        let first_frame_ok = bytes.len() > 8 && bytes[0] == 0x01;
        if first_frame_ok {
            // The valid first fragment is relayed; the bad one is not.
            let mut h = start(quiet(), Limits::default());
            h.client.write_all(&bytes).await.unwrap();
            assert_eq!(read_frame(&mut h.upstream).await.payload, "κ".as_bytes());
            assert_eq!(
                read_frame(&mut h.client).await.close(),
                (1007, "invalid UTF-8".into())
            );
            assert_eq!(
                read_frame(&mut h.upstream).await.close(),
                (1001, "client error".into())
            );
            continue;
        }
        client_violation(&bytes, 1007, "invalid UTF-8").await;
    }
}

#[tokio::test(start_paused = true)]
async fn invalid_utf8_is_caught_as_soon_as_it_arrives() {
    // One 40-byte frame whose 5th byte is invalid; the rest never comes.
    let payload = [b"abcd\xff".as_slice(), &[b'a'; 35]].concat();
    let bytes = from_client(OpCode::Text, true, &payload);
    let mut h = start(quiet(), Limits::default());
    h.client.write_all(&bytes[..6 + 5]).await.unwrap();
    assert_eq!(
        read_frame(&mut h.client).await.close(),
        (1007, "invalid UTF-8".into())
    );
    assert_eq!(
        read_frame(&mut h.upstream).await.close(),
        (1001, "client error".into())
    );
}

#[tokio::test(start_paused = true)]
async fn compressed_text_and_binary_are_not_checked() {
    let settings = TunnelSettings::new(quiet(), &Limits::default(), false)
        .with_extensions(["permessage-deflate"]);
    let mut h = start_with(settings);
    let compressed = frame(OpCode::Text, true, 0b100, b"\xff\xfe", Some(MASK));
    let binary = from_client(OpCode::Binary, true, b"\xff\xfe");
    h.client.write_all(&compressed).await.unwrap();
    h.client.write_all(&binary).await.unwrap();
    assert_eq!(read_frame(&mut h.upstream).await.payload, b"\xff\xfe");
    assert_eq!(read_frame(&mut h.upstream).await.payload, b"\xff\xfe");
}

#[tokio::test(start_paused = true)]
async fn a_text_frame_larger_than_the_buffer_is_checked_as_it_streams() {
    // 100,000 bytes of 3-byte code points: every read boundary splits some of them.
    let text = "€".repeat(33_334);
    let bytes = from_client(OpCode::Text, true, text.as_bytes());
    let mut h = start(quiet(), Limits::default());
    let writer = tokio::spawn(async move {
        for chunk in bytes.chunks(7_001) {
            h.client.write_all(chunk).await.unwrap();
        }
        h.client
    });
    let got = read_frame(&mut h.upstream).await;
    assert_eq!(got.payload, text.as_bytes());
    writer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_frame_over_max_frame_size_gets_1009_from_its_header() {
    let limits = Limits {
        max_frame_size: 1000,
        ..Limits::default()
    };
    let mut head = [0u8; MAX_HEADER_LEN];
    let n = codec::encode_header(true, 0, OpCode::Binary, 1001, Some(MASK), &mut head);
    client_violation_with(start(quiet(), limits), &head[..n], 1009, "frame too big").await;
}

#[tokio::test(start_paused = true)]
async fn a_client_over_max_frame_rate_gets_1008() {
    let limits = Limits {
        max_frame_rate: Some(Rate {
            count: 3,
            per: Duration::from_secs(1),
        }),
        ..Limits::default()
    };
    let mut h = start(quiet(), limits);
    for _ in 0..3 {
        h.client
            .write_all(&from_client(OpCode::Binary, true, b"ok"))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut h.upstream).await.payload, b"ok");
    }
    client_violation_with(
        h,
        &from_client(OpCode::Binary, true, b"4th"),
        1008,
        "rate limit",
    )
    .await;
}

// ---- validation, upstream side ------------------------------------------------------------

async fn upstream_violation(bytes: &[u8], to_upstream: (u16, &str)) {
    let mut h = start(quiet(), Limits::default());
    h.upstream.write_all(bytes).await.unwrap();
    assert_eq!(
        read_frame(&mut h.client).await.close(),
        (1014, "bad gateway".into()),
        "client after {bytes:x?}"
    );
    let up = read_frame(&mut h.upstream).await;
    assert!(up.masked);
    assert_eq!(up.close(), (to_upstream.0, to_upstream.1.into()));
    assert_eq!(h.outcome().await.upstream_end, SideEnd::Protocol);
}

#[tokio::test(start_paused = true)]
async fn upstream_frames_that_break_the_protocol_get_1014_and_never_reach_the_client() {
    for bytes in [
        from_client(OpCode::Text, true, b"masked"),
        frame(OpCode::Binary, true, 0b010, b"rsv2", None),
        from_upstream(OpCode::Close, true, &1006u16.to_be_bytes()),
    ] {
        upstream_violation(&bytes, (1002, "protocol error")).await;
    }
    upstream_violation(
        &from_upstream(OpCode::Text, true, b"\xf4\x90\x80\x80"),
        (1007, "invalid UTF-8"),
    )
    .await;
}

// ---- a side lost --------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_upstream_lost_without_a_close_gets_the_client_1014() {
    let mut h = start(quiet(), Limits::default());
    let _ = h.upstream.shutdown().await;
    assert_eq!(
        read_frame(&mut h.client).await.close(),
        (1014, "bad gateway".into())
    );
    answer_close(&mut h.client, 1014).await;
    let outcome = h.outcome().await;
    assert_eq!(outcome.reason, "upstream gone");
    assert_eq!(outcome.upstream_end, SideEnd::Eof);
}

#[tokio::test(start_paused = true)]
async fn a_client_lost_without_a_close_gets_the_upstream_1001() {
    let mut h = start(quiet(), Limits::default());
    let _ = h.client.shutdown().await;
    assert_eq!(
        read_frame(&mut h.upstream).await.close(),
        (1001, "client gone".into())
    );
    assert_eq!(h.elapsed(), Duration::ZERO);
    let outcome = h.outcome().await;
    assert_eq!(outcome.client_end, SideEnd::Eof);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_lost_mid_frame_shuts_the_client_at_once() {
    let mut h = start(quiet(), Limits::default());
    let full = from_upstream(OpCode::Binary, true, &[7u8; 1000]);
    h.upstream.write_all(&full[..500]).await.unwrap();
    let mut got = vec![0u8; 500];
    h.client.read_exact(&mut got).await.unwrap();
    let _ = h.upstream.shutdown().await;
    // No close frame can follow half a frame: the client gets EOF, now.
    expect_eof(&mut h.client).await;
    assert_eq!(h.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn an_operator_close_reaches_the_upstream_right_after_the_clients_answer() {
    let mut h = start(quiet(), Limits::default());
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.record.request_close(CloseRequest::Operator);
    assert_eq!(
        read_frame(&mut h.client).await.close(),
        (1001, "closed by operator".into())
    );
    // The client answers 1.5 s later; the upstream hears then, not at `timeouts.close`.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    answer_close(&mut h.client, 1001).await;
    let up = read_frame(&mut h.upstream).await;
    assert!(up.masked);
    assert_eq!(up.close(), (1001, "closed by operator".into()));
    assert_eq!(h.elapsed(), Duration::from_millis(3500));
    h.upstream
        .write_all(&from_upstream(OpCode::Close, true, &1001u16.to_be_bytes()))
        .await
        .unwrap();
    expect_eof(&mut h.client).await;
    let outcome = h.outcome().await;
    assert_eq!(outcome.reason, "closed by operator");
    assert_eq!(outcome.client_end, SideEnd::Close);
    assert_eq!(outcome.upstream_end, SideEnd::Close);
    assert_eq!(outcome.undeliverable, [0, 0]);
}
