//! Turns the raw results into the markdown table, the performance targets,
//! results.json and the SVG chart of ratios to nginx.

use std::fmt::Write as _;
use std::fs;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::all::Kind;

/// Column order of the table and the chart.
const TARGETS: [&str; 4] = ["direct", "wsgate", "nginx", "haproxy"];

fn display_name(target: &str) -> &str {
    match target {
        "haproxy" => "HAProxy",
        other => other,
    }
}

/// Everything one `all` run produced.
pub struct RunResults {
    pub command: String,
    pub machine: Value,
    pub versions: Vec<(String, String)>,
    pub skipped: Vec<(String, String)>,
    pub settings: Value,
    pub workloads: Vec<WorkloadResult>,
}

pub struct WorkloadResult {
    pub id: &'static str,
    pub title: &'static str,
    pub kind: Kind,
    /// (target, load client JSON or `{"error": ...}`), in run order.
    pub results: Vec<(String, Value)>,
}

impl WorkloadResult {
    fn get(&self, target: &str) -> Option<&Value> {
        self.results
            .iter()
            .find(|(t, _)| t == target)
            .map(|(_, v)| v)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    PerSecond,
    Micros,
    CpuMicros,
    KiB,
    /// Seconds (shown in ms below one second).
    Seconds,
    /// A value in KiB, shown in MiB.
    MiB,
    Count,
}

/// One row of the table: a number read from each target's JSON.
struct Metric {
    name: &'static str,
    path: &'static [&'static str],
    unit: Unit,
    better: Better,
    /// Whether `direct` has this figure (proxy CPU and RSS it does not).
    direct: bool,
}

const fn m(
    name: &'static str,
    path: &'static [&'static str],
    unit: Unit,
    better: Better,
    direct: bool,
) -> Metric {
    Metric {
        name,
        path,
        unit,
        better,
        direct,
    }
}

const ECHO_METRICS: &[Metric] = &[
    m(
        "msgs/s",
        &["ops_per_s"],
        Unit::PerSecond,
        Better::Higher,
        true,
    ),
    m(
        "p50 round trip",
        &["latency_us", "p50"],
        Unit::Micros,
        Better::Lower,
        true,
    ),
    m(
        "p99 round trip",
        &["latency_us", "p99"],
        Unit::Micros,
        Better::Lower,
        true,
    ),
    m(
        "proxy CPU per msg",
        &["watched", "cpu_us_per_op"],
        Unit::CpuMicros,
        Better::Lower,
        false,
    ),
    m(
        "… of which user space",
        &["watched", "user_us_per_op"],
        Unit::CpuMicros,
        Better::Lower,
        false,
    ),
];

const HTTP_METRICS: &[Metric] = &[
    m(
        "requests/s",
        &["ops_per_s"],
        Unit::PerSecond,
        Better::Higher,
        true,
    ),
    m(
        "p99 request",
        &["latency_us", "p99"],
        Unit::Micros,
        Better::Lower,
        true,
    ),
    m(
        "proxy CPU per request",
        &["watched", "cpu_us_per_op"],
        Unit::CpuMicros,
        Better::Lower,
        false,
    ),
    m(
        "… of which user space",
        &["watched", "user_us_per_op"],
        Unit::CpuMicros,
        Better::Lower,
        false,
    ),
];

const PACED_METRICS: &[Metric] = &[
    m(
        "p50 round trip",
        &["latency_us", "p50"],
        Unit::Micros,
        Better::Lower,
        true,
    ),
    m(
        "p99 round trip",
        &["latency_us", "p99"],
        Unit::Micros,
        Better::Lower,
        true,
    ),
    m(
        "max round trip",
        &["latency_us", "max"],
        Unit::Micros,
        Better::Lower,
        true,
    ),
    m(
        "proxy CPU per msg",
        &["watched", "cpu_us_per_op"],
        Unit::CpuMicros,
        Better::Lower,
        false,
    ),
];

const HANDSHAKE_METRICS: &[Metric] = &[
    m(
        "handshakes/s",
        &["ops_per_s"],
        Unit::PerSecond,
        Better::Higher,
        true,
    ),
    m(
        "proxy CPU per handshake",
        &["watched", "cpu_us_per_op"],
        Unit::CpuMicros,
        Better::Lower,
        false,
    ),
    m(
        "… of which user space",
        &["watched", "user_us_per_op"],
        Unit::CpuMicros,
        Better::Lower,
        false,
    ),
];

const IDLE_METRICS: &[Metric] = &[m(
    "RSS per connection",
    &["watched", "rss_growth_kib_per_conn"],
    Unit::KiB,
    Better::Lower,
    false,
)];

