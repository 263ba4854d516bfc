//! Builder fixtures shared by the integration suites: a proxy spawned from a TOML text
//! ([`spawn_proxy`]), upstreams that record what they saw ([`upstreams`]), raw and
//! WebSocket clients ([`clients`]) and a throw-away certificate authority ([`certs`]).
//!
//! Everything listens on `127.0.0.1:0`. Nothing sleeps to synchronise: tests await events
//! (recorded requests, close frames, accepted connections), and every such wait is bounded
//! by [`LIMIT`] through [`within`], so a broken proxy fails a test with a message naming
//! what never happened instead of hanging the suite.
//!
//! Set `WSGATE_TEST_LOG` (an EnvFilter string such as `wsgate=debug`) to see the proxy's logs.

// Each suite compiles this module on its own and uses a different subset of the fixtures.
#![allow(dead_code)]

pub mod certs;
pub mod clients;
pub mod upstreams;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

// Re-exported so suites can `use support::*`; not every suite uses every group.
#[allow(unused_imports)]
pub use certs::*;
#[allow(unused_imports)]
pub use clients::*;
#[allow(unused_imports)]
pub use upstreams::*;

/// Upper bound for any single wait in a test. Generous on purpose: it only turns a hang
/// into a failure, it never decides a pass (timing assertions measure elapsed time instead).
pub const LIMIT: Duration = Duration::from_secs(10);

/// Timeouts for tests that are not about timeouts: loose enough that a loaded CI machine
/// never trips them, so only the scenario under test decides the outcome.
pub const RELAXED_TIMEOUTS: &str = r#"
[timeouts]
upstream_connect = "2s"
upstream_handshake = "5s"
client_header = "5s"
"#;

/// Awaits `fut`, failing the test with `what` if it takes longer than [`LIMIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {LIMIT:?} waiting for {what}"),
    }
}

/// A folder for one test's config file and PEM files; removed when dropped.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        TestDir {
            dir: tempfile::Builder::new()
                .prefix("wsgate-test-")
                .tempdir()
                .expect("cannot create a temporary folder"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `contents` to `name` inside the folder and returns the file's path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

/// A running proxy. Shut down when dropped; [`Proxy::shutdown`] also waits for it to stop.
pub struct Proxy {
    addrs: Vec<(String, SocketAddr)>,
    admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Writes `toml` to `proxy.toml` in `dir` (so relative certificate paths resolve against
/// `dir`), loads it, binds every listener and runs the proxy in the background. Without an
/// `[admin]` table the admin listener takes an ephemeral port, so proxies run in parallel.
pub async fn spawn_proxy(toml: &str, dir: &TestDir) -> Proxy {
    init_logging();
    let with_admin;
    let toml = if toml.contains("[admin]") {
        toml
    } else {
        with_admin = format!("[admin]\nbind = \"127.0.0.1:0\"\n\n{toml}");
        with_admin.as_str()
    };
    let path = dir.write("proxy.toml", toml);
    let config = wsgate::config::Config::from_toml(toml, &path).unwrap_or_else(|e| {
        panic!("the test config was rejected:\n{e}\n--- proxy.toml ---\n{toml}")
    });
    let names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
    let server = wsgate::Wsgate::bind(config)
        .await
        .unwrap_or_else(|e| panic!("the proxy cannot bind: {e:#}"));
    let addrs = names
        .into_iter()
        .map(|name| {
            let addr = server
                .listener_addr(&name)
                .unwrap_or_else(|| panic!("listener {name} has no address"));
            (name, addr)
        })
        .collect();
    let admin = server
        .admin_addr()
        .unwrap_or_else(|| panic!("the admin listener has no address"));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Proxy {
        addrs,
        admin,
        stop: Some(stop),
        task: Some(task),
    }
}

impl Proxy {
    /// The admin listener's address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The bound address of listener `name` (`[listeners.NAME]`).
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("the proxy has no listener named {name}"))
    }

    /// Fires the shutdown future and waits (at most [`LIMIT`]) for `run` to return.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("shutdown runs once");
        within("the proxy to shut down", task)
            .await
            .expect("the proxy task panicked")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Installs a tracing subscriber once per test binary when `WSGATE_TEST_LOG` is set.
fn init_logging() {
    if let Ok(filter) = std::env::var("WSGATE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// The receiving end of what a fixture recorded (requests, close frames, connections).
pub struct Recorder<T> {
    rx: mpsc::UnboundedReceiver<T>,
}

/// A recording channel: fixtures keep the sender, tests await the [`Recorder`].
pub fn recorder<T>() -> (mpsc::UnboundedSender<T>, Recorder<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Recorder { rx })
}

impl<T> Recorder<T> {
    /// The next recorded item, waiting at most [`LIMIT`]; `what` names it in the failure.
    pub async fn next(&mut self, what: &str) -> T {
        within(what, self.rx.recv())
            .await
            .unwrap_or_else(|| panic!("the fixture stopped before {what}"))
    }

    /// The next item if one is already recorded.
    pub fn try_next(&mut self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

/// Aborts a background task (a fixture's accept loop) when dropped.
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `len` deterministic pseudo-random bytes (xorshift), so a corrupted, reordered or
/// truncated copy cannot compare equal by accident.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ len as u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-1 of `data`, hex; used to compare large bodies without printing them.
pub fn sha1_hex(data: &[u8]) -> String {
    use sha1::Digest as _;
    hex(&sha1::Sha1::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts that a refusal body is one short line of text ending in a newline.
pub fn assert_one_line(body: &str) {
    assert!(
        body.ends_with('\n') && body.trim_end().len() > 3 && !body.trim_end().contains('\n'),
        "expected a one-line text body, got {body:?}"
    );
}
