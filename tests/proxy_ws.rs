//! WebSocket upgrades through the proxy: the tunnel is transparent (every exchange is run
//! directly against the upstream and through wsgate, and the two are compared), the
//! handshake is checked before any upstream is touched, and each failure gets its status.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::ClientRequestBuilder;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use support::*;

/// One plain listener `public`, relaxed timeouts, and route `app` (`/`) to `servers`.
fn one_route(servers: &[SocketAddr], route_extra: &str) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        r#"
[listeners.public]
bind = "127.0.0.1:0"
{RELAXED_TIMEOUTS}
[upstreams.app]
servers = [{}]

[routes.app]
path = "/"
upstream = "app"
{route_extra}
"#,
        servers.join(", ")
    )
}

fn ws_url(proxy: &Proxy, path: &str) -> String {
    format!("ws://{}{path}", proxy.addr("public"))
}

#[tokio::test]
async fn echo_is_byte_identical_direct_and_through_the_proxy() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;
    let messages = vec![
        Message::text("hello, wsgate ✓"),
        Message::binary(vec![0u8, 1, 2, 0x7f, 0x80, 0xfe, 0xff]),
        Message::binary(pattern(1 << 20)),
    ];

    let (mut ws, _) = ws_connect(upstream.url("/echo")).await;
    let direct = echo_transcript(&mut ws, &messages).await;
    let (mut ws, _) = ws_connect(ws_url(&proxy, "/echo")).await;
    let proxied = echo_transcript(&mut ws, &messages).await;

    assert_same_messages("direct echo", &direct, &messages);
    assert_same_messages("echo through the proxy", &proxied, &direct);
}

#[tokio::test]
async fn subprotocol_chosen_by_the_upstream_reaches_the_client() {
    let mut upstream = spawn_ws_upstream_with_protocols(&["superchat"]).await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;

    for url in [upstream.url("/chat"), ws_url(&proxy, "/chat")] {
        let request = ClientRequestBuilder::new(url.parse().unwrap())
            .with_sub_protocol("chat")
            .with_sub_protocol("superchat");
        let (mut ws, response) = ws_connect(request).await;
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            "superchat",
            "{url}"
        );
        let seen = upstream.requests.next("the upgrade request").await;
        assert_eq!(
            seen.header("sec-websocket-protocol"),
            Some("chat, superchat"),
            "{url}"
        );
        let echoed = echo_transcript(&mut ws, &[Message::text("hi")]).await;
        assert_eq!(echoed, vec![Message::text("hi")], "{url}");
    }
}

#[tokio::test]
async fn extensions_pass_through_unchanged_both_ways() {
    let mut upstream = spawn_raw_upstream(answer_101(&[(
        "Sec-WebSocket-Extensions",
        "permessage-deflate",
    )]))
    .await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;
    let offer = "permessage-deflate; client_max_window_bits, x-webkit-deflate-frame";
    let mut headers = ws_headers("ext.test");
    headers.push(("Sec-WebSocket-Extensions", offer));

    for addr in [upstream.addr, proxy.addr("public")] {
        let mut client = RawClient::connect(addr).await;
        client.send(&http_request("GET", "/chat", &headers)).await;
        let response = client.read_response().await;
        assert_eq!(response.status, 101, "via {addr}: {response:?}");
        assert_eq!(
            response.head.header_all("sec-websocket-extensions"),
            vec!["permessage-deflate"],
            "via {addr}"
        );
        assert_eq!(
            response.header("sec-websocket-accept"),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), // RFC 6455 §1.3
            "via {addr}"
        );
        let head = upstream.heads.next("the upgrade request").await;
        assert_eq!(
            head.header_all("sec-websocket-extensions"),
            vec![offer],
            "via {addr}"
        );
    }
}

