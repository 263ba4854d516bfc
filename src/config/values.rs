//! The syntax of single config values: addresses, server names, balance modes, route hosts
//! and paths, origins, log levels. Pure functions from text to a value or to a short message
//! that says what is wrong and what would be valid; `validate` adds the key and the position.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use rustls_pki_types::pem;

use super::{Balance, HostHeader, HostMatch, ServerAddr};

/// Level names accepted on their own in `[log] level`; anything else must look like an
/// EnvFilter directive (contain `=`, `,` or `[`), so a typo such as "inf" is caught rather
/// than silently read as "trace for a module called inf".
const LOG_LEVEL_NAMES: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// True when two listeners cannot both bind: the same address, or the same port with one of
/// them on the wildcard address of the same family. Port 0 (pick any free port) never clashes.
pub fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    a.ip() == b.ip()
        || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified()))
}

pub fn clash_reason(addr: SocketAddr) -> &'static str {
    if addr.ip().is_unspecified() {
        "a wildcard address covers every address of its family on that port; use another port"
    } else {
        "two listeners cannot bind the same address and port; use another port or address"
    }
}

pub fn pem_error(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "a PEM block is not closed (missing {:?})",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => {
            format!("malformed BEGIN line {:?}", String::from_utf8_lossy(line))
        }
        pem::Error::Base64Decode(e) => format!("bad base64 inside a PEM block ({e})"),
        other => other.to_string(),
    }
}

pub fn check_log_level(level: &str) -> Result<(), String> {
    let hint = r#"expected one of trace, debug, info, warn, error, off, or EnvFilter directives such as "wsgate=debug,info""#;
    if level.trim().is_empty() {
        return Err(format!("empty; {hint}"));
    }
    let is_directive = level.contains(['=', ',', '[']);
    if !is_directive && !LOG_LEVEL_NAMES.contains(&level.to_ascii_lowercase().as_str()) {
        return Err(format!("unknown level; {hint}"));
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| format!("{e}; {hint}"))
}

/// `IP:port` for a socket to bind.
pub fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| {
        let host_name = s
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && h.parse::<IpAddr>().is_err() && p.parse::<u16>().is_ok() && !h.starts_with('['));
        if host_name {
            r#"expected an IP address and port, not a host name, e.g. "127.0.0.1:8080" or "0.0.0.0:8080""#
                .to_string()
        } else {
            r#"expected IP:port, e.g. "0.0.0.0:8080" or "[::]:8443""#.to_string()
        }
    })
}

/// `host:port` of an upstream server. IPv6 literals go in brackets: `[::1]:9000`.
pub fn parse_server(s: &str) -> Result<ServerAddr, String> {
    const EXAMPLE: &str =
        r#"expected host:port, e.g. "127.0.0.1:9001", "app.internal:9001" or "[::1]:9001""#;
    if s.contains("://") {
        return Err(format!("no scheme here; {EXAMPLE}"));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unclosed '['; {EXAMPLE}"))?;
        let ip: Ipv6Addr = inner
            .parse()
            .map_err(|_| format!("{inner:?} is not an IPv6 address; {EXAMPLE}"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| format!("missing port; {EXAMPLE}"))?;
        (ip.to_string(), port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("missing port; {EXAMPLE}"))?;
        if host.contains(':') {
            return Err(format!(
                "IPv6 addresses need brackets, e.g. \"[{host}]:{port}\""
            ));
        }
        if host.is_empty() {
            return Err(format!("missing host; {EXAMPLE}"));
        }
        check_dns_name(host).map_err(|e| format!("bad host {host:?}: {e}; {EXAMPLE}"))?;
        (host.to_ascii_lowercase(), port)
    };
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("invalid port {port:?}: expected 1 to 65535")),
    };
    Ok(ServerAddr { host, port })
}