const STORM_METRICS: &[Metric] = &[
    m(
        "clients back",
        &["reconnected"],
        Unit::Count,
        Better::Higher,
        false,
    ),
    m(
        "all back after",
        &["all_reconnected_s"],
        Unit::Seconds,
        Better::Lower,
        false,
    ),
    m(
        "median client back after",
        &["reconnect_s", "p50"],
        Unit::Seconds,
        Better::Lower,
        false,
    ),
    m(
        "failed attempts",
        &["failed_attempts"],
        Unit::Count,
        Better::Lower,
        false,
    ),
    m(
        "proxy CPU over the storm",
        &["watched", "cpu_s"],
        Unit::Seconds,
        Better::Lower,
        false,
    ),
    m(
        "peak proxy RSS",
        &["watched", "rss_kib_peak"],
        Unit::MiB,
        Better::Lower,
        false,
    ),
    m(
        "peak upstream handshakes",
        &["upstream", "handshakes_peak"],
        Unit::Count,
        Better::Lower,
        false,
    ),
];

/// The storm's rows drawn in the chart (the counts are not "times better" figures).
const STORM_CHARTED: &[&str] = &[
    "all back after",
    "proxy CPU over the storm",
    "peak proxy RSS",
];

fn metrics(kind: Kind) -> &'static [Metric] {
    match kind {
        Kind::Echo { .. } => ECHO_METRICS,
        Kind::Http { .. } => HTTP_METRICS,
        Kind::Paced => PACED_METRICS,
        Kind::Handshake { .. } => HANDSHAKE_METRICS,
        Kind::Idle { .. } => IDLE_METRICS,
        Kind::Storm { .. } => STORM_METRICS,
    }
}

