//! Debian's Chromium, headless, driven over the DevTools protocol with tokio-tungstenite:
//! open pages, evaluate JavaScript, read the title, take screenshots. `.ci/run` installs
//! Chromium; suites skip, saying why, where it is missing.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::within;

/// The Chromium binary, if installed; otherwise says that `test` is skipped and why.
pub fn chromium(test: &str) -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        eprintln!(
            "SKIPPED {test}: no Chromium at /usr/bin/chromium \
             (install Debian's chromium package; .ci/run does)"
        );
    }
    found
}

/// A headless Chromium and a DevTools session on one of its pages.
pub struct Browser {
    _child: Child,
    devtools: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: Option<String>,
    next_id: u64,
}

impl Browser {
    pub async fn launch(binary: &Path, profile: &Path) -> Browser {
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
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
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
    pub async fn open(&mut self, url: &str) {
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

    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// Waits until the page's title starts with `prefix`; returns it.
    pub async fn title(&mut self, prefix: &str) -> String {
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

impl Browser {
    /// Evaluates `expression` in the page and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(e) = result.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        result["result"]["value"].clone()
    }

    /// Waits (up to `limit`) until `expression` is true in the page.
    pub async fn wait_for(&mut self, what: &str, expression: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.eval(expression).await == json!(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {limit:?}"
            );
            // Polling the page: there is no event for "the DOM now shows X".
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the page at its current size.
    pub async fn screenshot(&mut self) -> Vec<u8> {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let data = shot["data"].as_str().expect("screenshot data");
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("screenshot base64")
    }

    /// Lays the page out at `width` x `height` CSS pixels.
    pub async fn viewport(&mut self, width: u32, height: u32) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
    }
}
