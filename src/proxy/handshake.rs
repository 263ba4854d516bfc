//! WebSocket upgrades (RFC 6455 §4): checked before any upstream is touched, forwarded
//! over a fresh HTTP/1.1 connection (spoken directly, see `upgrade`), the upstream's answer
//! relayed as is, and on a verified 101 both sockets handed to the tunnel.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use sha1::{Digest, Sha1};
use tokio::io::AsyncWriteExt;
use tracing::debug;

use crate::config::Balance;
use crate::error::{Broken, ProxyError};
use crate::gateway::{ConnContext, Route, Shared};
use crate::limits::Permit;
use crate::proxy::body::ProxyBody;
use crate::proxy::headers::{self, ClientInfo};
use crate::proxy::plain::{connect_failure, upstream_target};
use crate::proxy::{upgrade, upgraded};
use crate::upstream::sticky;
use crate::upstream::Upstream;
use crate::ws;

/// RFC 6455 §1.3: the GUID appended to the key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// True for an HTTP/1.1 WebSocket upgrade: `Connection` lists `upgrade` and `Upgrade`
/// lists `websocket` (any case, any order, any number of header lines).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == http::Version::HTTP_11
        && headers::has_token(req.headers(), &header::CONNECTION, "upgrade")
        && headers::has_token(req.headers(), &header::UPGRADE, "websocket")
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    BASE64.encode(sha.finalize())
}

/// Checks what wsgate can check itself and returns the client's key.
pub fn validate<B>(req: &Request<B>, route: &Route) -> Result<HeaderValue, ProxyError> {
    if req.method() != Method::GET {
        return Err(ProxyError::BadHandshake("the method must be GET"));
    }
    let h = req.headers();
    if h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
    {
        return Err(ProxyError::BadHandshake(
            "an upgrade request must not have a body",
        ));
    }
    let mut versions = h.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13" => {}
        _ => return Err(ProxyError::UnsupportedVersion),
    }
    let mut keys = h.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k,
        (None, _) => return Err(ProxyError::BadHandshake("Sec-WebSocket-Key is missing")),
        _ => return Err(ProxyError::BadHandshake("Sec-WebSocket-Key is repeated")),
    };
    // 16 bytes are 24 base64 characters; room for 18 lets a longer key fail as too long.
    let mut raw = [0u8; 18];
    match BASE64.decode_slice(key.as_bytes().trim_ascii(), &mut raw) {
        Ok(16) => {}
        _ => {
            return Err(ProxyError::BadHandshake(
                "Sec-WebSocket-Key must be 16 bytes in base64",
            ))
        }
    }
    if let Some(allowed) = &route.config.allowed_origins {
        let origin = h.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        match origin {
            Some(o) if allowed.iter().any(|a| a.eq_ignore_ascii_case(o)) => {}
            Some(o) => return Err(ProxyError::OriginNotAllowed(o.to_string())),
            None => return Err(ProxyError::OriginNotAllowed(String::new())),
        }
    }
    Ok(key.clone())
}

/// Applies `[limits]` to an upgrade; the permit counts the connection until dropped.
pub fn admit(shared: &Shared, conn: &ConnContext) -> Result<Permit, ProxyError> {
    let gateway = shared.gateway.load();
    shared
        .admission
        .admit(conn.client.ip(), &gateway.limits)
        .map_err(ProxyError::Limited)
}

