//! Hostile clients: the `[limits]` admission limits, slowloris and oversized heads, request
//! smuggling attempts, an upgrade with a body, a TLS handshake that never finishes, a client
//! that never reads, and file-descriptor exhaustion.
//!
//! Each case asserts the exact answer and that nothing reached the upstream: upstreams
//! record every request, and after the hostile exchange a sentinel request is sent through
//! the proxy; it must be the first (and only) thing the upstream saw. Since the hostile
//! client's answer (or closed connection) came before the sentinel was sent, anything the
//! proxy had forwarded would have been recorded ahead of it.
//!
//! Every wait is bounded by `support::LIMIT`; nothing sleeps to synchronise. The time windows
//! are those a case is about (`client_header`, the never-reading client's 2 s, the 1 s of
//! CPU time measured while out of descriptors).

mod support;
mod wsraw;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use support::{
    assert_one_line, http_request, next_data, raw_exchange, spawn_http_upstream, spawn_proxy,
    spawn_ws_upstream, tls_connect, within, Ended, HttpUpstream, Proxy, RawClient, RawResponse,
    TestCa, TestDir, WsUpstream, LIMIT,
};

/// Pace of retries while waiting for something the test cannot be told about (a released
/// admission slot, a refilled token, a process that has not opened its port yet).
const POLL: Duration = Duration::from_millis(20);

/// The `client_header` of the slow-client cases: short, so the file runs fast.
const CLIENT_HEADER: Duration = Duration::from_millis(500);

/// A plain listener `public`, `[limits]` and `[timeouts]` as given, route `/chat` to the
/// WebSocket upstream and route `/app` to the HTTP upstream.
fn config(ws: SocketAddr, http: SocketAddr, limits: &str, timeouts: &str) -> String {
    format!(
        r#"
[listeners.public]
bind = "127.0.0.1:0"

[timeouts]
upstream_connect = "2s"
upstream_handshake = "5s"
{timeouts}

[limits]
{limits}

[upstreams.chat]
servers = ["{ws}"]
[routes.chat]
path = "/chat"
upstream = "chat"

[upstreams.app]
servers = ["{http}"]
[routes.app]
path = "/app"
upstream = "app"
"#
    )
}

/// A proxy in front of a recording WebSocket upstream and a recording HTTP upstream.
struct Setup {
    proxy: Proxy,
    ws: WsUpstream,
    http: HttpUpstream,
    _dir: TestDir,
}