fn lookup(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

/// The figure that ranks the rounds of a workload: proxy CPU per operation (msgs/s for
/// `direct`, which has no proxy), p99 for the paced workload.
fn round_key(kind: Kind, v: &Value) -> Option<(&'static str, f64)> {
    match kind {
        Kind::Paced => lookup(v, &["latency_us", "p99"]).map(|x| ("p99 round trip (µs)", x)),
        Kind::Idle { .. } | Kind::Storm { .. } => None,
        _ => lookup(v, &["watched", "cpu_us_per_op"])
            .map(|x| ("proxy CPU per op (µs)", x))
            .or_else(|| lookup(v, &["ops_per_s"]).map(|x| ("ops/s", x))),
    }
}

/// One target's result from several rounds of a workload: the median round by
/// [`round_key`], with every round's key figure attached as `rounds` (in run order).
/// A round that failed is only chosen when every round failed.
pub fn median_round(kind: Kind, runs: Vec<Value>) -> Value {
    if runs.len() < 2 {
        return runs
            .into_iter()
            .next()
            .unwrap_or_else(|| json!({"error": "not run"}));
    }
    let keys: Vec<Option<(&'static str, f64)>> = runs
        .iter()
        .map(|v| round_key(kind, v).filter(|_| v.get("error").is_none()))
        .collect();
    let mut ok: Vec<(usize, f64)> = keys
        .iter()
        .enumerate()
        .filter_map(|(i, k)| k.map(|(_, x)| (i, x)))
        .collect();
    ok.sort_by(|a, b| a.1.total_cmp(&b.1));
    let chosen = ok.get(ok.len() / 2).map_or(0, |(i, _)| *i);
    let label = keys.iter().flatten().map(|(l, _)| *l).next().unwrap_or("");
    let figures: Vec<Value> = keys
        .iter()
        .map(|k| k.map_or(Value::Null, |(_, x)| x.into()))
        .collect();
    let mut value = runs.into_iter().nth(chosen).unwrap_or(Value::Null);
    if let Some(obj) = value.as_object_mut() {
        obj.insert(
            "rounds".into(),
            json!({"key": label, "values": figures, "median_round": chosen + 1}),
        );
    }
    value
}

impl WorkloadResult {
    fn value(&self, target: &str, metric: &Metric) -> Option<f64> {
        if target == "direct" && !metric.direct {
            return None;
        }
        self.get(target).and_then(|v| lookup(v, metric.path))
    }
}

fn fmt_value(unit: Unit, v: f64) -> String {
    match unit {
        Unit::PerSecond if v >= 1000.0 => format!("{:.1}k", v / 1000.0),
        Unit::PerSecond => format!("{v:.0}"),
        Unit::Micros if v >= 1000.0 => format!("{:.2} ms", v / 1000.0),
        Unit::Micros => format!("{v:.0} µs"),
        Unit::CpuMicros => format!("{v:.1} µs"),
        Unit::KiB => format!("{v:.1} KiB"),
        Unit::Seconds if v < 1.0 => format!("{:.0} ms", v * 1000.0),
        Unit::Seconds => format!("{v:.2} s"),
        Unit::MiB => format!("{:.1} MiB", v / 1024.0),
        Unit::Count => group_thousands(v.round() as u64),
    }
}

/// 12345 as "12,345".
fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_ratio(r: f64) -> String {
    format!("{r:.2}×")
}

/// The table cell of one target: value and ratios to direct (d) and nginx (n).
fn cell(w: &WorkloadResult, target: &str, metric: &Metric) -> String {
    let Some(raw) = w.get(target) else {
        return if target == "direct" && matches!(w.kind, Kind::Idle { .. } | Kind::Storm { .. }) {
            "—".into()
        } else {
            "skipped".into()
        };
    };
    if let Some(e) = raw.get("error").and_then(Value::as_str) {
        // A target the workload does not drive (see the notes under the table).
        return if e.starts_with("n/a") { "n/a" } else { "error" }.into();
    }
    let Some(v) = w.value(target, metric) else {
        return "—".into();
    };
    let mut out = fmt_value(metric.unit, v);
    let mut ratios = Vec::new();
    if target != "direct" {
        if let Some(d) = w.value("direct", metric).filter(|d| *d > 0.0) {
            ratios.push(format!("{} d", fmt_ratio(v / d)));
        }
    }
    if target != "nginx" && target != "direct" {
        if let Some(n) = w.value("nginx", metric).filter(|n| *n > 0.0) {
            ratios.push(format!("{} n", fmt_ratio(v / n)));
        }
    }
    if !ratios.is_empty() {
        let _ = write!(out, " ({})", ratios.join(", "));
    }
    if raw.get("errors").and_then(Value::as_u64).unwrap_or(0) > 0
        || raw.get("lost").and_then(Value::as_u64).unwrap_or(0) > 0
    {
        out.push_str(" ⚠");
    }
    out
}

/// One performance target, evaluated on this run.
struct Check {
    what: String,
    /// Workload id and metric name of the row this target is about.
    workload: &'static str,
    metric: &'static str,
    value: Option<f64>,
    threshold: Option<f64>,
    unit: Unit,
    better: Better,
}

impl Check {
    fn met(&self) -> Option<bool> {
        let (v, t) = (self.value?, self.threshold?);
        Some(match self.better {
            Better::Higher => v >= t,
            Better::Lower => v <= t,
        })
    }

    fn verdict(&self) -> String {
        let (Some(v), Some(t)) = (self.value, self.threshold) else {
            return "n/a (missing result)".into();
        };
        match (self.met(), self.better) {
            (Some(true), _) => "met".into(),
            (_, Better::Lower) => format!("**missed**: {:.0}% over", (v / t - 1.0) * 100.0),
            (_, Better::Higher) => format!("**missed**: {:.0}% short", (1.0 - v / t) * 100.0),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "target": self.what,
            "wsgate": self.value,
            "threshold": self.threshold,
            "met": self.met(),
        })
    }
}

fn checks(run: &RunResults) -> Vec<Check> {
    let mut out = Vec::new();
    let find = |id: &str| run.workloads.iter().find(|w| w.id == id);
    let metric = |kind: Kind, name: &str| -> &'static Metric {
        metrics(kind)
            .iter()
            .find(|m| m.name == name)
            .expect("known metric")
    };
    let mut add = |w: Option<&WorkloadResult>,
                   what: String,
                   name: &str,
                   reference: &str,
                   factor: f64,
                   absolute: Option<f64>| {
        let Some(w) = w else { return };
        let mt = metric(w.kind, name);
        let threshold = match absolute {
            Some(a) => Some(a),
            None => w.value(reference, mt).map(|r| r * factor),
        };
        out.push(Check {
            what,
            workload: w.id,
            metric: mt.name,
            value: w.value("wsgate", mt),
            threshold,
            unit: mt.unit,
            better: mt.better,
        });
    };
    // The performance targets, round two: against nginx and HAProxy in the same run.
    for (id, label) in [("echo32-1", "run 1"), ("echo32-2", "run 2")] {
        add(
            find(id),
            format!("32 B echo ({label}): user-space CPU per msg ≤ 1.2× nginx"),
            "… of which user space",
            "nginx",
            1.2,
            None,
        );
        add(
            find(id),
            format!("32 B echo ({label}): CPU per msg ≤ nginx"),
            "proxy CPU per msg",
            "nginx",
            1.0,
            None,
        );
    }
    add(
        find("echo16k"),
        "16 KiB echo: msgs/s ≥ HAProxy".into(),
        "msgs/s",
        "haproxy",
        1.0,
        None,
    );
    // "The better of nginx and HAProxy": the higher of the two, as an absolute bar.
    let best_peer = |id: &str, name: &str| {
        find(id).and_then(|w| {
            let mt = metric(w.kind, name);
            let (n, h) = (w.value("nginx", mt), w.value("haproxy", mt));
            n.into_iter().chain(h).reduce(f64::max)
        })
    };
    add(
        find("echo256k"),
        "256 KiB echo: msgs/s ≥ the better of nginx and HAProxy".into(),
        "msgs/s",
        "",
        1.0,
        best_peer("echo256k", "msgs/s"),
    );
    add(
        find("echo256k"),
        "256 KiB echo: CPU per msg ≤ 0.7× nginx".into(),
        "proxy CPU per msg",
        "nginx",
        0.7,
        None,
    );
    // wsgate against itself in the same run: its CPU per text message against binary ones of
    // the same size (the UTF-8 check), and per message over HTTP/2 against HTTP/1.1.
    for (workload, reference, factor, what) in [
        (
            "text32",
            "echo32-1",
            1.05,
            "32 B text echo: CPU per msg ≤ 1.05× binary",
        ),
        (
            "text16k",
            "echo16k",
            1.05,
            "16 KiB text echo: CPU per msg ≤ 1.05× binary",
        ),
        (
            "text16k-mixed",
            "echo16k",
            1.05,
            "16 KiB mixed text echo: CPU per msg ≤ 1.05× binary",
        ),
        (
            "h2echo32-streams",
            "echo32-1",
            1.3,
            "32 B, 64 streams on 8 conns over HTTP/2: CPU per msg ≤ 1.3× HTTP/1.1",
        ),
        (
            "h2echo32-conns",
            "echo32-1",
            1.3,
            "32 B, 64 conns over HTTP/2: CPU per msg ≤ 1.3× HTTP/1.1",
        ),
        (
            "h2echo16k-streams",
            "echo16k",
            1.3,
            "16 KiB, 64 streams on 8 conns over HTTP/2: CPU per msg ≤ 1.3× HTTP/1.1",
        ),
    ] {
        let bar = find(reference).and_then(|r| {
            let mt = metric(r.kind, "proxy CPU per msg");
            r.value("wsgate", mt).map(|v| v * factor)
        });
        if bar.is_some() {
            add(
                find(workload),
                what.into(),
                "proxy CPU per msg",
                "wsgate",
                1.0,
                bar,
            );
        }
    }
    for (id, label) in [("http", "HTTP/1.1"), ("http-h2", "h2")] {
        add(
            find(id),
            format!("plain HTTP GET ({label}): requests/s ≥ nginx"),
            "requests/s",
            "nginx",
            1.0,
            None,
        );
        add(
            find(id),
            format!("plain HTTP GET ({label}): CPU per request ≤ 0.9× nginx"),
            "proxy CPU per request",
            "nginx",
            0.9,
            None,
        );
    }
    add(
        find("paced"),
        "paced 10k msgs/s: p99 ≤ HAProxy".into(),
        "p99 round trip",
        "haproxy",
        1.0,
        None,
    );
    add(
        find("handshake"),
        "handshakes (ws): CPU per handshake ≤ 0.8× nginx".into(),
        "proxy CPU per handshake",
        "nginx",
        0.8,
        None,
    );
    add(
        find("handshake"),
        "handshakes (ws): handshakes/s ≥ nginx".into(),
        "handshakes/s",
        "nginx",
        1.0,
        None,
    );
    add(
        find("handshake-tls"),
        "handshakes (wss): handshakes/s ≥ 1.1× nginx".into(),
        "handshakes/s",
        "nginx",
        1.1,
        None,
    );
    add(
        find("idle"),
        "idle (ws): RSS per connection ≤ 4 KiB".into(),
        "RSS per connection",
        "",
        1.0,
        Some(4.0),
    );
    // Authentication at the edge: an idle WebSocket through a JWT route (its token's expiry
    // kept in the tunnel) against one through a plain route, same run.
    if let Some(bar) = find("idle").and_then(|r| {
        let mt = metric(r.kind, "RSS per connection");
        r.value("wsgate", mt).map(|v| v + 0.3)
    }) {
        add(
            find("idle-jwt"),
            "idle with JWT auth (ws): RSS per connection ≤ idle (ws) + 0.3 KiB".into(),
            "RSS per connection",
            "",
            1.0,
            Some(bar),
        );
    }
    add(
        find("idle-tls"),
        "idle (wss): RSS per connection ≤ 12 KiB".into(),
        "RSS per connection",
        "",
        1.0,
        Some(12.0),
    );
    // The reconnect storm: every client back first, none refused, and a restarted upstream
    // never with more of wsgate's handshakes in progress than `[upstreams.X]
    // max_pending_handshakes` (default 256, the bench config's).
    for (id, label) in [("storm", "ws"), ("storm-tls", "wss")] {
        let fastest_peer = find(id).and_then(|w| {
            let mt = metric(w.kind, "all back after");
            let (n, h) = (w.value("nginx", mt), w.value("haproxy", mt));
            n.into_iter().chain(h).reduce(f64::min)
        });
        add(
            find(id),
            format!("reconnect storm ({label}): all back first"),
            "all back after",
            "",
            1.0,
            fastest_peer,
        );
        add(
            find(id),
            format!("reconnect storm ({label}): no failed attempt"),
            "failed attempts",
            "",
            1.0,
            Some(0.0),
        );
        add(
            find(id),
            format!("reconnect storm ({label}): upstream handshakes at once ≤ 256"),
            "peak upstream handshakes",
            "",
            1.0,
            Some(256.0),
        );
    }
    out
}

