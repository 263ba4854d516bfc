//! Prometheus metrics: wsgate's own registry (served only on the admin listener), the
//! metric families of design.md, and per-route handles looked up once per route so the
//! relay only bumps cached counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::ws::side::{Direction, Initiator};

/// Handshakes take from well under a millisecond (builtin echo on loopback) to the
/// upstream_handshake timeout (10 s by default).
const HANDSHAKE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// WebSocket lifetimes run from sub-second probes to day-long sessions.
const CONNECTION_BUCKETS: &[f64] = &[
    0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
];

/// Keepalive round trips: sub-millisecond on a LAN to seconds on a congested mobile link.
const RTT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Opcode label values in the order the relay counts them.
pub const OPCODES: [&str; 6] = ["continuation", "text", "binary", "close", "ping", "pong"];

/// Every metric family wsgate exports.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    connections_active: IntGaugeVec,
    connections_total: IntCounterVec,
    handshake_duration: HistogramVec,
    connection_duration: HistogramVec,
    frames_total: IntCounterVec,
    bytes_total: IntCounterVec,
    spliced_bytes_total: IntCounterVec,
    closes_total: IntCounterVec,
    undeliverable_frames_total: IntCounterVec,
    pings_sent_total: IntCounterVec,
    pong_timeouts_total: IntCounterVec,
    idle_timeouts_total: IntCounterVec,
    ping_rtt: HistogramVec,
    http_requests_total: IntCounterVec,
    upstream_connect_errors_total: IntCounterVec,
    upstream_healthy: IntGaugeVec,
    upstream_active_connections: IntGaugeVec,
    tls_handshake_errors_total: IntCounterVec,
    http_connections_total: IntCounterVec,
    config_reloads_total: IntCounterVec,
    rejected_total: IntCounterVec,
    auth_total: IntCounterVec,
    jwks_fetches_total: IntCounterVec,
    /// Every route's relay counters, folded into the families above before they are read.
    traffic: Mutex<Vec<Weak<Traffic>>>,
}

/// The outcome label of `wsgate_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    Upgraded,
    /// Refused by wsgate itself (bad handshake, origin, limits).
    Refused,
    /// The upstream could not be reached or answered badly.
    UpstreamError,
    /// The upstream answered with something other than 101.
    UpstreamStatus,
}

impl HandshakeResult {
    fn label(self) -> &'static str {
        match self {
            HandshakeResult::Upgraded => "upgraded",
            HandshakeResult::Refused => "refused",
            HandshakeResult::UpstreamError => "upstream_error",
            HandshakeResult::UpstreamStatus => "upstream_status",
        }
    }
}

/// Why wsgate refused a request (`wsgate_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Origin,
    RateLimit,
    PerIp,
    MaxConnections,
    BadHandshake,
    NoRoute,
    /// An ambiguous, malformed or oversized request head (400, 431).
    BadRequest,
    /// A connection closed to make room while waiting for its head (`max_pending_heads`).
    PendingHeads,
}

impl RejectReason {
    fn label(self) -> &'static str {
        match self {
            RejectReason::Origin => "origin",
            RejectReason::RateLimit => "rate_limit",
            RejectReason::PerIp => "per_ip",
            RejectReason::MaxConnections => "max_connections",
            RejectReason::BadHandshake => "bad_handshake",
            RejectReason::NoRoute => "no_route",
            RejectReason::BadRequest => "bad_request",
            RejectReason::PendingHeads => "pending_heads",
        }
    }
}

/// The close-code labels, by [`close_code_slot`]: none, 1000-1015, 3xxx, 4xxx, other.
const CODE_LABELS: [&str; CODE_SLOTS] = [
    "none", "1000", "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010",
    "1011", "1012", "1013", "1014", "1015", "3xxx", "4xxx", "other",
];

/// Close-code label slots: one per entry of [`CODE_LABELS`].
const CODE_SLOTS: usize = 20;

/// Where a close code falls among [`CODE_LABELS`].
fn close_code_slot(code: Option<u16>) -> usize {
    match code {
        None => 0,
        Some(c @ 1000..=1015) => 1 + usize::from(c - 1000),
        Some(3000..=3999) => 17,
        Some(4000..=4999) => 18,
        Some(_) => 19,
    }
}