/// `round_robin`, `least_conn`, `ip_hash`, `header:NAME` or `cookie:NAME`.
/// `"preserve"`, `"upstream"`, or a literal `host[:port]`.
pub fn parse_host_header(s: &str) -> Result<HostHeader, String> {
    match s {
        "preserve" => Ok(HostHeader::Preserve),
        "upstream" => Ok(HostHeader::Upstream),
        _ if super::units::is_valid_host(s) => Ok(HostHeader::Literal(s.to_owned())),
        _ => Err(r#"expected "preserve", "upstream" or a host name with an optional port, e.g. "chat.internal:8080""#.to_owned()),
    }
}

pub fn parse_balance(s: &str) -> Result<Balance, String> {
    const VALID: &str =
        r#"expected one of round_robin, least_conn, ip_hash, "header:NAME", "cookie:NAME""#;
    match s {
        "round_robin" => return Ok(Balance::RoundRobin),
        "least_conn" => return Ok(Balance::LeastConn),
        "ip_hash" => return Ok(Balance::IpHash),
        _ => {}
    }
    if let Some(name) = s.strip_prefix("header:") {
        return if is_token(name) {
            Ok(Balance::Header(name.to_ascii_lowercase()))
        } else {
            Err(format!(
                "{name:?} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only), e.g. \"header:X-User-Id\""
            ))
        };
    }
    if let Some(name) = s.strip_prefix("cookie:") {
        return if is_token(name) {
            Ok(Balance::Cookie(name.to_string()))
        } else {
            Err(format!(
                "{name:?} is not a valid cookie name (letters, digits and !#$%&'*+-.^_`|~ only), e.g. \"cookie:io\""
            ))
        };
    }
    let fixed = s.replace('-', "_").to_ascii_lowercase();
    if fixed != s && ["round_robin", "least_conn", "ip_hash"].contains(&fixed.as_str()) {
        return Err(format!("did you mean {fixed:?}? {VALID}"));
    }
    Err(VALID.to_string())
}

/// An RFC 9110 token: what header and cookie names are made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

/// A route's `host`: exact ("chat.example.com") or a leading wildcard ("*.example.com"),
/// lower-cased, without port.
pub fn parse_host(s: &str) -> Result<HostMatch, String> {
    if s.is_empty() {
        return Err("empty; omit `host` to match any host".to_string());
    }
    if s.contains("://") || s.contains('/') {
        return Err(
            r#"just the host name, without scheme or path, e.g. "chat.example.com""#.to_string(),
        );
    }
    let lower = s.to_ascii_lowercase();
    if lower == "*" {
        return Err("omit `host` to match any host".to_string());
    }
    if let Some(inner) = lower.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return match inner.parse::<Ipv6Addr>() {
            Ok(_) => Ok(HostMatch::Exact(lower)),
            Err(_) => Err(format!("{inner:?} is not an IPv6 address")),
        };
    }
    if lower.contains(':') {
        return Err(
            r#"no port here: a route matches the host on every listener, e.g. "chat.example.com""#
                .to_string(),
        );
    }
    if let Some(suffix) = lower.strip_prefix("*.") {
        if suffix.contains('*') {
            return Err(
                r#"only one leading "*." wildcard is allowed, e.g. "*.example.com""#.to_string(),
            );
        }
        check_dns_name(suffix)?;
        return Ok(HostMatch::WildcardSuffix(format!(".{suffix}")));
    }
    if lower.contains('*') {
        return Err(r#"only a leading "*." wildcard is allowed, e.g. "*.example.com""#.to_string());
    }
    check_dns_name(&lower)?;
    Ok(HostMatch::Exact(lower))
}

/// A name for `sni`: an exact DNS name, lower-cased.
pub fn parse_sni_name(s: &str) -> Result<String, String> {
    if s.contains('*') {
        return Err(
            "exact names only; the certificate for anything else is the default `cert`".to_string(),
        );
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err("SNI carries DNS names, not IP addresses".to_string());
    }
    let lower = s.to_ascii_lowercase();
    check_dns_name(&lower)?;
    Ok(lower)
}

/// Letters, digits, '-' and '_' in dot-separated labels of 1-63 characters, 253 at most.
fn check_dns_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err("a host name has 1 to 253 characters".to_string());
    }
    for label in s.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(
                "each dot-separated part of a host name has 1 to 63 characters".to_string(),
            );
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err("a host name has letters, digits, '-' and '_' only".to_string());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a part of a host name cannot start or end with '-'".to_string());
        }
    }
    Ok(())
}

/// A route's `path`: starts with '/', no trailing '/' (except "/" itself), no empty, "." or
/// ".." segments, no query or fragment.
pub fn normalize_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!(
            r#"must start with '/', e.g. "/{}""#,
            s.trim_start_matches('/')
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| matches!(c, '?' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{c:?} is not allowed: a route path is a plain prefix, without query or fragment"
        ));
    }
    let trimmed = s.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".to_string());
    }
    for segment in trimmed.split('/').skip(1) {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(
                r#"empty, "." and ".." segments are not allowed, e.g. "/chat/ws""#.to_string(),
            );
        }
    }
    Ok(trimmed.to_string())
}

/// An `allowed_origins` entry: `scheme://host[:port]`, lower-cased, default port dropped.
pub fn normalize_origin(s: &str) -> Result<String, String> {
    const EXAMPLE: &str = r#"expected scheme://host[:port], e.g. "https://chat.example.com""#;
    let (scheme, rest) = s.split_once("://").ok_or_else(|| EXAMPLE.to_string())?;
    let scheme = scheme.to_ascii_lowercase();
    let scheme_ok = scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err(format!("bad scheme {scheme:?}; {EXAMPLE}"));
    }
    if rest.contains(['/', '?', '#']) {
        return Err(format!(
            "an origin has no path: write \"{scheme}://{}\"",
            rest.split(['/', '?', '#']).next().unwrap_or("")
        ));
    }
    if rest.contains('*') {
        return Err(format!(
            "wildcards are not supported; list each origin; {EXAMPLE}"
        ));
    }
    if rest.contains('@') {
        return Err(format!("an origin has no user info; {EXAMPLE}"));
    }
    let rest = rest.to_ascii_lowercase();
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (inner, after) = r.split_once(']').ok_or_else(|| EXAMPLE.to_string())?;
        inner
            .parse::<Ipv6Addr>()
            .map_err(|_| format!("{inner:?} is not an IPv6 address; {EXAMPLE}"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| EXAMPLE.to_string())?),
        };
        (format!("[{inner}]"), port)
    } else {
        let (host, port) = match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest.as_str(), None),
        };
        check_dns_name(host).map_err(|e| format!("bad host {host:?}: {e}; {EXAMPLE}"))?;
        (host.to_string(), port)
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(format!("invalid port {p:?}: expected 1 to 65535")),
        },
    };
    let default_port = match scheme.as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    Ok(match port {
        Some(p) if Some(p) != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}
