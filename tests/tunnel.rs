//! The frame-aware tunnel, one scenario per row of the tunnel table in design.md: every
//! test scripts both peers byte by byte (a raw client in front of wsgate, a raw upstream
//! behind it) and asserts what each of them sees: close code and reason on both sides,
//! masks on wsgate's frames towards the upstream, frames that must or must not be relayed,
//! and a clean end of both connections (FIN, never a reset).
//!
//! Timeouts are hundreds of milliseconds so the file runs in a few seconds; every wait is
//! bounded by `wsraw::LIMIT` and nothing sleeps to synchronise. The only time windows are
//! the ones a scenario is about ("nothing closes while pings are answered").

mod support;
mod wsraw;

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::time::Instant;

use support::{spawn_proxy, Proxy, TestDir};
use wsraw::{
    client_close, client_frame, connect, encode, encode_header, op, parse_all, random_mask,
    server_close, server_frame, within, Ended, Frame, WsConn, WsReader, WsUpstream, WsWriter, RSV1,
};

/// Timeouts every test gets unless it overrides them: connection setup never trips on a
/// loaded machine, and a close that only one side answers does not hold a test for long.
const BASE_TIMEOUTS: &[(&str, &str)] = &[
    ("client_header", "5s"),
    ("upstream_connect", "2s"),
    ("upstream_handshake", "5s"),
    ("shutdown_grace", "5s"),
];

/// Slack subtracted from a configured timeout before asserting that at least that much
/// time passed: our clock starts a little after the tunnel's.
const CLOCK_SLACK: Duration = Duration::from_millis(50);

/// How late a timer may fire on a loaded machine before the test fails: generous for a busy
/// 2-core box, far below any timer that is wrong by a whole interval. (The exact timing is
/// tested under a paused clock in `src/ws/tunnel_tests.rs`.)
const LATE: Duration = Duration::from_secs(1);

/// Asserts that `elapsed` is `expected`, give or take the slack above.
fn assert_on_time(what: &str, elapsed: Duration, expected: Duration) {
    assert!(
        elapsed >= expected - CLOCK_SLACK && elapsed < expected + LATE,
        "{what} after {elapsed:?}, expected {expected:?}"
    );
}

/// The default route: everything under `/ws` goes to the raw upstream.
const WS_ROUTE: &str = r#"
[routes.ws]
path = "/ws"
upstream = "raw"
"#;

/// A config with the admin listener on a free port (never the default 9090: tests run in
/// parallel), one plain listener `public`, one upstream `raw` at `upstream`, the given
/// `[timeouts]` (laid over [`BASE_TIMEOUTS`]) and `[limits]`, and `routes`.
fn config(
    upstream: std::net::SocketAddr,
    timeouts: &[(&str, &str)],
    limits: &[(&str, &str)],
    routes: &str,
) -> String {
    let mut merged: Vec<(&str, &str)> = BASE_TIMEOUTS
        .iter()
        .filter(|(k, _)| !timeouts.iter().any(|(o, _)| o == k))
        .copied()
        .collect();
    merged.extend_from_slice(timeouts);
    let table = |pairs: &[(&str, &str)]| -> String {
        pairs
            .iter()
            .map(|(k, v)| format!("{k} = \"{v}\"\n"))
            .collect()
    };
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [listeners.public]\nbind = \"127.0.0.1:0\"\n\n\
         [timeouts]\n{}\n\
         [limits]\n{}\n\
         [upstreams.raw]\nservers = [\"{upstream}\"]\n\
         {routes}",
        table(&merged),
        table(limits),
    )
}

/// A proxy in front of a raw upstream.
struct Gate {
    proxy: Proxy,
    upstream: WsUpstream,
    _dir: TestDir,
}

impl Gate {
    async fn start(timeouts: &[(&str, &str)], limits: &[(&str, &str)]) -> Gate {
        Gate::with_routes(timeouts, limits, WS_ROUTE).await
    }

    async fn with_routes(timeouts: &[(&str, &str)], limits: &[(&str, &str)], routes: &str) -> Gate {
        let upstream = WsUpstream::spawn().await;
        let dir = TestDir::new();
        let proxy = spawn_proxy(&config(upstream.addr, timeouts, limits, routes), &dir).await;
        Gate {
            proxy,
            upstream,
            _dir: dir,
        }
    }

    /// A client connected through the proxy at `path`, and the upstream's end of it.
    async fn open_at(&mut self, path: &str) -> (WsConn, WsConn) {
        let client = connect(self.proxy.addr("public"), path).await;
        let upstream = self.upstream.accept().await;
        assert_eq!(upstream.path(), path, "the upstream got another connection");
        (client, upstream)
    }

    /// [`Gate::open`] with extra request header lines (an extension offer).
    async fn open_with(&mut self, extra: &str) -> (WsConn, WsConn) {
        let client = wsraw::connect_with(self.proxy.addr("public"), "/ws", extra).await;
        let upstream = self.upstream.accept().await;
        (client, upstream)
    }

    async fn open(&mut self) -> (WsConn, WsConn) {
        self.open_at("/ws").await
    }
}

/// After wsgate closed a tunnel itself (its close frames already read on both sides),
/// both peers answer with a close; then both connections must end cleanly, with FIN and
/// without any further frame (the answers are wsgate's to consume, not to relay).
async fn both_answer_and_end(client: &mut WsConn, upstream: &mut WsConn) {
    let _ = client.try_send(&client_close(1000, "")).await;
    let _ = upstream.try_send(&server_close(1000, "")).await;
    both_end(client, upstream).await;
}

/// Both connections end cleanly (FIN) with no frame left to read.
async fn both_end(client: &mut WsConn, upstream: &mut WsConn) {
    let (c, u) = tokio::join!(
        client.until_eof("the client connection to end"),
        upstream.until_eof("the upstream connection to end"),
    );
    assert_eq!(c, (vec![], Ended::Eof), "client after the close handshake");
    assert_eq!(
        u,
        (vec![], Ended::Eof),
        "upstream after the close handshake"
    );
}

