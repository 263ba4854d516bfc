//! The TOML file as written: serde types with positions (`Spanned`), no defaults, no checks.
//!
//! The document is parsed once into a spanned tree, then every top-level table and every
//! named entry (`[listeners.X]`, `[upstreams.X]`, `[routes.X]`) is deserialized on its own,
//! so one bad entry does not hide the problems of the others. serde's messages are reworded
//! to name the key path and list what would be valid.

use std::ops::Range;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

/// One problem, with the byte range it is about (`None`: the whole file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub span: Option<Range<usize>>,
    pub message: String,
}

impl Problem {
    pub fn at(span: Range<usize>, message: impl Into<String>) -> Self {
        Problem {
            span: Some(span),
            message: message.into(),
        }
    }

    pub fn whole_file(message: impl Into<String>) -> Self {
        Problem {
            span: None,
            message: message.into(),
        }
    }
}

/// Top-level tables, in the order the docs present them.
pub const TOP_LEVEL_KEYS: [&str; 8] = [
    "log",
    "runtime",
    "admin",
    "listeners",
    "timeouts",
    "limits",
    "upstreams",
    "routes",
];

/// The whole file. Every table is optional here; the validator decides what is required.
#[derive(Debug, Default)]
pub struct RawConfig {
    pub log: Option<RawLog>,
    pub runtime: Option<RawRuntime>,
    pub admin: Option<RawAdmin>,
    pub listeners: Option<NamedTables<RawListener>>,
    pub timeouts: Option<RawTimeouts>,
    pub limits: Option<RawLimits>,
    pub upstreams: Option<NamedTables<RawUpstream>>,
    pub routes: Option<NamedTables<RawRoute>>,
}

/// A table of named entries such as `[listeners]`.
#[derive(Debug)]
pub struct NamedTables<T> {
    /// Where the table itself is (for "needs at least one entry").
    pub span: Range<usize>,
    pub entries: Vec<Named<T>>,
}

/// One named entry such as `[listeners.public]`.
#[derive(Debug)]
pub struct Named<T> {
    /// The name, with the position of the key.
    pub name: Spanned<String>,
    /// Where the entry's table is (its `[header]`, or the `{ ... }` of an inline table).
    pub span: Range<usize>,
    /// `None` when the entry did not deserialize (already reported); the name still counts
    /// as defined, so references to it do not produce a second, misleading error.
    pub value: Option<T>,
}

/// `[log]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawLog {
    pub level: Option<Spanned<String>>,
    pub format: Option<Spanned<String>>,
}

/// `[runtime]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawRuntime {
    pub worker_threads: Option<Spanned<i64>>,
    pub splice: Option<bool>,
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawAdmin {
    pub bind: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
}

/// `[listeners.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawListener {
    pub bind: Spanned<String>,
    pub http2: Option<bool>,
    pub http2_max_streams: Option<Spanned<i64>>,
    pub tls: Option<RawTls>,
}

/// `[listeners.NAME.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub sni: Option<Vec<RawSni>>,
}

/// One entry of `sni = [ ... ]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawSni {
    pub server_name: Spanned<String>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// `[timeouts]` and `[routes.NAME.timeouts]`: the same keys, each optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawTimeouts {
    pub client_header: Option<Spanned<UnitText>>,
    pub upstream_connect: Option<Spanned<UnitText>>,
    pub upstream_handshake: Option<Spanned<UnitText>>,
    pub idle: Option<Spanned<UnitText>>,
    pub ping_interval: Option<Spanned<UnitText>>,
    pub pong_timeout: Option<Spanned<UnitText>>,
    pub upstream_ping_interval: Option<Spanned<UnitText>>,
    pub shutdown_grace: Option<Spanned<UnitText>>,
    pub drain_spread: Option<Spanned<UnitText>>,
    pub close: Option<Spanned<UnitText>>,
}

/// `[limits]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawLimits {
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub handshake_rate_per_ip: Option<Spanned<UnitText>>,
    pub max_frame_size: Option<Spanned<UnitText>>,
    pub max_frame_rate: Option<Spanned<UnitText>>,
    pub max_request_head: Option<Spanned<UnitText>>,
    pub max_request_headers: Option<Spanned<i64>>,
    pub max_pending_heads: Option<Spanned<i64>>,
}

