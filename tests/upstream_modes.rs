//! Upstream options beyond plain round robin: TLS to the upstream (wss and https behind the
//! proxy), least_conn, and consistent hashing by client address or by a header.

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message;

use support::certs::{TestCa, TestCert};
use support::clients::HttpClient;
use support::upstreams::{spawn_http_upstream, spawn_ws_upstream};
use support::{spawn_proxy, within, AbortOnDrop, TestDir};

/// A WebSocket echo server behind TLS, presenting `cert`.
async fn spawn_tls_ws_upstream(cert: &TestCert) -> (std::net::SocketAddr, AbortOnDrop) {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("test cert parses");
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("test key parses");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, AbortOnDrop(task))
}

#[tokio::test]
async fn websocket_reaches_a_tls_upstream_verified_by_its_ca() {
    let dir = TestDir::new();
    let ca = TestCa::new();
    let cert = ca.issue(&["app.internal"]);
    dir.write("upstream-ca.pem", ca_pem(&ca));
    let (upstream, _task) = spawn_tls_ws_upstream(&cert).await;
    let proxy = spawn_proxy(
        &format!(
            r#"
[listeners.public]
bind = "127.0.0.1:0"
[upstreams.app]
servers = ["{upstream}"]
tls = {{ ca = "upstream-ca.pem", server_name = "app.internal" }}
[routes.app]
path = "/"
upstream = "app"
"#
        ),
        &dir,
    )
    .await;
    let url = format!("ws://{}/ws", proxy.addr("public"));
    let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(url))
        .await
        .expect("upgrade through the proxy to the TLS upstream");
    ws.send(Message::text("over tls")).await.expect("send");
    let echoed = within("echo", ws.next())
        .await
        .expect("a frame")
        .expect("ok");
    assert_eq!(echoed, Message::text("over tls"));
}

#[tokio::test]
async fn tls_upstream_with_an_untrusted_certificate_is_502() {
    let dir = TestDir::new();
    let trusted = TestCa::new();
    let other = TestCa::new();
    dir.write("upstream-ca.pem", ca_pem(&trusted));
    let (upstream, _task) = spawn_tls_ws_upstream(&other.issue(&["app.internal"])).await;
    let proxy = spawn_proxy(
        &format!(
            r#"
[listeners.public]
bind = "127.0.0.1:0"
[upstreams.app]
servers = ["{upstream}"]
tls = {{ ca = "upstream-ca.pem", server_name = "app.internal" }}
[routes.app]
path = "/"
upstream = "app"
"#
        ),
        &dir,
    )
    .await;
    let url = format!("ws://{}/ws", proxy.addr("public"));
    let err = within("connect", tokio_tungstenite::connect_async(url))
        .await
        .expect_err("an untrusted upstream must not be used");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 502);
        }
        other => panic!("expected an HTTP 502, got {other:?}"),
    }
}

fn ca_pem(ca: &TestCa) -> String {
    ca.ca_pem()
}

/// Listener `public` and route `/` to upstream `app`: servers `a` and `b`, balanced by
/// `balance`.
fn two_servers(a: std::net::SocketAddr, b: std::net::SocketAddr, balance: &str) -> String {
    format!(
        r#"
[listeners.public]
bind = "127.0.0.1:0"
[upstreams.app]
servers = ["{a}", "{b}"]
balance = "{balance}"
[routes.app]
path = "/"
upstream = "app"
"#
    )
}

#[tokio::test]
async fn least_conn_sends_new_connections_to_the_idler_server() {
    let dir = TestDir::new();
    let a = spawn_ws_upstream().await;
    let b = spawn_ws_upstream().await;
    let proxy = spawn_proxy(&two_servers(a.addr, b.addr, "least_conn"), &dir).await;
    let url = format!("ws://{}/ws", proxy.addr("public"));
    // Hold four connections open: least_conn spreads them two and two.
    let mut held = Vec::new();
    for _ in 0..4 {
        let (ws, _) = within("connect", tokio_tungstenite::connect_async(url.clone()))
            .await
            .expect("upgrade");
        held.push(ws);
    }
    assert_eq!((a.connections(), b.connections()), (2, 2));
}