/// A client-first close (idle, drain, operator): wsgate's close reached the client; the
/// client answers, and only then does the upstream get wsgate's close with `reason` (never
/// the client's answer); the upstream answers and both connections end cleanly.
async fn client_answers_then_upstream_hears(
    client: &mut WsConn,
    upstream: &mut WsConn,
    reason: &str,
) {
    client.send(&client_close(1001, "")).await;
    let close = upstream
        .expect_close(1001, reason, "the upstream's close")
        .await;
    assert!(close.mask.is_some(), "{close:?}");
    let _ = upstream.try_send(&server_close(1001, "")).await;
    both_end(client, upstream).await;
}

fn assert_ws_ping(frame: &Frame, masked: bool) {
    assert_eq!(
        frame.opcode,
        op::PING,
        "expected wsgate's ping, got {frame:?}"
    );
    assert!(frame.fin && frame.rsv == 0, "{frame:?}");
    assert_eq!(
        frame.mask.is_some(),
        masked,
        "mask on wsgate's ping: {frame:?}"
    );
    assert!(
        frame.payload.starts_with(b"wsgate"),
        "wsgate's ping payload should start with \"wsgate\": {:?}",
        String::from_utf8_lossy(&frame.payload)
    );
}

/// The pong a client sends for `ping` (masked, same payload).
fn pong_for(ping: &Frame) -> Vec<u8> {
    client_frame(op::PONG, &ping.payload)
}

/// Reads the client's next frame that is not one of wsgate's keepalive pings, answering
/// those on the way; returns it and how many pings were answered.
async fn next_answering_pings(client: &mut WsConn, what: &str) -> (Frame, usize) {
    let mut answered = 0;
    loop {
        let frame = client.frame(what).await;
        if frame.opcode == op::PING && frame.payload.starts_with(b"wsgate") {
            client.send(&pong_for(&frame)).await;
            answered += 1;
            continue;
        }
        return (frame, answered);
    }
}

// ---------------------------------------------------------------------------------------
// Keepalive towards the client

#[tokio::test]
async fn silent_client_is_pinged_and_its_pong_is_consumed() {
    let ping_interval = Duration::from_millis(200);
    let pong_timeout = Duration::from_millis(300);
    let mut gate = Gate::start(
        &[("ping_interval", "200ms"), ("pong_timeout", "300ms")],
        &[],
    )
    .await;
    let (mut client, mut upstream) = gate.open().await;

    let start = Instant::now();
    let ping = client.frame("wsgate's first keepalive ping").await;
    assert_ws_ping(&ping, false);
    assert_on_time("the first ping", start.elapsed(), ping_interval);
    client.send(&pong_for(&ping)).await;

    // Keep answering for well past pong_timeout: nothing but pings may arrive.
    let window_end = Instant::now() + 3 * (ping_interval + pong_timeout);
    let mut pings = 1;
    loop {
        match tokio::time::timeout_at(window_end, client.reader.try_frame()).await {
            Err(_) => break,
            Ok(Ok(Some(frame))) => {
                assert_ws_ping(&frame, false);
                assert_ne!(frame.payload, ping.payload, "every ping has a fresh token");
                client.send(&pong_for(&frame)).await;
                pings += 1;
            }
            Ok(other) => panic!("the tunnel ended while pings were answered: {other:?}"),
        }
    }
    assert!(
        pings >= 3,
        "only {pings} pings in {:?}",
        3 * (ping_interval + pong_timeout)
    );

    // None of the pongs reached the upstream: the next frame it sees is this text.
    let text = client_frame(op::TEXT, b"still here");
    client.send(&text).await;
    let got = upstream.frame("the client's text").await;
    assert_eq!(
        got.raw, text,
        "the upstream should see the text first, got {got:?}"
    );

    // And the tunnel still works the other way.
    let reply = server_frame(op::TEXT, b"good");
    upstream.send(&reply).await;
    let (got, _) = next_answering_pings(&mut client, "the upstream's reply").await;
    assert_eq!(got.raw, reply);
}

#[tokio::test]
async fn unanswered_ping_closes_with_ping_timeout() {
    let pong_timeout = Duration::from_millis(300);
    let mut gate = Gate::start(
        &[("ping_interval", "200ms"), ("pong_timeout", "300ms")],
        &[],
    )
    .await;
    let (mut client, mut upstream) = gate.open().await;

    let ping = client.frame("wsgate's keepalive ping").await;
    assert_ws_ping(&ping, false);
    let pinged = Instant::now();
    let close = client
        .expect_close(1001, "ping timeout", "the client's close")
        .await;
    assert!(close.mask.is_none() && close.fin, "{close:?}");
    assert_on_time("the ping-timeout close", pinged.elapsed(), pong_timeout);

    let close = upstream
        .expect_close(1001, "client unresponsive", "the upstream's close")
        .await;
    assert!(
        close.mask.is_some(),
        "frames towards the upstream are masked: {close:?}"
    );
    both_answer_and_end(&mut client, &mut upstream).await;
}

// ---------------------------------------------------------------------------------------
// Idle

#[tokio::test]
async fn idle_tunnel_is_closed_on_both_sides() {
    let idle = Duration::from_millis(400);
    let mut gate = Gate::start(&[("ping_interval", "0s"), ("idle", "400ms")], &[]).await;
    let (mut client, mut upstream) = gate.open().await;

    // Data either way keeps it open: a quarter of `idle` between frames, for 1.5 x idle.
    for round in 0..6u8 {
        tokio::time::sleep(idle / 4).await; // pacing the traffic, not synchronising
        if round % 2 == 0 {
            let f = client_frame(op::BINARY, &[round]);
            client.send(&f).await;
            assert_eq!(upstream.frame("client data").await.raw, f);
        } else {
            let f = server_frame(op::BINARY, &[round]);
            upstream.send(&f).await;
            assert_eq!(client.frame("upstream data").await.raw, f);
        }
    }

    let silent = Instant::now();
    let close = client
        .expect_close(1001, "idle timeout", "the client's close")
        .await;
    assert!(close.mask.is_none());
    assert_on_time("the idle close", silent.elapsed(), idle);
    client_answers_then_upstream_hears(&mut client, &mut upstream, "idle timeout").await;
}

