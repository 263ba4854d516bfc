//! Raw config -> validated [`Config`]: defaults, syntax of every value, cross-checks between
//! tables, and loading of certificate files. Every problem is collected, none stops the rest.
//!
//! One rule keeps the checks simple: a check that finds a problem reports it and carries on
//! with a stand-in (the default, or nothing), and [`check`] returns a [`Config`] only when no
//! problem was reported at all, so no stand-in ever reaches the rest of wsgate. A check
//! returns `Option` only where there is no stand-in (a certificate that did not load); where
//! a later check must know whether earlier ones passed (two routes claiming the same place),
//! it compares [`Checker::mark`]s.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use toml::Spanned;

use super::defaults;

#[path = "auth.rs"]
mod auth;
use super::raw::{
    self, key_segment, NamedTables, Problem, RawConfig, RawHealth, RawLimits, RawListener,
    RawRoute, RawTimeouts, RawTls, RawUpstream, RawUpstreamTls, UnitText,
};
use super::units::{format_duration, parse_duration, parse_rate, parse_size};
use super::values::{
    check_log_level, clash, clash_reason, normalize_origin, normalize_path, parse_balance,
    parse_bind, parse_host, parse_host_header, parse_server, parse_sni_name, pem_error,
};
use super::{
    AdminConfig, Builtin, CertKey, Config, HealthCheck, HostMatch, Limits, ListenerConfig,
    LogConfig, LogFormat, Rate, RouteConfig, RouteTarget, RuntimeConfig, Secret, ServerAddr,
    SniCert, Timeouts, TlsConfig, UpstreamConfig, UpstreamTls,
};
pub use auth::token_source;

/// Most `max_pending_handshakes`: tokio's semaphore holds fewer than 2^61 permits; a
/// million is already more than any server accepts at once.
const MAX_PENDING_HANDSHAKES_LIMIT: u32 = 1_000_000;

/// Shortest admin token accepted: 16 random characters cannot be guessed over a network.
const MIN_ADMIN_TOKEN: usize = 16;

/// Most tokio worker threads accepted. More is a typo or a misunderstanding (threads beyond
/// the core count only add contention), and it bounds memory spent on thread stacks.
pub const MAX_WORKER_THREADS: i64 = 1024;

/// Largest `max_frame_size`: 2^63 bytes, the biggest payload length RFC 6455 can express.
pub const MAX_FRAME_SIZE_LIMIT: u64 = 1 << 63;

/// Bounds of `max_request_head`: below 1 KiB real browser heads (cookies, user agents) are
/// refused; above 1 MiB a head is no longer a head but an attack on memory.
const MIN_REQUEST_HEAD: u64 = 1024;
const MAX_REQUEST_HEAD_LIMIT: u64 = 1 << 20;
/// Most `max_request_headers`: ten times what any real client sends.
const MAX_REQUEST_HEADERS_LIMIT: i64 = 1000;

/// Parses and checks `text` (read from `source`) into a [`Config`]. Every problem found is
/// appended to `problems`; the result is `Some` only when there are none.
pub fn check(text: &str, source: &Path, problems: &mut Vec<Problem>) -> Option<Config> {
    let start = problems.len();
    let raw = raw::parse(text, problems)?;
    let base_dir = source.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut checker = Checker {
        base_dir,
        problems,
        provider: rustls::crypto::ring::default_provider(),
    };
    let config = checker.config(raw, source);
    (problems.len() == start).then_some(config)
}

/// How a value is quoted in messages: strings in quotes, unit values as they were written.
trait Shown {
    fn shown(&self) -> String;
}

impl Shown for String {
    fn shown(&self) -> String {
        format!("{self:?}")
    }
}

impl Shown for UnitText {
    fn shown(&self) -> String {
        UnitText::shown(self)
    }
}

/// Holds what every check needs: where relative paths start, the problem list, and the
/// crypto provider used to check that keys match certificates.
struct Checker<'a> {
    base_dir: PathBuf,
    problems: &'a mut Vec<Problem>,
    provider: CryptoProvider,
}

/// A point in the problem list: [`Checker::clean_since`] says whether anything came after.
#[derive(Clone, Copy)]
struct Mark(usize);