/// The client asks the upstream to close with `code`/`reason`; returns the close frame the
/// client received and the one the upstream received back.
async fn upstream_closes(
    url: &str,
    upstream: &mut WsUpstream,
    code: u16,
    reason: &str,
) -> (Option<CloseFrame>, Option<CloseFrame>) {
    let (mut ws, _) = ws_connect(url).await;
    within("sending the close command", async {
        use futures_util::SinkExt as _;
        ws.send(close_command(code, reason)).await
    })
    .await
    .expect("send");
    let client_saw = next_close(&mut ws).await;
    let upstream_saw = upstream.closes.next("the client's close reply").await;
    (client_saw, upstream_saw)
}

/// The client closes with `code`/`reason`; returns the close frame the upstream received
/// and the one the client got back.
async fn client_closes(
    url: &str,
    upstream: &mut WsUpstream,
    code: u16,
    reason: &str,
) -> (Option<CloseFrame>, Option<CloseFrame>) {
    let (mut ws, _) = ws_connect(url).await;
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    within("sending close", ws.close(Some(frame)))
        .await
        .expect("send close");
    let upstream_saw = upstream.closes.next("the client's close frame").await;
    let client_saw = next_close(&mut ws).await;
    (upstream_saw, client_saw)
}

fn close(code: u16, reason: &str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })
}

#[tokio::test]
async fn close_codes_and_reasons_cross_the_proxy_both_ways() {
    let mut upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;

    let direct = upstream_closes(&upstream.url("/"), &mut upstream, 4000, "bye").await;
    assert_eq!(direct, (close(4000, "bye"), close(4000, "bye")));
    let proxied = upstream_closes(&ws_url(&proxy, "/"), &mut upstream, 4000, "bye").await;
    assert_eq!(
        proxied, direct,
        "upstream-initiated close through the proxy"
    );

    let direct = client_closes(&upstream.url("/"), &mut upstream, 4001, "later").await;
    assert_eq!(direct, (close(4001, "later"), close(4001, "later")));
    let proxied = client_closes(&ws_url(&proxy, "/"), &mut upstream, 4001, "later").await;
    assert_eq!(proxied, direct, "client-initiated close through the proxy");
}

#[tokio::test]
async fn upstream_refusal_is_relayed_with_its_body() {
    let body = "log in first, please";
    let upstream = spawn_raw_upstream(answer_status(
        "401 Unauthorized",
        &[
            ("Content-Type", "text/plain"),
            ("WWW-Authenticate", "Bearer realm=\"chat\""),
        ],
        body,
    ))
    .await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;
    let request = http_request("GET", "/chat", &ws_headers("chat.test"));

    let direct = raw_exchange(upstream.addr, &request).await;
    let proxied = raw_exchange(proxy.addr("public"), &request).await;
    for (via, response) in [("direct", &direct), ("proxy", &proxied)] {
        assert_eq!(response.status, 401, "{via}: {response:?}");
        assert_eq!(response.body_text(), body, "{via}");
        assert_eq!(
            response.header("www-authenticate"),
            Some("Bearer realm=\"chat\""),
            "{via}"
        );
        assert_eq!(response.header("content-type"), Some("text/plain"), "{via}");
    }

    // A WebSocket library sees the same refusal (its body is only what arrived with the
    // head, so the raw exchanges above are what check the body).
    let err = tokio_tungstenite::connect_async(ws_url(&proxy, "/chat"))
        .await
        .expect_err("a 401 is not an upgrade");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 401);
        }
        other => panic!("expected an HTTP error, got {other:?}"),
    }
}

/// Asserts a wsgate refusal: `status`, a one-line text body containing every `needles`.
fn assert_refusal(response: &RawResponse, status: u16, needles: &[&str]) {
    assert_eq!(response.status, status, "{response:?}");
    assert!(
        response
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{response:?}"
    );
    let body = response.body_text();
    assert_one_line(&body);
    for needle in needles {
        assert!(
            body.contains(needle),
            "body {body:?} does not mention {needle:?}"
        );
    }
}