/// What a storm's table rows leave out: how the held connections ended, every failed
/// attempt by kind, when the proxy closed them, what the upstream saw.
fn storm_note(title: &str, target: &str, v: &Value) -> Option<String> {
    if v.get("mode").and_then(Value::as_str) != Some("storm") {
        return None;
    }
    let counts = |key: &str| {
        v.get(key)
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(k, n)| format!("{k} ×{}", group_thousands(n.as_u64().unwrap_or(0))))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "none".into())
    };
    let num = |path: &[&str]| lookup(v, path);
    let ms = |x: Option<f64>| x.map_or("—".into(), |x| format!("{:.0} ms", x * 1000.0));
    let queue = |path: &[&str]| {
        let peak = num(&[path[0], path[1], "peak_waiting"]);
        let backlog = num(&[path[0], path[1], "backlog"]);
        match (peak, backlog) {
            (Some(p), Some(b)) => format!("{} of {}", p as u64, b as u64),
            _ => "0".into(),
        }
    };
    let up = |k: &str| num(&["upstream", k]).map_or("—".into(), |x| group_thousands(x as u64));
    Some(format!(
        "- {title} / {}: {} connections held; ended by the proxy {}-{} after the restart ({}); \
         upstream listening again after {:.0} ms; {} attempts, failed: {}; \
         the restarted upstream saw at most {} handshakes and {} connections at once; \
         proxy RSS {:.1} MiB before the restart; the machine's TCP counters over the storm: \
         {} listen queue overflows, {} SYN retransmits; most connections seen waiting to be \
         accepted: proxy {}, upstream {}.",
        display_name(target),
        up_or(num(&["opened"])),
        ms(num(&["ended_s", "min"])),
        ms(num(&["ended_s", "max"])),
        counts("ended"),
        num(&["restart", "listening_again_ms"]).unwrap_or(f64::NAN),
        up_or(num(&["attempts"])),
        counts("failures"),
        up("handshakes_peak"),
        up("conns_peak"),
        num(&["watched", "rss_kib_before"]).unwrap_or(f64::NAN) / 1024.0,
        up_or(num(&["tcp", "ListenOverflows"])),
        up_or(num(&["tcp", "TCPSynRetrans"])),
        queue(&["listeners", "proxy"]),
        queue(&["listeners", "upstream"]),
    ))
}

