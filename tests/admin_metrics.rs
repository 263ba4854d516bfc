//! The admin listener and the metrics contract of design.md, checked against a real proxy
//! over real sockets. Scenarios script their traffic byte by byte (raw clients and raw
//! upstreams from `wsraw`), scrape `GET /metrics` and assert exact values for the route
//! they used, so a counter that moves twice, too late or under the wrong label fails here.
//! Also: `GET /connections` and `DELETE /connections/{id}`, the other admin endpoints, a
//! leak check over a thousand echo connections, and `promtool` on a live scrape and on
//! `docs/prometheus-alerts.yml` (skipped, with a `SKIPPED:` line, where promtool is absent).
//!
//! The scrape is parsed by the small Prometheus text parser at the top of this file. Waits
//! for something to happen inside the proxy (a tunnel finishing its close, a counter being
//! flushed) poll the metrics with a bound of `LIMIT`; nothing sleeps to synchronise.

mod support;
mod wsraw;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use support::{
    answer_status, closed_port, http_request, parse_head, raw_exchange, read_head,
    spawn_http_upstream, spawn_proxy, spawn_raw_upstream, AbortOnDrop, Proxy, RawClient,
    RawResponse, TestCa, TestDir, LIMIT,
};
use wsraw::{
    client_close, client_frame, connect, encode, op, parse_frame, server_close, server_frame,
    within, Ended, Frame, WsConn, WsUpstream,
};

/// Pause between two scrapes while waiting for the proxy to reach a state. Pacing of a
/// bounded poll, not synchronisation: the wait ends as soon as the state is seen.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// Timeouts for scenarios that are not about timeouts: connection setup never trips on a
/// loaded machine and a close only one side answers cannot hold a test for long.
const BASE_TIMEOUTS: &str = r#"
[timeouts]
client_header = "5s"
upstream_connect = "2s"
upstream_handshake = "5s"
shutdown_grace = "5s"
"#;

// ---------------------------------------------------------------------------------------
// A Prometheus text-format parser: `name{label="value",...} value [timestamp]` lines.

/// One sample line of a scrape.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed `GET /metrics` answer.
struct Scrape {
    samples: Vec<Sample>,
}

/// Parses one label value after its opening quote; returns it and the rest after the
/// closing quote.
fn parse_label_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (value, &s[i + 1..]),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, other)) => value.push(other),
                None => break,
            },
            other => value.push(other),
        }
    }
    panic!("unterminated label value in {s:?}");
}

fn parse_value(text: &str) -> f64 {
    match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        other => other
            .parse()
            .unwrap_or_else(|e| panic!("bad sample value {other:?}: {e}")),
    }
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = after_brace;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after_eq) = rest
                .split_once("=\"")
                .unwrap_or_else(|| panic!("bad label in {line:?}"));
            let (value, after_value) = parse_label_value(after_eq);
            labels.insert(label.trim().to_string(), value);
            rest = after_value;
        }
    }
    let value = rest
        .split_ascii_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
    Sample {
        name,
        labels,
        value: parse_value(value),
    }
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(parse_sample)
            .collect();
        Scrape { samples }
    }

    fn matches(sample: &Sample, name: &str, labels: &[(&str, &str)]) -> bool {
        sample.name == name
            && labels
                .iter()
                .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
    }

    /// The sample of `name` with exactly the label set `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.labels.len() == labels.len() && Scrape::matches(s, name, labels))
            .map(|s| s.value)
    }

    /// Like [`Scrape::get`], treating a missing series as 0 (a counter never touched).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sum of every sample of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| Scrape::matches(s, name, labels))
            .map(|s| s.value)
            .sum()
    }

    /// Every sample of `name` whose labels include `labels`, for failure messages.
    fn family(&self, name: &str, labels: &[(&str, &str)]) -> String {
        let lines: Vec<String> = self
            .samples
            .iter()
            .filter(|s| Scrape::matches(s, name, labels))
            .map(|s| format!("  {}{:?} {}", s.name, s.labels, s.value))
            .collect();
        if lines.is_empty() {
            format!("  (no {name} series with {labels:?})")
        } else {
            lines.join("\n")
        }
    }

    /// Asserts the series `name{labels}` (exact label set) has `want`.
    #[track_caller]
    fn assert_eq(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let got = self.get(name, labels);
        assert_eq!(
            got,
            Some(want),
            "{name}{labels:?}: expected {want}; the family:\n{}",
            self.family(name, &labels[..labels.len().min(1)])
        );
    }
}

#[test]
fn parser_reads_labels_escapes_and_special_values() {
    let s = Scrape::parse(
        "# HELP x_total A counter.\n# TYPE x_total counter\n\
         x_total{a=\"1\",b=\"q\\\"uo\\\\te\\n\"} 3\n\
         up 1 1700000000000\n\
         h_bucket{le=\"+Inf\",route=\"r\"} 2\n\
         g{} NaN\n",
    );
    assert_eq!(
        s.get("x_total", &[("a", "1"), ("b", "q\"uo\\te\n")]),
        Some(3.0)
    );
    assert_eq!(
        s.get("x_total", &[("a", "1")]),
        None,
        "label sets match exactly"
    );
    assert_eq!(s.sum("x_total", &[("a", "1")]), 3.0);
    assert_eq!(s.get("up", &[]), Some(1.0));
    assert_eq!(
        s.get("h_bucket", &[("le", "+Inf"), ("route", "r")]),
        Some(2.0)
    );
    assert!(s.get("g", &[]).is_some_and(f64::is_nan));
}

// ---------------------------------------------------------------------------------------
// Admin API helpers

/// One request to the admin listener on a fresh connection.
async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> RawResponse {
    raw_exchange(
        admin,
        &http_request(method, path, &[("Host", "admin"), ("Content-Length", "0")]),
    )
    .await
}

async fn admin_get(admin: SocketAddr, path: &str) -> RawResponse {
    raw_exchange(admin, &http_request("GET", path, &[("Host", "admin")])).await
}

async fn scrape(admin: SocketAddr) -> Scrape {
    let r = admin_get(admin, "/metrics").await;
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body_text());
    Scrape::parse(&r.body_text())
}