#[tokio::test]
async fn unrouted_upgrade_is_404_naming_host_and_path() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let config = one_route(&[upstream.addr], "host = \"app.test\"");
    let proxy = spawn_proxy(&config, &dir).await;

    let request = http_request("GET", "/nowhere/room", &ws_headers("other.test"));
    let response = raw_exchange(proxy.addr("public"), &request).await;
    assert_refusal(&response, 404, &["other.test", "/nowhere/room"]);
    assert_eq!(upstream.connections(), 0);
}

#[tokio::test]
async fn disallowed_origin_is_403() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let config = one_route(&[upstream.addr], "allowed_origins = [\"https://ok.test\"]");
    let proxy = spawn_proxy(&config, &dir).await;

    let mut headers = ws_headers("app.test");
    headers.push(("Origin", "https://evil.test"));
    let response = raw_exchange(proxy.addr("public"), &http_request("GET", "/", &headers)).await;
    assert_refusal(&response, 403, &["https://evil.test"]);
    assert_eq!(upstream.connections(), 0);

    // The allowed origin goes through.
    set_header(&mut headers, "Origin", "https://ok.test");
    let response = raw_exchange(proxy.addr("public"), &http_request("GET", "/", &headers)).await;
    assert_eq!(response.status, 101, "{response:?}");
}

#[tokio::test]
async fn bad_or_missing_key_is_400() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;

    // "c2hvcnQ=" is base64 for 5 bytes; "!!!" is not base64 at all.
    for key in ["c2hvcnQ=", "not base64 !!!", "dGhlIHNhbXBsZSBub25jZSEh"] {
        let mut headers = ws_headers("app.test");
        set_header(&mut headers, "Sec-WebSocket-Key", key);
        let response =
            raw_exchange(proxy.addr("public"), &http_request("GET", "/", &headers)).await;
        assert_refusal(&response, 400, &["Sec-WebSocket-Key"]);
    }
    let mut headers = ws_headers("app.test");
    remove_header(&mut headers, "Sec-WebSocket-Key");
    let response = raw_exchange(proxy.addr("public"), &http_request("GET", "/", &headers)).await;
    assert_refusal(&response, 400, &["Sec-WebSocket-Key"]);
    assert_eq!(upstream.connections(), 0);
}

#[tokio::test]
async fn version_other_than_13_is_426_naming_13() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;

    let mut headers = ws_headers("app.test");
    set_header(&mut headers, "Sec-WebSocket-Version", "8");
    let response = raw_exchange(proxy.addr("public"), &http_request("GET", "/", &headers)).await;
    assert_refusal(&response, 426, &["13"]);
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
    assert_eq!(upstream.connections(), 0);
}

#[tokio::test]
async fn upstream_down_is_502_at_once() {
    let down = closed_port().await;
    let dir = TestDir::new();
    let config = format!(
        r#"
[listeners.public]
bind = "127.0.0.1:0"
[timeouts]
upstream_connect = "500ms"
upstream_handshake = "1s"
client_header = "5s"
[upstreams.app]
servers = ["{down}"]
[routes.app]
path = "/"
upstream = "app"
"#
    );
    let proxy = spawn_proxy(&config, &dir).await;

    let started = Instant::now();
    let request = http_request("GET", "/", &ws_headers("app.test"));
    let response = raw_exchange(proxy.addr("public"), &request).await;
    let elapsed = started.elapsed();
    assert_refusal(&response, 502, &[]);
    // A refused connect is immediate: no waiting for upstream_connect (500ms).
    assert!(elapsed < Duration::from_millis(450), "took {elapsed:?}");
}

