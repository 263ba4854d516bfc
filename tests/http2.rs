//! HTTP/2 on the front: h2 by ALPN on TLS listeners, h2c with prior knowledge on plain ones
//! (`http2 = true`), plain requests over h2 to the HTTP/1.1 upstream pools, and WebSockets
//! over HTTP/2 (RFC 8441 extended CONNECT) translated to HTTP/1.1 upgrades towards the
//! upstream. The client is hyper's own HTTP/2 client; the WebSocket over a stream is
//! tokio-tungstenite running on the upgraded stream.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use support::{
    empty_body, read_body, spawn_http_upstream, spawn_proxy, spawn_ws_upstream, tls_connect,
    within, AbortOnDrop, ClientBody, Proxy, TestCa, TestDir,
};

/// An HTTP/2 client connection.
struct H2 {
    sender: SendRequest<ClientBody>,
    _conn: AbortOnDrop,
}

impl H2 {
    /// h2c with prior knowledge on a plain listener.
    async fn plain(addr: SocketAddr) -> H2 {
        let tcp = within("a TCP connection", TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        H2::over(tcp).await
    }

    /// h2 by ALPN on a TLS listener.
    async fn tls(addr: SocketAddr, ca: &TestCa) -> H2 {
        let config = ca.client_config_with(
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            &[b"h2", b"http/1.1"],
        );
        let tls = within("a TLS connection", tls_connect(addr, "localhost", config))
            .await
            .unwrap_or_else(|e| panic!("TLS to {addr}: {e}"));
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "ALPN should pick h2"
        );
        H2::over(tls).await
    }

    async fn over<S>(io: S) -> H2
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = within(
            "the HTTP/2 handshake",
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(TokioIo::new(io)),
        )
        .await
        .expect("HTTP/2 handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut h2 = H2 {
            sender,
            _conn: AbortOnDrop(conn),
        };
        // One request first: by its answer the server's SETTINGS (with extended CONNECT)
        // have been read.
        let _ = h2.get("/nothing-here").await;
        h2
    }

    async fn send(&mut self, req: Request<ClientBody>) -> Response<hyper::body::Incoming> {
        within("an HTTP/2 answer", self.sender.send_request(req))
            .await
            .expect("HTTP/2 request")
    }

    async fn get(&mut self, path: &str) -> Response<Bytes> {
        let req = Request::get(format!("http://app.test{path}"))
            .version(Version::HTTP_2)
            .body(empty_body())
            .expect("request");
        read_body(self.send(req).await).await
    }

    /// An extended CONNECT for a WebSocket at `path`; the answer, and the stream when it
    /// was accepted.
    async fn websocket(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (Response<hyper::body::Incoming>, Option<WsOverH2>) {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("http://app.test{path}"))
            .version(Version::HTTP_2)
            .header("sec-websocket-version", "13");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let mut req = req.body(empty_body()).expect("request");
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let mut response = self.send(req).await;
        if response.status() != StatusCode::OK {
            return (response, None);
        }
        let upgraded = within("the stream", hyper::upgrade::on(&mut response))
            .await
            .expect("upgraded stream");
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
        (response, Some(ws))
    }
}

type WsOverH2 = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

async fn echo(ws: &mut WsOverH2, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    let reply = within("the echo", ws.next())
        .await
        .expect("a message")
        .expect("no error");
    assert_eq!(reply, Message::text(text));
}

fn config(upstream: SocketAddr, http_upstream: SocketAddr, listeners: &str) -> String {
    format!(
        "{listeners}\n\
         [timeouts]\nclient_header = \"2s\"\n\n\
         [upstreams.ws]\nservers = [\"{upstream}\"]\n\n\
         [upstreams.web]\nservers = [\"{http_upstream}\"]\n\n\
         [routes.ws]\npath = \"/ws\"\nupstream = \"ws\"\n\n\
         [routes.echo]\npath = \"/echo\"\nbuiltin = \"echo\"\n\n\
         [routes.web]\npath = \"/\"\nupstream = \"web\"\n"
    )
}

const PLAIN_H2: &str = "[listeners.public]\nbind = \"127.0.0.1:0\"\nhttp2 = true\n";