/// Scrapes until `ready` holds (at most [`LIMIT`]) and returns that scrape.
async fn wait_metrics(admin: SocketAddr, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + LIMIT;
    loop {
        let s = scrape(admin).await;
        if ready(&s) {
            return s;
        }
        if Instant::now() >= deadline {
            let text = admin_get(admin, "/metrics").await.body_text();
            let wsgate: Vec<&str> = text.lines().filter(|l| l.starts_with("wsgate_")).collect();
            panic!(
                "timed out after {LIMIT:?} waiting for {what}; last scrape:\n{}",
                wsgate.join("\n")
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// `GET /connections`, parsed.
async fn connections(admin: SocketAddr) -> Vec<serde_json::Value> {
    let r = admin_get(admin, "/connections").await;
    assert_eq!(r.status, 200, "GET /connections: {}", r.body_text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "GET /connections content type"
    );
    match serde_json::from_slice(&r.body) {
        Ok(serde_json::Value::Array(list)) => list,
        other => panic!("GET /connections is not a JSON array: {other:?}"),
    }
}

/// Polls `GET /connections` until it is `[]`.
async fn wait_no_connections(admin: SocketAddr) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let list = connections(admin).await;
        if list.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GET /connections still lists {} connections after {LIMIT:?}: {list:?}",
            list.len()
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures

/// A proxy with one plain listener `public`, the base timeouts, and `rest` (upstreams,
/// routes, limits).
async fn proxy_with(rest: &str, dir: &TestDir) -> Proxy {
    let toml = format!("[listeners.public]\nbind = \"127.0.0.1:0\"\n{BASE_TIMEOUTS}\n{rest}");
    spawn_proxy(&toml, dir).await
}

/// A proxy with the route `chat` (`/chat`) to the raw upstream `app`, and the upstream.
async fn chat_gate(dir: &TestDir) -> (Proxy, WsUpstream) {
    let upstream = WsUpstream::spawn().await;
    let proxy = proxy_with(
        &format!(
            "[upstreams.app]\nservers = [\"{}\"]\n\
             [routes.chat]\npath = \"/chat\"\nupstream = \"app\"\n",
            upstream.addr
        ),
        dir,
    )
    .await;
    (proxy, upstream)
}

/// Both peers read to the end of their connection: FIN, no frame left over.
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

/// Reads frames until a close, skipping wsgate's keepalive pings.
async fn next_close(conn: &mut WsConn, what: &str) -> Frame {
    loop {
        let frame = conn.frame(what).await;
        if frame.opcode != op::PING {
            assert_eq!(frame.opcode, op::CLOSE, "{what}: {frame:?}");
            return frame;
        }
    }
}

/// Each opcode with its `opcode` label value.
const OPCODE_LABELS: [(u8, &str); 6] = [
    (op::CONTINUATION, "continuation"),
    (op::TEXT, "text"),
    (op::BINARY, "binary"),
    (op::CLOSE, "close"),
    (op::PING, "ping"),
    (op::PONG, "pong"),
];

/// Frames and bytes one direction carried, computed from the exact bytes written.
#[derive(Debug, Default)]
struct Tally {
    frames: BTreeMap<&'static str, u64>,
    bytes: u64,
}

impl Tally {
    fn add(&mut self, frame: &[u8]) {
        let opcode = frame[0] & 0x0F;
        let label = OPCODE_LABELS
            .iter()
            .find(|(op, _)| *op == opcode)
            .map(|(_, l)| *l)
            .expect("a known opcode");
        *self.frames.entry(label).or_default() += 1;
        self.bytes += frame.len() as u64;
    }

    fn frame_count(&self) -> u64 {
        self.frames.values().sum()
    }

    /// Asserts the route's frame and byte counters of `direction` are exactly this tally.
    #[track_caller]
    fn assert_metrics(&self, s: &Scrape, route: &str, direction: &str) {
        for (_, opcode) in OPCODE_LABELS {
            let want = self.frames.get(opcode).copied().unwrap_or(0) as f64;
            s.assert_eq(
                "wsgate_frames_total",
                &[
                    ("route", route),
                    ("direction", direction),
                    ("opcode", opcode),
                ],
                want,
            );
        }
        s.assert_eq(
            "wsgate_bytes_total",
            &[("route", route), ("direction", direction)],
            self.bytes as f64,
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. A scripted exchange, counted exactly

#[tokio::test]
async fn scripted_exchange_is_counted_exactly() {
    let dir = TestDir::new();
    let (proxy, mut upstream) = chat_gate(&dir).await;
    let admin = proxy.admin();
    let mut client = connect(proxy.addr("public"), "/chat").await;
    let mut up = upstream.accept().await;

    let mut c2u = Tally::default();
    let mut u2c = Tally::default();

    // Client -> upstream: text frames with each length form (7-bit, 16-bit, 64-bit) and
    // the edges between them, then one binary frame.
    let text_sizes = [0usize, 5, 125, 126, 65_535, 65_536];
    let mut sent = Vec::new();
    for (i, size) in text_sizes.iter().enumerate() {
        let payload = vec![b'a' + i as u8; *size];
        sent.push(client_frame(op::TEXT, &payload));
    }
    sent.push(client_frame(op::BINARY, &support::pattern(1000)));
    for frame in &sent {
        client.send(frame).await;
        c2u.add(frame);
        let got = up.frame("a client frame at the upstream").await;
        assert_eq!(&got.raw, frame, "frames pass through unchanged");
    }

    // Upstream -> client: a fragmented text message, a binary frame, a large text frame
    // and a ping (forwarded pings are relayed, not answered by wsgate).
    let from_upstream = [
        encode(false, 0, op::TEXT, b"hel", None),
        encode(true, 0, op::CONTINUATION, b"lo", None),
        server_frame(op::BINARY, &support::pattern(200)),
        server_frame(op::TEXT, &vec![b'z'; 70_000]),
        server_frame(op::PING, b"upstream ping"),
    ];
    for frame in &from_upstream {
        up.send(frame).await;
        u2c.add(frame);
        let got = client.frame("an upstream frame at the client").await;
        assert_eq!(&got.raw, frame, "frames pass through unchanged");
    }

    // Mid-connection: the live gauge and the per-server gauge.
    let live = scrape(admin).await;
    live.assert_eq("wsgate_connections_active", &[("route", "chat")], 1.0);

    // The client closes with 4000; the upstream answers.
    let close = client_close(4000, "done");
    client.send(&close).await;
    c2u.add(&close);
    assert_eq!(
        up.frame("the client's close").await.close(),
        (4000, "done".to_string())
    );
    let answer = server_close(4000, "done");
    up.send(&answer).await;
    u2c.add(&answer);
    assert_eq!(
        client.frame("the upstream's close").await.close(),
        (4000, "done".to_string())
    );
    both_end(&mut client, &mut up).await;
    drop((client, up));

    let s = wait_metrics(admin, "the tunnel of /chat to end", |s| {
        s.value("wsgate_connections_active", &[("route", "chat")]) == 0.0
            && s.value(
                "wsgate_connection_duration_seconds_count",
                &[("route", "chat")],
            ) == 1.0
            && s.sum("wsgate_closes_total", &[("route", "chat")]) == 1.0
    })
    .await;

    c2u.assert_metrics(&s, "chat", "client_to_upstream");
    u2c.assert_metrics(&s, "chat", "upstream_to_client");
    s.assert_eq(
        "wsgate_connections_total",
        &[("route", "chat"), ("result", "upgraded")],
        1.0,
    );
    assert_eq!(
        s.sum("wsgate_connections_total", &[("route", "chat")]),
        1.0,
        "one handshake, one result:\n{}",
        s.family("wsgate_connections_total", &[("route", "chat")])
    );
    s.assert_eq(
        "wsgate_closes_total",
        &[("route", "chat"), ("initiator", "client"), ("code", "4xxx")],
        1.0,
    );
    s.assert_eq("wsgate_connections_active", &[("route", "chat")], 0.0);
    s.assert_eq(
        "wsgate_connection_duration_seconds_count",
        &[("route", "chat")],
        1.0,
    );
    s.assert_eq(
        "wsgate_connection_duration_seconds_bucket",
        &[("route", "chat"), ("le", "+Inf")],
        1.0,
    );
    s.assert_eq(
        "wsgate_handshake_duration_seconds_count",
        &[("route", "chat")],
        1.0,
    );
    s.assert_eq(
        "wsgate_handshake_duration_seconds_bucket",
        &[("route", "chat"), ("le", "+Inf")],
        1.0,
    );
    // No keepalive ran and nothing timed out.
    s.assert_eq("wsgate_pings_sent_total", &[("route", "chat")], 0.0);
    s.assert_eq("wsgate_pong_timeouts_total", &[("route", "chat")], 0.0);
    s.assert_eq("wsgate_idle_timeouts_total", &[("route", "chat")], 0.0);
    assert_eq!(s.sum("wsgate_rejected_total", &[]), 0.0);
    wait_no_connections(admin).await;
}

/// A close frame without a status code is a clean close: RFC 6455 §7.1.5 reports it as
/// 1005, and `none` is kept for connections dropped without any close frame.
#[tokio::test]
async fn close_without_code_counts_as_1005_and_a_dropped_socket_as_none() {
    let dir = TestDir::new();
    let (proxy, mut upstream) = chat_gate(&dir).await;
    let admin = proxy.admin();

    // An empty close frame (what a browser's `ws.close()` sends), answered the same way.
    let mut client = connect(proxy.addr("public"), "/chat").await;
    let mut up = upstream.accept().await;
    client.send(&client_frame(op::CLOSE, b"")).await;
    assert_eq!(up.frame("the empty close").await.opcode, op::CLOSE);
    up.send(&server_frame(op::CLOSE, b"")).await;
    assert_eq!(client.frame("the empty answer").await.opcode, op::CLOSE);
    both_end(&mut client, &mut up).await;
    drop((client, up));

    // A client that vanishes without a close frame.
    let client = connect(proxy.addr("public"), "/chat").await;
    let mut up = upstream.accept().await;
    drop(client);
    assert_eq!(
        up.frame("wsgate's close for a vanished client")
            .await
            .close(),
        (1001, "client gone".to_string())
    );
    up.send(&server_close(1001, "")).await;
    let (rest, ended) = up.until_eof("the upstream connection to end").await;
    assert_eq!((rest, ended), (vec![], Ended::Eof));
    drop(up);

    let s = wait_metrics(admin, "both tunnels of /chat to end", |s| {
        s.value(
            "wsgate_connection_duration_seconds_count",
            &[("route", "chat")],
        ) == 2.0
            && s.sum("wsgate_closes_total", &[("route", "chat")]) == 2.0
    })
    .await;
    s.assert_eq(
        "wsgate_closes_total",
        &[("route", "chat"), ("initiator", "client"), ("code", "1005")],
        1.0,
    );
    s.assert_eq(
        "wsgate_closes_total",
        &[("route", "chat"), ("initiator", "client"), ("code", "none")],
        1.0,
    );
}

// ---------------------------------------------------------------------------------------
// 2. Keepalive metrics

/// A proxy with three routes to one raw upstream: `answer` and `silent` ping clients every
/// 200ms (`silent` gives up 300ms after an unanswered ping), `idle` closes after 300ms
/// without a data frame.
async fn keepalive_gate(dir: &TestDir) -> (Proxy, WsUpstream) {
    let upstream = WsUpstream::spawn().await;
    let proxy = proxy_with(
        &format!(
            "[upstreams.app]\nservers = [\"{}\"]\n\
             [routes.answer]\npath = \"/answer\"\nupstream = \"app\"\n\
             [routes.answer.timeouts]\nping_interval = \"200ms\"\npong_timeout = \"5s\"\n\
             [routes.silent]\npath = \"/silent\"\nupstream = \"app\"\n\
             [routes.silent.timeouts]\nping_interval = \"200ms\"\npong_timeout = \"300ms\"\n\
             [routes.idle]\npath = \"/idle\"\nupstream = \"app\"\n\
             [routes.idle.timeouts]\nidle = \"300ms\"\nping_interval = \"0s\"\n",
            upstream.addr
        ),
        dir,
    )
    .await;
    (proxy, upstream)
}

/// On `/answer`: the client reads wsgate's first ping and answers it. Returns the pong
/// frame it sent and a scrape taken once the round trip was recorded.
async fn answer_one_ping(proxy: &Proxy, client: &mut WsConn) -> (Vec<u8>, Scrape) {
    let ping = client.frame("wsgate's first ping").await;
    assert_eq!(ping.opcode, op::PING, "{ping:?}");
    let pong = client_frame(op::PONG, &ping.payload);
    client.send(&pong).await;
    let live = wait_metrics(proxy.admin(), "the pong's round trip to be recorded", |s| {
        s.value("wsgate_ping_rtt_seconds_count", &[("route", "answer")]) >= 1.0
    })
    .await;
    (pong, live)
}

/// The client closes with 1000 "bye" (after any number of pings), the upstream answers,
/// both ends finish. Returns the close frame the client sent.
async fn close_from_client(client: &mut WsConn, up: &mut WsConn) -> Vec<u8> {
    let close = client_close(1000, "bye");
    client.send(&close).await;
    assert_eq!(
        next_close(up, "the client's close").await.close_code(),
        Some(1000)
    );
    up.send(&server_close(1000, "bye")).await;
    assert_eq!(
        next_close(client, "the upstream's close")
            .await
            .close_code(),
        Some(1000)
    );
    both_end(client, up).await;
    close
}

/// Waits until the one connection of `route` has ended and been counted.
async fn wait_route_done(admin: SocketAddr, route: &str) -> Scrape {
    wait_metrics(admin, &format!("the tunnel of /{route} to end"), |s| {
        s.value(
            "wsgate_connection_duration_seconds_count",
            &[("route", route)],
        ) == 1.0
            && s.sum("wsgate_closes_total", &[("route", route)]) == 1.0
    })
    .await
}

#[tokio::test]
async fn an_answered_ping_is_counted_with_its_round_trip() {
    let dir = TestDir::new();
    let (proxy, mut upstream) = keepalive_gate(&dir).await;
    let mut client = connect(proxy.addr("public"), "/answer").await;
    let mut up = upstream.accept().await;
    let (pong, _) = answer_one_ping(&proxy, &mut client).await;
    let close = close_from_client(&mut client, &mut up).await;
    drop((client, up));

    let s = wait_route_done(proxy.admin(), "answer").await;
    assert!(
        s.value("wsgate_pings_sent_total", &[("route", "answer")]) >= 1.0,
        "{}",
        s.family("wsgate_pings_sent_total", &[])
    );
    assert!(s.value("wsgate_ping_rtt_seconds_count", &[("route", "answer")]) >= 1.0);
    s.assert_eq("wsgate_pong_timeouts_total", &[("route", "answer")], 0.0);
    s.assert_eq("wsgate_idle_timeouts_total", &[("route", "answer")], 0.0);
    s.assert_eq(
        "wsgate_closes_total",
        &[
            ("route", "answer"),
            ("initiator", "client"),
            ("code", "1000"),
        ],
        1.0,
    );

    // wsgate consumed the client's pong (it answered wsgate's own ping), and wsgate's own
    // pings were never relayed: the frame and byte counters must describe the same frames,
    // either both counting the consumed pong or neither.
    let c2u = [("route", "answer"), ("direction", "client_to_upstream")];
    let pongs = s.value("wsgate_frames_total", &[c2u[0], c2u[1], ("opcode", "pong")]);
    let bytes = s.value("wsgate_bytes_total", &c2u);
    let (close_len, pong_len) = (close.len() as f64, pong.len() as f64);
    assert!(
        (pongs == 0.0 && bytes == close_len) || (pongs == 1.0 && bytes == close_len + pong_len),
        "client_to_upstream on /answer: frames_total{{opcode=\"pong\"}} is {pongs} but \
         bytes_total is {bytes} (the client's close is {close_len} bytes, the pong wsgate \
         consumed {pong_len}): the consumed pong is counted as a frame but not as bytes"
    );
}

#[tokio::test]
async fn pings_sent_total_moves_while_the_connection_is_open() {
    let dir = TestDir::new();
    let (proxy, mut upstream) = keepalive_gate(&dir).await;
    let mut client = connect(proxy.addr("public"), "/answer").await;
    let mut up = upstream.accept().await;
    // The ping went out before its pong came back, so a counter that moves when a ping is
    // sent shows it in the scrape that first shows the round trip.
    let (_, live) = answer_one_ping(&proxy, &mut client).await;
    let pings_while_open = live.value("wsgate_pings_sent_total", &[("route", "answer")]);
    live.assert_eq("wsgate_connections_active", &[("route", "answer")], 1.0);
    close_from_client(&mut client, &mut up).await;
    drop((client, up));
    assert!(
        pings_while_open >= 1.0,
        "wsgate_pings_sent_total{{route=\"answer\"}} was {pings_while_open} while the \
         connection was open and its ping had already been answered: the counter only moves \
         when the connection ends"
    );
}

#[tokio::test]
async fn an_unanswered_ping_is_a_pong_timeout_closed_by_the_proxy() {
    let dir = TestDir::new();
    let (proxy, mut upstream) = keepalive_gate(&dir).await;
    let mut client = connect(proxy.addr("public"), "/silent").await;
    let mut up = upstream.accept().await;
    let ping = client.frame("wsgate's ping").await;
    assert_eq!(ping.opcode, op::PING, "{ping:?}");
    client
        .expect_close(1001, "ping timeout", "wsgate's close for the silent client")
        .await;
    up.expect_close(
        1001,
        "client unresponsive",
        "wsgate's close to the upstream",
    )
    .await;
    client.send(&client_close(1000, "")).await;
    up.send(&server_close(1000, "")).await;
    both_end(&mut client, &mut up).await;
    drop((client, up));

    let s = wait_route_done(proxy.admin(), "silent").await;
    s.assert_eq("wsgate_pong_timeouts_total", &[("route", "silent")], 1.0);
    assert!(s.value("wsgate_pings_sent_total", &[("route", "silent")]) >= 1.0);
    s.assert_eq("wsgate_ping_rtt_seconds_count", &[("route", "silent")], 0.0);
    s.assert_eq("wsgate_idle_timeouts_total", &[("route", "silent")], 0.0);
    s.assert_eq(
        "wsgate_closes_total",
        &[
            ("route", "silent"),
            ("initiator", "proxy"),
            ("code", "1001"),
        ],
        1.0,
    );
}

#[tokio::test]
async fn a_quiet_connection_is_an_idle_timeout_closed_by_the_proxy() {
    let dir = TestDir::new();
    let (proxy, mut upstream) = keepalive_gate(&dir).await;
    let mut client = connect(proxy.addr("public"), "/idle").await;
    let mut up = upstream.accept().await;
    client
        .expect_close(1001, "idle timeout", "wsgate's idle close to the client")
        .await;
    // The client is closed first; the upstream hears once the client answered.
    client.send(&client_close(1000, "")).await;
    up.expect_close(1001, "idle timeout", "wsgate's idle close to the upstream")
        .await;
    up.send(&server_close(1000, "")).await;
    both_end(&mut client, &mut up).await;
    drop((client, up));

    let s = wait_route_done(proxy.admin(), "idle").await;
    s.assert_eq("wsgate_idle_timeouts_total", &[("route", "idle")], 1.0);
    s.assert_eq("wsgate_pong_timeouts_total", &[("route", "idle")], 0.0);
    s.assert_eq("wsgate_pings_sent_total", &[("route", "idle")], 0.0);
    s.assert_eq(
        "wsgate_closes_total",
        &[("route", "idle"), ("initiator", "proxy"), ("code", "1001")],
        1.0,
    );
}

// ---------------------------------------------------------------------------------------
// 3. Refusals and limits

/// The headers of an upgrade request, plus `extra`.
fn upgrade_request(path: &str, key: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut headers = vec![
        ("Host", "gate.test"),
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", key),
    ];
    headers.extend_from_slice(extra);
    http_request("GET", path, &headers)
}

const KEY: &str = support::WS_KEY;

#[tokio::test]
async fn refusals_are_counted_by_reason_and_result() {
    let dir = TestDir::new();
    let ws = WsUpstream::spawn().await;
    let down = closed_port().await;
    let auth = spawn_raw_upstream(answer_status("401 Unauthorized", &[], "who are you?")).await;
    let web = spawn_http_upstream().await;
    let proxy = proxy_with(
        &format!(
            "[upstreams.ok]\nservers = [\"{}\"]\n\
             [upstreams.down]\nservers = [\"{down}\"]\n\
             [upstreams.auth]\nservers = [\"{}\"]\n\
             [upstreams.web]\nservers = [\"{}\"]\n\
             [routes.guarded]\npath = \"/guarded\"\nupstream = \"ok\"\n\
             allowed_origins = [\"https://ok.example\"]\n\
             [routes.down]\npath = \"/down\"\nupstream = \"down\"\n\
             [routes.auth]\npath = \"/auth\"\nupstream = \"auth\"\n\
             [routes.web]\npath = \"/web\"\nupstream = \"web\"\n",
            ws.addr, auth.addr, web.addr
        ),
        &dir,
    )
    .await;
    let public = proxy.addr("public");
    let admin = proxy.admin();

    let r = raw_exchange(
        public,
        &upgrade_request("/guarded", KEY, &[("Origin", "https://evil.example")]),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body_text());
    let r = raw_exchange(
        public,
        &upgrade_request("/guarded", "c2hvcnQ=", &[("Origin", "https://ok.example")]),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body_text());
    let r = raw_exchange(public, &upgrade_request("/nowhere", KEY, &[])).await;
    assert_eq!(r.status, 404, "{}", r.body_text());
    let r = raw_exchange(public, &upgrade_request("/down", KEY, &[])).await;
    assert_eq!(r.status, 502, "{}", r.body_text());
    let r = raw_exchange(public, &upgrade_request("/auth", KEY, &[])).await;
    assert_eq!(r.status, 401, "{}", r.body_text());
    let r = raw_exchange(
        public,
        &http_request("GET", "/web/page", &[("Host", "gate.test")]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_text());

    // Every answer above was counted before it was sent.
    let s = scrape(admin).await;
    s.assert_eq("wsgate_rejected_total", &[("reason", "origin")], 1.0);
    s.assert_eq("wsgate_rejected_total", &[("reason", "bad_handshake")], 1.0);
    s.assert_eq("wsgate_rejected_total", &[("reason", "no_route")], 1.0);
    assert_eq!(
        s.sum("wsgate_rejected_total", &[]),
        3.0,
        "{}",
        s.family("wsgate_rejected_total", &[])
    );
    s.assert_eq(
        "wsgate_connections_total",
        &[("route", "guarded"), ("result", "refused")],
        2.0,
    );
    s.assert_eq(
        "wsgate_connections_total",
        &[("route", "down"), ("result", "upstream_error")],
        1.0,
    );
    s.assert_eq(
        "wsgate_upstream_connect_errors_total",
        &[
            ("upstream", "down"),
            ("server", &down.to_string()),
            ("kind", "refused"),
        ],
        1.0,
    );
    s.assert_eq(
        "wsgate_connections_total",
        &[("route", "auth"), ("result", "upstream_status")],
        1.0,
    );
    s.assert_eq(
        "wsgate_http_requests_total",
        &[("route", "web"), ("status", "200")],
        1.0,
    );
    // Each request counted once, under one family only.
    assert_eq!(s.sum("wsgate_connections_total", &[]), 4.0);
    assert_eq!(s.sum("wsgate_http_requests_total", &[]), 1.0);
    assert_eq!(s.sum("wsgate_upstream_connect_errors_total", &[]), 1.0);
    assert_eq!(
        s.sum("wsgate_handshake_duration_seconds_count", &[]),
        0.0,
        "only completed upgrades are timed"
    );
}

/// A proxy whose only route is the builtin echo at `/echo`, with `limits`.
async fn echo_gate(limits: &str, dir: &TestDir) -> Proxy {
    proxy_with(
        &format!("[limits]\n{limits}\n[routes.echo]\npath = \"/echo\"\nbuiltin = \"echo\"\n"),
        dir,
    )
    .await
}

/// An upgrade of `/echo` whose answer is `status`; the connection is closed after it.
async fn echo_upgrade(proxy: &Proxy, status: u16) {
    let r = raw_exchange(proxy.addr("public"), &upgrade_request("/echo", KEY, &[])).await;
    assert_eq!(r.status, status, "{:?} {}", r.head, r.body_text());
}

#[tokio::test]
async fn per_ip_limit_refusal_is_counted() {
    let dir = TestDir::new();
    let proxy = echo_gate("max_connections_per_ip = 1", &dir).await;
    let open = connect(proxy.addr("public"), "/echo").await;
    echo_upgrade(&proxy, 429).await;
    let s = scrape(proxy.admin()).await;
    s.assert_eq("wsgate_rejected_total", &[("reason", "per_ip")], 1.0);
    assert_eq!(s.sum("wsgate_rejected_total", &[]), 1.0);
    s.assert_eq(
        "wsgate_connections_total",
        &[("route", "echo"), ("result", "refused")],
        1.0,
    );
    s.assert_eq(
        "wsgate_connections_total",
        &[("route", "echo"), ("result", "upgraded")],
        1.0,
    );
    drop(open);
}

#[tokio::test]
async fn max_connections_refusal_is_counted() {
    let dir = TestDir::new();
    let proxy = echo_gate("max_connections = 1", &dir).await;
    let open = connect(proxy.addr("public"), "/echo").await;
    echo_upgrade(&proxy, 503).await;
    let s = scrape(proxy.admin()).await;
    s.assert_eq(
        "wsgate_rejected_total",
        &[("reason", "max_connections")],
        1.0,
    );
    assert_eq!(s.sum("wsgate_rejected_total", &[]), 1.0);
    s.assert_eq(
        "wsgate_connections_total",
        &[("route", "echo"), ("result", "refused")],
        1.0,
    );
    drop(open);
}

#[tokio::test]
async fn handshake_rate_refusal_is_counted() {
    let dir = TestDir::new();
    // A burst of two per address. Refilled per minute rather than per second so the third
    // handshake is refused however slowly a loaded machine runs the three of them.
    let proxy = echo_gate("handshake_rate_per_ip = \"2/m\"", &dir).await;
    echo_upgrade(&proxy, 101).await;
    echo_upgrade(&proxy, 101).await;
    echo_upgrade(&proxy, 429).await;
    let s = scrape(proxy.admin()).await;
    s.assert_eq("wsgate_rejected_total", &[("reason", "rate_limit")], 1.0);
    assert_eq!(s.sum("wsgate_rejected_total", &[]), 1.0);
    s.assert_eq(
        "wsgate_connections_total",
        &[("route", "echo"), ("result", "upgraded")],
        2.0,
    );
    s.assert_eq(
        "wsgate_connections_total",
        &[("route", "echo"), ("result", "refused")],
        1.0,
    );
}

// ---------------------------------------------------------------------------------------
// 4. Upstream gauges

#[tokio::test]
async fn upstream_gauges_follow_a_live_websocket() {
    let dir = TestDir::new();
    let (proxy, mut upstream) = chat_gate(&dir).await;
    let admin = proxy.admin();
    let server = upstream.addr.to_string();
    let labels = [("upstream", "app"), ("server", server.as_str())];

    let s = scrape(admin).await;
    s.assert_eq("wsgate_upstream_healthy", &labels, 1.0);
    s.assert_eq("wsgate_upstream_active_connections", &labels, 0.0);

    let mut client = connect(proxy.addr("public"), "/chat").await;
    let mut up = upstream.accept().await;
    let s = scrape(admin).await;
    s.assert_eq("wsgate_upstream_active_connections", &labels, 1.0);
    s.assert_eq("wsgate_upstream_healthy", &labels, 1.0);

    client.send(&client_close(1000, "")).await;
    up.frame("the client's close").await;
    up.send(&server_close(1000, "")).await;
    client.frame("the upstream's close").await;
    both_end(&mut client, &mut up).await;
    drop((client, up));

    let s = wait_metrics(admin, "the upstream connection to be released", |s| {
        s.value("wsgate_upstream_active_connections", &labels) == 0.0
    })
    .await;
    s.assert_eq("wsgate_upstream_healthy", &labels, 1.0);
}

// ---------------------------------------------------------------------------------------
// 5. No leak over many connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_echo_connections_leave_nothing_behind() {
    /// Connect/echo/close cycles in total, and how many run at once.
    const CYCLES: usize = 1000;
    const CONCURRENCY: usize = 16;

    let dir = TestDir::new();
    // No handshake rate limit: every cycle comes from 127.0.0.1.
    let proxy = echo_gate("handshake_rate_per_ip = \"0/s\"", &dir).await;
    let url = format!("ws://{}/echo", proxy.addr("public"));
    let admin = proxy.admin();

    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (url, next) = (url.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < CYCLES {
                let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .expect("the echo handshake");
                ws.send(Message::text("ping me back")).await.expect("send");
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "ping me back"),
                    other => panic!("expected the echo, got {other:?}"),
                }
                ws.close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                }))
                .await
                .expect("send the close");
                while let Some(Ok(_)) = ws.next().await {}
            }
        }));
    }
    within("1000 echo cycles", async {
        for w in workers {
            w.await.expect("an echo worker panicked");
        }
    })
    .await;

    let s = wait_metrics(admin, "every echo tunnel to end", |s| {
        s.value("wsgate_connections_active", &[("route", "echo")]) == 0.0
            && s.value(
                "wsgate_connection_duration_seconds_count",
                &[("route", "echo")],
            ) == CYCLES as f64
    })
    .await;
    wait_no_connections(admin).await;
    let n = CYCLES as f64;
    s.assert_eq(
        "wsgate_connections_total",
        &[("route", "echo"), ("result", "upgraded")],
        n,
    );
    s.assert_eq(
        "wsgate_closes_total",
        &[("route", "echo"), ("initiator", "client"), ("code", "1000")],
        n,
    );
    // Each cycle: one text and one close each way.
    for direction in ["client_to_upstream", "upstream_to_client"] {
        for opcode in ["text", "close"] {
            s.assert_eq(
                "wsgate_frames_total",
                &[
                    ("route", "echo"),
                    ("direction", direction),
                    ("opcode", opcode),
                ],
                n,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 6. GET /connections and DELETE /connections/{id}

/// A raw WebSocket peer over a TCP stream, for handshakes `wsraw` does not script
/// (subprotocols).
struct Peer {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Peer {
    async fn send(&mut self, bytes: &[u8]) {
        within("a write", self.stream.write_all(bytes))
            .await
            .expect("write to the proxy");
    }

    async fn frame(&mut self, what: &str) -> Frame {
        within(what, async {
            loop {
                if let Some((frame, used)) = parse_frame(&self.buf) {
                    self.buf.drain(..used);
                    return frame;
                }
                let mut chunk = [0u8; 16 * 1024];
                let n = self.stream.read(&mut chunk).await.expect("read");
                assert!(n > 0, "the connection ended before {what}");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
    }

    /// Reads to EOF, asserting that nothing more came and the end was a FIN.
    async fn expect_eof(&mut self, what: &str) {
        within(what, async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) => panic!("{what}: read failed: {e}"),
                }
            }
            assert!(
                self.buf.is_empty(),
                "{what}: unexpected bytes {:?}",
                self.buf
            );
        })
        .await
    }
}

/// An upstream that answers every upgrade with `protocol` as the chosen subprotocol and
/// hands the socket and the request head to the test.
async fn spawn_subprotocol_upstream(
    protocol: &'static str,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<(Peer, String)>,
    AbortOnDrop,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let Ok(Some(head)) = read_head(&mut stream, &mut buf).await else {
                continue;
            };
            let key = parse_head(&head)
                .header("sec-websocket-key")
                .unwrap_or_default()
                .to_string();
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n",
                wsraw::accept_key(&key)
            );
            if stream.write_all(answer.as_bytes()).await.is_ok() {
                let _ = stream.set_nodelay(true);
                let _ = tx.send((Peer { stream, buf }, head));
            }
        }
    });
    (addr, rx, AbortOnDrop(task))
}

