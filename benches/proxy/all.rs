//! `all`: the whole benchmark in one run. Starts the echo upstream, writes the configs of
//! wsgate, nginx and HAProxy (benches/peers/), starts each proxy pinned to the proxy CPU and
//! runs every workload against direct / wsgate / nginx / HAProxy with the load client pinned
//! to the other CPU (next to the upstream). Then prints the table and writes results.json and
//! ratios.svg (see `report`).
//!
//! The reconnect storm (`storm`, `storm-tls`) is driven from here: the load client holds its
//! connections through a fresh proxy and says `ready`; the harness then kills the upstream
//! (every upstream connection is lost at once), tells the client, starts the upstream again
//! on the same ports and, once the client reports, adds what the new upstream counted.

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::{json, Value};

use crate::load::monotonic_ns;
use crate::report::{self, RunResults, WorkloadResult};
use crate::sys;
use crate::tokens::{self, JwtAlg, TokenFiles};

const NGINX_TEMPLATE: &str = include_str!("../peers/nginx.conf");
const HAPROXY_TEMPLATE: &str = include_str!("../peers/haproxy.cfg");
const WSGATE_TEMPLATE: &str = include_str!("../peers/wsgate.toml");

/// How long a proxy or the upstream may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopped process gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A load run may overrun its planned time by this much before it is killed.
const LOAD_SLACK: Duration = Duration::from_secs(60);

/// Connections of the closed-loop and paced workloads (the targets' 64).
const ECHO_CONNS: usize = 64;

/// Concurrent handshakers (the targets' 16).
const HANDSHAKE_WORKERS: usize = 16;

/// Paced rate over all connections (the targets' 10,000 msgs/s).
const PACED_RATE: u64 = 10_000;

/// Descriptors a proxy needs beyond two per storm connection: listeners, logs, and the
/// connections still closing while their clients are already back.
const STORM_FD_SPARE: usize = 1000;

/// Most storm connections the harness asks for: the peers' configs (benches/peers/) hold a
/// little more: HAProxy's `maxconn 9900`, nginx's `worker_connections 20480` 9,599
/// WebSockets (it closes waiting connections once fewer than 1/16 of them are free).
const STORM_PEER_MAX: usize = 9500;

/// How long the storm's clients keep trying after the restart (the load client's
/// `--storm-deadline`).
const STORM_DEADLINE: Duration = Duration::from_secs(60);

/// How long the storm client may take to open its connections and say `ready`.
const STORM_OPEN_LIMIT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Measured time of each throughput and latency workload.
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Measured time of each handshake workload.
    #[arg(long, value_parser = crate::parse_duration, default_value = "5s")]
    handshake_duration: Duration,
    /// Unmeasured warm-up before each measured window.
    #[arg(long, value_parser = crate::parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Idle connections held open in the memory workloads.
    #[arg(long, default_value_t = 5000)]
    idle_conns: usize,
    /// Connections held, then reconnected, in the reconnect storm (fewer when the open-file
    /// limit cannot hold them in the proxy: two descriptors each, plus spare).
    #[arg(long, default_value_t = 10_000)]
    storm_conns: usize,
    /// Smoke test: 2 s per workload, 1 s of handshakes, 0.5 s warm-ups, 2,000 idle and storm
    /// connections.
    #[arg(long)]
    quick: bool,
    /// Leave out a target: direct, wsgate, nginx or haproxy (repeatable).
    #[arg(long)]
    skip: Vec<String>,
    /// Run only these workloads (comma-separated ids: echo32, echo16k, text32, text16k,
    /// text16k-mixed, h2echo32-streams, h2echo32-conns, h2echo16k-streams, echo256k, http,
    /// http-h2, paced, handshake, handshake-tls, handshake-jwt-rs256, handshake-jwt-es256,
    /// idle, idle-tls, idle-jwt, storm, storm-tls). Default: all. The JWT ones run against
    /// wsgate only; the storms restart the upstream.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// The wsgate binary (default: target/release/wsgate).
    #[arg(long)]
    wsgate: Option<PathBuf>,
    /// Output folder (default: target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run nothing: print the table (with this build's target checks) and write ratios.svg
    /// again from a results.json an earlier run wrote.
    #[arg(long, value_name = "RESULTS_JSON")]
    report: Option<PathBuf>,
    /// CPU for the proxy under test.
    #[arg(long, default_value_t = 0)]
    proxy_cpu: usize,
    /// CPU for the load client and the echo upstream.
    #[arg(long, default_value_t = 1)]
    load_cpu: usize,
    /// How the processes the harness starts (proxies, upstream, load client) are scheduled:
    /// `fifo` (SCHED_FIFO priority 10: the measurement is not interrupted by the machine's
    /// other work, which gets the kernel's 5% real-time leftover while a workload runs),
    /// `nice` (nice -10: gentler on a shared machine, noisier throughput and latency) or
    /// `normal`. It changes nothing between the proxies. Needs root; ignored otherwise.
    #[arg(long, value_enum, default_value = "fifo")]
    sched: Sched,
    /// Run each throughput, latency and handshake workload this many times, the targets in
    /// a different order each round, and report each target's median round (by proxy CPU
    /// per operation; by p99 for the paced workload): a stall of the machine that hits one
    /// target in one round then moves no verdict. Idle workloads run once. Default: 3, or
    /// 1 with --quick.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=9))]
    rounds: Option<u32>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Sched {
    Normal = 0,
    Nice = 1,
    Fifo = 2,
}

/// Real-time priority for `--sched fifo`: above every normal process, below the kernel's
/// own real-time threads (50 and up).
const FIFO_PRIORITY: i32 = 10;

/// Nice value for `--sched nice`.
const NICE_VALUE: i32 = -10;

/// The `--sched` choice; set once by [`set_sched`], read between fork and exec (and by the
/// in-process load of `slowloris`).
static SCHED: AtomicI32 = AtomicI32::new(0);