/// `/connections` of the admin listener, as JSON.
async fn connections(proxy: &Proxy) -> serde_json::Value {
    let request = support::http_request("GET", "/connections", &[("Host", "admin")]);
    let body = support::raw_exchange(proxy.admin(), &request)
        .await
        .body_text();
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn plain_requests_over_h2c_reach_the_http1_upstream_with_host_from_authority() {
    let ws = spawn_ws_upstream().await;
    let mut web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config(ws.addr, web.addr, PLAIN_H2), &dir).await;
    let mut h2 = H2::plain(proxy.addr("public")).await;
    // (The SETTINGS probe of `H2::over` was the first request.)
    let _ = web.requests.next("the probe request").await;

    let response = h2.get("/page?x=1").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(
        response.body().as_ref(),
        format!("hello from {}: GET /page?x=1", web.id()).as_bytes()
    );
    // Hop-by-hop headers of the upstream's HTTP/1.1 answer never reach an HTTP/2 client.
    assert!(response.headers().get("keep-alive").is_none());
    assert!(response.headers().get("connection").is_none());
    let seen = web.requests.next("the upstream request").await;
    assert_eq!(seen.header("host"), Some("app.test"));
    assert_eq!(seen.uri, "/page?x=1");
    assert!(seen.header("x-forwarded-for").is_some());
}

#[tokio::test]
async fn a_websocket_over_h2c_is_an_http1_upgrade_towards_the_upstream() {
    let mut ws = spawn_ws_upstream().await;
    let web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config(ws.addr, web.addr, PLAIN_H2), &dir).await;
    let mut h2 = H2::plain(proxy.addr("public")).await;

    let (response, stream) = h2
        .websocket("/ws/room?u=1", &[("origin", "http://app.test")])
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("sec-websocket-accept").is_none());
    let mut stream = stream.expect("the WebSocket");
    // The upstream saw an ordinary HTTP/1.1 upgrade with a key wsgate made.
    let seen = ws.requests.next("the upstream's upgrade request").await;
    assert_eq!(seen.method, Method::GET);
    assert_eq!(seen.uri, "/ws/room?u=1");
    assert_eq!(seen.header("host"), Some("app.test"));
    assert!(seen.has_token("connection", "upgrade"));
    assert!(seen.has_token("upgrade", "websocket"));
    assert_eq!(seen.header("sec-websocket-key").map(str::len), Some(24));
    assert_eq!(seen.header("origin"), Some("http://app.test"));

    echo(&mut stream, "over a stream").await;
    let list = connections(&proxy).await;
    assert_eq!(list[0]["http_version"], "2", "{list}");
    assert_eq!(list[0]["route"], "ws", "{list}");

    // Two more streams on the same connection: a WebSocket to the builtin echo and a plain
    // request, while the first WebSocket stays open.
    let (_, echo_stream) = h2.websocket("/echo", &[]).await;
    let mut echo_stream = echo_stream.expect("the builtin echo");
    echo(&mut echo_stream, "builtin").await;
    assert_eq!(h2.get("/page").await.status(), StatusCode::OK);
    echo(&mut stream, "still open").await;

    stream
        .close(Some(CloseFrame {
            code: 1000.into(),
            reason: "bye".into(),
        }))
        .await
        .expect("close");
    let close = ws.closes.next("the upstream's close").await;
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1000));
}