/// `[upstreams.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawUpstream {
    pub servers: Spanned<Vec<Spanned<String>>>,
    pub balance: Option<Spanned<String>>,
    pub tls: Option<RawUpstreamTls>,
    pub health: Option<RawHealth>,
    pub host_header: Option<Spanned<String>>,
    pub max_pending_handshakes: Option<Spanned<i64>>,
}

/// `tls = { enabled, ca, server_name }` of an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawUpstreamTls {
    pub enabled: Option<bool>,
    pub ca: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
}

/// `health = { path, interval, timeout, unhealthy_after, healthy_after }` of an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawHealth {
    pub path: Option<Spanned<String>>,
    pub interval: Option<Spanned<UnitText>>,
    pub timeout: Option<Spanned<UnitText>>,
    pub unhealthy_after: Option<Spanned<i64>>,
    pub healthy_after: Option<Spanned<i64>>,
}

/// `[routes.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawRoute {
    pub host: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub upstream: Option<Spanned<String>>,
    pub builtin: Option<Spanned<String>>,
    pub allowed_origins: Option<Spanned<Vec<Spanned<String>>>>,
    pub strip_prefix: Option<bool>,
    pub timeouts: Option<RawTimeouts>,
    pub auth: Option<Spanned<RawAuth>>,
}

/// `[routes.NAME.auth]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawAuth {
    pub jwt: Option<Spanned<RawJwt>>,
    pub forward: Option<Spanned<RawForward>>,
    pub claims_to_headers:
        Option<Spanned<std::collections::BTreeMap<Spanned<String>, Spanned<String>>>>,
    pub close_on_expiry: Option<Spanned<bool>>,
}

/// `[routes.NAME.auth] jwt = { ... }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawJwt {
    pub jwks: Option<Spanned<String>>,
    pub jwks_refresh: Option<Spanned<UnitText>>,
    pub jwks_ca: Option<Spanned<String>>,
    pub secret_file: Option<Spanned<String>>,
    pub issuer: Option<Spanned<OneOrMany>>,
    pub audience: Option<Spanned<OneOrMany>>,
    pub algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    pub leeway: Option<Spanned<UnitText>>,
    pub from: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[routes.NAME.auth] forward = { ... }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct RawForward {
    pub url: Spanned<String>,
    pub timeout: Option<Spanned<UnitText>>,
    pub copy_headers: Option<Spanned<Vec<Spanned<String>>>>,
    pub ca: Option<Spanned<String>>,
}

/// A string, or a list of strings (`issuer`, `audience`).
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A duration, size or rate as written. Numbers are accepted here (and refused later with
/// a message that asks for a unit) so that `idle = 30` gets the same helpful error as
/// `idle = "30"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitText {
    pub text: String,
    /// True when the value was a TOML number rather than a string.
    pub bare_number: bool,
}

impl UnitText {
    /// The value as it appeared: quoted when it was a string.
    pub fn shown(&self) -> String {
        if self.bare_number {
            self.text.clone()
        } else {
            format!("{:?}", self.text)
        }
    }
}

impl<'de> Deserialize<'de> for UnitText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UnitTextVisitor)
    }
}

struct UnitTextVisitor;

