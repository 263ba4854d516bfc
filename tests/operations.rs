//! Operations: the drain on SIGTERM, the second signal, stragglers, hot reload (by
//! `POST /reload` and by SIGHUP), certificate swaps and listener changes that need a restart.
//!
//! Whatever is about signals runs the real binary (`CARGO_BIN_EXE_wsgate`) with a config file
//! in a temporary folder, on ports picked by binding `127.0.0.1:0` and dropping the socket;
//! the rest runs the proxy in-process with `spawn_proxy`. Every wait is bounded by
//! `support::LIMIT`; nothing sleeps to synchronise: tests wait for events (a close frame,
//! `/readyz` turning 503, a counter in `/metrics`, the process exiting) and the only time
//! windows are the ones a scenario is about (the drain's spread, `shutdown_grace`).

mod support;
mod wsraw;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use support::{
    http_request, next_data, peer_leaf, raw_exchange, read_head, spawn_proxy, spawn_ws_upstream,
    tls_connect, within, RawResponse, TestCa, TestCert, TestDir, LIMIT, RELAXED_TIMEOUTS,
};
use wsraw::{client_close, client_frame, op, server_close, Ended, Frame, WsConn};

/// How often a test re-checks something it cannot be told about (a process that has not
/// opened its admin port yet, a counter in `/metrics` after a SIGHUP). Polling pace only.
const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------
// The real binary

/// A port nothing listens on right now: bind `127.0.0.1:0`, read the port, drop the socket.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("pick a free port")
        .port()
}

/// A `wsgate` process started from a config file; killed when dropped if still running.
struct Wsgate {
    child: Child,
    /// The plain listener `public`.
    public: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    _dir: TestDir,
}

impl Wsgate {
    /// Writes `[admin]`, `[listeners.public]` (both on free ports) and `rest` to
    /// `proxy.toml`, starts the binary and waits until `/readyz` answers 200.
    async fn start(rest: &str) -> Wsgate {
        Wsgate::start_with(rest, |cmd| cmd).await
    }

