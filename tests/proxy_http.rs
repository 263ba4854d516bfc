//! Plain HTTP requests through the proxy: answers relayed as the upstream gave them (run
//! directly and through wsgate and compared), bodies streamed both ways, balancing and
//! fail-over across a pool, routing by host and path, and the client and upstream timeouts.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::BodyExt as _;

use support::*;

/// Upstream pool TOML: `servers = ["a", "b"]`.
fn server_list(servers: &[SocketAddr]) -> String {
    let quoted: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// One plain listener `public`, relaxed timeouts, and route `app` on `path` to `servers`.
fn one_route(servers: &[SocketAddr], path: &str, route_extra: &str) -> String {
    format!(
        r#"
[listeners.public]
bind = "127.0.0.1:0"
{RELAXED_TIMEOUTS}
[upstreams.app]
servers = {}

[routes.app]
path = "{path}"
upstream = "app"
{route_extra}
"#,
        server_list(servers)
    )
}

/// The timeouts under test: connect 500ms, upstream answer 1s, request head 500ms.
fn tight_timeouts(servers: &[SocketAddr]) -> String {
    format!(
        r#"
[listeners.public]
bind = "127.0.0.1:0"
[timeouts]
upstream_connect = "500ms"
upstream_handshake = "1s"
client_header = "500ms"
[upstreams.app]
servers = {}
[routes.app]
path = "/"
upstream = "app"
"#,
        server_list(servers)
    )
}

/// Response headers the HTTP upstream sends that describe one hop only.
const RESPONSE_HOP_BY_HOP: [&str; 3] = ["connection", "x-resp-hop", "keep-alive"];

/// The headers of a response minus hop-by-hop ones and `date` (which may tick between runs).
fn end_to_end(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| !RESPONSE_HOP_BY_HOP.contains(&name.as_str()) && *name != "date")
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("<binary>").to_string()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn get_is_relayed_as_the_upstream_answered_it() {
    let mut upstream = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], "/", ""), &dir).await;
    let headers = [
        ("x-reply-status", "203"),
        ("x-forwarded-for", "198.51.100.1"),
        ("connection", "x-hop"),
        ("x-hop", "secret"),
        ("keep-alive", "timeout=5"),
        ("x-kept", "yes"),
    ];

    let mut direct_client = HttpClient::connect(upstream.addr).await;
    let direct = direct_client.get("app.test", "/hello?x=1", &headers).await;
    upstream.requests.next("the direct request").await;
    let mut client = HttpClient::connect(proxy.addr("public")).await;
    let proxied = client.get("app.test", "/hello?x=1", &headers).await;

    // The answer: same status, end-to-end headers and body as directly; no hop-by-hop.
    assert_eq!(direct.status(), 203);
    assert!(
        direct.headers().contains_key("x-resp-hop"),
        "fixture sends hop-by-hop headers"
    );
    assert_eq!(proxied.status(), direct.status());
    assert_eq!(proxied.body(), direct.body());
    assert_eq!(
        proxied.body(),
        &Bytes::from(format!("hello from {}: GET /hello?x=1", upstream.id()))
    );
    assert_eq!(end_to_end(proxied.headers()), end_to_end(direct.headers()));
    assert_eq!(proxied.headers()["x-server"], upstream.id().as_str());
    for name in RESPONSE_HOP_BY_HOP.iter().skip(1) {
        assert!(!proxied.headers().contains_key(*name), "{name} was relayed");
    }
    let connection: Vec<_> = proxied.headers().get_all("connection").iter().collect();
    assert!(
        connection
            .iter()
            .all(|v| !v.to_str().unwrap().contains("x-resp-hop")),
        "{connection:?}"
    );

    // The request as the upstream saw it.
    let seen = upstream.requests.next("the proxied request").await;
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, "/hello?x=1");
    assert_eq!(seen.header("host"), Some("app.test"));
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("198.51.100.1, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("app.test"));
    let forwarded = seen.header("forwarded").expect("Forwarded");
    let mut params: Vec<&str> = forwarded.split(';').map(str::trim).collect();
    params.sort();
    assert_eq!(params, ["for=127.0.0.1", "host=app.test", "proto=http"]);
    assert_eq!(seen.header("x-hop"), None, "listed in Connection");
    assert_eq!(seen.header("keep-alive"), None, "hop-by-hop");
    assert!(!seen.has_token("connection", "x-hop"), "{:?}", seen.headers);
    assert_eq!(seen.header("x-kept"), Some("yes"));
}