/// Label value for a close code: exact for 1000-1015, else its class, `none` when absent.
pub fn close_code_label(code: Option<u16>) -> &'static str {
    CODE_LABELS[close_code_slot(code)]
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help).namespace("wsgate"), labels)
        .unwrap_or_else(|e| unreachable!("metric {name} is well-formed: {e}"))
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help).namespace("wsgate"), labels)
        .unwrap_or_else(|e| unreachable!("metric {name} is well-formed: {e}"))
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help)
            .namespace("wsgate")
            .buckets(buckets.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| unreachable!("metric {name} is well-formed: {e}"))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::new(),
            connections_active: gauge("connections_active", "Live WebSocket connections.", &["route"]),
            connections_total: counter(
                "connections_total",
                "WebSocket handshakes by result: upgraded, refused (by wsgate), upstream_error, upstream_status (non-101 answer).",
                &["route", "result"],
            ),
            handshake_duration: histogram(
                "handshake_duration_seconds",
                "Time from the upgrade request to the 101 sent to the client.",
                &["route"],
                HANDSHAKE_BUCKETS,
            ),
            connection_duration: histogram(
                "connection_duration_seconds",
                "Lifetime of upgraded WebSocket connections.",
                &["route"],
                CONNECTION_BUCKETS,
            ),
            frames_total: counter(
                "frames_total",
                "WebSocket frames relayed, by direction and opcode.",
                &["route", "direction", "opcode"],
            ),
            bytes_total: counter(
                "bytes_total",
                "WebSocket bytes relayed (frame headers included, after TLS), by direction.",
                &["route", "direction"],
            ),
            spliced_bytes_total: counter(
                "spliced_bytes_total",
                "Of wsgate_bytes_total, the bytes of large frames moved by splice(2), never copied into wsgate.",
                &["route", "direction"],
            ),
            closes_total: counter(
                "closes_total",
                "Ended WebSocket connections by who closed first and the close code.",
                &["route", "initiator", "code"],
            ),
            undeliverable_frames_total: counter(
                "undeliverable_frames_total",
                "Frames a peer sent after wsgate's close had gone to the other side: read and dropped.",
                &["route", "direction"],
            ),
            pings_sent_total: counter("pings_sent_total", "Keepalive pings sent by wsgate.", &["route"]),
            pong_timeouts_total: counter(
                "pong_timeouts_total",
                "Connections closed because the client did not answer a ping.",
                &["route"],
            ),
            idle_timeouts_total: counter(
                "idle_timeouts_total",
                "Connections closed because no data frame passed for the idle timeout.",
                &["route"],
            ),
            ping_rtt: histogram(
                "ping_rtt_seconds",
                "Round trip of wsgate's keepalive pings to clients.",
                &["route"],
                RTT_BUCKETS,
            ),
            http_requests_total: counter(
                "http_requests_total",
                "Plain HTTP requests by route and response status.",
                &["route", "status"],
            ),
            upstream_connect_errors_total: counter(
                "upstream_connect_errors_total",
                "Failed connects to upstream servers, by kind (refused, timeout, reset, resolve, other).",
                &["upstream", "server", "kind"],
            ),
            upstream_healthy: gauge(
                "upstream_healthy",
                "1 when the server is considered healthy, else 0.",
                &["upstream", "server"],
            ),
            upstream_active_connections: gauge(
                "upstream_active_connections",
                "Live WebSockets plus in-flight requests per upstream server.",
                &["upstream", "server"],
            ),
            tls_handshake_errors_total: counter(
                "tls_handshake_errors_total",
                "Failed or timed-out TLS handshakes on a listener.",
                &["listener"],
            ),
            http_connections_total: counter(
                "http_connections_total",
                "Client connections served, by listener and HTTP version (1.1 or 2): counted once the protocol is known (the first HTTP/1.1 head, the HTTP/2 preface or ALPN).",
                &["listener", "version"],
            ),
            config_reloads_total: counter(
                "config_reloads_total",
                "Configuration reloads by result (success, error).",
                &["result"],
            ),
            rejected_total: counter(
                "rejected_total",
                "Requests refused by wsgate itself, by reason.",
                &["reason"],
            ),
            auth_total: counter(
                "auth_total",
                "Authentication checks on routes with [routes.X.auth], by result: ok, missing, invalid, expired, denied (by forward auth), error (keys or auth service unavailable).",
                &["route", "result"],
            ),
            jwks_fetches_total: counter(
                "jwks_fetches_total",
                "Fetches of a JWKS URL, by result (success, error); a failed fetch keeps the last good key set.",
                &["source", "result"],
            ),
            traffic: Mutex::new(Vec::new()),
        };
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.connections_active.clone()),
            Box::new(m.connections_total.clone()),
            Box::new(m.handshake_duration.clone()),
            Box::new(m.connection_duration.clone()),
            Box::new(m.frames_total.clone()),
            Box::new(m.bytes_total.clone()),
            Box::new(m.spliced_bytes_total.clone()),
            Box::new(m.closes_total.clone()),
            Box::new(m.undeliverable_frames_total.clone()),
            Box::new(m.pings_sent_total.clone()),
            Box::new(m.pong_timeouts_total.clone()),
            Box::new(m.idle_timeouts_total.clone()),
            Box::new(m.ping_rtt.clone()),
            Box::new(m.http_requests_total.clone()),
            Box::new(m.upstream_connect_errors_total.clone()),
            Box::new(m.upstream_healthy.clone()),
            Box::new(m.upstream_active_connections.clone()),
            Box::new(m.tls_handshake_errors_total.clone()),
            Box::new(m.http_connections_total.clone()),
            Box::new(m.config_reloads_total.clone()),
            Box::new(m.rejected_total.clone()),
            Box::new(m.auth_total.clone()),
            Box::new(m.jwks_fetches_total.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            // Names are distinct by construction; a failure here would be a programming error.
            let _ = m.registry.register(c);
        }
        for result in ["success", "error"] {
            m.config_reloads_total.with_label_values(&[result]);
        }
        m
    }

    /// Every metric family, with the relay's split counters folded in first.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        traffic.retain(|t| match t.upgrade() {
            Some(t) => {
                t.fold();
                true
            }
            None => false,
        });
        drop(traffic);
        self.registry.gather()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.gather(), &mut out);
        out
    }

    /// Handles for one route, looked up once.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let dir = |d: Direction| {
            let bytes = self.bytes_total.with_label_values(&[route, d.label()]);
            let spliced = self
                .spliced_bytes_total
                .with_label_values(&[route, d.label()]);
            let frames =
                OPCODES.map(|op| self.frames_total.with_label_values(&[route, d.label(), op]));
            (bytes, spliced, frames)
        };
        let (c2u_bytes, c2u_spliced, c2u_frames) = dir(Direction::ClientToUpstream);
        let (u2c_bytes, u2c_spliced, u2c_frames) = dir(Direction::UpstreamToClient);
        let traffic = Arc::new(Traffic {
            shards: (0..traffic_shards()).map(|_| Cells::default()).collect(),
            folded: Mutex::new([0; CELLS]),
            bytes: [c2u_bytes, u2c_bytes],
            spliced: [c2u_spliced, u2c_spliced],
            frames: [c2u_frames, u2c_frames],
        });
        self.traffic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&traffic));
        RouteMetrics {
            route: route.to_string(),
            connections_active: self.connections_active.with_label_values(&[route]),
            handshake_duration: self.handshake_duration.with_label_values(&[route]),
            connection_duration: self.connection_duration.with_label_values(&[route]),
            traffic,
            undeliverable: [Direction::ClientToUpstream, Direction::UpstreamToClient].map(|d| {
                self.undeliverable_frames_total
                    .with_label_values(&[route, d.label()])
            }),
            pings_sent: self.pings_sent_total.with_label_values(&[route]),
            pong_timeouts: self.pong_timeouts_total.with_label_values(&[route]),
            idle_timeouts: self.idle_timeouts_total.with_label_values(&[route]),
            ping_rtt: self.ping_rtt.with_label_values(&[route]),
            connections_total: self.connections_total.clone(),
            closes_total: self.closes_total.clone(),
            http_requests_total: self.http_requests_total.clone(),
            auth_total: self.auth_total.clone(),
            series: Series {
                handshakes: Lazy::new(),
                closes: Lazy::new(),
                auth: Lazy::new(),
                statuses: Lazy::new(),
            },
        }
    }

    /// One fetch of the JWKS at `source` (its URL).
    pub fn jwks_fetch(&self, source: &str, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.jwks_fetches_total
            .with_label_values(&[source, result])
            .inc();
    }

    pub fn rejected(&self, reason: RejectReason) {
        self.rejected_total
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// A client connection starts being served as HTTP `version` ("1.1" or "2").
    pub fn http_connection(&self, listener: &str, version: &str) {
        self.http_connections_total
            .with_label_values(&[listener, version])
            .inc();
    }

    pub fn tls_handshake_error(&self, listener: &str) {
        self.tls_handshake_errors_total
            .with_label_values(&[listener])
            .inc();
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.config_reloads_total.with_label_values(&[result]).inc();
    }

    pub fn upstream_connect_error(&self, upstream: &str, server: &str, kind: &str) {
        self.upstream_connect_errors_total
            .with_label_values(&[upstream, server, kind])
            .inc();
    }

    pub fn upstream_server(&self, upstream: &str, server: &str) -> (IntGauge, IntGauge) {
        let healthy = self.upstream_healthy.with_label_values(&[upstream, server]);
        let active = self
            .upstream_active_connections
            .with_label_values(&[upstream, server]);
        (healthy, active)
    }
}

