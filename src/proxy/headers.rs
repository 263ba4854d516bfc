//! Header rewriting shared by plain requests and WebSocket handshakes: hop-by-hop removal
//! (RFC 9110 §7.6.1) and the forwarding headers upstreams use to see the real client.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop and must not be forwarded (besides those the
/// `Connection` header names). A `static`: built at compile time, compared in place.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Which of [`HOP_BY_HOP`] a removal leaves in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Nothing,
    /// `Connection` and `Upgrade` (the first two), for an upgrade the caller rewrites.
    UpgradePair,
}

/// Removes hop-by-hop headers, including every header the `Connection` header lists.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers, Keep::Nothing);
}

/// [`remove_hop_by_hop`], leaving what `keep` says in place (and the headers `Connection`
/// lists still removed).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep: Keep) {
    // One pass over the names (cheap comparisons of standard names) finds which are
    // present; most messages carry none, an upgrade two. Only those are removed (each
    // removal hashes and probes).
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Names `Connection` lists beyond the fixed set: rare, and no allocation without.
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .filter(|name| !HOP_BY_HOP.contains(name))
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    let kept = match keep {
        Keep::Nothing => 0,
        Keep::UpgradePair => 0b11,
    };
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & !kept & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// True when a comma-separated header (over all its lines) holds `token`, any case.
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// What the forwarding headers say about the client.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo<'a> {
    pub ip: IpAddr,
    /// "http" or "https": the scheme the client used to reach wsgate.
    pub proto: &'static str,
    /// The host the client asked for (`Host` or the URI authority), if any.
    pub host: Option<&'a str>,
}

/// Appends to `X-Forwarded-For` and `Forwarded`, and sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host`, the way nginx's `$proxy_add_x_forwarded_for` and RFC 7239 do.
pub fn add_forwarding(headers: &mut HeaderMap, client: ClientInfo<'_>) {
    Forwarding::new(headers, client).apply(headers);
}

/// The forwarding headers of one request ([`add_forwarding`]), computed from the client's
/// headers: set into a header map, or written straight into a request head without
/// touching the map (`upgrade::encode_request`).
#[derive(Debug)]
pub struct Forwarding<'a> {
    /// `X-Forwarded-For`: the client's lines joined, then the client's address.
    xff: String,
    /// `Forwarded`: the client's lines joined, then this hop's element.
    forwarded: String,
    proto: &'static str,
    /// `X-Forwarded-Host`, when the client named a host that is a valid field value.
    host: Option<&'a str>,
}

impl<'a> Forwarding<'a> {
    pub fn new(headers: &HeaderMap, client: ClientInfo<'a>) -> Forwarding<'a> {
        let ip = client.ip.to_canonical();
        let host = client.host.unwrap_or_default();
        let mut xff = joined_lines(headers, &X_FORWARDED_FOR, 48);
        push_ip(&mut xff, ip);

        let mut forwarded = joined_lines(headers, &header::FORWARDED, 96 + host.len());
        forwarded.push_str("for=");
        match ip {
            IpAddr::V4(_) => push_ip(&mut forwarded, ip),
            IpAddr::V6(_) => {
                forwarded.push_str("\"[");
                push_ip(&mut forwarded, ip);
                forwarded.push_str("]\"");
            }
        }
        if is_token(host) {
            forwarded.push_str(";host=");
            forwarded.push_str(host);
        } else if !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            forwarded.push_str(";host=\"");
            forwarded.push_str(host);
            forwarded.push('"');
        }
        forwarded.push_str(";proto=");
        forwarded.push_str(client.proto);
        Forwarding {
            xff,
            forwarded,
            proto: client.proto,
            host: client.host.filter(|h| is_field_value(h)),
        }
    }

    /// Sets the four headers, replacing the client's lines of each.
    pub fn apply(self, headers: &mut HeaderMap) {
        for (name, value) in [
            (&X_FORWARDED_FOR, self.xff),
            (&header::FORWARDED, self.forwarded),
        ] {
            if let Ok(value) = HeaderValue::try_from(value) {
                headers.insert(name.clone(), value);
            }
        }
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(self.proto),
        );
        if let Some(value) = self.host.and_then(|h| HeaderValue::from_str(h).ok()) {
            headers.insert(X_FORWARDED_HOST.clone(), value);
        }
    }

    /// Whether a header of the client's is replaced by one of these (and so not copied).
    pub fn replaces(&self, name: &HeaderName) -> bool {
        *name == X_FORWARDED_FOR
            || *name == header::FORWARDED
            || *name == X_FORWARDED_PROTO
            || (self.host.is_some() && *name == X_FORWARDED_HOST)
    }

    /// The header lines, for a head written by hand.
    pub fn lines(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("x-forwarded-for", Some(self.xff.as_str())),
            ("forwarded", Some(self.forwarded.as_str())),
            ("x-forwarded-proto", Some(self.proto)),
            ("x-forwarded-host", self.host),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
    }
}

/// The non-empty lines of a list header joined with ", ", ending in ", " when there were
/// any: the start of the value a proxy appends its element to (`room` bytes of it).
fn joined_lines(headers: &HeaderMap, name: &HeaderName, room: usize) -> String {
    let mut out = String::with_capacity(room);
    for v in headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        out.push_str(v);
        out.push_str(", ");
    }
    out
}

/// What `HeaderValue::from_str` accepts: no control characters but tab.
fn is_field_value(s: &str) -> bool {
    s.bytes().all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Writes an address the way `Display` does; IPv4 without the formatting machinery, as
/// this runs for every forwarded request.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// RFC 7230 token characters.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_hop_by_hop_and_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn an_upgrade_keeps_its_pair_and_loses_the_rest() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade, X-Secret"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, Keep::UpgradePair);
        let names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["connection", "upgrade", "x-kept"]);

        let mut plain = HeaderMap::new();
        plain.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut plain, Keep::UpgradePair);
        assert_eq!(plain.len(), 1, "nothing to remove, nothing removed");
    }

    #[test]
    fn tokens_any_case_any_line() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("keep-alive"));
        h.append("connection", HeaderValue::from_static("foo, UpGrade"));
        assert!(has_token(&h, &header::CONNECTION, "upgrade"));
        assert!(!has_token(&h, &header::CONNECTION, "close"));
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        add_forwarding(
            &mut h,
            ClientInfo {
                ip: "::1".parse().unwrap(),
                proto: "https",
                host: Some("chat.example.com:8443"),
            },
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "chat.example.com:8443");
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";host=\"chat.example.com:8443\";proto=https"
        );
    }

    #[test]
    fn forwarded_v4_plain_host() {
        let mut h = HeaderMap::new();
        add_forwarding(
            &mut h,
            ClientInfo {
                ip: "192.0.2.1".parse().unwrap(),
                proto: "http",
                host: Some("example.com"),
            },
        );
        assert_eq!(h["forwarded"], "for=192.0.2.1;host=example.com;proto=http");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "127.0.0.1",
            "2001:db8::1",
            "::",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn forwarded_without_host() {
        let mut h = HeaderMap::new();
        h.append("forwarded", HeaderValue::from_static("for=192.0.2.7"));
        h.append("forwarded", HeaderValue::from_static(" "));
        h.append("forwarded", HeaderValue::from_static("for=192.0.2.8"));
        add_forwarding(
            &mut h,
            ClientInfo {
                ip: "::ffff:10.1.2.3".parse().unwrap(),
                proto: "http",
                host: None,
            },
        );
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7, for=192.0.2.8, for=10.1.2.3;proto=http"
        );
        assert!(!h.contains_key("x-forwarded-host"));
    }
}