impl Setup {
    async fn new(limits: &str, timeouts: &str) -> Setup {
        let ws = spawn_ws_upstream().await;
        let http = spawn_http_upstream().await;
        let dir = TestDir::new();
        let proxy = spawn_proxy(&config(ws.addr, http.addr, limits, timeouts), &dir).await;
        Setup {
            proxy,
            ws,
            http,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.addr("public")
    }

    async fn metrics(&self) -> String {
        raw_exchange(
            self.proxy.admin(),
            &http_request("GET", "/metrics", &[("Host", "admin")]),
        )
        .await
        .body_text()
    }

    /// Sends a plain sentinel request and asserts it is the only request the HTTP
    /// upstream has seen.
    async fn assert_http_upstream_saw_nothing(&mut self, case: &str) {
        let response = raw_exchange(
            self.addr(),
            &http_request("GET", "/app/sentinel", &[("Host", "app.test")]),
        )
        .await;
        assert_eq!(response.status, 200, "the sentinel: {response:?}");
        let first = self
            .http
            .requests
            .next("the sentinel at the upstream")
            .await;
        assert_eq!(
            first.uri.path(),
            "/app/sentinel",
            "{case}: the upstream saw {} {} before the sentinel",
            first.method,
            first.uri
        );
        assert!(self.http.requests.try_next().is_none());
    }

    /// Opens a WebSocket with the sentinel path and asserts it is the only upgrade the
    /// WebSocket upstream has seen.
    async fn assert_ws_upstream_saw_nothing(&mut self, case: &str) {
        let (_client, response) = upgrade(self.addr(), "/chat/sentinel").await;
        assert_eq!(response.status, 101, "the sentinel: {response:?}");
        let first = self.ws.requests.next("the sentinel at the upstream").await;
        assert_eq!(
            first.uri.path(),
            "/chat/sentinel",
            "{case}: the upstream saw {} before the sentinel",
            first.uri
        );
        assert!(self.ws.requests.try_next().is_none());
    }
}

/// The value of one series (`name{labels}`, exactly as rendered) in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A valid upgrade request for `path`.
fn upgrade_request(path: &str) -> Vec<u8> {
    http_request("GET", path, &support::ws_headers("chat.test"))
}

/// Sends an upgrade for `path` on a new connection; returns the connection (open, so an
/// upgraded WebSocket stays live until it is dropped) and the answer.
async fn upgrade(addr: SocketAddr, path: &str) -> (RawClient, RawResponse) {
    let mut client = RawClient::connect(addr).await;
    client.send(&upgrade_request(path)).await;
    let response = client.read_response().await;
    (client, response)
}

/// Retries an upgrade (each refused with `refusal`) until one is admitted; returns it.
async fn admitted_again(addr: SocketAddr, path: &str, refusal: u16) -> RawClient {
    within("an upgrade to be admitted again", async {
        loop {
            let (client, response) = upgrade(addr, path).await;
            if response.status == 101 {
                return client;
            }
            assert_eq!(response.status, refusal, "{response:?}");
            tokio::time::sleep(POLL).await;
        }
    })
    .await
}

/// The paths of every upgrade the WebSocket upstream has seen so far.
fn seen_paths(ws: &mut WsUpstream) -> Vec<String> {
    let mut paths = Vec::new();
    while let Some(seen) = ws.requests.try_next() {
        paths.push(seen.uri.path().to_string());
    }
    paths
}

// ---------------------------------------------------------------------------------------
// Limits

#[tokio::test]
async fn max_connections_answers_503_and_admits_again_once_one_closes() {
    let mut s = Setup::new("max_connections = 2\nhandshake_rate_per_ip = \"0/s\"", "").await;
    let (first, r1) = upgrade(s.addr(), "/chat/1").await;
    let (_second, r2) = upgrade(s.addr(), "/chat/2").await;
    assert_eq!((r1.status, r2.status), (101, 101));

    let (_, refused) = upgrade(s.addr(), "/chat/refused").await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_one_line(&refused.body_text());
    assert!(refused.body_text().contains("max_connections"));
    let metrics = s.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "wsgate_rejected_total{reason=\"max_connections\"}"
        ),
        Some(1.0),
        "{metrics}"
    );

    drop(first);
    let _third = admitted_again(s.addr(), "/chat/3", 503).await;
    assert_eq!(seen_paths(&mut s.ws), ["/chat/1", "/chat/2", "/chat/3"]);
}

#[tokio::test]
async fn max_connections_per_ip_answers_429_with_retry_after() {
    let mut s = Setup::new(
        "max_connections_per_ip = 2\nhandshake_rate_per_ip = \"0/s\"",
        "",
    )
    .await;
    let (first, r1) = upgrade(s.addr(), "/chat/1").await;
    let (_second, r2) = upgrade(s.addr(), "/chat/2").await;
    assert_eq!((r1.status, r2.status), (101, 101));

    let (_, refused) = upgrade(s.addr(), "/chat/refused").await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_one_line(&refused.body_text());
    assert!(refused.body_text().contains("max_connections_per_ip"));
    let metrics = s.metrics().await;
    assert_eq!(
        metric(&metrics, "wsgate_rejected_total{reason=\"per_ip\"}"),
        Some(1.0),
        "{metrics}"
    );

    drop(first);
    let _third = admitted_again(s.addr(), "/chat/3", 429).await;
    assert_eq!(seen_paths(&mut s.ws), ["/chat/1", "/chat/2", "/chat/3"]);
}