#[tokio::test]
async fn answered_pings_do_not_keep_an_idle_tunnel_open() {
    let idle = Duration::from_millis(500);
    let mut gate = Gate::start(
        &[
            ("ping_interval", "100ms"),
            ("pong_timeout", "2s"),
            ("idle", "500ms"),
        ],
        &[],
    )
    .await;
    let (mut client, mut upstream) = gate.open().await;

    let start = Instant::now();
    let (close, answered) = next_answering_pings(&mut client, "the idle close").await;
    assert_eq!(
        close.close(),
        (1001, "idle timeout".to_string()),
        "{close:?}"
    );
    assert_on_time("the idle close", start.elapsed(), idle);
    assert!(answered >= 2, "only {answered} pings before the idle close");
    // The pongs were consumed: the upstream's first frame is the idle close.
    client_answers_then_upstream_hears(&mut client, &mut upstream, "idle timeout").await;
}

#[tokio::test]
async fn per_route_idle_override_applies_to_its_route_only() {
    let routes = r#"
[routes.a]
path = "/a"
upstream = "raw"
[routes.a.timeouts]
idle = "300ms"

[routes.b]
path = "/b"
upstream = "raw"
"#;
    let mut gate =
        Gate::with_routes(&[("ping_interval", "0s"), ("idle", "30s")], &[], routes).await;
    // B first, so it has been silent at least as long as A when A idles out.
    let (mut client_b, mut upstream_b) = gate.open_at("/b").await;
    let (mut client_a, mut upstream_a) = gate.open_at("/a").await;

    client_a
        .expect_close(1001, "idle timeout", "route a's idle close to the client")
        .await;

    let f = client_frame(op::TEXT, b"b is alive");
    client_b.send(&f).await;
    assert_eq!(upstream_b.frame("route b's text").await.raw, f);
    let f = server_frame(op::TEXT, b"b is alive too");
    upstream_b.send(&f).await;
    assert_eq!(client_b.frame("route b's reply").await.raw, f);

    client_answers_then_upstream_hears(&mut client_a, &mut upstream_a, "idle timeout").await;
}

// ---------------------------------------------------------------------------------------
// Client errors

#[tokio::test]
async fn frame_over_max_frame_size_is_refused_from_its_header() {
    let mut gate = Gate::start(&[], &[("max_frame_size", "1KiB")]).await;
    let (mut client, mut upstream) = gate.open().await;

    // Exactly the limit passes.
    let at_limit = client_frame(op::BINARY, &[7u8; 1024]);
    client.send(&at_limit).await;
    assert_eq!(upstream.frame("a frame at the limit").await.raw, at_limit);

    // One byte more: the header alone is enough to refuse it.
    let mask = random_mask();
    let header = encode_header(true, 0, op::BINARY, 1025, Some(mask));
    client.send(&header).await;
    client
        .expect_close(1009, "frame too big", "the client's close")
        .await;
    // The rest of the frame, sent late, must not reach the upstream either.
    let _ = client.try_send(&[0x5A; 1025]).await;
    let close = upstream
        .expect_close(1001, "client error", "the upstream's close")
        .await;
    assert!(close.mask.is_some());
    // until_eof in both_answer_and_end asserts nothing else arrives.
    both_answer_and_end(&mut client, &mut upstream).await;
}

#[tokio::test]
async fn protocol_errors_close_with_1002_and_tell_the_upstream() {
    let mut gate = Gate::start(&[], &[]).await;
    let masked = || Some(random_mask());
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "unmasked client frame",
            vec![],
            encode(true, 0, op::TEXT, b"hi", None),
        ),
        (
            "reserved opcode 0x3",
            vec![],
            encode(true, 0, 0x3, b"x", masked()),
        ),
        (
            "fragmented ping",
            vec![],
            encode(false, 0, op::PING, b"p", masked()),
        ),
        (
            "ping over 125 bytes",
            vec![],
            encode(true, 0, op::PING, &[1u8; 126], masked()),
        ),
        (
            "text inside a fragmented message",
            encode(false, 0, op::TEXT, b"first", masked()),
            encode(true, 0, op::TEXT, b"second", masked()),
        ),
    ];
    for (name, before, bad) in cases {
        let (mut client, mut upstream) = gate.open().await;
        if !before.is_empty() {
            client.send(&before).await;
            let got = upstream.frame(name).await;
            assert_eq!(got.raw, before, "{name}: the valid prefix is relayed");
        }
        client.send(&bad).await;
        client
            .expect_close(1002, "protocol error", &format!("{name}: client close"))
            .await;
        let close = upstream
            .expect_close(1001, "client error", &format!("{name}: upstream close"))
            .await;
        assert!(close.mask.is_some(), "{name}");
        both_answer_and_end(&mut client, &mut upstream).await;
    }
}

#[tokio::test]
async fn client_over_max_frame_rate_is_closed_with_1008() {
    let mut gate = Gate::start(&[], &[("max_frame_rate", "5/s")]).await;
    let (mut client, mut upstream) = gate.open().await;

    let burst: Vec<u8> = (0..50)
        .flat_map(|i: u32| client_frame(op::TEXT, i.to_string().as_bytes()))
        .collect();
    client.send(&burst).await;
    client
        .expect_close(1008, "rate limit", "the client's close")
        .await;

    let mut relayed = Vec::new();
    let close = loop {
        let frame = upstream.frame("the burst, then a close").await;
        if frame.opcode == op::CLOSE {
            break frame;
        }
        relayed.push(String::from_utf8(frame.payload).unwrap());
    };
    assert_eq!(close.close(), (1001, "client error".to_string()));
    assert!(close.mask.is_some());
    let n = relayed.len();
    assert!(
        (5..50).contains(&n),
        "the first frames of the burst (a second's worth) pass, then the limit: {relayed:?}"
    );
    let expected: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(relayed, expected, "the burst's first frames, in order");
    both_answer_and_end(&mut client, &mut upstream).await;
}

// ---------------------------------------------------------------------------------------
// Lost connections and close frames

#[tokio::test]
async fn upstream_lost_without_close_is_1014_bad_gateway() {
    let mut gate = Gate::start(&[], &[]).await;
    let (mut client, mut upstream) = gate.open().await;

    let last = server_frame(op::TEXT, b"last words");
    upstream.send(&last).await;
    drop(upstream);

    assert_eq!(client.frame("the upstream's last frame").await.raw, last);
    let close = client
        .expect_close(1014, "bad gateway", "the client's close")
        .await;
    assert!(close.mask.is_none());
    let _ = client.try_send(&client_close(1000, "")).await;
    assert_eq!(
        client.until_eof("the client connection to end").await,
        (vec![], Ended::Eof)
    );
}

