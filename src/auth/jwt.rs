//! Bearer tokens: found where `from` says, verified against the route's keys, checked for
//! issuer, audience, `exp` and `nbf`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Uri};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, Validation};
use serde_json::{Map, Value};

use super::jwks::{Key, Keys, RemoteJwks};
use crate::config::{JwksSource, JwtConfig, TokenSource};
use crate::proxy::head::percent_decode;

/// Where a route's verification keys are.
pub enum KeySource {
    /// Only `secret_file`.
    None,
    File(Keys),
    Remote(Arc<RemoteJwks>),
}

/// A route's `jwt` table, ready to verify.
pub struct JwtAuth {
    keys: KeySource,
    secret: Option<Key>,
    algorithms: Option<Vec<Algorithm>>,
    validation: Validation,
    pub leeway: Duration,
    pub from: Vec<TokenSource>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    Algorithm,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    /// No key set was ever fetched: wsgate cannot decide (503).
    KeysUnavailable,
}

impl TokenError {
    /// The one-line reason in the answer and in `error_description`.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed token",
            TokenError::Algorithm => "signing algorithm not accepted",
            TokenError::UnknownKey => "unknown signing key",
            TokenError::BadSignature => "bad signature",
            TokenError::Expired => "token expired",
            TokenError::NotYetValid => "token not yet valid",
            TokenError::Issuer => "wrong issuer",
            TokenError::Audience => "wrong audience",
            TokenError::KeysUnavailable => "signing keys unavailable",
        }
    }
}

/// A verified token's claims and when it expires.
pub struct Verified {
    pub claims: Map<String, Value>,
    /// `exp`, when the token has one.
    pub exp: Option<u64>,
}

impl JwtAuth {
    pub fn new(config: &JwtConfig, remote: impl FnOnce(&Uri) -> Arc<RemoteJwks>) -> JwtAuth {
        super::crypto::install();
        let keys = match &config.jwks {
            None => KeySource::None,
            Some(JwksSource::File { keys, .. }) => KeySource::File(Keys::new(keys)),
            Some(JwksSource::Url(uri)) => KeySource::Remote(remote(uri)),
        };
        // The template every check starts from; `algorithms` is set per token to the one
        // its header names, once that one is known to be allowed.
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = config.leeway.as_secs();
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // A configured issuer or audience is also required: jsonwebtoken alone would let
        // a token without the claim through.
        if config.issuers.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&config.issuers);
            validation.required_spec_claims.insert("iss".to_string());
        }
        if config.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&config.audiences);
            validation.required_spec_claims.insert("aud".to_string());
        }
        JwtAuth {
            keys,
            secret: config.secret.as_ref().and_then(|s| Key::hmac(&s.0)),
            algorithms: config.algorithms.clone(),
            validation,
            leeway: config.leeway,
            from: config.from.clone(),
        }
    }

    /// Verifies `token`: signature, then `exp`, `nbf`, `iss` and `aud`.
    pub async fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| header_error(token))?;
        let alg = header.alg;
        let allowed = self.algorithms.as_deref();
        if allowed.is_some_and(|a| !a.contains(&alg)) {
            return Err(TokenError::Algorithm);
        }
        if alg.family() == AlgorithmFamily::Hmac {
            let Some(secret) = self.secret.as_ref().filter(|s| s.permits(alg, allowed)) else {
                return Err(TokenError::Algorithm);
            };
            return self.check(token, alg, secret);
        }
        let kid = header.kid.as_deref();
        match &self.keys {
            KeySource::None => Err(TokenError::Algorithm),
            KeySource::File(keys) => self.with_keys(token, alg, kid, keys),
            KeySource::Remote(remote) => {
                let keys = match remote.keys() {
                    Some(keys) if kid.is_none_or(|k| keys.has_kid(k)) => keys,
                    // A new key is published before tokens signed with it appear: fetch.
                    _ => remote
                        .refetch_for_unknown_kid()
                        .await
                        .ok_or(TokenError::KeysUnavailable)?,
                };
                self.with_keys(token, alg, kid, &keys)
            }
        }
    }

    fn with_keys(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
        keys: &Keys,
    ) -> Result<Verified, TokenError> {
        if kid.is_some_and(|k| !keys.has_kid(k)) {
            return Err(TokenError::UnknownKey);
        }
        let mut last = TokenError::Algorithm;
        for key in keys.candidates(kid, alg, self.algorithms.as_deref()) {
            match self.check(token, alg, key) {
                Err(TokenError::BadSignature) => last = TokenError::BadSignature,
                result => return result,
            }
        }
        Err(last)
    }

    fn check(&self, token: &str, alg: Algorithm, key: &Key) -> Result<Verified, TokenError> {
        let mut validation = self.validation.clone();
        validation.algorithms = vec![alg];
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidKeyFormat => {
                    TokenError::BadSignature
                }
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidIssuer => TokenError::Issuer,
                ErrorKind::InvalidAudience => TokenError::Audience,
                ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => TokenError::Issuer,
                ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => TokenError::Audience,
                ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => TokenError::Algorithm,
                _ => TokenError::Malformed,
            })?;
        let claims = data.claims;
        // `exp` and `nbf` must be numbers: a token whose `exp` is a string is not one that
        // never expires.
        for name in ["exp", "nbf"] {
            if claims.get(name).is_some_and(|v| !v.is_number()) {
                return Err(TokenError::Malformed);
            }
        }
        let exp = claims.get("exp").and_then(number_seconds);
        Ok(Verified { claims, exp })
    }
}

