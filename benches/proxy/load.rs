//! The load client: one thread (plus a pacer thread for `paced`), hand-written WebSocket
//! framing, latencies in an HDR histogram, one JSON object on stdout.
//!
//! Modes:
//! - `echo`: closed loop. Each connection sends a message, waits for its echo, repeats.
//! - `paced`: open loop at a fixed total rate. A pacer thread writes message k at
//!   `start + k / rate` whatever the answers do, stamping that intended send time into the
//!   payload; the round trip is measured from the intended time, so a stall shows up in the
//!   latency of every message it delayed (no coordinated omission).
//! - `handshake`: each worker repeats connect (+ TLS) + upgrade + one echo + close.
//! - `idle`: opens N connections (upgrade + one echo each), holds them, and reports how much
//!   the watched processes' RSS grew per connection.
//! - `storm`: opens N connections as `idle` does, prints `ready N`, and waits for a line
//!   `restart [NS]` on stdin (the harness has just killed the upstream, at CLOCK_MONOTONIC
//!   NS). Each connection then waits for the proxy to end it (a close frame, EOF, a reset)
//!   and reconnects at once, again and again on any failure, without backoff, until it has
//!   an upgraded connection that carried one echo (or `--storm-deadline` after the restart
//!   has passed). Reports the time until all are back, every failed attempt by kind, and the
//!   watched processes' CPU over the storm and peak RSS (read every 10 ms).
//!
//! Measurement window: everything starts at t0, counting starts at t1 = t0 + warmup and stops
//! at t2 = t1 + duration. A sampler thread reads the watched processes' CPU time from /proc at
//! t1 and t2, so CPU per operation covers exactly the operations counted.

