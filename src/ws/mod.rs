//! WebSocket tunnels: what runs after a 101. The frame codec, the relay, keepalive policy,
//! the per-connection record, and the builtin echo endpoint; one access-log line per
//! connection when it ends.

pub mod buffer;
pub mod codec;
pub mod echo;
pub mod keepalive;
pub mod peer;
pub mod record;
pub mod side;
pub mod splice;
pub mod tunnel;
#[cfg(test)]
mod tunnel_tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::info;

use record::{ConnRecord, Connections};
use tunnel::{Outcome, Tunnel, TunnelSettings};

/// A client's upgraded connection, unwrapped from hyper where its type is known so the
/// relay talks to the socket directly.
pub enum ClientIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Other(TokioIo<Upgraded>),
}

/// A tunnel ready to run. Boxed once, at its exact size: the task that runs it then stays
/// a few words, where nesting the relay's generic futures inline would roughly double what
/// every idle connection carries.
pub type BoxedTunnel = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// The tunnel between a client connection and any upstream stream. The early bytes (read
/// past the handshake) are copied into the relay's buffer at once: they are slices of hyper's
/// read buffers, which would otherwise stay allocated for the life of the connection.
pub fn tunnel_to<U>(
    client: ClientIo,
    client_early: Bytes,
    upstream: U,
    upstream_early: Bytes,
    settings: TunnelSettings,
    record: Arc<ConnRecord>,
) -> BoxedTunnel
where
    U: AsyncRead + AsyncWrite + splice::SpliceIo + Unpin + Send + 'static,
{
    match client {
        ClientIo::Plain(c) => Box::pin(Tunnel::new(
            c,
            client_early,
            upstream,
            upstream_early,
            settings,
            record,
        )),
        ClientIo::Tls(c) => Box::pin(Tunnel::new(
            c,
            client_early,
            upstream,
            upstream_early,
            settings,
            record,
        )),
        ClientIo::Other(c) => Box::pin(Tunnel::new(
            c,
            client_early,
            upstream,
            upstream_early,
            settings,
            record,
        )),
    }
}

/// Runs a tunnel: registered and counted while it lives, logged and counted when it ends.
pub async fn run(tunnel: BoxedTunnel, record: Arc<ConnRecord>, connections: &Connections) {
    let _registered = connections.register(record.clone());
    let metrics = &record.metrics;
    metrics.connections_active.inc();
    // The relay yields on its own after a bounded number of turns (MAX_TURNS_PER_POLL), so
    // tokio's per-operation budget would only add bookkeeping to every socket poll.
    let outcome = tokio::task::unconstrained(tunnel).await;
    metrics
        .connection_duration
        .observe(record.identity.started.elapsed().as_secs_f64());
    metrics.closed(outcome.initiator, outcome.code);
    metrics.pong_timeouts.inc_by(outcome.pong_timeouts);
    metrics.idle_timeouts.inc_by(outcome.idle_timeouts);
    for (counter, n) in metrics.undeliverable.iter().zip(outcome.undeliverable) {
        if n > 0 {
            counter.inc_by(n);
        }
    }
    metrics.connections_active.dec();
    connections.ended.push(crate::status::Ended {
        id: record.identity.id,
        client: record.identity.client,
        route: &record.identity.route,
        closed_by: outcome.initiator.label(),
        code: outcome.code,
        reason: &outcome.reason,
        duration: record.identity.started.elapsed(),
    });
    access_log(&record, &outcome);
}

/// The one line written when a WebSocket connection ends.
fn access_log(record: &ConnRecord, outcome: &Outcome) {
    let c2u = &record.client_to_upstream;
    let u2c = &record.upstream_to_client;
    info!(
        target: "wsgate::access",
        id = record.identity.id,
        client = %record.identity.client,
        listener = %record.identity.listener,
        route = %record.identity.route,
        upstream = record.identity.upstream.as_deref().unwrap_or("-"),
        server = record.identity.server.as_deref().unwrap_or("-"),
        duration_ms = record.identity.started.elapsed().as_millis() as u64,
        bytes_client_to_upstream = c2u.bytes.load(Ordering::Relaxed),
        bytes_upstream_to_client = u2c.bytes.load(Ordering::Relaxed),
        frames_client_to_upstream = c2u.frames.load(Ordering::Relaxed),
        frames_upstream_to_client = u2c.frames.load(Ordering::Relaxed),
        closed_by = outcome.initiator.label(),
        close_code = outcome.code.map(u64::from),
        close_reason = outcome.reason.as_str(),
        client_end = outcome.client_end.label(),
        upstream_end = outcome.upstream_end.label(),
        undeliverable_client_to_upstream = outcome.undeliverable[0],
        undeliverable_upstream_to_client = outcome.undeliverable[1],
        "websocket closed"
    );
}