impl Visitor<'_> for UnitTextVisitor {
    type Value = UnitText;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(r#"a string with a unit, e.g. "30s", "1MiB" or "50/s""#)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<UnitText, E> {
        Ok(UnitText {
            text: v.to_string(),
            bare_number: false,
        })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<UnitText, E> {
        Ok(UnitText {
            text: v.to_string(),
            bare_number: true,
        })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<UnitText, E> {
        Ok(UnitText {
            text: v.to_string(),
            bare_number: true,
        })
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<UnitText, E> {
        Ok(UnitText {
            text: v.to_string(),
            bare_number: true,
        })
    }
}

/// Parses `text` into the raw view. Problems are appended to `problems`; `None` means the
/// TOML itself is broken (syntax errors only are reported then, since anything further
/// would be guesswork).
pub fn parse(text: &str, problems: &mut Vec<Problem>) -> Option<RawConfig> {
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        problems.extend(syntax_errors.iter().map(|e| Problem {
            span: e.span(),
            message: format!("TOML syntax error: {}", e.message()),
        }));
        return None;
    }
    let root = root.into_inner();
    let mut raw = RawConfig::default();
    for (key, value) in root.clone() {
        let key_span = key.span();
        match key.get_ref().as_ref() {
            "log" => raw.log = section(value, &root, "log", problems),
            "runtime" => raw.runtime = section(value, &root, "runtime", problems),
            "admin" => raw.admin = section(value, &root, "admin", problems),
            "timeouts" => raw.timeouts = section(value, &root, "timeouts", problems),
            "limits" => raw.limits = section(value, &root, "limits", problems),
            "listeners" => {
                raw.listeners = named_tables(value, &root, "listeners", "listener", problems)
            }
            "upstreams" => {
                raw.upstreams = named_tables(value, &root, "upstreams", "upstream", problems)
            }
            "routes" => raw.routes = named_tables(value, &root, "routes", "route", problems),
            other => problems.push(Problem::at(
                key_span,
                format!(
                    "unknown key `{other}` at the top level; expected one of: {}",
                    TOP_LEVEL_KEYS.join(", ")
                ),
            )),
        }
    }
    Some(raw)
}

/// Deserializes one table such as `[timeouts]`, reporting a failure as a problem.
fn section<T: de::DeserializeOwned>(
    value: Spanned<DeValue<'_>>,
    root: &DeTable<'_>,
    context: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.push(explain(&e, root, context));
            None
        }
    }
}

/// Deserializes a table of named entries, each on its own.
fn named_tables<T: de::DeserializeOwned>(
    value: Spanned<DeValue<'_>>,
    root: &DeTable<'_>,
    context: &str,
    what: &str,
    problems: &mut Vec<Problem>,
) -> Option<NamedTables<T>> {
    let span = value.span();
    let found = value.get_ref().type_str();
    let DeValue::Table(table) = value.into_inner() else {
        problems.push(Problem::at(
            span,
            format!("`{context}` must be a table of named {what}s, e.g. [{context}.NAME]; found {found}"),
        ));
        return None;
    };
    let mut entries = Vec::new();
    for (name, entry) in table {
        let name = Spanned::new(name.span(), name.get_ref().to_string());
        let entry_span = entry.span();
        let entry_context = format!("{context}.{}", key_segment(name.get_ref()));
        let value = if entry.get_ref().is_table() {
            section(entry, root, &entry_context, problems)
        } else {
            problems.push(Problem::at(
                entry_span.clone(),
                format!(
                    "{what} `{}` must be a table, e.g. [{entry_context}] with its keys below; found {}",
                    name.get_ref(),
                    entry.get_ref().type_str()
                ),
            ));
            None
        };
        entries.push(Named {
            name,
            span: entry_span,
            value,
        });
    }
    Some(NamedTables { span, entries })
}

/// Turns a deserialization error into a problem that names the key path and what is valid.
fn explain(error: &toml::de::Error, root: &DeTable<'_>, context: &str) -> Problem {
    let message = error.message();
    let span = error.span();
    let location = span.as_ref().and_then(|s| locate(root, s));
    let path = location
        .as_ref()
        .map(|l| l.path.clone())
        .unwrap_or_else(|| context.to_string());
    let reworded = if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        // When the span is the key, `path` is the key's own path; its table is the parent.
        let table = match &location {
            Some(l) if l.is_key => l.parent.clone(),
            _ => path.clone(),
        };
        let expected = backticked_names(expected);
        let valid = match expected.len() {
            0 => "this table takes no keys".to_string(),
            1 => format!("expected: {}", expected[0]),
            _ => format!("expected one of: {}", expected.join(", ")),
        };
        format!("unknown key `{field}` in {}; {valid}", table_name(&table))
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or(rest);
        let hint = missing_key_hint(field)
            .map(|h| format!(", e.g. {h}"))
            .unwrap_or_default();
        format!("missing key `{field}` in {}{hint}", table_name(&path))
    } else if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, "?"));
        format!(
            "wrong type for `{path}`: expected {}, found {found}",
            plain_type_name(expected)
        )
    } else {
        format!("`{path}`: {message}")
    };
    Problem {
        span,
        message: reworded,
    }
}

