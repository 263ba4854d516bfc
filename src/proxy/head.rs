//! One reading of a request head, used for routing and forwarding alike.
//!
//! Before anything is routed, the head is made unambiguous or refused with 400:
//! - exactly one `Host` (none is allowed on HTTP/1.0 only), a valid `host[:port]`; an
//!   absolute-form target's authority replaces it (RFC 9112 §3.2.2), in the forwarded head too;
//! - headers wsgate acts on or that two parsers could read differently (`Host`, `Origin`,
//!   `Content-Length`, `Sec-WebSocket-Key`, `Sec-WebSocket-Version`) appear at most once;
//! - the path is normalised (RFC 3986 §6.2.2): percent-encoded unreserved characters are
//!   decoded, other escapes get upper-case hex, dot-segments are removed (§5.2.4), and a path
//!   that climbs above `/` is refused. `%2F` stays encoded and repeated slashes stay as they
//!   are (docs/operations.md says why). The query string is left untouched.
//!
//! The request's URI and `Host` header are rewritten to that reading, so what the router
//! matched is exactly what the upstream receives.

use std::borrow::Cow;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

use crate::config::units::is_valid_host;
use crate::error::ProxyError;

/// Headers that must not appear twice, with the refusal's wording.
const SINGLETONS: [(HeaderName, &str); 5] = [
    (header::HOST, "more than one Host header"),
    (header::ORIGIN, "more than one Origin header"),
    (
        header::CONTENT_LENGTH,
        "more than one Content-Length header",
    ),
    (
        header::SEC_WEBSOCKET_KEY,
        "more than one Sec-WebSocket-Key header",
    ),
    (
        header::SEC_WEBSOCKET_VERSION,
        "more than one Sec-WebSocket-Version header",
    ),
];

/// Checks and rewrites `req`'s head; returns the host the request is for (`None` only for
/// an HTTP/1.0 request without one), as the client wrote it (port included).
pub fn read<B>(req: &mut Request<B>) -> Result<Option<String>, ProxyError> {
    for (name, problem) in &SINGLETONS {
        let mut values = req.headers().get_all(name).iter();
        if values.next().is_some() && values.next().is_some() {
            return Err(ProxyError::BadRequest(problem));
        }
    }
    let authority = req.uri().authority().map(|a| a.as_str().to_owned());
    let host = match authority {
        Some(host) => {
            let value = HeaderValue::from_str(&host)
                .ok()
                .filter(|_| is_valid_host(&host))
                .ok_or(ProxyError::BadRequest("invalid host in the request target"))?;
            req.headers_mut().insert(header::HOST, value);
            Some(host)
        }
        None => match req.headers().get(header::HOST) {
            Some(value) => match value.to_str() {
                Ok(host) if is_valid_host(host) => Some(host.to_owned()),
                _ => return Err(ProxyError::BadRequest("invalid Host header")),
            },
            None if req.version() == Version::HTTP_10 || req.version() == Version::HTTP_09 => None,
            None => return Err(ProxyError::BadRequest("no Host header")),
        },
    };
    let path = normalize_path(req.uri().path())?;
    if matches!(path, Cow::Owned(_)) || req.uri().scheme().is_some() {
        let target = match req.uri().query() {
            Some(query) => format!("{path}?{query}"),
            None => path.into_owned(),
        };
        *req.uri_mut() = target
            .parse::<Uri>()
            .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))?;
    }
    Ok(host)
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalises a request path (see the module doc); borrowed when it is already normal.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, ProxyError> {
    if !path.starts_with('/') {
        return Err(ProxyError::BadRequest("the request target must be a path"));
    }
    let needs_work = path.contains('%')
        || path
            .split('/')
            .any(|segment| segment == "." || segment == "..");
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    remove_dot_segments(&decoded).map(Cow::Owned)
}

/// Decodes percent-encoded unreserved characters; other escapes keep their meaning with
/// upper-case hex digits (so `%2f` and `%2F` are the same path).
fn decode_unreserved(path: &str) -> Result<String, ProxyError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(char::from(bytes[i]));
            i += 1;
            continue;
        }
        let hex = |b: Option<&u8>| b.and_then(|b| char::from(*b).to_digit(16));
        let (Some(high), Some(low)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
            return Err(ProxyError::BadRequest(
                "invalid percent-encoding in the path",
            ));
        };
        let value = (high * 16 + low) as u8;
        if is_unreserved(value) {
            out.push(char::from(value));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(value >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(value & 15)]));
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on an absolute path, except that climbing above `/` is an error rather
/// than silently stopping there: such a request is malformed or an attack.
fn remove_dot_segments(path: &str) -> Result<String, ProxyError> {
    let climbs = || ProxyError::BadRequest("the path climbs above /");
    let mut out: Vec<&str> = Vec::new();
    let mut segments = path[1..].split('/').peekable();
    let mut trailing_slash = false;
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." => trailing_slash = last,
            ".." => {
                out.pop().ok_or_else(climbs)?;
                trailing_slash = last;
            }
            _ => out.push(segment),
        }
    }
    let mut normal = String::with_capacity(path.len());
    for segment in &out {
        normal.push('/');
        normal.push_str(segment);
    }
    if normal.is_empty() || trailing_slash {
        normal.push('/');
    }
    Ok(normal)
}