/// One route's metric handles.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    route: String,
    pub connections_active: IntGauge,
    pub handshake_duration: Histogram,
    pub connection_duration: Histogram,
    /// Bytes, spliced bytes and frames relayed: the relay's per-read-batch counters.
    pub traffic: Arc<Traffic>,
    /// Indexed by [`direction_index`]: frames dropped after wsgate's close went the other way.
    pub undeliverable: [IntCounter; 2],
    pub pings_sent: IntCounter,
    pub pong_timeouts: IntCounter,
    pub idle_timeouts: IntCounter,
    pub ping_rtt: Histogram,
    connections_total: IntCounterVec,
    closes_total: IntCounterVec,
    http_requests_total: IntCounterVec,
    /// Series appear once a route with `auth` checks its first request.
    auth_total: IntCounterVec,
    series: Series,
}

/// The result label of `wsgate_auth_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    Ok,
    /// No token where `from` says to look.
    Missing,
    /// Malformed, badly signed, wrong issuer or audience, not yet valid, unknown key.
    Invalid,
    Expired,
    /// Refused by the forward-auth service (its 401 or 403 relayed).
    Denied,
    /// Keys or the auth service unavailable: wsgate could not decide.
    Error,
}

impl AuthResult {
    pub fn label(self) -> &'static str {
        match self {
            AuthResult::Ok => "ok",
            AuthResult::Missing => "missing",
            AuthResult::Invalid => "invalid",
            AuthResult::Expired => "expired",
            AuthResult::Denied => "denied",
            AuthResult::Error => "error",
        }
    }
}