#[tokio::test]
async fn h2_by_alpn_on_tls_serves_websockets_and_pages() {
    let ws = spawn_ws_upstream().await;
    let web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.issue(&["localhost"]).write(&dir, "site");
    let listeners = "[listeners.public]\nbind = \"127.0.0.1:0\"\nhttp2 = true\n\
                     tls = { cert = \"site.crt\", key = \"site.key\" }\n";
    let proxy = spawn_proxy(&config(ws.addr, web.addr, listeners), &dir).await;
    let mut h2 = H2::tls(proxy.addr("public"), &ca).await;
    assert_eq!(h2.get("/index.html").await.status(), StatusCode::OK);
    let (_, stream) = h2.websocket("/ws", &[]).await;
    let mut stream = stream.expect("the WebSocket");
    echo(&mut stream, "over TLS").await;
    assert_eq!(connections(&proxy).await[0]["http_version"], "2");
    let request = support::http_request("GET", "/metrics", &[("Host", "admin")]);
    let metrics = support::raw_exchange(proxy.admin(), &request)
        .await
        .body_text();
    assert!(
        metrics.contains("wsgate_http_connections_total{listener=\"public\",version=\"2\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn http2_false_never_offers_h2_and_answers_the_preface_as_http1() {
    let ws = spawn_ws_upstream().await;
    let web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.issue(&["localhost"]).write(&dir, "site");
    let listeners = "[listeners.public]\nbind = \"127.0.0.1:0\"\n\n\
                     [listeners.secure]\nbind = \"127.0.0.1:0\"\n\
                     tls = { cert = \"site.crt\", key = \"site.key\" }\n";
    let proxy = spawn_proxy(&config(ws.addr, web.addr, listeners), &dir).await;

    let config = ca.client_config_with(
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[b"h2", b"http/1.1"],
    );
    let tls = tls_connect(proxy.addr("secure"), "localhost", config)
        .await
        .expect("TLS");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    // The preface on a plain HTTP/1.1 listener is not a request wsgate serves.
    let mut tcp = TcpStream::connect(proxy.addr("public")).await.expect("tcp");
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    let mut answer = Vec::new();
    within("the answer", tcp.read_to_end(&mut answer))
        .await
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 505 HTTP Version Not Supported\r\n"),
        "{answer}"
    );
    assert!(
        answer
            .ends_with("\r\n\r\nHTTP version not supported: this listener speaks HTTP/1.1 only\n"),
        "{answer}"
    );
}

#[tokio::test]
async fn an_upgrade_refused_by_the_upstream_is_relayed_on_the_stream() {
    // An HTTP server on the WebSocket route: it answers the upgrade with 200 and a page,
    // which over HTTP/2 would read as "WebSocket open": wsgate answers 502 instead.
    let web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config(web.addr, web.addr, PLAIN_H2), &dir).await;
    let mut h2 = H2::plain(proxy.addr("public")).await;
    let (response, stream) = h2.websocket("/ws", &[]).await;
    assert!(stream.is_none());
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body = read_body(response).await;
    let text = String::from_utf8_lossy(body.body());
    assert!(text.contains("instead of 101"), "{text}");

    // A status other than 2xx is relayed with its body, as on HTTP/1.1.
    let (response, stream) = h2.websocket("/ws", &[("x-reply-status", "403")]).await;
    assert!(stream.is_none());
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_reset_stream_is_client_gone_for_the_upstream() {
    let mut ws = spawn_ws_upstream().await;
    let web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config(ws.addr, web.addr, PLAIN_H2), &dir).await;
    let mut h2 = H2::plain(proxy.addr("public")).await;
    let (_, stream) = h2.websocket("/ws", &[]).await;
    let mut stream = stream.expect("the WebSocket");
    echo(&mut stream, "hello").await;
    // Dropping the client side of the stream resets it (RST_STREAM), the connection stays.
    drop(stream);
    let close = ws.closes.next("the upstream's close").await;
    let close = close.expect("a close frame with a code");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1001, "client gone")
    );
    assert_eq!(h2.get("/after").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_h2c_client_that_sends_no_request_is_closed_after_client_header() {
    let ws = spawn_ws_upstream().await;
    let web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config(ws.addr, web.addr, PLAIN_H2), &dir).await;
    let mut tcp = TcpStream::connect(proxy.addr("public")).await.expect("tcp");
    // The preface and an empty SETTINGS frame, then nothing.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    let _ = within("the connection to close", tcp.read_to_end(&mut sink)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "closed after {took:?}; client_header is 2s"
    );
}

#[tokio::test]
async fn a_drain_sends_goaway_and_closes_the_websockets_on_the_connection() {
    let mut ws = spawn_ws_upstream().await;
    let web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let toml = config(ws.addr, web.addr, PLAIN_H2).replace(
        "[timeouts]\n",
        "[timeouts]\ndrain_spread = \"0s\"\nshutdown_grace = \"5s\"\n",
    );
    let proxy = spawn_proxy(&toml, &dir).await;
    let mut h2 = H2::plain(proxy.addr("public")).await;
    let (_, stream) = h2.websocket("/ws", &[]).await;
    let mut stream = stream.expect("the WebSocket");
    echo(&mut stream, "before the drain").await;

    let drained = tokio::spawn(proxy.shutdown());
    // The WebSocket gets its close on its stream; the library answers it.
    let close = loop {
        match within("the drain's close", stream.next()).await {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let close = close.expect("a close code");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1001, "going away")
    );
    // The client's answer goes out as the library is polled; then the upstream gets its
    // close (the client is closed first).
    let (_, up) = tokio::join!(
        async { while let Some(Ok(_)) = within("the end of the stream", stream.next()).await {} },
        ws.closes.next("the upstream's close")
    );
    assert_eq!(up.map(|c| u16::from(c.code)), Some(1001));
    // GOAWAY: the connection takes no new stream.
    let req = Request::get("http://app.test/late")
        .version(Version::HTTP_2)
        .body(empty_body())
        .expect("request");
    let late = within("the late request", h2.sender.send_request(req)).await;
    assert!(late.is_err(), "a stream opened after GOAWAY: {late:?}");
    // The client lets go of the stream, as a browser does after the close handshake: with
    // no stream left, the connection ends and the drain is over, long before
    // shutdown_grace.
    drop(stream);
    let started = std::time::Instant::now();
    within("the drain to finish", drained)
        .await
        .expect("shutdown task")
        .expect("clean shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the drain took {:?}",
        started.elapsed()
    );
}

