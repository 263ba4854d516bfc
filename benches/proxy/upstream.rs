//! The echo upstream that every target forwards to (and that `direct` talks to): a hand-written
//! WebSocket echo on one thread, cheap enough that it shares a CPU with the load client and
//! still leaves the proxy as the thing that limits throughput. Frames stream through: a
//! header is echoed as soon as it is parsed and payload as it arrives (unmasked), one write
//! per read. Pings are answered with pongs; a close is echoed, then the server closes first.
//!
//! It counts its connections and the handshakes in progress (from accept until its first
//! answer, the 101, is written), with their peaks since start, and serves those counts as one
//! JSON line on `--stats-port`: the reconnect storm reads how many handshakes a proxy had in
//! progress at once towards a restarted upstream.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::sys;
use crate::ws;

/// Read buffer of one connection: a 16 KiB message with its header in one read.
const BUF: usize = 64 * 1024;

/// How long a connection that sent its close keeps being read, so its unread bytes do not
/// turn our close into a reset.
const LINGER: Duration = Duration::from_secs(2);

/// A client that stays silent this long in the HTTP head is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct Opts {
    /// Plain (ws://) port.
    #[arg(long)]
    port: u16,
    /// Also serve wss:// on this port (needs --cert and --key): the TLS ceiling for `direct`.
    #[arg(long, requires_all = ["cert", "key"])]
    tls_port: Option<u16>,
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Serve the counts (connections, handshakes in progress, their peaks) as one JSON line
    /// to whoever connects to this port.
    #[arg(long)]
    stats_port: Option<u16>,
    /// Exit after this long even if nobody stops us.
    #[arg(long, value_parser = crate::parse_duration, default_value = "1h")]
    lifetime: Duration,
}

pub fn run(opts: Opts) -> anyhow::Result<()> {
    sys::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(opts))
}

async fn serve(opts: Opts) -> anyhow::Result<()> {
    let plain = TcpListener::bind(SocketAddr::new(opts.bind, opts.port))
        .await
        .with_context(|| format!("bind {}:{}", opts.bind, opts.port))?;
    tokio::spawn(accept_loop(plain, None));
    if let (Some(port), Some(cert), Some(key)) = (opts.tls_port, &opts.cert, &opts.key) {
        let acceptor = tls_acceptor(cert, key)?;
        let listener = TcpListener::bind(SocketAddr::new(opts.bind, port))
            .await
            .with_context(|| format!("bind {}:{port}", opts.bind))?;
        tokio::spawn(accept_loop(listener, Some(acceptor)));
    }
    if let Some(port) = opts.stats_port {
        let listener = TcpListener::bind(SocketAddr::new(opts.bind, port))
            .await
            .with_context(|| format!("bind {}:{port}", opts.bind))?;
        tokio::spawn(stats_loop(listener));
    }
    tokio::time::sleep(opts.lifetime).await;
    Ok(())
}

/// What the upstream has seen since it started. One thread updates them; atomics only because
/// tasks must be `Send`.
struct Counts {
    accepted: AtomicU64,
    upgraded: AtomicU64,
    conns: AtomicU64,
    conns_peak: AtomicU64,
    handshakes: AtomicU64,
    handshakes_peak: AtomicU64,
}

static COUNTS: Counts = Counts {
    accepted: AtomicU64::new(0),
    upgraded: AtomicU64::new(0),
    conns: AtomicU64::new(0),
    conns_peak: AtomicU64::new(0),
    handshakes: AtomicU64::new(0),
    handshakes_peak: AtomicU64::new(0),
};

/// One accepted connection: counted open until dropped, and in its handshake until
/// [`Accepted::answered`] (or dropped).
struct Accepted {
    in_handshake: bool,
}

impl Accepted {
    fn new() -> Accepted {
        let c = &COUNTS;
        c.accepted.fetch_add(1, Ordering::Relaxed);
        let conns = c.conns.fetch_add(1, Ordering::Relaxed) + 1;
        c.conns_peak.fetch_max(conns, Ordering::Relaxed);
        let handshakes = c.handshakes.fetch_add(1, Ordering::Relaxed) + 1;
        c.handshakes_peak.fetch_max(handshakes, Ordering::Relaxed);
        Accepted { in_handshake: true }
    }