#[tokio::test]
async fn client_lost_without_close_is_1001_client_gone() {
    let mut gate = Gate::start(&[], &[]).await;
    let (mut client, mut upstream) = gate.open().await;

    let last = client_frame(op::TEXT, b"last words");
    client.send(&last).await;
    drop(client);

    assert_eq!(upstream.frame("the client's last frame").await.raw, last);
    let close = upstream
        .expect_close(1001, "client gone", "the upstream's close")
        .await;
    assert!(close.mask.is_some(), "{close:?}");
    let _ = upstream.try_send(&server_close(1000, "")).await;
    assert_eq!(
        upstream.until_eof("the upstream connection to end").await,
        (vec![], Ended::Eof)
    );
}

/// A peer that vanishes in the middle of a frame leaves the other with a frame no close can
/// follow: wsgate shuts that side at once instead of waiting `timeouts.close` (set long here
/// so waiting would show).
#[tokio::test]
async fn a_peer_lost_mid_frame_ends_the_other_side_at_once() {
    let mut gate = Gate::start(&[("close", "30s")], &[("max_frame_size", "1MiB")]).await;

    // The upstream dies after 100 bytes of a 1000-byte frame.
    let (client, upstream) = gate.open().await;
    lose_mid_frame(upstream, client, server_frame(op::BINARY, &[7u8; 1000])).await;

    // The client dies after 100 bytes of a 1000-byte frame.
    let (client, upstream) = gate.open().await;
    lose_mid_frame(client, upstream, client_frame(op::BINARY, &[9u8; 1000])).await;
}

