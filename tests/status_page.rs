//! The admin listener's status page in a real browser (Debian's Chromium, headless): live
//! rows for WebSockets within 3 s, the close button, an upstream turning unhealthy, and a
//! screenshot under target/ (`WSGATE_SCREENSHOT_DOCS=1` also writes docs/status-page.png).
//! Plus the admin token and the status data without a browser.

#[path = "support/browser.rs"]
mod browser;
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use browser::{chromium, Browser};
use futures_util::SinkExt as _;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use support::*;

const TOKEN: &str = "0123456789abcdef-test-admin-token";

/// Admin with a token, two WebSocket routes and an HTTP upstream with health checks.
fn config(chat: SocketAddr, feed: SocketAddr, api: SocketAddr) -> String {
    format!(
        r#"[admin]
bind = "127.0.0.1:0"
token_file = "admin-token"
{RELAXED_TIMEOUTS}
[listeners.public]
bind = "127.0.0.1:0"

[upstreams.chat]
servers = ["{chat}"]
[upstreams.feed]
servers = ["{feed}"]
[upstreams.api]
servers = ["{api}"]
health = {{ path = "/healthz", interval = "200ms", timeout = "1s", unhealthy_after = 1, healthy_after = 1 }}

[routes.chat]
path = "/chat"
upstream = "chat"
[routes.feed]
path = "/feed"
upstream = "feed"
[routes.api]
path = "/api"
upstream = "api"
"#
    )
}

async fn admin(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> RawResponse {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Host", "admin")];
    if let Some(b) = &bearer {
        headers.push(("Authorization", b.as_str()));
    }
    raw_exchange(addr, &http_request(method, path, &headers)).await
}

#[tokio::test]
async fn the_admin_token_guards_everything_but_metrics_and_probes() {
    let (chat, feed, api) = (
        spawn_ws_upstream().await,
        spawn_ws_upstream().await,
        spawn_http_upstream().await,
    );
    let dir = TestDir::new();
    dir.write("admin-token", format!("{TOKEN}\n"));
    let proxy = spawn_proxy(&config(chat.addr, feed.addr, api.addr), &dir).await;
    let a = proxy.admin();
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            admin(a, "GET", path, None).await.status,
            200,
            "{path} stays open"
        );
    }
    for (method, path) in [
        ("GET", "/connections"),
        ("GET", "/status"),
        ("GET", "/events"),
        ("DELETE", "/connections/1"),
        ("POST", "/reload"),
    ] {
        for token in [None, Some("wrong-token-of-some-length")] {
            let answer = admin(a, method, path, token).await;
            assert_eq!(answer.status, 401, "{method} {path} with {token:?}");
            assert_eq!(
                answer.header("www-authenticate"),
                Some("Bearer realm=\"wsgate admin\"")
            );
            assert_one_line(&answer.body_text());
        }
    }
    // The page itself answers 401 too, with the page as its body: it asks for the token.
    let page = admin(a, "GET", "/", None).await;
    assert_eq!(page.status, 401);
    assert!(page.body_text().contains("<title>wsgate status</title>"));
    // With the token.
    let page = admin(a, "GET", "/", Some(TOKEN)).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.len() < 100 * 1024,
        "the page is {} bytes",
        page.body.len()
    );
    assert!(
        !page.body_text().contains("http://") && !page.body_text().contains("https://"),
        "no external assets"
    );
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    let status = admin(a, "GET", "/status", Some(TOKEN)).await;
    assert_eq!(status.status, 200, "{}", status.body_text());
    let status: Value = serde_json::from_str(&status.body_text()).expect("status JSON");
    assert_eq!(status["totals"]["live_websockets"], 0);
    assert_eq!(status["history"]["interval_seconds"], 10);
    let routes: Vec<&str> = status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(routes, ["api", "chat", "feed"]);
    assert_eq!(status["upstreams"][0]["name"], "api");
    assert_eq!(
        status["upstreams"][0]["servers"][0]["address"],
        api.addr.to_string()
    );
}

