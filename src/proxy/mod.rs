//! The per-request service: route the request, then forward it as a plain HTTP request
//! or as a WebSocket handshake, turning every failure into a short, specific answer.

pub mod body;
pub mod handshake;
pub mod headers;
pub mod http;

use std::convert::Infallible;
use std::sync::Arc;

use ::http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::config::{Builtin, RouteTarget};
use crate::error::{Blame, ProxyError};
use crate::gateway::{ConnContext, Shared};
use body::ProxyBody;

/// Serves one request on a client connection.
pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<ConnContext>,
    shared: Arc<Shared>,
) -> Result<Response<ProxyBody>, Infallible> {
    let gateway = shared.gateway.load_full();
    let host = request_host(&req).map(str::to_owned);
    let path = req.uri().path();

    let Some(route) = gateway
        .router
        .lookup(host.as_deref().unwrap_or(""), path)
        .cloned()
    else {
        let e = ProxyError::NoRoute {
            host: host.unwrap_or_default(),
            path: path.to_owned(),
        };
        debug!(client = %conn.client, error = %e, "refused");
        return Ok(e.into_response());
    };

    let upgrade = handshake::is_upgrade(&req);
    let result = match (&route.config.target, &route.upstream) {
        (RouteTarget::Builtin(Builtin::Echo), _) if upgrade => {
            match handshake::validate(&req, &route) {
                Ok(key) => Ok(crate::ws::echo::accept(req, &route, &conn, &shared, &key)),
                Err(e) => Err(e),
            }
        }
        (RouteTarget::Builtin(_), _) => Ok(builtin_plain_answer()),
        (RouteTarget::Upstream(_), Some(upstream)) => {
            let upstream = upstream.clone();
            if upgrade {
                handshake::forward(
                    req,
                    route.clone(),
                    upstream,
                    conn.clone(),
                    shared,
                    host.as_deref(),
                )
                .await
            } else {
                http::forward(req, &route, &upstream, &conn, host.as_deref()).await
            }
        }
        (RouteTarget::Upstream(name), None) => Err(ProxyError::Internal(format!(
            "route {} names unknown upstream {name}",
            route.name
        ))),
    };
    Ok(result.unwrap_or_else(|e| {
        match e.blame() {
            Blame::Client => {
                debug!(client = %conn.client, route = %route.name, error = %e, "refused")
            }
            Blame::Upstream | Blame::Internal => {
                warn!(client = %conn.client, route = %route.name, error = %e, "request failed")
            }
        }
        e.into_response()
    }))
}

/// The host a request is for: the URI authority (absolute-form) or the `Host` header.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// A plain request to a builtin WebSocket route.
fn builtin_plain_answer() -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::text(
        "this route only accepts WebSocket upgrades\n",
    ));
    *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
    response.headers_mut().insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    response
}