#[tokio::test]
async fn connections_lists_a_live_websocket_and_delete_closes_it() {
    let dir = TestDir::new();
    let (upstream_addr, mut accepted, _upstream_task) = spawn_subprotocol_upstream("chat.v2").await;
    let proxy = proxy_with(
        &format!(
            "[upstreams.app]\nservers = [\"{upstream_addr}\"]\n\
             [routes.chat]\npath = \"/chat\"\nupstream = \"app\"\n"
        ),
        &dir,
    )
    .await;
    let admin = proxy.admin();
    assert_eq!(connections(admin).await, Vec::<serde_json::Value>::new());

    // The client offers two subprotocols; the upstream picks chat.v2.
    let mut stream = TcpStream::connect(proxy.addr("public"))
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let client_addr = stream.local_addr().expect("client address");
    let key = "AAECAwQFBgcICQoLDA0ODw==";
    stream
        .write_all(&upgrade_request(
            "/chat/room",
            key,
            &[("Sec-WebSocket-Protocol", "chat.v2, chat.v1")],
        ))
        .await
        .expect("send the upgrade");
    let mut buf = Vec::new();
    let head = within("the 101", read_head(&mut stream, &mut buf))
        .await
        .expect("read the 101")
        .expect("an answer");
    let head = parse_head(&head);
    assert!(head.first_line.starts_with("HTTP/1.1 101"), "{head:?}");
    assert_eq!(head.header("sec-websocket-protocol"), Some("chat.v2"));
    let mut client = Peer { stream, buf };
    let (mut up, _) = within("the upstream connection", accepted.recv())
        .await
        .expect("an upstream connection");

    let mut c2u = Tally::default();
    let mut u2c = Tally::default();
    for frame in [
        client_frame(op::TEXT, b"hello"),
        client_frame(op::BINARY, &support::pattern(300)),
        client_frame(op::TEXT, &[b'x'; 200]),
    ] {
        client.send(&frame).await;
        c2u.add(&frame);
        assert_eq!(up.frame("a client frame").await.raw, frame);
    }
    for frame in [
        server_frame(op::TEXT, b"welcome"),
        server_frame(op::BINARY, &support::pattern(70_000)),
    ] {
        up.send(&frame).await;
        u2c.add(&frame);
        assert_eq!(client.frame("an upstream frame").await.raw, frame);
    }

    let list = connections(admin).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let c = &list[0];
    let id = c["id"].as_u64().unwrap_or_else(|| panic!("id: {c}"));
    let upstream_label = upstream_addr.to_string();
    let expected = [
        ("client", serde_json::json!(client_addr.to_string())),
        ("listener", serde_json::json!("public")),
        ("route", serde_json::json!("chat")),
        ("upstream", serde_json::json!("app")),
        ("server", serde_json::json!(upstream_label)),
        ("http_version", serde_json::json!("1.1")),
        ("subprotocol", serde_json::json!("chat.v2")),
        ("bytes_client_to_upstream", serde_json::json!(c2u.bytes)),
        ("bytes_upstream_to_client", serde_json::json!(u2c.bytes)),
        (
            "frames_client_to_upstream",
            serde_json::json!(c2u.frame_count()),
        ),
        (
            "frames_upstream_to_client",
            serde_json::json!(u2c.frame_count()),
        ),
    ];
    for (field, want) in &expected {
        assert_eq!(&c[*field], want, "field {field} of {c}");
    }
    let age = c["age_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("age_seconds: {c}"));
    assert!(age >= 0.0, "{c}");
    let idle = c["idle_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("idle_seconds: {c}"));
    assert!(idle >= 0.0 && idle <= age, "{c}");
    assert!(
        c["ping_rtt_ms"].is_null() || c["ping_rtt_ms"].is_number(),
        "ping_rtt_ms: {c}"
    );
    // Exactly the fields of design.md, no more.
    let mut fields: Vec<&str> = c
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "age_seconds",
            "bytes_client_to_upstream",
            "bytes_upstream_to_client",
            "client",
            "frames_client_to_upstream",
            "frames_upstream_to_client",
            "http_version",
            "id",
            "idle_seconds",
            "listener",
            "ping_rtt_ms",
            "route",
            "server",
            "subprotocol",
            "upstream",
        ]
    );

    // Unknown ids.
    let r = admin_request(admin, "DELETE", "/connections/999999").await;
    assert_eq!(r.status, 404, "{}", r.body_text());
    let r = admin_request(admin, "DELETE", "/connections/abc").await;
    assert_eq!(r.status, 404, "{}", r.body_text());

    // The operator closes it: both peers get 1001 "closed by operator", the client first;
    // the upstream once the client has answered.
    let r = admin_request(admin, "DELETE", &format!("/connections/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    let to_client = client.frame("wsgate's close to the client").await;
    assert_eq!(to_client.close(), (1001, "closed by operator".to_string()));
    assert!(
        to_client.mask.is_none(),
        "frames to a client are not masked"
    );
    client.send(&client_close(1001, "")).await;
    let to_upstream = up.frame("wsgate's close to the upstream").await;
    assert_eq!(
        to_upstream.close(),
        (1001, "closed by operator".to_string())
    );
    assert!(
        to_upstream.mask.is_some(),
        "frames to an upstream are masked"
    );
    up.send(&server_close(1001, "")).await;
    client.expect_eof("the client connection to end").await;
    up.expect_eof("the upstream connection to end").await;
    drop((client, up));

    wait_no_connections(admin).await;
    let s = wait_metrics(admin, "the closed tunnel to be counted", |s| {
        s.sum("wsgate_closes_total", &[("route", "chat")]) == 1.0
    })
    .await;
    s.assert_eq(
        "wsgate_closes_total",
        &[("route", "chat"), ("initiator", "proxy"), ("code", "1001")],
        1.0,
    );
    let r = admin_request(admin, "DELETE", &format!("/connections/{id}")).await;
    assert_eq!(
        r.status,
        404,
        "a closed connection is gone: {}",
        r.body_text()
    );
}

// ---------------------------------------------------------------------------------------
// 7. Health, readiness, unknown paths, methods

#[tokio::test]
async fn admin_endpoints_answer_with_the_right_status_and_allow() {
    let dir = TestDir::new();
    let proxy = echo_gate("", &dir).await;
    let admin = proxy.admin();

    let r = admin_get(admin, "/healthz").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    let r = admin_get(admin, "/readyz").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    let r = admin_get(admin, "/no-such-endpoint").await;
    assert_eq!(r.status, 404, "{}", r.body_text());

    let r = admin_get(admin, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.head
    );
    let r = admin_request(admin, "POST", "/metrics").await;
    assert_eq!(r.status, 405, "{}", r.body_text());
    assert_eq!(r.header("allow"), Some("GET"));
    let r = admin_get(admin, "/reload").await;
    assert_eq!(r.status, 405, "{}", r.body_text());
    assert_eq!(r.header("allow"), Some("POST"));
}

// ---------------------------------------------------------------------------------------
// 8. TLS handshake failures

#[tokio::test]
async fn a_failed_tls_handshake_is_counted_on_its_listener() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.issue(&["gate.test", "127.0.0.1"]).write(&dir, "gate");
    let proxy = proxy_with(
        "[listeners.secure]\nbind = \"127.0.0.1:0\"\n\
         [listeners.secure.tls]\ncert = \"gate.crt\"\nkey = \"gate.key\"\n\
         [routes.echo]\npath = \"/echo\"\nbuiltin = \"echo\"\n",
        &dir,
    )
    .await;
    let secure = proxy.addr("secure");
    let admin = proxy.admin();

    // A good handshake, with a request over it so the server side surely finished.
    let tls = support::tls_connect(secure, "gate.test", ca.client_config())
        .await
        .expect("a TLS handshake");
    let mut good = RawClient::over(tls);
    good.send(&http_request("GET", "/echo", &[("Host", "gate.test")]))
        .await;
    assert_eq!(good.read_response().await.status, 426);
    drop(good);

    // Plain text to a TLS listener.
    let mut bad = RawClient::connect(secure).await;
    bad.send(b"GET /echo HTTP/1.1\r\nHost: gate.test\r\n\r\n")
        .await;
    let _ = bad.read_until_closed().await;

    let s = wait_metrics(admin, "the failed TLS handshake to be counted", |s| {
        s.value(
            "wsgate_tls_handshake_errors_total",
            &[("listener", "secure")],
        ) >= 1.0
    })
    .await;
    s.assert_eq(
        "wsgate_tls_handshake_errors_total",
        &[("listener", "secure")],
        1.0,
    );
    assert_eq!(
        s.value(
            "wsgate_tls_handshake_errors_total",
            &[("listener", "public")]
        ),
        0.0,
        "a plain listener has no TLS handshakes"
    );
}

// ---------------------------------------------------------------------------------------
// 9. promtool

/// Runs promtool with `args`, feeding `stdin`; `None` when promtool is not installed.
fn promtool(args: &[&str], stdin: &[u8]) -> Option<std::process::Output> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = match Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    let mut input = child.stdin.take().expect("promtool's stdin");
    input.write_all(stdin).expect("write to promtool");
    drop(input);
    Some(child.wait_with_output().expect("promtool's output"))
}

