//! The per-request service: route the request, then forward it as a plain HTTP request
//! or as a WebSocket handshake, turning every failure into a short, specific answer and
//! counting each outcome once.

pub mod body;
pub mod handshake;
pub mod head;
pub mod headers;
pub mod plain;
pub mod upgrade;
pub mod upgraded;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use ::http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::auth::Grant;
use crate::config::{Builtin, RouteTarget};
use crate::error::{Blame, ProxyError};
use crate::gateway::{ConnContext, Route, Shared};
use crate::metrics::{AuthResult, HandshakeResult, RejectReason};
use crate::proxy::headers::ClientInfo;
use body::ProxyBody;

/// Serves one request on a client connection.
pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<ConnContext>,
    shared: Arc<Shared>,
) -> Result<Response<ProxyBody>, Infallible> {
    if let Some(refusal) = crate::listener::head_guard::take_refusal(&conn) {
        return Ok(refuse(refusal.error(), &conn, &shared));
    }
    let mut req = req;
    let host = match head::read(&mut req) {
        Ok(host) => host,
        Err(e) => return Ok(refuse(e, &conn, &shared)),
    };
    let gateway = shared.gateway.load_full();
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
        shared.metrics.rejected(RejectReason::NoRoute);
        return Ok(e.into_response());
    };

    let kind = handshake::UpgradeKind::of(&req);
    let upgrade = kind.is_some();
    let http1 = req.version() < ::http::Version::HTTP_2;
    let started = Instant::now();
    let mut req = req;
    // An upgrade is checked and admitted before auth: a malformed handshake is a 400
    // whatever its token, and the limits keep a flood from one address away from the key
    // checks and the auth service.
    let admitted = match kind {
        Some(kind) => handshake::validate(&req, &route, kind)
            .and_then(|key| Ok(Some((kind, key, handshake::admit(&shared, &conn)?)))),
        None => Ok(None),
    };
    let result = match admitted {
        Err(e) => Err(e),
        Ok(admitted) => match authenticate(&mut req, &route, &conn, host.as_deref()).await {
            Err(e) => Err(e),
            Ok(grant) => {
                let upgrade = admitted.map(|(kind, key, permit)| handshake::Upgrade {
                    kind,
                    key,
                    permit,
                    grant,
                });
                serve(req, &route, &conn, &shared, host.as_deref(), upgrade).await
            }
        },
    };

    let (response, handshake_result) = match result {
        Ok(response) => {
            let outcome = if kind.is_some_and(|k| response.status() == k.accepted_status()) {
                HandshakeResult::Upgraded
            } else {
                HandshakeResult::UpstreamStatus
            };
            (response, outcome)
        }
        Err(e) => {
            let outcome = match e.blame() {
                Blame::Client => {
                    debug!(client = %conn.client, route = %route.name, error = %e, "refused");
                    HandshakeResult::Refused
                }
                Blame::Upstream | Blame::Internal => {
                    warn!(client = %conn.client, route = %route.name, error = %e, "request failed");
                    HandshakeResult::UpstreamError
                }
            };
            if let Some(reason) = e.reject_reason() {
                shared.metrics.rejected(reason);
            }
            (e.into_response(), outcome)
        }
    };
    count(&route, upgrade, &response, handshake_result, started);
    let mut response = response;
    if http1 && upgrade && handshake_result != HandshakeResult::Upgraded {
        // The head gate stops following the stream once a request asks for an upgrade
        // (what follows a 101 is not HTTP), so a refused upgrade ends the connection too:
        // no request after it goes unchecked.
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    Ok(response)
}

/// `[routes.X.auth]`, when the route has it (after routing and, for an upgrade, the
/// handshake checks with Origin and the limits). Counted in `wsgate_auth_total`.
async fn authenticate<B>(
    req: &mut Request<B>,
    route: &Route,
    conn: &ConnContext,
    host: Option<&str>,
) -> Result<Grant, ProxyError> {
    let Some(auth) = &route.auth else {
        return Ok(Grant::default());
    };
    let client = ClientInfo {
        ip: conn.client.ip(),
        proto: conn.proto(),
        host,
    };
    // Boxed: routes without auth keep a small request future.
    match Box::pin(auth.check(req, client)).await {
        Ok(grant) => {
            route.metrics.auth(AuthResult::Ok);
            Ok(grant)
        }
        Err(refusal) => {
            route.metrics.auth(refusal.result);
            Err(ProxyError::Auth(Box::new(refusal)))
        }
    }
}

/// Answers a request that passed routing, the handshake checks and auth: builtin,
/// upgrade or plain request.
async fn serve(
    req: Request<Incoming>,
    route: &Arc<Route>,
    conn: &Arc<ConnContext>,
    shared: &Arc<Shared>,
    host: Option<&str>,
    upgrade: Option<handshake::Upgrade>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let http1 = req.version() < ::http::Version::HTTP_2;
    match (&route.config.target, &route.upstream, upgrade) {
        (RouteTarget::Builtin(Builtin::Echo), _, Some(upgrade)) => {
            Ok(upgraded::accept_echo(req, route, conn, shared, upgrade))
        }
        (RouteTarget::Builtin(_), _, _) => Ok(builtin_plain_answer(http1)),
        (RouteTarget::Upstream(_), Some(upstream), Some(upgrade)) => {
            let (route, upstream, conn) = (route.clone(), upstream.clone(), conn.clone());
            handshake::forward(req, route, upstream, conn, shared.clone(), host, upgrade).await
        }
        (RouteTarget::Upstream(_), Some(upstream), None) => {
            plain::forward(req, route, upstream, conn, host).await
        }
        (RouteTarget::Upstream(name), None, _) => Err(ProxyError::Internal(format!(
            "route {} names unknown upstream {name}",
            route.name
        ))),
    }
}

/// Counts a finished request or handshake on its route.
fn count(
    route: &Route,
    upgrade: bool,
    response: &Response<ProxyBody>,
    result: HandshakeResult,
    started: Instant,
) {
    let metrics = &route.metrics;
    if !upgrade {
        metrics.http_request(response.status().as_u16());
        return;
    }
    if result == HandshakeResult::Upgraded {
        metrics
            .handshake_duration
            .observe(started.elapsed().as_secs_f64());
    }
    metrics.handshake(result);
}

/// A request refused before routing: counted, logged at debug (it is the client's doing),
/// answered, and the connection closed after the answer.
fn refuse(e: ProxyError, conn: &ConnContext, shared: &Shared) -> Response<ProxyBody> {
    debug!(client = %conn.client, error = %e, "refused");
    if let Some(reason) = e.reject_reason() {
        shared.metrics.rejected(reason);
    }
    let mut response = e.into_response();
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// A plain request to a builtin WebSocket route.
fn builtin_plain_answer(http1: bool) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::text(
        "this route only accepts WebSocket upgrades\n",
    ));
    *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
    if !http1 {
        // HTTP/2 has no Upgrade: the WebSocket comes as an extended CONNECT instead.
        return response;
    }
    let headers = response.headers_mut();
    headers.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    response
}
