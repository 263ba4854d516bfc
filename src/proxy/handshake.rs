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

use crate::auth::{jwt, Grant};
use crate::config::Balance;
use crate::error::{Broken, ProxyError};
use crate::gateway::{ConnContext, Route, Shared};
use crate::limits::Permit;
use crate::proxy::body::ProxyBody;
use crate::proxy::headers::{self, ClientInfo, Forwarding, Keep};
use crate::proxy::plain::{connect_failure, upstream_target};
use crate::proxy::{upgrade, upgraded};
use crate::upstream::sticky;
use crate::upstream::Upstream;
use crate::ws;

/// RFC 6455 §1.3: the GUID appended to the key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// How a client asks for a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeKind {
    /// HTTP/1.1: `Connection` lists `upgrade` and `Upgrade` lists `websocket` (any case, any
    /// order, any number of header lines); answered with 101.
    Http1,
    /// HTTP/2 extended CONNECT with `:protocol = websocket` (RFC 8441); answered with 200,
    /// and the stream carries the WebSocket.
    ExtendedConnect,
}

impl UpgradeKind {
    /// The kind of WebSocket request `req` is, if it is one.
    pub fn of<B>(req: &Request<B>) -> Option<UpgradeKind> {
        if req.version() == http::Version::HTTP_11
            && headers::has_token(req.headers(), &header::CONNECTION, "upgrade")
            && headers::has_token(req.headers(), &header::UPGRADE, "websocket")
        {
            return Some(UpgradeKind::Http1);
        }
        let protocol = req.extensions().get::<hyper::ext::Protocol>();
        if req.version() == http::Version::HTTP_2
            && req.method() == Method::CONNECT
            && protocol.is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
        {
            return Some(UpgradeKind::ExtendedConnect);
        }
        None
    }

    /// `http_version` in the admin API's connection list.
    pub fn http_version(self) -> &'static str {
        match self {
            UpgradeKind::Http1 => "1.1",
            UpgradeKind::ExtendedConnect => "2",
        }
    }

    /// The status that tells the client its WebSocket is open.
    pub fn accepted_status(self) -> StatusCode {
        match self {
            UpgradeKind::Http1 => StatusCode::SWITCHING_PROTOCOLS,
            UpgradeKind::ExtendedConnect => StatusCode::OK,
        }
    }
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    BASE64.encode(sha.finalize())
}

/// Checks what wsgate can check itself and returns the key for the upstream: the client's
/// on HTTP/1.1; over HTTP/2, where clients send none (RFC 8441 §5), one wsgate makes.
pub fn validate<B>(
    req: &Request<B>,
    route: &Route,
    kind: UpgradeKind,
) -> Result<HeaderValue, ProxyError> {
    let h = req.headers();
    if kind == UpgradeKind::Http1 {
        if req.method() != Method::GET {
            return Err(ProxyError::BadHandshake("the method must be GET"));
        }
        if h.contains_key(header::TRANSFER_ENCODING)
            || h.get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0")
        {
            return Err(ProxyError::BadHandshake(
                "an upgrade request must not have a body",
            ));
        }
    }
    let mut versions = h.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13" => {}
        _ => return Err(ProxyError::UnsupportedVersion),
    }
    check_origin(h, route)?;
    if kind == UpgradeKind::ExtendedConnect {
        return Ok(new_key());
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
    Ok(key.clone())
}

/// The route's `allowed_origins`, when it has them.
pub fn check_origin(h: &HeaderMap, route: &Route) -> Result<(), ProxyError> {
    if let Some(allowed) = &route.config.allowed_origins {
        let origin = h.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        match origin {
            Some(o) if allowed.iter().any(|a| a.eq_ignore_ascii_case(o)) => {}
            Some(o) => return Err(ProxyError::OriginNotAllowed(o.to_string())),
            None => return Err(ProxyError::OriginNotAllowed(String::new())),
        }
    }
    Ok(())
}