#[tokio::test]
async fn promtool_accepts_the_scrape_and_the_alert_rules() {
    if promtool(&["--version"], b"").is_none() {
        println!("SKIPPED: promtool not installed");
        return;
    }
    let dir = TestDir::new();
    let proxy = echo_gate("", &dir).await;
    // Traffic, so every kind of family (histograms included) has series.
    let mut ws = connect(proxy.addr("public"), "/echo").await;
    ws.send(&client_frame(op::TEXT, b"hi")).await;
    assert_eq!(ws.frame("the echo").await.payload, b"hi");
    ws.send(&client_close(1000, "")).await;
    ws.frame("the echoed close").await;
    drop(ws);
    echo_upgrade(&proxy, 101).await;
    let r = raw_exchange(
        proxy.addr("public"),
        &http_request("GET", "/echo", &[("Host", "gate.test")]),
    )
    .await;
    assert_eq!(r.status, 426);
    let _ = raw_exchange(proxy.addr("public"), &upgrade_request("/none", KEY, &[])).await;

    let text = admin_get(proxy.admin(), "/metrics").await.body;
    assert!(
        String::from_utf8_lossy(&text).contains("wsgate_handshake_duration_seconds_bucket"),
        "the scrape has histogram series"
    );
    let out = tokio::task::spawn_blocking(move || {
        promtool(&["check", "metrics"], &text).expect("promtool")
    })
    .await
    .expect("promtool task");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    println!("promtool check metrics: OK");

    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/prometheus-alerts.yml");
    let rules = rules.to_str().expect("a UTF-8 path").to_owned();
    let out = tokio::task::spawn_blocking(move || {
        promtool(&["check", "rules", &rules], b"").expect("promtool")
    })
    .await
    .expect("promtool task");
    assert!(
        out.status.success(),
        "promtool check rules failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "promtool check rules: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
}

/// `GET /connections` filters by route and client, sorts by any column either way, pages
/// with `limit` and `offset`, and says the total before paging in `X-Total-Count`.
#[tokio::test]
async fn the_connection_list_filters_sorts_and_pages() {
    let dir = TestDir::new();
    let (proxy, mut upstream) = chat_gate(&dir).await;
    // Three on /chat (with 1, 2 and 3 frames sent), one on the builtin echo route.
    let admin = proxy.admin();
    let mut held = Vec::new();
    for frames in 1..=3usize {
        let mut client = connect(proxy.addr("public"), "/chat").await;
        let mut up = upstream.accept().await;
        for _ in 0..frames {
            let frame = client_frame(op::BINARY, &[7u8; 100]);
            client.send(&frame).await;
            assert_eq!(up.frame("a client frame").await.raw, frame);
        }
        held.push((client, up));
    }
    let list = connections(admin).await;
    assert_eq!(list.len(), 3);
    let page = |query: &'static str| async move {
        let r = admin_get(admin, query).await;
        assert_eq!(r.status, 200, "{query}: {}", r.body_text());
        let total: usize = r
            .header("x-total-count")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{query}: no X-Total-Count"));
        let list: Vec<serde_json::Value> = serde_json::from_slice(&r.body).expect("JSON array");
        let ids: Vec<u64> = list.iter().filter_map(|c| c["id"].as_u64()).collect();
        (total, ids)
    };
    let mut ids: Vec<u64> = list.iter().filter_map(|c| c["id"].as_u64()).collect();
    ids.sort_unstable();
    // Frames per connection follow the id order, so both sorts agree.
    assert_eq!(page("/connections?sort=id").await, (3, ids.clone()));
    let mut reversed = ids.clone();
    reversed.reverse();
    assert_eq!(
        page("/connections?sort=-frames").await,
        (3, reversed.clone())
    );
    assert_eq!(
        page("/connections?sort=-frames&limit=2&offset=1").await,
        (3, reversed[1..3].to_vec())
    );
    assert_eq!(
        page("/connections?route=chat&limit=1").await,
        (3, ids[..1].to_vec())
    );
    assert_eq!(page("/connections?route=nope").await, (0, vec![]));
    assert_eq!(page("/connections?client=127.0.0.1%3A").await.0, 3);
    assert_eq!(page("/connections?client=10.").await, (0, vec![]));
    let r = admin_get(admin, "/connections?sort=size").await;
    assert_eq!(r.status, 400);
    support::assert_one_line(&r.body_text());
    assert!(
        r.body_text().starts_with("invalid sort \"size\""),
        "{}",
        r.body_text()
    );
    drop(held);
}

