//! The HTTP half of an accepted WebSocket upgrade: the connection record built from the
//! request's context, hyper's upgraded connection unwrapped into the tunnel's client stream,
//! the settings a tunnel starts with, and the builtin echo's own 101. What runs after it is
//! `ws`, which knows nothing of HTTP.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::Timeouts;
use crate::gateway::{ConnContext, Route, Shared};
use crate::listener::head_guard::HeadGuard;
use crate::proxy::body::ProxyBody;
use crate::proxy::handshake::{Upgrade, UpgradeKind};
use crate::upstream::{Server, Upstream};
use crate::ws::record::{ConnRecord, Identity};
use crate::ws::tunnel::TunnelSettings;
use crate::ws::{self, echo, ClientIo};

/// The settings a tunnel on a route starts with, from the configuration now in force.
pub fn tunnel_settings(timeouts: Timeouts, shared: &Shared) -> TunnelSettings {
    let gateway = shared.gateway.load();
    TunnelSettings::new(timeouts, &gateway.limits, gateway.splice)
}

/// Unwraps an upgraded client connection and the bytes hyper read past the request.
pub fn client_io(upgraded: Upgraded) -> (ClientIo, Bytes) {
    let upgraded = match upgraded.downcast::<TokioIo<HeadGuard<TcpStream>>>() {
        Ok(parts) => {
            let (tcp, held) = parts.io.into_inner().into_inner();
            return (ClientIo::Plain(tcp), join(parts.read_buf, held));
        }
        Err(upgraded) => upgraded,
    };
    match upgraded.downcast::<TokioIo<HeadGuard<tokio_rustls::server::TlsStream<TcpStream>>>>() {
        Ok(parts) => {
            let (tls, held) = parts.io.into_inner().into_inner();
            (ClientIo::Tls(Box::new(tls)), join(parts.read_buf, held))
        }
        Err(upgraded) => (ClientIo::Other(TokioIo::new(upgraded)), Bytes::new()),
    }
}

/// What hyper read past the request, then what the head gate read and had not handed on.
fn join(hyper: Bytes, held: Bytes) -> Bytes {
    if held.is_empty() {
        hyper
    } else if hyper.is_empty() {
        held
    } else {
        let mut both = Vec::with_capacity(hyper.len() + held.len());
        both.extend_from_slice(&hyper);
        both.extend_from_slice(&held);
        both.into()
    }
}

/// Builds the record of a connection being upgraded on `route`.
pub fn new_record(
    shared: &Shared,
    route: &Route,
    conn: &ConnContext,
    server: Option<(&Upstream, &Server)>,
    subprotocol: Option<String>,
    kind: UpgradeKind,
) -> Arc<ConnRecord> {
    Arc::new(ConnRecord::new(
        Identity {
            id: shared.next_id(),
            client: conn.client,
            listener: conn.listener.clone(),
            route: route.name.clone(),
            upstream: server.map(|(u, _)| u.name.clone()),
            server: server.map(|(_, s)| s.label.clone()),
            http_version: kind.http_version(),
            subprotocol,
            started: std::time::Instant::now(),
        },
        route.metrics.clone(),
    ))
}

/// Accepts the upgrade (101, or 200 over HTTP/2) and spawns the tunnel and echo loop on
/// the upgraded stream.
pub fn accept_echo<B>(
    req: Request<B>,
    route: &Route,
    conn: &ConnContext,
    shared: &Arc<Shared>,
    upgrade: Upgrade,
) -> Response<ProxyBody>
where
    B: Send + 'static,
{
    let Upgrade {
        kind,
        key,
        permit,
        grant,
    } = upgrade;
    let on_upgrade = hyper::upgrade::on(req);
    let record = new_record(shared, route, conn, None, None, kind);
    let settings = tunnel_settings(route.config.timeouts, shared).expiring(grant.time_left());
    let tracked = shared.clone();
    shared.tunnels.spawn(async move {
        let _permit = permit;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                debug!(id = record.identity.id, error = %e, "upgrade did not complete");
                return;
            }
        };
        let (client, early) = client_io(upgraded);
        let (tunnel_side, echo_side) = tokio::io::duplex(echo::PIPE_CAPACITY);
        let tunnel = ws::tunnel_to(
            client,
            early,
            tunnel_side,
            Bytes::new(),
            settings,
            record.clone(),
        );
        let tunnel = ws::run(tunnel, record, &tracked.connections);
        let echo = async {
            if let Err(e) = echo::echo(echo_side).await {
                debug!(error = %e, "echo loop ended");
            }
        };
        tokio::join!(tunnel, echo);
    });
    let mut response = super::handshake::accepted(kind, &key);
    if let Some(value) = grant
        .protocol_token
        .and_then(|t| HeaderValue::from_str(&t).ok())
    {
        response
            .headers_mut()
            .insert(http::header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    response
}
