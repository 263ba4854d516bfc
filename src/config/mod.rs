//! Configuration: raw TOML types are parsed and checked into the validated [`Config`] below,
//! which is all the rest of wsgate ever sees. Every error names file, line and column.
//!
//! - `raw`: serde view of the file, with positions; unknown keys are errors.
//! - [`units`]: durations ("30s"), sizes ("1MiB") and rates ("50/s").
//! - `values`: the syntax of single values (addresses, hosts, paths, origins, ...).
//! - `validate`: defaults, cross-checks, certificate loading; every problem reported.
//!
//! Entry points: [`Config::load`] and [`Config::from_toml`]; on failure a [`ConfigError`]
//! lists every problem as `file:line:col: message`.

mod raw;
pub mod units;
mod validate;
mod values;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use units::{parse_duration, parse_rate, parse_size};
pub use validate::token_source;

/// A fully validated configuration. No field is left half-filled: defaults are applied,
/// per-route timeouts are merged over the global ones, certificate files are loaded.
#[derive(Debug)]
pub struct Config {
    /// The file this configuration was read from (used in messages and to resolve paths).
    pub source: PathBuf,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    pub admin: AdminConfig,
    /// Sorted by name.
    pub listeners: Vec<ListenerConfig>,
    /// The global `[timeouts]` table, defaults filled in.
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// Sorted by name.
    pub upstreams: Vec<UpstreamConfig>,
    /// Sorted by name.
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// An EnvFilter directive string, e.g. "info" or "wsgate=debug,hyper=info". Default "info".
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Tokio worker threads; 0 means one per CPU core. Default 0.
    pub worker_threads: usize,
    /// Relay large frames between plain TCP sockets with splice(2) (Linux). Default true.
    pub splice: bool,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Default 127.0.0.1:9090.
    pub bind: SocketAddr,
    /// `token_file`: the bearer token every admin endpoint but /metrics, /healthz and
    /// /readyz asks for. Required when `bind` is not a loopback address.
    pub token: Option<Secret>,
}

#[derive(Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// HTTP/2 besides HTTP/1.1: ALPN `h2` on TLS, h2c with prior knowledge on plain
    /// listeners. Default false.
    pub http2: bool,
    /// Concurrent streams a client may open on one HTTP/2 connection.
    pub http2_max_streams: u32,
    /// `None` for a plain listener.
    pub tls: Option<TlsConfig>,
}

#[derive(Debug)]
pub struct TlsConfig {
    /// The default certificate, used when SNI is absent or matches no `sni` entry.
    pub default: CertKey,
    /// Extra certificates chosen by SNI.
    pub sni: Vec<SniCert>,
}

#[derive(Debug)]
pub struct SniCert {
    /// Lower-cased server name, exact (e.g. "chat.example.com").
    pub server_name: String,
    pub cert: CertKey,
}

/// A certificate chain and its private key, loaded from PEM files and checked to match.
#[derive(Debug)]
pub struct CertKey {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Timeouts; the global table and each route's merged view share this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub client_header: Duration,
    pub upstream_connect: Duration,
    pub upstream_handshake: Duration,
    pub idle: Duration,
    /// `None` when set to "0s" (disabled).
    pub ping_interval: Option<Duration>,
    pub pong_timeout: Duration,
    /// `None` when set to "0s" (disabled, the default).
    pub upstream_ping_interval: Option<Duration>,
    pub shutdown_grace: Duration,
    /// When unset: `DRAIN_SPREAD`, but never longer than `shutdown_grace`.
    pub drain_spread: Duration,
    /// After a close frame was sent or forwarded, how long to wait for the reply.
    pub close: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u64,
    pub max_connections_per_ip: u64,
    /// `None` when "0/s" (unlimited).
    pub handshake_rate_per_ip: Option<Rate>,
    /// Bytes of payload in one client frame.
    pub max_frame_size: u64,
    /// `None` when "0/s" (unlimited, the default).
    pub max_frame_rate: Option<Rate>,
    /// Bytes of one request head (request line, header lines, the empty line ending them).
    pub max_request_head: usize,
    /// Header lines in one request head.
    pub max_request_headers: usize,
    /// Connections that may wait for a request head at once; the oldest is closed for a new one.
    pub max_pending_heads: usize,
}

/// "N/s", "N/m" or "N/h": `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

#[derive(Debug)]
pub struct UpstreamConfig {
    pub name: String,
    /// At least one.
    pub servers: Vec<ServerAddr>,
    pub balance: Balance,
    pub tls: Option<UpstreamTls>,
    pub health: Option<HealthCheck>,
    pub host_header: HostHeader,
    /// WebSocket handshakes in progress towards this upstream at once; more wait.
    pub max_pending_handshakes: u32,
}

