//! Forward auth (nginx `auth_request`, Traefik ForwardAuth): the request's method, URI and
//! headers go to an auth service, whose answer decides.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::Empty;

use super::client::{read_body, FetchError, HttpClient};
use crate::config::ForwardConfig;
use crate::proxy::headers::{self, ClientInfo};

/// Largest refusal body relayed from the auth service.
const MAX_DENIAL_BODY: usize = 64 * 1024;

/// Headers of the original request that never go to the auth service: the upgrade pair
/// and what only the upstream's WebSocket handshake needs.
const NOT_FORWARDED: [HeaderName; 5] = [
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_EXTENSIONS,
    header::CONTENT_LENGTH,
    header::HOST,
];

/// A route's `forward` table with its pooled client.
pub struct ForwardAuth {
    url: Uri,
    timeout: std::time::Duration,
    client: HttpClient,
    copy: Vec<HeaderName>,
}

/// What the auth service decided.
pub enum Decision {
    /// 2xx: the headers to copy to the upstream request.
    Allow(Vec<(HeaderName, HeaderValue)>),
    /// 401 or 403, relayed as it came.
    Deny {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// Any other status, or no usable answer: 503 (504 for a timeout), with the reason.
    Fail { status: StatusCode, reason: String },
}

impl ForwardAuth {
    pub fn new(config: &ForwardConfig) -> ForwardAuth {
        ForwardAuth {
            client: HttpClient::new(&config.ca),
            copy: config
                .copy_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            url: config.url.clone(),
            timeout: config.timeout,
        }
    }

    /// The names of the headers copied from the answer: a client's own copies are removed
    /// before the upstream sees the request, whatever the answer.
    pub fn copied(&self) -> &[HeaderName] {
        &self.copy
    }

    /// Asks the auth service about a request with this method, URI and headers.
    pub async fn decide(
        &self,
        method: &Method,
        uri: &Uri,
        original: &HeaderMap,
        client: ClientInfo<'_>,
    ) -> Decision {
        let mut req = Request::new(Empty::<Bytes>::new());
        // Over HTTP/2 a WebSocket is a CONNECT; to the auth service it is the GET it
        // stands for.
        let method = if method == Method::CONNECT {
            Method::GET
        } else {
            method.clone()
        };
        *req.method_mut() = method.clone();
        *req.uri_mut() = self.url.clone();
        let h = req.headers_mut();
        for (name, value) in original {
            if !NOT_FORWARDED.contains(name) {
                h.append(name.clone(), value.clone());
            }
        }
        headers::remove_hop_by_hop(h);
        headers::add_forwarding(h, client);
        let target = uri
            .path_and_query()
            .map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string());
        if let Ok(value) = HeaderValue::from_str(&target) {
            h.insert(HeaderName::from_static("x-forwarded-uri"), value.clone());
            h.insert(HeaderName::from_static("x-original-uri"), value);
        }
        if let Ok(value) = HeaderValue::from_str(method.as_str()) {
            h.insert(HeaderName::from_static("x-forwarded-method"), value.clone());
            h.insert(HeaderName::from_static("x-original-method"), value);
        }
        let timeout = self.timeout;
        let started = tokio::time::Instant::now();
        let response = match self.client.send(req, timeout).await {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        let status = response.status();
        if status.is_success() {
            let mut copy = Vec::new();
            for name in &self.copy {
                for value in response.headers().get_all(name) {
                    copy.push((name.clone(), value.clone()));
                }
            }
            // The body is not needed, but read (it is usually empty) so the connection goes
            // back to the pool; one that does not end in time is dropped instead.
            let left = timeout.saturating_sub(started.elapsed());
            let _ =
                tokio::time::timeout(left, read_body(response.into_body(), MAX_DENIAL_BODY)).await;
            return Decision::Allow(copy);
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let (parts, body) = response.into_parts();
            let left = timeout.saturating_sub(started.elapsed());
            let body = match tokio::time::timeout(left, read_body(body, MAX_DENIAL_BODY)).await {
                Ok(Ok(body)) => body,
                Ok(Err(e)) => return fail(e),
                Err(_) => return fail(FetchError::Timeout(timeout.as_millis())),
            };
            let mut headers = HeaderMap::new();
            for name in [header::WWW_AUTHENTICATE, header::CONTENT_TYPE] {
                for value in parts.headers.get_all(&name) {
                    headers.append(name.clone(), value.clone());
                }
            }
            return Decision::Deny {
                status,
                headers,
                body,
            };
        }
        Decision::Fail {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!("the auth service answered {status}"),
        }
    }
}

fn fail(e: FetchError) -> Decision {
    match e {
        FetchError::Timeout(_) => Decision::Fail {
            status: StatusCode::GATEWAY_TIMEOUT,
            reason: format!("the auth service gave {e}"),
        },
        FetchError::Failed(_) => Decision::Fail {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!("the auth service could not be asked: {e}"),
        },
    }
}