#[tokio::test]
async fn large_post_streams_through_intact_both_ways() {
    const SIZE: usize = 10 << 20;
    const CHUNK: usize = 64 << 10;
    let mut upstream = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[upstream.addr], "/", ""), &dir).await;
    let data = Bytes::from(pattern(SIZE));
    let expected = BodyDigest {
        len: SIZE as u64,
        sha1: sha1_hex(&data),
    };

    let mut client = HttpClient::connect(proxy.addr("public")).await;
    let (chunks, body) = channel_body(4);
    let request = Request::post("/upload")
        .header("host", "app.test")
        .body(body)
        .unwrap();
    // The body is produced while the answer is already streaming back: neither side may
    // wait for the other to finish.
    let producer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < data.len() {
            let end = (sent + CHUNK).min(data.len());
            if chunks.send(data.slice(sent..end)).await.is_err() {
                break;
            }
            sent = end;
        }
        sent
    });
    let response = client.send(request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-server"], upstream.id().as_str());

    let mut body = response.into_body();
    let mut echoed = Vec::with_capacity(SIZE);
    within("the echoed body", async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("echoed body").into_data() {
                echoed.extend_from_slice(&data);
            }
        }
    })
    .await;
    assert_eq!(within("the producer", producer).await.unwrap(), SIZE);
    let at_upstream = upstream.bodies.next("the upstream's body digest").await;
    assert_eq!(at_upstream, expected, "the body the upstream received");
    assert_eq!(
        BodyDigest {
            len: echoed.len() as u64,
            sha1: sha1_hex(&echoed)
        },
        expected,
        "the body echoed back to the client"
    );
    let seen = upstream.requests.next("the request").await;
    assert_eq!(seen.method, "POST");
}

#[tokio::test]
async fn round_robin_alternates_on_one_keep_alive_connection() {
    let a = spawn_http_upstream().await;
    let b = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[a.addr, b.addr], "/", ""), &dir).await;

    let mut client = HttpClient::connect(proxy.addr("public")).await;
    let mut servers = Vec::new();
    for i in 0..10 {
        let response = client.get("app.test", &format!("/rr/{i}"), &[]).await;
        assert_eq!(response.status(), 200);
        servers.push(response.headers()["x-server"].to_str().unwrap().to_string());
    }
    let count = |id: String| servers.iter().filter(|s| **s == id).count();
    assert_eq!((count(a.id()), count(b.id())), (5, 5), "{servers:?}");
    assert!(
        servers.windows(2).all(|w| w[0] != w[1]),
        "servers do not alternate: {servers:?}"
    );
}

#[tokio::test]
async fn failed_connect_is_retried_on_the_next_server() {
    let down = closed_port().await;
    let live = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&one_route(&[down, live.addr], "/", ""), &dir).await;

    let mut client = HttpClient::connect(proxy.addr("public")).await;
    for i in 0..4 {
        let response = client.get("app.test", &format!("/retry/{i}"), &[]).await;
        assert_eq!(response.status(), 200, "request {i}: {:?}", response.body());
        assert_eq!(response.headers()["x-server"], live.id().as_str());
    }
}