#[tokio::test]
async fn handshake_rate_per_ip_answers_429_and_refills() {
    let mut s = Setup::new("handshake_rate_per_ip = \"2/s\"", "").await;
    // Three upgrades at once: the bucket holds two, and refills one per 500 ms.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(RawClient::connect(s.addr()).await);
    }
    for (i, client) in clients.iter_mut().enumerate() {
        client.send(&upgrade_request(&format!("/chat/{i}"))).await;
    }
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        let response = client.read_response().await;
        match response.status {
            101 => admitted.push(format!("/chat/{i}")),
            429 => refused.push(response),
            _ => panic!("unexpected answer {response:?}"),
        }
    }
    assert_eq!((admitted.len(), refused.len()), (2, 1), "{refused:?}");
    admitted.sort();
    assert_eq!(refused[0].header("retry-after"), Some("1"));
    assert!(refused[0].body_text().contains("handshake_rate_per_ip"));
    let metrics = s.metrics().await;
    assert_eq!(
        metric(&metrics, "wsgate_rejected_total{reason=\"rate_limit\"}"),
        Some(1.0),
        "{metrics}"
    );

    drop(clients);
    let _again = admitted_again(s.addr(), "/chat/again", 429).await;
    admitted.push("/chat/again".to_string());
    let mut seen = seen_paths(&mut s.ws);
    seen[..2].sort();
    assert_eq!(seen, admitted);
}

// ---------------------------------------------------------------------------------------
// Request heads

#[tokio::test]
async fn a_slowloris_head_is_cut_off_after_client_header() {
    let mut s = Setup::new("", "client_header = \"500ms\"").await;
    let started = Instant::now();
    let mut slow = RawClient::connect(s.addr()).await;
    slow.send(b"GET /app/slow HTTP/1.1\r\nHost: app.test\r\nX-Half: a")
        .await;

    // Others are served meanwhile.
    let other = raw_exchange(
        s.addr(),
        &http_request("GET", "/app/other", &[("Host", "app.test")]),
    )
    .await;
    assert_eq!(other.status, 200);
    assert_eq!(
        s.http.requests.next("the other request").await.uri.path(),
        "/app/other"
    );

    let (got, _) = slow.read_until_closed().await;
    let took = started.elapsed();
    // hyper closes a connection whose head timed out without an answer.
    assert!(got.is_empty(), "got {:?}", String::from_utf8_lossy(&got));
    assert!(
        took >= CLIENT_HEADER - Duration::from_millis(50) && took < CLIENT_HEADER + LIMIT / 5,
        "cut off after {took:?}; client_header is {CLIENT_HEADER:?}"
    );
    s.assert_http_upstream_saw_nothing("slowloris").await;
}

#[tokio::test]
async fn an_idle_connection_without_a_byte_is_closed_after_client_header() {
    let mut s = Setup::new("", "client_header = \"500ms\"").await;
    let started = Instant::now();
    let mut idle = RawClient::connect(s.addr()).await;
    let (got, ended) = idle.read_until_closed().await;
    let took = started.elapsed();
    assert!(got.is_empty());
    assert_eq!(ended, Ended::Eof);
    assert!(
        took >= CLIENT_HEADER - Duration::from_millis(50),
        "closed after {took:?}"
    );
    s.assert_http_upstream_saw_nothing("an idle connection")
        .await;
}