    /// Like [`Wsgate::start`], with the command built by `wrap` from the binary's path and
    /// arguments (e.g. to run it under `sh -c 'ulimit -n 64; exec ...'`).
    async fn start_with(rest: &str, wrap: impl FnOnce(Command) -> Command) -> Wsgate {
        let dir = TestDir::new();
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.write("proxy.toml", Wsgate::config_text(public, admin, rest));
        let log = dir.path().join("wsgate.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.arg("--config").arg(&config);
        let mut cmd = wrap(cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the log file"))
            .env("NO_COLOR", "1")
            .env_remove("WSGATE_LOG")
            .env_remove("WSGATE_CONFIG");
        let child = cmd.spawn().expect("start wsgate");
        let mut wsgate = Wsgate {
            child,
            public,
            admin,
            config,
            log,
            _dir: dir,
        };
        wsgate.wait_ready().await;
        wsgate
    }

    fn config_text(public: SocketAddr, admin: SocketAddr, rest: &str) -> String {
        format!(
            "[log]\nlevel = \"info\"\n\n[admin]\nbind = \"{admin}\"\n\n[listeners.public]\nbind = \"{public}\"\n\n{rest}"
        )
    }

    /// Rewrites the config file (same admin and listener addresses, new `rest`).
    fn rewrite(&self, rest: &str) {
        std::fs::write(
            &self.config,
            Wsgate::config_text(self.public, self.admin, rest),
        )
        .expect("rewrite the config file");
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Ok((200, _)) = http(self.admin, "GET", "/readyz").await {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "wsgate exited ({status}) before it was ready:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "wsgate not ready after {LIMIT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` ("TERM", "HUP", ...) with kill(1).
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed: {status}");
    }

    /// Waits at most `limit` for the process to exit.
    async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for wsgate") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What the process wrote to stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /readyz` status.
    async fn readyz(&self) -> u16 {
        http(self.admin, "GET", "/readyz")
            .await
            .unwrap_or_else(|e| panic!("GET /readyz failed: {e}\n{}", self.log()))
            .0
    }

    /// Polls `GET /readyz` until it answers `status`.
    async fn wait_readyz(&self, status: u16) {
        within(&format!("/readyz to answer {status}"), async {
            while !matches!(http(self.admin, "GET", "/readyz").await, Ok((s, _)) if s == status) {
                tokio::time::sleep(POLL).await;
            }
        })
        .await
    }

    /// Polls `/metrics` until `series` has `value`.
    async fn wait_metric(&self, series: &str, value: f64) {
        let what = format!("{series} {value} in /metrics");
        within(&what, async {
            loop {
                if let Ok((200, body)) = http(self.admin, "GET", "/metrics").await {
                    if metric(&body, series) == Some(value) {
                        return;
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await
    }
}

impl Drop for Wsgate {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One request on a fresh connection (`Connection: close`): status and body. Fails
/// instead of panicking, for polling a process that may not listen yet.
async fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    tokio::time::timeout(LIMIT, async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad answer {text:?}")))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The value of one series (`name{labels}`, exactly as rendered) in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The next frame that is not a ping or pong.
async fn next_frame(reader: &mut wsraw::WsReader, what: &str) -> Frame {
    loop {
        let frame = reader.frame(what).await;
        if frame.opcode != op::PING && frame.opcode != op::PONG {
            return frame;
        }
    }
}

/// Sends a text message on a raw client and asserts it comes back unchanged.
async fn assert_echo(conn: &mut WsConn, text: &str) {
    conn.send(&client_frame(op::TEXT, text.as_bytes())).await;
    let frame = next_frame(&mut conn.reader, "an echo").await;
    assert_eq!(
        (frame.opcode, frame.payload.as_slice(), frame.mask),
        (op::TEXT, text.as_bytes(), None),
        "the echo of {text:?}: {frame:?}"
    );
}

/// Timeouts of the binary tests: setup never trips on a loaded machine; `drain` is laid on top.
fn timeouts(drain: &str) -> String {
    format!(
        "[timeouts]\nclient_header = \"5s\"\nupstream_connect = \"2s\"\nupstream_handshake = \"5s\"\n{drain}\n"
    )
}

const ECHO_ROUTE: &str = "[routes.echo]\npath = \"/echo\"\nbuiltin = \"echo\"\n";

/// Route `/chat` to upstream `chat` with the one server `addr`.
fn chat_route(addr: SocketAddr) -> String {
    format!(
        "[upstreams.chat]\nservers = [\"{addr}\"]\n[routes.chat]\npath = \"/chat\"\nupstream = \"chat\"\n"
    )
}

/// No handshake-rate limit: the drain test opens 50 connections at once from one address.
const NO_RATE_LIMIT: &str = "[limits]\nhandshake_rate_per_ip = \"0/s\"\n";

// ---------------------------------------------------------------------------------------
// Drain

/// What one client saw of the drain.
struct Drained {
    /// Frames before the close (the mid-drain echo, for the clients that sent one).
    before: Vec<Frame>,
    close: Frame,
    close_at: Instant,
    ended: Ended,
}

/// Reads a raw client until wsgate's close, answers it, reads to the end.
async fn see_drain(conn: WsConn, mid_drain: Option<(watch::Receiver<bool>, String)>) -> Drained {
    let (mut reader, mut writer) = conn.split();
    let mut before = Vec::new();
    if let Some((mut started, text)) = mid_drain {
        within("the drain to start", started.wait_for(|s| *s))
            .await
            .expect("the test went away");
        writer.send(&client_frame(op::TEXT, text.as_bytes())).await;
    }
    let close = loop {
        let frame = next_frame(&mut reader, "the drain's close frame").await;
        if frame.opcode == op::CLOSE {
            break frame;
        }
        before.push(frame);
    };
    let close_at = Instant::now();
    let _ = writer.try_send(&client_close(1001, "")).await;
    let (_, ended) = reader.until_eof("the end of a drained connection").await;
    Drained {
        before,
        close,
        close_at,
        ended,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_fifty_websockets_spread_over_drain_spread() {
    const PROXIED: usize = 10;
    const ECHOED: usize = 40;
    /// The last few echo clients send a message once the drain has started; their close is
    /// due at 0.9 s or later, so the echo must come back first.
    const MID_DRAIN: usize = 5;
    let spread = Duration::from_secs(1);
    let grace = Duration::from_secs(3);

    let mut upstream = wsraw::WsUpstream::spawn().await;
    let mut wsgate = Wsgate::start(&format!(
        "{}{NO_RATE_LIMIT}\n[upstreams.app]\nservers = [\"{}\"]\n\n[routes.app]\npath = \"/app\"\nupstream = \"app\"\n\n{ECHO_ROUTE}",
        timeouts("drain_spread = \"1s\"\nshutdown_grace = \"3s\""),
        upstream.addr
    ))
    .await;

    // Connections in order: the drain closes the oldest first.
    let (started_tx, started_rx) = watch::channel(false);
    let mut clients = Vec::new();
    let mut upstream_sides = Vec::new();
    for i in 0..PROXIED {
        let mut client = wsraw::connect(wsgate.public, &format!("/app/{i}")).await;
        let mut up = upstream.accept().await;
        client
            .send(&client_frame(op::TEXT, format!("hello {i}").as_bytes()))
            .await;
        let frame = up.frame("a relayed message").await;
        assert_eq!(frame.payload, format!("hello {i}").into_bytes());
        clients.push(tokio::spawn(see_drain(client, None)));
        upstream_sides.push(tokio::spawn(async move {
            let close = up.frame("the drain's close towards the upstream").await;
            let _ = up.try_send(&server_close(1001, "going away")).await;
            let (_, ended) = up.until_eof("the end of the upstream connection").await;
            (close, ended)
        }));
    }
    let mut mid_drain_texts = Vec::new();
    for i in 0..ECHOED {
        let mut client = wsraw::connect(wsgate.public, "/echo").await;
        assert_echo(&mut client, &format!("before the drain {i}")).await;
        let mid = (i >= ECHOED - MID_DRAIN).then(|| {
            let text = format!("sent mid-drain by client {i}");
            mid_drain_texts.push(text.clone());
            (started_rx.clone(), text)
        });
        clients.push(tokio::spawn(see_drain(client, mid)));
    }
    assert_eq!(wsgate.readyz().await, 200);

    let sigterm_at = Instant::now();
    wsgate.signal("TERM");
    wsgate.wait_readyz(503).await;
    started_tx.send(true).expect("clients are waiting");

    let mut drained = Vec::new();
    for client in clients {
        drained.push(
            within("a drained client", client)
                .await
                .expect("client task"),
        );
    }
    let first_close = drained.iter().map(|d| d.close_at).min().unwrap();
    let last_close = drained.iter().map(|d| d.close_at).max().unwrap();
    let status = wsgate.wait_exit(grace + Duration::from_secs(2)).await;
    let exited_after = sigterm_at.elapsed();

    for (i, d) in drained.iter().enumerate() {
        assert_eq!(
            d.close.close(),
            (1001, "going away".to_string()),
            "client {i}: {:?}",
            d.close
        );
        assert_eq!(
            d.close.mask, None,
            "client {i}: frames to clients are unmasked"
        );
        assert_eq!(d.ended, Ended::Eof, "client {i} should see a clean FIN");
    }
    for (i, side) in upstream_sides.into_iter().enumerate() {
        let (close, ended) = within("an upstream side", side)
            .await
            .expect("upstream task");
        assert_eq!(
            close.close(),
            (1001, "going away".to_string()),
            "upstream {i}: {close:?}"
        );
        assert!(close.mask.is_some(), "frames to the upstream are masked");
        assert_eq!(ended, Ended::Eof, "upstream {i} should see a clean FIN");
    }
    // Nothing lost: a message sent once the drain had started, before that client's close,
    // came back before the close.
    for (d, text) in drained[PROXIED + ECHOED - MID_DRAIN..]
        .iter()
        .zip(&mid_drain_texts)
    {
        let echoes: Vec<&[u8]> = d.before.iter().map(|f| f.payload.as_slice()).collect();
        assert_eq!(echoes, vec![text.as_bytes()], "the mid-drain echo");
    }
    for d in &drained[..PROXIED + ECHOED - MID_DRAIN] {
        assert!(d.before.is_empty(), "nothing but the close: {:?}", d.before);
    }

    // A ramp, not a spike.
    let window = last_close - first_close;
    assert!(
        window >= spread / 2,
        "closes should be spread over drain_spread ({spread:?}); all came within {window:?}"
    );
    let mut times: Vec<Instant> = drained.iter().map(|d| d.close_at).collect();
    times.sort();
    let busiest = times
        .iter()
        .map(|t| {
            times
                .iter()
                .filter(|u| **u >= *t && **u < *t + Duration::from_millis(100))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        busiest <= 25,
        "{busiest} of 50 closes came within 100 ms: not spread evenly"
    );

    let status = status.unwrap_or_else(|| {
        panic!(
            "wsgate still running {exited_after:?} after SIGTERM:\n{}",
            wsgate.log()
        )
    });
    assert!(status.success(), "exit status {status}:\n{}", wsgate.log());
    assert!(exited_after <= grace + Duration::from_secs(2));
}

/// Clients streaming messages through a drain lose none of them: wsgate closes the client
/// first and keeps relaying client -> upstream until the client answers, and only then
/// sends the upstream its close. Every upstream counts exactly what its client sent
/// before answering the close; none of the upstream's own messages sent after the client
/// closed is delivered, and those are counted in `wsgate_undeliverable_frames_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_loses_no_message_a_client_sent_before_its_close() {
    const CLIENTS: usize = 100;
    let mut upstream = wsraw::WsUpstream::spawn().await;
    let mut wsgate = Wsgate::start(&format!(
        "{}{NO_RATE_LIMIT}\n[upstreams.app]\nservers = [\"{}\"]\n\n[routes.app]\npath = \"/app\"\nupstream = \"app\"\n",
        timeouts("drain_spread = \"1s\"\nshutdown_grace = \"5s\""),
        upstream.addr
    ))
    .await;
    let mut streams = Vec::new();
    for i in 0..CLIENTS {
        let client = wsraw::connect(wsgate.public, &format!("/app/{i}")).await;
        let up = upstream.accept().await;
        streams.push((client, up));
    }
    let mut clients = Vec::new();
    let mut upstreams = Vec::new();
    for (client, up) in streams {
        // The client sends numbered messages every 2 ms until wsgate's close arrives, then
        // answers it: how many it sent before the answer is what the upstream must get.
        clients.push(tokio::spawn(async move {
            let (mut reader, mut writer) = client.split();
            let mut sent = 0u32;
            let close = loop {
                tokio::select! {
                    frame = next_frame(&mut reader, "wsgate's close") => {
                        if frame.opcode == op::CLOSE {
                            break frame;
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(2)) => {
                        writer.send(&client_frame(op::TEXT, format!("m{sent}").as_bytes())).await;
                        sent += 1;
                    }
                }
            };
            let _ = writer.try_send(&client_close(1001, "")).await;
            let (_, ended) = reader.until_eof("the end of the client connection").await;
            (sent, close, ended)
        }));
        // The upstream counts the client's messages until wsgate's close; meanwhile it
        // keeps talking, and what it sends after the client closed cannot be delivered.
        upstreams.push(tokio::spawn(async move {
            let (mut reader, mut writer) = up.split();
            let mut got = 0u32;
            let close = loop {
                tokio::select! {
                    frame = next_frame(&mut reader, "the client's messages") => {
                        if frame.opcode == op::CLOSE {
                            break frame;
                        }
                        assert_eq!(frame.payload, format!("m{got}").into_bytes(), "in order");
                        got += 1;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(3)) => {
                        let _ = writer.try_send(&wsraw::server_frame(op::TEXT, b"news")).await;
                    }
                }
            };
            let _ = writer.try_send(&server_close(1001, "")).await;
            let (_, ended) = reader.until_eof("the end of the upstream connection").await;
            (got, close, ended)
        }));
    }
    // Let every connection stream for a while, then drain.
    tokio::time::sleep(Duration::from_millis(200)).await;
    wsgate.signal("TERM");
    let mut total = 0u64;
    for (i, (client, up)) in clients.into_iter().zip(upstreams).enumerate() {
        let (sent, close, ended) = within("a drained client", client)
            .await
            .expect("client task");
        assert_eq!(
            close.close(),
            (1001, "going away".to_string()),
            "client {i}"
        );
        assert_eq!(ended, Ended::Eof, "client {i}");
        let (got, close, ended) = within("an upstream side", up).await.expect("upstream task");
        assert_eq!(
            close.close(),
            (1001, "going away".to_string()),
            "upstream {i}"
        );
        assert_eq!(ended, Ended::Eof, "upstream {i}");
        assert_eq!(
            got, sent,
            "connection {i}: the upstream got {got} of {sent} messages"
        );
        total += u64::from(sent);
    }
    assert!(
        total >= CLIENTS as u64 * 10,
        "the clients were streaming: {total} messages"
    );
    let status = wsgate.wait_exit(Duration::from_secs(7)).await;
    assert!(status.is_some_and(|s| s.success()), "{}", wsgate.log());
    let log = wsgate.log();
    assert!(
        log.contains("undeliverable_upstream_to_client"),
        "the access log counts undeliverable frames:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_drain_readyz_is_503_and_new_connections_are_refused() {
    let mut wsgate = Wsgate::start(&format!(
        "{}{ECHO_ROUTE}",
        timeouts("drain_spread = \"0s\"\nshutdown_grace = \"5s\"")
    ))
    .await;
    // One client that does not answer the close keeps the drain going until we let it.
    let client = wsraw::connect(wsgate.public, "/echo").await;
    let (mut reader, mut writer) = client.split();
    wsgate.signal("TERM");
    let close = next_frame(&mut reader, "the drain's close").await;
    assert_eq!(close.close(), (1001, "going away".to_string()));

    // The drain starts only once every listener has stopped accepting.
    assert_eq!(wsgate.readyz().await, 503);
    let refused = TcpStream::connect(wsgate.public).await;
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a new connection during the drain should be refused, got {refused:?}"
    );
    let (_, body) = http(wsgate.admin, "GET", "/readyz").await.unwrap();
    assert_eq!(body, "draining\n");
    assert_eq!(http(wsgate.admin, "GET", "/healthz").await.unwrap().0, 200);

    writer.send(&client_close(1001, "")).await;
    let (_, ended) = reader.until_eof("the end of the connection").await;
    assert_eq!(ended, Ended::Eof);
    let status = wsgate.wait_exit(LIMIT).await.expect("wsgate exits");
    assert!(status.success(), "exit status {status}");
}

/// A plain HTTP upstream that answers each request 500 ms after reading its head and
/// reports each head it read.
async fn spawn_slow_http_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Ok(Some(head)) = read_head(&mut stream, &mut buf).await {
                    let _ = tx.send(head);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let answer = "HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\nslow but served\n";
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_in_flight_finishes_during_the_drain() {
    let (upstream, mut heads) = spawn_slow_http_upstream().await;
    let mut wsgate = Wsgate::start(&format!(
        "{}[upstreams.slow]\nservers = [\"{upstream}\"]\n\n[routes.slow]\npath = \"/slow\"\nupstream = \"slow\"\n",
        timeouts("drain_spread = \"1s\"\nshutdown_grace = \"5s\"")
    ))
    .await;

    let mut client = support::RawClient::connect(wsgate.public).await;
    client
        .send(&http_request("GET", "/slow", &[("Host", "app.test")]))
        .await;
    let head = within("the request at the upstream", heads.recv())
        .await
        .expect("upstream running");
    assert!(head.starts_with("GET /slow HTTP/1.1"), "{head}");

    let sigterm_at = Instant::now();
    wsgate.signal("TERM");
    wsgate.wait_readyz(503).await;
    let response = client.read_response().await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body_text(), "slow but served\n");

    let status = wsgate.wait_exit(LIMIT).await.expect("wsgate exits");
    assert!(status.success(), "exit status {status}:\n{}", wsgate.log());
    // Nothing else to wait for once the answer is out: no waiting for shutdown_grace.
    assert!(
        sigterm_at.elapsed() < Duration::from_secs(3),
        "exit took {:?}",
        sigterm_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let mut wsgate = Wsgate::start(&format!(
        "{}{ECHO_ROUTE}",
        timeouts("drain_spread = \"1s\"\nshutdown_grace = \"30s\"")
    ))
    .await;
    let client = wsraw::connect(wsgate.public, "/echo").await;
    let (mut reader, _writer) = client.split();
    wsgate.signal("TERM");
    // The drain is under way (the only connection's close goes out at once) and would wait
    // 30 s for this client, which never answers.
    let close = next_frame(&mut reader, "the drain's close").await;
    assert_eq!(close.close(), (1001, "going away".to_string()));

    let second_at = Instant::now();
    wsgate.signal("INT");
    let status = wsgate.wait_exit(LIMIT).await.expect("wsgate exits");
    let took = second_at.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the second signal should stop wsgate at once, it took {took:?} (status {status})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stragglers_are_dropped_after_shutdown_grace() {
    let grace = Duration::from_millis(1500);
    let mut wsgate = Wsgate::start(&format!(
        "{}{ECHO_ROUTE}",
        timeouts("drain_spread = \"0s\"\nshutdown_grace = \"1500ms\"")
    ))
    .await;
    let client = wsraw::connect(wsgate.public, "/echo").await;
    let (mut reader, _writer) = client.split();
    let sigterm_at = Instant::now();
    wsgate.signal("TERM");
    let close = next_frame(&mut reader, "the drain's close").await;
    assert_eq!(close.close(), (1001, "going away".to_string()));
    // The client never answers the close: wsgate waits shutdown_grace, then drops it.
    let status = wsgate.wait_exit(LIMIT).await.expect("wsgate exits");
    let took = sigterm_at.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", wsgate.log());
    assert!(
        took >= grace - Duration::from_millis(100) && took <= grace + Duration::from_secs(2),
        "exited {took:?} after SIGTERM; shutdown_grace is {grace:?}"
    );
    let (frames, _) = reader.until_eof("the straggler's connection to end").await;
    assert!(frames.is_empty(), "nothing after the close: {frames:?}");
}

// ---------------------------------------------------------------------------------------
// Reload

/// `rest` after the `[admin]` table `spawn_proxy` adds, for rewriting its file.
fn with_ephemeral_admin(rest: &str) -> String {
    format!("[admin]\nbind = \"127.0.0.1:0\"\n\n{rest}")
}

async fn admin_post(admin: SocketAddr, path: &str) -> RawResponse {
    raw_exchange(
        admin,
        &http_request("POST", path, &[("Host", "admin"), ("Content-Length", "0")]),
    )
    .await
}

async fn admin_metrics(admin: SocketAddr) -> String {
    raw_exchange(
        admin,
        &http_request("GET", "/metrics", &[("Host", "admin")]),
    )
    .await
    .body_text()
}

/// 1-based line of the first line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the config"))
        + 1
}

/// A plain listener, relaxed timeouts, the echo route, and `extra` (more routes, upstreams).
fn reload_config(extra: &str) -> String {
    format!("[listeners.public]\nbind = \"127.0.0.1:0\"\n{RELAXED_TIMEOUTS}\n{ECHO_ROUTE}\n{extra}")
}

/// A bad duration at `timeouts.idle`: the error must point at `idle = "soon"`, column 8.
const BROKEN: &str = "[routes.broken]\npath = \"/broken\"\nbuiltin = \"echo\"\n[routes.broken.timeouts]\nidle = \"soon\"\n";

#[tokio::test]
async fn post_reload_adds_a_route_and_a_broken_file_changes_nothing() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&reload_config(""), &dir).await;
    let public = proxy.addr("public");
    let mut live = wsraw::connect(public, "/echo").await;
    assert_echo(&mut live, "before the reload").await;

    // Not routed yet.
    let before = raw_exchange(
        public,
        &http_request("GET", "/chat", &[("Host", "app.test")]),
    )
    .await;
    assert_eq!(before.status, 404, "{before:?}");

    let chat = chat_route(upstream.addr);
    dir.write("proxy.toml", with_ephemeral_admin(&reload_config(&chat)));
    let reloaded = admin_post(proxy.admin(), "/reload").await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.body_text());
    assert_eq!(reloaded.body_text(), "reloaded\n");

    // The live connection kept running across the reload; the new route serves new ones.
    assert_echo(&mut live, "after the reload").await;
    let url = format!("ws://{public}/chat");
    let (mut ws, _) = support::ws_connect(url.as_str()).await;
    ws.send(Message::text("through the new route"))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::text("through the new route")
    );

    // A broken file: 400 with file:line:col, and nothing changes.
    let broken = format!("{chat}{BROKEN}");
    let text = with_ephemeral_admin(&reload_config(&broken));
    let path = dir.write("proxy.toml", &text);
    let refused = admin_post(proxy.admin(), "/reload").await;
    assert_eq!(refused.status, 400, "{}", refused.body_text());
    let expected = format!(
        "{}:{}:8: invalid duration \"soon\" for routes.broken.timeouts.idle",
        path.display(),
        line_of(&text, "idle = \"soon\"")
    );
    assert!(
        refused.body_text().starts_with(&expected),
        "expected {expected:?}..., got {:?}",
        refused.body_text()
    );
    let not_routed = raw_exchange(
        public,
        &http_request("GET", "/broken", &[("Host", "app.test")]),
    )
    .await;
    assert_eq!(
        not_routed.status, 404,
        "the broken file's route must not exist"
    );
    assert_echo(&mut live, "after the failed reload").await;
    ws.send(Message::text("old config still serving"))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::text("old config still serving")
    );
    let (mut again, _) = support::ws_connect(url.as_str()).await;
    again.send(Message::text("new connection")).await.unwrap();
    assert_eq!(next_data(&mut again).await, Message::text("new connection"));

    let metrics = admin_metrics(proxy.admin()).await;
    assert_eq!(
        metric(&metrics, "wsgate_config_reloads_total{result=\"success\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "wsgate_config_reloads_total{result=\"error\"}"),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_broken_file_keeps_the_old_config() {
    let upstream = spawn_ws_upstream().await;
    let base = format!("{}{NO_RATE_LIMIT}\n{ECHO_ROUTE}", timeouts(""));
    let wsgate = Wsgate::start(&base).await;
    let mut live = wsraw::connect(wsgate.public, "/echo").await;
    assert_echo(&mut live, "before SIGHUP").await;

    let chat = format!("{base}\n{}", chat_route(upstream.addr));
    wsgate.rewrite(&chat);
    wsgate.signal("HUP");
    wsgate
        .wait_metric("wsgate_config_reloads_total{result=\"success\"}", 1.0)
        .await;
    assert_echo(&mut live, "after SIGHUP").await;
    let url = format!("ws://{}/chat", wsgate.public);
    let (mut ws, _) = support::ws_connect(url.as_str()).await;
    ws.send(Message::text("new route")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("new route"));

    let broken = format!("{chat}{BROKEN}");
    wsgate.rewrite(&broken);
    wsgate.signal("HUP");
    wsgate
        .wait_metric("wsgate_config_reloads_total{result=\"error\"}", 1.0)
        .await;
    let text = std::fs::read_to_string(&wsgate.config).unwrap();
    let position = format!(
        "{}:{}:8: invalid duration \"soon\"",
        wsgate.config.display(),
        line_of(&text, "idle = \"soon\"")
    );
    let log = wsgate.log();
    assert!(
        log.contains(&position),
        "the log should name {position:?}:\n{log}"
    );
    assert_echo(&mut live, "after the failed SIGHUP").await;
    let (mut again, _) = support::ws_connect(url.as_str()).await;
    again.send(Message::text("still routed")).await.unwrap();
    assert_eq!(next_data(&mut again).await, Message::text("still routed"));
    let metrics = http(wsgate.admin, "GET", "/metrics").await.unwrap().1;
    assert_eq!(
        metric(&metrics, "wsgate_config_reloads_total{result=\"success\"}"),
        Some(1.0)
    );
    let not_routed = raw_exchange(
        wsgate.public,
        &http_request("GET", "/broken", &[("Host", "app.test")]),
    )
    .await;
    assert_eq!(not_routed.status, 404);
}

/// A wss connection to `/echo` at `addr` whose server presented `expected`, checked with one
/// echo of `text`.
async fn wss_echo_expecting(
    addr: SocketAddr,
    ca: &TestCa,
    expected: &TestCert,
    text: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    let tls = within(
        "a TLS handshake",
        tls_connect(addr, "localhost", ca.client_config()),
    )
    .await
    .expect("TLS handshake");
    assert!(
        peer_leaf(&tls) == expected.der,
        "the client should see the expected certificate ({text})"
    );
    let (mut ws, _) = within(
        "a wss handshake",
        tokio_tungstenite::client_async("wss://localhost/echo", tls),
    )
    .await
    .expect("wss handshake");
    ws.send(Message::text(text)).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text(text));
    ws
}

#[tokio::test]
async fn reload_swaps_certificates_for_new_tls_clients() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    let cert_a = ca.issue(&["localhost"]);
    let cert_b = ca.issue(&["localhost"]);
    cert_a.write(&dir, "server");
    let config = format!(
        "[listeners.secure]\nbind = \"127.0.0.1:0\"\n[listeners.secure.tls]\ncert = \"server.crt\"\nkey = \"server.key\"\n{RELAXED_TIMEOUTS}\n{ECHO_ROUTE}"
    );
    let proxy = spawn_proxy(&config, &dir).await;
    let addr = proxy.addr("secure");

    let mut old = wss_echo_expecting(addr, &ca, &cert_a, "over cert A").await;

    cert_b.write(&dir, "server");
    let reloaded = admin_post(proxy.admin(), "/reload").await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.body_text());

    let _new = wss_echo_expecting(addr, &ca, &cert_b, "over cert B").await;

    // The connection made with cert A keeps working.
    old.send(Message::text("still over cert A")).await.unwrap();
    assert_eq!(
        next_data(&mut old).await,
        Message::text("still over cert A")
    );
    old.close(None).await.unwrap();
    while let Some(Ok(_)) = old.next().await {}
}

#[tokio::test]
async fn a_changed_listener_address_needs_a_restart_and_the_old_one_keeps_serving() {
    let dir = TestDir::new();
    let proxy = spawn_proxy(&reload_config(""), &dir).await;
    let public = proxy.addr("public");
    let mut live = wsraw::connect(public, "/echo").await;

    let moved_to = format!("127.0.0.1:{}", free_port());
    let text = reload_config("").replace("127.0.0.1:0", &moved_to);
    dir.write("proxy.toml", with_ephemeral_admin(&text));
    let reloaded = admin_post(proxy.admin(), "/reload").await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.body_text());
    let body = reloaded.body_text();
    assert!(
        body.contains("listener public") && body.contains("restart"),
        "the answer should say listener public needs a restart: {body:?}"
    );

    assert_echo(&mut live, "after the reload").await;
    let mut fresh = wsraw::connect(public, "/echo").await;
    assert_echo(&mut fresh, "the old address still serves").await;
    let refused = TcpStream::connect(&moved_to).await;
    assert!(
        refused.is_err(),
        "nothing should listen on {moved_to} before a restart"
    );
}

// ---------------------------------------------------------------------------------------
// One worker thread

/// `worker_threads = 1` runs a single-threaded scheduler: proxied and builtin WebSockets,
/// a SIGHUP reload (files read off the scheduler's thread) and the drain all still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_thread_proxies_reloads_and_drains() {
    let upstream = spawn_ws_upstream().await;
    let base = format!(
        "[runtime]\nworker_threads = 1\n{}{NO_RATE_LIMIT}\n{ECHO_ROUTE}",
        timeouts("drain_spread = \"0s\"\nshutdown_grace = \"5s\"")
    );
    let mut wsgate = Wsgate::start(&base).await;
    let mut live = wsraw::connect(wsgate.public, "/echo").await;
    assert_echo(&mut live, "builtin echo on one worker").await;

    let chat = format!("{base}\n{}", chat_route(upstream.addr));
    wsgate.rewrite(&chat);
    wsgate.signal("HUP");
    wsgate
        .wait_metric("wsgate_config_reloads_total{result=\"success\"}", 1.0)
        .await;
    let url = format!("ws://{}/chat", wsgate.public);
    let (mut ws, _) = support::ws_connect(url.as_str()).await;
    ws.send(Message::text("proxied on one worker"))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::text("proxied on one worker")
    );
    assert_echo(&mut live, "after the reload").await;

    let (mut reader, mut writer) = live.split();
    wsgate.signal("TERM");
    let close = next_frame(&mut reader, "the drain's close").await;
    assert_eq!(close.close(), (1001, "going away".to_string()));
    writer.send(&client_close(1001, "")).await;
    drop(ws);
    let status = wsgate.wait_exit(LIMIT).await.expect("wsgate exits");
    assert!(status.success(), "exit status {status}");
}
