//! wsgate: a reverse proxy for WebSocket traffic.
//!
//! The data path, one module per step:
//! - [`config`]: TOML -> validated [`config::Config`], every error with file:line:col.
//! - [`listener`]: accept loop, TLS termination (SNI), the HTTP/1.1 server per connection.
//! - [`router`]: (host, path) -> route.
//! - [`proxy`]: the request service: plain HTTP forwarding and WebSocket handshakes.
//! - [`upstream`]: server pools, balancing, connect with timeout and fail-over, idle connections.
//! - [`ws`]: what runs after a 101: the tunnel and the builtin echo endpoint.
//! - [`gateway`]: the live state one configuration generation builds, shared by all of the above.
//! - [`error`]: the request path's error type: status, reason and whose fault.
//! - [`logging`]: tracing setup (text or JSON on stderr).

pub mod config;
pub mod error;
pub mod gateway;
pub mod listener;
pub mod logging;
pub mod proxy;
pub mod router;
pub mod upstream;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::info;

use config::Config;
use gateway::Shared;
use listener::BoundListener;

/// A configured proxy whose listeners are bound and ready to serve.
#[derive(Debug)]
pub struct Server {
    config: Config,
    shared: Arc<Shared>,
    listeners: Vec<BoundListener>,
}

impl Server {
    /// Binds every listener of `config` (port 0 picks a free port; see [`Server::listener_addr`]).
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let tls = match &l.tls {
                Some(tls) => Some(
                    listener::tls::server_config(tls)
                        .with_context(|| format!("listener {}: TLS setup failed", l.name))?,
                ),
                None => None,
            };
            let tcp = TcpListener::bind(l.bind)
                .await
                .with_context(|| format!("listener {}: cannot bind {}", l.name, l.bind))?;
            listeners.push(BoundListener {
                name: Arc::from(l.name.as_str()),
                listener: tcp,
                tls,
            });
        }
        let shared = Arc::new(Shared::new(&config));
        Ok(Server {
            config,
            shared,
            listeners,
        })
    }

    /// The address a listener is bound to.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| &*l.name == name)
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then stops accepting, lets open connections finish
    /// for up to `timeouts.shutdown_grace`, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            config,
            shared,
            listeners,
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
        shutdown.await;
        info!("shutting down");
        shared.shutdown.cancel();
        for accept_loop in accept_loops {
            let _ = accept_loop.await;
        }
        connections.close();
        shared.tunnels.close();
        let grace = config.timeouts.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            connections.wait().await;
            shared.tunnels.wait().await;
        })
        .await;
        if drained.is_err() {
            info!(
                grace_ms = grace.as_millis() as u64,
                "grace period over, closing what is left"
            );
        }
        Ok(())
    }
}
