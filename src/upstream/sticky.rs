//! Cookie stickiness (`balance = "cookie:NAME"`), like HAProxy's `cookie NAME prefix`: when a
//! server's answer sets cookie NAME, wsgate prefixes the value with the server's id
//! (`ID~value`); a later request carrying that cookie goes to the same server, with the
//! prefix removed before the server sees it. No state is kept in wsgate.

use http::header::{self, HeaderMap, HeaderValue};

use super::Server;

/// Separates the server id from the application's value.
const SEPARATOR: char = '~';

impl Server {
    /// The id this server puts in front of sticky cookie values: stable for a server
    /// address across restarts and replicas, so any wsgate of a fleet routes it alike.
    pub fn sticky_id(&self) -> &str {
        &self.sticky_id
    }
}

/// A short stable id for a server label (FNV-1a, 32 bits, hex).
pub fn server_id(label: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for b in label.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{hash:08x}")
}

/// The first value of cookie `name` in the request, if any.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &'a str) -> Option<&'a str> {
    cookie_values(headers, name).next()
}

/// The server id a cookie value starts with, if it has the shape of one.
pub fn prefix(value: &str) -> Option<&str> {
    value
        .split_once(SEPARATOR)
        .map(|(id, _)| id)
        .filter(|id| id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (n, v) = pair.trim().split_once('=')?;
            (n == name).then_some(v)
        })
}

/// Removes the server prefix from cookie `name` before the request goes upstream, when
/// `known` says it names a server of the pool (any other value is the application's own).
pub fn strip_request_prefix(headers: &mut HeaderMap, name: &str, known: impl Fn(&str) -> bool) {
    if !cookie_values(headers, name).any(|v| prefix(v).is_some_and(&known)) {
        return;
    }
    let rewritten: Vec<HeaderValue> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|line| {
            line.split(';')
                .map(|pair| {
                    let trimmed = pair.trim();
                    match trimmed.split_once('=') {
                        Some((n, v)) if n == name => match v.split_once(SEPARATOR) {
                            Some((_, app)) if prefix(v).is_some_and(&known) => {
                                format!("{n}={app}")
                            }
                            _ => trimmed.to_string(),
                        },
                        _ => trimmed.to_string(),
                    }
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter_map(|line| HeaderValue::from_str(&line).ok())
        .collect();
    headers.remove(header::COOKIE);
    for value in rewritten {
        headers.append(header::COOKIE, value);
    }
}

/// Prefixes cookie `name` in the server's `Set-Cookie` headers with the server's id.
pub fn prefix_response_cookie(headers: &mut HeaderMap, name: &str, server: &Server) {
    let prefix = format!("{name}=");
    let mut changed = false;
    let rewritten: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|value| {
            let Ok(text) = value.to_str() else {
                return value.clone();
            };
            match text.strip_prefix(&prefix) {
                Some(rest) => {
                    changed = true;
                    let line = format!("{prefix}{}{SEPARATOR}{rest}", server.sticky_id());
                    HeaderValue::from_str(&line).unwrap_or_else(|_| value.clone())
                }
                None => value.clone(),
            }
        })
        .collect();
    if changed {
        headers.remove(header::SET_COOKIE);
        for value in rewritten {
            headers.append(header::SET_COOKIE, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_prefix_is_found_and_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; io=abcd1234~sess42; b=2"),
        );
        assert_eq!(cookie_value(&h, "io").and_then(prefix), Some("abcd1234"));
        strip_request_prefix(&mut h, "io", |id| id == "abcd1234");
        assert_eq!(h[header::COOKIE], "a=1; io=sess42; b=2");
        assert_eq!(cookie_value(&h, "io").and_then(prefix), None);
    }

    #[test]
    fn an_unknown_prefix_is_the_application_s_value() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("io=abcd1234~x"));
        strip_request_prefix(&mut h, "io", |id| id == "00000000");
        assert_eq!(h[header::COOKIE], "io=abcd1234~x");
        assert_eq!(prefix("not-an-id~x"), None);
        assert_eq!(prefix("plain"), None);
    }

    #[test]
    fn ids_are_stable_and_short() {
        assert_eq!(server_id("10.0.0.1:9001"), server_id("10.0.0.1:9001"));
        assert_ne!(server_id("10.0.0.1:9001"), server_id("10.0.0.2:9001"));
        assert_eq!(server_id("x").len(), 8);
    }
}
