//! Authentication at the edge (`[routes.X.auth]`): a JWT verified against a key set, a
//! forward-auth subrequest, or both, checked after routing and Origin and before any
//! upstream is touched. Verified claims can become upstream headers, and a WebSocket whose
//! token expires is closed at `exp` (see `close_on_expiry` in the tunnel).
//!
//! - `crypto`: signature checks on ring for `jsonwebtoken`.
//! - `jwks`: key sets from files and URLs, refreshed and shared across reloads.
//! - `jwt`: finding, verifying and removing tokens.
//! - `forward`: the subrequest.
//! - `client`: the pooled HTTP(S) client both use.

pub mod client;
mod crypto;
pub mod forward;
pub mod jwks;
pub mod jwt;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode};

use crate::config::AuthConfig;
use crate::metrics::{AuthResult, Metrics};
use crate::proxy::headers::ClientInfo;
use forward::{Decision, ForwardAuth};
use jwks::JwksCache;
use jwt::{Found, JwtAuth, TokenError};

/// A route's `auth` table, ready to check requests.
pub struct RouteAuth {
    jwt: Option<JwtAuth>,
    forward: Option<ForwardAuth>,
    claims_to_headers: Vec<(String, HeaderName)>,
    close_on_expiry: bool,
}

impl std::fmt::Debug for RouteAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteAuth")
            .field("jwt", &self.jwt.is_some())
            .field("forward", &self.forward.is_some())
            .finish()
    }
}

/// What a passed check leaves for the connection.
#[derive(Debug, Default)]
pub struct Grant {
    /// `close_on_expiry`: when the token's `exp` + leeway passes.
    pub expires_at: Option<tokio::time::Instant>,
    /// The token came as the client's only `Sec-WebSocket-Protocol` entry: a browser fails
    /// the connection unless the 101 names an entry it offered, so wsgate names this one
    /// when the upstream (which never saw it) chose none.
    pub protocol_token: Option<String>,
}

impl Grant {
    /// The time left from now to the token's expiry, taken when the tunnel starts so the
    /// upstream's handshake time is not added to it.
    pub fn time_left(&self) -> Option<Duration> {
        self.expires_at
            .map(|at| at.saturating_duration_since(tokio::time::Instant::now()))
    }
}

/// A request auth refused: the answer and how it is counted.
#[derive(Debug)]
pub struct Refusal {
    pub result: AuthResult,
    pub status: StatusCode,
    /// The one-line reason, also in the body for wsgate's own refusals.
    pub reason: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Refusal {
    fn missing() -> Refusal {
        let mut headers = HeaderMap::new();
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Refusal::own(
            AuthResult::Missing,
            StatusCode::UNAUTHORIZED,
            "authentication required: no bearer token in the request".to_string(),
            headers,
        )
    }

    fn token(e: TokenError) -> Refusal {
        if e == TokenError::KeysUnavailable {
            return Refusal::own(
                AuthResult::Error,
                StatusCode::SERVICE_UNAVAILABLE,
                "authentication unavailable: the signing keys could not be fetched".to_string(),
                HeaderMap::new(),
            );
        }
        let mut headers = HeaderMap::new();
        let challenge = format!(
            "Bearer error=\"invalid_token\", error_description=\"{}\"",
            e.reason()
        );
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            headers.insert(header::WWW_AUTHENTICATE, value);
        }
        let result = if e == TokenError::Expired {
            AuthResult::Expired
        } else {
            AuthResult::Invalid
        };
        Refusal::own(
            result,
            StatusCode::UNAUTHORIZED,
            format!("invalid token: {}", e.reason()),
            headers,
        )
    }

    /// One of wsgate's own refusals: the reason is the body.
    fn own(
        result: AuthResult,
        status: StatusCode,
        reason: String,
        mut headers: HeaderMap,
    ) -> Refusal {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        let body = Bytes::from(format!("{reason}\n"));
        Refusal {
            result,
            status,
            reason,
            headers,
            body,
        }
    }
}

impl RouteAuth {
    pub fn new(config: &AuthConfig, jwks: &JwksCache, metrics: &Arc<Metrics>) -> RouteAuth {
        let jwt = config
            .jwt
            .as_ref()
            .map(|j| JwtAuth::new(j, |uri| jwks.get(uri, &j.jwks_ca, j.jwks_refresh, metrics)));
        RouteAuth {
            jwt,
            forward: config.forward.as_ref().map(ForwardAuth::new),
            claims_to_headers: config
                .claims_to_headers
                .iter()
                .filter_map(|(claim, h)| {
                    Some((claim.clone(), HeaderName::from_bytes(h.as_bytes()).ok()?))
                })
                .collect(),
            close_on_expiry: config.close_on_expiry,
        }
    }

    /// Checks a request; on success rewrites it for the upstream (token removed from the
    /// query or the subprotocols, claims and the auth service's headers added, clients'
    /// copies of those removed).
    pub async fn check<B>(
        &self,
        req: &mut Request<B>,
        client: ClientInfo<'_>,
    ) -> Result<Grant, Refusal> {
        let mut grant = Grant::default();
        let mut verified = None;
        if let Some(jwt) = &self.jwt {
            let (token, found) = jwt::find_token(req.uri(), req.headers(), &jwt.from)
                .ok_or_else(Refusal::missing)?;
            let claims = jwt.verify(&token).await.map_err(Refusal::token)?;
            if self.close_on_expiry {
                grant.expires_at = claims
                    .exp
                    .map(|exp| tokio::time::Instant::now() + jwt::time_left(exp, jwt.leeway));
            }
            verified = Some((token, found, claims.claims));
        }
        let mut copied = Vec::new();
        if let Some(forward) = &self.forward {
            match forward
                .decide(req.method(), req.uri(), req.headers(), client)
                .await
            {
                Decision::Allow(headers) => copied = headers,
                Decision::Deny {
                    status,
                    headers,
                    body,
                } => {
                    return Err(Refusal {
                        result: AuthResult::Denied,
                        status,
                        reason: format!("denied by the auth service ({status})"),
                        headers,
                        body,
                    })
                }
                Decision::Fail { status, reason } => {
                    return Err(Refusal::own(
                        AuthResult::Error,
                        status,
                        format!("authentication unavailable: {reason}"),
                        HeaderMap::new(),
                    ))
                }
            }
        }

        let headers = req.headers_mut();
        // Whatever the client sent under the names wsgate sets is not passed on.
        for (_, name) in &self.claims_to_headers {
            headers.remove(name);
        }
        if let Some(forward) = &self.forward {
            for name in forward.copied() {
                headers.remove(name);
            }
        }
        for (name, value) in copied {
            headers.append(name, value);
        }
        if let Some((token, found, claims)) = verified {
            for (claim, name) in &self.claims_to_headers {
                if let Some(value) = claims.get(claim).and_then(jwt::claim_value) {
                    headers.insert(name.clone(), value);
                }
            }
            jwt::remove_token(req, &found, &token);
            let offered = req.headers().contains_key(header::SEC_WEBSOCKET_PROTOCOL);
            if found == Found::Protocol && !offered {
                grant.protocol_token = Some(token);
            }
        }
        Ok(grant)
    }
}