#[tokio::test]
async fn upstream_that_never_answers_is_504_after_upstream_handshake() {
    let mut silent = spawn_silent_upstream().await;
    let dir = TestDir::new();
    let config = format!(
        r#"
[listeners.public]
bind = "127.0.0.1:0"
[timeouts]
upstream_connect = "500ms"
upstream_handshake = "1s"
client_header = "5s"
[upstreams.app]
servers = ["{}"]
[routes.app]
path = "/"
upstream = "app"
"#,
        silent.addr
    );
    let proxy = spawn_proxy(&config, &dir).await;

    let started = Instant::now();
    let request = http_request("GET", "/", &ws_headers("app.test"));
    let response = raw_exchange(proxy.addr("public"), &request).await;
    let elapsed = started.elapsed();
    silent.accepted.next("the proxy's connection").await;
    assert_refusal(&response, 504, &[]);
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "took {elapsed:?}, upstream_handshake is 1s"
    );
}

#[tokio::test]
async fn upstream_101_with_wrong_accept_is_502() {
    let mut upstream = spawn_raw_upstream(answer_101_wrong_accept()).await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;

    let request = http_request("GET", "/", &ws_headers("app.test"));
    let response = raw_exchange(proxy.addr("public"), &request).await;
    upstream.heads.next("the forwarded upgrade").await;
    assert_refusal(&response, 502, &["Sec-WebSocket-Accept"]);
    assert_eq!(response.header("upgrade"), None);
}

#[tokio::test]
async fn chunked_and_close_delimited_refusals_arrive_whole() {
    let chunked = spawn_raw_upstream(answer_bytes(
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\
          X-Reason: banned\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n",
    ))
    .await;
    let closing = spawn_raw_upstream_closing(answer_bytes(
        b"HTTP/1.1 403 Forbidden\r\nX-Reason: banned\r\n\r\nhello, world",
    ))
    .await;
    for (name, upstream) in [("chunked", &chunked), ("read to close", &closing)] {
        let dir = TestDir::new();
        let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;
        let request = http_request("GET", "/", &ws_headers("app.test"));
        let response = raw_exchange(proxy.addr("public"), &request).await;
        assert_eq!(response.status, 403, "{name}: {response:?}");
        assert_eq!(response.header("x-reason"), Some("banned"), "{name}");
        assert_eq!(response.body_text(), "hello, world", "{name}");
        // The upstream's framing is its hop's: the Content-Length beside chunked is dropped.
        assert_eq!(response.header("content-length"), None, "{name}");
    }
}

#[tokio::test]
async fn malformed_upstream_answers_are_502_naming_the_problem() {
    let cases: [(&[u8], &str); 5] = [
        (b"", "closed the connection without answering"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "invalid response head"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgr",
            "in the middle of its response head",
        ),
        (
            b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
            "invalid response head",
        ),
        (
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            "conflicting Content-Length",
        ),
    ];
    for (answer, needle) in cases {
        let upstream = spawn_raw_upstream_closing(answer_bytes(answer)).await;
        let dir = TestDir::new();
        let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;
        let request = http_request("GET", "/", &ws_headers("app.test"));
        let response = raw_exchange(proxy.addr("public"), &request).await;
        assert_refusal(&response, 502, &[needle, &upstream.addr.to_string()]);
    }
}