/// The `Host` header an upstream receives (`[upstreams.X] host_header`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostHeader {
    /// The client's host (after the absolute-form authority replaced it, if any).
    Preserve,
    /// The address of the server wsgate connected to, as written in `servers`.
    Upstream,
    /// Always this value.
    Literal(String),
}

/// `host:port`, host being an IP literal or a DNS name resolved at connect time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    IpHash,
    /// Lower-cased header name.
    Header(String),
    Cookie(String),
}

#[derive(Debug)]
pub struct UpstreamTls {
    /// Extra trust anchors from `ca` (PEM); empty means none were given.
    pub ca: Vec<CertificateDer<'static>>,
    /// Name to send in SNI and verify; `None` means the server's host.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub host: HostMatch,
    /// Starts with '/', no trailing '/' unless it is exactly "/".
    pub path: String,
    pub target: RouteTarget,
    /// `None` means any origin.
    pub allowed_origins: Option<Vec<String>>,
    pub strip_prefix: bool,
    /// The global timeouts with this route's `[routes.X.timeouts]` laid over them.
    pub timeouts: Timeouts,
    /// `[routes.X.auth]`; shared because the key material is large and never changes.
    pub auth: Option<std::sync::Arc<AuthConfig>>,
}

/// `[routes.X.auth]`, checked: at least one of `jwt` and `forward`.
#[derive(Debug)]
pub struct AuthConfig {
    pub jwt: Option<JwtConfig>,
    pub forward: Option<ForwardConfig>,
    /// (claim, lower-cased header name), sorted by claim.
    pub claims_to_headers: Vec<(String, String)>,
    /// Close a WebSocket at its token's `exp` + leeway (only with `jwt`).
    pub close_on_expiry: bool,
}

/// `jwt = { ... }`.
#[derive(Debug)]
pub struct JwtConfig {
    pub jwks: Option<JwksSource>,
    pub jwks_refresh: Duration,
    /// Trust anchors for an https `jwks` (none: the system's).
    pub jwks_ca: Vec<CertificateDer<'static>>,
    /// The HMAC secret from `secret_file`.
    pub secret: Option<Secret>,
    /// Accepted `iss` values; empty: not checked.
    pub issuers: Vec<String>,
    /// Accepted `aud` values; empty: not checked.
    pub audiences: Vec<String>,
    /// `None`: each key's own (declared, or implied by its type).
    pub algorithms: Option<Vec<jsonwebtoken::Algorithm>>,
    pub leeway: Duration,
    /// Where the token may be, first found wins.
    pub from: Vec<TokenSource>,
}

/// Where a JWKS comes from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// Read (and parsed) when the configuration is loaded.
    File {
        path: PathBuf,
        keys: std::sync::Arc<Vec<jsonwebtoken::jwk::Jwk>>,
    },
    /// Fetched, then refreshed every `jwks_refresh` and on an unknown `kid`.
    Url(http::Uri),
}

/// Key material that must never be printed.
#[derive(Clone)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// One place a token may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A request header (lower-cased); `Authorization` takes the Bearer scheme.
    Header(String),
    /// A query parameter, removed from the URI forwarded upstream.
    Query(String),
    Cookie(String),
    /// A `Sec-WebSocket-Protocol` entry shaped like a JWT, removed from the forwarded list.
    Protocol,
}

/// `forward = { ... }`: an `auth_request`-style subrequest.
#[derive(Debug)]
pub struct ForwardConfig {
    pub url: http::Uri,
    pub timeout: Duration,
    /// Lower-cased header names copied from the auth answer to the upstream request.
    pub copy_headers: Vec<String>,
    /// Trust anchors for an https `url` (none: the system's).
    pub ca: Vec<CertificateDer<'static>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostMatch {
    Any,
    /// Lower-cased, without port.
    Exact(String),
    /// "*.example.com" stored as ".example.com" (lower-cased).
    WildcardSuffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    Upstream(String),
    Builtin(Builtin),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Echo,
}

impl fmt::Display for Balance {
    /// As written in the config: `round_robin`, `header:x-user`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Balance::RoundRobin => f.write_str("round_robin"),
            Balance::LeastConn => f.write_str("least_conn"),
            Balance::IpHash => f.write_str("ip_hash"),
            Balance::Header(name) => write!(f, "header:{name}"),
            Balance::Cookie(name) => write!(f, "cookie:{name}"),
        }
    }
}