/// `lost` sends the header and 100 payload bytes of `frame` (1000-byte payload), then
/// vanishes; `other` gets exactly those bytes, then its end of the stream within 3 s.
async fn lose_mid_frame(mut lost: WsConn, mut other: WsConn, frame: Vec<u8>) {
    let sent = frame.len() - 1000 + 100;
    lost.send(&frame[..sent]).await;
    let got = other.bytes(sent, "the start of the frame").await;
    assert_eq!(got, frame[..sent]);
    let started = Instant::now();
    drop(lost);
    let (rest, ended) = other.until_eof("the other connection to end").await;
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(ended, Ended::Eof);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

/// While one side does not read, wsgate stops reading the other (backpressure), so a
/// reset of that other peer cannot show up as a read error. wsgate asks the socket's
/// readiness instead, once a second: the reset is noticed within a second, not by the next
/// keepalive ping (300 s here), and the tunnel ends `timeouts.close` (1 s) plus the 2 s
/// linger later.
#[tokio::test]
async fn a_peer_reset_while_the_other_side_stalls_is_noticed_within_a_second() {
    let mut gate = Gate::start(
        &[("ping_interval", "300s"), ("close", "1s")],
        &[("max_frame_size", "1MiB")],
    )
    .await;
    let (client, upstream) = gate.open().await;
    let chunk = client_frame(op::BINARY, &[5u8; 64 * 1024]);
    reset_while_stalled(&gate, client, upstream, &chunk, "client").await;
    let (client, upstream) = gate.open().await;
    let chunk = server_frame(op::BINARY, &[6u8; 64 * 1024]);
    reset_while_stalled(&gate, upstream, client, &chunk, "upstream").await;
}

/// `sender` writes `chunk` until every buffer towards `stalled` (which never reads) is
/// full, then resets; the tunnel must be gone within 1 s (probe) + 1 s (close) + 2 s
/// (linger), with slack for a loaded machine, and be counted as closed by `initiator`
/// with no close code.
async fn reset_while_stalled(
    gate: &Gate,
    mut sender: WsConn,
    stalled: WsConn,
    chunk: &[u8],
    initiator: &str,
) {
    let admin = gate.proxy.admin();
    let closes =
        format!("wsgate_closes_total{{code=\"none\",initiator=\"{initiator}\",route=\"ws\"}}");
    let before = metric(admin, &closes).await.unwrap_or(0.0);
    let mut chunks = 0;
    loop {
        assert!(chunks < 4000, "the buffers never filled");
        match tokio::time::timeout(Duration::from_millis(300), sender.try_send(chunk)).await {
            Ok(Ok(())) => chunks += 1,
            Ok(Err(e)) => panic!("write failed after {chunks} chunks: {e}"),
            Err(_) => break, // held up
        }
    }
    assert_eq!(
        metric(admin, "wsgate_connections_active{route=\"ws\"}").await,
        Some(1.0)
    );
    let reset_at = Instant::now();
    sender.reset();
    within("the tunnel to end", async {
        while metric(admin, "wsgate_connections_active{route=\"ws\"}").await != Some(0.0) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let took = reset_at.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the {initiator}'s reset took {took:?} to end the tunnel ({chunks} chunks sent)"
    );
    assert_eq!(metric(admin, &closes).await, Some(before + 1.0));
    drop(stalled);
}

/// The value of one series on the admin listener's `/metrics`.
async fn metric(admin: std::net::SocketAddr, series: &str) -> Option<f64> {
    let request = support::clients::http_request("GET", "/metrics", &[("Host", "admin")]);
    let text = support::clients::raw_exchange(admin, &request)
        .await
        .body_text();
    text.lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test]
async fn close_frames_are_forwarded_unchanged_both_ways() {
    let mut gate = Gate::start(&[], &[]).await;

    // The client closes first.
    let (mut client, mut upstream) = gate.open().await;
    let close = client_close(4000, "bye");
    client.send(&close).await;
    assert_eq!(upstream.frame("the client's close").await.raw, close);
    let reply = server_close(4000, "bye");
    upstream.send(&reply).await;
    assert_eq!(client.frame("the upstream's answer").await.raw, reply);
    let (c, u) = tokio::join!(
        client.until_eof("the client connection to end"),
        upstream.until_eof("the upstream connection to end"),
    );
    assert_eq!(c, (vec![], Ended::Eof));
    assert_eq!(u, (vec![], Ended::Eof));

    // The upstream closes first.
    let (mut client, mut upstream) = gate.open().await;
    let close = server_close(4001, "upstream says bye");
    upstream.send(&close).await;
    assert_eq!(client.frame("the upstream's close").await.raw, close);
    let reply = client_close(4001, "ok");
    client.send(&reply).await;
    assert_eq!(upstream.frame("the client's answer").await.raw, reply);
    let (c, u) = tokio::join!(
        client.until_eof("the client connection to end"),
        upstream.until_eof("the upstream connection to end"),
    );
    assert_eq!(c, (vec![], Ended::Eof));
    assert_eq!(u, (vec![], Ended::Eof));
}

#[tokio::test]
async fn a_close_nobody_answers_ends_both_sockets_after_timeouts_close() {
    let close_wait = Duration::from_millis(400);
    // shutdown_grace (5s) is far longer: the close handshake has its own bound.
    let mut gate = Gate::start(&[("close", "400ms")], &[]).await;
    let (mut client, mut upstream) = gate.open().await;
    let close = client_close(1000, "done");
    let started = Instant::now();
    client.send(&close).await;
    assert_eq!(upstream.frame("the client's close").await.raw, close);
    // The upstream never answers: both sockets end once `close` has passed.
    let (c, u) = tokio::join!(
        client.until_eof("the client connection to end"),
        upstream.until_eof("the upstream connection to end"),
    );
    let took = started.elapsed();
    assert_eq!(c.1, Ended::Eof, "{c:?}");
    assert_eq!(u.1, Ended::Eof, "{u:?}");
    assert!(
        took >= close_wait - CLOCK_SLACK && took < close_wait + Duration::from_secs(2),
        "ended {took:?} after the close; timeouts.close is {close_wait:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Keepalive towards the upstream

#[tokio::test]
async fn unresponsive_upstream_is_1014_to_the_client() {
    let pong_timeout = Duration::from_millis(300);
    let mut gate = Gate::start(
        &[
            ("ping_interval", "0s"),
            ("upstream_ping_interval", "200ms"),
            ("pong_timeout", "300ms"),
        ],
        &[],
    )
    .await;
    let (mut client, mut upstream) = gate.open().await;

    // The first ping is answered: its pong is consumed, the tunnel stays.
    let ping = upstream.frame("wsgate's ping to the upstream").await;
    assert_ws_ping(&ping, true);
    upstream.send(&server_frame(op::PONG, &ping.payload)).await;

    // The second is not.
    let ping2 = upstream.frame("wsgate's second ping").await;
    assert_ws_ping(&ping2, true);
    assert_ne!(ping2.payload, ping.payload);
    let pinged = Instant::now();

    // The client's first frame is the close: the upstream's pong never reached it.
    let close = client
        .expect_close(1014, "upstream unresponsive", "the client's close")
        .await;
    assert!(close.mask.is_none());
    assert_on_time(
        "the upstream-unresponsive close",
        pinged.elapsed(),
        pong_timeout,
    );
    let close = upstream
        .expect_close(1001, "ping timeout", "the upstream's close")
        .await;
    assert!(close.mask.is_some());
    both_answer_and_end(&mut client, &mut upstream).await;
}

// ---------------------------------------------------------------------------------------
// Transparency

#[tokio::test]
async fn frames_split_at_every_byte_are_relayed_intact() {
    let mut gate = Gate::start(&[], &[]).await;
    let (mut client, mut upstream) = gate.open().await;
    let payload = support::pattern(130); // a 16-bit length
    let big = support::pattern(70_000); // a 64-bit length

    let text = "ü".repeat(65); // valid UTF-8: text is checked
    let small = encode(true, 0, op::TEXT, text.as_bytes(), Some(random_mask()));
    client.send_bytewise(&small).await;
    assert_eq!(
        upstream.bytes(small.len(), "the bytewise frame").await,
        small
    );
    let small = encode(true, 0, op::BINARY, &payload, None);
    upstream.send_bytewise(&small).await;
    assert_eq!(client.bytes(small.len(), "the bytewise frame").await, small);

    // A long header split at every byte, then its payload in one go.
    let mask = random_mask();
    let frame = encode(true, 0, op::BINARY, &big, Some(mask));
    let header_len = encode_header(true, 0, op::BINARY, big.len() as u64, Some(mask)).len();
    client.send_bytewise(&frame[..header_len]).await;
    client.send(&frame[header_len..]).await;
    assert_eq!(upstream.bytes(frame.len(), "the long frame").await, frame);
    let frame = encode(true, 0, op::BINARY, &big, None);
    upstream.send_bytewise(&frame[..10]).await;
    upstream.send(&frame[10..]).await;
    assert_eq!(client.bytes(frame.len(), "the long frame").await, frame);
}

#[tokio::test]
async fn pings_between_fragments_are_forwarded_and_answered() {
    let mut gate = Gate::start(&[], &[]).await;
    let (mut client, mut upstream) = gate.open().await;

    // From the client.
    let first = encode(false, 0, op::TEXT, b"hello, ", Some(random_mask()));
    let ping = client_frame(op::PING, b"are you there");
    let last = encode(true, 0, op::CONTINUATION, b"world", Some(random_mask()));
    client.send(&first).await;
    client.send(&ping).await;
    client.send(&last).await;
    for want in [&first, &ping, &last] {
        assert_eq!(
            &upstream.frame("the fragments and the ping").await.raw,
            want
        );
    }
    let pong = server_frame(op::PONG, b"are you there");
    upstream.send(&pong).await;
    assert_eq!(client.frame("the upstream's pong").await.raw, pong);

    // From the upstream.
    let first = encode(false, 0, op::BINARY, b"\x00\x01", None);
    let ping = server_frame(op::PING, b"and you?");
    let last = encode(true, 0, op::CONTINUATION, b"\x02", None);
    upstream.send(&first).await;
    upstream.send(&ping).await;
    upstream.send(&last).await;
    for want in [&first, &ping, &last] {
        assert_eq!(&client.frame("the fragments and the ping").await.raw, want);
    }
    let pong = client_frame(op::PONG, b"and you?");
    client.send(&pong).await;
    assert_eq!(upstream.frame("the client's pong").await.raw, pong);
}

#[tokio::test]
async fn rsv1_passes_through_unchanged_both_ways() {
    let mut gate = Gate::start(&[], &[]).await;
    let (mut client, mut upstream) = gate.open_with(DEFLATE).await;

    let frames = [
        encode(true, RSV1, op::TEXT, b"deflated?", Some(random_mask())),
        encode(false, RSV1, op::BINARY, b"first", Some(random_mask())),
        encode(true, 0, op::CONTINUATION, b"last", Some(random_mask())),
    ];
    for f in &frames {
        client.send(f).await;
        let got = upstream.frame("an RSV1 frame").await;
        assert_eq!(&got.raw, f);
    }
    let frames = [
        encode(true, RSV1, op::TEXT, b"deflated!", None),
        encode(false, RSV1, op::BINARY, b"first", None),
        encode(true, 0, op::CONTINUATION, b"last", None),
    ];
    for f in &frames {
        upstream.send(f).await;
        let got = client.frame("an RSV1 frame").await;
        assert_eq!(&got.raw, f);
    }
    assert_eq!(parse_all(&frames[0])[0].rsv, RSV1);
}

/// permessage-deflate offered by the client (and agreed by the test upstream).
const DEFLATE: &str = "Sec-WebSocket-Extensions: permessage-deflate\r\n";

/// RSV bits no agreed extension defines: the hop that sees them closes, with the codes of
/// the tunnel table, and the frame goes no further.
#[tokio::test]
async fn rsv_bits_no_agreed_extension_defines_are_refused_both_ways() {
    let mut gate = Gate::start(&[], &[]).await;
    // (extensions offered, valid frames first, then the bad one)
    let first_fragment = encode(false, RSV1, op::TEXT, b"a", Some(random_mask()));
    let cases: [(&str, Vec<u8>, Vec<u8>); 4] = [
        (
            "",
            vec![],
            encode(true, RSV1, op::TEXT, b"x", Some(random_mask())),
        ),
        (
            DEFLATE,
            vec![],
            encode(true, 0b010, op::BINARY, b"x", Some(random_mask())),
        ),
        (
            DEFLATE,
            vec![],
            encode(true, RSV1, op::PING, b"x", Some(random_mask())),
        ),
        (
            DEFLATE,
            first_fragment,
            encode(true, RSV1, op::CONTINUATION, b"b", Some(random_mask())),
        ),
    ];
    for (offer, valid, bad) in cases {
        let (mut client, mut upstream) = gate.open_with(offer).await;
        client.send(&[valid.clone(), bad].concat()).await;
        client
            .expect_close(1002, "protocol error", "the client's close")
            .await;
        if !valid.is_empty() {
            assert_eq!(upstream.frame("the valid fragment").await.raw, valid);
        }
        // The bad frame never reaches the upstream: the next thing it sees is the close.
        let close = upstream
            .expect_close(1001, "client error", "the upstream's close")
            .await;
        assert!(close.mask.is_some());
    }
    // From the upstream: the client hears 1014, the upstream 1002.
    let (mut client, mut upstream) = gate.open().await;
    upstream
        .send(&encode(true, RSV1, op::TEXT, b"x", None))
        .await;
    client
        .expect_close(1014, "bad gateway", "the client's close")
        .await;
    upstream
        .expect_close(1002, "protocol error", "the upstream's close")
        .await;
    // An extension wsgate does not know: its bits pass.
    let (mut client, mut upstream) = gate
        .open_with("Sec-WebSocket-Extensions: x-custom\r\n")
        .await;
    let frame = encode(true, 0b011, op::BINARY, b"custom", Some(random_mask()));
    client.send(&frame).await;
    assert_eq!(upstream.frame("the custom frame").await.raw, frame);
}

/// Cases of [`random_frames_arrive_byte_identical`]; few enough to keep CI fast.
const TRANSPARENCY_CASES: u64 = 30;

/// Largest payload of one random message.
const MAX_RANDOM_MESSAGE: usize = 200 * 1024;

/// A random, valid frame stream as one peer would send it: text and binary messages of
/// 0..=200 KiB, whole or in up to four fragments, with pings and unsolicited pongs before
/// messages and between fragments. Masked with fresh keys when `masked` (a client).
fn random_stream(rng: &mut StdRng, masked: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mask = |rng: &mut StdRng| masked.then(|| rng.random::<[u8; 4]>());
    for _ in 0..rng.random_range(1..=6) {
        let len = if rng.random_bool(0.3) {
            rng.random_range(0..=MAX_RANDOM_MESSAGE)
        } else {
            rng.random_range(0..=300)
        };
        let text = rng.random_bool(0.5);
        let payload: Vec<u8> = if text {
            (0..len).map(|_| rng.random_range(b' '..=b'~')).collect()
        } else {
            let mut p = vec![0u8; len];
            rng.fill(&mut p[..]);
            p
        };
        let fragments = rng.random_range(1..=4usize);
        let mut cuts: Vec<usize> = (1..fragments).map(|_| rng.random_range(0..=len)).collect();
        cuts.sort_unstable();
        cuts.insert(0, 0);
        cuts.push(len);
        for (i, piece) in cuts.windows(2).enumerate() {
            if rng.random_bool(0.3) {
                let opcode = if rng.random_bool(0.8) {
                    op::PING
                } else {
                    op::PONG
                };
                let mut control = vec![0u8; rng.random_range(0..=125)];
                rng.fill(&mut control[..]);
                let m = mask(rng);
                out.extend(encode(true, 0, opcode, &control, m));
            }
            let opcode = match (i, text) {
                (0, true) => op::TEXT,
                (0, false) => op::BINARY,
                _ => op::CONTINUATION,
            };
            let fin = i + 2 == cuts.len();
            let m = mask(rng);
            out.extend(encode(fin, 0, opcode, &payload[piece[0]..piece[1]], m));
        }
    }
    out
}

/// Writes `bytes` in random-sized pieces, so frames straddle the reads at the other end.
async fn write_in_pieces(writer: &mut WsWriter, bytes: &[u8], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut at = 0;
    while at < bytes.len() {
        let n = rng.random_range(1..=64 * 1024).min(bytes.len() - at);
        writer.send(&bytes[at..at + n]).await;
        at += n;
    }
}

/// Asserts a received stream equals the sent one; on a mismatch, names the first frame
/// that differs instead of printing megabytes.
fn assert_same_stream(what: &str, got: &[u8], sent: &[u8]) {
    if got == sent {
        return;
    }
    let at = got.iter().zip(sent).position(|(a, b)| a != b).unwrap_or(0);
    let sent_frames = parse_all(sent);
    let got_frames = parse_all(got);
    let first_bad = sent_frames
        .iter()
        .zip(&got_frames)
        .position(|(a, b)| a != b);
    panic!(
        "{what}: streams differ from byte {at} ({} bytes sent, {} received); first differing \
         frame {first_bad:?}: sent {:?}, got {:?}",
        sent.len(),
        got.len(),
        first_bad.map(|i| &sent_frames[i]),
        first_bad.map(|i| &got_frames[i]),
    );
}

/// Sends `up` from the client and `down` from the upstream at the same time and returns
/// what the other ends read.
async fn exchange(
    client: WsConn,
    upstream: WsConn,
    up: &[u8],
    down: &[u8],
    seed: u64,
) -> (Vec<u8>, Vec<u8>) {
    let (mut client_rd, mut client_wr): (WsReader, WsWriter) = client.split();
    let (mut upstream_rd, mut upstream_wr) = upstream.split();
    let ((), got_up, (), got_down) = tokio::join!(
        write_in_pieces(&mut client_wr, up, seed),
        upstream_rd.bytes(up.len(), "the client's stream"),
        write_in_pieces(&mut upstream_wr, down, !seed),
        client_rd.bytes(down.len(), "the upstream's stream"),
    );
    (got_up, got_down)
}

#[tokio::test]
async fn random_frames_arrive_byte_identical() {
    // Keepalive pings would add wsgate's own frames to the client's stream.
    let mut gate = Gate::start(&[("ping_interval", "0s")], &[]).await;
    let base_seed = 0x5EED_0000_u64;
    for case in 0..TRANSPARENCY_CASES {
        let seed = base_seed + case;
        let mut rng = StdRng::seed_from_u64(seed);
        let up = random_stream(&mut rng, true);
        let down = random_stream(&mut rng, false);

        // Straight to the upstream (checks the harness), then through wsgate: both must
        // deliver exactly the bytes that were written, masks included.
        let direct_client = connect(gate.upstream.addr, "/ws").await;
        let direct_upstream = gate.upstream.accept().await;
        let direct = within(
            "the direct exchange",
            exchange(direct_client, direct_upstream, &up, &down, seed),
        )
        .await;
        let (client, upstream) = gate.open().await;
        let proxied = within(
            "the exchange through wsgate",
            exchange(client, upstream, &up, &down, seed),
        )
        .await;

        assert_same_stream(
            &format!("seed {seed:#x}, direct, client -> upstream"),
            &direct.0,
            &up,
        );
        assert_same_stream(
            &format!("seed {seed:#x}, direct, upstream -> client"),
            &direct.1,
            &down,
        );
        assert_same_stream(
            &format!("seed {seed:#x}, proxied, client -> upstream"),
            &proxied.0,
            &up,
        );
        assert_same_stream(
            &format!("seed {seed:#x}, proxied, upstream -> client"),
            &proxied.1,
            &down,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Large frames between plain TCP sockets: spliced, never copied into wsgate

/// Routes of a gateway with `[runtime] splice = false`.
fn routes_without_splice() -> String {
    format!("[runtime]\nsplice = false\n{WS_ROUTE}")
}

/// Payload of `len` bytes that differs at every position, so a shifted or dropped byte shows.
fn patterned(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// One peer's stream of large and small frames: the first large frame tells wsgate the
/// direction carries large frames (it is read as usual), the ones after it are spliced.
/// A ping, a fragmented message of two large fragments and small frames sit in between.
fn mixed_large_stream(masked: bool) -> Vec<Vec<u8>> {
    let mask = || masked.then(random_mask);
    vec![
        encode(true, 0, op::TEXT, b"hello", mask()),
        encode(true, 0, op::BINARY, &patterned(100 * 1024, 1), mask()),
        encode(true, 0, op::TEXT, &vec![b'a'; 40 * 1024], mask()),
        encode(true, 0, op::PING, b"still there?", mask()),
        encode(true, 0, op::BINARY, &patterned(300 * 1024, 2), mask()),
        encode(false, 0, op::BINARY, &patterned(64 * 1024, 3), mask()),
        encode(true, 0, op::CONTINUATION, &patterned(33 * 1024, 4), mask()),
        encode(true, 0, op::BINARY, b"small again", mask()),
        encode(true, 0, op::BINARY, &patterned(32 * 1024, 5), mask()),
    ]
}

/// Bytes and spliced bytes of both directions, once the byte counters reach `c2u` and `u2c`
/// (they are added once per wake-up of the relay, so a scrape may run a moment ahead).
async fn relayed_bytes(proxy: &Proxy, c2u: usize, u2c: usize) -> [(u64, u64); 2] {
    let deadline = Instant::now() + wsraw::LIMIT;
    let read = |direction: &'static str| async move {
        let counter = |name| support::route_counter(proxy.admin(), name, "ws", direction);
        (
            counter("wsgate_bytes_total").await,
            counter("wsgate_spliced_bytes_total").await,
        )
    };
    loop {
        let got = [
            read("client_to_upstream").await,
            read("upstream_to_client").await,
        ];
        if (got[0].0, got[1].0) == (c2u as u64, u2c as u64) || Instant::now() >= deadline {
            return got;
        }
        tokio::task::yield_now().await;
    }
}

/// Sends the mixed stream both ways at once and asserts both arrive byte for byte; returns
/// the relayed and spliced bytes of each direction.
async fn exchange_large_frames(gate: &mut Gate) -> [(u64, u64); 2] {
    let (client, upstream) = gate.open().await;
    let up = mixed_large_stream(true).concat();
    let down = mixed_large_stream(false).concat();
    let (mut client_rd, mut client_wr) = client.split();
    let (mut upstream_rd, mut upstream_wr) = upstream.split();
    let ((), got_up, (), got_down) = within("the large frames both ways", async {
        tokio::join!(
            client_wr.send(&up),
            upstream_rd.bytes(up.len(), "the client's frames"),
            upstream_wr.send(&down),
            client_rd.bytes(down.len(), "the upstream's frames"),
        )
    })
    .await;
    assert_same_stream("client -> upstream", &got_up, &up);
    assert_same_stream("upstream -> client", &got_down, &down);
    relayed_bytes(&gate.proxy, up.len(), down.len()).await
}

#[tokio::test]
async fn large_frames_are_spliced_and_arrive_unchanged() {
    let mut gate = Gate::start(&[("ping_interval", "0s")], &[]).await;
    let counted = exchange_large_frames(&mut gate).await;
    let sent = [
        mixed_large_stream(true).concat().len(),
        mixed_large_stream(false).concat().len(),
    ];
    for (direction, ((bytes, spliced), sent)) in counted.iter().zip(sent).enumerate() {
        assert_eq!(
            *bytes, sent as u64,
            "direction {direction}: every byte counted once"
        );
        // At least the 300 KiB frame and the fragments behind it took the splice path; how
        // much exactly depends on how the bytes arrived (a sender pausing mid-frame hands
        // the rest of it to the ordinary path).
        assert!(
            *spliced >= 100 * 1024 && *spliced < *bytes,
            "direction {direction}: {spliced} of {bytes} bytes spliced"
        );
    }
}

#[tokio::test]
async fn with_splice_off_large_frames_go_through_the_relay_buffer() {
    let routes = routes_without_splice();
    let mut gate = Gate::with_routes(&[("ping_interval", "0s")], &[], &routes).await;
    let counted = exchange_large_frames(&mut gate).await;
    for (direction, (bytes, spliced)) in counted.iter().enumerate() {
        assert!(*bytes > 0);
        assert_eq!(*spliced, 0, "direction {direction}: nothing spliced");
    }
}

#[tokio::test]
async fn keepalive_ping_waits_for_the_end_of_a_spliced_frame() {
    let interval = Duration::from_millis(800);
    let mut gate = Gate::start(&[("ping_interval", "800ms"), ("pong_timeout", "5s")], &[]).await;
    let (mut client, mut upstream) = gate.open().await;

    // A first large frame: the direction now splices.
    let first = server_frame(op::BINARY, &patterned(64 * 1024, 7));
    upstream.send(&first).await;
    let (got, _) = next_answering_pings(&mut client, "the first large frame").await;
    assert_eq!(got.raw, first);

    // Half of a second one, then a pause longer than the ping interval: the ping falls due
    // in the middle of the frame and must wait for its end.
    let second = server_frame(op::BINARY, &patterned(200 * 1024, 8));
    let half = second.len() / 2;
    upstream.send(&second[..half]).await;
    assert_eq!(client.bytes(half, "the first half").await, second[..half]);
    tokio::time::sleep(interval * 2).await;
    let third = server_frame(op::BINARY, &patterned(50 * 1024, 9));
    upstream.send(&second[half..]).await;
    upstream.send(&third).await;

    assert_eq!(
        client.bytes(second.len() - half, "the second half").await,
        second[half..]
    );
    let ping = client.frame("wsgate's ping, right after the frame").await;
    assert_ws_ping(&ping, false);
    client.send(&pong_for(&ping)).await;
    let (got, _) = next_answering_pings(&mut client, "the third frame").await;
    assert_eq!(got.raw, third);
}

#[tokio::test]
async fn upstream_lost_in_the_middle_of_a_spliced_frame_ends_the_client_connection() {
    let mut gate = Gate::start(&[("ping_interval", "0s")], &[]).await;
    let (mut client, mut upstream) = gate.open().await;
    let first = server_frame(op::BINARY, &patterned(64 * 1024, 1));
    upstream.send(&first).await;
    assert_eq!(client.frame("the first large frame").await.raw, first);

    // Part of a second large frame, then the upstream vanishes: no close frame can follow
    // half a frame, so the client gets the bytes that came and then a clean end.
    let second = server_frame(op::BINARY, &patterned(200 * 1024, 2));
    let part = 80 * 1024;
    upstream.send(&second[..part]).await;
    drop(upstream);
    assert_eq!(
        client.bytes(part, "the part that came").await,
        second[..part]
    );
    let (mut client_rd, _client_wr) = client.split();
    let end = within("the client connection to end", client_rd.try_frame()).await;
    assert!(
        matches!(end, Ok(None)),
        "after half a frame only the end of the connection can come: {end:?}"
    );
}

#[tokio::test]
async fn limits_apply_to_spliced_frames() {
    // Size: the header alone refuses a frame over the limit, spliced direction or not.
    let mut gate = Gate::start(&[("ping_interval", "0s")], &[("max_frame_size", "64KiB")]).await;
    let (mut client, mut upstream) = gate.open().await;
    for seed in 0..2 {
        let frame = client_frame(op::BINARY, &patterned(40 * 1024, seed));
        client.send(&frame).await;
        assert_eq!(upstream.frame("a frame under the limit").await.raw, frame);
    }
    let header = encode_header(true, 0, op::BINARY, 100 * 1024, Some(random_mask()));
    client.send(&header).await;
    client
        .expect_close(1009, "frame too big", "the client's close")
        .await;
    upstream
        .expect_close(1001, "client error", "the upstream's close")
        .await;
    both_answer_and_end(&mut client, &mut upstream).await;

    // Rate: spliced frames take tokens like any other.
    let mut gate = Gate::start(&[("ping_interval", "0s")], &[("max_frame_rate", "2/m")]).await;
    let (mut client, mut upstream) = gate.open().await;
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|seed| client_frame(op::BINARY, &patterned(40 * 1024, seed)))
        .collect();
    for frame in &frames[..2] {
        client.send(frame).await;
        assert_eq!(upstream.frame("a frame within the rate").await.raw, *frame);
    }
    client.send(&frames[2]).await;
    client
        .expect_close(1008, "rate limit", "the client's close")
        .await;
    upstream
        .expect_close(1001, "client error", "the upstream's close")
        .await;
    both_answer_and_end(&mut client, &mut upstream).await;
}