/// Sets the `--sched` choice for every process started from now on (and for
/// [`apply_sched`]); says so when it slows the rest of the machine down.
pub(crate) fn set_sched(sched: Sched) {
    SCHED.store(sched as i32, Ordering::Relaxed);
    if sched == Sched::Fifo {
        eprintln!(
            "measured processes run at SCHED_FIFO {FIFO_PRIORITY}: other work on this machine \
             slows down while a workload runs (--sched nice to be gentler)"
        );
    }
}

/// In a child between fork and exec, or in the harness itself for its in-process load: apply
/// [`SCHED`] to the calling thread (failure, e.g. without root, is ignored: the run is then
/// only noisier).
pub(crate) fn apply_sched() {
    let sched = SCHED.load(Ordering::Relaxed);
    // SAFETY: setpriority and sched_setscheduler are async-signal-safe system calls.
    unsafe {
        if sched == Sched::Nice as i32 {
            libc::setpriority(libc::PRIO_PROCESS, 0, NICE_VALUE);
        } else if sched == Sched::Fifo as i32 {
            let param = libc::sched_param {
                sched_priority: FIFO_PRIORITY,
            };
            libc::sched_setscheduler(0, libc::SCHED_FIFO, &param);
        }
    }
}

/// One workload of the run.
#[derive(Debug, Clone)]
pub struct Workload {
    pub id: &'static str,
    pub title: &'static str,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `text`: text messages of this kind (`load --text`), UTF-8 checked by wsgate,
    /// instead of binary ones.
    ///
    /// `h2`: WebSockets over HTTP/2 (h2c), this many streams per connection.
    Echo {
        size: usize,
        text: Option<&'static str>,
        h2: Option<usize>,
    },
    /// Plain HTTP GETs of a small body, closed loop per connection (HTTP/1.1 keep-alive);
    /// `h2`: over HTTP/2 (h2c), this many concurrent streams per connection.
    Http {
        h2: Option<usize>,
    },
    Paced,
    /// `jwt`: through a route with `[routes.X.auth] jwt`, each upgrade carrying a bearer
    /// token signed with this algorithm (wsgate only: the peers verify no JWTs).
    Handshake {
        tls: bool,
        jwt: Option<JwtAlg>,
    },
    Idle {
        tls: bool,
        jwt: Option<JwtAlg>,
    },
    /// Reconnect storm: N idle WebSockets, the upstream restarted, every client back at once.
    Storm {
        tls: bool,
    },
}

impl Kind {
    /// The algorithm of the bearer tokens a JWT workload sends.
    pub fn jwt(self) -> Option<JwtAlg> {
        match self {
            Kind::Handshake { jwt, .. } | Kind::Idle { jwt, .. } => jwt,
            _ => None,
        }
    }
}

fn workloads() -> Vec<Workload> {
    vec![
        Workload {
            id: "echo32-1",
            title: "32 B echo, 64 conns (run 1)",
            kind: Kind::Echo {
                size: 32,
                text: None,
                h2: None,
            },
        },
        Workload {
            id: "echo16k",
            title: "16 KiB echo, 64 conns",
            kind: Kind::Echo {
                size: 16 * 1024,
                text: None,
                h2: None,
            },
        },
        Workload {
            id: "text32",
            title: "32 B text (JSON) echo, 64 conns",
            kind: Kind::Echo {
                size: 32,
                text: Some("json"),
                h2: None,
            },
        },
        Workload {
            id: "text16k",
            title: "16 KiB text (JSON) echo, 64 conns",
            kind: Kind::Echo {
                size: 16 * 1024,
                text: Some("json"),
                h2: None,
            },
        },
        Workload {
            id: "text16k-mixed",
            title: "16 KiB text (1 in 10 chars multi-byte) echo, 64 conns",
            kind: Kind::Echo {
                size: 16 * 1024,
                text: Some("mixed"),
                h2: None,
            },
        },
        Workload {
            id: "h2echo32-streams",
            title: "32 B echo over HTTP/2, 64 streams on 8 conns",
            kind: Kind::Echo {
                size: 32,
                text: None,
                h2: Some(8),
            },
        },
        Workload {
            id: "h2echo32-conns",
            title: "32 B echo over HTTP/2, 64 conns of one stream",
            kind: Kind::Echo {
                size: 32,
                text: None,
                h2: Some(1),
            },
        },
        Workload {
            id: "h2echo16k-streams",
            title: "16 KiB echo over HTTP/2, 64 streams on 8 conns",
            kind: Kind::Echo {
                size: 16 * 1024,
                text: None,
                h2: Some(8),
            },
        },
        Workload {
            id: "echo256k",
            title: "256 KiB echo, 64 conns",
            kind: Kind::Echo {
                size: 256 * 1024,
                text: None,
                h2: None,
            },
        },
        Workload {
            id: "http",
            title: "plain HTTP GET, 64 keep-alive conns",
            kind: Kind::Http { h2: None },
        },
        Workload {
            id: "http-h2",
            title: "plain HTTP GET over HTTP/2, 64 streams on 8 conns",
            kind: Kind::Http { h2: Some(8) },
        },
        Workload {
            id: "paced",
            title: "paced 10k msgs/s, 64 conns",
            kind: Kind::Paced,
        },
        Workload {
            id: "echo32-2",
            title: "32 B echo, 64 conns (run 2)",
            kind: Kind::Echo {
                size: 32,
                text: None,
                h2: None,
            },
        },
        Workload {
            id: "handshake",
            title: "handshakes, 16 concurrent (ws)",
            kind: Kind::Handshake {
                tls: false,
                jwt: None,
            },
        },
        Workload {
            id: "handshake-tls",
            title: "handshakes, 16 concurrent (wss)",
            kind: Kind::Handshake {
                tls: true,
                jwt: None,
            },
        },
        Workload {
            id: "handshake-jwt-rs256",
            title: "handshakes, 16 concurrent (ws, JWT RS256)",
            kind: Kind::Handshake {
                tls: false,
                jwt: Some(JwtAlg::Rs256),
            },
        },
        Workload {
            id: "handshake-jwt-es256",
            title: "handshakes, 16 concurrent (ws, JWT ES256)",
            kind: Kind::Handshake {
                tls: false,
                jwt: Some(JwtAlg::Es256),
            },
        },
        Workload {
            id: "idle",
            title: "idle connections (ws)",
            kind: Kind::Idle {
                tls: false,
                jwt: None,
            },
        },
        Workload {
            id: "idle-tls",
            title: "idle connections (wss)",
            kind: Kind::Idle {
                tls: true,
                jwt: None,
            },
        },
        Workload {
            id: "idle-jwt",
            title: "idle connections (ws, JWT ES256)",
            kind: Kind::Idle {
                tls: false,
                jwt: Some(JwtAlg::Es256),
            },
        },
        // Last: they restart the upstream.
        Workload {
            id: "storm",
            title: "reconnect storm (ws)",
            kind: Kind::Storm { tls: false },
        },
        Workload {
            id: "storm-tls",
            title: "reconnect storm (wss)",
            kind: Kind::Storm { tls: true },
        },
    ]
}