    /// The first answer is written: the handshake is over.
    fn answered(&mut self, upgraded: bool) {
        if std::mem::take(&mut self.in_handshake) {
            COUNTS.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
        if upgraded {
            COUNTS.upgraded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Accepted {
    fn drop(&mut self) {
        self.answered(false);
        COUNTS.conns.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `--stats-port`: one JSON line of [`COUNTS`] per connection, then close.
async fn stats_loop(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let c = &COUNTS;
        let line = serde_json::json!({
            "accepted": c.accepted.load(Ordering::Relaxed),
            "upgraded": c.upgraded.load(Ordering::Relaxed),
            "conns": c.conns.load(Ordering::Relaxed),
            "conns_peak": c.conns_peak.load(Ordering::Relaxed),
            "handshakes": c.handshakes.load(Ordering::Relaxed),
            "handshakes_peak": c.handshakes_peak.load(Ordering::Relaxed),
        })
        .to_string()
            + "\n";
        tokio::spawn(async move {
            let _ = stream.write_all(line.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("read {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of descriptors or the like: pause instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let accepted = Accepted::new();
        match &tls {
            None => {
                tokio::spawn(async move {
                    let _ = echo(stream, accepted).await;
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await
                    {
                        let _ = echo(tls, accepted).await;
                    }
                });
            }
        }
    }
}

/// Echoes frames until the peer closes; see the module doc.
/// `accepted` counts the connection until it ends.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    mut accepted: Accepted,
) -> io::Result<()> {
    // Each head within HEAD_TIMEOUT; plain requests keep the connection as long as they come.
    let early = ws::server_handshake(&mut s, HEAD_TIMEOUT, &mut |upgraded| {
        accepted.answered(upgraded)
    })
    .await?;
    let mut inbuf = vec![0u8; BUF.max(early.len())];
    let mut out: Vec<u8> = Vec::with_capacity(BUF + 64);
    let mut pending = early.len();
    inbuf[..pending].copy_from_slice(&early);
    // The frame being echoed: payload bytes still to come, its mask and how far into it we are.
    let mut left: u64 = 0;
    let mut mask: Option<[u8; 4]> = None;
    let mut mask_pos: usize = 0;
    let mut in_close = false;
    let mut closing = false;
    loop {
        let mut i = 0;
        while i < pending && !closing {
            if left == 0 {
                let Some(head) = ws::parse_head(&inbuf[i..pending]) else {
                    break;
                };
                let opcode = if head.opcode == ws::OP_PING {
                    ws::OP_PONG
                } else {
                    head.opcode
                };
                ws::put_head(&mut out, head.fin, opcode, head.payload_len, None);
                i += head.header_len;
                left = head.payload_len;
                mask = head.mask;
                mask_pos = 0;
                in_close = head.opcode == ws::OP_CLOSE;
            }
            let take = (left.min((pending - i) as u64)) as usize;
            let start = out.len();
            out.extend_from_slice(&inbuf[i..i + take]);
            if let Some(m) = mask {
                ws::apply_mask(&mut out[start..], m, mask_pos);
            }
            mask_pos += take;
            left -= take as u64;
            i += take;
            if left == 0 && in_close {
                closing = true;
            }
        }
        if closing {
            pending = 0;
        } else {
            inbuf.copy_within(i..pending, 0);
            pending -= i;
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            s.flush().await?;
            out.clear();
        }
        if closing {
            // The server closes the TCP connection first (RFC 6455 section 7.1.1).
            s.shutdown().await?;
            let _ = tokio::time::timeout(LINGER, async {
                while s.read(&mut inbuf).await.unwrap_or(0) > 0 {}
            })
            .await;
            return Ok(());
        }
        if pending == inbuf.len() {
            // A header can never be this long; the client is not speaking WebSocket.
            return Err(io::Error::new(io::ErrorKind::InvalidData, "garbage"));
        }
        let n = s.read(&mut inbuf[pending..]).await?;
        if n == 0 {
            return Ok(());
        }
        pending += n;
    }
}
