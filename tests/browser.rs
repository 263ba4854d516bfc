//! A real browser: Debian's Chromium, headless, driven over the DevTools protocol, loads a
//! page from wsgate over `https://` and opens `wss://` on the same origin. On a listener
//! with `http2 = true` the page comes over HTTP/2 and its WebSocket rides the same
//! connection (RFC 8441): wsgate's `/connections` says `http_version: "2"`. On a listener
//! without it, the same page uses HTTP/1.1 and an ordinary upgrade.
//!
//! `.ci/run` installs Chromium with apt-get; where it is missing the test says so and
//! skips.

#[path = "support/jwt.rs"]
mod jwt;
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

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

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

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

/// A headless Chromium and a DevTools session on one of its pages.
struct Browser {
    _child: Child,
    devtools: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: Option<String>,
    next_id: u64,
}

impl Browser {
    async fn launch(binary: &Path, profile: &Path) -> Browser {
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--ignore-certificate-errors",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let url = within("Chromium's DevTools address", async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_string();
                }
            }
            panic!("Chromium exited without a DevTools address");
        })
        .await;
        // Keep draining Chromium's log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (devtools, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap_or_else(|e| panic!("DevTools at {url}: {e}"));
        Browser {
            _child: child,
            devtools,
            session: None,
            next_id: 0,
        }
    }

    /// Sends one DevTools command and returns its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        self.devtools
            .send(Message::text(message.to_string()))
            .await
            .expect("DevTools send");
        within(method, async {
            while let Some(Ok(message)) = self.devtools.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).expect("DevTools JSON");
                if value["id"] == json!(id) {
                    if let Some(error) = value.get("error") {
                        panic!("{method}: {error}");
                    }
                    return value["result"].clone();
                }
            }
            panic!("DevTools connection ended during {method}");
        })
        .await
    }

    /// Opens `url` in a new page and attaches to it.
    async fn open(&mut self, url: &str) {
        let target = self
            .call("Target.createTarget", json!({ "url": url }))
            .await;
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        self.session = attached["sessionId"].as_str().map(str::to_owned);
    }

    async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// Waits until the page's title starts with `prefix`; returns it.
    async fn title(&mut self, prefix: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let result = self
                .call(
                    "Runtime.evaluate",
                    json!({ "expression": "document.title", "returnByValue": true }),
                )
                .await;
            let title = result["result"]["value"].as_str().unwrap_or("").to_string();
            if title.starts_with(prefix) {
                return title;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page's title is still {title:?}"
            );
            // Polling the page: there is no event for "the title changed" worth wiring up.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
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

#[tokio::test]
async fn chromium_opens_its_websocket_over_http2_and_over_http1() {
    let Some(binary) = chromium() else {
        eprintln!(
            "SKIPPED chromium_opens_its_websocket_over_http2_and_over_http1: no Chromium at \
             /usr/bin/chromium (install Debian's chromium package; .ci/run does)"
        );
        return;
    };
    let ws = spawn_ws_upstream().await;
    let (page, _page_server) = spawn_page_server().await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.issue(&["localhost"]).write(&dir, "site");
    let toml = format!(
        "[listeners.h2]\nbind = \"127.0.0.1:0\"\nhttp2 = true\n\
         tls = {{ cert = \"site.crt\", key = \"site.key\" }}\n\n\
         [listeners.h1]\nbind = \"127.0.0.1:0\"\n\
         tls = {{ cert = \"site.crt\", key = \"site.key\" }}\n\n\
         [upstreams.echo]\nservers = [\"{}\"]\n\n\
         [upstreams.pages]\nservers = [\"{page}\"]\n\n\
         [routes.ws]\npath = \"/ws\"\nupstream = \"echo\"\n\n\
         [routes.pages]\npath = \"/\"\nupstream = \"pages\"\n",
        ws.addr
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
    let Some(binary) = chromium() else {
        eprintln!(
            "SKIPPED chromium_authenticates_with_its_token_as_the_subprotocol: no Chromium at \
             /usr/bin/chromium (install Debian's chromium package; .ci/run does)"
        );
        return;
    };
    let ws = spawn_ws_upstream().await;
    let (page, _page_server) = spawn_page_server().await;
    let dir = TestDir::new();
    let ca = TestCa::new();
    ca.issue(&["localhost"]).write(&dir, "site");
    let key = jwt::Signer::ec("browser");
    dir.write("jwks.json", jwt::jwks(&[&key]));
    let toml = format!(
        "[listeners.h2]\nbind = \"127.0.0.1:0\"\nhttp2 = true\n\
         tls = {{ cert = \"site.crt\", key = \"site.key\" }}\n\n\
         [listeners.h1]\nbind = \"127.0.0.1:0\"\n\
         tls = {{ cert = \"site.crt\", key = \"site.key\" }}\n\n\
         [upstreams.echo]\nservers = [\"{}\"]\n\n\
         [upstreams.pages]\nservers = [\"{page}\"]\n\n\
         [routes.ws]\npath = \"/ws-auth\"\nupstream = \"echo\"\n\
         [routes.ws.auth]\njwt = {{ jwks = \"jwks.json\", from = [\"protocol\"] }}\n\n\
         [routes.pages]\npath = \"/\"\nupstream = \"pages\"\n",
        ws.addr
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
