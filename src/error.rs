//! The request path's one error type: each refusal knows its status, its one-line reason
//! and whose fault it was (client, upstream or wsgate itself).

use http::{header, HeaderValue, Response, StatusCode};

use crate::limits::Refusal;
use crate::metrics::RejectReason;
use crate::proxy::body::ProxyBody;

/// Who caused a failure; logs and metrics use it to tell a broken client from a broken backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Client,
    Upstream,
    Internal,
}

/// Why a head was refused before hyper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadRefusal {
    TooLarge {
        limit: usize,
    },
    TooManyHeaders {
        limit: usize,
    },
    /// Both `Content-Length` and `Transfer-Encoding`.
    AmbiguousLength,
    /// `Content-Length` twice (equal or not).
    DuplicateLength,
    /// The HTTP/2 connection preface on a listener without `http2`.
    Http2Preface,
}

impl HeadRefusal {
    /// The refusal as the request path's error (status and one-line reason).
    pub fn error(self) -> ProxyError {
        match self {
            HeadRefusal::TooLarge { limit } => ProxyError::HeadTooLarge { limit },
            HeadRefusal::TooManyHeaders { limit } => ProxyError::TooManyHeaders { limit },
            HeadRefusal::AmbiguousLength => {
                ProxyError::BadRequest("both Content-Length and Transfer-Encoding")
            }
            HeadRefusal::DuplicateLength => {
                ProxyError::BadRequest("more than one Content-Length header")
            }
            HeadRefusal::Http2Preface => ProxyError::HttpVersion,
        }
    }
}

