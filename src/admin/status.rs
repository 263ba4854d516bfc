//! `GET /status` and `GET /events`: what the status page shows besides the connection list,
//! as one JSON document (totals, routes, upstream servers, recent closes, an hour of
//! history), and the same document streamed as Server-Sent Events every 2 s.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use prometheus::proto::MetricFamily;
use serde::Serialize;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::gateway::Shared;
use crate::status::{unix_ms, ClosedView, Sample, SAMPLE_INTERVAL};

/// How often `/events` sends the document.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize)]
pub struct StatusView {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub totals: Totals,
    pub routes: Vec<RouteView>,
    pub upstreams: Vec<UpstreamView>,
    /// The last connection ends, oldest first.
    pub closes: Vec<ClosedView>,
    pub history: HistoryView,
}

/// Counters since the start (the page turns them into rates) and gauges.
#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub live_websockets: u64,
    pub handshakes: u64,
    /// `wsgate_rejected_total` by reason, and refused authentications as `auth_RESULT`.
    pub refusals: BTreeMap<String, u64>,
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
    pub resident_memory_bytes: u64,
    pub open_fds: u64,
}

#[derive(Debug, Serialize)]
pub struct RouteView {
    pub name: String,
    pub live: u64,
}

#[derive(Debug, Serialize)]
pub struct UpstreamView {
    pub name: String,
    /// Whether active health checks run; without them every server counts as healthy.
    pub health_checks: bool,
    pub servers: Vec<ServerView>,
}

#[derive(Debug, Serialize)]
pub struct ServerView {
    pub address: String,
    pub healthy: bool,
    /// Live WebSockets plus in-flight requests.
    pub active: u64,
    /// Failed connects since the start, all kinds.
    pub connect_errors: u64,
}

#[derive(Debug, Serialize)]
pub struct HistoryView {
    pub interval_seconds: u64,
    pub samples: Vec<Sample>,
}

/// The value of each series of `name`, keyed by the value of `label` ("" without one).
fn by_label(families: &[MetricFamily], name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for family in families.iter().filter(|f| f.name() == name) {
        let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
        for metric in family.get_metric() {
            let key = metric
                .get_label()
                .iter()
                .find(|l| l.name() == label)
                .map_or_else(String::new, |l| l.value().to_string());
            let value = if counter {
                metric.get_counter().get_value()
            } else {
                metric.get_gauge().get_value()
            };
            *out.entry(key).or_insert(0.0) += value;
        }
    }
    out
}

fn total(families: &[MetricFamily], name: &str, label: &str, value: &str) -> u64 {
    by_label(families, name, label)
        .get(value)
        .copied()
        .unwrap_or(0.0) as u64
}

/// Upgraded handshakes since the start, for the history.
pub fn handshakes(shared: &Shared) -> u64 {
    total(
        &shared.metrics.gather(),
        "wsgate_connections_total",
        "result",
        "upgraded",
    )
}

/// The whole document.
pub fn view(shared: &Shared) -> StatusView {
    let families = shared.metrics.gather();
    let mut refusals: BTreeMap<String, u64> =
        by_label(&families, "wsgate_rejected_total", "reason")
            .into_iter()
            .map(|(k, v)| (k, v as u64))
            .collect();
    for (result, n) in by_label(&families, "wsgate_auth_total", "result") {
        if result != "ok" {
            refusals.insert(format!("auth_{result}"), n as u64);
        }
    }
    let bytes = by_label(&families, "wsgate_bytes_total", "direction");
    let single = |name: &str| {
        by_label(&families, name, "")
            .get("")
            .copied()
            .unwrap_or(0.0) as u64
    };
    let totals = Totals {
        live_websockets: shared.connections.len() as u64,
        handshakes: total(&families, "wsgate_connections_total", "result", "upgraded"),
        refusals,
        bytes_client_to_upstream: bytes.get("client_to_upstream").copied().unwrap_or(0.0) as u64,
        bytes_upstream_to_client: bytes.get("upstream_to_client").copied().unwrap_or(0.0) as u64,
        resident_memory_bytes: single("process_resident_memory_bytes"),
        open_fds: single("process_open_fds"),
    };
    let live = by_label(&families, "wsgate_connections_active", "route");
    let errors = by_label(&families, "wsgate_upstream_connect_errors_total", "server");
    let gateway = shared.gateway.load();
    let mut routes: Vec<RouteView> = gateway
        .router
        .routes()
        .map(|r| RouteView {
            name: r.name.to_string(),
            live: live.get(&*r.name).copied().unwrap_or(0.0) as u64,
        })
        .collect();
    routes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut upstreams: Vec<UpstreamView> = gateway
        .upstreams
        .values()
        .map(|u| UpstreamView {
            name: u.name.to_string(),
            health_checks: u.health.is_some(),
            servers: u
                .servers
                .iter()
                .map(|s| ServerView {
                    address: s.label.to_string(),
                    healthy: s.is_healthy(),
                    active: s.active(),
                    connect_errors: errors.get(&*s.label).copied().unwrap_or(0.0) as u64,
                })
                .collect(),
        })
        .collect();
    upstreams.sort_by(|a, b| a.name.cmp(&b.name));
    StatusView {
        time_ms: unix_ms(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: shared.started.elapsed().as_secs(),
        totals,
        routes,
        upstreams,
        closes: shared.connections.ended.list(),
        history: HistoryView {
            interval_seconds: SAMPLE_INTERVAL.as_secs(),
            samples: shared.history.list(),
        },
    }
}

/// Samples the history every 10 s until `stop`.
pub async fn sample(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        shared.history.record(
            unix_ms(),
            shared.connections.len() as u64,
            handshakes(&shared),
        );
    }
}

/// One `event: status` message.
fn event(shared: &Shared) -> Bytes {
    let json = serde_json::to_string(&view(shared)).unwrap_or_else(|_| "{}".to_string());
    Bytes::from(format!("event: status\ndata: {json}\n\n"))
}

/// `GET /events`: the status document now and every 2 s, until the client leaves or the
/// admin listener stops.
pub struct EventStream {
    shared: Arc<Shared>,
    tick: tokio::time::Interval,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl EventStream {
    pub fn new(shared: Arc<Shared>, stop: CancellationToken) -> EventStream {
        EventStream {
            shared,
            tick: tokio::time::interval(EVENT_INTERVAL),
            stopped: Box::pin(stop.cancelled_owned()),
        }
    }
}

impl Body for EventStream {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        match this.tick.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(Ok(Frame::data(event(&this.shared))))),
            Poll::Pending => Poll::Pending,
        }
    }
}