#[tokio::test]
async fn strip_prefix_removes_the_route_path() {
    let mut upstream = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(
        &one_route(&[upstream.addr], "/api", "strip_prefix = true"),
        &dir,
    )
    .await;

    let mut client = HttpClient::connect(proxy.addr("public")).await;
    for (target, upstream_sees) in [("/api/users?x=1", "/users?x=1"), ("/api?y=2", "/?y=2")] {
        let response = client.get("app.test", target, &[]).await;
        assert_eq!(response.status(), 200, "{target}");
        let seen = upstream.requests.next("the stripped request").await;
        assert_eq!(seen.uri, upstream_sees, "{target}");
    }
    // Prefixes match on segment boundaries only.
    let response = client.get("app.test", "/apiary", &[]).await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn unrouted_request_is_404_naming_host_and_path() {
    let upstream = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(
        &one_route(&[upstream.addr], "/app", "host = \"app.test\""),
        &dir,
    )
    .await;

    let mut client = HttpClient::connect(proxy.addr("public")).await;
    for (host, path) in [("other.test", "/app/x"), ("app.test", "/elsewhere")] {
        let response = client.get(host, path, &[]).await;
        assert_eq!(response.status(), 404, "{host}{path}");
        let body = String::from_utf8(response.body().to_vec()).unwrap();
        assert_one_line(&body);
        assert!(body.contains(host) && body.contains(path), "{body:?}");
    }
}

#[tokio::test]
async fn host_decides_the_upstream() {
    let mut a = spawn_http_upstream().await;
    let mut b = spawn_http_upstream().await;
    let dir = TestDir::new();
    let config = format!(
        r#"
[listeners.public]
bind = "127.0.0.1:0"
{RELAXED_TIMEOUTS}
[upstreams.a]
servers = ["{}"]
[upstreams.b]
servers = ["{}"]
[routes.a]
host = "a.test"
path = "/"
upstream = "a"
[routes.b]
host = "b.test"
path = "/"
upstream = "b"
"#,
        a.addr, b.addr
    );
    let proxy = spawn_proxy(&config, &dir).await;

    let mut client = HttpClient::connect(proxy.addr("public")).await;
    for _ in 0..2 {
        for (host, upstream) in [("a.test", &mut a), ("b.test", &mut b)] {
            let response = client.get(host, "/who", &[]).await;
            assert_eq!(
                response.headers()["x-server"],
                upstream.id().as_str(),
                "{host}"
            );
            let seen = upstream.requests.next("the routed request").await;
            assert_eq!(seen.header("host"), Some(host));
        }
    }
}

#[tokio::test]
async fn half_written_request_head_is_cut_off_after_client_header() {
    let upstream = spawn_http_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&tight_timeouts(&[upstream.addr]), &dir).await;

    let mut client = RawClient::connect(proxy.addr("public")).await;
    let started = Instant::now();
    client.send(b"GET / HTTP/1.1\r\nHost: a\r\n").await;
    let (got, ended) = client.read_until_closed().await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?} (client_header is 500ms); got {:?} then {ended:?}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test]
async fn upstream_down_is_502_at_once() {
    let down = closed_port().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&tight_timeouts(&[down]), &dir).await;

    let mut client = HttpClient::connect(proxy.addr("public")).await;
    let started = Instant::now();
    let response = client.get("app.test", "/", &[]).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 502);
    assert_one_line(std::str::from_utf8(response.body()).unwrap());
    // Refused is immediate: no waiting for upstream_connect (500ms).
    assert!(elapsed < Duration::from_millis(450), "took {elapsed:?}");
}

#[tokio::test]
async fn upstream_that_never_answers_is_504_after_upstream_handshake() {
    let mut silent = spawn_silent_upstream().await;
    let dir = TestDir::new();
    let proxy = spawn_proxy(&tight_timeouts(&[silent.addr]), &dir).await;

    let mut client = HttpClient::connect(proxy.addr("public")).await;
    let started = Instant::now();
    let response = client.get("app.test", "/", &[]).await;
    let elapsed = started.elapsed();
    silent.accepted.next("the proxy's connection").await;
    assert_eq!(response.status(), 504);
    assert_one_line(std::str::from_utf8(response.body()).unwrap());
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "took {elapsed:?}, upstream_handshake is 1s"
    );
}
