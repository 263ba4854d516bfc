//! `slowloris`: what connections that trickle their request head cost wsgate, and what they
//! do to everyone else's handshakes.
//!
//! Starts a wsgate pinned to `--proxy-cpu` with one worker thread, a builtin echo route at
//! `/ws` and its default `[limits]` and `[timeouts]` (`--client-header` overrides the one
//! timeout that matters here), and from this process, pinned to `--load-cpu`:
//! 1. a baseline: sequential WebSocket handshakes, back to back for `--duration` (or
//!    `--handshakes`), each timed from its connect to the checked 101 (then closed with a
//!    close handshake, untimed), latencies in an HDR histogram;
//! 2. the attack: `--conns` connections, opened evenly over one second, each sending
//!    `GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: aaa…` one byte a second and never finishing it.
//!    A connection wsgate closes (EOF, reset, or an answer such as a 408) is counted and
//!    re-opened at once, so N stay waiting. wsgate's RSS at rest, and again once all N are
//!    accepted (wsgate holds N more descriptors) and have sent a few bytes, gives the memory
//!    per waiting connection;
//! 3. the baseline's handshakes again while the N trickle on: with the default duration
//!    they span wsgate's first `client_header` cut (10 s after the attack began), when the N
//!    are closed and re-opened within a second.
//!
//! Back to back, not paced: with a pause between handshakes both CPUs go idle, and on this
//! VM waking them up costs more than the handshake (5 ms apart: p50 0.37 ms without the
//! attack, 0.10 ms with it, whose trickle keeps the CPUs awake; back to back: 0.02 ms).
//!
//! Prints one summary block and writes a JSON file (`--out`, default
//! target/bench/slowloris.json). Bounded: N at most 20,000; each handshake phase at most
//! `--handshakes` and `--duration`; the wait for the N at most 8 s; every connect and
//! handshake times out after 5 s.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::all::{self, Proc, Sched};
use crate::{report, sys, ws};

/// Most attack connections accepted on the command line: the run must stay bounded (and
/// within the open-file limit: this process and wsgate each hold one descriptor per
/// connection).
const MAX_CONNS: usize = 20_000;

/// Descriptors beyond the N that this process and wsgate need (listeners, handshakes, logs).
const FD_ROOM: usize = 200;

/// The route every connection asks for; the config maps it to wsgate's builtin echo.
const ROUTE_PATH: &str = "/ws";

/// The `Host` of the measured handshakes.
const HANDSHAKE_HOST: &str = "bench.test";

/// The attack's request head, sent one byte at a time; after it, [`PAD`] forever: a header
/// value that never ends, so the head is never complete.
const SLOW_HEAD: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: ";

/// The byte that follows [`SLOW_HEAD`], once a second, for as long as wsgate listens.
const PAD: u8 = b'a';

/// One byte per connection per this interval: slow enough to hold a connection for minutes
/// with a few hundred bytes, the classic slowloris rate.
const TRICKLE_INTERVAL: Duration = Duration::from_secs(1);

/// A waiting connection counts as settled once it has sent this many bytes: wsgate has then
/// read from it (and allocated whatever it allocates on a first read), but no default
/// `client_header` (10 s) has cut it yet.
const SETTLE_BYTES: u64 = 3;

/// Longest wait for all N connections to be accepted and settled (about 3 s when nothing is
/// wrong): the RSS is then read anyway, before the default `client_header` (10 s) cuts them.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(8);

/// How often the measuring side looks at the attack and at wsgate's descriptors.
const POLL: Duration = Duration::from_millis(50);

