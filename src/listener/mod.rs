//! Public listeners: the accept loop (TCP_NODELAY, backoff when file descriptors run out),
//! optional TLS, and the HTTP/1.1 and HTTP/2 servers that hand each request to the proxy
//! service. HTTP/2 is chosen by ALPN on TLS and by the connection preface (h2c with prior
//! knowledge) on plain listeners with `http2 = true`.

pub mod head_guard;
pub mod pending;
pub mod rewind;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};

use crate::gateway::{ConnContext, Shared};
use crate::metrics::RejectReason;
use crate::proxy;
use head_guard::{GuardSettings, HeadGuard, HeadLimits};
use pending::Ticket;
use rewind::Rewind;

/// Room hyper's read buffer has beyond the largest head: the gate hands hyper whole heads
/// only, so hyper's own limit (which counts its buffer, body bytes included) must never be
/// the one that trips.
const HYPER_BUFFER_SLACK: usize = 16 * 1024;

/// HTTP/2 receive window of one stream: what a client may send on it before wsgate has
/// relayed it on (a stalled WebSocket holds at most this much in wsgate).
const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// HTTP/2 receive window of a whole connection: a multiple of the stream window, so stalled
/// streams cannot block the others (with equal windows one stalled stream blocks them all).
const H2_CONNECTION_WINDOW: u32 = 8 * H2_STREAM_WINDOW;

/// First pause of the accept loop when the process is out of file descriptors; doubles up to
/// `ACCEPT_BACKOFF_MAX`, so an exhausted process neither spins nor stalls for long once fds free up.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A bound public listener, ready to serve.
#[derive(Debug)]
pub struct BoundListener {
    pub name: Arc<str>,
    pub listener: TcpListener,
    /// The listener's certificates; reload swaps them for new connections.
    pub tls: Option<Arc<ArcSwap<ServerConfig>>>,
    /// `Some(http2_max_streams)` when the listener serves HTTP/2 too.
    pub http2: Option<u32>,
}

impl BoundListener {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Accepts connections until `shutdown` fires; each connection runs on `connections`.
pub async fn serve(
    bound: BoundListener,
    shared: Arc<Shared>,
    connections: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = bound.listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(e) if is_resource_exhaustion(&e) => {
                error!(listener = %bound.name, error = %e, pause_ms = backoff.as_millis() as u64, "accept failed: out of resources, pausing");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
            Err(e) => {
                // ECONNABORTED and friends: the peer gave up before we accepted.
                debug!(listener = %bound.name, error = %e, "accept failed");
                continue;
            }
        };
        prepare_accepted(&stream);
        let acceptor = bound.tls.as_ref().map(|t| TlsAcceptor::from(t.load_full()));
        let ctx = Arc::new(ConnContext::new(
            bound.name.clone(),
            peer,
            acceptor.is_some(),
        ));
        let limits = shared.gateway.load().limits;
        let settings = GuardSettings {
            limits: HeadLimits {
                max_head: limits.max_request_head,
                max_headers: limits.max_request_headers,
            },
            h2c: bound.http2.is_some() && acceptor.is_none(),
            conn: ctx.clone(),
            pending: shared.pending_heads.clone(),
            max_pending: limits.max_pending_heads,
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let http2 = bound.http2;
        connections.spawn(async move {
            match acceptor {
                None => serve_http(stream, None, settings, http2, shared, shutdown).await,
                // Boxed: a plain connection's task must not carry a TLS handshake's state.
                Some(acceptor) => {
                    // Waiting for its first head from now on, the TLS handshake included.
                    let ticket = shared.pending_heads.enter(settings.max_pending);
                    Box::pin(serve_tls(
                        stream, acceptor, ticket, settings, http2, shared, shutdown,
                    ))
                    .await
                }
            }
        });
    }
    debug!(listener = %bound.name, "stopped accepting");
}

/// Whether accepted sockets take `TCP_NODELAY` from their listener (set in `listen`):
/// Linux copies the listener's TCP options into each connection it accepts.
pub const NODELAY_INHERITED: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// Socket options for an accepted connection: `TCP_NODELAY`, unless inherited.
pub fn prepare_accepted(stream: &TcpStream) {
    if !NODELAY_INHERITED {
        // Small frames must not wait for Nagle; failure to set it is harmless.
        let _ = stream.set_nodelay(true);
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE (24), ENFILE (23), ENOBUFS (105), ENOMEM (12).
    matches!(e.raw_os_error(), Some(24) | Some(23) | Some(105) | Some(12))
}

async fn serve_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    ticket: Ticket,
    settings: GuardSettings,
    http2: Option<u32>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    // The TLS handshake shares the request-head budget: a client that stalls in either is cut off.
    let timeout = shared.gateway.load().timeouts.client_header;
    let ctx = settings.conn.clone();
    let handshake = tokio::time::timeout(timeout, acceptor.accept(stream));
    let accepted = tokio::select! {
        accepted = handshake => accepted,
        _ = ticket.evicted() => {
            shared.metrics.rejected(RejectReason::PendingHeads);
            debug!(listener = %ctx.listener, client = %ctx.client, "closed during its TLS handshake to make room for newer connections");
            return;
        }
    };
    match accepted {
        Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_H2) => {
            // ALPN offers h2 only on listeners that serve it.
            let max_streams = http2.unwrap_or(crate::config::defaults::HTTP2_MAX_STREAMS);
            drop(ticket);
            serve_h2(tls, ctx, max_streams, shared, shutdown).await
        }
        Ok(Ok(tls)) => serve_http(tls, Some(ticket), settings, None, shared, shutdown).await,
        Ok(Err(e)) => {
            shared.metrics.tls_handshake_error(&ctx.listener);
            debug!(listener = %ctx.listener, client = %ctx.client, error = %e, "TLS handshake failed")
        }
        Err(_) => {
            shared.metrics.tls_handshake_error(&ctx.listener);
            debug!(listener = %ctx.listener, client = %ctx.client, "TLS handshake timed out")
        }
    }
}