#[tokio::test]
async fn ip_hash_and_header_hash_keep_a_client_on_one_server() {
    let dir = TestDir::new();
    let servers = [
        spawn_http_upstream().await,
        spawn_http_upstream().await,
        spawn_http_upstream().await,
    ];
    let list = servers
        .iter()
        .map(|s| format!("\"{}\"", s.addr))
        .collect::<Vec<_>>()
        .join(", ");
    let proxy = spawn_proxy(
        &format!(
            r#"
[listeners.public]
bind = "127.0.0.1:0"
[upstreams.by_ip]
servers = [{list}]
balance = "ip_hash"
[upstreams.by_user]
servers = [{list}]
balance = "header:X-User"
[routes.by_ip]
path = "/ip"
upstream = "by_ip"
[routes.by_user]
path = "/user"
upstream = "by_user"
"#
        ),
        &dir,
    )
    .await;
    let mut client = HttpClient::connect(proxy.addr("public")).await;

    let mut seen = HashMap::new();
    for _ in 0..6 {
        let response = client.get("a.test", "/ip", &[]).await;
        let server = response.headers()["x-server"].to_str().unwrap().to_owned();
        *seen.entry(server).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 1, "one client address, one server: {seen:?}");

    let mut per_user: HashMap<String, String> = HashMap::new();
    let mut servers_used = std::collections::HashSet::new();
    for round in 0..3 {
        for user in 0..12 {
            let name = format!("user-{user}");
            let response = client
                .get("a.test", "/user", &[("x-user", name.as_str())])
                .await;
            let server = response.headers()["x-server"].to_str().unwrap().to_owned();
            servers_used.insert(server.clone());
            match per_user.get(&name) {
                Some(first) => assert_eq!(first, &server, "{name} moved in round {round}"),
                None => {
                    per_user.insert(name, server);
                }
            }
        }
    }
    assert!(
        servers_used.len() > 1,
        "twelve users should not all hash to one of three servers"
    );
}