// The head gate counts the head and answers 431 once it passes `max_request_head` (64 KiB).
#[tokio::test]
async fn an_oversized_head_gets_431() {
    let mut s = Setup::new("", "").await;
    let mut request = b"GET /app/big HTTP/1.1\r\nHost: app.test\r\n".to_vec();
    let filler = "a".repeat(1000);
    for i in 0..100 {
        request.extend_from_slice(format!("X-Fill-{i}: {filler}\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    assert!(request.len() > 100 * 1000);
    let response = raw_exchange(s.addr(), &request).await;
    assert_eq!(response.status, 431, "{response:?}");
    s.assert_http_upstream_saw_nothing("an oversized head")
        .await;
}

#[tokio::test]
async fn when_too_many_heads_wait_the_oldest_connection_is_closed_first() {
    let mut s = Setup::new("max_pending_heads = 3", "client_header = \"30s\"").await;
    // Connected one after the other, so accepted (and entered into the table) in this order.
    let mut slow = Vec::new();
    for i in 0..3 {
        let mut client = RawClient::connect(s.addr()).await;
        client
            .send(format!("GET /app/slow{i} HTTP/1.1\r\nHost: app.test\r\nX-Half: a").as_bytes())
            .await;
        slow.push(client);
    }
    // A fourth connection takes the place of the one that waited longest.
    let other = raw_exchange(
        s.addr(),
        &http_request("GET", "/app/other", &[("Host", "app.test")]),
    )
    .await;
    assert_eq!(other.status, 200, "{other:?}");
    assert_eq!(
        s.http.requests.next("the fourth request").await.uri.path(),
        "/app/other"
    );
    let mut slow = slow.into_iter();
    let mut oldest = slow.next().expect("three slow clients");
    let (got, ended) = oldest.read_until_closed().await;
    assert!(got.is_empty(), "got {:?}", String::from_utf8_lossy(&got));
    assert_eq!(ended, Ended::Eof);
    // The two younger ones were left alone and are served once their heads are complete.
    for (i, mut client) in slow.enumerate() {
        client.send(b"\r\n\r\n").await;
        let response = client.read_response().await;
        assert_eq!(response.status, 200, "slow client {}: {response:?}", i + 1);
        assert_eq!(
            s.http
                .requests
                .next("a finished slow request")
                .await
                .uri
                .path(),
            format!("/app/slow{}", i + 1)
        );
    }
    assert_eq!(
        metric(
            &s.metrics().await,
            "wsgate_rejected_total{reason=\"pending_heads\"}"
        ),
        Some(1.0)
    );
}

/// Sends `request` raw and asserts the answer is 400 and that nothing of it reached the
/// upstream (least of all a second, smuggled request).
async fn refused_with_400(s: &mut Setup, case: &str, request: &[u8]) {
    let mut client = RawClient::connect(s.addr()).await;
    client.send(request).await;
    let response = client.read_response().await;
    // Whatever the answer, it must not have been forwarded (least of all as two requests).
    let sentinel = raw_exchange(
        s.addr(),
        &http_request("GET", "/app/sentinel", &[("Host", "app.test")]),
    )
    .await;
    assert_eq!(sentinel.status, 200);
    let mut seen = Vec::new();
    loop {
        let request = s.http.requests.next("the sentinel at the upstream").await;
        let path = request.uri.path().to_string();
        seen.push(format!("{} {}", request.method, request.uri));
        if path == "/app/sentinel" {
            break;
        }
    }
    assert!(
        seen.iter().all(|r| !r.contains("smuggled")),
        "{case}: a smuggled request reached the upstream: {seen:?}"
    );
    assert_eq!(
        response.status,
        400,
        "{case}: expected 400, got {} {:?}; the upstream saw {seen:?}",
        response.status,
        response.body_text()
    );
    assert_eq!(
        seen,
        ["GET /app/sentinel"],
        "{case}: the upstream saw more than the sentinel"
    );
}

/// A request the back end would read as two if it trusted the other length header.
const SMUGGLED: &str = "GET /app/smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n";

// RFC 9112 §6.3 lets a server read such a message by Transfer-Encoding alone, but says it
// "ought to be handled as an error"; a proxy that forwards it lets a back end that trusts
// Content-Length see a second, smuggled request. wsgate must answer 400.
//
// hyper 1.12 (`proto/h1/role.rs`, `Server::parse`) accepts the message: it removes the
// Content-Length header, reads the body as chunked and ends the connection after the
// answer, so the request handler never sees that both headers were sent. The refusal has to
// happen before hyper's parser.
#[tokio::test]
async fn content_length_then_transfer_encoding_is_refused() {
    let mut s = Setup::new("", "").await;
    // CL.TE: by Content-Length the body holds the smuggled request; by chunked it is empty.
    let request = format!(
        "POST /app/front HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}",
        5 + SMUGGLED.len()
    );
    refused_with_400(
        &mut s,
        "Content-Length then Transfer-Encoding",
        request.as_bytes(),
    )
    .await;
}

#[tokio::test]
async fn transfer_encoding_then_content_length_is_refused() {
    let mut s = Setup::new("", "").await;
    // TE.CL: by chunked the body holds the smuggled request; by Content-Length it is 4 bytes.
    let request = format!(
        "POST /app/front HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
        SMUGGLED.len()
    );
    refused_with_400(
        &mut s,
        "Transfer-Encoding then Content-Length",
        request.as_bytes(),
    )
    .await;
}

// hyper refuses this itself (400) before the request reaches wsgate's handler.
#[tokio::test]
async fn two_different_content_lengths_are_refused() {
    let mut s = Setup::new("", "").await;
    let request = "POST /app/front HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nContent-Length: 48\r\n\r\nhelloGET /app/smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n";
    refused_with_400(&mut s, "two Content-Length values", request.as_bytes()).await;
}

// httparse, under hyper, refuses a header line starting with whitespace: 400.
#[tokio::test]
async fn an_obs_fold_header_is_refused() {
    let mut s = Setup::new("", "").await;
    let request = "GET /app/front HTTP/1.1\r\nHost: app.test\r\nX-Folded: first\r\n second\r\n\r\n";
    refused_with_400(&mut s, "obs-fold", request.as_bytes()).await;
}

#[tokio::test]
async fn an_upgrade_request_with_a_body_is_refused() {
    let mut s = Setup::new("", "").await;
    let mut headers = support::ws_headers("chat.test");
    headers.push(("Content-Length", "5"));
    let mut request = http_request("GET", "/chat/with-body", &headers);
    request.extend_from_slice(b"hello");
    let response = raw_exchange(s.addr(), &request).await;
    assert_eq!(response.status, 400, "{response:?}");
    assert_one_line(&response.body_text());
    s.assert_ws_upstream_saw_nothing("an upgrade with a body")
        .await;
}

// ---------------------------------------------------------------------------------------
// TLS

#[tokio::test]
async fn a_stalled_tls_handshake_is_cut_off_and_blocks_no_one() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.issue(&["localhost"]).write(&dir, "server");
    let proxy = spawn_proxy(
        r#"
[listeners.secure]
bind = "127.0.0.1:0"
[listeners.secure.tls]
cert = "server.crt"
key = "server.key"
[timeouts]
client_header = "500ms"
[routes.echo]
path = "/echo"
builtin = "echo"
"#,
        &dir,
    )
    .await;
    let addr = proxy.addr("secure");

    let started = Instant::now();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    // A TLS record header announcing a 512-byte ClientHello, and then nothing.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();

    // Another client completes its handshake and a wss echo meanwhile.
    let tls = within(
        "a TLS handshake",
        tls_connect(addr, "localhost", ca.client_config()),
    )
    .await
    .expect("TLS handshake");
    let (mut ws, _) = within(
        "a wss handshake",
        tokio_tungstenite::client_async("wss://localhost/echo", tls),
    )
    .await
    .expect("wss handshake");
    ws.send(Message::text("not blocked")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("not blocked"));

    let mut got = Vec::new();
    let ended = within(
        "the stalled handshake to be cut off",
        stalled.read_to_end(&mut got),
    )
    .await;
    let took = started.elapsed();
    assert!(ended.is_ok() && got.is_empty(), "{ended:?} {got:?}");
    assert!(
        took >= CLIENT_HEADER - Duration::from_millis(50) && took < CLIENT_HEADER + LIMIT / 5,
        "cut off after {took:?}; client_header is {CLIENT_HEADER:?}"
    );
    let metrics = raw_exchange(
        proxy.admin(),
        &http_request("GET", "/metrics", &[("Host", "admin")]),
    )
    .await
    .body_text();
    assert_eq!(
        metric(
            &metrics,
            "wsgate_tls_handshake_errors_total{listener=\"secure\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// The real binary, for the cases that measure the proxy process itself

/// An address nothing listens on right now: bind `127.0.0.1:0`, read it, drop the socket.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
}

/// A `wsgate` process with its own memory and CPU accounting; killed when dropped.
struct Wsgate {
    child: Child,
    /// The plain listener `public`.
    public: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    _dir: TestDir,
}

impl Wsgate {
    /// Runs the binary with `[admin]`, `[listeners.public]` (free ports) and `rest`, under
    /// `ulimit -n fd_limit` when given, and waits until the admin port accepts connections.
    async fn start(rest: &str, fd_limit: Option<usize>) -> Wsgate {
        let dir = TestDir::new();
        let (public, admin) = (free_addr(), free_addr());
        let config = dir.write(
            "proxy.toml",
            format!("[admin]\nbind = \"{admin}\"\n[listeners.public]\nbind = \"{public}\"\n{rest}"),
        );
        let log = dir.path().join("wsgate.log");
        let ulimit = fd_limit
            .map(|n| format!("ulimit -n {n} && "))
            .unwrap_or_default();
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("{ulimit}exec \"$0\" --config \"$1\""))
            .arg(env!("CARGO_BIN_EXE_wsgate"))
            .arg(&config)
            .env("NO_COLOR", "1")
            .env_remove("WSGATE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the log file"))
            .spawn()
            .expect("start wsgate");
        let mut wsgate = Wsgate {
            child,
            public,
            admin,
            log,
            _dir: dir,
        };
        within("wsgate to listen", async {
            loop {
                if let Ok(Some(status)) = wsgate.child.try_wait() {
                    panic!("wsgate exited ({status}):\n{}", wsgate.log());
                }
                if TcpStream::connect(admin).await.is_ok() {
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        wsgate
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory (VmRSS), in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }

    /// CPU time used so far (user + system), in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("read /proc/PID/stat");
        // The fields after the parenthesised command name; utime and stime are fields 14
        // and 15 of the whole line.
        let rest = &stat[stat.rfind(')').expect("comm field") + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // USER_HZ is 100 on every Linux architecture.
        ticks as f64 / 100.0
    }
}

impl Drop for Wsgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// A client that never reads

/// A WebSocket upstream that answers the upgrade and then streams one endless binary frame
/// as fast as the proxy takes it, counting the bytes its socket accepted.
async fn spawn_firehose() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        let Ok(Some(text)) = support::read_head(&mut stream, &mut head).await else {
            return;
        };
        let key = wsraw::header(&text, "sec-websocket-key").unwrap_or_default();
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            wsraw::accept_key(key)
        );
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        // One frame of 1 TiB: the payload never ends.
        let header = wsraw::encode_header(true, 0, wsraw::op::BINARY, 1 << 40, None);
        if stream.write_all(&header).await.is_err() {
            return;
        }
        let chunk = vec![0x5a_u8; 64 * 1024];
        while let Ok(n) = stream.write(&chunk).await {
            if n == 0 {
                return;
            }
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    (addr, written)
}

/// The most a stalled stream can leave in the kernel between the upstream and a client
/// that reads nothing: the maxima of `net.ipv4.tcp_rmem` and `tcp_wmem`, twice each (the
/// proxy's receiving socket and the client's, the upstream's sending socket and the
/// proxy's). Debian's defaults (6 MiB, 4 MiB) when the sysctls cannot be read.
fn kernel_buffering_bound() -> u64 {
    let max_of = |name: &str, default: u64| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .ok()
            .and_then(|text| text.split_whitespace().last()?.parse().ok())
            .unwrap_or(default)
    };
    2 * max_of("tcp_rmem", 6 << 20) + 2 * max_of("tcp_wmem", 4 << 20)
}

const MIB: u64 = 1024 * 1024;

// The proxy runs as its own process here so its memory can be measured alone (the test
// harness runs the other cases of this file in parallel in this process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_stops_the_upstream_and_memory_stays_bounded() {
    // What the kernel buffers on the two sockets plus one relay buffer; no backpressure
    // would let the upstream write hundreds of MiB in 2 s on loopback.
    firehose_into_a_silent_client(false, 16 * MIB).await;
}

/// The same with the frame spliced: the kernel holds more of a spliced stream (10-13 MiB
/// here against 7-8 MiB copied), so the bound is what the kernel may buffer at most (two
/// receiving and two sending socket buffers at their sysctl maxima) plus one pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_stops_a_spliced_upstream_too() {
    firehose_into_a_silent_client(true, kernel_buffering_bound() + MIB).await;
}

/// A client reads nothing after the 101 while the upstream streams one endless frame: the
/// upstream must be held back after at most `bound` bytes, and the proxy's memory stay flat.
async fn firehose_into_a_silent_client(splice: bool, bound: u64) {
    let (firehose, written) = spawn_firehose().await;
    let mut wsgate = Wsgate::start(
        &format!(
            r#"
[runtime]
splice = {splice}
[timeouts]
client_header = "5s"
upstream_connect = "2s"
upstream_handshake = "5s"
[upstreams.firehose]
servers = ["{firehose}"]
[routes.firehose]
path = "/firehose"
upstream = "firehose"
"#
        ),
        None,
    )
    .await;
    let rss_before = wsgate.rss();
    // Connects and reads nothing after the 101.
    let client = wsraw::connect(wsgate.public, "/firehose").await;

    // The measurement window: whatever the upstream manages to write in 2 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_window = written.load(Ordering::Relaxed);
    let rss_after = wsgate.rss();
    // And it has stopped: nothing more goes in while the client still reads nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = written.load(Ordering::Relaxed);

    assert!(
        after_window > 64 * 1024,
        "the relay moved nothing at all ({after_window} bytes)"
    );
    assert!(
        after_window < bound,
        "the upstream wrote {} MiB to a client that reads nothing (bound {} MiB, splice = \
         {splice}): no backpressure",
        after_window / MIB,
        bound / MIB
    );
    assert!(
        later - after_window <= MIB,
        "the upstream is still writing ({} bytes in 300 ms)",
        later - after_window
    );
    let growth = rss_after.saturating_sub(rss_before);
    assert!(
        growth < 64 * MIB,
        "the proxy's memory grew by {} MiB",
        growth / MIB
    );
    assert!(wsgate.running(), "{}", wsgate.log());
    drop(client);
}

// ---------------------------------------------------------------------------------------
// Out of file descriptors

/// The file-descriptor limit the proxy runs under in the exhaustion case.
const FD_LIMIT: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_accept_loop_backs_off_and_recovers() {
    let mut wsgate = Wsgate::start(
        r#"
[timeouts]
# Idle connections must stay open for the whole case.
client_header = "60s"
[routes.echo]
path = "/echo"
builtin = "echo"
"#,
        Some(FD_LIMIT),
    )
    .await;

    // More connections than the process has descriptors: it accepts until it runs out,
    // the rest wait in the listen backlog.
    let mut held = Vec::new();
    for _ in 0..FD_LIMIT + 30 {
        held.push(TcpStream::connect(wsgate.public).await.expect("connect"));
    }
    within("the accept loop to run out of descriptors", async {
        while !wsgate.log().contains("out of resources") {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;

    // Saturated: the accept loop must pause, not spin on EMFILE.
    let before = wsgate.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = wsgate.cpu_seconds() - before;
    assert!(
        used < 0.3,
        "wsgate used {used:.2} s of CPU in 1 s while out of descriptors: a busy accept loop"
    );

    drop(held);
    // The backlog drains once descriptors are free again, and new clients are served.
    let mut conn = wsraw::connect(wsgate.public, "/echo").await;
    conn.send(&wsraw::client_frame(wsraw::op::TEXT, b"served again"))
        .await;
    let echo = conn.frame("the echo").await;
    assert_eq!(echo.payload, b"served again");
    assert!(wsgate.running(), "{}", wsgate.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_for_pipes_large_frames_go_through_the_relay_buffer() {
    let mut upstream = wsraw::WsUpstream::spawn().await;
    let mut wsgate = Wsgate::start(
        &format!(
            r#"
[timeouts]
client_header = "60s"
ping_interval = "0s"
[upstreams.raw]
servers = ["{}"]
[routes.raw]
path = "/raw"
upstream = "raw"
"#,
            upstream.addr
        ),
        Some(FD_LIMIT),
    )
    .await;
    let mut client = wsraw::connect(wsgate.public, "/raw").await;
    let mut up = upstream.accept().await;

    // Every descriptor left goes to idle connections: no pipe can be opened now.
    let mut held = Vec::new();
    for _ in 0..FD_LIMIT + 30 {
        held.push(TcpStream::connect(wsgate.public).await.expect("connect"));
    }
    within("the proxy to run out of descriptors", async {
        while !wsgate.log().contains("out of resources") {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;

    // Large frames (spliced when pipes can be had) still cross, through the relay buffer.
    let mut sent = [0u64; 2];
    for seed in 0..3u8 {
        let payload: Vec<u8> = (0..100 * 1024).map(|i| (i as u8) ^ seed).collect();
        let frame = wsraw::client_frame(wsraw::op::BINARY, &payload);
        client.send(&frame).await;
        assert_eq!(up.frame("a large frame from the client").await.raw, frame);
        sent[0] += frame.len() as u64;
        let frame = wsraw::server_frame(wsraw::op::BINARY, &payload);
        up.send(&frame).await;
        assert_eq!(
            client.frame("a large frame from the upstream").await.raw,
            frame
        );
        sent[1] += frame.len() as u64;
    }

    // Descriptors free again: the metrics say nothing was spliced and everything relayed.
    drop(held);
    for (direction, sent) in ["client_to_upstream", "upstream_to_client"]
        .into_iter()
        .zip(sent)
    {
        // Counters are added right after each write; a scrape may still run a moment ahead.
        let deadline = Instant::now() + LIMIT;
        let mut bytes =
            support::route_counter(wsgate.admin, "wsgate_bytes_total", "raw", direction).await;
        while bytes != sent && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            bytes =
                support::route_counter(wsgate.admin, "wsgate_bytes_total", "raw", direction).await;
        }
        assert_eq!(bytes, sent, "{direction}: bytes relayed");
        let spliced =
            support::route_counter(wsgate.admin, "wsgate_spliced_bytes_total", "raw", direction)
                .await;
        assert_eq!(spliced, 0, "{direction}: spliced without a pipe?");
    }
    assert!(wsgate.running(), "{}", wsgate.log());
}

/// Opens a WebSocket on the builtin echo route of `addr` with a raw socket.
async fn raw_echo_socket(addr: SocketAddr) -> TcpStream {
    let mut stream = within("a connection", TcpStream::connect(addr))
        .await
        .expect("connect");
    stream
        .write_all(&http_request(
            "GET",
            "/echo",
            &support::ws_headers("echo.test"),
        ))
        .await
        .expect("send the upgrade");
    let mut head = Vec::new();
    within("the 101", async {
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.expect("read the answer");
            head.push(byte[0]);
        }
    })
    .await;
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

#[tokio::test]
async fn the_access_log_says_how_the_client_side_ended() {
    let wsgate = Wsgate::start(
        "[routes.echo]\npath = \"/echo\"\nbuiltin = \"echo\"\n",
        None,
    )
    .await;
    // A client that closes with a close frame, then one that resets its socket.
    let mut polite = raw_echo_socket(wsgate.public).await;
    polite
        .write_all(&wsraw::client_close(1000, "bye"))
        .await
        .expect("send a close");
    let mut rest = Vec::new();
    within("the echo's close and EOF", polite.read_to_end(&mut rest))
        .await
        .expect("read to the end");
    let rude = raw_echo_socket(wsgate.public).await;
    rude.set_zero_linger().expect("SO_LINGER 0");
    drop(rude);

    let lines = within("two access-log lines", async {
        loop {
            let log = wsgate.log();
            let lines: Vec<String> = log
                .lines()
                .filter(|l| l.contains("websocket closed"))
                .map(str::to_owned)
                .collect();
            if lines.len() >= 2 {
                return lines;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    assert!(lines[0].contains("client_end=\"close\""), "{}", lines[0]);
    assert!(lines[1].contains("client_end=\"reset\""), "{}", lines[1]);
}
