//! A real browser: Debian's Chromium, headless, driven over the DevTools protocol, loads a
//! page from wsgate over `https://` and opens `wss://` on the same origin. On a listener
//! with `http2 = true` the page comes over HTTP/2 and its WebSocket rides the same
//! connection (RFC 8441): wsgate's `/connections` says `http_version: "2"`. On a listener
//! without it, the same page uses HTTP/1.1 and an ordinary upgrade.
//!
//! `.ci/run` installs Chromium with apt-get; where it is missing the test says so and
//! skips.

#[path = "support/browser.rs"]
mod browser;
#[path = "support/jwt.rs"]
mod jwt;
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use browser::{chromium, Browser};
use support::{spawn_proxy, spawn_ws_upstream, within, AbortOnDrop, Proxy, TestCa, TestDir};

/// The page: opens a WebSocket to `/ws` on its own origin, sends one message and shows the
/// echo in its title; the socket stays open.
const PAGE: &str = r#"<!doctype html>
<html><head><title>loading</title></head><body>
<script>
// With ?token=JWT the page authenticates the browser way: the token as its subprotocol.
const token = new URLSearchParams(location.search).get("token");
const ws = token
  ? new WebSocket(`wss://${location.host}/ws-auth`, [token])
  : new WebSocket(`wss://${location.host}/ws`);
ws.onopen = () => ws.send(token ? "hello with a token" : "hello from the page");
ws.onmessage = (e) => { document.title = "echo: " + e.data + (ws.protocol === token ? " (protocol ok)" : ""); };
ws.onerror = () => { document.title = "error"; };
ws.onclose = (e) => { document.title = "closed " + e.code; };
</script>
</body></html>
"#;

/// An HTTP/1.1 server answering every request with the page.
async fn spawn_page_server() -> (SocketAddr, AbortOnDrop) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_req| async {
                let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/html; charset=utf-8"),
                );
                *response.status_mut() = StatusCode::OK;
                Ok::<_, Infallible>(response)
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, AbortOnDrop(task))
}

async fn connections(proxy: &Proxy) -> Value {
    let request = support::http_request("GET", "/connections", &[("Host", "admin")]);
    let body = support::raw_exchange(proxy.admin(), &request)
        .await
        .body_text();
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Waits until `/connections` lists a WebSocket on `listener`; returns it.
async fn connection_on(proxy: &Proxy, listener: &str) -> Value {
    within("the page's WebSocket in /connections", async {
        loop {
            let list = connections(proxy).await;
            if let Some(c) = list
                .as_array()
                .and_then(|a| a.iter().find(|c| c["listener"] == listener))
            {
                return c.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Listeners `h2` (with `http2`) and `h1` over TLS with `site.crt`, the page server on
/// `/`, and `ws_route`, a route to the echo upstream.
fn site_config(echo: SocketAddr, page: SocketAddr, ws_route: &str) -> String {
    format!(
        "[listeners.h2]\nbind = \"127.0.0.1:0\"\nhttp2 = true\n\
         tls = {{ cert = \"site.crt\", key = \"site.key\" }}\n\n\
         [listeners.h1]\nbind = \"127.0.0.1:0\"\n\
         tls = {{ cert = \"site.crt\", key = \"site.key\" }}\n\n\
         [upstreams.echo]\nservers = [\"{echo}\"]\n\n\
         [upstreams.pages]\nservers = [\"{page}\"]\n\n\
         {ws_route}\n\
         [routes.pages]\npath = \"/\"\nupstream = \"pages\"\n"
    )
}

#[tokio::test]
async fn chromium_opens_its_websocket_over_http2_and_over_http1() {
    let Some(binary) = chromium("chromium_opens_its_websocket_over_http2_and_over_http1") else {
        return;
    };
    let ws = spawn_ws_upstream().await;
    let (page, _page_server) = spawn_page_server().await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.issue(&["localhost"]).write(&dir, "site");
    let toml = site_config(
        ws.addr,
        page,
        "[routes.ws]\npath = \"/ws\"\nupstream = \"echo\"\n",
    );
    let proxy = spawn_proxy(&toml, &dir).await;
    let profile = TestDir::new();
    let mut browser = Browser::launch(&binary, profile.path()).await;

    let h2 = format!("https://localhost:{}/", proxy.addr("h2").port());
    browser.open(&h2).await;
    assert_eq!(browser.title("echo: ").await, "echo: hello from the page");
    let conn = connection_on(&proxy, "h2").await;
    assert_eq!(conn["http_version"], "2", "{conn}");
    assert_eq!(conn["route"], "ws", "{conn}");

    // The same page from the HTTP/1.1-only listener.
    let h1 = format!("https://localhost:{}/", proxy.addr("h1").port());
    browser.navigate(&h1).await;
    let conn = connection_on(&proxy, "h1").await;
    assert_eq!(conn["http_version"], "1.1", "{conn}");
    assert_eq!(browser.title("echo: ").await, "echo: hello from the page");
}

#[tokio::test]
async fn chromium_authenticates_with_its_token_as_the_subprotocol() {
    let Some(binary) = chromium("chromium_authenticates_with_its_token_as_the_subprotocol") else {
        return;
    };
    let ws = spawn_ws_upstream().await;
    let (page, _page_server) = spawn_page_server().await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.issue(&["localhost"]).write(&dir, "site");
    let key = jwt::Signer::ec("browser");
    dir.write("jwks.json", jwt::jwks(&[&key]));
    let toml = site_config(
        ws.addr,
        page,
        "[routes.ws]\npath = \"/ws-auth\"\nupstream = \"echo\"\n\
         [routes.ws.auth]\njwt = { jwks = \"jwks.json\", from = [\"protocol\"] }\n",
    );
    let proxy = spawn_proxy(&toml, &dir).await;
    let profile = TestDir::new();
    let mut browser = Browser::launch(&binary, profile.path()).await;
    let token = key.sign(&json!({"sub": "browser", "exp": jwt::now() + 600}));

    for listener in ["h2", "h1"] {
        let url = format!(
            "https://localhost:{}/?token={token}",
            proxy.addr(listener).port()
        );
        if listener == "h2" {
            browser.open(&url).await;
        } else {
            browser.navigate(&url).await;
        }
        assert_eq!(
            browser.title("echo: ").await,
            "echo: hello with a token (protocol ok)",
            "over {listener}"
        );
        let conn = connection_on(&proxy, listener).await;
        assert_eq!(conn["route"], "ws", "{conn}");
        assert_eq!(
            conn["subprotocol"],
            Value::Null,
            "the token is never shown: {conn}"
        );
    }
}