fn up_or(x: Option<f64>) -> String {
    x.map_or("—".into(), |x| group_thousands(x as u64))
}

/// The markdown the harness prints: results table, notes, targets.
pub fn markdown(run: &RunResults) -> String {
    let mut s = String::new();
    let m = &run.machine;
    let text = |v: &Value, k: &str| {
        v.get(k)
            .map(|x| x.to_string().replace('"', ""))
            .unwrap_or_default()
    };
    let _ = writeln!(
        s,
        "Run {} on {} × {} ({}, kernel {}); {}; scheduling {}, {} s per throughput workload.\n",
        text(m, "date_utc"),
        text(m, "nproc"),
        text(m, "cpu_model"),
        text(m, "os"),
        text(m, "kernel"),
        run.versions
            .iter()
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
            .join("; "),
        text(&run.settings, "sched"),
        text(&run.settings, "duration_s"),
    );
    let present: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|t| run.workloads.iter().any(|w| w.get(t).is_some()))
        .collect();
    let _ = write!(s, "| workload | metric |");
    for t in &present {
        let _ = write!(s, " {} |", display_name(t));
    }
    let _ = write!(s, "\n| --- | --- |");
    for _ in &present {
        s.push_str(" --- |");
    }
    s.push('\n');
    for w in &run.workloads {
        for (i, metric) in metrics(w.kind).iter().enumerate() {
            let title = if i == 0 { w.title } else { "" };
            let _ = write!(s, "| {title} | {} |", metric.name);
            for t in &present {
                let _ = write!(s, " {} |", cell(w, t, metric));
            }
            s.push('\n');
        }
    }
    s.push_str(
        "\n(×d: ratio to direct, ×n: ratio to nginx, same run. msgs/s counts round trips. \
         CPU is the proxy's utime+stime over the measured window, all threads and processes. \
         ⚠: errors or lost messages, see below.)\n",
    );
    let spread = rounds_table(run);
    if !spread.is_empty() {
        s.push('\n');
        s.push_str(&spread);
    }
    let mut notes = Vec::new();
    for w in &run.workloads {
        for (t, v) in &w.results {
            if let Some(e) = v.get("error").and_then(Value::as_str) {
                notes.push(format!("- {} / {}: {e}", w.title, display_name(t)));
                continue;
            }
            notes.extend(storm_note(w.title, t, v));
            let errors = v.get("errors").and_then(Value::as_u64).unwrap_or(0);
            let lost = v.get("lost").and_then(Value::as_u64).unwrap_or(0);
            if errors > 0 || lost > 0 {
                let samples = v
                    .get("error_samples")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_default();
                notes.push(format!(
                    "- {} / {}: {errors} errors, {lost} lost. {samples}",
                    w.title,
                    display_name(t)
                ));
            }
        }
    }
    for (name, why) in &run.skipped {
        notes.push(format!("- {} skipped: {why}", display_name(name)));
    }
    if !notes.is_empty() {
        s.push('\n');
        for n in notes {
            s.push_str(&n);
            s.push('\n');
        }
    }
    let checks = checks(run);
    if !checks.is_empty() {
        s.push_str("\n| target | wsgate | bar | result |\n| --- | --- | --- | --- |\n");
        for c in &checks {
            let v = c
                .value
                .map(|v| fmt_value(c.unit, v))
                .unwrap_or_else(|| "—".into());
            let t = c
                .threshold
                .map(|t| {
                    let op = if c.better == Better::Lower {
                        "≤"
                    } else {
                        "≥"
                    };
                    format!("{op} {}", fmt_value(c.unit, t))
                })
                .unwrap_or_else(|| "—".into());
            let _ = writeln!(s, "| {} | {v} | {t} | {} |", c.what, c.verdict());
        }
    }
    s
}