/// `listeners.public` -> "[listeners.public]"; paths through arrays are shown bare.
fn table_name(path: &str) -> String {
    if path.contains('[') {
        format!("`{path}`")
    } else {
        format!("[{path}]")
    }
}

/// Rust-flavoured type names in serde messages, said the TOML way.
fn plain_type_name(expected: &str) -> String {
    match expected {
        "i64" | "u64" | "u32" | "usize" => "an integer".to_string(),
        "a sequence" => "an array".to_string(),
        "a map" => "a table".to_string(),
        other => other.to_string(),
    }
}

/// An example for a key whose absence is an error.
fn missing_key_hint(field: &str) -> Option<&'static str> {
    Some(match field {
        "bind" => r#"bind = "0.0.0.0:8080""#,
        "cert" => r#"cert = "certs/server.crt""#,
        "key" => r#"key = "certs/server.key""#,
        "server_name" => r#"server_name = "chat.example.com""#,
        "servers" => r#"servers = ["127.0.0.1:9001"]"#,
        _ => return None,
    })
}

/// The names quoted in serde's "expected one of `a`, `b`" tail.
fn backticked_names(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// What `locate` found at a span.
#[derive(Debug)]
struct Location {
    /// Dotted path of the key or value, e.g. `listeners.public.tls.sni[0].cert`.
    path: String,
    /// Path of the table holding it.
    parent: String,
    /// True when the span is the key itself, false when it is the value.
    is_key: bool,
}

/// Finds the key or value at exactly `span` and returns its path.
fn locate(table: &DeTable<'_>, span: &Range<usize>) -> Option<Location> {
    locate_in_table(table, span, "")
}

fn locate_in_table(table: &DeTable<'_>, span: &Range<usize>, prefix: &str) -> Option<Location> {
    for (key, value) in table {
        let path = join(prefix, &key_segment(key.get_ref()));
        if key.span() == *span {
            return Some(Location {
                path,
                parent: prefix.to_string(),
                is_key: true,
            });
        }
        if let Some(found) = locate_in_value(value, span, &path, prefix) {
            return Some(found);
        }
    }
    None
}

fn locate_in_value(
    value: &Spanned<DeValue<'_>>,
    span: &Range<usize>,
    path: &str,
    parent: &str,
) -> Option<Location> {
    if value.span() == *span {
        return Some(Location {
            path: path.to_string(),
            parent: parent.to_string(),
            is_key: false,
        });
    }
    match value.get_ref() {
        DeValue::Table(t) => locate_in_table(t, span, path),
        DeValue::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| locate_in_value(item, span, &format!("{path}[{i}]"), path)),
        _ => None,
    }
}

fn join(prefix: &str, segment: &str) -> String {
    if prefix.is_empty() {
        segment.to_string()
    } else {
        format!("{prefix}.{segment}")
    }
}