impl fmt::Display for HostMatch {
    /// As written in the config; `*` for any host.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostMatch::Any => f.write_str("*"),
            HostMatch::Exact(host) => f.write_str(host),
            HostMatch::WildcardSuffix(suffix) => write!(f, "*{suffix}"),
        }
    }
}

impl fmt::Display for RouteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteTarget::Upstream(name) => write!(f, "upstream {name}"),
            RouteTarget::Builtin(Builtin::Echo) => f.write_str("builtin echo"),
        }
    }
}

pub mod defaults {
    //! Default values for every optional key, each with its unit and the reason for its
    //! value; docs/configuration.md lists the same values.

    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use super::{Balance, HostHeader, LogFormat, Rate};

    /// `[log] level`: one line per notable event; per-request detail is opt-in.
    pub const LOG_LEVEL: &str = "info";
    /// `[log] format`: readable on a terminal; "json" is for log shippers.
    pub const LOG_FORMAT: LogFormat = LogFormat::Text;
    /// `[runtime] worker_threads` (threads): 0 = one per CPU core, tokio's own default.
    pub const WORKER_THREADS: usize = 0;
    pub const SPLICE: bool = true;
    /// `[admin] bind`: loopback only, so metrics and connection control are never public by
    /// accident; 9090 is the customary metrics port.
    pub const ADMIN_BIND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
    /// `[listeners.X] http2`: off until asked for, so ALPN offers only what is wanted.
    pub const LISTENER_HTTP2: bool = false;
    /// `[listeners.X] http2_max_streams`: what browsers open at once on one connection with
    /// room to spare (Chromium stays under 100; nginx and Envoy allow 128 and 100).
    pub const HTTP2_MAX_STREAMS: u32 = 128;

    /// `client_header` (seconds): long enough for slow mobile links, short enough that idle
    /// sockets that never send a request (slowloris) are dropped quickly.
    pub const CLIENT_HEADER: Duration = Duration::from_secs(10);
    /// `upstream_connect` (seconds): a TCP connect inside a data centre takes milliseconds; 5s
    /// covers a lost SYN retransmit (1s, 3s) before trying the next server.
    pub const UPSTREAM_CONNECT: Duration = Duration::from_secs(5);
    /// `upstream_handshake` (seconds): the app must answer the upgrade; past 10s the client
    /// is better served by a 504 and a retry.
    pub const UPSTREAM_HANDSHAKE: Duration = Duration::from_secs(10);
    /// `idle` (minutes): no data frame either way for this long means a forgotten tab or a
    /// dead peer; pings do not count, so keepalive alone does not hold a socket forever.
    pub const IDLE: Duration = Duration::from_secs(5 * 60);
    /// `ping_interval` (seconds): below the common 60s NAT and load balancer idle timeouts.
    pub const PING_INTERVAL: Option<Duration> = Some(Duration::from_secs(30));
    /// `pong_timeout` (seconds): a live client answers a ping within a round trip; 10s
    /// allows for a congested mobile link.
    pub const PONG_TIMEOUT: Duration = Duration::from_secs(10);
    /// `upstream_ping_interval`: off; upstreams usually sit on the same network, no NAT.
    pub const UPSTREAM_PING_INTERVAL: Option<Duration> = None;
    /// `shutdown_grace` (seconds): matches Kubernetes' default termination grace period.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// `drain_spread` (seconds): spreads reconnects so clients do not stampede the next
    /// instance, and leaves most of `shutdown_grace` for close handshakes. When unset and
    /// `shutdown_grace` is shorter, the spread is `shutdown_grace`: a default never
    /// conflicts with a value written in the file.
    pub const DRAIN_SPREAD: Duration = Duration::from_secs(5);
    /// `close` (seconds): a live peer answers a close frame within a round trip; 5s allows
    /// for a congested mobile link without holding sockets of dead peers for long.
    pub const CLOSE: Duration = Duration::from_secs(5);

