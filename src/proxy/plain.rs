//! Plain HTTP requests: forwarded to the route's upstream over pooled keep-alive
//! HTTP/1.1 connections, bodies streamed both ways, falling over to the next server when
//! a connect fails.

use std::sync::Arc;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::config::Balance;
use crate::error::{Broken, ProxyError};
use crate::gateway::{ConnContext, Route};
use crate::proxy::body::ProxyBody;
use crate::proxy::headers::{self, ClientInfo};
use crate::router;
use crate::upstream::{sticky, ConnectError, HttpSender, PooledSender, Server, Upstream};

/// Forwards one plain request and returns the upstream's answer (or wsgate's refusal).
pub async fn forward(
    mut req: Request<Incoming>,
    route: &Route,
    upstream: &Arc<Upstream>,
    conn: &ConnContext,
    host: Option<&str>,
) -> Result<Response<ProxyBody>, ProxyError> {
    prepare_request(&mut req, route, conn, host)?;
    let timeouts = &route.config.timeouts;
    let mut last_connect_error = None;

    let servers = upstream.attempt_order(conn.client.ip(), req.headers());
    if let Balance::Cookie(name) = &upstream.balance {
        sticky::strip_request_prefix(req.headers_mut(), name, |id| {
            upstream.servers.iter().any(|s| s.sticky_id() == id)
        });
    }
    for server in servers {
        upstream.set_host(req.headers_mut(), server);
        // Reuse idle connections first; one the server closed meanwhile hands the request
        // back unsent, so it can go on the next one.
        while let Some(mut sender) = server.take_idle() {
            if sender.ready().await.is_err() {
                continue;
            }
            match send(&mut sender, req, upstream, timeouts.upstream_handshake).await {
                Ok(response) => return Ok(into_response(response, upstream, server, sender)),
                Err(SendError::Unsent(back)) => req = back,
                Err(SendError::Failed(e)) => return Err(e),
            }
        }
        let mut sender = match connect_http(upstream, server, timeouts.upstream_connect).await {
            Ok(sender) => sender,
            Err(e) => {
                debug!(upstream = %upstream.name, error = %e, "upstream connect failed, trying the next server");
                last_connect_error = Some(e);
                continue;
            }
        };
        match send(&mut sender, req, upstream, timeouts.upstream_handshake).await {
            Ok(response) => return Ok(into_response(response, upstream, server, sender)),
            Err(SendError::Unsent(_)) => {
                return Err(ProxyError::UpstreamBroken {
                    upstream: upstream.name.to_string(),
                    server: Some(server.label.clone()),
                    source: Broken::ClosedAtOnce,
                })
            }
            Err(SendError::Failed(e)) => return Err(e),
        }
    }
    Err(connect_failure(upstream, last_connect_error))
}

/// The error for "no server of the pool accepted a connection".
pub fn connect_failure(upstream: &Upstream, last: Option<ConnectError>) -> ProxyError {
    match last {
        Some(ConnectError::Timeout { timeout, .. }) => ProxyError::UpstreamConnectTimeout {
            upstream: upstream.name.to_string(),
            timeout_ms: timeout.as_millis(),
        },
        Some(e) => ProxyError::UpstreamConnect {
            upstream: upstream.name.to_string(),
            source: e,
        },
        None => ProxyError::NoHealthyUpstream {
            upstream: upstream.name.to_string(),
        },
    }
}

/// Rewrites the request for the upstream: origin-form URI (prefix stripped if asked),
/// hop-by-hop headers removed, forwarding headers added.
fn prepare_request(
    req: &mut Request<Incoming>,
    route: &Route,
    conn: &ConnContext,
    host: Option<&str>,
) -> Result<(), ProxyError> {
    *req.uri_mut() = upstream_uri(req.uri(), route)?;
    *req.version_mut() = http::Version::HTTP_11;
    let headers = req.headers_mut();
    headers::remove_hop_by_hop(headers);
    headers::add_forwarding(
        headers,
        ClientInfo {
            ip: conn.client.ip(),
            proto: conn.proto(),
            host,
        },
    );
    if !headers.contains_key(http::header::HOST) {
        if let Some(value) = host.and_then(|h| http::HeaderValue::from_str(h).ok()) {
            headers.insert(http::header::HOST, value);
        }
    }
    Ok(())
}

/// The origin-form URI the upstream sees.
pub fn upstream_uri(uri: &Uri, route: &Route) -> Result<Uri, ProxyError> {
    upstream_target(uri, route)?
        .parse()
        .map_err(|_| ProxyError::BadHandshake("request target cannot be forwarded"))
}

/// The request target (path and query, origin form) sent to the upstream.
pub fn upstream_target(uri: &Uri, route: &Route) -> Result<String, ProxyError> {
    let path = if route.config.strip_prefix {
        router::strip_prefix(&route.config.path, uri.path())
    } else {
        uri.path()
    };
    if !path.starts_with('/') {
        return Err(ProxyError::BadHandshake(
            "request target cannot be forwarded",
        ));
    }
    Ok(match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    })
}

enum SendError {
    /// The connection could not take the request; it comes back unsent.
    Unsent(Request<Incoming>),
    Failed(ProxyError),
}

async fn send(
    sender: &mut HttpSender,
    req: Request<Incoming>,
    upstream: &Upstream,
    timeout: std::time::Duration,
) -> Result<Response<Incoming>, SendError> {
    match tokio::time::timeout(timeout, sender.try_send_request(req)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(mut e)) => match e.take_message() {
            Some(req) => Err(SendError::Unsent(req)),
            None => Err(SendError::Failed(ProxyError::UpstreamBroken {
                upstream: upstream.name.to_string(),
                server: None,
                source: Broken::Http(e.into_error()),
            })),
        },
        Err(_) => Err(SendError::Failed(ProxyError::UpstreamTimeout {
            upstream: upstream.name.to_string(),
            timeout_ms: timeout.as_millis(),
        })),
    }
}

fn into_response(
    response: Response<Incoming>,
    upstream: &Upstream,
    server: &Arc<Server>,
    sender: HttpSender,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    if let Balance::Cookie(name) = &upstream.balance {
        sticky::prefix_response_cookie(&mut parts.headers, name, server);
    }
    let pooled = PooledSender {
        server: server.clone(),
        sender,
    };
    Response::from_parts(parts, ProxyBody::upstream(body, Some(pooled)))
}

/// Opens a new HTTP/1.1 connection to `server` and spawns its connection task.
async fn connect_http(
    upstream: &Upstream,
    server: &Server,
    timeout: std::time::Duration,
) -> Result<HttpSender, ConnectError> {
    let stream = upstream.connect(server, timeout).await?;
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Io {
            server: server.label.clone(),
            source: std::io::Error::other(e),
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}