/// Each connect and each handshake gives up after this long (a failure, not a hang).
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The close handshake after each measured handshake gives up after this long (untimed: the
/// server closes first, so the load's ports are not left in TIME_WAIT).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects in flight at once during the attack, as in the idle workloads: the listen queue
/// stays short, so no SYN is dropped and retried a second later.
const CONNECT_CONCURRENCY: usize = 64;

/// Pause before retrying a connect that failed.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Unmeasured handshakes and slow heads first: first-use allocations (runtime, allocator
/// arenas, the head gate's first buffers) are not per-connection costs.
const WARM_HANDSHAKES: usize = 200;
const WARM_SLOW_HEADS: usize = 16;

/// Pause before reading the RSS at rest: connections of the baseline have been closed.
const REST_PAUSE: Duration = Duration::from_millis(500);

/// Distinct handshake failure reasons kept for the report.
const MAX_REASONS: usize = 5;

/// Bytes of wsgate's answer to a slow connection (if it sends one) kept for the report.
const ANSWER_SAMPLE: usize = 128;

#[derive(clap::Args, Debug)]
pub struct Opts {
    /// The wsgate binary to measure (default: target/release/wsgate of this checkout).
    #[arg(long)]
    wsgate: Option<PathBuf>,
    /// Connections trickling their heads (at most 20,000).
    #[arg(long, default_value_t = 2000)]
    conns: usize,
    /// Most handshakes per measured phase (the duration normally ends a phase first).
    #[arg(long, default_value_t = 1_000_000)]
    handshakes: usize,
    /// Time of each measured phase. The default (12 s, starting about 3 s into the attack)
    /// spans wsgate's first client_header cut at 10 s with the default client_header.
    #[arg(long, default_value = "12s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// wsgate's `[timeouts] client_header` (default: wsgate's own default, 10 s).
    #[arg(long, value_parser = crate::parse_duration)]
    client_header: Option<Duration>,
    /// CPU for wsgate.
    #[arg(long, default_value_t = 0)]
    proxy_cpu: usize,
    /// CPU for the attack and the measured handshakes (this process).
    #[arg(long, default_value_t = 1)]
    load_cpu: usize,
    /// How wsgate and this process are scheduled, as in `all --sched` (fifo, nice, normal;
    /// needs root, ignored otherwise).
    #[arg(long, value_enum, default_value = "fifo")]
    sched: Sched,
    /// The JSON result (default: target/bench/slowloris.json); wsgate's log goes to logs/
    /// next to it.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A name for the build under test (e.g. "before", a commit), shown and kept in the JSON.
    #[arg(long)]
    label: Option<String>,
}

pub fn run(opts: Opts) -> anyhow::Result<()> {
    let started = Instant::now();
    // Before this thread is pinned to one CPU (the count of CPUs follows the pinning).
    let machine = report::machine_info();
    if opts.conns == 0 || opts.conns > MAX_CONNS {
        bail!("--conns must be 1 to {MAX_CONNS}");
    }
    all::install_signal_handlers();
    ws::self_check()?;
    all::set_sched(opts.sched);
    let nofile = sys::raise_nofile();
    if (nofile as usize) < opts.conns + FD_ROOM {
        bail!(
            "open-file limit {nofile} is too low for --conns {}: raise `ulimit -n`",
            opts.conns
        );
    }

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench/slowloris.json"));
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    fs::create_dir_all(dir.join("logs"))?;
    let bin = opts
        .wsgate
        .clone()
        .unwrap_or_else(|| root.join("target/release/wsgate"));
    if !bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release`",
            bin.display()
        );
    }
    let bin = bin.canonicalize()?;

    let (port, admin) = (all::free_port()?, all::free_port()?);
    let config = dir.join("slowloris-wsgate.toml");
    fs::write(&config, wsgate_config(port, admin, opts.client_header))?;
    let log = dir.join("logs/slowloris-wsgate.log");
    let mut wsgate = Proc::spawn(
        "wsgate",
        opts.proxy_cpu,
        &bin,
        &["--config".into(), config.display().to_string()],
        &log,
    )?;
    wsgate.wait_ready(port, false, &log)?;

    // The load runs here, on the other CPU, scheduled like the processes the harness starts
    // (the attack's thread, started later, inherits both).
    if let Err(e) = sys::pin_current_thread(opts.load_cpu) {
        eprintln!("cannot pin the load to CPU {}: {e}", opts.load_cpu);
    }
    all::apply_sched();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let measured = runtime.block_on(measure(&opts, addr, wsgate.pid()));
    wsgate.stop();
    let m = measured?;
    let run_secs = started.elapsed().as_secs_f64();

    print!("{}", summary(&opts, &bin, &m, run_secs, &out));
    let result = json!({
        "workload": "slowloris",
        "label": opts.label,
        "settings": {
            "conns": opts.conns,
            "handshakes": opts.handshakes,
            "duration_s": opts.duration.as_secs_f64(),
            "client_header_s": opts.client_header.map(|d| d.as_secs_f64()),
            "trickle": "1 byte/s",
            "proxy_cpu": opts.proxy_cpu,
            "load_cpu": opts.load_cpu,
            "sched": format!("{:?}", opts.sched).to_lowercase(),
        },
        "wsgate": bin.display().to_string(),
        "machine": machine,
        "rss_kib": {
            "rest": m.rss_rest,
            "waiting": m.waiting.rss_kib,
            "after_attack_phase": m.rss_after,
        },
        "fds": { "rest": m.fds_rest, "waiting": m.waiting.fds },
        "waiting_conns": m.waiting.open,
        "settled_conns": m.waiting.settled,
        "settle_s": m.waiting.after.as_secs_f64(),
        "kib_per_waiting_conn": m.kib_per_conn(),
        "handshakes": { "quiet": m.quiet.json(), "attack": m.attack.json() },
        "slow_conns": m.slow.json(),
        "run_s": run_secs,
    });
    fs::write(&out, serde_json::to_string_pretty(&result)? + "\n")
        .with_context(|| format!("write {}", out.display()))?;
    Ok(())
}

/// One worker thread (the proxy gets one CPU, as in every workload), the builtin echo, and
/// nothing else: `[limits]` and `[timeouts]` are wsgate's defaults.
fn wsgate_config(port: u16, admin: u16, client_header: Option<Duration>) -> String {
    let mut config = format!(
        r#"# Written by `cargo bench --bench proxy -- slowloris`: wsgate's default [limits] and [timeouts].
[log]
level = "warn"

[runtime]
worker_threads = 1

[admin]
bind = "127.0.0.1:{admin}"

[listeners.public]
bind = "127.0.0.1:{port}"

[routes.ws]
path = "{ROUTE_PATH}"
builtin = "echo"
"#
    );
    if let Some(d) = client_header {
        let _ = write!(
            config,
            "\n[timeouts]\nclient_header = \"{}ms\"\n",
            d.as_millis()
        );
    }
    config
}

/// Everything one run measured.
struct Measured {
    quiet: Latencies,
    attack: Latencies,
    rss_rest: u64,
    fds_rest: usize,
    waiting: Waiting,
    /// wsgate's RSS after the handshakes under attack (the N churned meanwhile).
    rss_after: u64,
    slow: SlowReport,
}

/// wsgate with the N waiting, once they were all accepted and settled (or the wait ran out).
struct Waiting {
    rss_kib: u64,
    fds: usize,
    /// Attack connections open, and open with [`SETTLE_BYTES`] sent, at that moment.
    open: u64,
    settled: u64,
    /// From the attack's start to that moment.
    after: Duration,
}

impl Measured {
    fn kib_per_conn(&self) -> f64 {
        self.waiting.rss_kib.saturating_sub(self.rss_rest) as f64 / self.waiting.open.max(1) as f64
    }
}

async fn measure(opts: &Opts, addr: SocketAddr, pid: u32) -> anyhow::Result<Measured> {
    let warm = handshakes(addr, WARM_HANDSHAKES, Duration::from_secs(10)).await;
    if warm.hist.is_empty() {
        bail!("no warm-up handshake succeeded: {}", warm.reasons());
    }
    warm_slow_heads(addr).await?;
    let quiet = handshakes(addr, opts.handshakes, opts.duration).await;
    tokio::time::sleep(REST_PAUSE).await;
    let rss_rest = sys::rss_kib(pid)?;
    let fds_rest = sys::fd_count(pid)?;

    let stats = Arc::new(AttackStats::new()?);
    let stop = CancellationToken::new();
    let attack_start = Instant::now();
    let attack = start_attack(addr, opts.conns, stats.clone(), stop.clone())?;
    // Run the rest inside a block so the attack is stopped and joined whatever happens.
    let phases = async {
        let deadline = attack_start + SETTLE_TIMEOUT;
        let n = opts.conns as u64;
        loop {
            let settled = stats.settled.load(Ordering::Relaxed);
            let fds = sys::fd_count(pid)?;
            if settled >= n && fds >= fds_rest + opts.conns {
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "warning: after {SETTLE_TIMEOUT:?}, {settled} of {n} connections settled and \
                     wsgate holds {} more descriptors than at rest; measuring anyway",
                    fds.saturating_sub(fds_rest)
                );
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let waiting = Waiting {
            after: attack_start.elapsed(),
            open: stats.open.load(Ordering::Relaxed),
            settled: stats.settled.load(Ordering::Relaxed),
            rss_kib: sys::rss_kib(pid)?,
            fds: sys::fd_count(pid)?,
        };
        let under_attack = handshakes(addr, opts.handshakes, opts.duration).await;
        let rss_after = sys::rss_kib(pid)?;
        anyhow::Ok((waiting, under_attack, rss_after))
    }
    .await;
    stop.cancel();
    let joined = tokio::task::spawn_blocking(move || attack.join()).await?;
    let attack_secs = attack_start.elapsed().as_secs_f64();
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e).context("attack runtime"),
        Err(_) => bail!("the attack thread panicked"),
    }
    let (waiting, attack, rss_after) = phases?;
    Ok(Measured {
        quiet,
        attack,
        rss_rest,
        fds_rest,
        waiting,
        rss_after,
        slow: stats.report(opts.conns as u64, attack_secs),
    })
}

/// Opens a few slow heads, lets wsgate read a few bytes of each, and closes them.
async fn warm_slow_heads(addr: SocketAddr) -> anyhow::Result<()> {
    let mut conns = Vec::with_capacity(WARM_SLOW_HEADS);
    for _ in 0..WARM_SLOW_HEADS {
        let mut s = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
        s.write_all(&SLOW_HEAD[..SETTLE_BYTES as usize]).await?;
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(conns);
    Ok(())
}

/// Handshake latencies of one phase.
struct Latencies {
    hist: Histogram<u64>,
    failed: u64,
    /// Failure reasons (at most [`MAX_REASONS`] distinct ones) and their counts.
    reasons: BTreeMap<String, u64>,
    elapsed: Duration,
}

impl Latencies {
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1e6
    }

    fn max_ms(&self) -> f64 {
        self.hist.max() as f64 / 1e6
    }

    fn reasons(&self) -> String {
        if self.reasons.is_empty() {
            return "none".into();
        }
        self.reasons
            .iter()
            .map(|(r, n)| format!("{n} × {r}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn line(&self) -> String {
        let mut s = format!(
            "p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  ({} ok, {} failed, {:.1} s)",
            self.ms(0.5),
            self.ms(0.99),
            self.max_ms(),
            self.hist.len(),
            self.failed,
            self.elapsed.as_secs_f64()
        );
        if self.failed > 0 {
            let _ = write!(s, "; failures: {}", self.reasons());
        }
        s
    }

    fn json(&self) -> Value {
        json!({
            "ok": self.hist.len(),
            "failed": self.failed,
            "failure_reasons": self.reasons,
            "p50_ms": self.ms(0.5),
            "p90_ms": self.ms(0.9),
            "p99_ms": self.ms(0.99),
            "p999_ms": self.ms(0.999),
            "max_ms": self.max_ms(),
            "elapsed_s": self.elapsed.as_secs_f64(),
        })
    }
}

/// Sequential handshakes (connect, upgrade, 101 checked, close handshake), back to back, at
/// most `count` or for `limit`. Each is timed from its connect to the checked 101.
async fn handshakes(addr: SocketAddr, count: usize, limit: Duration) -> Latencies {
    let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)
        .expect("static histogram bounds are valid");
    let mut failed = 0;
    let mut reasons = BTreeMap::new();
    let start = Instant::now();
    let end = start + limit;
    for _ in 0..count {
        let began = Instant::now();
        if began >= end {
            break;
        }
        let result = tokio::time::timeout(STEP_TIMEOUT, async {
            let mut s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let early = ws::client_handshake(&mut s, HANDSHAKE_HOST, ROUTE_PATH, "").await?;
            io::Result::Ok((s, early))
        })
        .await;
        let reason = match result {
            Ok(Ok((mut stream, early))) => {
                let ns = began.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
                hist.saturating_record(ns);
                close(&mut stream, early).await;
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no 101 within {STEP_TIMEOUT:?}"),
        };
        failed += 1;
        if reasons.len() < MAX_REASONS || reasons.contains_key(&reason) {
            *reasons.entry(reason).or_insert(0) += 1;
        }
    }
    Latencies {
        hist,
        failed,
        reasons,
        elapsed: start.elapsed(),
    }
}

/// Close handshake: our close frame, the server's, then its FIN (errors end it quietly: the
/// handshake was what we measured).
async fn close(s: &mut TcpStream, early: Vec<u8>) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        s.write_all(&ws::client_frame(ws::OP_CLOSE, &1000u16.to_be_bytes()))
            .await?;
        let mut reader = ws::FrameReader::new(early, 256);
        while reader.read_frame(s).await?.opcode != ws::OP_CLOSE {}
        let mut sink = [0u8; 256];
        while s.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// What the trickling connections report, shared by their tasks and the measuring side.
struct AttackStats {
    /// Connections open now.
    open: AtomicU64,
    /// Connections open now that have sent at least [`SETTLE_BYTES`].
    settled: AtomicU64,
    /// Connects that succeeded: the first N and every re-open.
    opened: AtomicU64,
    /// Re-opens after wsgate closed a connection.
    reopened: AtomicU64,
    connect_failed: AtomicU64,
    bytes_sent: AtomicU64,
    closes: Mutex<Closes>,
}

/// The connections wsgate closed, by how, and how long and far each had got.
struct Closes {
    /// FIN without a word.
    eof: u64,
    /// Reset, or a write that failed.
    reset: u64,
    /// wsgate wrote something (an error response) before closing.
    answered: u64,
    /// The start of the first answer, if any.
    answer: Option<String>,
    /// Connect to close, in milliseconds.
    life_ms: Histogram<u64>,
    /// Bytes sent before the close.
    bytes: Histogram<u64>,
}

/// How one attack connection ended.
enum End {
    Stopped,
    Eof,
    Reset,
}

impl AttackStats {
    fn new() -> anyhow::Result<AttackStats> {
        Ok(AttackStats {
            open: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            reopened: AtomicU64::new(0),
            connect_failed: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            closes: Mutex::new(Closes {
                eof: 0,
                reset: 0,
                answered: 0,
                answer: None,
                life_ms: Histogram::new_with_bounds(1, 24 * 3_600_000, 3)?,
                bytes: Histogram::new_with_bounds(1, 1 << 30, 3)?,
            }),
        })
    }

    fn closed(&self, end: &End, answer: &[u8], life: Duration, sent: u64) {
        let mut c = self.closes.lock().unwrap_or_else(|e| e.into_inner());
        if !answer.is_empty() {
            c.answered += 1;
            if c.answer.is_none() {
                let text = String::from_utf8_lossy(answer);
                c.answer = Some(text.lines().next().unwrap_or_default().to_owned());
            }
        } else if matches!(end, End::Eof) {
            c.eof += 1;
        } else {
            c.reset += 1;
        }
        c.life_ms.saturating_record(life.as_millis() as u64);
        c.bytes.saturating_record(sent);
    }

    fn report(&self, conns: u64, attack_secs: f64) -> SlowReport {
        let c = self.closes.lock().unwrap_or_else(|e| e.into_inner());
        let quantiles = |h: &Histogram<u64>| {
            (!h.is_empty()).then(|| [h.min(), h.value_at_quantile(0.5), h.max()])
        };
        SlowReport {
            conns,
            attack_secs,
            opened: self.opened.load(Ordering::Relaxed),
            reopened: self.reopened.load(Ordering::Relaxed),
            connect_failed: self.connect_failed.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            closed_eof: c.eof,
            closed_reset: c.reset,
            closed_answered: c.answered,
            answer: c.answer.clone(),
            life_ms: quantiles(&c.life_ms),
            bytes_at_close: quantiles(&c.bytes),
        }
    }
}

/// The attack's figures at its end.
struct SlowReport {
    conns: u64,
    attack_secs: f64,
    opened: u64,
    reopened: u64,
    connect_failed: u64,
    bytes_sent: u64,
    closed_eof: u64,
    closed_reset: u64,
    closed_answered: u64,
    answer: Option<String>,
    /// min, p50, max.
    life_ms: Option<[u64; 3]>,
    bytes_at_close: Option<[u64; 3]>,
}

impl SlowReport {
    fn closed(&self) -> u64 {
        self.closed_eof + self.closed_reset + self.closed_answered
    }

    fn json(&self) -> Value {
        json!({
            "conns": self.conns,
            "attack_s": self.attack_secs,
            "opened": self.opened,
            "reopened": self.reopened,
            "connect_failed": self.connect_failed,
            "bytes_sent": self.bytes_sent,
            "closed_by_wsgate": self.closed(),
            "closed_eof": self.closed_eof,
            "closed_reset": self.closed_reset,
            "closed_answered": self.closed_answered,
            "answer": self.answer,
            "life_ms_min_p50_max": self.life_ms,
            "bytes_at_close_min_p50_max": self.bytes_at_close,
        })
    }
}

/// Starts the N trickling connections on a thread of their own (so the measured handshakes
/// do not queue behind them in one runtime); they run until `stop`.
fn start_attack(
    addr: SocketAddr,
    n: usize,
    stats: Arc<AttackStats>,
    stop: CancellationToken,
) -> io::Result<std::thread::JoinHandle<io::Result<()>>> {
    std::thread::Builder::new()
        .name("slowloris".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..n {
                    // Opened evenly over the first second, so the trickle is spread too.
                    let phase = TRICKLE_INTERVAL.mul_f64(i as f64 / n as f64);
                    tasks.spawn(trickle(
                        addr,
                        phase,
                        stats.clone(),
                        gate.clone(),
                        stop.clone(),
                    ));
                }
                while tasks.join_next().await.is_some() {}
            });
            Ok(())
        })
}

/// One attack connection: connects, sends [`SLOW_HEAD`] and then [`PAD`] one byte per
/// [`TRICKLE_INTERVAL`], and when wsgate closes it, counts how and connects again.
async fn trickle(
    addr: SocketAddr,
    phase: Duration,
    stats: Arc<AttackStats>,
    gate: Arc<Semaphore>,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(phase) => {}
    }
    let mut first = true;
    let mut buf = [0u8; 512];
    loop {
        let connected = {
            let _permit = tokio::select! {
                _ = stop.cancelled() => return,
                permit = gate.acquire() => permit,
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr)) => r,
            }
        };
        let Ok(Ok(mut s)) = connected else {
            stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RETRY_PAUSE) => continue,
            }
        };
        if !first {
            stats.reopened.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        stats.opened.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        let since = Instant::now();
        let mut sent = 0u64;
        let mut answer = Vec::new();
        // The first tick is at once: the first byte goes with the connect.
        let mut tick = tokio::time::interval(TRICKLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break End::Stopped,
                read = s.read(&mut buf) => match read {
                    Ok(0) => break End::Eof,
                    Ok(k) => {
                        let room = ANSWER_SAMPLE.saturating_sub(answer.len());
                        answer.extend_from_slice(&buf[..k.min(room)]);
                    }
                    Err(_) => break End::Reset,
                },
                _ = tick.tick() => {
                    let byte = SLOW_HEAD.get(sent as usize).copied().unwrap_or(PAD);
                    if s.write_all(&[byte]).await.is_err() {
                        break End::Reset;
                    }
                    sent += 1;
                    stats.bytes_sent.fetch_add(1, Ordering::Relaxed);
                    if sent == SETTLE_BYTES {
                        stats.settled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        };
        stats.open.fetch_sub(1, Ordering::Relaxed);
        if sent >= SETTLE_BYTES {
            stats.settled.fetch_sub(1, Ordering::Relaxed);
        }
        if matches!(end, End::Stopped) {
            return;
        }
        stats.closed(&end, &answer, since.elapsed(), sent);
    }
}

/// The block printed at the end of a run.
fn summary(
    opts: &Opts,
    bin: &std::path::Path,
    m: &Measured,
    run_secs: f64,
    out: &std::path::Path,
) -> String {
    let n = opts.conns as u64;
    let s = &m.slow;
    let timeout = match opts.client_header {
        Some(d) => format!("client_header {d:?}"),
        None => "default [timeouts]".into(),
    };
    let mut t = String::new();
    let label = opts
        .label
        .as_ref()
        .map(|l| format!(" [{l}]"))
        .unwrap_or_default();
    let _ = writeln!(
        t,
        "== slowloris{label}: {n} connections trickling a request head at one byte a second"
    );
    let _ = writeln!(
        t,
        "wsgate                  {} (default [limits], {timeout}, 1 worker on CPU {})",
        bin.display(),
        opts.proxy_cpu
    );
    let _ = writeln!(
        t,
        "RSS                     {} KiB at rest, {} KiB with the connections waiting, {} KiB after the handshakes under attack",
        m.rss_rest, m.waiting.rss_kib, m.rss_after
    );
    let mut waiting = format!(
        "{} open, {} with {SETTLE_BYTES}+ bytes sent, {:.1} s after the attack began; wsgate holds {} more descriptors than at rest",
        m.waiting.open,
        m.waiting.settled,
        m.waiting.after.as_secs_f64(),
        m.waiting.fds.saturating_sub(m.fds_rest)
    );
    if m.waiting.open < n || m.waiting.settled < n {
        waiting.push_str(" (NOT all N: the figure is per open connection)");
    }
    let _ = writeln!(
        t,
        "memory per waiting conn {:.2} KiB  ({waiting})",
        m.kib_per_conn()
    );
    let _ = writeln!(t, "handshakes, no attack   {}", m.quiet.line());
    let _ = writeln!(t, "handshakes, attack      {}", m.attack.line());
    let closed = s.closed();
    let verdict = if closed == 0 {
        format!(
            "all {n} stayed open for the whole attack ({:.1} s): none closed by wsgate",
            s.attack_secs
        )
    } else {
        let mut v = format!(
            "{closed} closed by wsgate ({} EOF, {} reset, {} answered",
            s.closed_eof, s.closed_reset, s.closed_answered
        );
        if let Some(a) = &s.answer {
            let _ = write!(v, ": \"{a}\"");
        }
        v.push(')');
        if let (Some(life), Some(bytes)) = (s.life_ms, s.bytes_at_close) {
            let _ = write!(
                v,
                " after {:.1} / {:.1} / {:.1} s (min / p50 / max) and {} / {} / {} bytes; {} re-opened",
                life[0] as f64 / 1e3,
                life[1] as f64 / 1e3,
                life[2] as f64 / 1e3,
                bytes[0],
                bytes[1],
                bytes[2],
                s.reopened
            );
        }
        v
    };
    let _ = writeln!(t, "slow connections        {verdict}");
    let _ = writeln!(
        t,
        "                        attack {:.1} s, {} connects ({} failed), {} bytes trickled",
        s.attack_secs, s.opened, s.connect_failed, s.bytes_sent
    );
    let _ = writeln!(t, "run time                {run_secs:.1} s");
    let _ = writeln!(t, "json                    {}", out.display());
    t
}