/// Why a header did not parse: an `alg` wsgate does not know (`none` among them) is said
/// as such; anything else is malformed.
fn header_error(token: &str) -> TokenError {
    use base64::Engine as _;
    let alg = token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|h| serde_json::from_slice::<Value>(&h).ok())
        .is_some_and(|h| h.get("alg").is_some_and(Value::is_string));
    if alg {
        TokenError::Algorithm
    } else {
        TokenError::Malformed
    }
}

/// A NumericDate (RFC 7519 §2): seconds, possibly fractional; rounded down.
fn number_seconds(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

/// How long from now until `exp` + `leeway` (zero if past).
pub fn time_left(exp: u64, leeway: Duration) -> Duration {
    let end = UNIX_EPOCH + Duration::from_secs(exp) + leeway;
    end.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Where a token was found: enough to remove it from what the upstream sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Header,
    Query(String),
    Cookie,
    /// The `Sec-WebSocket-Protocol` entry that held it.
    Protocol,
}

/// The token of an `Authorization: Bearer TOKEN` header (RFC 6750 §2.1), any case of
/// the scheme; `None` for another scheme.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The first token found in the places `from` lists, in order.
pub fn find_token(uri: &Uri, headers: &HeaderMap, from: &[TokenSource]) -> Option<(String, Found)> {
    from.iter().find_map(|source| match source {
        TokenSource::Header(name) => {
            let token = if name == header::AUTHORIZATION.as_str() {
                bearer(headers)?
            } else {
                headers.get(name.as_str())?.to_str().ok()?.trim()
            };
            (!token.is_empty()).then(|| (token.to_string(), Found::Header))
        }
        TokenSource::Query(name) => {
            let value = uri
                .query()?
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v)?;
            let token = percent_decode(value)?;
            (!token.is_empty()).then(|| (token, Found::Query(name.clone())))
        }
        TokenSource::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| (v.trim_matches('"').to_string(), Found::Cookie)),
        TokenSource::Protocol => protocols(headers)
            .find(|p| looks_like_jwt(p))
            .map(|p| (p.to_string(), Found::Protocol)),
    })
}

