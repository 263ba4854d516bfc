//! Upstream pools: the servers behind a name, how one is chosen, how a connection to it is
//! opened (with a timeout, falling over to the next server) and the idle HTTP/1.1
//! connections kept for reuse.

pub mod health;
mod pool;
pub mod sticky;
mod stream;

use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, HOST};
use http::HeaderMap;
use tokio::net::TcpStream;

use prometheus::IntGauge;

use crate::config::{Balance, HostHeader, ServerAddr, UpstreamConfig};
use crate::metrics::Metrics;

pub use pool::{HttpSender, PooledSender};
pub use stream::{UpstreamStream, UpstreamTlsContext};

/// One named pool of servers, built from `[upstreams.NAME]`.
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    pub servers: Vec<Arc<Server>>,
    pub balance: Balance,
    /// Round-robin cursor.
    next: AtomicUsize,
    /// Set when the servers speak TLS.
    tls: Option<UpstreamTlsContext>,
    /// Active health checks, when configured.
    pub health: Option<crate::config::HealthCheck>,
    /// `host_header`: `None` keeps the client's `Host`; `Some(None)` sends each server's
    /// own address; `Some(Some(value))` always sends `value`.
    host: Option<Option<HeaderValue>>,
    /// `max_pending_handshakes`: one permit per WebSocket handshake in progress.
    pub handshakes: tokio::sync::Semaphore,
    pub max_pending_handshakes: u32,
}

/// One server of a pool.
#[derive(Debug)]
pub struct Server {
    pub addr: ServerAddr,
    /// `host:port`, as used in logs and metric labels.
    pub label: Arc<str>,
    /// The label as a `Host` value (`host_header = "upstream"`).
    host_value: Option<HeaderValue>,
    /// Prefix of sticky cookie values naming this server (`balance = "cookie:NAME"`).
    sticky_id: String,
    /// Live WebSockets plus in-flight requests on this server.
    active: AtomicU64,
    /// `wsgate_upstream_active_connections` for this server.
    active_gauge: IntGauge,
    /// `wsgate_upstream_healthy` for this server.
    pub healthy_gauge: IntGauge,
    /// Cleared by health checks; an unhealthy server is skipped by every balancing mode.
    healthy: std::sync::atomic::AtomicBool,
    upstream_name: Arc<str>,
    metrics: Arc<Metrics>,
    idle: pool::IdlePool,
}