/// Handles an upgrade on a route with an upstream: forward, verify, splice.
pub async fn forward(
    mut req: Request<Incoming>,
    route: Arc<Route>,
    upstream: Arc<Upstream>,
    conn: Arc<ConnContext>,
    shared: Arc<Shared>,
    host: Option<&str>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let key = validate(&req, &route)?;
    let permit = admit(&shared, &conn)?;
    let mut headers = upstream_headers(&req, &conn, host);
    if let Balance::Cookie(name) = &upstream.balance {
        sticky::strip_request_prefix(&mut headers, name, |id| {
            upstream.servers.iter().any(|s| s.sticky_id() == id)
        });
    }
    let target = upstream_target(req.uri(), &route)?;
    let timeouts = route.config.timeouts;

    let mut last_connect_error = None;
    let mut attempt = None;
    for server in upstream.attempt_order(conn.client.ip(), req.headers()) {
        match upstream.connect(server, timeouts.upstream_connect).await {
            Ok(stream) => {
                attempt = Some((server.clone(), stream));
                break;
            }
            Err(e) => {
                debug!(upstream = %upstream.name, error = %e, "upstream connect failed, trying the next server");
                last_connect_error = Some(e);
            }
        }
    }
    let Some((server, mut stream)) = attempt else {
        return Err(connect_failure(&upstream, last_connect_error));
    };
    let active = server.track();
    upstream.set_host(&mut headers, &server);
    let request_head = upgrade::encode_request(&target, &headers);
    drop(headers);
    // Every way the upstream's answer can be unusable: 502 naming the server and the problem.
    let broken = |problem: Broken| ProxyError::UpstreamBroken {
        upstream: upstream.name.to_string(),
        server: Some(server.label.clone()),
        source: problem,
    };

    let exchange = async {
        stream.write_all(&request_head).await?;
        stream.flush().await?;
        upgrade::read_response(&mut stream).await
    };
    let head = match tokio::time::timeout(timeouts.upstream_handshake, exchange).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => return Err(broken(e.into())),
        Err(_) => {
            return Err(ProxyError::UpstreamTimeout {
                upstream: upstream.name.to_string(),
                timeout_ms: timeouts.upstream_handshake.as_millis(),
            })
        }
    };
    let upgrade::ResponseHead {
        status,
        mut headers,
        rest,
    } = head;

    if status != StatusCode::SWITCHING_PROTOCOLS {
        // Relayed as is: the upstream refused (401, 403, 404, ...) and the client should see why.
        let framing = upgrade::framing(status, &headers).map_err(|e| broken(e.into()))?;
        if headers.contains_key(header::TRANSFER_ENCODING) {
            headers.remove(header::CONTENT_LENGTH);
        }
        headers::remove_hop_by_hop(&mut headers);
        if let Balance::Cookie(name) = &upstream.balance {
            sticky::prefix_response_cookie(&mut headers, name, &server);
        }
        return Ok(response(
            status,
            headers,
            ProxyBody::raw(upgrade::RawBody::new(stream, rest, framing)),
        ));
    }
    let expected = accept_key(key.as_bytes());
    let accept = headers.get(header::SEC_WEBSOCKET_ACCEPT);
    if accept.map(|a| a.as_bytes()) != Some(expected.as_bytes()) {
        return Err(broken(Broken::WrongAccept));
    }

    // Frames the upstream sent right behind its 101 (rare): handed to the tunnel first.
    let early = if rest.is_empty() {
        Bytes::new()
    } else {
        rest.freeze()
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let subprotocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let record = upgraded::new_record(
        &shared,
        &route,
        &conn,
        Some((&upstream, &server)),
        subprotocol,
    );
    let settings = upgraded::tunnel_settings(timeouts, &shared).with_extensions(
        headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    debug!(id = record.identity.id, route = %route.name, server = %server.label, "upgraded");
    let tracked = shared.clone();
    shared.tunnels.spawn(async move {
        let (_active, _permit) = (active, permit);
        let client = match client_upgrade.await {
            Ok(client) => client,
            Err(e) => {
                debug!(id = record.identity.id, error = %e, "client upgrade did not complete");
                return;
            }
        };
        let (client, client_early) = upgraded::client_io(client);
        let tunnel = ws::tunnel_to(
            client,
            client_early,
            stream,
            early,
            settings,
            record.clone(),
        );
        ws::run(tunnel, record, &tracked.connections).await;
    });

    if let Balance::Cookie(name) = &upstream.balance {
        sticky::prefix_response_cookie(&mut headers, name, &server);
    }
    Ok(response(status, headers, ProxyBody::empty()))
}

fn response(status: StatusCode, headers: HeaderMap, body: ProxyBody) -> Response<ProxyBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// The headers sent to the upstream: the client's, hop-by-hop removed except the upgrade
/// pair, forwarding headers added.
fn upstream_headers<B>(req: &Request<B>, conn: &ConnContext, host: Option<&str>) -> HeaderMap {
    let upgrade = req.headers().get(header::UPGRADE).cloned();
    let mut forwarded = req.headers().clone();
    headers::remove_hop_by_hop(&mut forwarded);
    headers::add_forwarding(
        &mut forwarded,
        ClientInfo {
            ip: conn.client.ip(),
            proto: conn.proto(),
            host,
        },
    );
    forwarded.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    forwarded.insert(
        header::UPGRADE,
        upgrade.unwrap_or(HeaderValue::from_static("websocket")),
    );
    forwarded
}

/// The 101 wsgate sends when it answers an upgrade itself (builtin routes).
pub fn switching_protocols(key: &HeaderValue) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