/// A key as it would be written in a dotted path: bare when it can be, quoted otherwise.
pub fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(text: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let _ = parse(text, &mut problems);
        problems
    }

    fn at(text: &str, span: &Option<Range<usize>>) -> String {
        span.clone()
            .map(|s| text[s].to_string())
            .unwrap_or_default()
    }

    #[test]
    fn unknown_key_points_at_the_key_and_lists_valid_keys() {
        let text = "[listeners.public]\nbinnd = \"x\"\n";
        let p = problems_of(text);
        assert_eq!(p.len(), 1);
        assert_eq!(at(text, &p[0].span), "binnd");
        assert_eq!(
            p[0].message,
            "unknown key `binnd` in [listeners.public]; expected one of: bind, http2, http2_max_streams, tls"
        );
    }

    #[test]
    fn unknown_key_in_nested_tables() {
        let text = "[listeners.public]\nbind = \"127.0.0.1:1\"\ntls = { cert = \"a\", key = \"b\", sni = [ { server_name = \"a\", cert = \"c\", key = \"k\", kye = 1 } ] }\n";
        let p = problems_of(text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(at(text, &p[0].span), "kye");
        assert_eq!(
            p[0].message,
            "unknown key `kye` in `listeners.public.tls.sni[0]`; expected one of: server_name, cert, key"
        );

        let text = "[routes.a]\npath = \"/\"\n[routes.a.timeouts]\nidel = \"5s\"\n";
        let p = problems_of(text);
        assert_eq!(at(text, &p[0].span), "idel");
        assert!(p[0].message.starts_with(
            "unknown key `idel` in [routes.a.timeouts]; expected one of: client_header,"
        ));
    }

    #[test]
    fn top_level_unknown_key() {
        let text = "[listener.public]\nbind = \"x\"\n";
        let p = problems_of(text);
        assert_eq!(at(text, &p[0].span), "listener");
        assert!(p[0]
            .message
            .contains("unknown key `listener` at the top level; expected one of: log, runtime, admin, listeners,"));
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = "[listeners.public]\nbind = 8080\n";
        let p = problems_of(text);
        assert_eq!(at(text, &p[0].span), "8080");
        assert_eq!(
            p[0].message,
            "wrong type for `listeners.public.bind`: expected a string, found integer `8080`"
        );
        let text = "[runtime]\nworker_threads = \"4\"\n";
        let p = problems_of(text);
        assert_eq!(
            p[0].message,
            "wrong type for `runtime.worker_threads`: expected an integer, found string \"4\""
        );
        let text = "[runtime]\nsplice = \"yes\"\n";
        let p = problems_of(text);
        assert_eq!(at(text, &p[0].span), "\"yes\"");
        assert_eq!(
            p[0].message,
            "wrong type for `runtime.splice`: expected a boolean, found string \"yes\""
        );
    }

    #[test]
    fn missing_key_points_at_the_table() {
        let text = "[upstreams.app]\nbalance = \"round_robin\"\n";
        let p = problems_of(text);
        assert_eq!(at(text, &p[0].span), "[upstreams.app]");
        assert_eq!(
            p[0].message,
            r#"missing key `servers` in [upstreams.app], e.g. servers = ["127.0.0.1:9001"]"#
        );
    }

    #[test]
    fn every_entry_is_checked_on_its_own() {
        let text = "[listeners.a]\nbnd = 1\n[listeners.b]\nbind = \"x\"\n[routes.r]\npth = \"/\"\n[limits]\nmax = 1\n";
        let mut problems = Vec::new();
        let raw = parse(text, &mut problems).expect("syntax is fine");
        assert_eq!(problems.len(), 3, "{problems:?}");
        let listeners = raw.listeners.expect("listeners present");
        assert_eq!(listeners.entries.len(), 2);
        assert!(listeners.entries[0].value.is_none());
        assert!(listeners.entries[1].value.is_some());
    }

    #[test]
    fn named_entries_must_be_tables() {
        let text = "[listeners]\npublic = \"0.0.0.0:80\"\n";
        let p = problems_of(text);
        assert_eq!(at(text, &p[0].span), "\"0.0.0.0:80\"");
        assert!(p[0].message.contains("listener `public` must be a table"));
        let text = "listeners = 5\n";
        let p = problems_of(text);
        assert!(p[0]
            .message
            .contains("`listeners` must be a table of named listeners"));
    }

    #[test]
    fn syntax_errors_are_all_reported() {
        let p = problems_of("[a]\nx = \nb = 'x\n");
        assert!(p.len() >= 2, "{p:?}");
        assert!(p
            .iter()
            .all(|p| p.message.starts_with("TOML syntax error: ")));
    }

    #[test]
    fn numbers_are_accepted_as_unit_text() {
        let mut problems = Vec::new();
        let raw = parse(
            "[timeouts]\nidle = 30\nping_interval = \"5s\"\n",
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        let t = raw.and_then(|r| r.timeouts).expect("timeouts");
        let idle = t.idle.expect("idle");
        assert!(idle.get_ref().bare_number);
        assert_eq!(idle.get_ref().shown(), "30");
        assert_eq!(t.ping_interval.expect("ping").get_ref().shown(), "\"5s\"");
    }
}