/// Why connecting to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {server} failed: {source}")]
    Io { server: Arc<str>, source: io::Error },
    #[error("connecting to {server} timed out after {timeout:?}")]
    Timeout { server: Arc<str>, timeout: Duration },
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, metrics: &Arc<Metrics>) -> Self {
        let name: Arc<str> = Arc::from(config.name.as_str());
        Upstream {
            servers: config
                .servers
                .iter()
                .map(|addr| {
                    let label = addr.to_string();
                    let (healthy_gauge, active_gauge) = metrics.upstream_server(&name, &label);
                    // Health checking marks servers down; until then every server is up.
                    healthy_gauge.set(1);
                    Arc::new(Server {
                        sticky_id: sticky::server_id(&label),
                        host_value: HeaderValue::from_str(&label).ok(),
                        label: Arc::from(label),
                        addr: addr.clone(),
                        active: AtomicU64::new(0),
                        active_gauge,
                        healthy_gauge,
                        healthy: std::sync::atomic::AtomicBool::new(true),
                        upstream_name: name.clone(),
                        metrics: metrics.clone(),
                        idle: pool::IdlePool::default(),
                    })
                })
                .collect(),
            name,
            balance: config.balance.clone(),
            next: AtomicUsize::new(0),
            tls: config.tls.as_ref().map(UpstreamTlsContext::new),
            health: config.health.clone(),
            handshakes: tokio::sync::Semaphore::new(config.max_pending_handshakes as usize),
            max_pending_handshakes: config.max_pending_handshakes,
            host: match &config.host_header {
                HostHeader::Preserve => None,
                HostHeader::Upstream => Some(None),
                HostHeader::Literal(value) => Some(HeaderValue::from_str(value).ok()),
            },
        }
    }

    /// Sets the `Host` the upstream receives from `server` (`host_header`); the client's
    /// stays when the upstream preserves it.
    /// A request without a `Host` (HTTP/1.0) gets the server's address: an HTTP/1.1 request
    /// must carry one.
    pub fn set_host(&self, headers: &mut HeaderMap, server: &Server) {
        let value = match &self.host {
            None if headers.contains_key(HOST) => return,
            None | Some(None) => server.host_value.as_ref(),
            Some(Some(literal)) => Some(literal),
        };
        if let Some(value) = value {
            headers.insert(HOST, value.clone());
        }
    }

    /// The servers in the order to try them: the balancer's pick first, then the others,
    /// so a failed connect falls over to the next server.
    /// Servers marked unhealthy are left out; an empty list means none is healthy.
    pub fn attempt_order(&self, client: IpAddr, headers: &HeaderMap) -> Vec<&Arc<Server>> {
        let mut order = self.balanced_order(client, headers);
        order.retain(|s| s.is_healthy());
        order
    }

    fn balanced_order(&self, client: IpAddr, headers: &HeaderMap) -> Vec<&Arc<Server>> {
        let n = self.servers.len();
        let mut order: Vec<&Arc<Server>> = Vec::with_capacity(n);
        // Cookie stickiness: a cookie naming one of our servers picks it (below); any other
        // value of the cookie (set elsewhere, or by a server no longer in the pool) is
        // hashed, so the same value keeps landing on the same server.
        let sticky = match &self.balance {
            Balance::Cookie(name) => {
                sticky::cookie_value(headers, name).map(|value| match self.sticky_server(value) {
                    Some(pos) => Ok(pos),
                    None => Err(value),
                })
            }
            _ => None,
        };
        let hash_key = match (&self.balance, sticky) {
            (Balance::IpHash, _) => Some(HashKey::Ip(client.to_canonical())),
            (Balance::Header(name), _) => headers
                .get(name.as_str())
                .map(|v| HashKey::Bytes(v.as_bytes())),
            (_, Some(Err(value))) => Some(HashKey::Bytes(value.as_bytes())),
            _ => None,
        };
        if let Some(key) = hash_key {
            // Rendezvous hashing: each server scores the key; the highest wins. Adding or
            // removing a server only moves the keys that server wins or won.
            order.extend(self.servers.iter());
            order.sort_by_cached_key(|s| std::cmp::Reverse(rendezvous(&key, &s.label)));
            return order;
        }
        let start = match n {
            0 | 1 => 0,
            _ => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        order.extend((0..n).map(|i| &self.servers[(start + i) % n]));
        match &self.balance {
            Balance::LeastConn => {
                // Stable sort: ties keep the round-robin rotation, so equal servers share load.
                order.sort_by_key(|s| s.active());
            }
            Balance::Cookie(_) => {
                // The server the cookie names goes first; without the cookie, round robin.
                if let Some(Ok(chosen)) = sticky {
                    let server = &self.servers[chosen];
                    if let Some(pos) = order.iter().position(|s| Arc::ptr_eq(s, server)) {
                        let chosen = order.remove(pos);
                        order.insert(0, chosen);
                    }
                }
            }
            _ => {}
        }
        order
    }

    /// The index of the server whose sticky id prefixes cookie `value`, if any.
    pub fn sticky_server(&self, value: &str) -> Option<usize> {
        let id = sticky::prefix(value)?;
        self.servers.iter().position(|s| s.sticky_id() == id)
    }

    /// Opens a connection to `server`: TCP with `TCP_NODELAY`, then TLS if configured, all
    /// within `timeout`.
    pub async fn connect(
        &self,
        server: &Server,
        timeout: Duration,
    ) -> Result<UpstreamStream, ConnectError> {
        let Some(tls) = &self.tls else {
            return server.connect(timeout).await.map(UpstreamStream::Plain);
        };
        let started = tokio::time::Instant::now();
        let tcp = server.connect(timeout).await?;
        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, tls.connect(&server.addr.host, tcp)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => {
                server.connect_error("tls");
                Err(ConnectError::Io {
                    server: server.label.clone(),
                    source,
                })
            }
            Err(_) => {
                server.connect_error("timeout");
                Err(ConnectError::Timeout {
                    server: server.label.clone(),
                    timeout,
                })
            }
        }
    }
}

/// What consistent hashing hashes.
enum HashKey<'a> {
    Ip(IpAddr),
    Bytes(&'a [u8]),
}

/// The rendezvous score of `key` on `server`.
fn rendezvous(key: &HashKey<'_>, server: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    // DefaultHasher with fixed keys: stable across requests and processes of one build.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match key {
        HashKey::Ip(ip) => ip.hash(&mut h),
        HashKey::Bytes(b) => b.hash(&mut h),
    }
    server.hash(&mut h);
    h.finish()
}

impl Server {
    /// Opens a TCP connection with `TCP_NODELAY`, giving up after `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<TcpStream, ConnectError> {
        let connect = TcpStream::connect((self.addr.host.as_str(), self.addr.port));
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(stream)) => {
                // Small frames must not wait for Nagle; failure to set it is harmless.
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(source)) => {
                let kind = match source.kind() {
                    io::ErrorKind::ConnectionRefused => "refused",
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "reset",
                    _ if source.raw_os_error().is_none() => "resolve",
                    _ => "other",
                };
                self.connect_error(kind);
                Err(ConnectError::Io {
                    server: self.label.clone(),
                    source,
                })
            }
            Err(_) => {
                self.connect_error("timeout");
                Err(ConnectError::Timeout {
                    server: self.label.clone(),
                    timeout,
                })
            }
        }
    }

    /// Counts a failed connect in `wsgate_upstream_connect_errors_total`.
    pub fn connect_error(&self, kind: &str) {
        self.metrics
            .upstream_connect_error(&self.upstream_name, &self.label, kind);
    }

    /// Counts one live WebSocket or in-flight request until the guard is dropped.
    pub fn track(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.active_gauge.inc();
        ActiveGuard(self.clone())
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
}

/// Decrements a server's active count on drop.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Server>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.active_gauge.dec();
    }
}