/// A web page in the operator's browser must not be able to close connections or reload
/// through an admin listener it can reach: mutations from another site get 403 and change
/// nothing; the admin's own origin, and tools that send no Origin, pass.
#[tokio::test]
async fn cross_site_mutations_are_refused() {
    let dir = TestDir::new();
    let (proxy, mut upstream) = chat_gate(&dir).await;
    let admin = proxy.admin();
    let _client = connect(proxy.addr("public"), "/chat").await;
    let _up = upstream.accept().await;
    let id = connections(admin).await[0]["id"].as_u64().expect("an id");
    let delete = format!("/connections/{id}");
    let host = admin.to_string();
    let own = format!("http://{host}");
    for (headers, refused) in [
        (
            vec![("Origin", "https://evil.example")],
            "Origin https://evil.example is not this admin listener",
        ),
        (
            vec![("Origin", "null")],
            "Origin null is not this admin listener",
        ),
        (
            vec![("Sec-Fetch-Site", "cross-site")],
            "Sec-Fetch-Site is cross-site",
        ),
    ] {
        for (method, path) in [("DELETE", delete.as_str()), ("POST", "/reload")] {
            let mut h = vec![("Host", host.as_str()), ("Content-Length", "0")];
            h.extend(headers.iter().copied());
            let r = raw_exchange(admin, &http_request(method, path, &h)).await;
            assert_eq!(
                r.status,
                403,
                "{method} {path} with {headers:?}: {}",
                r.body_text()
            );
            support::assert_one_line(&r.body_text());
            assert!(r.body_text().contains(refused), "{}", r.body_text());
        }
    }
    // Still open: nothing was closed.
    assert_eq!(connections(admin).await.len(), 1);
    // Reading stays open to pages (a dashboard), and the admin's own origin may mutate.
    let r = raw_exchange(
        admin,
        &http_request(
            "GET",
            "/connections",
            &[("Host", "admin"), ("Origin", "https://evil.example")],
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = raw_exchange(
        admin,
        &http_request(
            "DELETE",
            &delete,
            &[
                ("Host", host.as_str()),
                ("Origin", own.as_str()),
                ("Content-Length", "0"),
            ],
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body_text());
}
