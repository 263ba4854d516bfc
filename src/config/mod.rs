//! Configuration: raw TOML types are parsed and checked into the validated [`Config`] below,
//! which is all the rest of wsgate ever sees. Every error names file, line and column.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Default 127.0.0.1:9090.
    pub bind: SocketAddr,
}

#[derive(Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// Accepted and validated; HTTP/2 serving arrives later. Default false.
    pub http2: bool,
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
    pub drain_spread: Duration,
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
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

// Temporary stand-ins until the loader lands.
#[derive(Debug)]
pub struct ConfigError;
impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("config error")
    }
}
impl Config {
    pub fn load(_path: &std::path::Path) -> Result<Config, ConfigError> {
        Err(ConfigError)
    }
    pub fn summary(&self) -> String {
        String::new()
    }
}
