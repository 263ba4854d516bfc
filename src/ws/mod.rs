//! WebSocket tunnels: what runs after a 101, from the splice between client and upstream
//! to the builtin echo endpoint, ending with one access-log line per connection.

pub mod echo;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use crate::config::Timeouts;

/// Everything known about one upgraded connection, for its relay and its access-log line.
#[derive(Debug)]
pub struct TunnelInfo {
    pub id: u64,
    pub client: SocketAddr,
    pub listener: Arc<str>,
    pub route: Arc<str>,
    /// `None` for builtin routes.
    pub upstream: Option<Arc<str>>,
    pub server: Option<Arc<str>>,
    pub subprotocol: Option<String>,
    /// The route's timeouts as they were when the connection was upgraded.
    pub timeouts: Timeouts,
    /// When the handshake started.
    pub started: Instant,
}

/// Carries an upgraded connection until both sides are done, then logs it.
pub async fn tunnel<C, U>(mut client: C, mut upstream: U, info: TunnelInfo)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (up, down, error) = match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => (up, down, None),
        Err(e) => (0, 0, Some(e)),
    };
    info!(
        target: "wsgate::access",
        id = info.id,
        client = %info.client,
        listener = %info.listener,
        route = %info.route,
        upstream = info.upstream.as_deref().unwrap_or("-"),
        server = info.server.as_deref().unwrap_or("-"),
        duration_ms = info.started.elapsed().as_millis() as u64,
        bytes_client_to_upstream = up,
        bytes_upstream_to_client = down,
        error = error.as_ref().map(|e| e.to_string()),
        "websocket closed"
    );
}