impl Checker<'_> {
    fn report(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.problems.push(Problem::at(span, message));
    }

    fn mark(&self) -> Mark {
        Mark(self.problems.len())
    }

    fn clean_since(&self, mark: Mark) -> bool {
        self.problems.len() == mark.0
    }

    /// Parses one value; on failure reports `invalid WHAT VALUE PLACE: ERROR` at the value
    /// (`place` is "for KEY" or "in KEY").
    fn parse<V: Shown, T>(
        &mut self,
        value: &Spanned<V>,
        what: &str,
        place: &str,
        parse: impl FnOnce(&V) -> Result<T, String>,
    ) -> Option<T> {
        match parse(value.get_ref()) {
            Ok(parsed) => Some(parsed),
            Err(e) => {
                let message = format!("invalid {what} {} {place}: {e}", value.get_ref().shown());
                self.report(value.span(), message);
                None
            }
        }
    }

    fn config(&mut self, raw: RawConfig, source: &Path) -> Config {
        let log = self.log(raw.log);
        let runtime = self.runtime(raw.runtime);
        let admin = self.admin(raw.admin);
        let timeouts = self.global_timeouts(raw.timeouts.as_ref());
        let limits = self.limits(raw.limits);
        let listeners = self.listeners(raw.listeners, &admin);
        let upstreams = self.upstreams(raw.upstreams);
        let routes = self.routes(raw.routes, &upstreams, timeouts);
        Config {
            source: source.to_path_buf(),
            log,
            runtime,
            admin: admin.config,
            listeners,
            timeouts,
            limits,
            upstreams: upstreams.configs,
            routes,
        }
    }

    // ----- [log], [runtime], [admin] -----

    fn log(&mut self, raw: Option<raw::RawLog>) -> LogConfig {
        let mut log = LogConfig {
            level: defaults::LOG_LEVEL.to_string(),
            format: defaults::LOG_FORMAT,
        };
        let Some(raw) = raw else { return log };
        if let Some(level) = raw.level {
            if self
                .parse(&level, "log level", "for log.level", |l| check_log_level(l))
                .is_some()
            {
                log.level = level.into_inner();
            }
        }
        if let Some(format) = raw.format {
            let format = self.parse(&format, "log format", "for log.format", |f| {
                match f.as_str() {
                    "text" => Ok(LogFormat::Text),
                    "json" => Ok(LogFormat::Json),
                    _ => Err(r#"expected "text" or "json""#.to_string()),
                }
            });
            log.format = format.unwrap_or(log.format);
        }
        log
    }

    fn runtime(&mut self, raw: Option<raw::RawRuntime>) -> RuntimeConfig {
        let mut runtime = RuntimeConfig {
            worker_threads: defaults::WORKER_THREADS,
            splice: raw
                .as_ref()
                .and_then(|r| r.splice)
                .unwrap_or(defaults::SPLICE),
        };
        if let Some(threads) = raw.and_then(|r| r.worker_threads) {
            let n = *threads.get_ref();
            match usize::try_from(n) {
                Ok(n) if n as i64 <= MAX_WORKER_THREADS => runtime.worker_threads = n,
                _ => self.report(
                    threads.span(),
                    format!(
                        "invalid runtime.worker_threads {n}: expected 0 (one per CPU core) up to {MAX_WORKER_THREADS}"
                    ),
                ),
            }
        }
        runtime
    }

    fn admin(&mut self, raw: Option<raw::RawAdmin>) -> CheckedAdmin {
        let mut admin = CheckedAdmin {
            config: AdminConfig {
                bind: defaults::ADMIN_BIND,
                token: None,
            },
            span: None,
        };
        let Some(raw) = raw else { return admin };
        if let Some(bind) = &raw.bind {
            if let Some(addr) = self.parse(bind, "address", "for admin.bind", |b| parse_bind(b)) {
                admin.config.bind = addr;
                admin.span = Some(bind.span());
            }
        }
        if let Some(file) = &raw.token_file {
            admin.config.token = self.admin_token(file);
        }
        if let (Some(bind), None, None) = (&raw.bind, &raw.token_file, &admin.config.token) {
            if !admin.config.bind.ip().is_loopback() {
                self.report(
                    bind.span(),
                    format!(
                        "admin.bind {} is reachable from other machines: set admin.token_file (a file holding a bearer token) so only its holders can list and close connections and reload; /metrics, /healthz and /readyz stay open",
                        admin.config.bind
                    ),
                );
            }
        }
        admin
    }

    /// `[admin] token_file`: at least [`MIN_ADMIN_TOKEN`] characters, the trailing newline
    /// an editor or `echo` adds not counted.
    fn admin_token(&mut self, file: &Spanned<String>) -> Option<Secret> {
        let mut bytes = self.read_file(file, "token", "admin.token_file")?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        let printable = bytes.iter().all(|b| b.is_ascii_graphic());
        if bytes.len() < MIN_ADMIN_TOKEN || !printable {
            self.report(
                file.span(),
                format!(
                    "the token in {:?} for admin.token_file must be at least {MIN_ADMIN_TOKEN} printable characters without spaces (e.g. `openssl rand -hex 32 > {}`)",
                    file.get_ref(),
                    file.get_ref()
                ),
            );
            return None;
        }
        Some(Secret(bytes))
    }

    // ----- [timeouts] and [limits] -----

    fn global_timeouts(&mut self, raw: Option<&RawTimeouts>) -> Timeouts {
        let base = Timeouts::default();
        let Some(raw) = raw else { return base };
        let mut timeouts = self.timeouts_over(base, raw, "timeouts");
        match (&raw.drain_spread, &raw.shutdown_grace) {
            // Unset, the spread fits the grace; unset, the grace makes room for the spread.
            (None, _) => timeouts.drain_spread = timeouts.drain_spread.min(timeouts.shutdown_grace),
            (Some(_), None) => {
                timeouts.shutdown_grace = timeouts.shutdown_grace.max(timeouts.drain_spread)
            }
            (Some(_), Some(_)) => {}
        }
        if let (Some(value), true) = (
            &raw.drain_spread,
            timeouts.drain_spread > timeouts.shutdown_grace,
        ) {
            self.report(
                value.span(),
                format!(
                    "timeouts.drain_spread ({}) is longer than timeouts.shutdown_grace ({}): the last close frames would be sent after the drain has already forced connections shut; make drain_spread at most shutdown_grace",
                    format_duration(timeouts.drain_spread),
                    format_duration(timeouts.shutdown_grace)
                ),
            );
        }
        timeouts
    }

    /// `raw` laid over `base`; `prefix` is the table path for messages.
    fn timeouts_over(&mut self, base: Timeouts, raw: &RawTimeouts, prefix: &str) -> Timeouts {
        let mut t = base;
        let key = |name: &str| format!("{prefix}.{name}");
        let positive = [
            (&raw.client_header, &mut t.client_header, "client_header"),
            (
                &raw.upstream_connect,
                &mut t.upstream_connect,
                "upstream_connect",
            ),
            (
                &raw.upstream_handshake,
                &mut t.upstream_handshake,
                "upstream_handshake",
            ),
            (&raw.idle, &mut t.idle, "idle"),
            (&raw.pong_timeout, &mut t.pong_timeout, "pong_timeout"),
            (&raw.shutdown_grace, &mut t.shutdown_grace, "shutdown_grace"),
            (&raw.close, &mut t.close, "close"),
        ];
        for (value, slot, name) in positive {
            if let Some(value) = value {
                *slot = self.positive_duration(value, &key(name), *slot);
            }
        }
        let switchable = [
            (&raw.ping_interval, &mut t.ping_interval, "ping_interval"),
            (
                &raw.upstream_ping_interval,
                &mut t.upstream_ping_interval,
                "upstream_ping_interval",
            ),
        ];
        for (value, slot, name) in switchable {
            if let Some(d) = value.as_ref().and_then(|v| self.duration(v, &key(name))) {
                *slot = zero_is_off(d);
            }
        }
        if let Some(d) = raw
            .drain_spread
            .as_ref()
            .and_then(|v| self.duration(v, &key("drain_spread")))
        {
            t.drain_spread = d;
        }
        t
    }

    fn duration(&mut self, value: &Spanned<UnitText>, key: &str) -> Option<Duration> {
        self.parse(value, "duration", &format!("for {key}"), |v| {
            parse_duration(&v.text)
        })
    }

    /// A duration that must be more than zero; `fallback` is used after reporting a problem.
    fn positive_duration(
        &mut self,
        value: &Spanned<UnitText>,
        key: &str,
        fallback: Duration,
    ) -> Duration {
        match self.duration(value, key) {
            Some(d) if d.is_zero() => {
                self.report(
                    value.span(),
                    format!(
                        "{key} must be more than zero (it cannot be switched off), e.g. \"{}\"",
                        format_duration(fallback)
                    ),
                );
                fallback
            }
            Some(d) => d,
            None => fallback,
        }
    }

    fn limits(&mut self, raw: Option<RawLimits>) -> Limits {
        let mut limits = Limits::default();
        let Some(raw) = raw else { return limits };
        let counts = [
            (
                &raw.max_connections,
                &mut limits.max_connections,
                "max_connections",
                1,
                i64::MAX,
            ),
            (
                &raw.max_connections_per_ip,
                &mut limits.max_connections_per_ip,
                "max_connections_per_ip",
                0,
                i64::MAX,
            ),
        ];
        for (value, slot, name, min, max) in counts {
            if let Some(value) = value {
                *slot = self
                    .count(value, &format!("limits.{name}"), min, max)
                    .unwrap_or(*slot);
            }
        }
        let small_counts = [
            (
                &raw.max_request_headers,
                &mut limits.max_request_headers,
                "max_request_headers",
                MAX_REQUEST_HEADERS_LIMIT,
            ),
            (
                &raw.max_pending_heads,
                &mut limits.max_pending_heads,
                "max_pending_heads",
                i64::from(u32::MAX),
            ),
        ];
        for (value, slot, name, max) in small_counts {
            if let Some(value) = value {
                let n = self.count(value, &format!("limits.{name}"), 1, max);
                *slot = n.and_then(|n| usize::try_from(n).ok()).unwrap_or(*slot);
            }
        }
        let rates = [
            (
                &raw.handshake_rate_per_ip,
                &mut limits.handshake_rate_per_ip,
                "handshake_rate_per_ip",
            ),
            (
                &raw.max_frame_rate,
                &mut limits.max_frame_rate,
                "max_frame_rate",
            ),
        ];
        for (value, slot, name) in rates {
            if let Some(value) = value {
                *slot = self.rate(value, &format!("limits.{name}")).unwrap_or(*slot);
            }
        }
        if let Some(v) = &raw.max_frame_size {
            match self.size(v, "limits.max_frame_size") {
                Some(0) => self.report(
                    v.span(),
                    r#"limits.max_frame_size must be more than zero, e.g. "1MiB""#,
                ),
                Some(n) if n > MAX_FRAME_SIZE_LIMIT => self.report(
                    v.span(),
                    "limits.max_frame_size is larger than a WebSocket frame can be (2^63 bytes)",
                ),
                Some(n) => limits.max_frame_size = n,
                None => {}
            }
        }
        if let Some(v) = &raw.max_request_head {
            match self.size(v, "limits.max_request_head") {
                Some(n) if (MIN_REQUEST_HEAD..=MAX_REQUEST_HEAD_LIMIT).contains(&n) => {
                    limits.max_request_head = n as usize;
                }
                Some(_) => self.report(
                    v.span(),
                    r#"limits.max_request_head must be between 1KiB and 1MiB, e.g. "64KiB""#,
                ),
                None => {}
            }
        }
        limits
    }

    fn size(&mut self, value: &Spanned<UnitText>, key: &str) -> Option<u64> {
        self.parse(value, "size", &format!("for {key}"), |v| {
            parse_size(&v.text)
        })
    }

    fn rate(&mut self, value: &Spanned<UnitText>, key: &str) -> Option<Option<Rate>> {
        self.parse(value, "rate", &format!("for {key}"), |v| {
            parse_rate(&v.text)
        })
    }

    /// A whole number in `min..=max`.
    fn count(&mut self, value: &Spanned<i64>, key: &str, min: i64, max: i64) -> Option<u64> {
        let n = *value.get_ref();
        if n < min || n > max {
            let range = if max == i64::MAX {
                format!("at least {min}")
            } else {
                format!("between {min} and {max}")
            };
            self.report(value.span(), format!("invalid {key} {n}: expected {range}"));
            return None;
        }
        u64::try_from(n).ok()
    }

    // ----- [listeners] -----

    fn listeners(
        &mut self,
        raw: Option<NamedTables<RawListener>>,
        admin: &CheckedAdmin,
    ) -> Vec<ListenerConfig> {
        let Some(raw) = raw else {
            self.problems.push(Problem::whole_file(
                r#"no listeners: add at least one, e.g. [listeners.public] with bind = "0.0.0.0:8080""#,
            ));
            return Vec::new();
        };
        if raw.entries.is_empty() {
            self.report(
                raw.span,
                r#"[listeners] is empty: add at least one, e.g. [listeners.public] with bind = "0.0.0.0:8080""#,
            );
            return Vec::new();
        }
        let mut entries = raw.entries;
        entries.sort_by_key(|e| e.span.start);
        // Addresses taken so far, in file order, to report clashes at the later one.
        let mut taken: Vec<(SocketAddr, String)> = vec![(
            admin.config.bind,
            if admin.span.is_some() {
                "admin.bind".to_string()
            } else {
                format!("admin.bind (default {})", admin.config.bind)
            },
        )];
        let mut out = Vec::new();
        for entry in entries {
            self.check_name(&entry.name, "listener");
            let Some(raw) = entry.value else { continue };
            let name = entry.name.into_inner();
            let path = format!("listeners.{}", key_segment(&name));
            let bind = self.parse(&raw.bind, "address", &format!("for {path}.bind"), |b| {
                parse_bind(b)
            });
            if let Some(addr) = bind {
                if let Some(other) = taken
                    .iter()
                    .find_map(|(a, who)| clash(*a, addr).then_some(who))
                {
                    let message = format!(
                        "{path}.bind {addr} clashes with {other}: {}",
                        clash_reason(addr)
                    );
                    self.report(raw.bind.span(), message);
                }
                taken.push((addr, format!("{path}.bind")));
            }
            let tls = match raw.tls {
                Some(tls) => self.listener_tls(tls, &path).map(Some),
                None => Some(None),
            };
            let max_streams = match &raw.http2_max_streams {
                Some(value) => self.count(
                    value,
                    &format!("{path}.http2_max_streams"),
                    1,
                    i64::from(u32::MAX),
                ),
                None => Some(u64::from(defaults::HTTP2_MAX_STREAMS)),
            };
            if let (Some(bind), Some(tls), Some(max_streams)) = (bind, tls, max_streams) {
                out.push(ListenerConfig {
                    name,
                    bind,
                    http2: raw.http2.unwrap_or(defaults::LISTENER_HTTP2),
                    // Bounded by the `count` range above.
                    http2_max_streams: max_streams as u32,
                    tls,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn listener_tls(&mut self, raw: RawTls, path: &str) -> Option<TlsConfig> {
        let tls_path = format!("{path}.tls");
        let default = self.cert_key(&raw.cert, &raw.key, &tls_path);
        let mut sni = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, entry) in raw.sni.unwrap_or_default().into_iter().enumerate() {
            let entry_path = format!("{tls_path}.sni[{i}]");
            let server_name = self.parse(
                &entry.server_name,
                "server_name",
                &format!("in {entry_path}"),
                |n| parse_sni_name(n),
            );
            if let Some(n) = &server_name {
                if let Some(first) = seen.get(n) {
                    self.report(
                        entry.server_name.span(),
                        format!(
                            "server_name {n:?} appears twice in {tls_path}.sni (entries {first} and {i}); each name can have one certificate"
                        ),
                    );
                } else {
                    seen.insert(n.clone(), i);
                }
            }
            let cert = self.cert_key(&entry.cert, &entry.key, &entry_path);
            if let (Some(server_name), Some(cert)) = (server_name, cert) {
                sni.push(SniCert { server_name, cert });
            }
        }
        Some(TlsConfig {
            default: default?,
            sni,
        })
    }

    /// Loads a certificate chain and its key and checks that they belong together.
    fn cert_key(
        &mut self,
        cert: &Spanned<String>,
        key: &Spanned<String>,
        path: &str,
    ) -> Option<CertKey> {
        let cert_path = self.resolve(cert.get_ref());
        let key_path = self.resolve(key.get_ref());
        let chain = self.certificates(cert, &format!("{path}.cert"));
        let private_key = self.private_key(key, &format!("{path}.key"));
        let (chain, private_key) = (chain?, private_key?);
        let problem = match rustls::sign::CertifiedKey::from_der(
            chain.clone(),
            private_key.clone_key(),
            &self.provider,
        ) {
            Ok(_) => {
                return Some(CertKey {
                    cert_path,
                    key_path,
                    chain,
                    key: private_key,
                })
            }
            Err(rustls::Error::InconsistentKeys(_)) => (
                key.span(),
                format!(
                    "private key {:?} does not match certificate {:?} ({path}): the key must be the one the certificate was issued for",
                    key.get_ref(),
                    cert.get_ref()
                ),
            ),
            Err(rustls::Error::InvalidCertificate(e)) => (
                cert.span(),
                format!(
                    "certificate {:?} for {path}.cert cannot be used: {e}",
                    cert.get_ref()
                ),
            ),
            Err(e) => (
                key.span(),
                format!(
                    "private key {:?} for {path}.key cannot be used: {e} (supported: RSA, ECDSA P-256/P-384, Ed25519)",
                    key.get_ref()
                ),
            ),
        };
        self.report(problem.0, problem.1);
        None
    }

    /// A relative path from the config is relative to the config file's folder.
    fn resolve(&self, path: &str) -> PathBuf {
        self.base_dir.join(path)
    }

    /// Reads a file named by a config value, reporting failure at the value.
    fn read_file(&mut self, value: &Spanned<String>, what: &str, key: &str) -> Option<Vec<u8>> {
        let resolved = self.resolve(value.get_ref());
        match std::fs::read(&resolved) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                let looked = if resolved.as_path() == Path::new(value.get_ref()) {
                    String::new()
                } else {
                    format!(" (looked for {})", resolved.display())
                };
                self.report(
                    value.span(),
                    format!(
                        "cannot read {what} file {:?} for {key}: {e}{looked}; relative paths are relative to the config file's folder",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// Every certificate in a PEM file; at least one.
    fn certificates(
        &mut self,
        value: &Spanned<String>,
        key: &str,
    ) -> Option<Vec<CertificateDer<'static>>> {
        let bytes = self.read_file(value, "certificate", key)?;
        let chain: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
        let message = match chain {
            Ok(chain) if !chain.is_empty() => return Some(chain),
            Ok(_) => {
                let swapped = if PrivateKeyDer::from_pem_slice(&bytes).is_ok() {
                    " (it holds a private key: are cert and key swapped?)"
                } else {
                    ""
                };
                format!(
                    "no certificate found in {:?} for {key}{swapped}: expected PEM blocks \"-----BEGIN CERTIFICATE-----\"",
                    value.get_ref()
                )
            }
            Err(e) => format!(
                "invalid PEM in {:?} for {key}: {}",
                value.get_ref(),
                pem_error(&e)
            ),
        };
        self.report(value.span(), message);
        None
    }

    fn private_key(
        &mut self,
        value: &Spanned<String>,
        key: &str,
    ) -> Option<PrivateKeyDer<'static>> {
        let bytes = self.read_file(value, "private key", key)?;
        let message = match PrivateKeyDer::from_pem_slice(&bytes) {
            Ok(k) => return Some(k),
            Err(pem::Error::NoItemsFound) => format!(
                "no private key found in {:?} for {key}: expected a PEM block \"-----BEGIN PRIVATE KEY-----\" (PKCS#8), \"-----BEGIN RSA PRIVATE KEY-----\" (PKCS#1) or \"-----BEGIN EC PRIVATE KEY-----\" (SEC1)",
                value.get_ref()
            ),
            Err(e) => format!(
                "invalid PEM in {:?} for {key}: {}",
                value.get_ref(),
                pem_error(&e)
            ),
        };
        self.report(value.span(), message);
        None
    }

    // ----- [upstreams] -----

    fn upstreams(&mut self, raw: Option<NamedTables<RawUpstream>>) -> CheckedUpstreams {
        let mut checked = CheckedUpstreams::default();
        let Some(raw) = raw else { return checked };
        for entry in raw.entries {
            self.check_name(&entry.name, "upstream");
            let name = entry.name.into_inner();
            checked.names.insert(name.clone());
            if let Some(raw) = entry.value {
                if let Some(upstream) = self.upstream(name, raw) {
                    checked.configs.push(upstream);
                }
            }
        }
        checked.configs.sort_by(|a, b| a.name.cmp(&b.name));
        checked
    }

    fn upstream(&mut self, name: String, raw: RawUpstream) -> Option<UpstreamConfig> {
        let path = format!("upstreams.{}", key_segment(&name));
        let mut servers: Vec<ServerAddr> = Vec::new();
        if raw.servers.get_ref().is_empty() {
            self.report(
                raw.servers.span(),
                format!(r#"{path}.servers is empty: list at least one "host:port", e.g. servers = ["127.0.0.1:9001"]"#),
            );
        }
        for server in raw.servers.get_ref() {
            let place = format!("in {path}.servers");
            match self.parse(server, "server", &place, |s| parse_server(s)) {
                Some(addr) if servers.contains(&addr) => self.report(
                    server.span(),
                    format!("server {addr} is listed twice in {path}.servers"),
                ),
                Some(addr) => servers.push(addr),
                None => {}
            }
        }
        let balance = raw.balance.and_then(|b| {
            self.parse(&b, "balance", &format!("for {path}.balance"), |b| {
                parse_balance(b)
            })
        });
        let host_header = raw.host_header.and_then(|h| {
            self.parse(&h, "host_header", &format!("for {path}.host_header"), |h| {
                parse_host_header(h)
            })
        });
        let tls = match raw.tls {
            None => None,
            Some(tls) => self.upstream_tls(tls, &path)?,
        };
        let health = raw.health.map(|h| self.health(h, &path));
        let max_pending_handshakes = raw
            .max_pending_handshakes
            .and_then(|v| {
                self.count(
                    &v,
                    &format!("{path}.max_pending_handshakes"),
                    1,
                    i64::from(MAX_PENDING_HANDSHAKES_LIMIT),
                )
            })
            .map_or(defaults::MAX_PENDING_HANDSHAKES, |n| {
                u32::try_from(n).unwrap_or(MAX_PENDING_HANDSHAKES_LIMIT)
            });
        Some(UpstreamConfig {
            max_pending_handshakes,
            name,
            servers,
            balance: balance.unwrap_or(defaults::BALANCE),
            tls,
            health,
            host_header: host_header.unwrap_or(defaults::HOST_HEADER),
        })
    }

    /// `Some(None)` for a valid table with `enabled = false`; `None` when the CA did not load.
    fn upstream_tls(&mut self, raw: RawUpstreamTls, path: &str) -> Option<Option<UpstreamTls>> {
        let ca = match &raw.ca {
            Some(ca) => self.certificates(ca, &format!("{path}.tls.ca"))?,
            None => Vec::new(),
        };
        let mut server_name = None;
        if let Some(n) = &raw.server_name {
            match ServerName::try_from(n.get_ref().as_str()) {
                Ok(_) if !n.get_ref().is_empty() => {
                    server_name = Some(n.get_ref().to_ascii_lowercase())
                }
                _ => self.report(
                    n.span(),
                    format!(
                        "invalid {path}.tls.server_name {:?}: expected a DNS name or IP address, e.g. \"chat.internal\"",
                        n.get_ref()
                    ),
                ),
            }
        }
        let enabled = raw.enabled.unwrap_or(defaults::UPSTREAM_TLS_ENABLED);
        Some(enabled.then_some(UpstreamTls { ca, server_name }))
    }

    fn health(&mut self, raw: RawHealth, path: &str) -> HealthCheck {
        let path = format!("{path}.health");
        let mut check = HealthCheck {
            path: defaults::HEALTH_PATH.to_string(),
            interval: defaults::HEALTH_INTERVAL,
            timeout: defaults::HEALTH_TIMEOUT,
            unhealthy_after: defaults::HEALTH_UNHEALTHY_AFTER,
            healthy_after: defaults::HEALTH_HEALTHY_AFTER,
        };
        if let Some(p) = raw.path {
            let text = p.get_ref();
            if !text.starts_with('/') || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.report(
                    p.span(),
                    format!(r#"invalid {path}.path {text:?}: expected an absolute request path such as "/healthz""#),
                );
            } else {
                check.path = text.clone();
            }
        }
        if let Some(v) = raw.interval {
            check.interval =
                self.positive_duration(&v, &format!("{path}.interval"), check.interval);
        }
        if let Some(v) = raw.timeout {
            check.timeout = self.positive_duration(&v, &format!("{path}.timeout"), check.timeout);
        }
        let thresholds = [
            (
                raw.unhealthy_after,
                &mut check.unhealthy_after,
                "unhealthy_after",
            ),
            (raw.healthy_after, &mut check.healthy_after, "healthy_after"),
        ];
        for (value, slot, name) in thresholds {
            if let Some(v) = value {
                let key = format!("{path}.{name}");
                if let Some(n) = self.count(&v, &key, 1, i64::from(u32::MAX)) {
                    *slot = u32::try_from(n).unwrap_or(u32::MAX);
                }
            }
        }
        check
    }

    // ----- [routes] -----

    fn routes(
        &mut self,
        raw: Option<NamedTables<RawRoute>>,
        upstreams: &CheckedUpstreams,
        global: Timeouts,
    ) -> Vec<RouteConfig> {
        let Some(raw) = raw else {
            self.problems.push(Problem::whole_file(
                r#"no routes: add at least one, e.g. [routes.app] with path = "/" and upstream = "app" (or builtin = "echo")"#,
            ));
            return Vec::new();
        };
        if raw.entries.is_empty() {
            self.report(
                raw.span,
                r#"[routes] is empty: add at least one, e.g. [routes.app] with path = "/" and upstream = "app""#,
            );
            return Vec::new();
        }
        let mut entries = raw.entries;
        entries.sort_by_key(|e| e.span.start);
        let mut out = Vec::new();
        // (host, path) -> name of the first route that claimed it.
        let mut claimed: HashMap<(HostMatch, String), String> = HashMap::new();
        for entry in entries {
            self.check_name(&entry.name, "route");
            let name = entry.name.into_inner();
            let Some(raw) = entry.value else { continue };
            let path_key = format!("routes.{}", key_segment(&name));
            let (place, claim) = self.route_place(&raw, entry.span.clone(), &path_key);
            if let Some((host, path, blame)) = claim {
                let label = format!("{} and path {path:?}", host_label(&host));
                match claimed.get(&(host.clone(), path.clone())) {
                    Some(first) => self.report(
                        blame,
                        format!(
                            "routes `{first}` and `{name}` both match {label}; a request could not tell them apart: change the host or path of one"
                        ),
                    ),
                    None => {
                        claimed.insert((host, path), name.clone());
                    }
                }
            }
            let target = self.route_target(&raw, entry.span, &path_key, upstreams);
            let allowed_origins = self.allowed_origins(&raw, &path_key);
            let timeouts = match &raw.timeouts {
                Some(t) => self.timeouts_over(global, t, &format!("{path_key}.timeouts")),
                None => global,
            };
            let auth = raw.auth.and_then(|a| self.route_auth(a, &path_key));
            if let Some(target) = target {
                out.push(RouteConfig {
                    name,
                    host: place.0,
                    path: place.1,
                    target,
                    allowed_origins,
                    strip_prefix: raw.strip_prefix.unwrap_or(defaults::ROUTE_STRIP_PREFIX),
                    timeouts,
                    auth,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// A route's host and path, and its claim on them with the span to blame if another
    /// route claimed them first (`None` when the host or path is invalid).
    fn route_place(
        &mut self,
        raw: &RawRoute,
        table_span: Range<usize>,
        path_key: &str,
    ) -> ((HostMatch, String), Option<Claim>) {
        let mark = self.mark();
        let host = raw.host.as_ref().and_then(|h| {
            self.parse(h, "host", &format!("for {path_key}.host"), |h| {
                parse_host(h)
            })
        });
        let path = raw.path.as_ref().and_then(|p| {
            self.parse(p, "path", &format!("for {path_key}.path"), |p| {
                normalize_path(p)
            })
        });
        // The path is what a clash is about; without one, the host; without both, the table.
        let blame = match (&raw.path, &raw.host) {
            (Some(p), _) => p.span(),
            (None, Some(h)) => h.span(),
            (None, None) => table_span,
        };
        let place = (
            host.unwrap_or(HostMatch::Any),
            path.unwrap_or_else(|| defaults::ROUTE_PATH.to_string()),
        );
        let claim = self
            .clean_since(mark)
            .then(|| (place.0.clone(), place.1.clone(), blame));
        (place, claim)
    }

    fn route_target(
        &mut self,
        raw: &RawRoute,
        table_span: Range<usize>,
        path_key: &str,
        upstreams: &CheckedUpstreams,
    ) -> Option<RouteTarget> {
        match (&raw.upstream, &raw.builtin) {
            (Some(_), Some(b)) => {
                self.report(
                    b.span(),
                    format!("{path_key} has both `upstream` and `builtin`: a route is answered by one of them; remove one"),
                );
                None
            }
            (None, None) => {
                self.report(
                    table_span,
                    format!(r#"{path_key} needs a target: add upstream = "NAME" (one of the [upstreams]) or builtin = "echo""#),
                );
                None
            }
            (Some(u), None) if upstreams.names.contains(u.get_ref()) => {
                Some(RouteTarget::Upstream(u.get_ref().clone()))
            }
            (Some(u), None) => {
                let known = if upstreams.names.is_empty() {
                    "no upstreams are defined; add an [upstreams.NAME] table".to_string()
                } else {
                    let names: Vec<_> = upstreams.names.iter().map(String::as_str).collect();
                    format!("known upstreams: {}", names.join(", "))
                };
                self.report(
                    u.span(),
                    format!(
                        "unknown upstream `{}` for {path_key}.upstream; {known}",
                        u.get_ref()
                    ),
                );
                None
            }
            (None, Some(b)) if b.get_ref() == "echo" => Some(RouteTarget::Builtin(Builtin::Echo)),
            (None, Some(b)) => {
                self.report(
                    b.span(),
                    format!(
                        r#"unknown builtin {:?} for {path_key}.builtin: expected "echo""#,
                        b.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn allowed_origins(&mut self, raw: &RawRoute, path_key: &str) -> Option<Vec<String>> {
        let list = raw.allowed_origins.as_ref()?;
        if list.get_ref().is_empty() {
            self.report(
                list.span(),
                format!("{path_key}.allowed_origins is empty, which would refuse every browser; list the allowed origins, or remove the key to allow any origin"),
            );
            return None;
        }
        let place = format!("in {path_key}.allowed_origins");
        let mut origins = Vec::new();
        for origin in list.get_ref() {
            if let Some(o) = self.parse(origin, "origin", &place, |o| normalize_origin(o)) {
                if !origins.contains(&o) {
                    origins.push(o);
                }
            }
        }
        Some(origins)
    }

    /// Names are metric labels and appear in logs: keep them plain.
    fn check_name(&mut self, name: &Spanned<String>, what: &str) {
        let n = name.get_ref();
        let plain = !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !plain {
            self.report(
                name.span(),
                format!(
                    "invalid {what} name {n:?}: use letters, digits, '_', '-' and '.' only (names are metric labels)"
                ),
            );
        }
    }
}

/// The host and path a route answers for, and the span to blame if another route has them.
type Claim = (HostMatch, String, Range<usize>);

/// The admin address and whether it was written in the file.
struct CheckedAdmin {
    config: AdminConfig,
    span: Option<Range<usize>>,
}

/// Upstreams that checked out, and every name defined (even broken ones, so routes that
/// point at them are not reported a second time).
#[derive(Default)]
struct CheckedUpstreams {
    configs: Vec<UpstreamConfig>,
    names: BTreeSet<String>,
}

fn zero_is_off(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn host_label(host: &HostMatch) -> String {
    match host {
        HostMatch::Any => "any host".to_string(),
        other => format!("host {other}"),
    }
}

/// Test helpers for configs loaded from disk, as `wsgate check` loads them: relative
/// paths then resolve against the file's folder.
#[cfg(test)]
mod on_disk {
    use std::path::Path;

    use crate::config::Config;

    /// Writes `text` to `source` and loads it; problems as `line:col: message`.
    pub fn load(source: &Path, text: &str) -> Result<Config, Vec<String>> {
        std::fs::write(source, text).unwrap();
        Config::load(source).map_err(|e| {
            e.diagnostics
                .iter()
                .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
                .collect()
        })
    }

    /// Exactly one problem, at `position` ("line:col: "), containing `phrase`.
    #[track_caller]
    pub fn one_problem(loaded: Result<Config, Vec<String>>, position: &str, phrase: &str) {
        let problems = loaded.err().unwrap_or_default();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].starts_with(position) && problems[0].contains(phrase),
            "want {position:?} ... {phrase:?}, got {:?}",
            problems[0]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Balance, HostHeader};
    use super::*;

    /// A valid file of 9 lines; tests append tables from line 10 on.
    const BASE: &str = "\
[listeners.public]
bind = \"127.0.0.1:8080\"

[upstreams.app]
servers = [\"127.0.0.1:9001\"]

[routes.app]
path = \"/\"
upstream = \"app\"
";

    fn with(extra: &str) -> String {
        format!("{BASE}{extra}")
    }

    fn load(text: &str) -> Result<Config, Vec<String>> {
        Config::from_toml(text, Path::new("proxy.toml"))
            .map_err(|e| e.diagnostics.iter().map(ToString::to_string).collect())
    }

    fn config(text: &str) -> Config {
        match load(text) {
            Ok(c) => c,
            Err(problems) => panic!("expected a valid config, got {problems:#?}"),
        }
    }

    /// Exactly one problem, starting with `prefix` ("proxy.toml:L:C: ") and containing `phrase`.
    #[track_caller]
    fn one_problem(text: &str, prefix: &str, phrase: &str) {
        let problems = load(text).err().unwrap_or_default();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].starts_with(prefix) && problems[0].contains(phrase),
            "want {prefix:?} ... {phrase:?}, got {:?}",
            problems[0]
        );
    }

    #[test]
    fn base_config_is_valid() {
        let c = config(BASE);
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.source, Path::new("proxy.toml"));
        assert!(c.upstream("app").is_some());
        assert!(c.route("app").is_some());
        assert!(c.upstream("nope").is_none());
        assert!(c.route("nope").is_none());
    }

    #[test]
    fn defaults_are_the_documented_values() {
        let c = config(&with(
            "[upstreams.h]\nservers = [\"a:1\"]\nhealth = {}\ntls = {}\n",
        ));
        assert_eq!(c.log.level, "info");
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.runtime.worker_threads, 0);
        assert!(c.runtime.splice);
        assert_eq!(
            c.admin.bind,
            "127.0.0.1:9090".parse::<SocketAddr>().unwrap()
        );
        assert!(!c.listeners[0].http2);
        assert!(c.listeners[0].tls.is_none());
        let s = Duration::from_secs;
        assert_eq!(
            c.timeouts,
            Timeouts {
                client_header: s(10),
                upstream_connect: s(5),
                upstream_handshake: s(10),
                idle: s(300),
                ping_interval: Some(s(30)),
                pong_timeout: s(10),
                upstream_ping_interval: None,
                shutdown_grace: s(30),
                drain_spread: s(5),
                close: s(5),
            }
        );
        assert_eq!(
            c.limits,
            Limits {
                max_connections: 100_000,
                max_connections_per_ip: 0,
                handshake_rate_per_ip: None,
                max_frame_size: 1024 * 1024,
                max_frame_rate: None,
                max_request_head: 64 * 1024,
                max_request_headers: 100,
                max_pending_heads: 10_000,
            }
        );
        let app = c.upstream("app").unwrap();
        assert_eq!(app.balance, Balance::RoundRobin);
        assert!(app.tls.is_none() && app.health.is_none());
        let h = c.upstream("h").unwrap();
        assert_eq!(
            h.health,
            Some(HealthCheck {
                path: "/healthz".into(),
                interval: s(5),
                timeout: s(2),
                unhealthy_after: 3,
                healthy_after: 2,
            })
        );
        let tls = h.tls.as_ref().expect("a tls table means tls enabled");
        assert!(tls.ca.is_empty() && tls.server_name.is_none());
        let route = c.route("app").unwrap();
        assert_eq!(route.host, HostMatch::Any);
        assert_eq!(route.target, RouteTarget::Upstream("app".into()));
        assert!(!route.strip_prefix);
        assert!(route.allowed_origins.is_none());
        assert_eq!(route.timeouts, c.timeouts);
    }

    #[test]
    fn every_key_parses() {
        let text = r#"
[log]
level = "wsgate=debug,hyper=info"
format = "json"
[runtime]
worker_threads = 4
splice = false
[admin]
bind = "[::1]:9191"
[listeners.public]
bind = "0.0.0.0:8080"
http2 = true
[timeouts]
client_header = "3s"
upstream_connect = "1.5s"
upstream_handshake = "2s"
idle = "1h"
ping_interval = "0s"
pong_timeout = "500ms"
upstream_ping_interval = "1m30s"
shutdown_grace = "1m"
drain_spread = "0s"
[limits]
max_connections = 10
max_connections_per_ip = 2
handshake_rate_per_ip = "0/s"
max_frame_size = "64KiB"
max_frame_rate = "100/m"
max_request_head = "8KiB"
max_request_headers = 50
max_pending_heads = 2000
[upstreams.chat]
servers = ["10.0.0.1:9001", "[::1]:9002", "Chat.Internal:9003"]
balance = "cookie:io"
host_header = "chat.internal:8080"
tls = { enabled = false, server_name = "chat.internal" }
health = { path = "/up", interval = "10s", timeout = "1s", unhealthy_after = 5, healthy_after = 1 }
[routes.chat]
host = "*.Example.com"
path = "/ws/"
upstream = "chat"
allowed_origins = ["https://Chat.Example.com:443", "http://localhost:3000"]
strip_prefix = true
[routes.chat.timeouts]
idle = "30m"
[routes.echo]
path = "/echo"
builtin = "echo"
"#;
        let c = config(text);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.runtime.worker_threads, 4);
        assert!(!c.runtime.splice);
        assert_eq!(c.admin.bind, "[::1]:9191".parse::<SocketAddr>().unwrap());
        assert!(c.listeners[0].http2);
        assert_eq!(c.timeouts.ping_interval, None);
        assert_eq!(
            c.timeouts.upstream_ping_interval,
            Some(Duration::from_secs(90))
        );
        assert_eq!(c.timeouts.drain_spread, Duration::ZERO);
        assert_eq!(c.limits.handshake_rate_per_ip, None);
        assert_eq!(c.limits.max_frame_size, 65536);
        assert_eq!(
            c.limits.max_frame_rate,
            Some(Rate {
                count: 100,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(c.limits.max_request_head, 8192);
        assert_eq!(c.limits.max_request_headers, 50);
        assert_eq!(c.limits.max_pending_heads, 2000);
        let chat = c.upstream("chat").unwrap();
        assert_eq!(chat.balance, Balance::Cookie("io".into()));
        assert_eq!(
            chat.host_header,
            HostHeader::Literal("chat.internal:8080".into())
        );
        assert!(chat.tls.is_none(), "enabled = false");
        assert_eq!(
            chat.servers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.0.1:9001", "[::1]:9002", "chat.internal:9003"]
        );
        assert_eq!(chat.health.as_ref().unwrap().healthy_after, 1);
        let route = c.route("chat").unwrap();
        assert_eq!(route.host, HostMatch::WildcardSuffix(".example.com".into()));
        assert_eq!(route.path, "/ws");
        assert!(route.strip_prefix);
        assert_eq!(
            route.allowed_origins.as_deref(),
            Some(
                &[
                    "https://chat.example.com".to_string(),
                    "http://localhost:3000".to_string()
                ][..]
            )
        );
        assert_eq!(
            c.route("echo").unwrap().target,
            RouteTarget::Builtin(Builtin::Echo)
        );
        // Sorted by name.
        let names: Vec<_> = c.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["chat", "echo"]);
    }

    #[test]
    fn route_timeouts_are_laid_over_the_global_ones() {
        let text = with(
            "[timeouts]\nidle = \"10m\"\nping_interval = \"20s\"\n\
             [routes.slow]\npath = \"/slow\"\nupstream = \"app\"\n\
             [routes.slow.timeouts]\nidle = \"2h\"\nping_interval = \"0s\"\nupstream_connect = \"1s\"\n",
        );
        let c = config(&text);
        let global = c.timeouts;
        assert_eq!(global.idle, Duration::from_secs(600));
        let slow = c.route("slow").unwrap().timeouts;
        assert_eq!(slow.idle, Duration::from_secs(7200));
        assert_eq!(slow.ping_interval, None);
        assert_eq!(slow.upstream_connect, Duration::from_secs(1));
        // Everything not overridden comes from [timeouts] (and its defaults).
        assert_eq!(
            slow,
            Timeouts {
                idle: slow.idle,
                ping_interval: None,
                upstream_connect: slow.upstream_connect,
                ..global
            }
        );
        assert_eq!(c.route("app").unwrap().timeouts, global);
    }

    #[test]
    fn route_timeouts_are_checked_like_global_ones() {
        one_problem(
            &with("[routes.app.timeouts]\nidle = \"0s\"\n"),
            "proxy.toml:11:8: ",
            "routes.app.timeouts.idle must be more than zero",
        );
        one_problem(
            &with("[routes.app.timeouts]\npong = \"1s\"\n"),
            "proxy.toml:11:1: ",
            "unknown key `pong` in [routes.app.timeouts]; expected one of: client_header, upstream_connect,",
        );
    }

    #[test]
    fn durations_must_be_valid_and_some_positive() {
        one_problem(
            &with("[timeouts]\nidle = \"30 seconds\"\n"),
            "proxy.toml:11:8: ",
            r#"invalid duration "30 seconds" for timeouts.idle: expected a number and a unit (ms, s, m, h), e.g. "30s""#,
        );
        one_problem(
            &with("[timeouts]\nidle = 30\n"),
            "proxy.toml:11:8: ",
            "invalid duration 30 for timeouts.idle: a bare number needs a unit",
        );
        for key in [
            "client_header",
            "upstream_connect",
            "upstream_handshake",
            "idle",
            "pong_timeout",
            "shutdown_grace",
            "close",
        ] {
            let col = key.len() + 4;
            one_problem(
                &with(&format!("[timeouts]\n{key} = \"0ms\"\n")),
                &format!("proxy.toml:11:{col}: "),
                &format!("timeouts.{key} must be more than zero"),
            );
        }
        let c = config(&with(
            "[timeouts]\nping_interval = \"0s\"\nupstream_ping_interval = \"0s\"\ndrain_spread = \"0s\"\n",
        ));
        assert_eq!(c.timeouts.ping_interval, None);
        assert_eq!(c.timeouts.upstream_ping_interval, None);
        one_problem(
            &with("[timeouts]\nshutdown_grace = \"10s\"\ndrain_spread = \"20s\"\n"),
            "proxy.toml:12:16: ",
            "timeouts.drain_spread (20s) is longer than timeouts.shutdown_grace (10s)",
        );
        // A default never conflicts with a value written in the file.
        let c = config(&with("[timeouts]\nshutdown_grace = \"3s\"\n"));
        assert_eq!(c.timeouts.drain_spread, Duration::from_secs(3));
        let c = config(&with("[timeouts]\ndrain_spread = \"45s\"\n"));
        assert_eq!(c.timeouts.shutdown_grace, Duration::from_secs(45));
        let c = config(&with("[timeouts]\nclose = \"2s\"\n"));
        assert_eq!(c.timeouts.close, Duration::from_secs(2));
    }

    #[test]
    fn limits_are_checked() {
        one_problem(
            &with("[limits]\nmax_frame_size = \"1M\"\n"),
            "proxy.toml:11:18: ",
            r#"invalid size "1M" for limits.max_frame_size: unknown unit "M"; expected a number and a unit (B, KiB, MiB, GiB, KB, MB, GB)"#,
        );
        one_problem(
            &with("[limits]\nmax_frame_size = \"0B\"\n"),
            "proxy.toml:11:18: ",
            "limits.max_frame_size must be more than zero",
        );
        one_problem(
            &with("[limits]\nmax_frame_size = \"9223372036854775809B\"\n"),
            "proxy.toml:11:18: ",
            "larger than a WebSocket frame can be",
        );
        let c = config(&with("[limits]\nmax_frame_size = \"8589934592GiB\"\n"));
        assert_eq!(c.limits.max_frame_size, 1 << 63);
        one_problem(
            &with("[limits]\nhandshake_rate_per_ip = \"50\"\n"),
            "proxy.toml:11:25: ",
            r#"invalid rate "50" for limits.handshake_rate_per_ip: expected a whole count and a period (s, m, h)"#,
        );
        one_problem(
            &with("[limits]\nmax_connections = 0\n"),
            "proxy.toml:11:19: ",
            "invalid limits.max_connections 0: expected at least 1",
        );
        one_problem(
            &with("[limits]\nmax_connections_per_ip = -5\n"),
            "proxy.toml:11:26: ",
            "invalid limits.max_connections_per_ip -5: expected at least 0",
        );
        for bad in ["1023B", "1025KiB"] {
            one_problem(
                &with(&format!("[limits]\nmax_request_head = \"{bad}\"\n")),
                "proxy.toml:11:20: ",
                r#"limits.max_request_head must be between 1KiB and 1MiB, e.g. "64KiB""#,
            );
        }
        for (good, bytes) in [("1KiB", 1024), ("1MiB", 1 << 20)] {
            let c = config(&with(&format!("[limits]\nmax_request_head = \"{good}\"\n")));
            assert_eq!(c.limits.max_request_head, bytes);
        }
        one_problem(
            &with("[limits]\nmax_request_head = \"64k\"\n"),
            "proxy.toml:11:20: ",
            r#"invalid size "64k" for limits.max_request_head: unknown unit "k""#,
        );
        one_problem(
            &with("[limits]\nmax_request_headers = 1001\n"),
            "proxy.toml:11:23: ",
            "invalid limits.max_request_headers 1001: expected between 1 and 1000",
        );
        one_problem(
            &with("[limits]\nmax_pending_heads = 0\n"),
            "proxy.toml:11:21: ",
            "invalid limits.max_pending_heads 0: expected between 1 and 4294967295",
        );
    }

    #[test]
    fn an_admin_listener_off_loopback_needs_a_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("proxy.toml");
        std::fs::write(dir.path().join("token"), "0123456789abcdef0123\n").unwrap();
        std::fs::write(dir.path().join("short"), "abc\n").unwrap();
        let load = |admin: &str| {
            let text = format!("[admin]\n{admin}\n[listeners.public]\nbind = \"127.0.0.1:8080\"\n[routes.echo]\nbuiltin = \"echo\"\n");
            super::on_disk::load(&source, &text)
        };
        let problems = load("bind = \"0.0.0.0:9090\"").unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("2:8: admin.bind 0.0.0.0:9090 is reachable from other machines: set admin.token_file"),
            "{problems:?}"
        );
        let c = load("bind = \"0.0.0.0:9090\"\ntoken_file = \"token\"").unwrap();
        assert_eq!(
            c.admin.token.as_ref().map(|t| t.0.len()),
            Some(20),
            "the newline is not part of it"
        );
        // Loopback needs none, but may have one.
        assert!(load("bind = \"[::1]:9090\"").unwrap().admin.token.is_none());
        assert!(load("token_file = \"token\"")
            .unwrap()
            .admin
            .token
            .is_some());
        let problems = load("bind = \"0.0.0.0:9090\"\ntoken_file = \"short\"").unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "3:14: the token in \"short\" for admin.token_file must be at least 16"
            ),
            "{problems:?}"
        );
        let problems = load("token_file = \"missing\"").unwrap_err();
        assert!(
            problems[0].contains("cannot read token file \"missing\""),
            "{problems:?}"
        );
    }

    #[test]
    fn runtime_and_log_are_checked() {
        one_problem(
            &with("[runtime]\nworker_threads = 1025\n"),
            "proxy.toml:11:18: ",
            "expected 0 (one per CPU core) up to 1024",
        );
        one_problem(
            &with("[runtime]\nworker_threads = -1\n"),
            "proxy.toml:11:18: ",
            "invalid runtime.worker_threads -1",
        );
        assert_eq!(
            config(&with("[runtime]\nworker_threads = 1024\n"))
                .runtime
                .worker_threads,
            1024
        );
        one_problem(
            &with("[log]\nformat = \"yaml\"\n"),
            "proxy.toml:11:10: ",
            r#"invalid log format "yaml" for log.format: expected "text" or "json""#,
        );
        one_problem(
            &with("[log]\nlevel = \"inf\"\n"),
            "proxy.toml:11:9: ",
            r#"invalid log level "inf" for log.level: unknown level"#,
        );
        one_problem(
            &with("[log]\nlevel = \"wsgate=loud\"\n"),
            "proxy.toml:11:9: ",
            "invalid log level \"wsgate=loud\"",
        );
        for level in ["debug", "WARN", "off", "wsgate=trace", "info,hyper=warn"] {
            assert_eq!(
                config(&with(&format!("[log]\nlevel = \"{level}\"\n")))
                    .log
                    .level,
                level
            );
        }
    }

    #[test]
    fn listeners_are_required_and_checked() {
        let no_listeners = "[routes.e]\nbuiltin = \"echo\"\n";
        let problems = load(no_listeners).unwrap_err();
        assert_eq!(
            problems,
            ["proxy.toml: no listeners: add at least one, e.g. [listeners.public] with bind = \"0.0.0.0:8080\""]
        );
        one_problem(
            "[listeners]\n[routes.e]\nbuiltin = \"echo\"\n",
            "proxy.toml:1:1: ",
            "[listeners] is empty",
        );
        one_problem(
            &with("[listeners.other]\nbind = \"localhost:8080\"\n"),
            "proxy.toml:11:8: ",
            "not a host name",
        );
        one_problem(
            &with("[listeners.other]\nbind = \"8080\"\n"),
            "proxy.toml:11:8: ",
            r#"invalid address "8080" for listeners.other.bind: expected IP:port"#,
        );
        one_problem(
            &with("[listeners.other]\nbnd = \"127.0.0.1:1\"\n"),
            "proxy.toml:11:1: ",
            "unknown key `bnd` in [listeners.other]; expected one of: bind, http2, http2_max_streams, tls",
        );
        one_problem(
            &with("[listeners.other]\nhttp2 = true\n"),
            "proxy.toml:10:1: ",
            "missing key `bind` in [listeners.other]",
        );
        one_problem(
            &with("[listeners.\"my listener\"]\nbind = \"127.0.0.1:1\"\n"),
            "proxy.toml:10:12: ",
            "invalid listener name \"my listener\"",
        );
    }

    #[test]
    fn listener_addresses_must_not_clash() {
        one_problem(
            &with("[listeners.again]\nbind = \"127.0.0.1:8080\"\n"),
            "proxy.toml:11:8: ",
            "listeners.again.bind 127.0.0.1:8080 clashes with listeners.public.bind",
        );
        one_problem(
            &with("[listeners.all]\nbind = \"0.0.0.0:8080\"\n"),
            "proxy.toml:11:8: ",
            "clashes with listeners.public.bind: a wildcard address covers every address",
        );
        // The admin listener is in the set too, with its default address.
        one_problem(
            &with("[listeners.admin_like]\nbind = \"127.0.0.1:9090\"\n"),
            "proxy.toml:11:8: ",
            "clashes with admin.bind (default 127.0.0.1:9090)",
        );
        one_problem(
            &with("[admin]\nbind = \"127.0.0.1:8080\"\n"),
            "proxy.toml:2:8: ",
            "listeners.public.bind 127.0.0.1:8080 clashes with admin.bind",
        );
        // Port 0 (any free port) never clashes; other families and ports do not either.
        config(&with(
            "[listeners.a]\nbind = \"127.0.0.1:0\"\n[listeners.b]\nbind = \"127.0.0.1:0\"\n\
             [listeners.c]\nbind = \"[::1]:8080\"\n[listeners.d]\nbind = \"127.0.0.1:8081\"\n",
        ));
    }

    #[test]
    fn upstream_host_header_is_checked() {
        for bad in ["a b", "", "a/b", "user@host", "host:70000"] {
            one_problem(
                &with(&format!(
                    "[upstreams.x]\nservers = [\"127.0.0.1:1\"]\nhost_header = \"{bad}\"\n"
                )),
                "proxy.toml:12:15: ",
                &format!(
                    r#"invalid host_header "{bad}" for upstreams.x.host_header: expected "preserve", "upstream" or a host name with an optional port, e.g. "chat.internal:8080""#
                ),
            );
        }
        for (text, want) in [
            ("preserve", HostHeader::Preserve),
            ("upstream", HostHeader::Upstream),
            ("[::1]:80", HostHeader::Literal("[::1]:80".into())),
        ] {
            let c = config(&with(&format!(
                "[upstreams.x]\nservers = [\"127.0.0.1:1\"]\nhost_header = \"{text}\"\n"
            )));
            assert_eq!(c.upstream("x").unwrap().host_header, want);
        }
        let c = config(&with("[upstreams.x]\nservers = [\"127.0.0.1:1\"]\n"));
        assert_eq!(c.upstream("x").unwrap().host_header, HostHeader::Preserve);
    }

    #[test]
    fn max_pending_handshakes_is_checked() {
        let c = config(&with("[upstreams.x]\nservers = [\"127.0.0.1:1\"]\n"));
        assert_eq!(c.upstream("x").unwrap().max_pending_handshakes, 256);
        let c = config(&with(
            "[upstreams.x]\nservers = [\"127.0.0.1:1\"]\nmax_pending_handshakes = 1\n",
        ));
        assert_eq!(c.upstream("x").unwrap().max_pending_handshakes, 1);
        one_problem(
            &with("[upstreams.x]\nservers = [\"127.0.0.1:1\"]\nmax_pending_handshakes = 0\n"),
            "proxy.toml:12:26: ",
            "invalid upstreams.x.max_pending_handshakes 0: expected between 1 and 1000000",
        );
    }

    #[test]
    fn upstream_servers_are_checked() {
        one_problem(
            &with("[upstreams.none]\nservers = []\n"),
            "proxy.toml:11:11: ",
            "upstreams.none.servers is empty",
        );
        one_problem(
            &with("[upstreams.none]\nbalance = \"ip_hash\"\n"),
            "proxy.toml:10:1: ",
            "missing key `servers` in [upstreams.none]",
        );
        let cases = [
            ("127.0.0.1", "missing port"),
            (
                "::1:9000",
                "IPv6 addresses need brackets, e.g. \"[::1]:9000\"",
            ),
            ("[::1]", "missing port"),
            ("[fe80::zz]:1", "is not an IPv6 address"),
            ("app:0", "invalid port \"0\""),
            ("app:70000", "invalid port \"70000\""),
            ("http://app:80", "no scheme here"),
            (":80", "missing host"),
            ("a b:80", "bad host"),
        ];
        for (server, phrase) in cases {
            one_problem(
                &with(&format!("[upstreams.u]\nservers = [\"{server}\"]\n")),
                "proxy.toml:11:12: ",
                phrase,
            );
        }
        one_problem(
            &with("[upstreams.u]\nservers = [\"a:1\", \"A:1\"]\n"),
            "proxy.toml:11:19: ",
            "server a:1 is listed twice in upstreams.u.servers",
        );
        assert_eq!(
            parse_server("[::1]:9000"),
            Ok(ServerAddr {
                host: "::1".into(),
                port: 9000
            })
        );
    }

    #[test]
    fn balance_modes() {
        let good = [
            ("round_robin", Balance::RoundRobin),
            ("least_conn", Balance::LeastConn),
            ("ip_hash", Balance::IpHash),
            ("header:X-User-Id", Balance::Header("x-user-id".into())),
            ("cookie:io", Balance::Cookie("io".into())),
            ("cookie:JSESSIONID", Balance::Cookie("JSESSIONID".into())),
        ];
        for (text, want) in good {
            let c = config(&with(&format!(
                "[upstreams.b]\nservers = [\"a:1\"]\nbalance = \"{text}\"\n"
            )));
            assert_eq!(c.upstream("b").unwrap().balance, want);
            assert_eq!(want.to_string(), text.replace("X-User-Id", "x-user-id"));
        }
        let bad = [
            ("random", "expected one of round_robin, least_conn, ip_hash, \"header:NAME\", \"cookie:NAME\""),
            ("least-conn", "did you mean \"least_conn\"?"),
            ("header:", "\"\" is not a valid header name"),
            ("header:X User", "is not a valid header name"),
            ("cookie:a;b", "is not a valid cookie name"),
        ];
        for (text, phrase) in bad {
            one_problem(
                &with(&format!(
                    "[upstreams.b]\nservers = [\"a:1\"]\nbalance = \"{text}\"\n"
                )),
                "proxy.toml:12:11: ",
                phrase,
            );
        }
    }

    #[test]
    fn upstream_health_is_checked() {
        one_problem(
            &with("[upstreams.h]\nservers = [\"a:1\"]\nhealth = { unhealthy_after = 0 }\n"),
            "proxy.toml:12:30: ",
            "invalid upstreams.h.health.unhealthy_after 0: expected between 1 and 4294967295",
        );
        one_problem(
            &with("[upstreams.h]\nservers = [\"a:1\"]\nhealth = { healthy_after = 0 }\n"),
            "proxy.toml:12:28: ",
            "upstreams.h.health.healthy_after",
        );
        one_problem(
            &with("[upstreams.h]\nservers = [\"a:1\"]\nhealth = { path = \"healthz\" }\n"),
            "proxy.toml:12:19: ",
            "invalid upstreams.h.health.path \"healthz\"",
        );
        one_problem(
            &with("[upstreams.h]\nservers = [\"a:1\"]\nhealth = { interval = \"0s\" }\n"),
            "proxy.toml:12:23: ",
            "upstreams.h.health.interval must be more than zero",
        );
        one_problem(
            &with("[upstreams.h]\nservers = [\"a:1\"]\nhealth = { every = \"5s\" }\n"),
            "proxy.toml:12:12: ",
            "unknown key `every` in [upstreams.h.health]; expected one of: path, interval, timeout, unhealthy_after, healthy_after",
        );
    }

    #[test]
    fn route_targets_are_checked() {
        one_problem(
            &with("[routes.chat]\npath = \"/ws\"\nupstream = \"chta\"\n"),
            "proxy.toml:12:12: ",
            "unknown upstream `chta` for routes.chat.upstream; known upstreams: app",
        );
        one_problem(
            "[listeners.l]\nbind = \"127.0.0.1:1\"\n[routes.r]\nupstream = \"x\"\n",
            "proxy.toml:4:12: ",
            "no upstreams are defined",
        );
        one_problem(
            &with("[routes.both]\npath = \"/b\"\nupstream = \"app\"\nbuiltin = \"echo\"\n"),
            "proxy.toml:13:11: ",
            "routes.both has both `upstream` and `builtin`",
        );
        one_problem(
            &with("[routes.none]\npath = \"/n\"\n"),
            "proxy.toml:10:1: ",
            "routes.none needs a target: add upstream = \"NAME\"",
        );
        one_problem(
            &with("[routes.e]\npath = \"/e\"\nbuiltin = \"ehco\"\n"),
            "proxy.toml:12:11: ",
            "unknown builtin \"ehco\" for routes.e.builtin: expected \"echo\"",
        );
        // A route naming an upstream that is itself broken gets no second error.
        let problems = load(&with(
            "[upstreams.bad]\nservers = 1\n[routes.b]\npath = \"/b\"\nupstream = \"bad\"\n",
        ))
        .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:#?}");
    }

    #[test]
    fn routes_are_required() {
        let problems = load("[listeners.l]\nbind = \"127.0.0.1:1\"\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("proxy.toml: no routes: add at least one"));
        one_problem(
            "[listeners.l]\nbind = \"127.0.0.1:1\"\n[routes]\n",
            "proxy.toml:3:1: ",
            "[routes] is empty",
        );
    }

    #[test]
    fn route_paths_are_normalised() {
        for (text, want) in [
            ("/", "/"),
            ("/ws", "/ws"),
            ("/ws/", "/ws"),
            ("/a/b/", "/a/b"),
            ("//", "/"),
            ("/Chat", "/Chat"),
        ] {
            assert_eq!(normalize_path(text).as_deref(), Ok(want), "{text}");
        }
        for (text, phrase) in [
            ("ws", "must start with '/', e.g. \"/ws\""),
            ("", "must start with '/'"),
            ("/a?b=1", "'?' is not allowed"),
            ("/a#x", "'#' is not allowed"),
            ("/a b", "' ' is not allowed"),
            ("/a//b", "empty, \".\" and \"..\" segments"),
            ("/a/../b", "empty, \".\" and \"..\" segments"),
        ] {
            one_problem(
                &with(&format!(
                    "[routes.p]\npath = \"{text}\"\nbuiltin = \"echo\"\n"
                )),
                "proxy.toml:11:8: ",
                phrase,
            );
        }
    }

    #[test]
    fn route_hosts_are_normalised() {
        for (text, want) in [
            (
                "Chat.Example.COM",
                HostMatch::Exact("chat.example.com".into()),
            ),
            (
                "*.Example.com",
                HostMatch::WildcardSuffix(".example.com".into()),
            ),
            ("localhost", HostMatch::Exact("localhost".into())),
            ("10.0.0.1", HostMatch::Exact("10.0.0.1".into())),
            ("[::1]", HostMatch::Exact("[::1]".into())),
        ] {
            assert_eq!(parse_host(text), Ok(want.clone()), "{text}");
            assert_eq!(want.to_string(), text.to_ascii_lowercase());
        }
        for (text, phrase) in [
            ("chat.example.com:443", "no port here"),
            ("*", "omit `host` to match any host"),
            ("", "omit `host`"),
            ("*example.com", "only a leading \"*.\" wildcard"),
            ("a.*.com", "only a leading \"*.\" wildcard"),
            ("*.*.com", "only one leading \"*.\" wildcard"),
            ("https://a.com", "without scheme or path"),
            ("a..com", "1 to 63 characters"),
            ("-a.com", "cannot start or end with '-'"),
            ("a b.com", "letters, digits, '-' and '_' only"),
        ] {
            one_problem(
                &with(&format!(
                    "[routes.h]\nhost = \"{text}\"\nbuiltin = \"echo\"\n"
                )),
                "proxy.toml:11:8: ",
                phrase,
            );
        }
    }

    #[test]
    fn two_routes_with_the_same_host_and_path_are_an_error() {
        one_problem(
            &with("[routes.app2]\npath = \"/\"\nupstream = \"app\"\n"),
            "proxy.toml:11:8: ",
            "routes `app` and `app2` both match any host and path \"/\"",
        );
        // Equal after normalisation: trailing '/', host case.
        one_problem(
            &with(
                "[routes.a]\nhost = \"Chat.example.com\"\npath = \"/ws/\"\nbuiltin = \"echo\"\n\
                 [routes.b]\nhost = \"chat.example.com\"\npath = \"/ws\"\nbuiltin = \"echo\"\n",
            ),
            "proxy.toml:16:8: ",
            "routes `a` and `b` both match host chat.example.com and path \"/ws\"",
        );
        // Without a path the host is blamed.
        one_problem(
            &with(
                "[routes.a]\nhost = \"*.x.com\"\nbuiltin = \"echo\"\n\
                 [routes.b]\nhost = \"*.X.com\"\nbuiltin = \"echo\"\n",
            ),
            "proxy.toml:14:8: ",
            "routes `a` and `b` both match host *.x.com and path \"/\"",
        );
        // Different hosts, or exact vs wildcard, are different routes.
        config(&with(
            "[routes.a]\nhost = \"a.com\"\nbuiltin = \"echo\"\n\
             [routes.b]\nhost = \"*.a.com\"\nbuiltin = \"echo\"\n",
        ));
    }

    #[test]
    fn allowed_origins_are_checked() {
        assert_eq!(
            normalize_origin("HTTPS://Chat.Example.com:443").as_deref(),
            Ok("https://chat.example.com")
        );
        assert_eq!(
            normalize_origin("http://localhost:3000").as_deref(),
            Ok("http://localhost:3000")
        );
        assert_eq!(
            normalize_origin("http://[::1]:80").as_deref(),
            Ok("http://[::1]")
        );
        let prefix = "[routes.o]\npath = \"/o\"\nbuiltin = \"echo\"\nallowed_origins = ";
        for (text, phrase) in [
            (
                "https://a.com/",
                "an origin has no path: write \"https://a.com\"",
            ),
            ("https://a.com/chat", "an origin has no path"),
            (
                "a.com",
                "expected scheme://host[:port], e.g. \"https://chat.example.com\"",
            ),
            ("https://*.a.com", "wildcards are not supported"),
            ("https://a.com:0", "invalid port \"0\""),
            ("https://", "bad host"),
            ("null", "expected scheme://host[:port]"),
        ] {
            one_problem(
                &with(&format!("{prefix}[\"{text}\"]\n")),
                "proxy.toml:13:20: ",
                phrase,
            );
        }
        one_problem(
            &with(&format!("{prefix}[]\n")),
            "proxy.toml:13:19: ",
            "routes.o.allowed_origins is empty, which would refuse every browser",
        );
    }

    #[test]
    fn every_problem_is_reported_in_file_order() {
        let text = "\
[log]
format = \"xml\"
[listeners.public]
bind = \"127.0.0.1:8080\"
binnd = 1
[timeouts]
idle = \"5 minutes\"
[limits]
max_frame_size = \"1 MiB\"
[upstreams.app]
servers = [\"127.0.0.1\"]
balance = \"fastest\"
[routes.app]
upstream = \"ap\"
[routes.other]
path = \"nope\"
builtin = \"echo\"
";
        let problems = load(text).unwrap_err();
        let prefixes: Vec<&str> = problems
            .iter()
            .map(|p| p.split(": ").next().unwrap_or_default())
            .collect();
        assert_eq!(
            prefixes,
            [
                "proxy.toml:2:10",
                "proxy.toml:5:1",
                "proxy.toml:7:8",
                "proxy.toml:9:18",
                "proxy.toml:11:12",
                "proxy.toml:12:11",
                "proxy.toml:14:12",
                "proxy.toml:16:8",
            ],
            "{problems:#?}"
        );
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        one_problem(
            &with("[upstreams.h]\nservers = [\"a:1\"]\nhealth = { path = \"/äö\", interval = \"5\" }\n"),
            "proxy.toml:12:37: ",
            "invalid duration \"5\" for upstreams.h.health.interval",
        );
    }

    #[test]
    fn syntax_errors_stop_before_semantics() {
        let problems = load("[listeners.public\nbind = 1\n").unwrap_err();
        assert!(!problems.is_empty());
        assert!(
            problems
                .iter()
                .all(|p| p.starts_with("proxy.toml:1:") && p.contains("TOML syntax error")),
            "{problems:#?}"
        );
    }

    #[test]
    fn unreadable_file_has_no_position() {
        let err = Config::load(Path::new("/nonexistent/dir/proxy.toml")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("/nonexistent/dir/proxy.toml: cannot read the config file: "),
            "{text}"
        );
        assert_eq!(err.diagnostics[0].line, 0);
    }

    #[test]
    fn error_display_is_one_line_per_problem() {
        let err = Config::from_toml(
            "[listeners.a]\nbind = \"x\"\n[routes.r]\nbuiltin = \"nope\"\n",
            Path::new("tests/x/bad.toml"),
        )
        .unwrap_err();
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("tests/x/bad.toml:2:8: invalid address \"x\""));
        assert!(lines[1].starts_with("tests/x/bad.toml:4:11: unknown builtin"));
        assert!(!text.ends_with('\n'));
    }

    #[test]
    fn summary_lists_listeners_routes_upstreams() {
        let c = config(&with(
            "[upstreams.chat]\nservers = [\"10.0.0.1:1\", \"[::1]:2\"]\nbalance = \"least_conn\"\n\
             [routes.chat]\nhost = \"*.example.com\"\npath = \"/ws\"\nupstream = \"chat\"\n\
             [routes.echo]\npath = \"/echo\"\nbuiltin = \"echo\"\n",
        ));
        let s = c.summary();
        assert!(s.ends_with('\n'));
        assert!(
            s.starts_with("proxy.toml: configuration OK (1 listener, 3 routes, 2 upstreams)\n"),
            "{s}"
        );
        for line in [
            "  public  127.0.0.1:8080  http2: no  tls: no",
            "  chat  host *.example.com  path /ws    -> upstream chat",
            "  echo  host *              path /echo  -> builtin echo",
            "  chat  least_conn   10.0.0.1:1, [::1]:2",
            "  app   round_robin  127.0.0.1:9001",
        ] {
            assert!(s.lines().any(|l| l == line), "missing {line:?} in\n{s}");
        }
        assert!(s.lines().count() < 25);
    }

    /// Certificate files in a temporary folder, referred to by relative paths.
    struct Certs {
        dir: tempfile::TempDir,
    }

    impl Certs {
        fn new() -> Certs {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("certs")).unwrap();
            let certs = Certs { dir };
            for name in ["a", "b"] {
                let pair = rcgen::generate_simple_self_signed(vec![format!("{name}.example.com")])
                    .unwrap();
                certs.write(&format!("certs/{name}.crt"), &pair.cert.pem());
                certs.write(
                    &format!("certs/{name}.key"),
                    &pair.signing_key.serialize_pem(),
                );
            }
            let ed_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let ed_cert = rcgen::CertificateParams::new(vec!["ed.example.com".to_string()])
                .unwrap()
                .self_signed(&ed_key)
                .unwrap();
            certs.write("certs/ed.crt", &ed_cert.pem());
            certs.write("certs/ed.key", &ed_key.serialize_pem());
            certs.write("garbage.pem", "this is not PEM at all\n");
            certs.write(
                "badbase64.pem",
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            );
            certs.write(
                "notder.pem",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            );
            certs
        }

        fn write(&self, name: &str, contents: &str) {
            std::fs::write(self.dir.path().join(name), contents).unwrap();
        }

        fn source(&self) -> PathBuf {
            self.dir.path().join("proxy.toml")
        }

        /// A config whose listener `tls` table is `tls` (starting at line 3).
        fn listener(&self, tls: &str) -> String {
            format!(
                "[listeners.public]\nbind = \"127.0.0.1:8443\"\n{tls}\n\
                 [routes.echo]\nbuiltin = \"echo\"\n"
            )
        }

        fn load(&self, text: &str) -> Result<Config, Vec<String>> {
            super::on_disk::load(&self.source(), text)
        }

        #[track_caller]
        fn one_problem(&self, text: &str, position: &str, phrase: &str) {
            super::on_disk::one_problem(self.load(text), position, phrase);
        }
    }

    #[test]
    fn matching_cert_and_key_load_relative_to_the_config_folder() {
        let certs = Certs::new();
        let text = certs.listener(
            "[listeners.public.tls]\ncert = \"certs/a.crt\"\nkey = \"certs/a.key\"\n\
             sni = [\n  { server_name = \"B.example.com\", cert = \"certs/b.crt\", key = \"certs/b.key\" },\n\
             { server_name = \"ed.example.com\", cert = \"certs/ed.crt\", key = \"certs/ed.key\" },\n]",
        );
        let c = certs.load(&text).unwrap();
        let tls = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.default.cert_path, certs.dir.path().join("certs/a.crt"));
        assert_eq!(tls.default.key_path, certs.dir.path().join("certs/a.key"));
        assert_eq!(tls.default.chain.len(), 1);
        assert!(matches!(tls.default.key, PrivateKeyDer::Pkcs8(_)));
        let names: Vec<_> = tls.sni.iter().map(|s| s.server_name.as_str()).collect();
        assert_eq!(names, ["b.example.com", "ed.example.com"]);
        assert!(c.summary().contains("tls: yes, certs: "));
        assert!(c.summary().contains("b.example.com ("));
    }

    #[test]
    fn mismatched_key_is_reported_at_the_key() {
        let certs = Certs::new();
        certs.one_problem(
            &certs.listener("[listeners.public.tls]\ncert = \"certs/a.crt\"\nkey = \"certs/b.key\""),
            "5:7: ",
            "private key \"certs/b.key\" does not match certificate \"certs/a.crt\" (listeners.public.tls)",
        );
        certs.one_problem(
            &certs.listener(
                "tls = { cert = \"certs/a.crt\", key = \"certs/a.key\", sni = [\
                 { server_name = \"ed.example.com\", cert = \"certs/ed.crt\", key = \"certs/a.key\" }] }",
            ),
            "3:122: ",
            "private key \"certs/a.key\" does not match certificate \"certs/ed.crt\" (listeners.public.tls.sni[0])",
        );
    }

    #[test]
    fn missing_and_garbage_files_are_reported() {
        let certs = Certs::new();
        certs.one_problem(
            &certs.listener(
                "[listeners.public.tls]\ncert = \"certs/missing.crt\"\nkey = \"certs/a.key\"",
            ),
            "4:8: ",
            "cannot read certificate file \"certs/missing.crt\" for listeners.public.tls.cert: ",
        );
        certs.one_problem(
            &certs
                .listener("[listeners.public.tls]\ncert = \"garbage.pem\"\nkey = \"certs/a.key\""),
            "4:8: ",
            "no certificate found in \"garbage.pem\" for listeners.public.tls.cert",
        );
        certs.one_problem(
            &certs
                .listener("[listeners.public.tls]\ncert = \"certs/a.key\"\nkey = \"certs/a.key\""),
            "4:8: ",
            "are cert and key swapped?",
        );
        certs.one_problem(
            &certs.listener(
                "[listeners.public.tls]\ncert = \"badbase64.pem\"\nkey = \"certs/a.key\"",
            ),
            "4:8: ",
            "invalid PEM in \"badbase64.pem\" for listeners.public.tls.cert: bad base64",
        );
        certs.one_problem(
            &certs.listener("[listeners.public.tls]\ncert = \"notder.pem\"\nkey = \"certs/a.key\""),
            "4:8: ",
            "certificate \"notder.pem\" for listeners.public.tls.cert cannot be used",
        );
        certs.one_problem(
            &certs.listener("[listeners.public.tls]\ncert = \"certs/a.crt\"\nkey = \"certs/a.crt\""),
            "5:7: ",
            "no private key found in \"certs/a.crt\" for listeners.public.tls.key: expected a PEM block",
        );
        certs.one_problem(
            &certs.listener("[listeners.public.tls]\ncert = \"certs/a.crt\""),
            "3:1: ",
            "missing key `key` in [listeners.public.tls]",
        );
        // Both files missing: two problems, one at each value.
        let problems = certs
            .load(&certs.listener("[listeners.public.tls]\ncert = \"x.crt\"\nkey = \"x.key\""))
            .unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[1].starts_with("5:7: cannot read private key file \"x.key\""));
    }

    #[test]
    fn sni_names_are_checked() {
        let certs = Certs::new();
        let entry = |name: &str| {
            format!("{{ server_name = \"{name}\", cert = \"certs/b.crt\", key = \"certs/b.key\" }}")
        };
        let tls = |entries: &[String]| {
            certs.listener(&format!(
                "[listeners.public.tls]\ncert = \"certs/a.crt\"\nkey = \"certs/a.key\"\nsni = [\n{}\n]",
                entries.join(",\n")
            ))
        };
        certs.one_problem(
            &tls(&[entry("b.example.com"), entry("B.example.com")]),
            "8:17: ",
            "server_name \"b.example.com\" appears twice in listeners.public.tls.sni (entries 0 and 1)",
        );
        certs.one_problem(
            &tls(&[entry("*.example.com")]),
            "7:17: ",
            "invalid server_name \"*.example.com\" in listeners.public.tls.sni[0]: exact names only",
        );
        certs.one_problem(
            &tls(&[entry("10.0.0.1")]),
            "7:17: ",
            "SNI carries DNS names, not IP addresses",
        );
    }

    #[test]
    fn upstream_tls_ca_is_loaded() {
        let certs = Certs::new();
        let upstream = |tls: &str| {
            format!(
                "[listeners.public]\nbind = \"127.0.0.1:1\"\n[upstreams.u]\nservers = [\"u.internal:443\"]\n\
                 tls = {tls}\n[routes.r]\nupstream = \"u\"\n"
            )
        };
        let c = certs
            .load(&upstream(
                "{ ca = \"certs/a.crt\", server_name = \"U.Internal\" }",
            ))
            .unwrap();
        let tls = c.upstream("u").unwrap().tls.as_ref().unwrap();
        assert_eq!(tls.ca.len(), 1);
        assert_eq!(tls.server_name.as_deref(), Some("u.internal"));
        certs.one_problem(
            &upstream("{ ca = \"garbage.pem\" }"),
            "5:14: ",
            "no certificate found in \"garbage.pem\" for upstreams.u.tls.ca",
        );
        certs.one_problem(
            &upstream("{ server_name = \"not valid!\" }"),
            "5:23: ",
            "invalid upstreams.u.tls.server_name \"not valid!\"",
        );
        certs.one_problem(
            &upstream("{ enable = true }"),
            "5:9: ",
            "unknown key `enable` in [upstreams.u.tls]; expected one of: enabled, ca, server_name",
        );
    }
}
