//! wsgate: a reverse proxy for WebSocket traffic.
//!
//! The data path, one module per step:
//! - [`config`]: TOML -> validated [`config::Config`], every error with file:line:col.
//! - [`listener`]: accept loop, TLS termination (SNI), the HTTP/1.1 server per connection.
//! - [`router`]: (host, path) -> route.
//! - [`proxy`]: the request service: plain HTTP forwarding and WebSocket handshakes.
//! - [`upstream`]: server pools, balancing, connect with timeout and fail-over, idle connections.
//! - [`ws`]: what runs after a 101: codec, tunnel, keepalive, connection records, builtin echo.
//!
//! Around it:
//! - [`gateway`]: the live state one configuration generation builds, shared by all of the above.
//! - [`reload`]: re-reading the configuration (SIGHUP, `POST /reload`) and swapping it in.
//! - [`shutdown`]: the drain: stop accepting, close WebSockets spread over a window, wait.
//! - [`admin`]: the admin listener: metrics, health, live connections, reload.
//! - [`limits`]: admission limits for upgrades: process-wide, per address, handshake rate.
//! - [`metrics`]: the Prometheus registry and per-route metric handles.
//! - [`error`]: the request path's error type: status, reason and whose fault.
//! - [`logging`]: tracing setup (text or JSON on stderr).

pub mod admin;
pub mod auth;
pub mod config;
pub mod error;
pub mod gateway;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod router;
pub mod shutdown;
pub mod status;
pub mod upstream;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use config::Config;
use gateway::Shared;
use listener::BoundListener;
use reload::Reloader;

/// A configured proxy whose listeners are bound and ready to serve.
pub struct Wsgate {
    shared: Arc<Shared>,
    listeners: Vec<BoundListener>,
    admin: TcpListener,
    reloader: Arc<Reloader>,
}

/// The listen backlog of client listeners: a reconnect storm after a deploy or a network
/// blip queues thousands of connections at once, and whatever does not fit is dropped by
/// the kernel and retried by the client 1 s, then 3 s later. The kernel caps it at
/// `net.core.somaxconn` (4,096 by default); tokio's `TcpListener::bind` asks for 128.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a client listener with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as tokio's `bind`).
/// `TCP_NODELAY` is set on the listener: Linux hands it down to every accepted socket,
/// which saves a system call per connection (see [`listener::NODELAY_INHERITED`]).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Wsgate {
    /// Binds every listener of `config` (port 0 picks a free port; see [`Wsgate::listener_addr`]).
    pub async fn bind(config: Config) -> anyhow::Result<Wsgate> {
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let tls = match &l.tls {
                Some(tls) => Some(Arc::new(ArcSwap::new(
                    listener::tls::server_config(tls, l.http2)
                        .with_context(|| format!("listener {}: TLS setup failed", l.name))?,
                ))),
                None => None,
            };
            let tcp = listen(l.bind)
                .with_context(|| format!("listener {}: cannot bind {}", l.name, l.bind))?;
            listeners.push(BoundListener {
                name: Arc::from(l.name.as_str()),
                listener: tcp,
                tls,
                http2: l.http2.then_some(l.http2_max_streams),
            });
        }
        let admin = TcpListener::bind(config.admin.bind)
            .await
            .with_context(|| format!("admin listener: cannot bind {}", config.admin.bind))?;
        let shared = Arc::new(Shared::new(&config));
        let reloader = Arc::new(Reloader::new(config, shared.clone(), &listeners));
        Ok(Wsgate {
            shared,
            listeners,
            admin,
            reloader,
        })
    }

    /// The address a listener is bound to.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| &*l.name == name)
            .and_then(|l| l.local_addr().ok())
    }

    /// The address the admin listener is bound to.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    /// Reloads the configuration file the server was started with (what SIGHUP does).
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Serves until `shutdown` completes, then drains (see [`shutdown::drain`]) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Wsgate {
            shared,
            listeners,
            admin,
            reloader,
        } = self;
        let connections = TaskTracker::new();
        let mut accept_loops = Vec::new();
        for bound in listeners {
            info!(listener = %bound.name, addr = %bound.local_addr()?, tls = bound.tls.is_some(), "listening");
            accept_loops.push(tokio::spawn(listener::serve(
                bound,
                shared.clone(),
                connections.clone(),
                shared.shutdown.clone(),
            )));
        }
        let anchor = tokio::spawn(timer_anchor());
        let admin_stop = CancellationToken::new();
        let sampler = tokio::spawn(admin::status::sample(shared.clone(), admin_stop.clone()));
        info!(addr = %admin.local_addr()?, "admin listening");
        let admin_task = tokio::spawn(admin::serve(
            admin,
            shared.clone(),
            Some(reloader),
            admin_stop.clone(),
        ));

        shutdown.await;
        shared.shutdown.cancel();
        for accept_loop in accept_loops {
            let _ = accept_loop.await;
        }
        shutdown::drain(&shared, &connections).await;
        admin_stop.cancel();
        let _ = admin_task.await;
        let _ = sampler.await;
        anchor.abort();
        Ok(())
    }
}

/// How far ahead the runtime's next timer is kept at most (see [`timer_anchor`]).
const TIMER_ANCHOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps a timer due within [`TIMER_ANCHOR`] at all times. tokio wakes its I/O driver (an
/// `eventfd` write, and an `epoll_wait` that returns at once) whenever a timer is set to
/// expire before the driver's next planned wake-up. Without this, a handshake's upstream
/// connect timer is often the earliest one (tunnels' keepalive timers are tens of seconds
/// out), and half of all handshakes paid that system call. One wake-up a second instead.
async fn timer_anchor() {
    let mut tick = tokio::time::interval(TIMER_ANCHOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Accepted connections have `TCP_NODELAY` without setting it on each: small frames
    /// never wait for Nagle's algorithm.
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = super::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        crate::listener::prepare_accepted(&accepted);
        assert!(accepted.nodelay().unwrap());
    }

    /// A storm of connections nobody accepts yet all complete their TCP handshake: the
    /// queue holds far more than tokio's default of 128.
    #[tokio::test]
    async fn client_listeners_queue_a_reconnect_storm() {
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if somaxconn < 512 {
            eprintln!(
                "SKIPPED: net.core.somaxconn is {somaxconn}; the kernel caps the backlog there"
            );
            return;
        }
        let listener = super::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects: Vec<_> = (0..400)
            .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr)))
            .collect();
        let mut streams = Vec::new();
        for connect in connects {
            // A connection beyond the queue would wait for the SYN retry, a second or more.
            let stream = tokio::time::timeout(Duration::from_millis(900), connect)
                .await
                .expect("a connection was not queued")
                .unwrap()
                .unwrap();
            streams.push(stream);
        }
        assert_eq!(streams.len(), 400);
        drop(listener);
    }
}