// ---- protection: raw HTTP/2 frames ----------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// `GET http://app.test/` in HPACK: static-table method, scheme and path, a literal
/// authority not indexed.
fn get_block() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 8];
    block.extend_from_slice(b"app.test");
    block
}

/// Reads frames until the server ends the connection; returns the GOAWAY error codes seen.
async fn goaways(tcp: &mut TcpStream) -> Vec<u32> {
    let mut bytes = Vec::new();
    let _ = within(
        "the server to end the connection",
        tcp.read_to_end(&mut bytes),
    )
    .await;
    let mut codes = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = (usize::from(bytes[at]) << 16)
            | (usize::from(bytes[at + 1]) << 8)
            | usize::from(bytes[at + 2]);
        let kind = bytes[at + 3];
        let payload = &bytes[(at + 9).min(bytes.len())..(at + 9 + len).min(bytes.len())];
        if kind == GOAWAY && payload.len() >= 8 {
            codes.push(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ]));
        }
        at += 9 + len;
    }
    codes
}

/// CPU time (user + system) of this process: the proxy runs in it.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes one `rusage` into the zeroed value it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn rapid_reset_streams_get_goaway_with_bounded_cost() {
    const STREAMS: u32 = 20_000;
    let ws = spawn_ws_upstream().await;
    let mut web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config(ws.addr, web.addr, PLAIN_H2), &dir).await;
    let mut tcp = TcpStream::connect(proxy.addr("public")).await.expect("tcp");
    // CVE-2023-44487: open a stream and reset it at once, again and again, in one write.
    let mut attack = PREFACE.to_vec();
    attack.extend(h2_frame(SETTINGS, 0, 0, &[]));
    let block = get_block();
    for i in 0..STREAMS {
        let id = 2 * i + 1;
        attack.extend(h2_frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        attack.extend(h2_frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let cpu = cpu_time();
    let started = std::time::Instant::now();
    let _ = tcp.write_all(&attack).await;
    let codes = goaways(&mut tcp).await;
    let (cpu, took) = (cpu_time() - cpu, started.elapsed());
    eprintln!("rapid reset: {STREAMS} streams, goaway {codes:?}, {took:?}, cpu {cpu:?}");
    // ENHANCE_YOUR_CALM (0xb): the server stops the connection instead of serving it.
    assert!(codes.contains(&0xb), "GOAWAY codes {codes:?}");
    assert!(
        cpu < Duration::from_secs(5),
        "{cpu:?} of CPU for the attack"
    );
    // Nothing like one upstream request per stream.
    let mut forwarded = 0;
    while web.requests.try_next().is_some() {
        forwarded += 1;
    }
    assert!(forwarded < 200, "{forwarded} requests reached the upstream");
    // The listener still serves.
    let mut h2 = H2::plain(proxy.addr("public")).await;
    assert_eq!(h2.get("/after").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off_early() {
    let ws = spawn_ws_upstream().await;
    let web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config(ws.addr, web.addr, PLAIN_H2), &dir).await;
    let mut tcp = TcpStream::connect(proxy.addr("public")).await.expect("tcp");
    let mut start = PREFACE.to_vec();
    start.extend(h2_frame(SETTINGS, 0, 0, &[]));
    // A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION
    // frames of 16 KiB, up to 64 MiB if nobody stops it.
    start.extend(h2_frame(HEADERS, END_STREAM, 1, &get_block()));
    tcp.write_all(&start).await.expect("write");
    let rss = rss_kib();
    let cpu = cpu_time();
    let chunk = h2_frame(CONTINUATION, 0, 1, &[0x40u8; 16 * 1024]);
    let mut sent = 0usize;
    for _ in 0..4096 {
        match tokio::time::timeout(Duration::from_secs(5), tcp.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            _ => break,
        }
    }
    let codes = goaways(&mut tcp).await;
    let grew = rss_kib().saturating_sub(rss);
    let cpu = cpu_time() - cpu;
    eprintln!(
        "continuation flood: {} KiB written before the end, goaway {codes:?}, RSS +{grew} KiB, cpu {cpu:?}",
        sent / 1024
    );
    assert!(
        sent < 32 * 1024 * 1024,
        "the server read {sent} bytes of one header block"
    );
    assert!(grew < 32 * 1024, "RSS grew by {grew} KiB");
    let mut h2 = H2::plain(proxy.addr("public")).await;
    assert_eq!(h2.get("/after").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn request_bodies_stream_both_ways_over_h2() {
    let ws = spawn_ws_upstream().await;
    let mut web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config(ws.addr, web.addr, PLAIN_H2), &dir).await;
    let mut h2 = H2::plain(proxy.addr("public")).await;
    let body = support::pattern(3 * 1024 * 1024 + 17);
    // Streamed in pieces, with no length announced: chunked towards the upstream.
    let (tx, stream_body) = support::channel_body(4);
    let pieces: Vec<Bytes> = body.chunks(100_000).map(Bytes::copy_from_slice).collect();
    let producer = tokio::spawn(async move {
        for piece in pieces {
            if tx.send(piece).await.is_err() {
                break;
            }
        }
    });
    let req = Request::post("http://app.test/upload")
        .version(Version::HTTP_2)
        .body(stream_body)
        .expect("request");
    let response = read_body(h2.send(req).await).await;
    within("the producer", producer).await.expect("producer");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.body().len(), body.len());
    assert!(
        response.body().as_ref() == body.as_slice(),
        "the echoed body differs"
    );
    let digest = web.bodies.next("the upstream's body digest").await;
    assert_eq!(digest.len, body.len() as u64);
    assert_eq!(digest.sha1, support::sha1_hex(&body));
}

/// A WebSocket whose client stops reading holds up only its own stream: flow control
/// stops the traffic back to the upstream, wsgate buffers no more than the stream's
/// window and send buffer, and another WebSocket on the same connection goes on.
#[tokio::test]
async fn a_stalled_stream_does_not_stall_the_others_or_grow_memory() {
    let ws = spawn_ws_upstream().await;
    let web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config(ws.addr, web.addr, PLAIN_H2), &dir).await;
    let mut h2 = H2::plain(proxy.addr("public")).await;
    let (_, stalled) = h2.websocket("/ws", &[]).await;
    let (mut sink, _never_read) = stalled.expect("first WebSocket").split();
    let (_, other) = h2.websocket("/ws", &[]).await;
    let mut other = other.expect("second WebSocket");
    echo(&mut other, "before").await;

    // Send on the first until its echoes, never read, stop everything behind them.
    let rss = rss_kib();
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut sent = 0usize;
    for _ in 0..4096 {
        let send = sink.send(Message::Binary(chunk.clone()));
        match tokio::time::timeout(Duration::from_millis(500), send).await {
            Ok(Ok(())) => sent += chunk.len(),
            Ok(Err(e)) => panic!("send failed after {sent} bytes: {e}"),
            Err(_) => break,
        }
    }
    let grew = rss_kib().saturating_sub(rss);
    eprintln!(
        "stalled stream: {} KiB accepted before flow control stopped it, RSS +{grew} KiB",
        sent / 1024
    );
    assert!(
        sent < 64 * 1024 * 1024,
        "{sent} bytes went in: nothing stopped them"
    );
    // The whole test process (client, wsgate, upstream) holds what is in flight.
    assert!(grew < 48 * 1024, "RSS grew by {grew} KiB");
    // The other stream of the same connection still works.
    echo(&mut other, "after").await;
}

#[tokio::test]
async fn a_header_list_over_max_request_head_is_refused() {
    let ws = spawn_ws_upstream().await;
    let mut web = spawn_http_upstream().await;
    let dir = TestDir::new();
    let toml = config(ws.addr, web.addr, PLAIN_H2) + "\n[limits]\nmax_request_head = \"16KiB\"\n";
    let proxy = spawn_proxy(&toml, &dir).await;
    let mut h2 = H2::plain(proxy.addr("public")).await;
    let _ = web.requests.next("the probe request").await;
    let big = "x".repeat(20 * 1024);
    let req = Request::get("http://app.test/big")
        .version(Version::HTTP_2)
        .header("x-big", big.as_str())
        .body(empty_body())
        .expect("request");
    let answer = within("the answer", h2.sender.send_request(req)).await;
    match answer {
        Ok(response) => assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        ),
        Err(e) => panic!("expected 431, got {e}"),
    }
    assert!(
        web.requests.try_next().is_none(),
        "the request reached the upstream"
    );
    // The connection goes on.
    assert_eq!(h2.get("/small").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_reload_applies_to_new_streams_on_an_open_connection() {
    let ws = spawn_ws_upstream().await;
    let mut web = spawn_http_upstream().await;
    let other = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config(ws.addr, web.addr, PLAIN_H2), &dir).await;
    let mut h2 = H2::plain(proxy.addr("public")).await;
    let _ = web.requests.next("the probe request").await;
    let before = h2.get("/page").await;
    assert_eq!(before.headers()["x-server"], web.id().as_str());

    // The pages move to another server; the connection stays open across the reload.
    let moved = config(ws.addr, other.addr, PLAIN_H2);
    dir.write(
        "proxy.toml",
        format!("[admin]\nbind = \"127.0.0.1:0\"\n\n{moved}"),
    );
    let request = support::http_request(
        "POST",
        "/reload",
        &[("Host", "admin"), ("Content-Length", "0")],
    );
    let reloaded = support::raw_exchange(proxy.admin(), &request).await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.body_text());
    let after = h2.get("/page").await;
    assert_eq!(after.headers()["x-server"], other.id().as_str());
}

/// Socket.IO's transports: long-polling requests first, then the upgrade on the same path.
/// Over HTTP/2 both go on the one connection: the polls as ordinary requests, the upgrade
/// as an extended CONNECT, and the app server sees polls and an HTTP/1.1 upgrade.
#[tokio::test]
async fn socket_io_polling_then_upgrade_over_h2() {
    let app = spawn_socket_io_like_upstream().await;
    let dir = TestDir::new();
    let toml = format!(
        "{PLAIN_H2}\n[upstreams.app]\nservers = [\"{app}\"]\n\n\
         [routes.app]\npath = \"/socket.io\"\nupstream = \"app\"\n\n\
         [routes.rest]\npath = \"/\"\nupstream = \"app\"\n"
    );
    let proxy = spawn_proxy(&toml, &dir).await;
    let mut h2 = H2::plain(proxy.addr("public")).await;
    let poll = h2.get("/socket.io/?EIO=4&transport=polling").await;
    assert_eq!(poll.status(), StatusCode::OK);
    assert_eq!(poll.body().as_ref(), b"0{\"sid\":\"abc\"}");
    let (response, stream) = h2
        .websocket("/socket.io/?EIO=4&transport=websocket&sid=abc", &[])
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = stream.expect("the upgraded transport");
    echo(&mut stream, "2probe").await;
}

/// An app server that answers polls with a handshake packet and upgrades WebSocket
/// requests to an echo, on the same path.
async fn spawn_socket_io_like_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |mut req: Request<hyper::body::Incoming>| async move {
                        let key = req.headers().get("sec-websocket-key").cloned();
                        let Some(key) = key else {
                            let body = http_body_util::Full::new(Bytes::from_static(
                                b"0{\"sid\":\"abc\"}",
                            ));
                            return Ok::<_, std::convert::Infallible>(Response::new(body));
                        };
                        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                            key.as_bytes(),
                        );
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(upgraded) = upgrade.await else { return };
                            let mut ws = WebSocketStream::from_raw_socket(
                                TokioIo::new(upgraded),
                                Role::Server,
                                None,
                            )
                            .await;
                            while let Some(Ok(message)) = ws.next().await {
                                if message.is_text() && ws.send(message).await.is_err() {
                                    break;
                                }
                            }
                        });
                        let mut response = Response::new(http_body_util::Full::new(Bytes::new()));
                        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        let h = response.headers_mut();
                        h.insert("connection", http::HeaderValue::from_static("upgrade"));
                        h.insert("upgrade", http::HeaderValue::from_static("websocket"));
                        h.insert(
                            "sec-websocket-accept",
                            http::HeaderValue::from_str(&accept).expect("accept"),
                        );
                        Ok(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}
