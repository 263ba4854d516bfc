//! Request routing: (host, path) -> route. Pure and allocation-free per lookup.
//!
//! Host groups are tried from most to least specific: exact names, then wildcards
//! (longest suffix first), then routes without a host. Within the first group that has
//! a matching path, the longest path prefix on a segment boundary wins, so `/ws`
//! matches `/ws` and `/ws/room` but never `/wsx`.

use std::sync::Arc;

use crate::config::HostMatch;

/// One host group: every route sharing the same host matcher, longest path first.
#[derive(Debug)]
struct HostGroup<T> {
    host: HostMatch,
    routes: Vec<(String, Arc<T>)>,
}

/// Maps a request's host and path to a route value `T`.
#[derive(Debug)]
pub struct Router<T> {
    groups: Vec<HostGroup<T>>,
}

impl<T> Router<T> {
    /// Builds a router from `(host, path, value)` triples; paths are already normalised
    /// (leading '/', no trailing '/' unless the path is exactly "/").
    pub fn new(routes: impl IntoIterator<Item = (HostMatch, String, Arc<T>)>) -> Self {
        let mut groups: Vec<HostGroup<T>> = Vec::new();
        for (host, path, value) in routes {
            match groups.iter_mut().find(|g| g.host == host) {
                Some(group) => group.routes.push((path, value)),
                None => groups.push(HostGroup {
                    host,
                    routes: vec![(path, value)],
                }),
            }
        }
        for group in &mut groups {
            group.routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        }
        groups.sort_by_key(|g| specificity(&g.host));
        Router { groups }
    }

    /// Every route, in lookup order.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<T>> {
        self.groups
            .iter()
            .flat_map(|g| g.routes.iter().map(|(_, v)| v))
    }

    /// Finds the route for `host` (as sent: any case, optional port) and `path` (no query).
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Arc<T>> {
        let host = normalize_host(host);
        self.groups
            .iter()
            .filter(|g| host_matches(&g.host, host))
            .find_map(|g| {
                g.routes
                    .iter()
                    .find(|(prefix, _)| path_matches(prefix, path))
                    .map(|(_, v)| v)
            })
    }
}

/// Sort key: lower is more specific.
fn specificity(host: &HostMatch) -> (u8, usize) {
    match host {
        HostMatch::Exact(_) => (0, 0),
        // Longer suffixes are more specific; invert the length so they sort first.
        HostMatch::WildcardSuffix(s) => (1, usize::MAX - s.len()),
        HostMatch::Any => (2, 0),
    }
}

/// Strips the port and a trailing dot; `[v6]:port` keeps its brackets.
pub fn normalize_host(host: &str) -> &str {
    let without_port = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        match host.rfind(':') {
            Some(colon) if host[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..colon],
            _ => host,
        }
    };
    without_port.strip_suffix('.').unwrap_or(without_port)
}

fn host_matches(pattern: &HostMatch, host: &str) -> bool {
    match pattern {
        HostMatch::Any => true,
        HostMatch::Exact(name) => name.eq_ignore_ascii_case(host),
        HostMatch::WildcardSuffix(suffix) => {
            // "*.example.com" matches "a.example.com" and "a.b.example.com", not "example.com".
            host.len() > suffix.len()
                && host.is_char_boundary(host.len() - suffix.len())
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
    }
}

/// True when `prefix` matches `path` on a segment boundary.
pub fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The path the upstream sees when the route strips its prefix: `/api/x` under `/api` becomes `/x`.
pub fn strip_prefix<'a>(prefix: &str, path: &'a str) -> &'a str {
    if prefix == "/" {
        return path;
    }
    match path.strip_prefix(prefix) {
        Some("") | None => "/",
        Some(rest) => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(entries: &[(&str, &str, &'static str)]) -> Router<&'static str> {
        Router::new(entries.iter().map(|(h, p, v)| {
            let host = match *h {
                "" => HostMatch::Any,
                h if h.starts_with("*.") => HostMatch::WildcardSuffix(h[1..].to_string()),
                h => HostMatch::Exact(h.to_string()),
            };
            (host, p.to_string(), Arc::new(*v))
        }))
    }

    fn get(r: &Router<&'static str>, host: &str, path: &str) -> Option<&'static str> {
        r.lookup(host, path).map(|v| **v)
    }

    #[test]
    fn prefix_on_segment_boundaries() {
        let r = router(&[("", "/ws", "ws"), ("", "/", "root")]);
        assert_eq!(get(&r, "x", "/ws"), Some("ws"));
        assert_eq!(get(&r, "x", "/ws/room"), Some("ws"));
        assert_eq!(get(&r, "x", "/ws/"), Some("ws"));
        assert_eq!(get(&r, "x", "/wsx"), Some("root"));
        assert_eq!(get(&r, "x", "/"), Some("root"));
        assert_eq!(get(&r, "x", "/other"), Some("root"));
    }

    #[test]
    fn longest_prefix_wins() {
        let r = router(&[("", "/a", "a"), ("", "/a/b", "ab"), ("", "/a/b/c", "abc")]);
        assert_eq!(get(&r, "h", "/a/b/c/d"), Some("abc"));
        assert_eq!(get(&r, "h", "/a/b/x"), Some("ab"));
        assert_eq!(get(&r, "h", "/a/bc"), Some("a"));
        assert_eq!(get(&r, "h", "/b"), None);
    }

    #[test]
    fn host_specificity_and_case() {
        let r = router(&[
            ("chat.example.com", "/", "exact"),
            ("*.example.com", "/", "wild"),
            ("*.eu.example.com", "/", "wild-eu"),
            ("", "/", "any"),
        ]);
        assert_eq!(get(&r, "CHAT.example.com:8443", "/x"), Some("exact"));
        assert_eq!(get(&r, "chat.example.com.", "/x"), Some("exact"));
        assert_eq!(get(&r, "a.example.com", "/"), Some("wild"));
        assert_eq!(get(&r, "a.eu.example.com", "/"), Some("wild-eu"));
        assert_eq!(get(&r, "example.com", "/"), Some("any"));
        assert_eq!(get(&r, "[::1]:80", "/"), Some("any"));
    }

    #[test]
    fn falls_back_to_less_specific_host_when_path_misses() {
        let r = router(&[("chat.example.com", "/ws", "chat-ws"), ("", "/", "any")]);
        assert_eq!(get(&r, "chat.example.com", "/ws/1"), Some("chat-ws"));
        assert_eq!(get(&r, "chat.example.com", "/static"), Some("any"));
    }

    #[test]
    fn no_match_is_none() {
        let r = router(&[("a.com", "/", "a")]);
        assert_eq!(get(&r, "b.com", "/"), None);
        assert_eq!(get(&r, "xa.com", "/"), None);
    }

    #[test]
    fn normalizes_hosts() {
        assert_eq!(normalize_host("Example.com:80"), "Example.com");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert_eq!(normalize_host("host."), "host");
        assert_eq!(normalize_host("host"), "host");
    }

    #[test]
    fn strips_prefixes() {
        assert_eq!(strip_prefix("/api", "/api/users"), "/users");
        assert_eq!(strip_prefix("/api", "/api"), "/");
        assert_eq!(strip_prefix("/", "/x"), "/x");
    }
}
