//! `slowloris`: what slow request heads cost wsgate, and what they do to everyone else.
//!
//! Starts a wsgate binary with a builtin echo route, then:
//! 1. a baseline: sequential WebSocket handshakes (connect + upgrade + close) from one client,
//!    latencies in an HDR histogram;
//! 2. the attack: N connections that each send a request head one byte per second and
//!    never finish it (`client_header` is raised to outlast the run, so the N stay waiting;
//!    a connection wsgate closes anyway is re-opened and counted). wsgate's RSS before and
//!    after the N are waiting gives the memory per waiting connection;
//! 3. the same handshakes again while the N trickle on.
//!
//! Bounded: at most `--handshakes` per phase and `--duration` each, N capped at 20,000.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::{sys, ws};

/// Most attack connections accepted on the command line: the run must stay bounded.
const MAX_CONNS: usize = 20_000;
/// The attack's head before its trickle: a real upgrade request, never finished.
const SLOW_HEAD: &[u8] = b"GET /echo HTTP/1.1\r\nHost: slow.test\r\nUpgrade: websocket\r\n";

#[derive(clap::Args, Debug)]
pub struct Opts {
    /// The wsgate binary to measure.
    #[arg(long, default_value = "target/release/wsgate")]
    wsgate: PathBuf,
    /// Connections trickling their heads.
    #[arg(long, default_value_t = 2000)]
    conns: usize,
    /// Handshakes per measured phase (at most).
    #[arg(long, default_value_t = 2000)]
    handshakes: usize,
    /// Longest time per measured phase.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    duration: Duration,
}

pub fn run(opts: Opts) -> anyhow::Result<()> {
    if opts.conns > MAX_CONNS {
        bail!("--conns is capped at {MAX_CONNS}");
    }
    sys::raise_nofile();
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let admin = free_port()?;
    let config = dir.path().join("slowloris.toml");
    std::fs::write(
        &config,
        format!(
            r#"[admin]
bind = "127.0.0.1:{admin}"
[listeners.public]
bind = "127.0.0.1:{port}"
[timeouts]
client_header = "10m"
[limits]
handshake_rate_per_ip = "0/s"
{pending}
[routes.echo]
path = "/echo"
builtin = "echo"
"#,
            // Only when the default (10,000) is too small, so older builds can be measured.
            pending = if opts.conns * 2 > 10_000 {
                format!("max_pending_heads = {}", opts.conns * 2)
            } else {
                String::new()
            },
        ),
    )?;
    let mut wsgate = Wsgate::start(&opts.wsgate, &config, port)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(measure(&opts, addr, wsgate.pid()));
    wsgate.stop();
    result
}