/// Process groups the harness started, killed from the signal handler on Ctrl-C.
static GROUPS: [AtomicI32; 16] = [const { AtomicI32::new(0) }; 16];

extern "C" fn on_signal(_: libc::c_int) {
    for g in &GROUPS {
        let pgid = g.load(Ordering::Relaxed);
        if pgid > 0 {
            // SAFETY: kill is async-signal-safe.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(130) }
}

pub(crate) fn install_signal_handlers() {
    // SAFETY: the handler only calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// A started process in its own process group (so nginx's worker goes with its master).
pub(crate) struct Proc {
    name: String,
    child: Child,
    slot: Option<usize>,
    /// Killed and waited for ([`Proc::reap`]): nothing left to stop.
    reaped: bool,
}

impl Proc {
    /// Starts `program args` pinned to `cpu` with `taskset`, output to `log`.
    pub(crate) fn spawn(
        name: &str,
        cpu: usize,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> anyhow::Result<Proc> {
        let out = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new("taskset");
        cmd.arg("-c")
            .arg(cpu.to_string())
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                apply_sched();
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {name} ({})", program.display()))?;
        let slot = GROUPS.iter().position(|g| {
            g.compare_exchange(0, child.id() as i32, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        Ok(Proc {
            name: name.to_owned(),
            child,
            slot,
            reaped: false,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its direct children (nginx: master and worker).
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid()];
        pids.extend(sys::children(self.pid()));
        pids
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits until `port` accepts connections (and, with `workers`, until the process has a
    /// child). Errors if the process exits first or the time runs out.
    pub(crate) fn wait_ready(
        &mut self,
        port: u16,
        workers: bool,
        log: &Path,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.exited() {
                bail!(
                    "{} exited at start-up: {}",
                    self.name,
                    last_lines(log, 5).trim()
                );
            }
            let up = TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                Duration::from_millis(200),
            )
            .is_ok();
            if up && (!workers || !sys::children(self.pid()).is_empty()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {port} within {START_TIMEOUT:?}",
                    self.name
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL to the group at once (the process's sockets are closed as it dies); then
    /// [`Proc::reap`].
    fn kill_group(&mut self) {
        // SAFETY: signalling our own child's process group.
        unsafe {
            libc::kill(-(self.pid() as i32), libc::SIGKILL);
        }
    }

    /// Waits for a killed process and forgets it.
    fn reap(&mut self) {
        let _ = self.child.wait();
        if let Some(slot) = self.slot.take() {
            GROUPS[slot].store(0, Ordering::SeqCst);
        }
        self.reaped = true;
    }

    /// SIGTERM to the group, then SIGKILL after [`STOP_GRACE`].
    pub(crate) fn stop(&mut self) {
        if self.reaped {
            return;
        }
        let pgid = self.pid() as i32;
        if !self.exited() {
            // SAFETY: signalling our own child's process group.
            unsafe {
                libc::kill(-pgid, libc::SIGTERM);
            }
            let deadline = Instant::now() + STOP_GRACE;
            while !self.exited() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        // Whatever is left of the group (a worker that outlived its master).
        // SAFETY: as above.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
        if let Some(slot) = self.slot.take() {
            GROUPS[slot].store(0, Ordering::SeqCst);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A free loopback port (bound and released; nothing else here races for ports).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// The files of the generated certificate authority and server certificate.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// Certificate and key in one file, as HAProxy's `crt` wants.
    combined: PathBuf,
}

/// A throw-away CA and an ECDSA P-256 server certificate for `localhost` and 127.0.0.1.
fn make_certs(dir: &Path) -> anyhow::Result<Certs> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "wsgate bench CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let certs = Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        combined: dir.join("cert+key.pem"),
    };
    fs::write(&certs.ca, ca_cert.pem())?;
    fs::write(&certs.cert, cert.pem())?;
    fs::write(&certs.key, key.serialize_pem())?;
    fs::write(
        &certs.combined,
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )?;
    Ok(certs)
}

fn fill(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = template.to_owned();
    for (k, v) in values {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(i) = out.find("{{") {
        let rest: String = out[i..].chars().take(30).collect();
        bail!("template value missing: {rest}");
    }
    Ok(out)
}

/// Finds `name` in PATH or the sbin folders (Debian puts nginx and haproxy in /usr/sbin).
fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// First line of `program args` (stdout or stderr), e.g. a version.
fn first_line(program: &Path, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            let line = String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            // "HAProxy version 2.6.12-1 2023/12/12 - https://haproxy.org/": drop the link.
            line.split(" - ").next().unwrap_or_default().to_owned()
        }
        Err(e) => format!("unknown ({e})"),
    }
}

/// A proxy under test.
struct Peer {
    name: &'static str,
    plain_port: u16,
    tls_port: u16,
    /// Where it serves HTTP/2 with prior knowledge (h2c) and WebSockets over it (RFC 8441),
    /// if it can.
    h2c_port: Option<u16>,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// nginx forks its worker: wait for it and watch it too.
    forks_worker: bool,
    version: String,
    proc: Option<Proc>,
}

impl Peer {
    fn start(&mut self, cpu: usize) -> anyhow::Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
        let mut p = Proc::spawn(self.name, cpu, &self.program, &self.args, &self.log)?;
        p.wait_ready(self.plain_port, self.forks_worker, &self.log)?;
        self.proc = Some(p);
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        self.proc.as_ref().map(Proc::pids).unwrap_or_default()
    }
}

/// Why `target` does not take part in workload `w` (`h2c_port`: where it serves HTTP/2 with
/// prior knowledge, if it does), or `None` when it does.
fn not_driven(w: &Workload, target: &str, h2c_port: Option<u16>) -> Option<String> {
    let h2 = matches!(
        w.kind,
        Kind::Echo { h2: Some(_), .. } | Kind::Http { h2: Some(_) }
    );
    if h2 && h2c_port.is_none() {
        // The echo upstream speaks HTTP/1.1 only.
        return Some(format!("{target} is not driven over HTTP/2"));
    }
    if target == "nginx" && matches!(w.kind, Kind::Echo { h2: Some(_), .. }) {
        return Some("nginx cannot carry WebSockets over HTTP/2 (no RFC 8441)".to_owned());
    }
    if w.kind.jwt().is_some() && target != "wsgate" {
        return Some(match target {
            "direct" => "no proxy, so no token check (wsgate-only workload)".to_owned(),
            "nginx" => "open-source nginx verifies no JWTs (wsgate-only workload)".to_owned(),
            _ => "not set up to verify JWTs here: HAProxy's jwt_verify converter takes a PEM \
                  key, not a JWKS (wsgate-only workload)"
                .to_owned(),
        });
    }
    None
}

/// The options that depend on --quick.
struct Plan {
    duration: Duration,
    handshake_duration: Duration,
    warmup: Duration,
    idle_conns: usize,
    storm_conns: usize,
}

pub fn run(opts: Opts, command_line: String) -> anyhow::Result<()> {
    if let Some(path) = &opts.report {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let known = workloads();
        let run = report::from_json(&json, |id| {
            known
                .iter()
                .find(|w| w.id == id)
                .map(|w| (w.id, w.title, w.kind))
        })
        .with_context(|| format!("{} is not a results.json of this harness", path.display()))?;
        println!("{}", report::markdown(&run));
        let out = opts
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("target/bench"));
        fs::create_dir_all(&out)?;
        fs::write(out.join("ratios.svg"), report::svg(&run))?;
        eprintln!("wrote {}", out.join("ratios.svg").display());
        return Ok(());
    }
    install_signal_handlers();
    crate::ws::self_check()?;
    set_sched(opts.sched);
    let nofile = sys::raise_nofile();
    let plan = if opts.quick {
        Plan {
            duration: Duration::from_secs(2),
            handshake_duration: Duration::from_secs(1),
            warmup: Duration::from_millis(500),
            idle_conns: opts.idle_conns.min(2000),
            storm_conns: opts.storm_conns.min(2000),
        }
    } else {
        Plan {
            duration: opts.duration,
            handshake_duration: opts.handshake_duration,
            warmup: opts.warmup,
            idle_conns: opts.idle_conns,
            storm_conns: opts.storm_conns,
        }
    };
    // A proxied idle connection costs the proxy two descriptors.
    let fd_room = (nofile as usize).saturating_sub(200) / 2;
    let idle_conns = if plan.idle_conns > fd_room {
        eprintln!(
            "open-file limit {nofile}: idle workloads reduced to {fd_room} connections (raise `ulimit -n`)"
        );
        fd_room
    } else {
        plan.idle_conns
    };
    // The storm's proxy holds two descriptors per connection, and during the storm also the
    // ones still closing; the peers' configs hold at most STORM_PEER_MAX.
    let storm_fd_room = (nofile as usize).saturating_sub(STORM_FD_SPARE) / 2;
    let storm_conns = if plan.storm_conns > storm_fd_room.min(STORM_PEER_MAX) {
        let n = storm_fd_room.min(STORM_PEER_MAX);
        let why = if storm_fd_room <= STORM_PEER_MAX {
            format!(
                "the open-file limit is {nofile} and a proxy needs two descriptors per \
                 connection plus {STORM_FD_SPARE} spare (raise `ulimit -Hn`)"
            )
        } else {
            format!("the peers' configs hold {STORM_PEER_MAX} (benches/peers/)")
        };
        eprintln!(
            "reconnect storm: {n} connections, not {}: {why}",
            plan.storm_conns
        );
        n
    } else {
        plan.storm_conns
    };

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench"));
    let logs = out.join("logs");
    fs::create_dir_all(&logs)?;
    let certs = make_certs(&out)?;
    let self_exe = std::env::current_exe()?;

    // The upstream, on the load CPU.
    let up_port = free_port()?;
    let up_tls_port = free_port()?;
    let up = UpstreamSpec {
        exe: self_exe.clone(),
        cpu: opts.load_cpu,
        port: up_port,
        stats_port: free_port()?,
        args: vec![
            "upstream".into(),
            "--port".into(),
            up_port.to_string(),
            "--tls-port".into(),
            up_tls_port.to_string(),
            "--cert".into(),
            certs.cert.display().to_string(),
            "--key".into(),
            certs.key.display().to_string(),
        ],
        log: logs.join("upstream.log"),
    };
    let mut upstream = up.spawn()?;
    upstream.wait_ready(up_port, false, &up.log)?;

    let selected: Vec<Workload> = workloads()
        .into_iter()
        .filter(|w| {
            opts.workloads.is_empty()
                || opts
                    .workloads
                    .iter()
                    .any(|id| id == w.id || (id == "echo32" && w.id.starts_with("echo32")))
        })
        .collect();

    let mut skipped: Vec<(String, String)> = Vec::new();
    let skip = |name: &str| opts.skip.iter().any(|s| s.eq_ignore_ascii_case(name));

    // A signing key and a token per algorithm the JWT workloads use; wsgate gets a route
    // that verifies each. An algorithm whose key cannot be made leaves its workloads
    // unmeasured, with the reason.
    let mut token_files: Vec<TokenFiles> = Vec::new();
    let mut token_problems: Vec<(JwtAlg, String)> = Vec::new();
    for alg in selected.iter().filter_map(|w| w.kind.jwt()) {
        if token_files.iter().any(|f| f.alg == alg) || token_problems.iter().any(|p| p.0 == alg) {
            continue;
        }
        match tokens::make(alg, &out) {
            Ok(files) => token_files.push(files),
            Err(e) => {
                eprintln!("no {} token, its workloads are not run: {e:#}", alg.id());
                token_problems.push((alg, format!("{e:#}")));
            }
        }
    }
    let mut peers: Vec<Peer> = Vec::new();

    // wsgate
    if !skip("wsgate") {
        let bin = opts
            .wsgate
            .clone()
            .unwrap_or_else(|| root.join("target/release/wsgate"));
        if !bin.is_file() {
            bail!(
                "{} not found: build it with `cargo build --release` (benches/run.sh does)",
                bin.display()
            );
        }
        let (plain_port, tls_port, admin_port) = (free_port()?, free_port()?, free_port()?);
        let config = out.join("wsgate.toml");
        fs::write(
            &config,
            fill(
                WSGATE_TEMPLATE,
                &[
                    ("PLAIN_PORT", plain_port.to_string()),
                    ("TLS_PORT", tls_port.to_string()),
                    ("ADMIN_PORT", admin_port.to_string()),
                    ("UPSTREAM_PORT", up_port.to_string()),
                    ("CERT", certs.cert.display().to_string()),
                    ("KEY", certs.key.display().to_string()),
                ],
            )? + &tokens::wsgate_routes(&token_files),
        )?;
        let check = Command::new(&bin)
            .args(["check", "--config"])
            .arg(&config)
            .output()?;
        if !check.status.success() {
            bail!(
                "wsgate check refused the bench config:\n{}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
        peers.push(Peer {
            name: "wsgate",
            plain_port,
            tls_port,
            // The plain listener has `http2 = true`: the preface decides.
            h2c_port: Some(plain_port),
            version: first_line(&bin, &["--version"]),
            args: vec!["--config".into(), config.display().to_string()],
            program: bin,
            log: logs.join("wsgate.log"),
            forks_worker: false,
            proc: None,
        });
    }

    // nginx
    if skip("nginx") {
        skipped.push(("nginx".into(), "--skip nginx".into()));
    } else if let Some(bin) = find_binary("nginx") {
        let (plain_port, tls_port, h2c_port) = (free_port()?, free_port()?, free_port()?);
        let dir = out.join("nginx");
        for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            fs::create_dir_all(dir.join("tmp").join(sub))?;
        }
        let config = dir.join("nginx.conf");
        fs::write(
            &config,
            fill(
                NGINX_TEMPLATE,
                &[
                    ("DIR", dir.display().to_string()),
                    ("PLAIN_PORT", plain_port.to_string()),
                    ("TLS_PORT", tls_port.to_string()),
                    ("H2C_PORT", h2c_port.to_string()),
                    ("UPSTREAM_PORT", up_port.to_string()),
                    ("CERT", certs.cert.display().to_string()),
                    ("KEY", certs.key.display().to_string()),
                ],
            )?,
        )?;
        peers.push(Peer {
            name: "nginx",
            plain_port,
            tls_port,
            // Plain HTTP over h2c only: nginx cannot forward WebSockets over HTTP/2 (no
            // RFC 8441), see `not_driven`.
            h2c_port: Some(h2c_port),
            version: first_line(&bin, &["-v"]),
            args: vec![
                "-g".into(),
                "daemon off; master_process on;".into(),
                "-p".into(),
                dir.display().to_string(),
                "-e".into(),
                dir.join("error.log").display().to_string(),
                "-c".into(),
                config.display().to_string(),
            ],
            program: bin,
            log: logs.join("nginx.log"),
            forks_worker: true,
            proc: None,
        });
    } else {
        skipped.push((
            "nginx".into(),
            "not installed (benches/run.sh installs it with apt-get)".into(),
        ));
    }

    // HAProxy
    if skip("haproxy") {
        skipped.push(("haproxy".into(), "--skip haproxy".into()));
    } else if let Some(bin) = find_binary("haproxy") {
        let (plain_port, tls_port, h2c_port) = (free_port()?, free_port()?, free_port()?);
        let config = out.join("haproxy.cfg");
        fs::write(
            &config,
            fill(
                HAPROXY_TEMPLATE,
                &[
                    ("PLAIN_PORT", plain_port.to_string()),
                    ("TLS_PORT", tls_port.to_string()),
                    ("H2C_PORT", h2c_port.to_string()),
                    ("UPSTREAM_PORT", up_port.to_string()),
                    ("PEM", certs.combined.display().to_string()),
                ],
            )?,
        )?;
        peers.push(Peer {
            name: "haproxy",
            plain_port,
            tls_port,
            h2c_port: Some(h2c_port),
            version: first_line(&bin, &["-v"]),
            args: vec!["-db".into(), "-f".into(), config.display().to_string()],
            program: bin,
            log: logs.join("haproxy.log"),
            forks_worker: false,
            proc: None,
        });
    } else {
        skipped.push((
            "haproxy".into(),
            "not installed (benches/run.sh installs it with apt-get)".into(),
        ));
    }

    // Start them all; a peer that fails to start is skipped with its reason.
    let mut started = Vec::new();
    for mut peer in peers {
        match peer.start(opts.proxy_cpu) {
            Ok(()) => {
                eprintln!(
                    "started {} ({}) pid {:?}",
                    peer.name,
                    peer.version,
                    peer.pids()
                );
                started.push(peer);
            }
            Err(e) if peer.name == "wsgate" => return Err(e),
            Err(e) => {
                eprintln!("skipping {}: {e:#}", peer.name);
                skipped.push((peer.name.to_owned(), format!("{e:#}")));
            }
        }
    }
    let mut peers = started;
    for (name, why) in &skipped {
        eprintln!("skipped {name}: {why}");
    }
    let with_direct = !skip("direct");

    let rounds = opts.rounds.unwrap_or(if opts.quick { 1 } else { 3 }) as usize;
    let rounds_of = |w: &Workload| match w.kind {
        Kind::Idle { .. } | Kind::Storm { .. } => 1,
        _ => rounds,
    };
    // The targets of a workload, in slot order: direct first (when measured), then the
    // peers in start order, each with its h2c port.
    let peer_slots: Vec<(&'static str, Option<u16>)> =
        peers.iter().map(|p| (p.name, p.h2c_port)).collect();
    let slots_of = |w: &Workload| {
        let mut slots = Vec::new();
        if with_direct && !matches!(w.kind, Kind::Idle { .. } | Kind::Storm { .. }) {
            slots.push(("direct", None));
        }
        slots.extend(peer_slots.iter().copied());
        slots
    };
    let runs_total: usize = selected
        .iter()
        .map(|w| {
            rounds_of(w)
                * slots_of(w)
                    .iter()
                    .filter(|(t, h2c)| not_driven(w, t, *h2c).is_none())
                    .count()
        })
        .sum();

    let ctx = LoadCtx {
        self_exe: self_exe.clone(),
        load_cpu: opts.load_cpu,
        ca: certs.ca.clone(),
        plan: &plan,
        idle_conns,
        storm_conns,
        tokens: token_files.clone(),
    };
    let started_at = Instant::now();
    let mut results = Vec::new();
    let mut n = 0;
    for w in &selected {
        let idle = matches!(w.kind, Kind::Idle { .. } | Kind::Storm { .. });
        let slots = slots_of(w);
        let first_peer = usize::from(slots.first().is_some_and(|s| s.0 == "direct"));
        let mut runs: Vec<Vec<Value>> = vec![Vec::new(); slots.len()];
        // Targets this workload cannot drive: one result saying why, printed once.
        let mut driven = vec![true; slots.len()];
        for (slot, (target, h2c_port)) in slots.iter().enumerate() {
            if let Some(why) = not_driven(w, target, *h2c_port) {
                eprintln!("        {:<34} {target:<8} skipped: {why}", w.title);
                runs[slot].push(json!({ "error": format!("n/a: {why}") }));
                driven[slot] = false;
            }
        }
        let jwt_problem = w.kind.jwt().and_then(|alg| {
            token_problems
                .iter()
                .find(|p| p.0 == alg)
                .map(|p| p.1.clone())
        });
        for round in 0..rounds_of(w) {
            for k in 0..slots.len() {
                // Each round starts one target later, so no target always follows the same one.
                let slot = (k + round) % slots.len();
                if !driven[slot] {
                    continue;
                }
                n += 1;
                let h2 = matches!(
                    w.kind,
                    Kind::Echo { h2: Some(_), .. } | Kind::Http { h2: Some(_) }
                );
                let (target, h2c_port) = slots[slot];
                if let Some(why) = &jwt_problem {
                    eprintln!(
                        "[{n:2}/{runs_total}] {:<34} {target:<8} ERROR no {} token: {why}",
                        w.title,
                        w.kind.jwt().map_or("", JwtAlg::id)
                    );
                    runs[slot].push(json!({ "error": format!("no token: {why}") }));
                    continue;
                }
                let path = w.kind.jwt().map_or_else(|| "/".to_owned(), JwtAlg::path);
                let v = if slot < first_peer {
                    let url = match w.kind {
                        Kind::Handshake { tls: true, .. } => {
                            format!("wss://localhost:{up_tls_port}/")
                        }
                        _ => format!("ws://127.0.0.1:{up_port}/"),
                    };
                    ctx.run(w, &url, &[], n, runs_total, "direct")
                } else {
                    let peer = &mut peers[slot - first_peer];
                    if idle {
                        // A fresh process, so memory freed by earlier workloads does not hide growth.
                        if let Err(e) = peer.start(opts.proxy_cpu) {
                            runs[slot].push(json!({"error": format!("{e:#}")}));
                            continue;
                        }
                    }
                    let tls = matches!(
                        w.kind,
                        Kind::Handshake { tls: true, .. }
                            | Kind::Idle { tls: true, .. }
                            | Kind::Storm { tls: true }
                    );
                    let url = match (tls, h2c_port) {
                        (true, _) => format!("wss://localhost:{}{path}", peer.tls_port),
                        (false, Some(port)) if h2 => format!("ws://127.0.0.1:{port}{path}"),
                        _ => format!("ws://127.0.0.1:{}{path}", peer.plain_port),
                    };
                    if matches!(w.kind, Kind::Storm { .. }) {
                        let pids = peer.pids();
                        eprint!("[{n:2}/{runs_total}] {:<34} {:<8} ", w.title, peer.name);
                        let v = ctx
                            .storm(&url, &pids, &mut upstream, &up)
                            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
                        eprintln!("{}", report::one_line(w.kind, &v));
                        v
                    } else {
                        ctx.run(w, &url, &peer.pids(), n, runs_total, peer.name)
                    }
                };
                runs[slot].push(v);
            }
        }
        let per_target: Vec<(String, Value)> = runs
            .into_iter()
            .zip(&slots)
            .map(|(values, (name, _))| ((*name).to_owned(), report::median_round(w.kind, values)))
            .collect();
        results.push(WorkloadResult {
            id: w.id,
            title: w.title,
            kind: w.kind,
            results: per_target,
        });
    }
    let elapsed = started_at.elapsed();
    for peer in peers.iter_mut() {
        if let Some(mut p) = peer.proc.take() {
            p.stop();
        }
    }
    upstream.stop();

    let run = RunResults {
        command: command_line,
        machine: report::machine_info(),
        versions: peers
            .iter()
            .map(|p| (p.name.to_owned(), p.version.clone()))
            .collect(),
        skipped,
        settings: json!({
            "duration_s": plan.duration.as_secs_f64(),
            "handshake_duration_s": plan.handshake_duration.as_secs_f64(),
            "warmup_s": plan.warmup.as_secs_f64(),
            "echo_conns": ECHO_CONNS,
            "handshake_workers": HANDSHAKE_WORKERS,
            "paced_rate": PACED_RATE,
            "idle_conns": idle_conns,
            "storm_conns": storm_conns,
            "proxy_cpu": opts.proxy_cpu,
            "load_cpu": opts.load_cpu,
            "sched": format!("{:?}", opts.sched).to_lowercase(),
            "quick": opts.quick,
            "rounds": rounds,
            "elapsed_s": elapsed.as_secs_f64(),
        }),
        workloads: results,
    };
    let table = report::markdown(&run);
    println!("{table}");
    let json_path = out.join("results.json");
    fs::write(
        &json_path,
        serde_json::to_string_pretty(&report::json(&run))?,
    )?;
    let svg_path = out.join("ratios.svg");
    fs::write(&svg_path, report::svg(&run))?;
    fs::write(out.join("results.md"), &table)?;
    eprintln!(
        "wrote {}, {} and {} ({:.0} s of workloads)",
        json_path.display(),
        svg_path.display(),
        out.join("results.md").display(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// What every load run shares.
struct LoadCtx<'a> {
    self_exe: PathBuf,
    load_cpu: usize,
    ca: PathBuf,
    plan: &'a Plan,
    idle_conns: usize,
    storm_conns: usize,
    /// Keys and tokens of the JWT workloads.
    tokens: Vec<TokenFiles>,
}

impl LoadCtx<'_> {
    /// The load client's command line up to its workload options: URL and test CA.
    fn load_args(&self, url: &str) -> Vec<String> {
        vec![
            "load".into(),
            "--url".into(),
            url.into(),
            "--ca".into(),
            self.ca.display().to_string(),
        ]
    }

    /// Runs the load client for one workload against one target; its JSON, or `{"error"}`.
    fn run(
        &self,
        w: &Workload,
        url: &str,
        pids: &[u32],
        n: usize,
        total: usize,
        target: &str,
    ) -> Value {
        let p = self.plan;
        let secs = |d: Duration| format!("{}ms", d.as_millis());
        let mut args = self.load_args(url);
        args.extend(["--warmup".into(), secs(p.warmup)]);
        let planned = match w.kind {
            Kind::Echo { size, text, h2 } => {
                if let Some(kind) = text {
                    args.extend(["--text".into(), kind.into()]);
                }
                if let Some(streams) = h2 {
                    args.extend(["--h2".into(), streams.to_string()]);
                }
                args.extend([
                    "--mode".into(),
                    "echo".into(),
                    "--conns".into(),
                    ECHO_CONNS.to_string(),
                    "--size".into(),
                    size.to_string(),
                    "--duration".into(),
                    secs(p.duration),
                ]);
                p.warmup + p.duration
            }
            Kind::Http { h2 } => {
                args.extend([
                    "--mode".into(),
                    "http".into(),
                    "--conns".into(),
                    ECHO_CONNS.to_string(),
                    "--duration".into(),
                    secs(p.duration),
                ]);
                if let Some(streams) = h2 {
                    args.extend(["--h2".into(), streams.to_string()]);
                }
                p.warmup + p.duration
            }
            Kind::Paced => {
                args.extend([
                    "--mode".into(),
                    "paced".into(),
                    "--conns".into(),
                    ECHO_CONNS.to_string(),
                    "--size".into(),
                    "32".into(),
                    "--rate".into(),
                    PACED_RATE.to_string(),
                    "--duration".into(),
                    secs(p.duration),
                ]);
                p.warmup + p.duration
            }
            Kind::Handshake { .. } => {
                args.extend([
                    "--mode".into(),
                    "handshake".into(),
                    "--conns".into(),
                    HANDSHAKE_WORKERS.to_string(),
                    "--size".into(),
                    "32".into(),
                    "--duration".into(),
                    secs(p.handshake_duration),
                ]);
                p.warmup + p.handshake_duration
            }
            Kind::Storm { .. } => return json!({"error": "the storm runs from LoadCtx::storm"}),
            Kind::Idle { .. } => {
                args.extend([
                    "--mode".into(),
                    "idle".into(),
                    "--conns".into(),
                    self.idle_conns.to_string(),
                    "--size".into(),
                    "32".into(),
                    "--settle".into(),
                    "1s".into(),
                ]);
                Duration::from_secs(30)
            }
        };
        if let Some(alg) = w.kind.jwt() {
            let Some(files) = self.tokens.iter().find(|f| f.alg == alg) else {
                return json!({"error": format!("no {} token", alg.id())});
            };
            args.push("--bearer-file".into());
            args.push(files.token.display().to_string());
        }
        for pid in pids {
            args.push("--watch-pid".into());
            args.push(pid.to_string());
        }
        eprint!("[{n:2}/{total}] {:<34} {target:<8} ", w.title);
        let v = match run_child(&self.self_exe, self.load_cpu, &args, planned + LOAD_SLACK) {
            Ok(v) => v,
            Err(e) => json!({"error": format!("{e:#}")}),
        };
        eprintln!("{}", report::one_line(w.kind, &v));
        v
    }
}

/// Starts the load client (`self_exe args`) pinned to `cpu` with the harness's scheduling,
/// stdout and stderr piped.
fn spawn_load_client(
    self_exe: &Path,
    cpu: usize,
    args: &[String],
    stdin: Stdio,
) -> anyhow::Result<std::process::Child> {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(cpu.to_string())
        .arg(self_exe)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            apply_sched();
            Ok(())
        });
    }
    cmd.spawn().context("start the load client")
}

/// Collects a child's piped stderr on a thread, so a full pipe never blocks it.
fn read_stderr(child: &mut std::process::Child) -> thread::JoinHandle<String> {
    let mut stderr = child.stderr.take().expect("piped");
    thread::spawn(move || {
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        err
    })
}

/// Runs `self_exe args` pinned to `cpu`, killing it after `limit`; parses its stdout as JSON.
fn run_child(
    self_exe: &Path,
    cpu: usize,
    args: &[String],
    limit: Duration,
) -> anyhow::Result<Value> {
    let mut child = spawn_load_client(self_exe, cpu, args, Stdio::null())?;
    let pid = child.id() as i32;
    let mut stdout = child.stdout.take().expect("piped");
    let err_reader = read_stderr(&mut child);
    let (tx, rx) = mpsc::channel();
    let out_reader = thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(limit).is_err() {
        // SAFETY: our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let status = child.wait()?;
    let out = out_reader.join().expect("stdout reader");
    let err = err_reader.join().expect("stderr reader");
    if !status.success() {
        bail!("load client failed ({status}): {}", err.trim());
    }
    serde_json::from_str(out.trim()).with_context(|| format!("load client printed {out:?}"))
}

/// Under `--sched fifo`, the calling thread one step above the processes the harness starts,
/// until dropped (then back to the normal policy): the storm's restart is not queued behind
/// the proxy and the clients it set off.
struct RaisedPriority(bool);

impl RaisedPriority {
    fn new() -> RaisedPriority {
        if SCHED.load(Ordering::Relaxed) != Sched::Fifo as i32 {
            return RaisedPriority(false);
        }
        let param = libc::sched_param {
            sched_priority: FIFO_PRIORITY + 1,
        };
        // SAFETY: sched_setscheduler only reads the struct passed in.
        RaisedPriority(unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0)
    }
}

impl Drop for RaisedPriority {
    fn drop(&mut self) {
        if self.0 {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: as above.
            unsafe {
                libc::sched_setscheduler(0, libc::SCHED_OTHER, &param);
            }
        }
    }
}

/// How the echo upstream is started, so the storm can start it again on the same ports.
struct UpstreamSpec {
    exe: PathBuf,
    cpu: usize,
    port: u16,
    /// Where it serves its counts (`upstream --stats-port`).
    stats_port: u16,
    args: Vec<String>,
    log: PathBuf,
}

impl UpstreamSpec {
    /// Starts it (not waiting for it to listen).
    fn spawn(&self) -> anyhow::Result<Proc> {
        let mut args = self.args.clone();
        args.extend(["--stats-port".into(), self.stats_port.to_string()]);
        Proc::spawn("upstream", self.cpu, &self.exe, &args, &self.log)
    }

    /// What it has counted since it started (one JSON line from its stats port).
    fn stats(&self) -> anyhow::Result<Value> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.stats_port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        serde_json::from_str(text.trim()).with_context(|| format!("upstream stats {text:?}"))
    }
}

impl LoadCtx<'_> {
    /// One reconnect storm through the proxy at `url` (watched: `pids`): the load client
    /// opens its connections and says `ready`; the upstream is killed (the client told when),
    /// started again on the same ports, and what it counted is added to the client's JSON
    /// (`upstream`), with how long it was gone (`restart`).
    fn storm(
        &self,
        url: &str,
        pids: &[u32],
        upstream: &mut Proc,
        up: &UpstreamSpec,
    ) -> anyhow::Result<Value> {
        let mut args = self.load_args(url);
        args.extend([
            "--mode".into(),
            "storm".into(),
            "--conns".into(),
            self.storm_conns.to_string(),
            "--size".into(),
            "32".into(),
            "--settle".into(),
            "1s".into(),
            "--storm-deadline".into(),
            format!("{}ms", STORM_DEADLINE.as_millis()),
        ]);
        for pid in pids {
            args.push("--watch-pid".into());
            args.push(pid.to_string());
        }
        let mut child = spawn_load_client(&self.self_exe, self.load_cpu, &args, Stdio::piped())?;
        let mut stdin: ChildStdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let err_reader = read_stderr(&mut child);
        let (tx, lines) = mpsc::channel();
        let out_reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Ends the client (killed unless `wait`) and returns what it wrote on stderr.
        let finish = |mut child: Child, wait: bool| -> String {
            if !wait {
                let _ = child.kill();
            }
            let _ = child.wait();
            err_reader.join().unwrap_or_default()
        };

        let ready = lines.recv_timeout(STORM_OPEN_LIMIT);
        if !ready.as_ref().is_ok_and(|l| l.starts_with("ready ")) {
            let err = finish(child, false);
            let _ = out_reader.join();
            bail!(
                "the load client did not get ready ({}): {}",
                ready.unwrap_or_else(|e| format!("{e}")),
                err.trim()
            );
        }

        // The restart: every upstream socket closes as the process dies. Above everything
        // the harness started, so that the restart itself does not wait for the storm.
        let raised = RaisedPriority::new();
        let killed_at = Instant::now();
        let killed_ns = monotonic_ns();
        upstream.kill_group();
        let told = writeln!(stdin, "restart {killed_ns}").and_then(|()| stdin.flush());
        upstream.reap();
        let started = up.spawn();
        let listening = started.and_then(|mut p| {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, up.port));
            let deadline = killed_at + START_TIMEOUT;
            loop {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    break Ok((p, killed_at.elapsed()));
                }
                if p.exited() || Instant::now() > deadline {
                    p.stop();
                    bail!(
                        "the upstream did not listen again on {} within {START_TIMEOUT:?}: {}",
                        up.port,
                        last_lines(&up.log, 5).trim()
                    );
                }
                thread::sleep(Duration::from_millis(1));
            }
        });
        drop(raised);
        let (new_upstream, down_for) = match listening {
            Ok(pair) => pair,
            Err(e) => {
                let _ = finish(child, false);
                return Err(e);
            }
        };
        // The old Proc is reaped; its replacement takes its place (and its process group slot).
        *upstream = new_upstream;
        if let Err(e) = told {
            let err = finish(child, false);
            bail!(
                "could not tell the load client of the restart ({e}): {}",
                err.trim()
            );
        }

        let result = lines.recv_timeout(STORM_DEADLINE + LOAD_SLACK);
        let err = finish(child, result.is_ok());
        let _ = out_reader.join();
        let line = result
            .map_err(|e| anyhow::anyhow!("no result from the load client ({e}): {}", err.trim()))?;
        let mut v: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("load client printed {line:?}"))?;
        let stats = up
            .stats()
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        // The accept queues the client saw filling, by whose they are.
        let proxy_port = url
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next())
            .unwrap_or_default()
            .to_owned();
        let queues = v.get("listen_queues").cloned().unwrap_or(Value::Null);
        let queue_of = |port: &str| queues.get(port).cloned().unwrap_or(Value::Null);
        let listeners = json!({
            "proxy": queue_of(&proxy_port),
            "upstream": queue_of(&up.port.to_string()),
        });
        if let Some(obj) = v.as_object_mut() {
            obj.insert("listeners".into(), listeners);
            obj.insert("upstream".into(), stats);
            obj.insert(
                "restart".into(),
                json!({ "listening_again_ms": down_for.as_secs_f64() * 1000.0 }),
            );
        }
        Ok(v)
    }
}
