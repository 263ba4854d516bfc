//! The live routing state built from one validated [`Config`]: router, upstream pools and
//! the limits and timeouts new connections start with. Swapped whole on reload; every
//! request and tunnel keeps the generation it started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::auth::jwks::JwksCache;
use crate::auth::RouteAuth;
use crate::config::{Config, Limits, RouteConfig, RouteTarget, Secret, Timeouts};
use crate::error::HeadRefusal;
use crate::limits::Admission;
use crate::listener::pending::PendingHeads;
use crate::metrics::{Metrics, RouteMetrics};
use crate::router::Router;
use crate::status::History;
use crate::upstream::Upstream;
pub use crate::ws::record::Connections;

/// A route as the request path uses it.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    pub config: RouteConfig,
    /// `None` for builtin routes.
    pub upstream: Option<Arc<Upstream>>,
    pub metrics: Arc<RouteMetrics>,
    /// `[routes.X.auth]`, ready to check requests.
    pub auth: Option<RouteAuth>,
}

/// One configuration generation.
#[derive(Debug)]
pub struct Gateway {
    pub router: Router<Route>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// `[runtime] splice`: large frames between plain TCP sockets bypass wsgate's memory.
    pub splice: bool,
    /// `[admin] token_file`'s token, when set.
    pub admin_token: Option<Secret>,
    /// Stops this generation's health checks when the gateway is dropped (after a reload,
    /// once the last request holding it is done).
    _health_checks: DropGuard,
}

impl Gateway {
    /// `jwks` keeps URL key sets across generations (see [`JwksCache`]).
    pub fn new(config: &Config, metrics: &Arc<Metrics>, jwks: &JwksCache) -> Self {
        let upstreams: HashMap<String, Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| (u.name.clone(), Arc::new(Upstream::new(u, metrics))))
            .collect();
        let routes = config.routes.iter().map(|r| {
            let upstream = match &r.target {
                RouteTarget::Upstream(name) => upstreams.get(name).cloned(),
                RouteTarget::Builtin(_) => None,
            };
            let route = Route {
                name: Arc::from(r.name.as_str()),
                config: r.clone(),
                upstream,
                metrics: Arc::new(metrics.route(&r.name)),
                auth: r.auth.as_ref().map(|a| RouteAuth::new(a, jwks, metrics)),
            };
            (r.host.clone(), r.path.clone(), Arc::new(route))
        });
        let stop = CancellationToken::new();
        for upstream in upstreams.values() {
            if let Some(check) = &upstream.health {
                crate::upstream::health::spawn_checks(upstream, check, &stop);
            }
        }
        Gateway {
            router: Router::new(routes),
            upstreams,
            timeouts: config.timeouts,
            limits: config.limits,
            splice: config.runtime.splice,
            admin_token: config.admin.token.clone(),
            _health_checks: stop.drop_guard(),
        }
    }
}

/// State shared by every listener and connection of the process.
#[derive(Debug)]
pub struct Shared {
    pub gateway: ArcSwap<Gateway>,
    pub metrics: Arc<Metrics>,
    /// Source of connection ids (WebSocket tunnels and access-log lines).
    next_id: AtomicU64,
    /// Every upgraded tunnel runs on this tracker so shutdown can wait for them; hyper stops
    /// seeing a connection once it hands over the upgraded socket.
    pub tunnels: TaskTracker,
    /// Cancelled when the process starts to shut down.
    pub shutdown: CancellationToken,
    /// Every live WebSocket connection.
    pub connections: Connections,
    /// Admission counters for `[limits]`; they outlive reloads.
    pub admission: Arc<Admission>,
    /// Connections waiting for a request head (`[limits] max_pending_heads`).
    pub pending_heads: Arc<PendingHeads>,
    /// Key sets fetched from URLs; they outlive reloads that keep the URL.
    pub jwks: JwksCache,
    /// The status page's hour of history (the close ring is in `connections`).
    pub history: History,
    /// When the process started serving.
    pub started: std::time::Instant,
}

impl Shared {
    pub fn new(config: &Config) -> Self {
        let metrics = Arc::new(Metrics::new());
        let jwks = JwksCache::default();
        Shared {
            gateway: ArcSwap::from_pointee(Gateway::new(config, &metrics, &jwks)),
            jwks,
            history: History::default(),
            started: std::time::Instant::now(),
            metrics,
            next_id: AtomicU64::new(1),
            tunnels: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            connections: Connections::default(),
            admission: Arc::new(Admission::default()),
            pending_heads: Arc::new(PendingHeads::default()),
        }
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// What is known about one accepted client connection.
#[derive(Debug)]
pub struct ConnContext {
    pub listener: Arc<str>,
    pub client: SocketAddr,
    pub tls: bool,
    /// Requests handed to the service so far, in order (see `head_guard::take_refusal`).
    pub requests: AtomicU32,
    /// Set by the head gate when it refused a head: that request's number and why. The
    /// connection closes after the answer, so there is at most one.
    pub head_refusal: OnceLock<(u32, HeadRefusal)>,
}

impl ConnContext {
    pub fn new(listener: Arc<str>, client: SocketAddr, tls: bool) -> Self {
        ConnContext {
            listener,
            client,
            tls,
            requests: AtomicU32::new(0),
            head_refusal: OnceLock::new(),
        }
    }
}

impl ConnContext {
    pub fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}