/// A fresh `Sec-WebSocket-Key` (16 random bytes in base64).
fn new_key() -> HeaderValue {
    let raw: [u8; 16] = rand::random();
    let mut text = [0u8; 24];
    let n = BASE64.encode_slice(raw, &mut text).unwrap_or(0);
    HeaderValue::from_bytes(&text[..n])
        .unwrap_or(HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="))
}

/// Applies `[limits]` to an upgrade; the permit counts the connection until dropped.
pub fn admit(shared: &Shared, conn: &ConnContext) -> Result<Permit, ProxyError> {
    let gateway = shared.gateway.load();
    shared
        .admission
        .admit(conn.client.ip(), &gateway.limits)
        .map_err(ProxyError::Limited)
}

/// An upgrade that passed the handshake checks, the limits and auth.
pub struct Upgrade {
    pub kind: UpgradeKind,
    /// The key for the upstream (see [`validate`]).
    pub key: HeaderValue,
    /// Counts the connection in `[limits]` until dropped.
    pub permit: Permit,
    pub grant: Grant,
}

/// Handles an upgrade on a route with an upstream: forward, verify, splice.
pub async fn forward(
    mut req: Request<Incoming>,
    route: Arc<Route>,
    upstream: Arc<Upstream>,
    conn: Arc<ConnContext>,
    shared: Arc<Shared>,
    host: Option<&str>,
    upgrade: Upgrade,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Upgrade {
        kind,
        key,
        permit,
        grant,
    } = upgrade;
    let target = upstream_target(req.uri(), &route)?;
    let timeouts = route.config.timeouts;

    // At most max_pending_handshakes towards this upstream at once; the others wait their
    // turn (a reconnect storm reaches a restarted app as a queue), for upstream_handshake.
    let turn = tokio::time::timeout(timeouts.upstream_handshake, upstream.handshakes.acquire());
    let _turn = match turn.await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) => return Err(ProxyError::Internal("handshake queue closed".into())),
        Err(_) => {
            return Err(ProxyError::HandshakeQueue {
                upstream: upstream.name.to_string(),
                limit: upstream.max_pending_handshakes,
                timeout_ms: timeouts.upstream_handshake.as_millis(),
            })
        }
    };

    // The servers to try, chosen on the head as the client sent it (stickiness, hashing).
    let order = upstream.attempt_order(conn.client.ip(), req.headers());
    // The client's head becomes the upstream's, edited in place: no copy of the map.
    // Forwarding headers are written into the head, not set in the map (no grow, no copies).
    let client = ClientInfo {
        ip: conn.client.ip(),
        proto: conn.proto(),
        host,
    };
    let forwarding = Forwarding::new(req.headers(), client);
    let headers = req.headers_mut();
    to_upstream(headers);
    headers.insert(header::SEC_WEBSOCKET_KEY, key.clone());
    if let Balance::Cookie(name) = &upstream.balance {
        sticky::strip_request_prefix(headers, name, |id| {
            upstream.servers.iter().any(|s| s.sticky_id() == id)
        });
    }

    let mut last_connect_error = None;
    let mut attempt = None;
    for server in order {
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
    upstream.set_host(req.headers_mut(), &server);
    let request_head = upgrade::encode_request(&target, req.headers(), &forwarding);
    drop(forwarding);
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
        if kind == UpgradeKind::ExtendedConnect && status.is_success() {
            return Err(broken(Broken::NotUpgraded(status)));
        }
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
    // The upstream's choice is what the connection list shows (never a token wsgate echoes).
    let subprotocol = match headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        Some(chosen) => {
            let chosen = chosen.to_str().unwrap_or("").trim();
            if !jwt::protocols(req.headers()).any(|p| p == chosen) {
                return Err(broken(Broken::UnofferedProtocol(chosen.to_string())));
            }
            Some(chosen.to_owned())
        }
        None => None,
    };
    if let (None, Some(token)) = (&subprotocol, &grant.protocol_token) {
        // The client offered only its token; the upstream never saw it and chose none.
        if let Ok(value) = HeaderValue::from_str(token) {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
        }
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    let record = upgraded::new_record(
        &shared,
        &route,
        &conn,
        Some((&upstream, &server)),
        subprotocol,
        kind,
    );
    let settings = upgraded::tunnel_settings(timeouts, &shared)
        .with_extensions(
            headers
                .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        )
        .expiring(grant.time_left());
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
    if kind == UpgradeKind::ExtendedConnect {
        // RFC 8441 §5: no Sec-WebSocket-Accept, and HTTP/2 has no Connection or Upgrade.
        for name in [
            header::SEC_WEBSOCKET_ACCEPT,
            header::CONNECTION,
            header::UPGRADE,
        ] {
            headers.remove(name);
        }
    }
    Ok(response(
        kind.accepted_status(),
        headers,
        ProxyBody::empty(),
    ))
}

fn response(status: StatusCode, headers: HeaderMap, body: ProxyBody) -> Response<ProxyBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Turns the client's headers into those sent to the upstream (with the forwarding
/// headers `encode_request` adds): hop-by-hop removed except the upgrade pair.
fn to_upstream(forwarded: &mut HeaderMap) {
    let upgrade = forwarded.get(header::UPGRADE).cloned();
    // The upgrade pair stays where it is and is overwritten below: no removal and re-insert.
    headers::strip_hop_by_hop(forwarded, Keep::UpgradePair);
    forwarded.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    forwarded.insert(
        header::UPGRADE,
        upgrade.unwrap_or(HeaderValue::from_static("websocket")),
    );
}

/// The answer wsgate sends when it accepts an upgrade itself (builtin routes): 101 with the
/// accept key on HTTP/1.1, 200 over HTTP/2.
pub fn accepted(kind: UpgradeKind, key: &HeaderValue) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = kind.accepted_status();
    if kind == UpgradeKind::ExtendedConnect {
        return response;
    }
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