#[tokio::test]
async fn events_stream_the_status_and_the_ring_records_closes() {
    let (chat, feed, api) = (
        spawn_ws_upstream().await,
        spawn_ws_upstream().await,
        spawn_http_upstream().await,
    );
    let dir = TestDir::new();
    dir.write("admin-token", TOKEN);
    let proxy = spawn_proxy(&config(chat.addr, feed.addr, api.addr), &dir).await;
    let (mut ws, _) = ws_connect(format!("ws://{}/chat", proxy.addr("public"))).await;
    ws.send(Message::text("hi")).await.unwrap();
    next_data(&mut ws).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    next_close(&mut ws).await;

    let mut client = RawClient::connect(proxy.admin()).await;
    let bearer = format!("Bearer {TOKEN}");
    client
        .send(&http_request(
            "GET",
            "/events",
            &[("Host", "admin"), ("Authorization", &bearer)],
        ))
        .await;
    let head = client.read_head_only().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    // Two events, 2 s apart; the close shows in the ring once the tunnel has ended.
    let started = Instant::now();
    let mut last = Value::Null;
    for _ in 0..2 {
        let text = client.read_until(b"\n\n").await;
        let data = text
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .expect("a data line");
        assert!(text.contains("event: status"), "{text}");
        last = serde_json::from_str(data).expect("event JSON");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let closes = last["closes"].as_array().expect("closes");
    assert_eq!(closes.len(), 1, "{last}");
    assert_eq!(closes[0]["route"], "chat");
    assert_eq!(closes[0]["closed_by"], "client");
    assert_eq!(closes[0]["code"], 1000);
    // Peers' reasons are not kept (the tunnel stores wsgate's own reasons only).
    assert_eq!(closes[0]["reason"], "");
    assert_eq!(last["totals"]["handshakes"], 1);
}

#[tokio::test]
async fn the_status_page_shows_closes_and_follows_live_connections_in_chromium() {
    let Some(binary) =
        chromium("the_status_page_shows_closes_and_follows_live_connections_in_chromium")
    else {
        return;
    };
    let (chat, feed, api) = (
        spawn_ws_upstream().await,
        spawn_ws_upstream().await,
        spawn_http_upstream().await,
    );
    let api_addr = api.addr;
    let dir = TestDir::new();
    dir.write("admin-token", TOKEN);
    let proxy = spawn_proxy(&config(chat.addr, feed.addr, api.addr), &dir).await;
    let profile = TestDir::new();
    let mut browser = Browser::launch(&binary, profile.path()).await;

    // The page keeps its token in the tab's session storage; put it there as an operator
    // would by answering the page's prompt once.
    let admin_url = format!("http://127.0.0.1:{}", proxy.admin().port());
    browser.open(&format!("{admin_url}/healthz")).await;
    browser.viewport(1400, 1100).await;
    let store = format!(
        "(() => {{ try {{ if (!location.href.endsWith('/healthz')) return false; \
         sessionStorage.setItem('wsgate-admin-token', '{TOKEN}'); return true; }} \
         catch (e) {{ return false; }} }})()"
    );
    browser.wait_for("the token stored", &store, LIMIT).await;
    browser.navigate(&format!("{admin_url}/")).await;
    browser
        .wait_for(
            "the page is live",
            "document.getElementById('state')?.textContent === 'live'",
            LIMIT,
        )
        .await;

    // Two WebSockets through wsgate: both rows appear within 3 s.
    let public = proxy.addr("public");
    let (mut chat_ws, _) = ws_connect(format!("ws://{public}/chat")).await;
    let (mut feed_ws, _) = ws_connect(format!("ws://{public}/feed")).await;
    for ws in [&mut chat_ws, &mut feed_ws] {
        ws.send(Message::text("hello")).await.unwrap();
        next_data(ws).await;
    }
    let opened = Instant::now();
    let rows = "['chat','feed'].every(r => document.querySelector(`#conns tbody tr[data-route=\"${r}\"]`))";
    browser
        .wait_for("both rows", rows, Duration::from_secs(3))
        .await;
    assert!(
        opened.elapsed() < Duration::from_secs(3),
        "rows after {:?}",
        opened.elapsed()
    );

    // The upstream with health checks answers: healthy.
    let server_row = format!("document.querySelector('#servers tr[data-server=\"{api_addr}\"] td:nth-child(3)')?.textContent");
    browser
        .wait_for("api healthy", &format!("{server_row} === 'healthy'"), LIMIT)
        .await;

    // Close the chat connection from the page: its client gets 1001, its row leaves.
    browser
        .eval("document.querySelector('#conns tbody tr[data-route=\"chat\"] button.close').click(); true")
        .await;
    let close = next_close(&mut chat_ws).await.expect("a close frame");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1001, "closed by operator")
    );
    browser
        .wait_for(
            "the chat row leaves",
            "!document.querySelector('#conns tbody tr[data-route=\"chat\"]') && !!document.querySelector('#conns tbody tr[data-route=\"feed\"]')",
            Duration::from_secs(5),
        )
        .await;
    browser
        .wait_for(
            "the close in recent closes",
            "[...document.querySelectorAll('#closes tbody tr')].some(r => r.textContent.includes('closed by operator'))",
            Duration::from_secs(5),
        )
        .await;

    // Stop the health-checked upstream: it turns unhealthy on the page.
    drop(api);
    browser
        .wait_for(
            "api unhealthy",
            &format!("{server_row} === 'unhealthy'"),
            LIMIT,
        )
        .await;

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).expect("target/");
    std::fs::write(target.join("status-page.png"), &png).expect("write the screenshot");
    if std::env::var_os("WSGATE_SCREENSHOT_DOCS").is_some() {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
        std::fs::write(docs, &png).expect("write docs/status-page.png");
    }
    let _ = json!(null);
    drop(feed_ws);
}