#[tokio::test]
async fn frames_sent_with_the_101_reach_the_client_and_interim_answers_do_not() {
    let upstream = spawn_raw_upstream(Arc::new(|head: &RawHead| {
        let key = head.header("sec-websocket-key").unwrap_or_default();
        let mut answer = format!(
            "HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n\
             HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes();
        // A text frame "welcome" in the same write as the head.
        answer.extend_from_slice(b"\x81\x07welcome");
        answer
    }))
    .await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;
    let (mut ws, response) = within(
        "the upgrade",
        tokio_tungstenite::connect_async(ws_url(&proxy, "/")),
    )
    .await
    .expect("upgrade through the proxy");
    assert_eq!(response.status(), 101);
    assert!(response.headers().get("link").is_none(), "{response:?}");
    let first = within("the early frame", ws.next()).await;
    assert_eq!(
        first.map(|m| m.map_err(|e| e.to_string())),
        Some(Ok(Message::text("welcome")))
    );
}

/// The `key=value` pairs of the last element of a `Forwarded` header.
fn last_forwarded(value: &str) -> Vec<(String, String)> {
    let last = value.rsplit(',').next().unwrap_or_default();
    let mut pairs: Vec<(String, String)> = last
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim_matches('"').to_string()))
        .collect();
    pairs.sort();
    pairs
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn upgrade_carries_forwarding_headers_and_drops_hop_by_hop() {
    let mut upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], ""), &dir).await;

    let mut headers = ws_headers("chat.test");
    set_header(&mut headers, "Connection", "Upgrade, X-Hop");
    headers.extend([
        ("X-Hop", "secret"),
        ("Keep-Alive", "timeout=5"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Kept", "yes"),
    ]);
    let response = raw_exchange(
        proxy.addr("public"),
        &http_request("GET", "/room?id=7", &headers),
    )
    .await;
    assert_eq!(response.status, 101, "{response:?}");

    let seen = upstream.requests.next("the forwarded upgrade").await;
    assert_eq!(seen.uri, "/room?id=7");
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("chat.test"));
    assert_eq!(
        last_forwarded(seen.header("forwarded").expect("Forwarded")),
        pairs(&[
            ("for", "127.0.0.1"),
            ("host", "chat.test"),
            ("proto", "http")
        ])
    );
    assert_eq!(seen.header("x-hop"), None, "listed in Connection");
    assert_eq!(seen.header("keep-alive"), None, "hop-by-hop");
    assert!(
        seen.has_token("connection", "upgrade"),
        "{:?}",
        seen.headers
    );
    assert!(!seen.has_token("connection", "x-hop"), "{:?}", seen.headers);
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(seen.header("x-kept"), Some("yes"));
    assert_eq!(seen.header("sec-websocket-key"), Some(WS_KEY));
    assert_eq!(seen.header("sec-websocket-version"), Some("13"));
}

#[tokio::test]
async fn upgrade_over_tls_is_forwarded_as_https() {
    let mut upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.issue(&["chat.test"]).write(&dir, "server");
    let config = format!(
        r#"
[listeners.secure]
bind = "127.0.0.1:0"
[listeners.secure.tls]
cert = "server.crt"
key = "server.key"
{RELAXED_TIMEOUTS}
[upstreams.app]
servers = ["{}"]
[routes.app]
path = "/"
upstream = "app"
"#,
        upstream.addr
    );
    let proxy = spawn_proxy(&config, &dir).await;

    let tls = within(
        "a TLS handshake",
        tls_connect(proxy.addr("secure"), "chat.test", ca.client_config()),
    )
    .await
    .expect("TLS handshake");
    let mut client = RawClient::over(tls);
    client
        .send(&http_request("GET", "/", &ws_headers("chat.test")))
        .await;
    let response = client.read_response().await;
    assert_eq!(response.status, 101, "{response:?}");

    let seen = upstream.requests.next("the forwarded upgrade").await;
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-host"), Some("chat.test"));
    assert_eq!(
        last_forwarded(seen.header("forwarded").expect("Forwarded")),
        pairs(&[
            ("for", "127.0.0.1"),
            ("host", "chat.test"),
            ("proto", "https")
        ])
    );
}

#[tokio::test]
async fn failed_connect_is_retried_on_the_next_server() {
    let down = closed_port().await;
    let mut upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[down, upstream.addr], ""), &dir).await;

    for i in 0..4 {
        let (mut ws, _) = ws_connect(ws_url(&proxy, "/")).await;
        let text = format!("attempt {i}");
        let echoed = echo_transcript(&mut ws, &[Message::text(text.clone())]).await;
        assert_eq!(echoed, vec![Message::text(text)]);
        upstream
            .requests
            .next("the upgrade at the live server")
            .await;
    }
    assert_eq!(upstream.connections(), 4);
}