/// The counters of [`Traffic`]: bytes and spliced bytes each way, frames by opcode each way.
const CELLS: usize = 16;

/// One shard of a route's relay counters, on cache lines of its own.
#[derive(Default)]
#[repr(align(128))]
struct Cells([AtomicU64; CELLS]);

/// A route's relay counters (`wsgate_bytes_total`, `wsgate_spliced_bytes_total`,
/// `wsgate_frames_total`), split into shards by connection: the relays of one route on
/// different worker threads mostly add to different cache lines instead of bouncing one
/// between cores on every read. The shares are summed into the Prometheus counters when metrics are read, and
/// when the route's last tunnel ends.
pub struct Traffic {
    shards: Box<[Cells]>,
    /// What has been added to the Prometheus counters so far, by cell.
    folded: Mutex<[u64; CELLS]>,
    bytes: [IntCounter; 2],
    spliced: [IntCounter; 2],
    frames: [[IntCounter; 6]; 2],
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Traffic")
    }
}

/// Shards per route: a power of two, four per core, so two connections running at the same
/// moment on two cores rarely share one.
fn traffic_shards() -> usize {
    static SHARDS: OnceLock<usize> = OnceLock::new();
    *SHARDS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get() * 4)
            .clamp(4, 256)
            .next_power_of_two()
    })
}

impl Traffic {
    /// Adds what one direction of connection `id` relayed since its last flush. A
    /// connection always adds to the same shard (its id picks it: no thread-local lookup,
    /// and tunnels move between worker threads anyway).
    pub fn add(&self, id: u64, direction: usize, bytes: u64, spliced: u64, frames: &[u32; 6]) {
        let cells = &self.shards[id as usize & (self.shards.len() - 1)].0;
        let base = direction * 8;
        if bytes > 0 {
            cells[base].fetch_add(bytes, Ordering::Relaxed);
        }
        if spliced > 0 {
            cells[base + 1].fetch_add(spliced, Ordering::Relaxed);
        }
        for (i, n) in frames.iter().enumerate() {
            if *n > 0 {
                cells[base + 2 + i].fetch_add(u64::from(*n), Ordering::Relaxed);
            }
        }
    }

    /// Adds the shares gathered since the last fold to the Prometheus counters.
    fn fold(&self) {
        let mut folded = self.folded.lock().unwrap_or_else(|e| e.into_inner());
        for (cell, done) in folded.iter_mut().enumerate() {
            let total: u64 = self
                .shards
                .iter()
                .map(|s| s.0[cell].load(Ordering::Relaxed))
                .sum();
            let delta = total.saturating_sub(*done);
            if delta == 0 {
                continue;
            }
            *done = total;
            let (direction, field) = (cell / 8, cell % 8);
            match field {
                0 => self.bytes[direction].inc_by(delta),
                1 => self.spliced[direction].inc_by(delta),
                op => self.frames[direction][op - 2].inc_by(delta),
            }
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.fold();
    }
}

pub fn direction_index(d: Direction) -> usize {
    match d {
        Direction::ClientToUpstream => 0,
        Direction::UpstreamToClient => 1,
    }
}

impl RouteMetrics {
    pub fn handshake(&self, result: HandshakeResult) {
        self.series
            .handshakes
            .get(result as usize, || {
                self.connections_total
                    .with_label_values(&[&self.route, result.label()])
            })
            .inc();
    }

