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
            let tcp = TcpListener::bind(l.bind)
                .await
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
        Ok(())
    }
}