async fn measure(opts: &Opts, addr: SocketAddr, pid: u32) -> anyhow::Result<()> {
    // Warm up allocator and runtime, then the baseline.
    handshakes(addr, 200, Duration::from_secs(10)).await?;
    let quiet = handshakes(addr, opts.handshakes, opts.duration).await?;
    let rss_before = sys::rss_kib(pid)?;

    let stop = Arc::new(AtomicBool::new(false));
    let reopened = Arc::new(AtomicU64::new(0));
    let rounds = Arc::new(AtomicU64::new(0));
    let attack = tokio::spawn(attack(
        addr,
        opts.conns,
        stop.clone(),
        reopened.clone(),
        rounds.clone(),
    ));
    // Every connection open and a few bytes in: the RSS now carries N waiting heads.
    let deadline = Instant::now() + Duration::from_secs(120);
    while rounds.load(Ordering::Relaxed) < 3 {
        if attack.is_finished() || Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            attack.await.context("attack task")??;
            bail!("the attack did not get going");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_waiting = sys::rss_kib(pid)?;
    let under_attack = handshakes(addr, opts.handshakes, opts.duration).await?;
    let rss_after = sys::rss_kib(pid)?;
    stop.store(true, Ordering::Relaxed);
    let sent = attack.await.context("attack task")??;

    let per_conn = (rss_waiting.saturating_sub(rss_before)) as f64 / opts.conns as f64;
    println!(
        "slowloris: {} connections trickling one header byte a second",
        opts.conns
    );
    println!("  wsgate RSS: {rss_before} KiB before, {rss_waiting} KiB with the connections waiting, {rss_after} KiB after the second handshake run");
    println!("  memory per waiting connection: {per_conn:.2} KiB");
    println!(
        "  attack: {sent} bytes trickled, {} connections closed by wsgate and re-opened",
        reopened.load(Ordering::Relaxed)
    );
    println!("  handshakes without the attack: {}", quiet.summary());
    println!(
        "  handshakes during the attack:  {}",
        under_attack.summary()
    );
    println!(
        "{}",
        serde_json::json!({
            "conns": opts.conns,
            "rss_before_kib": rss_before,
            "rss_waiting_kib": rss_waiting,
            "kib_per_waiting_conn": per_conn,
            "reopened": reopened.load(Ordering::Relaxed),
            "quiet": quiet.json(),
            "attack": under_attack.json(),
        })
    );
    Ok(())
}

/// Handshake latencies of one phase.
struct Latencies {
    hist: Histogram<u64>,
    failed: u64,
}

impl Latencies {
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1e6
    }

    fn summary(&self) -> String {
        format!(
            "{} done, {} failed; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.hist.len(),
            self.failed,
            self.ms(0.5),
            self.ms(0.99),
            self.hist.max() as f64 / 1e6
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.hist.len(),
            "failed": self.failed,
            "p50_ms": self.ms(0.5),
            "p99_ms": self.ms(0.99),
            "max_ms": self.hist.max() as f64 / 1e6,
        })
    }
}

/// Sequential handshakes (connect, upgrade, close), at most `count` or for `limit`.
async fn handshakes(addr: SocketAddr, count: usize, limit: Duration) -> anyhow::Result<Latencies> {
    let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    let mut failed = 0;
    let end = Instant::now() + limit;
    for _ in 0..count {
        if Instant::now() > end {
            break;
        }
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            ws::client_handshake(&mut s, "bench.test", "/echo").await?;
            io::Result::Ok(s)
        })
        .await;
        match result {
            Ok(Ok(_stream)) => {
                hist.record(started.elapsed().as_nanos() as u64)?;
            }
            _ => failed += 1,
        }
    }
    Ok(Latencies { hist, failed })
}

/// Keeps `n` connections sending their head one byte per second until `stop`; re-opens any
/// that wsgate closes. Returns the bytes trickled.
async fn attack(
    addr: SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
    reopened: Arc<AtomicU64>,
    rounds: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&SLOW_HEAD[..1]).await?;
        conns.push((s, 1usize));
    }
    let mut sent = n as u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        for (s, pos) in conns.iter_mut() {
            let byte = if *pos < SLOW_HEAD.len() {
                SLOW_HEAD[*pos]
            } else {
                b'a'
            };
            // Past the head's known part: one more byte of an endless header value.
            if *pos == SLOW_HEAD.len() {
                let _ = s.write_all(b"X-Slow: ").await;
            }
            if s.write_all(&[byte]).await.is_err() {
                reopened.fetch_add(1, Ordering::Relaxed);
                *s = TcpStream::connect(addr).await?;
                s.write_all(&SLOW_HEAD[..1]).await?;
                *pos = 1;
                continue;
            }
            *pos += 1;
            sent += 1;
        }
        rounds.fetch_add(1, Ordering::Relaxed);
    }
    Ok(sent)
}

struct Wsgate {
    child: Child,
}

impl Wsgate {
    fn start(binary: &PathBuf, config: &std::path::Path, port: u16) -> anyhow::Result<Wsgate> {
        let child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .env("WSGATE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let mut wsgate = Wsgate { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if matches!(wsgate.child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
                wsgate.stop();
                bail!("wsgate did not start listening on {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(wsgate)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Wsgate {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