    pub fn closed(&self, initiator: Initiator, code: Option<u16>) {
        let slot = close_code_slot(code);
        self.series
            .closes
            .get(initiator as usize * CODE_SLOTS + slot, || {
                self.closes_total.with_label_values(&[
                    &self.route,
                    initiator.label(),
                    CODE_LABELS[slot],
                ])
            })
            .inc();
    }

    pub fn auth(&self, result: AuthResult) {
        self.series
            .auth
            .get(result as usize, || {
                self.auth_total
                    .with_label_values(&[&self.route, result.label()])
            })
            .inc();
    }

    pub fn http_request(&self, status: u16) {
        let resolve = || {
            self.http_requests_total
                .with_label_values(&[&self.route, &status.to_string()])
        };
        match status {
            100..=599 => self
                .series
                .statuses
                .get(usize::from(status - 100), resolve)
                .inc(),
            _ => resolve().inc(),
        }
    }
}

/// Series of one family for one route, looked up in the family on first use and kept:
/// later events add to them directly, without the family's shared map (a lock and a hash
/// of every label) on the handshake path. Series still appear only once used.
#[derive(Debug, Clone)]
struct Lazy<const N: usize>(Box<[OnceLock<IntCounter>; N]>);

impl<const N: usize> Lazy<N> {
    fn new() -> Self {
        Lazy(Box::new(std::array::from_fn(|_| OnceLock::new())))
    }

    fn get(&self, slot: usize, resolve: impl FnOnce() -> IntCounter) -> &IntCounter {
        self.0[slot].get_or_init(resolve)
    }
}

/// A route's lazily resolved series.
#[derive(Debug, Clone)]
struct Series {
    handshakes: Lazy<4>,
    closes: Lazy<{ 3 * CODE_SLOTS }>,
    auth: Lazy<6>,
    /// HTTP statuses 100-599.
    statuses: Lazy<500>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_labels() {
        assert_eq!(close_code_label(None), "none");
        assert_eq!(close_code_label(Some(1000)), "1000");
        assert_eq!(close_code_label(Some(1014)), "1014");
        assert_eq!(close_code_label(Some(3001)), "3xxx");
        assert_eq!(close_code_label(Some(4000)), "4xxx");
    }

    #[test]
    fn split_relay_counters_add_up_across_threads_and_after_the_route_is_gone() {
        let m = Metrics::new();
        let r = Arc::new(m.route("chat"));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for id in 0..1000 {
                        r.traffic.add(id, 0, 10, 0, &[0, 1, 0, 0, 0, 0]);
                        r.traffic.add(id, 1, 3, 2, &[0, 0, 1, 0, 1, 0]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = String::from_utf8(m.render()).unwrap();
        let value = |series: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{series} missing"))
        };
        assert_eq!(
            value("wsgate_bytes_total{direction=\"client_to_upstream\",route=\"chat\"}"),
            40_000
        );
        assert_eq!(
            value("wsgate_bytes_total{direction=\"upstream_to_client\",route=\"chat\"}"),
            12_000
        );
        assert_eq!(
            value("wsgate_spliced_bytes_total{direction=\"upstream_to_client\",route=\"chat\"}"),
            8_000
        );
        assert_eq!(value("wsgate_frames_total{direction=\"client_to_upstream\",opcode=\"text\",route=\"chat\"}"), 4_000);
        assert_eq!(value("wsgate_frames_total{direction=\"upstream_to_client\",opcode=\"ping\",route=\"chat\"}"), 4_000);
        // Added after the last read, then the route's handles are dropped (a reload): kept.
        r.traffic.add(7, 0, 5, 0, &[0; 6]);
        drop(r);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(
                "wsgate_bytes_total{direction=\"client_to_upstream\",route=\"chat\"} 40005"
            ),
            "{text}"
        );
    }

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        let r = m.route("chat");
        r.handshake(HandshakeResult::Upgraded);
        r.closed(Initiator::Client, Some(1000));
        m.rejected(RejectReason::Origin);
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "wsgate_connections_active",
            "wsgate_connections_total",
            "wsgate_frames_total",
            "wsgate_bytes_total",
            "wsgate_closes_total",
            "wsgate_config_reloads_total",
            "wsgate_rejected_total",
            "process_",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