    /// `max_connections` (connections): live WebSockets per process; at a few tens of KiB
    /// of buffers each this stays within a few GiB of memory.
    pub const MAX_CONNECTIONS: u64 = 100_000;
    /// `max_connections_per_ip` (connections): 0, no limit. Offices behind one NAT, load
    /// tests, conformance suites and a drain's reconnect ramp all come from one address; a
    /// per-address limit is the operator's choice (proxy.toml.example shows one).
    pub const MAX_CONNECTIONS_PER_IP: u64 = 0;
    /// `handshake_rate_per_ip`: unlimited, for the same reasons.
    pub const HANDSHAKE_RATE_PER_IP: Option<Rate> = None;
    /// `max_frame_size` (bytes, 1 MiB): larger than chat or game messages, small enough that
    /// one client cannot make the upstream buffer a huge message.
    pub const MAX_FRAME_SIZE: u64 = 1 << 20;
    /// `max_frame_rate`: unlimited; a per-connection frame budget depends on the app.
    pub const MAX_FRAME_RATE: Option<Rate> = None;
    /// `max_request_head` (bytes, 64 KiB): twice nginx's default header buffers (4 x 8 KiB),
    /// above Envoy's 60 KiB; cookie-heavy apps stay well below it.
    pub const MAX_REQUEST_HEAD: usize = 64 * 1024;
    /// `max_request_headers` (header lines): Envoy's and hyper's default; browsers send 10-20.
    pub const MAX_REQUEST_HEADERS: usize = 100;
    /// `max_pending_heads` (connections): sized for a 2 GiB box. A connection waiting for its
    /// head holds about 1 KiB plus the bytes it has sent (docs/performance.md), at most
    /// `max_request_head` + a few KiB, so 10,000 stay under ~700 MiB even in the worst case,
    /// while real clients finish their heads within milliseconds and never come close.
    pub const MAX_PENDING_HEADS: usize = 10_000;
    /// `[upstreams.X] host_header`: the client's host, as nginx's `$host` and Traefik's
    /// `passHostHeader = true`: apps build links from it.
    pub const HOST_HEADER: HostHeader = HostHeader::Preserve;

    /// `[upstreams.X] balance`: the simplest mode, needs no state.
    pub const BALANCE: Balance = Balance::RoundRobin;
    /// `tls.enabled` when an upstream has a `tls` table: writing the table means TLS is wanted.
    pub const UPSTREAM_TLS_ENABLED: bool = true;
    /// `health.path`: the common convention, and what wsgate's own admin listener serves.
    pub const HEALTH_PATH: &str = "/healthz";
    /// `health.interval` (seconds): notices a dead server within ~15s at the default
    /// `unhealthy_after`, for one small request per server every 5s.
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
    /// `health.timeout` (seconds): a health endpoint should answer in milliseconds.
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
    /// `health.unhealthy_after` (failed checks in a row): one lost packet is not an outage.
    pub const HEALTH_UNHEALTHY_AFTER: u32 = 3;
    /// `health.healthy_after` (passed checks in a row): a flapping server stays out a little
    /// longer than a healthy one would need.
    pub const HEALTH_HEALTHY_AFTER: u32 = 2;

    /// `[routes.X] path`: a route without a path covers every path of its host.
    pub const ROUTE_PATH: &str = "/";
    /// `[routes.X] strip_prefix`: the upstream sees the path the client asked for.
    pub const ROUTE_STRIP_PREFIX: bool = false;
    /// `[upstreams.X] max_pending_handshakes`: enough for any steady load (a handshake
    /// takes a millisecond or two), low enough that a reconnect storm after an app
    /// restart reaches the app as a queue rather than 10,000 connects at once.
    pub const MAX_PENDING_HANDSHAKES: u32 = 256;
    /// `[routes.X.auth] jwt.leeway`: clock skew tolerated on `exp` and `nbf`; what Envoy
    /// and most JWT libraries allow.
    pub const JWT_LEEWAY: Duration = Duration::from_secs(30);
    /// `jwt.jwks_refresh`: how often a JWKS URL is fetched again; key rotations publish
    /// the new key well ahead, and an unknown `kid` fetches at once anyway.
    pub const JWKS_REFRESH: Duration = Duration::from_secs(5 * 60);
    /// `forward.timeout`: an auth service slower than this is failing (504).
    pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
    /// `jwt.from`: the standard place (RFC 6750).
    pub const JWT_FROM: &str = "header:Authorization";
}

impl Default for Timeouts {
    /// The defaults of the `[timeouts]` table (see [`defaults`]).
    fn default() -> Self {
        Timeouts {
            client_header: defaults::CLIENT_HEADER,
            upstream_connect: defaults::UPSTREAM_CONNECT,
            upstream_handshake: defaults::UPSTREAM_HANDSHAKE,
            idle: defaults::IDLE,
            ping_interval: defaults::PING_INTERVAL,
            pong_timeout: defaults::PONG_TIMEOUT,
            upstream_ping_interval: defaults::UPSTREAM_PING_INTERVAL,
            shutdown_grace: defaults::SHUTDOWN_GRACE,
            drain_spread: defaults::DRAIN_SPREAD,
            close: defaults::CLOSE,
        }
    }
}