/// Decodes a query value: `%XX` escapes, and `+` as a space
/// (`application/x-www-form-urlencoded`); `None` for a broken escape or non-UTF-8.
pub fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let text = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(text, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> Result<String, String> {
        normalize_path(path)
            .map(Cow::into_owned)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn dot_segments_are_removed() {
        for (path, want) in [
            ("/public/../secret", "/secret"),
            ("/public/./../secret", "/secret"),
            ("/public/%2e%2e/secret", "/secret"),
            ("/public/%2E%2E/secret", "/secret"),
            ("/public/.%2e/secret", "/secret"),
            ("/a/./b/../c", "/a/c"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/..", "/"),
            ("/.", "/"),
            ("/a//../b", "/a/b"),
            ("/a//.", "/a//"),
            ("/a/.../b", "/a/.../b"),
            ("/a/..b/c", "/a/..b/c"),
        ] {
            assert_eq!(normal(path).as_deref(), Ok(want), "{path}");
        }
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        for path in ["/..", "/../x", "/a/../../x", "/%2e%2e/x", "/a/%2E./.."] {
            let e = normal(path).unwrap_err();
            assert!(e.contains("climbs above /"), "{path}: {e}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_upper_cased() {
        assert_eq!(normal("/public/%41%7e").as_deref(), Ok("/public/A~"));
        assert_eq!(normal("/a%2fb").as_deref(), Ok("/a%2Fb"));
        assert_eq!(normal("/a%2Fb").as_deref(), Ok("/a%2Fb"));
        assert_eq!(normal("/%e2%82%ac").as_deref(), Ok("/%E2%82%AC"));
        assert_eq!(normal("/a%2f..%2fb").as_deref(), Ok("/a%2F..%2Fb"));
    }

    #[test]
    fn bad_escapes_are_refused() {
        for path in ["/%zz", "/%4", "/a%", "/%g0"] {
            let e = normal(path).unwrap_err();
            assert!(e.contains("invalid percent-encoding"), "{path}: {e}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for path in ["/", "/a/b", "/a//b", "/a/b/", "/.well-known/x", "/a.b/c..d"] {
            assert!(matches!(normalize_path(path), Ok(Cow::Borrowed(p)) if p == path));
        }
        assert!(normalize_path("*").is_err());
    }

    #[test]
    fn hosts() {
        for ok in [
            "example.com",
            "Example.COM:8443",
            "a-b_c.example.",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[2001:db8::1]:443",
            "localhost:65535",
        ] {
            assert!(is_valid_host(ok), "{ok}");
        }
        for bad in [
            "",
            "host:port:x",
            "[::1",
            "[::1]x",
            "[zz::1]",
            "a/b",
            "a@b",
            "user@host:80",
            "host:99999",
            "host:0",
            "host:",
            ":80",
            "a..b",
            ".a",
            "a b",
            "a\\b",
        ] {
            assert!(!is_valid_host(bad), "{bad}");
        }
    }

    fn request(target: &str, hosts: &[&str], version: Version) -> Request<()> {
        let mut builder = Request::builder().uri(target).version(version);
        for host in hosts {
            builder = builder.header("host", *host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn one_host_or_refused() {
        let mut two = request("/", &["a.test", "b.test"], Version::HTTP_11);
        assert!(read(&mut two)
            .unwrap_err()
            .to_string()
            .contains("more than one Host header"));
        let mut none = request("/", &[], Version::HTTP_11);
        assert!(read(&mut none)
            .unwrap_err()
            .to_string()
            .contains("no Host header"));
        let mut old = request("/", &[], Version::HTTP_10);
        assert_eq!(read(&mut old).unwrap(), None);
        let mut bad = request("/", &["a@b"], Version::HTTP_11);
        assert!(read(&mut bad)
            .unwrap_err()
            .to_string()
            .contains("invalid Host header"));
    }

    #[test]
    fn absolute_form_authority_replaces_host() {
        let mut req = request(
            "http://admin.internal/x/../y?q=1",
            &["public.example"],
            Version::HTTP_11,
        );
        assert_eq!(read(&mut req).unwrap().as_deref(), Some("admin.internal"));
        assert_eq!(req.headers()["host"], "admin.internal");
        assert_eq!(req.uri().to_string(), "/y?q=1");
        assert!(req.uri().authority().is_none());
    }

    #[test]
    fn path_is_rewritten_query_untouched() {
        let mut req = request("/public/./x?a=../b&c=%2e", &["h"], Version::HTTP_11);
        read(&mut req).unwrap();
        assert_eq!(req.uri().to_string(), "/public/x?a=../b&c=%2e");
    }

    #[test]
    fn singletons_appear_once() {
        for name in [
            "origin",
            "content-length",
            "sec-websocket-key",
            "sec-websocket-version",
        ] {
            let mut req = request("/", &["h"], Version::HTTP_11);
            req.headers_mut()
                .append(name, HeaderValue::from_static("13"));
            req.headers_mut()
                .append(name, HeaderValue::from_static("13"));
            let e = read(&mut req).unwrap_err().to_string();
            assert!(
                e.contains("more than one") && e.to_lowercase().contains(name),
                "{e}"
            );
        }
    }
}