/// With `--rounds` above 1: every round's key figure, so the spread the medians hide shows.
fn rounds_table(run: &RunResults) -> String {
    let mut s = String::new();
    for w in &run.workloads {
        for (t, v) in &w.results {
            let Some(rounds) = v.get("rounds") else {
                continue;
            };
            if s.is_empty() {
                s.push_str(
                    "Rounds (each target's median round is the one shown above):\n\n\
                     | workload | target | ranked by | rounds, in run order |\n\
                     | --- | --- | --- | --- |\n",
                );
            }
            let key = rounds.get("key").and_then(Value::as_str).unwrap_or("");
            let median = rounds
                .get("median_round")
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize;
            let figures: Vec<String> = rounds
                .get("values")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .enumerate()
                        .map(|(i, x)| {
                            let text = x.as_f64().map_or("error".into(), |x| {
                                if x >= 1000.0 {
                                    format!("{:.1}k", x / 1000.0)
                                } else {
                                    format!("{x:.1}")
                                }
                            });
                            if i + 1 == median {
                                format!("**{text}**")
                            } else {
                                text
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "| {} | {} | {key} | {} |",
                w.title,
                display_name(t),
                figures.join(", ")
            );
        }
    }
    s
}

/// results.json: settings, machine, raw load-client output and the derived table.
pub fn json(run: &RunResults) -> Value {
    let workloads: Vec<Value> = run
        .workloads
        .iter()
        .map(|w| {
            let rows: Vec<Value> = metrics(w.kind)
                .iter()
                .map(|m| {
                    let mut values = serde_json::Map::new();
                    let mut to_nginx = serde_json::Map::new();
                    let mut to_direct = serde_json::Map::new();
                    let n = w.value("nginx", m);
                    let d = w.value("direct", m);
                    for t in TARGETS {
                        if let Some(v) = w.value(t, m) {
                            values.insert(t.into(), v.into());
                            if let Some(n) = n.filter(|n| *n > 0.0) {
                                to_nginx.insert(t.into(), (v / n).into());
                            }
                            if let Some(d) = d.filter(|d| *d > 0.0) {
                                to_direct.insert(t.into(), (v / d).into());
                            }
                        }
                    }
                    json!({
                        "metric": m.name,
                        "better": if m.better == Better::Higher { "higher" } else { "lower" },
                        "values": values,
                        "ratio_to_nginx": to_nginx,
                        "ratio_to_direct": to_direct,
                    })
                })
                .collect();
            let raw: serde_json::Map<String, Value> = w
                .results
                .iter()
                .map(|(t, v)| (t.clone(), v.clone()))
                .collect();
            json!({"id": w.id, "title": w.title, "metrics": rows, "raw": raw})
        })
        .collect();
    json!({
        "command": run.command,
        "machine": run.machine,
        "versions": run.versions.iter().map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect::<serde_json::Map<String, Value>>(),
        "skipped": run.skipped.iter().map(|(n, w)| json!({"target": n, "reason": w})).collect::<Vec<_>>(),
        "settings": run.settings,
        "workloads": workloads,
        "targets": checks(run).iter().map(Check::to_json).collect::<Vec<_>>(),
    })
}

/// A run read back from its results.json (`all --report`): the raw results per target, with
/// each workload's id looked up in this build's list (`lookup`: id to id, title and kind).
pub fn from_json(
    v: &Value,
    lookup: impl Fn(&str) -> Option<(&'static str, &'static str, Kind)>,
) -> Option<RunResults> {
    let text = |key: &str| v.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
    let pairs = |key: &str| -> Vec<(String, String)> {
        v.get(key)
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(k, x)| (k.clone(), x.as_str().unwrap_or("").to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let skipped = v
        .get("skipped")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|s| {
                    let field = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    (field("target"), field("reason"))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut workloads = Vec::new();
    for w in v.get("workloads")?.as_array()? {
        let (id, title, kind) = lookup(w.get("id")?.as_str()?)?;
        let raw = w.get("raw")?.as_object()?;
        let results = TARGETS
            .iter()
            .filter_map(|t| raw.get(*t).map(|r| ((*t).to_owned(), r.clone())))
            .collect();
        workloads.push(WorkloadResult {
            id,
            title,
            kind,
            results,
        });
    }
    Some(RunResults {
        command: text("command"),
        machine: v.get("machine").cloned().unwrap_or(Value::Null),
        versions: pairs("versions"),
        skipped,
        settings: v.get("settings").cloned().unwrap_or(Value::Null),
        workloads,
    })
}

/// The progress line after each load run.
pub fn one_line(kind: Kind, v: &Value) -> String {
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        let short: String = e.chars().take(160).collect();
        return format!("ERROR {short}");
    }
    let mut parts = Vec::new();
    for m in metrics(kind) {
        if let Some(x) = lookup(v, m.path) {
            parts.push(format!("{} {}", m.name, fmt_value(m.unit, x)));
        }
    }
    let errors = v.get("errors").and_then(Value::as_u64).unwrap_or(0);
    if errors > 0 {
        parts.push(format!("{errors} errors"));
    }
    if let Some(lost) = v.get("lost").and_then(Value::as_u64).filter(|l| *l > 0) {
        parts.push(format!("{lost} lost"));
    }
    if let Some(c) = v
        .get("watched")
        .and_then(|w| w.get("cpu_share"))
        .and_then(Value::as_f64)
    {
        parts.push(format!("proxy CPU {:.0}%", c * 100.0));
    }
    parts.join(", ")
}

/// The machine the run was on.
pub fn machine_info() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "os": os,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "date_utc": utc_now(),
    })
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, no date crate needed).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Bars of how many times better than nginx each target is, per metric (1.0 = nginx; for
/// throughput x / nginx, for latency, CPU and memory nginx / x), with the performance target
/// for wsgate as a red tick.
pub fn svg(run: &RunResults) -> String {
    struct Group {
        label: String,
        bars: Vec<(&'static str, f64)>,
        target: Option<f64>,
    }
    let checks = checks(run);
    let mut groups = Vec::new();
    for w in &run.workloads {
        for m in metrics(w.kind) {
            if matches!(w.kind, Kind::Storm { .. }) && !STORM_CHARTED.contains(&m.name) {
                continue;
            }
            let Some(n) = w.value("nginx", m).filter(|n| *n > 0.0) else {
                continue;
            };
            let better = |x: f64| match m.better {
                Better::Higher => x / n,
                Better::Lower => n / x,
            };
            let mut bars = Vec::new();
            for t in ["direct", "wsgate", "haproxy"] {
                if let Some(x) = w.value(t, m).filter(|x| *x > 0.0) {
                    bars.push((t, better(x)));
                }
            }
            let title_prefix = w.title.split(',').next().unwrap_or(w.title);
            let tag = if title_prefix.contains('(') {
                ""
            } else if w.title.contains("run 2") {
                " (2)"
            } else if w.title.contains("run 1") {
                " (1)"
            } else if w.title.contains("wss") {
                " wss"
            } else if w.title.contains("(ws)") {
                " ws"
            } else {
                ""
            };
            // The performance target for this row, if any, as a better-than-nginx factor.
            let target = checks
                .iter()
                .find(|c| c.workload == w.id && c.metric == m.name)
                .and_then(|c| c.threshold)
                .filter(|t| *t > 0.0)
                .map(better);
            groups.push(Group {
                label: format!("{title_prefix}{tag}: {}", m.name),
                bars,
                target,
            });
        }
    }
    let max_factor = groups
        .iter()
        .flat_map(|g| g.bars.iter().map(|b| b.1).chain(g.target))
        .fold(2.0f64, f64::max);
    let x_max = (max_factor * 2.0).ceil().min(12.0) / 2.0;
    let (width, label_w, plot_w) = (980.0, 330.0, 560.0);
    let x0 = label_w + 10.0;
    let bar_h = 9.0;
    let top = 78.0;
    let mut y = top;
    let mut body = String::new();
    for g in &groups {
        let h = g.bars.len().max(1) as f64 * (bar_h + 2.0);
        let _ = writeln!(
            body,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" class="label">{}</text>"#,
            label_w,
            y + h / 2.0 + 4.0,
            xml(&g.label)
        );
        for (i, (t, f)) in g.bars.iter().enumerate() {
            let by = y + i as f64 * (bar_h + 2.0);
            let w = (f.min(x_max) / x_max) * plot_w;
            let _ = writeln!(
                body,
                r#"<rect x="{x0:.1}" y="{by:.1}" width="{w:.1}" height="{bar_h}" class="{t}"><title>{}: {f:.2}× nginx</title></rect>"#,
                display_name(t)
            );
            let _ = writeln!(
                body,
                r#"<text x="{:.1}" y="{:.1}" class="value">{f:.2}</text>"#,
                x0 + w + 3.0,
                by + bar_h - 1.0
            );
        }
        if let Some(tf) = g.target {
            let tx = x0 + (tf.min(x_max) / x_max) * plot_w;
            let _ = writeln!(
                body,
                r#"<line x1="{tx:.1}" x2="{tx:.1}" y1="{:.1}" y2="{:.1}" class="target"><title>target for wsgate: {tf:.2}× nginx</title></line>"#,
                y - 2.0,
                y + h
            );
        }
        y += h + 8.0;
    }
    let height = y + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0}" viewBox="0 0 {width} {height:.0}" font-family="Helvetica, Arial, sans-serif">"#
    );
    s.push_str(
        "<style>.label{font-size:12px;fill:#222}.value{font-size:10px;fill:#444}\
         .axis{font-size:10px;fill:#555}.grid{stroke:#ddd;stroke-width:1}\
         .direct{fill:#9e9e9e}.wsgate{fill:#1f77b4}.haproxy{fill:#ff7f0e}\
         .nginx{stroke:#2ca02c;stroke-width:2;stroke-dasharray:5,3}\
         .target{stroke:#d62728;stroke-width:2}</style>\n",
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="#fff"/><text x="{x0}" y="22" font-size="15" font-weight="bold">wsgate benchmark: times better than nginx (1.0 = nginx)</text>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{x0}" y="40" class="axis">throughput: x / nginx; latency, CPU, memory: nginx / x. One core per proxy. {}</text>"#,
        xml(run
            .machine
            .get("date_utc")
            .and_then(Value::as_str)
            .unwrap_or(""))
    );
    // Legend.
    let mut lx = x0;
    for (class, name) in [
        ("direct", "direct (no proxy)"),
        ("wsgate", "wsgate"),
        ("haproxy", "HAProxy"),
    ] {
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="50" width="12" height="10" class="{class}"/><text x="{}" y="59" class="label">{name}</text>"#,
            lx + 16.0
        );
        lx += 140.0;
    }
    let _ = writeln!(
        s,
        r#"<line x1="{lx}" x2="{}" y1="55" y2="55" class="nginx"/><text x="{}" y="59" class="label">nginx</text>"#,
        lx + 20.0,
        lx + 24.0
    );
    lx += 80.0;
    let _ = writeln!(
        s,
        r#"<line x1="{lx}" x2="{lx}" y1="49" y2="61" class="target"/><text x="{}" y="59" class="label">target (wsgate)</text>"#,
        lx + 6.0
    );
    // Grid and axis.
    let mut tick = 0.0;
    while tick <= x_max + 1e-9 {
        let tx = x0 + tick / x_max * plot_w;
        let _ = writeln!(
            s,
            r#"<line x1="{tx:.1}" x2="{tx:.1}" y1="{:.1}" y2="{:.1}" class="grid"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" class="axis">{tick:.1}</text>"#,
            top - 6.0,
            y,
            y + 14.0
        );
        tick += 0.5;
    }
    s.push_str(&body);
    let nx = x0 + 1.0 / x_max * plot_w;
    let _ = writeln!(
        s,
        r#"<line x1="{nx:.1}" x2="{nx:.1}" y1="{:.1}" y2="{:.1}" class="nginx"/>"#,
        top - 6.0,
        y
    );
    s.push_str("</svg>\n");
    s
}