impl Default for Limits {
    /// The defaults of the `[limits]` table (see [`defaults`]).
    fn default() -> Self {
        Limits {
            max_connections: defaults::MAX_CONNECTIONS,
            max_connections_per_ip: defaults::MAX_CONNECTIONS_PER_IP,
            handshake_rate_per_ip: defaults::HANDSHAKE_RATE_PER_IP,
            max_frame_size: defaults::MAX_FRAME_SIZE,
            max_frame_rate: defaults::MAX_FRAME_RATE,
            max_request_head: defaults::MAX_REQUEST_HEAD,
            max_request_headers: defaults::MAX_REQUEST_HEADERS,
            max_pending_heads: defaults::MAX_PENDING_HEADS,
        }
    }
}

impl Config {
    /// Reads and validates the file. Relative paths inside (cert, key, ca) resolve against
    /// the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            diagnostics: vec![Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("cannot read the config file: {e}"),
            }],
        })?;
        Config::from_toml(&text, path)
    }

    /// Same, from text already read; `source` is used for messages and relative paths.
    pub fn from_toml(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        match validate::check(text, source, &mut problems) {
            Some(config) if problems.is_empty() => Ok(config),
            _ => {
                if problems.is_empty() {
                    problems.push(raw::Problem::whole_file("invalid configuration"));
                }
                Err(ConfigError::from_problems(text, source, problems))
            }
        }
    }

    /// One-screen summary for `wsgate check`: listeners (name, bind, tls yes/no + cert
    /// names, http2), routes (name, host, path -> upstream/builtin), upstreams (name,
    /// balance, servers). Plain text, ends with newline.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{}: configuration OK ({} listener{}, {} route{}, {} upstream{})\n",
            self.source.display(),
            self.listeners.len(),
            plural(self.listeners.len()),
            self.routes.len(),
            plural(self.routes.len()),
            self.upstreams.len(),
            plural(self.upstreams.len()),
        );
        out.push_str(&format!("admin: {}\n", self.admin.bind));

        out.push_str("listeners:\n");
        let rows = self.listeners.iter().map(|l| {
            let tls =
                match &l.tls {
                    None => "tls: no".to_string(),
                    Some(tls) => {
                        let mut names = vec![tls.default.cert_path.display().to_string()];
                        names.extend(tls.sni.iter().map(|s| {
                            format!("{} ({})", s.server_name, s.cert.cert_path.display())
                        }));
                        format!("tls: yes, certs: {}", names.join(", "))
                    }
                };
            vec![
                l.name.clone(),
                l.bind.to_string(),
                format!("http2: {}", if l.http2 { "yes" } else { "no" }),
                tls,
            ]
        });
        out.push_str(&table(rows));

        out.push_str("routes:\n");
        let rows = self.routes.iter().map(|r| {
            vec![
                r.name.clone(),
                format!("host {}", r.host),
                format!("path {}", r.path),
                format!("-> {}", r.target),
            ]
        });
        out.push_str(&table(rows));

        out.push_str("upstreams:\n");
        let rows = self.upstreams.iter().map(|u| {
            let servers: Vec<String> = u.servers.iter().map(ToString::to_string).collect();
            vec![u.name.clone(), u.balance.to_string(), servers.join(", ")]
        });
        let upstreams = table(rows);
        if upstreams.is_empty() {
            out.push_str("  (none)\n");
        } else {
            out.push_str(&upstreams);
        }
        out
    }

    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The route called `name`.
    pub fn route(&self, name: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| r.name == name)
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Rows as left-aligned columns, indented by two spaces, one line each.
fn table(rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(" ");
        for (cell, width) in row.iter().zip(&widths) {
            line.push(' ');
            line.push_str(cell);
            line.push_str(&" ".repeat(width - cell.chars().count() + 1));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Every problem found in a config file (all of them, not just the first).
#[derive(Debug)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

/// One problem and where it is. `line` and `column` are 1-based (column in characters);
/// both are 0 when the problem has no position (e.g. the file cannot be read).
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl ConfigError {
    /// Positions the problems in `text` and orders them as they appear in the file.
    fn from_problems(text: &str, source: &Path, mut problems: Vec<raw::Problem>) -> Self {
        problems.sort_by_key(|p| p.span.as_ref().map(|s| s.start));
        problems.dedup();
        let diagnostics = problems
            .into_iter()
            .map(|p| {
                let (line, column) = match p.span {
                    Some(span) => line_column(text, span.start),
                    None => (0, 0),
                };
                Diagnostic {
                    file: source.to_path_buf(),
                    line,
                    column,
                    message: p.message,
                }
            })
            .collect();
        ConfigError { diagnostics }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

impl fmt::Display for ConfigError {
    /// One diagnostic per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}