use std::cell::{Cell, RefCell};
use std::io::{self, Write as _};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::LocalSet;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A client connection: a WebSocket over plain TCP, over TLS, or on an HTTP/2 stream
/// (RFC 8441 extended CONNECT, `--h2`).
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    H2(TokioIo<hyper::upgrade::Upgraded>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::H2(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::H2(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::H2(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::H2(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

type H2Sender = SendRequest<Empty<Bytes>>;

use crate::sys::{self, Sample};
use crate::ws::{self, FrameReader};

/// Longest any single step (connect, handshake, one round trip) may take before the
/// connection is counted as failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// After the pacer stops, how long the client waits for the last answers.
const PACED_DRAIN: Duration = Duration::from_secs(3);

/// Highest latency the histograms track (anything longer is clamped to it).
const MAX_LATENCY_NS: u64 = 60_000_000_000;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Echo,
    Http,
    Paced,
    Handshake,
    Idle,
    Storm,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    Json,
    Mixed,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// ws://HOST:PORT/PATH or wss://HOST:PORT/PATH.
    #[arg(long)]
    pub url: String,
    #[arg(long, value_enum, default_value = "echo")]
    pub mode: Mode,
    /// Connections (echo, paced, idle) or concurrent workers (handshake).
    #[arg(long, default_value_t = 64)]
    pub conns: usize,
    /// Message payload in bytes.
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    /// Echo: text messages instead of binary ones, so the proxy's UTF-8 check is part of
    /// the cost: `json` (chat-like JSON, ASCII but for one accented letter per object) or
    /// `mixed` (one character in ten multi-byte: 2-, 3- and 4-byte ones).
    #[arg(long, value_enum)]
    pub text: Option<TextKind>,
    /// Measured time (echo, paced, handshake).
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Unmeasured time before the window.
    #[arg(long, value_parser = crate::parse_duration, default_value = "1s")]
    pub warmup: Duration,
    /// Messages per second over all connections (paced).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// CA certificate (PEM) to trust for wss://.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// TLS server name (SNI and certificate check).
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Processes whose CPU time and RSS are measured (repeat for several, e.g. nginx's
    /// master and worker).
    #[arg(long = "watch-pid")]
    pub watch: Vec<u32>,
    /// Storm: how long after the restart the clients keep trying to reconnect.
    #[arg(long, value_parser = crate::parse_duration, default_value = "60s")]
    pub storm_deadline: Duration,
    /// Idle, storm: wait this long after the last connection opened before reading RSS.
    #[arg(long, value_parser = crate::parse_duration, default_value = "1s")]
    pub settle: Duration,
    /// Idle, storm: connections opened at once (the storm's reconnects are not limited).
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Idle: connections opened and closed before the baseline RSS is read (first-use
    /// allocations in the proxy are not per-connection costs).
    #[arg(long, default_value_t = 16)]
    pub warmup_conns: usize,
    /// Echo: WebSockets over HTTP/2 (extended CONNECT), this many streams per connection
    /// (h2c with prior knowledge for ws://, ALPN h2 for wss://).
    #[arg(long)]
    pub h2: Option<usize>,
    /// A file holding a bearer token: every upgrade request carries
    /// `Authorization: Bearer TOKEN` (HTTP/1.1 upgrades only).
    #[arg(long)]
    pub bearer_file: Option<PathBuf>,
}

pub fn run(opts: Opts) -> anyhow::Result<()> {
    sys::raise_nofile();
    let target = Target::new(&opts)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = LocalSet::new();
    let result = local.block_on(&rt, async {
        match opts.mode {
            Mode::Echo => echo(&opts, &target).await,
            Mode::Http => http(&opts, &target).await,
            Mode::Paced => paced(&opts, &target).await,
            Mode::Handshake => handshake(&opts, &target).await,
            Mode::Idle => idle(&opts, &target).await,
            Mode::Storm => storm(&opts, &target).await,
        }
    })?;
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, &result)?;
    writeln!(out)?;
    Ok(())
}

/// Where to connect and how.
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// `--h2`: streams per HTTP/2 connection, the connection new streams go on, and how
    /// many it carries so far.
    h2: Option<usize>,
    h2_conn: RefCell<Option<(H2Sender, usize)>>,
    /// Header lines added to every upgrade request (`--bearer-file`).
    extra_headers: String,
}

impl Target {
    fn new(opts: &Opts) -> anyhow::Result<Target> {
        let url = opts.url.as_str();
        let (tls, rest) =
            if let Some(rest) = url.strip_prefix("ws://").or(url.strip_prefix("http://")) {
                (false, rest)
            } else if let Some(rest) = url.strip_prefix("wss://").or(url.strip_prefix("https://")) {
                (true, rest)
            } else {
                bail!("--url must start with ws://, wss://, http:// or https://");
            };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = host
            .to_socket_addrs()
            .with_context(|| format!("resolve {host}"))?
            .next()
            .context("no address")?;
        let tls = if tls {
            let ca = opts.ca.as_ref().context("wss:// needs --ca")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)? {
                roots.add(cert?)?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            // Every handshake is a full one, as from distinct clients.
            config.resumption = rustls::client::Resumption::disabled();
            if opts.h2.is_some() {
                config.alpn_protocols = vec![b"h2".to_vec()];
            }
            let name = ServerName::try_from(opts.server_name.clone())?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        if opts.h2 == Some(0)
            || (opts.h2.is_some() && !matches!(opts.mode, Mode::Echo | Mode::Http))
        {
            bail!("--h2 takes a number of streams per connection, in echo or http mode");
        }
        let extra_headers = match &opts.bearer_file {
            None => String::new(),
            Some(_) if opts.h2.is_some() => bail!("--bearer-file is for HTTP/1.1 upgrades"),
            Some(file) => {
                let token = std::fs::read_to_string(file)
                    .with_context(|| format!("read {}", file.display()))?;
                let token = token.trim();
                if token.is_empty() || token.contains(['\r', '\n']) {
                    bail!("{} does not hold one token", file.display());
                }
                format!("Authorization: Bearer {token}\r\n")
            }
        };
        Ok(Target {
            addr,
            host: host.to_owned(),
            path: path.to_owned(),
            tls,
            h2: opts.h2,
            h2_conn: RefCell::new(None),
            extra_headers,
        })
    }

    /// The same target with `h2` streams per connection (`None`: HTTP/1.1) and no HTTP/2
    /// connection yet, to share between the tasks of one run.
    fn fresh(&self, h2: Option<usize>) -> Target {
        Target {
            addr: self.addr,
            host: self.host.clone(),
            path: self.path.clone(),
            tls: self.tls.clone(),
            h2,
            h2_conn: RefCell::new(None),
            extra_headers: self.extra_headers.clone(),
        }
    }

    /// A WebSocket on a new HTTP/2 stream: on the current connection until it carries
    /// `--h2` streams, then on a new one.
    async fn connect_h2(
        &self,
        frame_capacity: usize,
        per_conn: usize,
    ) -> io::Result<(Conn, FrameReader)> {
        let current = self.h2_conn.borrow_mut().take();
        let (mut sender, carried) = match current {
            Some((sender, carried)) if carried < per_conn => (sender, carried),
            _ => (self.h2_handshake().await?, 0),
        };
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!("http://{}{}", self.host, self.path))
            .version(http::Version::HTTP_2)
            .header("sec-websocket-version", "13")
            .body(Empty::<Bytes>::new())
            .map_err(io::Error::other)?;
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        sender.ready().await.map_err(io::Error::other)?;
        let mut response = sender.send_request(req).await.map_err(io::Error::other)?;
        if response.status() != http::StatusCode::OK {
            return Err(io::Error::other(format!(
                "extended CONNECT answered {}",
                response.status()
            )));
        }
        let upgraded = hyper::upgrade::on(&mut response)
            .await
            .map_err(io::Error::other)?;
        *self.h2_conn.borrow_mut() = Some((sender, carried + 1));
        Ok((
            Conn::H2(TokioIo::new(upgraded)),
            FrameReader::new(Vec::new(), frame_capacity),
        ))
    }

    /// A new connection, TLS when the URL says so, with no HTTP spoken yet.
    async fn connect_plain_or_tls(&self) -> io::Result<Conn> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(match &self.tls {
            None => Conn::Plain(tcp),
            Some((connector, name)) => {
                Conn::Tls(Box::new(connector.connect(name.clone(), tcp).await?))
            }
        })
    }

    /// A new HTTP/2 connection, ready for extended CONNECT (the server's SETTINGS read).
    async fn h2_handshake(&self) -> io::Result<H2Sender> {
        let io = self.connect_plain_or_tls().await?;
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
        // A first request's answer means the SETTINGS (with extended CONNECT) are in.
        let probe = http::Request::builder()
            .uri(format!("http://{}/", self.host))
            .version(http::Version::HTTP_2)
            .body(Empty::<Bytes>::new())
            .map_err(io::Error::other)?;
        let _ = sender.send_request(probe).await;
        Ok(sender)
    }

    /// TCP connect, TLS, WebSocket upgrade.
    async fn connect(&self, frame_capacity: usize) -> io::Result<(Conn, FrameReader)> {
        if let Some(per_conn) = self.h2 {
            return self.connect_h2(frame_capacity, per_conn).await;
        }
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let mut conn = match &self.tls {
            None => Conn::Plain(tcp),
            Some((connector, name)) => {
                Conn::Tls(Box::new(connector.connect(name.clone(), tcp).await?))
            }
        };
        let early =
            ws::client_handshake(&mut conn, &self.host, &self.path, &self.extra_headers).await?;
        Ok((conn, FrameReader::new(early, frame_capacity)))
    }

    async fn connect_timeout(&self, frame_capacity: usize) -> io::Result<(Conn, FrameReader)> {
        timeout(STEP_TIMEOUT, self.connect(frame_capacity))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

/// What a run counts, shared by the tasks of one thread.
struct Tally {
    hist: RefCell<Histogram<u64>>,
    ops: Cell<u64>,
    errors: Cell<u64>,
    error_samples: RefCell<Vec<String>>,
}

impl Tally {
    fn new() -> Rc<Tally> {
        Rc::new(Tally {
            hist: RefCell::new(
                Histogram::new_with_bounds(1_000, MAX_LATENCY_NS, 3).expect("valid bounds"),
            ),
            ops: Cell::new(0),
            errors: Cell::new(0),
            error_samples: RefCell::new(Vec::new()),
        })
    }

    fn record(&self, latency: Duration) {
        let ns = (latency.as_nanos() as u64).clamp(1_000, MAX_LATENCY_NS);
        self.hist.borrow_mut().saturating_record(ns);
        self.ops.set(self.ops.get() + 1);
    }

    fn error(&self, e: impl std::fmt::Display) {
        self.errors.set(self.errors.get() + 1);
        let mut samples = self.error_samples.borrow_mut();
        if samples.len() < 5 {
            samples.push(e.to_string());
        }
    }

    fn latency_json(&self) -> Value {
        let h = self.hist.borrow();
        if h.is_empty() {
            return Value::Null;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        json!({
            "p50": us(h.value_at_quantile(0.50)),
            "p90": us(h.value_at_quantile(0.90)),
            "p99": us(h.value_at_quantile(0.99)),
            "p999": us(h.value_at_quantile(0.999)),
            "max": us(h.max()),
            "mean": h.mean() / 1000.0,
        })
    }
}

/// Reads the watched processes at t1 and t2 from its own thread, so a busy event loop cannot
/// delay the samples.
struct Sampler {
    handle: thread::JoinHandle<(Sample, Sample, Duration)>,
}

impl Sampler {
    fn start(pids: Vec<u32>, t1: Instant, t2: Instant) -> Sampler {
        let handle = thread::spawn(move || {
            sleep_until(t1);
            let a = sys::sample(&pids);
            let ta = Instant::now();
            sleep_until(t2);
            let b = sys::sample(&pids);
            (a, b, ta.elapsed())
        });
        Sampler { handle }
    }

    fn finish(self, opts: &Opts, ops: u64) -> Value {
        let (a, b, window) = self.handle.join().expect("sampler thread");
        watched_json(opts, a, b, window, ops)
    }
}

fn watched_json(opts: &Opts, a: Sample, b: Sample, window: Duration, ops: u64) -> Value {
    if opts.watch.is_empty() {
        return Value::Null;
    }
    let tck = sys::clk_tck() as f64;
    let cpu_s = b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / tck;
    let user_s = b.user_ticks.saturating_sub(a.user_ticks) as f64 / tck;
    let per_op = |s: f64| {
        if ops > 0 {
            Value::from(s * 1e6 / ops as f64)
        } else {
            Value::Null
        }
    };
    json!({
        "pids": opts.watch,
        "cpu_s": cpu_s,
        "cpu_user_s": user_s,
        "cpu_share": cpu_s / window.as_secs_f64(),
        "cpu_us_per_op": per_op(cpu_s),
        "user_us_per_op": per_op(user_s),
        "rss_kib_before": a.rss_kib,
        "rss_kib_after": b.rss_kib,
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// A payload whose bytes differ from each other, so a proxy that mangles them is caught.
fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 31 + 7) as u8).collect()
}

/// Exactly `size` bytes of UTF-8 text of `kind`, the pattern repeated (padded with ASCII
/// at the end).
fn text_payload(kind: TextKind, size: usize) -> Vec<u8> {
    let pattern = match kind {
        TextKind::Json => {
            r#"{"seq":1042,"user":"maría","room":"lobby","text":"see you at the station at five, bring the tickets"},"#
        }
        TextKind::Mixed => "wsgate relays κ€😀 every frame ",
    };
    let mut out = String::with_capacity(size);
    for c in pattern.chars().cycle() {
        if out.len() + c.len_utf8() > size {
            break;
        }
        out.push(c);
    }
    while out.len() < size {
        out.push('.');
    }
    out.into_bytes()
}

fn base_json(opts: &Opts, mode: &str) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("mode".into(), mode.into());
    m.insert("url".into(), opts.url.clone().into());
    m.insert("conns".into(), opts.conns.into());
    m.insert("size".into(), opts.size.into());
    let text = opts.text.map(|k| format!("{k:?}").to_lowercase());
    m.insert("text".into(), text.into());
    m
}

/// What a timed run (echo, paced, handshake) reports: operations completed in the window,
/// their latency, errors (plus `extra_errors` counted elsewhere) and the watched processes.
fn timed_json(
    opts: &Opts,
    mode: &str,
    tally: &Tally,
    sampler: Sampler,
    extra_errors: u64,
) -> serde_json::Map<String, Value> {
    let ops = tally.ops.get();
    let mut m = base_json(opts, mode);
    m.insert("duration_s".into(), opts.duration.as_secs_f64().into());
    m.insert("ops".into(), ops.into());
    m.insert(
        "ops_per_s".into(),
        (ops as f64 / opts.duration.as_secs_f64()).into(),
    );
    m.insert("latency_us".into(), tally.latency_json());
    m.insert("errors".into(), (tally.errors.get() + extra_errors).into());
    m.insert("error_samples".into(), json!(*tally.error_samples.borrow()));
    m.insert("watched".into(), sampler.finish(opts, ops));
    m
}

async fn connect_all(opts: &Opts, target: &Target) -> anyhow::Result<Vec<(Conn, FrameReader)>> {
    let mut conns = Vec::with_capacity(opts.conns);
    for i in 0..opts.conns {
        let conn = target
            .connect_timeout(opts.size + 64)
            .await
            .with_context(|| format!("connection {i} to {}", opts.url))?;
        conns.push(conn);
    }
    Ok(conns)
}

/// Sends `msg`, reads one frame back and checks it is the same message.
async fn round_trip(
    conn: &mut Conn,
    reader: &mut FrameReader,
    msg: &[u8],
    expect: &[u8],
) -> io::Result<()> {
    conn.write_all(msg).await?;
    conn.flush().await?;
    let frame = reader.read_frame(conn).await?;
    let opcode = msg.first().map_or(0, |b| b & 0x0f);
    if frame.opcode != opcode || reader.payload(&frame) != expect {
        return Err(io::Error::other(format!(
            "bad echo: opcode {} length {} (sent {})",
            frame.opcode,
            reader.payload(&frame).len(),
            expect.len()
        )));
    }
    Ok(())
}

/// Sends a close frame and waits for the server's close and EOF (bounded).
async fn close(conn: &mut Conn, reader: &mut FrameReader) {
    let _ = timeout(Duration::from_secs(1), async {
        let close = ws::client_frame(ws::OP_CLOSE, &1000u16.to_be_bytes());
        conn.write_all(&close).await?;
        conn.flush().await?;
        loop {
            let frame = reader.read_frame(conn).await?;
            if frame.opcode == ws::OP_CLOSE {
                break;
            }
        }
        let mut sink = [0u8; 512];
        while conn.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// Plain HTTP: each connection (or HTTP/2 stream, with `--h2`) GETs the path again as soon
/// as the answer is in; the upstream answers a small body.
async fn http(opts: &Opts, target: &Target) -> anyhow::Result<Value> {
    let tally = Tally::new();
    let mut h2_senders = Vec::new();
    let mut h1_conns = Vec::new();
    match target.h2 {
        Some(per_conn) => {
            for _ in 0..opts.conns.div_ceil(per_conn) {
                h2_senders.push(target.h2_handshake().await?);
            }
        }
        None => {
            for _ in 0..opts.conns {
                h1_conns.push(target.connect_plain_or_tls().await?);
            }
        }
    }
    let t0 = Instant::now();
    let (t1, t2) = (t0 + opts.warmup, t0 + opts.warmup + opts.duration);
    let sampler = Sampler::start(opts.watch.clone(), t1, t2);
    let request = Rc::new(format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        target.path, target.host
    ));
    let uri = Rc::new(format!("http://{}{}", target.host, target.path));
    let target = Rc::new(target.fresh(target.h2));
    let per_conn = target.h2.unwrap_or(1);
    let mut h1_conns = h1_conns.into_iter();
    let mut tasks = Vec::new();
    for i in 0..opts.conns {
        let tally = tally.clone();
        let mut h2 = h2_senders.get(i / per_conn).cloned();
        let mut conn = h1_conns.next();
        let (request, uri, target) = (request.clone(), uri.clone(), target.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let mut buf = Vec::with_capacity(4096);
            loop {
                let start = Instant::now();
                if start >= t2 {
                    break;
                }
                let done = match (&mut conn, &mut h2) {
                    (Some(conn), _) => {
                        timeout(STEP_TIMEOUT, get_h1(conn, &request, &mut buf, &target)).await
                    }
                    (None, Some(sender)) => timeout(STEP_TIMEOUT, get_h2(sender, &uri)).await,
                    (None, None) => return,
                };
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return tally.error(e),
                    Err(_) => return tally.error("request timed out"),
                }
                let end = Instant::now();
                if end >= t1 && end < t2 {
                    tally.record(end - start);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(Value::Object(timed_json(opts, "http", &tally, sampler, 0)))
}

/// One HTTP/1.1 GET on a keep-alive connection; the answer must be 200 with the body.
/// When the server ends the connection after this answer (`Connection: close`, as nginx
/// does every `keepalive_requests`), a new one replaces it, as any HTTP client would.
async fn get_h1(
    conn: &mut Conn,
    request: &str,
    buf: &mut Vec<u8>,
    target: &Target,
) -> io::Result<()> {
    if get_h1_once(conn, request, buf).await? {
        *conn = target.connect_plain_or_tls().await?;
    }
    Ok(())
}

/// One GET and its answer; true when the answer said `Connection: close`.
async fn get_h1_once(conn: &mut Conn, request: &str, buf: &mut Vec<u8>) -> io::Result<bool> {
    conn.write_all(request.as_bytes()).await?;
    let end = ws::read_head(conn, buf).await?;
    if !buf.starts_with(b"HTTP/1.1 200") {
        let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
        return Err(io::Error::other(format!(
            "answered {}",
            String::from_utf8_lossy(line)
        )));
    }
    let len: usize = ws::header(&buf[..end], "content-length")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("no Content-Length"))?;
    let mut chunk = [0u8; 4096];
    while buf.len() < end + len {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::other("closed inside a body"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf[end..end + len] != *ws::PLAIN_BODY {
        return Err(io::Error::other("wrong body"));
    }
    let closes =
        ws::header(&buf[..end], "connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
    buf.drain(..end + len);
    Ok(closes)
}

/// One GET on a new HTTP/2 stream.
async fn get_h2(sender: &mut H2Sender, uri: &str) -> io::Result<()> {
    use http_body_util::BodyExt as _;
    let req = http::Request::get(uri)
        .version(http::Version::HTTP_2)
        .body(Empty::<Bytes>::new())
        .map_err(io::Error::other)?;
    sender.ready().await.map_err(io::Error::other)?;
    let response = sender.send_request(req).await.map_err(io::Error::other)?;
    if response.status() != http::StatusCode::OK {
        return Err(io::Error::other(format!("answered {}", response.status())));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes();
    if body.as_ref() != ws::PLAIN_BODY {
        return Err(io::Error::other("wrong body"));
    }
    Ok(())
}

async fn echo(opts: &Opts, target: &Target) -> anyhow::Result<Value> {
    let conns = connect_all(opts, target).await?;
    let tally = Tally::new();
    let t0 = Instant::now();
    let (t1, t2) = (t0 + opts.warmup, t0 + opts.warmup + opts.duration);
    let sampler = Sampler::start(opts.watch.clone(), t1, t2);
    let (opcode, data) = match opts.text {
        Some(kind) => (ws::OP_TEXT, text_payload(kind, opts.size)),
        None => (ws::OP_BINARY, payload(opts.size)),
    };
    let msg = Rc::new(ws::client_frame(opcode, &data));
    let data = Rc::new(data);
    let mut tasks = Vec::new();
    for (mut conn, mut reader) in conns {
        let (tally, msg, data) = (tally.clone(), msg.clone(), data.clone());
        tasks.push(tokio::task::spawn_local(async move {
            loop {
                let start = Instant::now();
                if start >= t2 {
                    break;
                }
                match timeout(
                    STEP_TIMEOUT,
                    round_trip(&mut conn, &mut reader, &msg, &data),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return tally.error(e),
                    Err(_) => return tally.error("round trip timed out"),
                }
                let end = Instant::now();
                if end >= t1 && end < t2 {
                    tally.record(end - start);
                }
            }
            close(&mut conn, &mut reader).await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(Value::Object(timed_json(opts, "echo", &tally, sampler, 0)))
}

/// Payload of a paced message: intended send time (ns after t0), then filler.
const PACED_MIN_SIZE: usize = 8;

async fn paced(opts: &Opts, target: &Target) -> anyhow::Result<Value> {
    if target.tls.is_some() {
        bail!("paced mode drives plain ws:// only");
    }
    if opts.rate == 0 || opts.conns == 0 {
        bail!("--rate and --conns must be more than zero");
    }
    let size = opts.size.max(PACED_MIN_SIZE);
    let conns = connect_all(opts, target).await?;
    // Writes come from the pacer thread (a clone of the socket), reads from this thread.
    let mut writers = Vec::with_capacity(conns.len());
    let mut readers = Vec::with_capacity(conns.len());
    for (conn, reader) in conns {
        let Conn::Plain(tcp) = conn else {
            unreachable!("plain only")
        };
        let std_tcp = tcp.into_std()?;
        writers.push(std_tcp.try_clone()?);
        readers.push((TcpStream::from_std(std_tcp)?, reader));
    }
    let tally = Tally::new();
    let received = Rc::new(Cell::new(0u64));
    let t0 = Instant::now();
    let (t1, t2) = (t0 + opts.warmup, t0 + opts.warmup + opts.duration);
    let sampler = Sampler::start(opts.watch.clone(), t1, t2);
    let w_start = (t1 - t0).as_nanos() as u64;
    let w_end = (t2 - t0).as_nanos() as u64;

    let sent = Arc::new(AtomicU64::new(0));
    let pacer_done = Arc::new(AtomicBool::new(false));
    let pacer = {
        let (sent, done, rate) = (sent.clone(), pacer_done.clone(), opts.rate);
        thread::spawn(move || pace(writers, size, rate, t0, t2, &sent, &done))
    };

    let mut tasks = Vec::new();
    for (mut stream, mut reader) in readers {
        let (tally, received) = (tally.clone(), received.clone());
        tasks.push(tokio::task::spawn_local(async move {
            loop {
                let frame = match reader.read_frame(&mut stream).await {
                    Ok(frame) => frame,
                    Err(e) => return tally.error(e),
                };
                let now = Instant::now();
                let p = reader.payload(&frame);
                if frame.opcode != ws::OP_BINARY || p.len() != size {
                    return tally.error(format!("bad echo of {} bytes", p.len()));
                }
                let due = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
                received.set(received.get() + 1);
                if due >= w_start && due < w_end {
                    let due_at = t0 + Duration::from_nanos(due);
                    tally.record(now.saturating_duration_since(due_at));
                }
            }
        }));
    }
    // Wait for the pacer, then for the last answers (bounded).
    let drain_deadline = t2 + PACED_DRAIN;
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let done = pacer_done.load(Ordering::Acquire);
        if done && received.get() >= sent.load(Ordering::Acquire) {
            break;
        }
        if Instant::now() > drain_deadline {
            break;
        }
    }
    for task in &tasks {
        task.abort();
    }
    let pace_errors = pacer.join().expect("pacer thread");
    let total_sent = sent.load(Ordering::Acquire);
    let lost = total_sent.saturating_sub(received.get());
    let mut m = timed_json(opts, "paced", &tally, sampler, pace_errors);
    m.insert("size".into(), size.into());
    m.insert("rate".into(), opts.rate.into());
    m.insert("sent".into(), total_sent.into());
    m.insert("lost".into(), lost.into());
    Ok(Value::Object(m))
}

/// The pacer: message k goes out at t0 + k/rate on connection k mod N. Returns write errors.
fn pace(
    mut writers: Vec<std::net::TcpStream>,
    size: usize,
    rate: u64,
    t0: Instant,
    t2: Instant,
    sent: &AtomicU64,
    done: &AtomicBool,
) -> u64 {
    sys::precise_timers();
    let filler = payload(size);
    let mut frame = Vec::with_capacity(size + 14);
    let mut errors = 0;
    let mut k: u64 = 0;
    let n = writers.len() as u64;
    loop {
        let due_ns = k * 1_000_000_000 / rate;
        let due = t0 + Duration::from_nanos(due_ns);
        if due >= t2 {
            break;
        }
        sleep_until(due);
        let mut body = filler.clone();
        body[..8].copy_from_slice(&due_ns.to_le_bytes());
        frame.clear();
        ws::put_head(
            &mut frame,
            true,
            ws::OP_BINARY,
            size as u64,
            Some(ws::CLIENT_MASK),
        );
        let at = frame.len();
        frame.extend_from_slice(&body);
        ws::apply_mask(&mut frame[at..], ws::CLIENT_MASK, 0);
        if write_fully(&mut writers[(k % n) as usize], &frame, t2 + PACED_DRAIN).is_err() {
            errors += 1;
        } else {
            sent.fetch_add(1, Ordering::Release);
        }
        k += 1;
    }
    done.store(true, Ordering::Release);
    errors
}

/// Writes all of `buf` to a non-blocking socket, waiting out a full send buffer (a stalled
/// proxy) until `deadline`.
fn write_fully(s: &mut std::net::TcpStream, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(e);
                }
                thread::sleep(Duration::from_micros(20));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn handshake(opts: &Opts, target: &Target) -> anyhow::Result<Value> {
    let target = Rc::new(target.fresh(None));
    let tally = Tally::new();
    let t0 = Instant::now();
    let (t1, t2) = (t0 + opts.warmup, t0 + opts.warmup + opts.duration);
    let sampler = Sampler::start(opts.watch.clone(), t1, t2);
    let data = Rc::new(payload(opts.size));
    let msg = Rc::new(ws::client_frame(ws::OP_BINARY, &data));
    let mut tasks = Vec::new();
    for _ in 0..opts.conns {
        let (tally, target, msg, data) = (tally.clone(), target.clone(), msg.clone(), data.clone());
        tasks.push(tokio::task::spawn_local(async move {
            loop {
                let start = Instant::now();
                if start >= t2 {
                    break;
                }
                let cycle = async {
                    let (mut conn, mut reader) = target.connect(data.len() + 64).await?;
                    round_trip(&mut conn, &mut reader, &msg, &data).await?;
                    close(&mut conn, &mut reader).await;
                    io::Result::Ok(())
                };
                let result = timeout(STEP_TIMEOUT, cycle).await;
                let end = Instant::now();
                match result {
                    Ok(Ok(())) => {
                        if end >= t1 && end < t2 {
                            tally.record(end - start);
                        }
                    }
                    Ok(Err(e)) => {
                        tally.error(e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(_) => tally.error("handshake cycle timed out"),
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(Value::Object(timed_json(
        opts,
        "handshake",
        &tally,
        sampler,
        0,
    )))
}

async fn idle(opts: &Opts, target: &Target) -> anyhow::Result<Value> {
    let data = payload(opts.size);
    let msg = ws::client_frame(ws::OP_BINARY, &data);
    // Warm-up: first-use allocations (TLS contexts, pools, metric series) are not per connection.
    for _ in 0..opts.warmup_conns {
        let (mut conn, mut reader) = target.connect_timeout(opts.size + 64).await?;
        round_trip(&mut conn, &mut reader, &msg, &data).await?;
        close(&mut conn, &mut reader).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = sys::sample(&opts.watch);

    let started = Instant::now();
    let (target_rc, msg, data) = (Rc::new(target.fresh(None)), Rc::new(msg), Rc::new(data));
    let (held, tally) = open_held(opts, &target_rc, &msg, &data).await;
    let connect_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(opts.settle).await;
    let after = sys::sample(&opts.watch);
    let opened = held.borrow().len();

    let mut m = base_json(opts, "idle");
    m.insert("opened".into(), opened.into());
    m.insert("connect_s".into(), connect_s.into());
    m.insert("open_latency_us".into(), tally.latency_json());
    m.insert("errors".into(), tally.errors.get().into());
    m.insert("error_samples".into(), json!(*tally.error_samples.borrow()));
    if !opts.watch.is_empty() {
        let growth = after.rss_kib as f64 - before.rss_kib as f64;
        m.insert(
            "watched".into(),
            json!({
                "pids": opts.watch,
                "rss_kib_before": before.rss_kib,
                "rss_kib_after": after.rss_kib,
                "rss_growth_kib_per_conn": if opened > 0 { Value::from(growth / opened as f64) } else { Value::Null },
            }),
        );
    } else {
        m.insert("watched".into(), Value::Null);
    }
    // Dropping the connections closes them; the proxy is restarted before its next idle run.
    held.borrow_mut().clear();
    Ok(Value::Object(m))
}

/// Opens `--conns` WebSockets, `--connect-concurrency` at a time, each upgraded and used for
/// one echo within [`STEP_TIMEOUT`]: the ones that opened, and the open latencies and errors.
async fn open_held(
    opts: &Opts,
    target: &Rc<Target>,
    msg: &Rc<Vec<u8>>,
    data: &Rc<Vec<u8>>,
) -> (Rc<RefCell<Vec<(Conn, FrameReader)>>>, Rc<Tally>) {
    let held: Rc<RefCell<Vec<(Conn, FrameReader)>>> =
        Rc::new(RefCell::new(Vec::with_capacity(opts.conns)));
    let tally = Tally::new();
    let next = Rc::new(Cell::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..opts.connect_concurrency.max(1) {
        let (held, tally, next, target, msg, data) = (
            held.clone(),
            tally.clone(),
            next.clone(),
            target.clone(),
            msg.clone(),
            data.clone(),
        );
        let total = opts.conns;
        tasks.push(tokio::task::spawn_local(async move {
            while next.get() < total {
                next.set(next.get() + 1);
                let t = Instant::now();
                let opened = async {
                    let (mut conn, mut reader) = target.connect(data.len() + 64).await?;
                    round_trip(&mut conn, &mut reader, &msg, &data).await?;
                    io::Result::Ok((conn, reader))
                };
                match timeout(STEP_TIMEOUT, opened).await {
                    Ok(Ok(pair)) => {
                        tally.record(t.elapsed());
                        held.borrow_mut().push(pair);
                    }
                    Ok(Err(e)) => tally.error(e),
                    Err(_) => tally.error("open timed out"),
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    (held, tally)
}

/// How long the storm client waits, once ready, for the harness's `restart` line.
const RESTART_WAIT: Duration = Duration::from_secs(60);

/// How often the storm's sampler reads the watched processes (RSS peak, CPU at the end).
const STORM_SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// What the storm's clients saw, shared by their tasks.
struct StormTally {
    /// How the held connections ended: `close 1014`, `EOF`, `reset`, ...
    ended: RefCell<std::collections::BTreeMap<String, u64>>,
    /// Failed reconnect attempts by kind: `502`, `reset`, `timeout`, ...
    failures: RefCell<std::collections::BTreeMap<String, u64>>,
    failure_samples: RefCell<Vec<String>>,
    attempts: Cell<u64>,
    /// Time from the restart until each held connection ended, and until each client was
    /// back (connected, upgraded, echoed).
    ended_after: RefCell<Histogram<u64>>,
    back_after: RefCell<Histogram<u64>>,
    /// Clients that never got their connection ended, or never got back, before the deadline.
    not_ended: Cell<u64>,
    gave_up: Cell<u64>,
}

impl StormTally {
    fn new() -> Rc<StormTally> {
        let hist = || {
            RefCell::new(
                Histogram::new_with_bounds(1_000, MAX_LATENCY_NS, 3).expect("valid bounds"),
            )
        };
        Rc::new(StormTally {
            ended: RefCell::default(),
            failures: RefCell::default(),
            failure_samples: RefCell::default(),
            attempts: Cell::new(0),
            ended_after: hist(),
            back_after: hist(),
            not_ended: Cell::new(0),
            gave_up: Cell::new(0),
        })
    }

    fn failed(&self, kind: String, e: impl std::fmt::Display) {
        *self.failures.borrow_mut().entry(kind).or_default() += 1;
        let mut samples = self.failure_samples.borrow_mut();
        if samples.len() < 5 {
            samples.push(e.to_string());
        }
    }

    fn since(hist: &RefCell<Histogram<u64>>, d: Duration) {
        let ns = (d.as_nanos() as u64).clamp(1_000, MAX_LATENCY_NS);
        hist.borrow_mut().saturating_record(ns);
    }
}

/// Seconds of a histogram of nanoseconds: p50, p99, max (and min).
fn seconds_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let s = |ns: u64| ns as f64 / 1e9;
    json!({
        "min": s(h.min()),
        "p50": s(h.value_at_quantile(0.50)),
        "p99": s(h.value_at_quantile(0.99)),
        "max": s(h.max()),
    })
}

/// The kind of a failed reconnect attempt, for counting: the status of a refused upgrade
/// (`502`), or what the socket said.
fn attempt_failure(e: &io::Error) -> String {
    let text = e.to_string();
    if let Some(rest) = text.strip_prefix("upgrade refused: ") {
        if let Some(code) = rest.split_whitespace().nth(1) {
            return code.to_owned();
        }
    }
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "reset".into(),
        io::ErrorKind::BrokenPipe => "broken pipe".into(),
        io::ErrorKind::ConnectionRefused => "connect refused".into(),
        io::ErrorKind::UnexpectedEof => "closed without an answer".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        _ => "other".into(),
    }
}

/// Reads a held connection until the proxy ends it; how it ended. A close frame is answered
/// (best effort) before the connection is dropped, as a browser does.
async fn wait_for_end(conn: &mut Conn, reader: &mut FrameReader) -> String {
    loop {
        match reader.read_frame(conn).await {
            Ok(frame) if frame.opcode == ws::OP_CLOSE => {
                let p = reader.payload(&frame);
                let how = if p.len() >= 2 {
                    format!("close {}", u16::from_be_bytes([p[0], p[1]]))
                } else {
                    "close (no code)".to_owned()
                };
                let reply = ws::client_frame(ws::OP_CLOSE, &1000u16.to_be_bytes());
                let _ = timeout(Duration::from_millis(100), async {
                    conn.write_all(&reply).await?;
                    conn.flush().await
                })
                .await;
                return how;
            }
            // Data on an idle connection: not expected, not an ending.
            Ok(_) => {}
            Err(e) => {
                return match e.kind() {
                    io::ErrorKind::UnexpectedEof => "EOF".into(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
                        "reset".into()
                    }
                    _ => format!("error: {e}"),
                }
            }
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `Instant` on Linux, shared by all processes,
/// so the harness can say when it killed the upstream.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct passed in.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads the stdin line `restart [NS]` (within [`RESTART_WAIT`]); the restart's moment (NS on
/// CLOCK_MONOTONIC, or now).
async fn wait_for_restart() -> anyhow::Result<Instant> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = io::stdin().read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = timeout(RESTART_WAIT, rx)
        .await
        .context("no `restart` line on stdin")?
        .context("stdin closed before a `restart` line")?;
    let mut words = line.split_whitespace();
    if words.next() != Some("restart") {
        bail!("expected `restart [NS]` on stdin, got {line:?}");
    }
    let now = Instant::now();
    Ok(match words.next() {
        Some(ns) => {
            let at: u64 = ns.parse().context("restart NS")?;
            now - Duration::from_nanos(monotonic_ns().saturating_sub(at))
        }
        None => now,
    })
}

/// What the storm's sampler saw.
struct Peaks {
    rss_kib: u64,
    /// The last sample (its CPU time ends the window).
    last: Sample,
    samples: u64,
    /// Per listening port: the most connections seen waiting in its accept queue, and the
    /// queue's size.
    listen: std::collections::BTreeMap<u16, (u32, u32)>,
}

/// Samples the watched processes and the machine's listen queues every
/// [`STORM_SAMPLE_EVERY`] until told to stop.
struct PeakSampler {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Peaks>,
}

impl PeakSampler {
    fn start(pids: Vec<u32>) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            shift_fifo_priority(2);
            let mut peaks = Peaks {
                rss_kib: 0,
                last: Sample::default(),
                samples: 0,
                listen: Default::default(),
            };
            loop {
                let s = sys::sample(&pids);
                peaks.rss_kib = peaks.rss_kib.max(s.rss_kib);
                peaks.last = s;
                peaks.samples += 1;
                for (port, waiting, backlog) in sys::listen_queues().unwrap_or_default() {
                    let e = peaks.listen.entry(port).or_insert((0, backlog));
                    *e = (e.0.max(waiting), backlog);
                }
                if flag.load(Ordering::Acquire) {
                    return peaks;
                }
                thread::sleep(STORM_SAMPLE_EVERY);
            }
        });
        PeakSampler { stop, handle }
    }

    fn finish(self) -> Peaks {
        self.stop.store(true, Ordering::Release);
        self.handle.join().expect("storm sampler")
    }
}

/// Under `--sched fifo` (the harness's default), moves the calling thread's real-time
/// priority by `delta`; nothing otherwise. Threads started later inherit it.
///
/// The storm's client and the upstream share a CPU at the same priority, and such a thread
/// runs until it blocks: a client busy with thousands of reconnects would keep the restarted
/// upstream from even starting. One step below it, the upstream runs whenever it has work.
/// The sampler goes above both, so it reads the accept queues while they are full (a few
/// system calls every 10 ms).
fn shift_fifo_priority(delta: i32) {
    // SAFETY: sched_getscheduler, sched_getparam and sched_setscheduler only read and write
    // the struct passed in, for the calling thread.
    unsafe {
        if libc::sched_getscheduler(0) != libc::SCHED_FIFO {
            return;
        }
        let mut param = libc::sched_param { sched_priority: 0 };
        if libc::sched_getparam(0, &mut param) == 0 {
            param.sched_priority = (param.sched_priority + delta).clamp(1, 49);
            libc::sched_setscheduler(0, libc::SCHED_FIFO, &param);
        }
    }
}

/// The machine's TCP counters that explain a slow reconnect: a full accept queue drops a
/// SYN, and the connect is retried a second later.
const STORM_TCP_COUNTERS: [&str; 3] = ["ListenOverflows", "ListenDrops", "TCPSynRetrans"];

async fn storm(opts: &Opts, target: &Target) -> anyhow::Result<Value> {
    if target.h2.is_some() {
        bail!("storm mode uses HTTP/1.1 upgrades");
    }
    shift_fifo_priority(-1);
    let data = Rc::new(payload(opts.size));
    let msg = Rc::new(ws::client_frame(ws::OP_BINARY, &data));
    let target = Rc::new(target.fresh(None));
    let started = Instant::now();
    let (held, open_tally) = open_held(opts, &target, &msg, &data).await;
    let connect_s = started.elapsed().as_secs_f64();
    let held = std::mem::take(&mut *held.borrow_mut());
    let opened = held.len();
    if opened == 0 {
        bail!(
            "no connection opened: {}",
            open_tally.error_samples.borrow().join("; ")
        );
    }
    tokio::time::sleep(opts.settle).await;

    // The window starts here, just before the harness is told to restart the upstream.
    let sampler = PeakSampler::start(opts.watch.clone());
    let before = sys::sample(&opts.watch);
    let tcp_before = sys::tcp_ext(&STORM_TCP_COUNTERS);
    let window_start = Instant::now();
    {
        let mut out = io::stdout().lock();
        writeln!(out, "ready {opened}")?;
        out.flush()?;
    }
    let restart = wait_for_restart().await?;
    let deadline = restart + opts.storm_deadline;

    let tally = StormTally::new();
    let mut tasks = Vec::with_capacity(opened);
    for (mut conn, mut reader) in held {
        let (tally, target, msg, data) = (tally.clone(), target.clone(), msg.clone(), data.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let Ok(how) =
                tokio::time::timeout_at(deadline.into(), wait_for_end(&mut conn, &mut reader))
                    .await
            else {
                tally.not_ended.set(tally.not_ended.get() + 1);
                return None;
            };
            StormTally::since(&tally.ended_after, restart.elapsed());
            *tally.ended.borrow_mut().entry(how).or_default() += 1;
            drop((conn, reader));
            loop {
                let now = Instant::now();
                if now >= deadline {
                    tally.gave_up.set(tally.gave_up.get() + 1);
                    return None;
                }
                tally.attempts.set(tally.attempts.get() + 1);
                let attempt = async {
                    let (mut conn, mut reader) = target.connect(data.len() + 64).await?;
                    round_trip(&mut conn, &mut reader, &msg, &data).await?;
                    io::Result::Ok((conn, reader))
                };
                match timeout(STEP_TIMEOUT.min(deadline - now), attempt).await {
                    Ok(Ok(pair)) => {
                        StormTally::since(&tally.back_after, restart.elapsed());
                        return Some(pair);
                    }
                    Ok(Err(e)) => tally.failed(attempt_failure(&e), e),
                    Err(_) => tally.failed("timeout".into(), "attempt timed out"),
                }
            }
        }));
    }
    // Every client back (or given up): the window ends. The connections stay open until
    // the sample is taken.
    let mut back = Vec::with_capacity(opened);
    for task in tasks {
        if let Ok(Some(pair)) = task.await {
            back.push(pair);
        }
    }
    let window = window_start.elapsed();
    let peaks = sampler.finish();
    let after = peaks.last;
    let tcp_after = sys::tcp_ext(&STORM_TCP_COUNTERS);
    let reconnected = back.len();
    drop(back);

    let back_after = tally.back_after.borrow();
    let all_back_s = (reconnected == opened).then(|| back_after.max() as f64 / 1e9);
    let failed: u64 = tally.failures.borrow().values().sum();
    let mut m = base_json(opts, "storm");
    m.insert("opened".into(), opened.into());
    m.insert("connect_s".into(), connect_s.into());
    m.insert("open_errors".into(), open_tally.errors.get().into());
    m.insert("reconnected".into(), reconnected.into());
    m.insert("all_reconnected_s".into(), all_back_s.into());
    m.insert("reconnect_s".into(), seconds_json(&back_after));
    m.insert("ended_s".into(), seconds_json(&tally.ended_after.borrow()));
    m.insert("ended".into(), json!(*tally.ended.borrow()));
    m.insert("not_ended".into(), tally.not_ended.get().into());
    m.insert("gave_up".into(), tally.gave_up.get().into());
    m.insert("attempts".into(), tally.attempts.get().into());
    m.insert("failed_attempts".into(), failed.into());
    m.insert("failures".into(), json!(*tally.failures.borrow()));
    m.insert(
        "failure_samples".into(),
        json!(*tally.failure_samples.borrow()),
    );
    // Machine-wide, but nothing else on this loopback is busy during the storm.
    let tcp: serde_json::Map<String, Value> = STORM_TCP_COUNTERS
        .iter()
        .zip(tcp_after.iter().zip(&tcp_before))
        .map(|(name, (a, b))| ((*name).to_owned(), a.saturating_sub(*b).into()))
        .collect();
    m.insert("tcp".into(), Value::Object(tcp));
    // Accept queues that were ever not empty: which listener overflowed.
    let listen: serde_json::Map<String, Value> = peaks
        .listen
        .iter()
        .filter(|(_, (peak, _))| *peak > 0)
        .map(|(port, (peak, backlog))| {
            (
                port.to_string(),
                json!({"peak_waiting": peak, "backlog": backlog}),
            )
        })
        .collect();
    m.insert("listen_queues".into(), Value::Object(listen));
    m.insert(
        "storm_deadline_s".into(),
        opts.storm_deadline.as_secs_f64().into(),
    );
    // Problems of the run itself (not the storm's refusals, which are what is measured).
    let errors = open_tally.errors.get() + tally.not_ended.get() + tally.gave_up.get();
    let mut samples = open_tally.error_samples.borrow().clone();
    if tally.not_ended.get() > 0 {
        samples.push(format!(
            "{} held connections were not ended by the proxy within {:?} of the restart",
            tally.not_ended.get(),
            opts.storm_deadline
        ));
    }
    if tally.gave_up.get() > 0 {
        samples.push(format!(
            "{} clients were not back within {:?} of the restart",
            tally.gave_up.get(),
            opts.storm_deadline
        ));
    }
    m.insert("errors".into(), errors.into());
    m.insert("error_samples".into(), json!(samples));
    if opts.watch.is_empty() {
        m.insert("watched".into(), Value::Null);
    } else {
        let tck = sys::clk_tck() as f64;
        m.insert(
            "watched".into(),
            json!({
                "pids": opts.watch,
                "window_s": window.as_secs_f64(),
                "cpu_s": after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / tck,
                "cpu_user_s": after.user_ticks.saturating_sub(before.user_ticks) as f64 / tck,
                "rss_kib_before": before.rss_kib,
                "rss_kib_peak": peaks.rss_kib.max(before.rss_kib),
                "rss_kib_after": after.rss_kib,
                "rss_samples": peaks.samples,
            }),
        );
    }
    Ok(Value::Object(m))
}