/// What was wrong with an upstream's answer.
#[derive(Debug, thiserror::Error)]
pub enum Broken {
    #[error(transparent)]
    Head(#[from] crate::proxy::upgrade::HeadError),
    #[error("answered 101 with a wrong Sec-WebSocket-Accept")]
    WrongAccept,
    /// RFC 6455 §4.1: the client must fail such a connection; a 502 says why.
    #[error("chose subprotocol {0:?}, which the client did not offer")]
    UnofferedProtocol(String),
    /// A 2xx other than 101 to an upgrade: relayed over HTTP/2 it would tell the client
    /// its WebSocket is open.
    #[error("answered {0} to a WebSocket upgrade instead of 101")]
    NotUpgraded(http::StatusCode),
    #[error("closed a new connection at once")]
    ClosedAtOnce,
    #[error(transparent)]
    Http(hyper::Error),
}

/// "SERVER " before a broken answer's problem, when the server is known.
fn server_prefix(server: &Option<std::sync::Arc<str>>) -> String {
    server
        .as_deref()
        .map(|s| format!("{s} "))
        .unwrap_or_default()
}

/// Every way a request or handshake can be refused by wsgate.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request head is ambiguous or malformed (two Hosts, a path above `/`, ...).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request header fields too large: the request head is larger than {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("request header fields too large: more than {limit} header lines")]
    TooManyHeaders { limit: usize },
    /// HTTP/2 with prior knowledge on a listener that serves HTTP/1.1 only.
    #[error("HTTP version not supported: this listener speaks HTTP/1.1 only")]
    HttpVersion,
    #[error("no route for host {host:?} and path {path:?}")]
    NoRoute { host: String, path: String },
    #[error("bad WebSocket handshake: {0}")]
    BadHandshake(&'static str),
    #[error("unsupported WebSocket version: only version 13 is supported")]
    UnsupportedVersion,
    #[error("origin {0:?} is not allowed for this route")]
    OriginNotAllowed(String),
    #[error("too many WebSocket connections: {0}")]
    Limited(crate::limits::Refusal),
    #[error("upstream {upstream:?} has no healthy server")]
    NoHealthyUpstream { upstream: String },
    #[error("upstream {upstream:?} refused the connection: {source}")]
    UpstreamConnect {
        upstream: String,
        #[source]
        source: crate::upstream::ConnectError,
    },
    #[error("upstream {upstream:?} did not accept the connection within {timeout_ms} ms")]
    UpstreamConnectTimeout { upstream: String, timeout_ms: u128 },
    #[error("upstream {upstream:?} did not answer within {timeout_ms} ms")]
    UpstreamTimeout { upstream: String, timeout_ms: u128 },
    /// `max_pending_handshakes` were in progress for the whole `upstream_handshake`.
    #[error("upstream {upstream:?} has {limit} WebSocket handshakes in progress (max_pending_handshakes); this one waited {timeout_ms} ms for its turn")]
    HandshakeQueue {
        upstream: String,
        limit: u32,
        timeout_ms: u128,
    },
    #[error("upstream {upstream:?} sent a broken answer: {}{source}", server_prefix(.server))]
    UpstreamBroken {
        upstream: String,
        /// The server that answered, when known.
        server: Option<std::sync::Arc<str>>,
        #[source]
        source: Broken,
    },
    /// `[routes.X.auth]` refused the request (or could not decide).
    #[error("{}", .0.reason)]
    Auth(Box<crate::auth::Refusal>),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HttpVersion => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            ProxyError::HeadTooLarge { .. } | ProxyError::TooManyHeaders { .. } => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadHandshake(_) => StatusCode::BAD_REQUEST,
            ProxyError::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
            ProxyError::OriginNotAllowed(_) => StatusCode::FORBIDDEN,
            ProxyError::UpstreamConnect { .. } | ProxyError::UpstreamBroken { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamConnectTimeout { .. } | ProxyError::UpstreamTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Limited(Refusal::MaxConnections)
            | ProxyError::NoHealthyUpstream { .. }
            | ProxyError::HandshakeQueue { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Auth(refusal) => refusal.status,
        }
    }

    pub fn blame(&self) -> Blame {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::HttpVersion
            | ProxyError::HeadTooLarge { .. }
            | ProxyError::TooManyHeaders { .. }
            | ProxyError::NoRoute { .. }
            | ProxyError::BadHandshake(_)
            | ProxyError::UnsupportedVersion
            | ProxyError::OriginNotAllowed(_)
            | ProxyError::Limited(_) => Blame::Client,
            ProxyError::UpstreamConnect { .. }
            | ProxyError::NoHealthyUpstream { .. }
            | ProxyError::UpstreamConnectTimeout { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::HandshakeQueue { .. }
            | ProxyError::UpstreamBroken { .. } => Blame::Upstream,
            ProxyError::Internal(_) => Blame::Internal,
            // The auth service or key server failing is a backend's fault, not the client's.
            ProxyError::Auth(refusal) if refusal.status.is_server_error() => Blame::Upstream,
            ProxyError::Auth(_) => Blame::Client,
        }
    }

    /// The `wsgate_rejected_total` reason, for refusals wsgate makes itself.
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::HttpVersion
            | ProxyError::HeadTooLarge { .. }
            | ProxyError::TooManyHeaders { .. } => Some(RejectReason::BadRequest),
            ProxyError::NoRoute { .. } => Some(RejectReason::NoRoute),
            ProxyError::BadHandshake(_) | ProxyError::UnsupportedVersion => {
                Some(RejectReason::BadHandshake)
            }
            ProxyError::OriginNotAllowed(_) => Some(RejectReason::Origin),
            ProxyError::Limited(Refusal::MaxConnections) => Some(RejectReason::MaxConnections),
            ProxyError::Limited(Refusal::PerIp) => Some(RejectReason::PerIp),
            ProxyError::Limited(Refusal::RateLimit) => Some(RejectReason::RateLimit),
            _ => None,
        }
    }

    /// The answer the client gets: the status and a one-line text body saying why.
    pub fn into_response(self) -> Response<ProxyBody> {
        if let ProxyError::Auth(refusal) = self {
            let crate::auth::Refusal {
                status,
                headers,
                body,
                ..
            } = *refusal;
            let mut response = Response::new(ProxyBody::text(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            return response;
        }
        let status = self.status();
        let mut response = Response::new(ProxyBody::text(format!("{self}\n")));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(
            self,
            ProxyError::Limited(_) | ProxyError::HandshakeQueue { .. }
        ) {
            // Clients with backoff use it; one second matches the rate bucket's refill.
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UPGRADE_REQUIRED {
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;
    use crate::proxy::upgrade::HeadError;

    #[test]
    fn upstream_errors_keep_their_source() {
        let e = ProxyError::UpstreamBroken {
            upstream: "chat".into(),
            server: Some("127.0.0.1:9001".into()),
            source: HeadError::Truncated.into(),
        };
        assert_eq!(
            e.to_string(),
            "upstream \"chat\" sent a broken answer: 127.0.0.1:9001 closed the connection in the middle of its response head"
        );
        let source = e.source().expect("a source");
        assert!(matches!(
            source.downcast_ref::<Broken>(),
            Some(Broken::Head(HeadError::Truncated))
        ));
        let e = ProxyError::UpstreamBroken {
            upstream: "chat".into(),
            server: None,
            source: Broken::WrongAccept,
        };
        assert_eq!(
            e.to_string(),
            "upstream \"chat\" sent a broken answer: answered 101 with a wrong Sec-WebSocket-Accept"
        );
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    }
}