/// Every `Sec-WebSocket-Protocol` entry the client offered, in order.
pub fn protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// Three base64url parts, the first a JSON object (`eyJ` is `{"` encoded).
fn looks_like_jwt(s: &str) -> bool {
    let mut parts = s.split('.');
    let well_formed = parts.by_ref().take(3).all(|p| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    well_formed && parts.next().is_none() && s.starts_with("eyJ") && s.matches('.').count() == 2
}

/// Removes the token from what the upstream will see: its query parameter, or its
/// `Sec-WebSocket-Protocol` entry. A token in a header or a cookie stays (the upstream may
/// want it, as with nginx and Traefik).
pub fn remove_token<B>(req: &mut Request<B>, found: &Found, token: &str) {
    match found {
        Found::Header | Found::Cookie => {}
        Found::Query(name) => {
            let uri = req.uri_mut();
            let Some(query) = uri.query() else { return };
            let kept: Vec<&str> = query
                .split('&')
                .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
                .collect();
            let path_and_query = if kept.is_empty() {
                uri.path().to_string()
            } else {
                format!("{}?{}", uri.path(), kept.join("&"))
            };
            let mut parts = uri.clone().into_parts();
            parts.path_and_query = path_and_query.parse().ok();
            if let Ok(new) = Uri::from_parts(parts) {
                *uri = new;
            }
        }
        Found::Protocol => {
            let headers = req.headers_mut();
            let kept: Vec<String> = protocols(headers)
                .filter(|p| *p != token)
                .map(str::to_string)
                .collect();
            headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
            if let Ok(value) = HeaderValue::from_str(&kept.join(", ")) {
                if !kept.is_empty() {
                    headers.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
                }
            }
        }
    }
}

/// A claim as a header value: strings as they are, numbers and booleans as written,
/// lists joined with commas, anything else as compact JSON.
pub fn claim_value(v: &Value) -> Option<HeaderValue> {
    let text = match v {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    HeaderValue::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn tokens_are_found_in_order_of_from() {
        let uri: Uri = format!("/ws?room=1&access_token={JWT}").parse().unwrap();
        let h = headers(&[
            ("authorization", "Basic dXNlcjpwdw=="),
            ("cookie", "a=b; session=cookie-token"),
            ("sec-websocket-protocol", &format!("chat, {JWT}")),
        ]);
        let from = |list: &[&str]| -> Vec<TokenSource> {
            list.iter()
                .map(|s| crate::config::token_source(s).unwrap())
                .collect()
        };
        // A Basic Authorization is not a bearer token: the next place is tried.
        let found = find_token(
            &uri,
            &h,
            &from(&["header:Authorization", "query:access_token"]),
        );
        assert_eq!(
            found,
            Some((JWT.to_string(), Found::Query("access_token".into())))
        );
        let found = find_token(&uri, &h, &from(&["cookie:session"]));
        assert_eq!(found, Some(("cookie-token".into(), Found::Cookie)));
        let found = find_token(&uri, &h, &from(&["protocol"]));
        assert_eq!(found, Some((JWT.to_string(), Found::Protocol)));
        let bearer = headers(&[("authorization", &format!("bearer  {JWT}"))]);
        let found = find_token(&uri, &bearer, &from(&["header:Authorization"]));
        assert_eq!(found, Some((JWT.to_string(), Found::Header)));
        assert_eq!(
            find_token(
                &"/".parse().unwrap(),
                &HeaderMap::new(),
                &from(&["query:t", "cookie:c", "protocol"])
            ),
            None
        );
    }

    #[test]
    fn the_token_is_removed_from_query_and_protocols() {
        let request = |uri: String, h: HeaderMap| {
            let mut req = Request::new(());
            *req.uri_mut() = uri.parse().unwrap();
            *req.headers_mut() = h;
            req
        };
        let mut req = request(
            format!("/ws?room=1&access_token={JWT}&x=2"),
            headers(&[
                ("sec-websocket-protocol", &format!("chat, {JWT}")),
                ("sec-websocket-protocol", "v2"),
            ]),
        );
        remove_token(&mut req, &Found::Query("access_token".into()), JWT);
        assert_eq!(req.uri(), "/ws?room=1&x=2");
        remove_token(&mut req, &Found::Protocol, JWT);
        assert_eq!(
            req.headers()
                .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .collect::<Vec<_>>(),
            ["chat, v2"]
        );
        let mut only = request(
            format!("/ws?access_token={JWT}"),
            headers(&[("sec-websocket-protocol", JWT)]),
        );
        remove_token(&mut only, &Found::Query("access_token".into()), JWT);
        remove_token(&mut only, &Found::Protocol, JWT);
        assert_eq!(only.uri(), "/ws");
        assert!(!only.headers().contains_key(header::SEC_WEBSOCKET_PROTOCOL));
    }

    #[test]
    fn only_jwt_shaped_protocols_are_tokens() {
        assert!(looks_like_jwt(JWT));
        for not in [
            "chat",
            "v1.chat.example",
            "eyJ.a",
            "eyJa.b.c.d",
            "eyJa..c",
            "eyJa.b+c.d",
        ] {
            assert!(!looks_like_jwt(not), "{not}");
        }
    }

    #[test]
    fn claims_become_header_values() {
        let v = |j: &str| {
            claim_value(&serde_json::from_str(j).unwrap()).map(|h| h.to_str().unwrap().to_string())
        };
        assert_eq!(v(r#""alice""#).as_deref(), Some("alice"));
        assert_eq!(v("42").as_deref(), Some("42"));
        assert_eq!(v(r#"["a","b",3]"#).as_deref(), Some("a,b,3"));
        assert_eq!(v(r#"{"k":1}"#).as_deref(), Some(r#"{"k":1}"#));
        assert_eq!(v("null"), None);
        assert_eq!(v(r#""line\nbreak""#), None);
    }
}
