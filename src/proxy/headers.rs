//! Header rewriting shared by plain requests and WebSocket handshakes: hop-by-hop removal
//! (RFC 9110 §7.6.1) and the forwarding headers upstreams use to see the real client.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop and must not be forwarded (besides those the
/// `Connection` header names).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including every header the `Connection` header lists.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names (cheap comparisons of
    // standard names) instead of a hashed removal per hop-by-hop name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
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
    let ip = client.ip.to_canonical();
    let host = client.host.unwrap_or_default();
    // One buffer for both values: the address, then the `Forwarded` element.
    let mut text = String::with_capacity(96 + host.len());
    push_ip(&mut text, ip);
    append_list(headers, HeaderName::from_static("x-forwarded-for"), &text);

    text.clear();
    text.push_str("for=");
    match ip {
        IpAddr::V4(_) => push_ip(&mut text, ip),
        IpAddr::V6(_) => {
            text.push_str("\"[");
            push_ip(&mut text, ip);
            text.push_str("]\"");
        }
    }
    if is_token(host) {
        text.push_str(";host=");
        text.push_str(host);
    } else if !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        text.push_str(";host=\"");
        text.push_str(host);
        text.push('"');
    }
    text.push_str(";proto=");
    text.push_str(client.proto);
    append_list(headers, header::FORWARDED, &text);

    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(client.proto),
    );
    if let Some(value) = client.host.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), value);
    }
}

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

/// Joins all existing lines of a list header and appends `item`, leaving one line.
fn append_list(headers: &mut HeaderMap, name: HeaderName, item: &str) {
    let mut existing = headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .peekable();
    let value = if existing.peek().is_none() {
        HeaderValue::from_str(item)
    } else {
        let mut joined = String::with_capacity(128);
        for v in existing {
            joined.push_str(v);
            joined.push_str(", ");
        }
        joined.push_str(item);
        HeaderValue::from_str(&joined)
    };
    if let Ok(value) = value {
        headers.insert(name, value);
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