/// Polls the admin `/metrics` until `line` appears (as a whole line), within the usual bound.
async fn wait_for_metric(admin: std::net::SocketAddr, line: &str) {
    within(&format!("metrics to show {line}"), async {
        loop {
            let mut client = HttpClient::connect(admin).await;
            let response = client.get("admin", "/metrics", &[]).await;
            let text = String::from_utf8_lossy(response.body()).into_owned();
            if text.lines().any(|l| l == line) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn health_checks_take_a_failing_server_out_and_none_left_is_503() {
    let dir = TestDir::new();
    let good = spawn_http_upstream().await;
    let sick = support::upstreams::spawn_raw_upstream(support::upstreams::answer_status(
        "500 Internal Server Error",
        &[],
        "sick",
    ))
    .await;
    let health = r#"health = { path = "/healthz", interval = "50ms", timeout = "1s", unhealthy_after = 2, healthy_after = 1 }"#;
    let proxy = spawn_proxy(
        &format!(
            r#"
[listeners.public]
bind = "127.0.0.1:0"
[upstreams.mixed]
servers = ["{good}", "{sick}"]
{health}
[upstreams.only_sick]
servers = ["{sick}"]
{health}
[routes.mixed]
path = "/mixed"
upstream = "mixed"
[routes.only_sick]
path = "/sick"
upstream = "only_sick"
"#,
            good = good.addr,
            sick = sick.addr,
        ),
        &dir,
    )
    .await;
    let sick_label = sick.addr.to_string();
    wait_for_metric(
        proxy.admin(),
        &format!("wsgate_upstream_healthy{{server=\"{sick_label}\",upstream=\"mixed\"}} 0"),
    )
    .await;
    wait_for_metric(
        proxy.admin(),
        &format!("wsgate_upstream_healthy{{server=\"{sick_label}\",upstream=\"only_sick\"}} 0"),
    )
    .await;
    wait_for_metric(
        proxy.admin(),
        &format!(
            "wsgate_upstream_healthy{{server=\"{}\",upstream=\"mixed\"}} 1",
            good.addr
        ),
    )
    .await;

    let mut client = HttpClient::connect(proxy.addr("public")).await;
    for _ in 0..6 {
        let response = client.get("a.test", "/mixed", &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-server"].to_str().unwrap(), good.id());
    }
    let response = client.get("a.test", "/sick", &[]).await;
    assert_eq!(response.status(), 503);
    let body = String::from_utf8_lossy(response.body()).into_owned();
    assert!(body.contains("no healthy server"), "{body}");
}

#[tokio::test]
async fn cookie_balancing_sticks_to_the_server_that_set_the_cookie() {
    use support::upstreams::{answer_status, spawn_raw_upstream};
    let dir = TestDir::new();
    let mut a = spawn_raw_upstream(answer_status(
        "200 OK",
        &[
            ("Set-Cookie", "io=sess-a; Path=/"),
            ("x-server", "a"),
            ("Connection", "close"),
        ],
        "a",
    ))
    .await;
    let mut b = spawn_raw_upstream(answer_status(
        "200 OK",
        &[
            ("Set-Cookie", "io=sess-b; Path=/"),
            ("x-server", "b"),
            ("Connection", "close"),
        ],
        "b",
    ))
    .await;
    let proxy = spawn_proxy(&two_servers(a.addr, b.addr, "cookie:io"), &dir).await;
    let mut client = HttpClient::connect(proxy.addr("public")).await;
    let first = client.get("a.test", "/", &[]).await;
    let server = first.headers()["x-server"].to_str().unwrap().to_owned();
    let set_cookie = first.headers()["set-cookie"].to_str().unwrap().to_owned();
    let value = set_cookie
        .strip_prefix("io=")
        .and_then(|rest| rest.split(';').next())
        .expect("the sticky cookie")
        .to_owned();
    let (id, app_value) = value.split_once('~').expect("a server id prefix");
    assert_eq!(app_value, format!("sess-{server}"));
    assert_eq!(id.len(), 8, "{value}");

    let cookie = format!("io={value}; theme=dark");
    for _ in 0..6 {
        let response = client
            .get("a.test", "/", &[("cookie", cookie.as_str())])
            .await;
        assert_eq!(response.headers()["x-server"].to_str().unwrap(), server);
    }
    // The chosen server saw its own value, without wsgate's prefix.
    let chosen = if server == "a" { &mut a } else { &mut b };
    let _first_request = chosen.heads.next("the first request").await;
    let sticky = chosen.heads.next("a sticky request").await;
    assert_eq!(
        sticky.header("cookie"),
        Some(format!("io=sess-{server}; theme=dark").as_str())
    );
}

#[tokio::test]
async fn a_cookie_set_elsewhere_is_hashed_to_one_server() {
    use support::upstreams::{answer_status, spawn_raw_upstream};
    let dir = TestDir::new();
    let answer = |id: &'static str| {
        answer_status("200 OK", &[("x-server", id), ("Connection", "close")], id)
    };
    let mut a = spawn_raw_upstream(answer("a")).await;
    let mut b = spawn_raw_upstream(answer("b")).await;
    let proxy = spawn_proxy(&two_servers(a.addr, b.addr, "cookie:io"), &dir).await;
    let mut client = HttpClient::connect(proxy.addr("public")).await;
    // Values no server of this pool prefixed (another proxy's, or a plain session id): each
    // value keeps one server, and the values spread over both.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..16 {
        let cookie = format!("io=session-{i}; theme=dark");
        let mut servers = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let response = client
                .get("a.test", "/", &[("cookie", cookie.as_str())])
                .await;
            servers.insert(response.headers()["x-server"].to_str().unwrap().to_owned());
        }
        assert_eq!(servers.len(), 1, "{cookie} went to {servers:?}");
        seen.extend(servers);
    }
    assert_eq!(seen.len(), 2, "16 values all hashed to {seen:?}");
    // The application's value reached the server unchanged, even with a '~' in it.
    let response = client
        .get("a.test", "/", &[("cookie", "io=abcd1234~not-ours")])
        .await;
    let server = response.headers()["x-server"].to_str().unwrap().to_owned();
    let upstream = if server == "a" { &mut a } else { &mut b };
    let head = loop {
        let head = upstream
            .heads
            .next("the request with a foreign prefix")
            .await;
        if head.header("cookie") == Some("io=abcd1234~not-ours") {
            break head;
        }
    };
    assert_eq!(head.header("cookie"), Some("io=abcd1234~not-ours"));
}

#[tokio::test]
async fn max_pending_handshakes_queues_handshakes_then_answers_503() {
    // An app that accepts connections but never answers: two handshakes hold the two
    // places, the third waits its turn and gets 503 with Retry-After after
    // upstream_handshake; the app never sees more than two connections.
    let mut silent = support::upstreams::spawn_silent_upstream().await;
    let dir = TestDir::new();
    let toml = format!(
        "[timeouts]\nupstream_handshake = \"1s\"\n\n\
         [listeners.public]\nbind = \"127.0.0.1:0\"\n\n\
         [upstreams.app]\nservers = [\"{}\"]\nmax_pending_handshakes = 2\n\n\
         [routes.app]\nupstream = \"app\"\n",
        silent.addr
    );
    let proxy = spawn_proxy(&toml, &dir).await;
    let addr = proxy.addr("public");
    let request = support::http_request("GET", "/", &support::ws_headers("app.test"));
    let started = std::time::Instant::now();
    let exchanges: Vec<_> = (0..3)
        .map(|_| {
            let request = request.clone();
            tokio::spawn(async move { support::raw_exchange(addr, &request).await })
        })
        .collect();
    for _ in 0..2 {
        silent.accepted.next("a handshake reaching the app").await;
    }
    let mut statuses = Vec::new();
    for exchange in exchanges {
        let answer = exchange.await.expect("the exchange task");
        if answer.status == 503 {
            assert_eq!(answer.header("retry-after"), Some("1"));
            assert!(
                answer
                    .body_text()
                    .contains("has 2 WebSocket handshakes in progress (max_pending_handshakes)"),
                "{}",
                answer.body_text()
            );
        }
        statuses.push(answer.status);
    }
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [503, 504, 504],
        "two timed out at the app, one in the queue"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        silent.accepted.try_next().is_none(),
        "the app saw a third connection"
    );
}

#[tokio::test]
async fn queued_handshakes_all_get_through_one_at_a_time() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let toml = format!(
        "{}\n[listeners.public]\nbind = \"127.0.0.1:0\"\n\n\
         [upstreams.app]\nservers = [\"{}\"]\nmax_pending_handshakes = 1\n\n\
         [routes.app]\nupstream = \"app\"\n",
        support::RELAXED_TIMEOUTS,
        upstream.addr
    );
    let proxy = spawn_proxy(&toml, &dir).await;
    let url = format!("ws://{}/", proxy.addr("public"));
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let (mut ws, _) = support::ws_connect(url).await;
                let echoed =
                    support::echo_transcript(&mut ws, &[Message::text(format!("client {i}"))])
                        .await;
                assert_eq!(echoed, [Message::text(format!("client {i}"))]);
            })
        })
        .collect();
    for client in clients {
        within("a queued client", client)
            .await
            .expect("the client task");
    }
    assert_eq!(upstream.connections(), 20);
}