/// Serves HTTP on an accepted (and, on TLS listeners, decrypted) connection: waits for the
/// first request head with nothing but the gate's buffer, then hands the connection to hyper.
async fn serve_http<S>(
    stream: S,
    ticket: Option<Ticket>,
    settings: GuardSettings,
    http2: Option<u32>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = settings.conn.clone();
    let client_header = shared.gateway.load().timeouts.client_header;
    let mut guard = HeadGuard::new(stream, settings, ticket);
    // Most heads are there by the time the task first runs: only a head still on its way
    // needs the timer and the shutdown watch (each costs a registration).
    let first = match std::future::poll_fn(|cx| Poll::Ready(guard.poll_first_head(cx))).await {
        Poll::Ready(first) => Ok(first),
        Poll::Pending => {
            // Waiting now, so in the table of waiting connections (from accept on TLS).
            guard.wait_in_line();
            tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            first = tokio::time::timeout(client_header, guard.first_head()) => first,
            }
        }
    };
    match first {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            if head_guard::is_eviction(&e) {
                shared.metrics.rejected(RejectReason::PendingHeads);
            }
            debug!(listener = %ctx.listener, client = %ctx.client, error = %e, "connection ended before its request head");
            return;
        }
        Err(_) => {
            debug!(listener = %ctx.listener, client = %ctx.client, "client too slow to send its request head");
            return;
        }
    }
    if guard.is_h2c() {
        // HTTP/2 with prior knowledge: the preface the gate read goes to hyper first.
        let (stream, preface) = guard.into_inner();
        let max_streams = http2.unwrap_or(crate::config::defaults::HTTP2_MAX_STREAMS);
        return Box::pin(serve_h2(
            Rewind::new(preface, stream),
            ctx,
            max_streams,
            shared,
            shutdown,
        ))
        .await;
    }
    // Boxed: hyper's connection state is allocated only once a head is there to serve.
    Box::pin(serve_hyper(guard, ctx, shared, shutdown)).await
}

/// What a connection is served with, from the configuration in force when it starts.
fn connection_settings(shared: &Shared) -> (Duration, crate::config::Limits) {
    let gateway = shared.gateway.load();
    (gateway.timeouts.client_header, gateway.limits)
}

/// Serves an HTTP/2 connection: streams multiplexed by hyper's server, each request handed
/// to the same service as HTTP/1.1 ones; WebSockets arrive as extended CONNECT (RFC 8441).
/// The client has `client_header` for its preface and first request; SIGTERM sends GOAWAY.
async fn serve_h2<S>(
    io: S,
    ctx: Arc<ConnContext>,
    max_streams: u32,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client_header, limits) = connection_settings(&shared);
    shared.metrics.http_connection(&ctx.listener, "2");
    let first_request = Arc::new(tokio::sync::Notify::new());
    let service = {
        let ctx = ctx.clone();
        let shared = shared.clone();
        let first_request = first_request.clone();
        service_fn(move |req| {
            first_request.notify_one();
            proxy::handle(req, ctx.clone(), shared.clone())
        })
    };
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(max_streams)
        // A stream whose reader stalls holds at most its own window in wsgate; the
        // connection's window is eight of those, so one stalled stream (or seven) cannot
        // use up what the connection's other streams need.
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        // The whole decoded header list of a request, as `max_request_head` bounds an
        // HTTP/1.1 head.
        .max_header_list_size(u32::try_from(limits.max_request_head).unwrap_or(u32::MAX));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let first = tokio::time::timeout(client_header, first_request.notified());
    tokio::pin!(first);
    let mut waiting_for_first = true;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            seen = first.as_mut(), if waiting_for_first => {
                waiting_for_first = false;
                if seen.is_err() {
                    debug!(listener = %ctx.listener, client = %ctx.client, "HTTP/2 client too slow to send its first request");
                    return;
                }
            }
            _ = shutdown.cancelled() => {
                // GOAWAY: streams in flight finish, no new ones are accepted.
                conn.as_mut().graceful_shutdown();
                break conn.as_mut().await;
            }
        }
    };
    if let Err(e) = result {
        debug!(listener = %ctx.listener, client = %ctx.client, error = %e, "HTTP/2 connection ended with an error");
    }
}

async fn serve_hyper<S>(
    guard: HeadGuard<S>,
    ctx: Arc<ConnContext>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client_header, limits) = connection_settings(&shared);
    shared.metrics.http_connection(&ctx.listener, "1.1");
    let service = {
        let ctx = ctx.clone();
        let shared = shared.clone();
        service_fn(move |req| proxy::handle(req, ctx.clone(), shared.clone()))
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(client_header)
        .max_buf_size(limits.max_request_head + HYPER_BUFFER_SLACK)
        .max_headers(limits.max_request_headers)
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(guard), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            debug!(listener = %ctx.listener, client = %ctx.client, "client too slow to send its request head");
        } else if head_guard::is_eviction(&e) {
            shared.metrics.rejected(RejectReason::PendingHeads);
            debug!(listener = %ctx.listener, client = %ctx.client, error = %e, "closed to make room for newer connections");
        } else {
            // Malformed requests and vanished clients are the client's business, not an alarm.
            debug!(listener = %ctx.listener, client = %ctx.client, error = %e, "HTTP connection ended with an error");
        }
    }
}
