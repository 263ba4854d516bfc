//! JSON Web Key Sets: parsed once into verification keys, from a file (read with the
//! configuration) or a URL (fetched, refreshed every `jwks_refresh` and on an unknown
//! `kid`, the last good set kept when a fetch fails).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::Empty;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{info, warn};

use super::client::{read_body, FetchError, HttpClient};
use crate::metrics::Metrics;

/// An unknown `kid` fetches the set again at most this often: a token with a made-up `kid`
/// must not turn wsgate into a load generator against the key server.
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(10);
/// A fetch that takes longer than this failed; the handshake waiting on it gets 503.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted (real ones are a few KiB).
const MAX_JWKS_BYTES: usize = 1 << 20;
/// After a failed fetch, the next try comes this soon (or at `jwks_refresh` if sooner).
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(10);

/// A JWKS document's usable keys, and a note for each key left out.
#[derive(Debug, Default)]
pub struct ParsedSet {
    pub keys: Vec<Jwk>,
    pub skipped: Vec<String>,
}

/// Parses a JWKS document. Keys wsgate cannot verify with (encryption keys, symmetric
/// keys, unknown types or curves) are skipped with a note rather than failing the set.
pub fn parse(bytes: &[u8]) -> Result<ParsedSet, String> {
    #[derive(Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut set = ParsedSet::default();
    for (i, value) in doc.keys.into_iter().enumerate() {
        let label = match value.get("kid").and_then(serde_json::Value::as_str) {
            Some(kid) => format!("kid {kid:?}"),
            None => format!("key {i}"),
        };
        match serde_json::from_value::<Jwk>(value) {
            Ok(jwk) => match Key::from_jwk(&jwk) {
                Ok(_) => set.keys.push(jwk),
                Err(why) => set.skipped.push(format!("{label}: {why}")),
            },
            Err(e) => set.skipped.push(format!("{label}: {e}")),
        }
    }
    Ok(set)
}

/// One verification key.
pub struct Key {
    pub kid: Option<String>,
    /// The `alg` the key declares, if any: then it verifies that algorithm only.
    declared: Option<Algorithm>,
    /// What an undeclared key verifies when `algorithms` is not set.
    implied: Algorithm,
    pub key: DecodingKey,
}

impl Key {
    fn from_jwk(jwk: &Jwk) -> Result<Key, String> {
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            return Err("an encryption key (\"use\": \"enc\")".to_string());
        }
        let implied = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                _ => return Err("unsupported curve (P-256 and P-384 are)".to_string()),
            },
            AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
                EllipticCurve::Ed25519 => Algorithm::EdDSA,
                _ => return Err("unsupported curve (Ed25519 is)".to_string()),
            },
            AlgorithmParameters::OctetKey(_) => {
                return Err(
                    "a symmetric key (\"kty\": \"oct\"): HMAC secrets belong in secret_file, never in a key set"
                        .to_string(),
                )
            }
            _ => return Err("unsupported key type".to_string()),
        };
        let declared = match jwk.common.key_algorithm {
            None => None,
            Some(alg) => Some(signing_algorithm(alg).ok_or_else(|| {
                format!("algorithm {alg:?} is not a signature algorithm wsgate verifies")
            })?),
        };
        if declared.is_some_and(|d| d.family() != implied.family()) {
            return Err("its \"alg\" does not fit its key type".to_string());
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
        Ok(Key {
            kid: jwk.common.key_id.clone(),
            declared,
            implied,
            key,
        })
    }

    /// The `secret_file` secret.
    pub fn hmac(secret: &[u8]) -> Option<Key> {
        Some(Key {
            kid: None,
            declared: None,
            implied: Algorithm::HS256,
            key: DecodingKey::from_secret(secret).ok()?,
        })
    }

    /// Whether this key may verify a token signed with `alg`, given the route's
    /// `algorithms` (`None`: the key's own).
    pub fn permits(&self, alg: Algorithm, allowed: Option<&[Algorithm]>) -> bool {
        if alg.family() != self.implied.family() {
            return false;
        }
        let listed = allowed.map_or(alg == self.declared.unwrap_or(self.implied), |a| {
            a.contains(&alg)
        });
        listed && self.declared.is_none_or(|d| d == alg)
    }

    fn family(&self) -> AlgorithmFamily {
        self.implied.family()
    }
}

fn signing_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The keys of one set.
#[derive(Default)]
pub struct Keys(Vec<Key>);

impl Keys {
    /// Every usable key of `jwks` (already checked by [`parse`]).
    pub fn new(jwks: &[Jwk]) -> Keys {
        Keys(jwks.iter().filter_map(|j| Key::from_jwk(j).ok()).collect())
    }

    /// The keys that may verify a token with this `kid` and `alg`: the one with that
    /// `kid`, or without a `kid` in the token, every key permitting `alg`.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
        allowed: Option<&'a [Algorithm]>,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.0.iter().filter(move |k| {
            k.family() != AlgorithmFamily::Hmac
                && kid.is_none_or(|kid| k.kid.as_deref() == Some(kid))
                && k.permits(alg, allowed)
        })
    }

    /// True when some key has this `kid` (whatever its algorithm).
    pub fn has_kid(&self, kid: &str) -> bool {
        self.0.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A key set behind a URL, shared by every route (and configuration generation) that
/// names the same URL and CA.
pub struct RemoteJwks {
    pub uri: Uri,
    label: String,
    client: HttpClient,
    /// `jwks_refresh` of the latest configuration that uses the set.
    refresh: Mutex<Duration>,
    keys: ArcSwapOption<Keys>,
    /// Held while fetching, so a fetch for an unknown `kid` waits for one under way and
    /// then uses its result; holds the time of the last fetch an unknown `kid` caused.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("uri", &self.label)
            .finish()
    }
}

impl RemoteJwks {
    /// The last good set; `None` until the first fetch succeeds.
    pub fn keys(&self) -> Option<Arc<Keys>> {
        self.keys.load_full()
    }

    /// A token named a `kid` the set does not have: fetch the set again (unless an unknown
    /// `kid` did so in the last 10 s) and return the newest keys.
    pub async fn refetch_for_unknown_kid(&self) -> Option<Arc<Keys>> {
        let before = self.keys.load_full();
        let mut last = self.fetching.lock().await;
        let fetched_meanwhile = !same_set(&before, &self.keys.load_full());
        let recent = last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_REFETCH);
        if !fetched_meanwhile && !recent {
            *last = Some(Instant::now());
            self.fetch().await;
        }
        drop(last);
        self.keys()
    }

    /// Fetches the set; on success it replaces the current one. True on success.
    async fn fetch(&self) -> bool {
        let result = self.download().await;
        self.metrics.jwks_fetch(&self.label, result.is_ok());
        match result {
            Ok(keys) => {
                let first = self.keys.load().is_none();
                if first {
                    info!(jwks = %self.label, keys = keys.len(), "fetched the JWKS");
                }
                self.keys.store(Some(Arc::new(keys)));
                true
            }
            Err(e) => {
                let kept = match self.keys.load().as_ref() {
                    Some(k) => format!("keeping the last good set of {} keys", k.len()),
                    None => "no keys yet: tokens are refused with 503".to_string(),
                };
                warn!(jwks = %self.label, error = %e, "JWKS fetch failed; {kept}");
                false
            }
        }
    }

    async fn download(&self) -> Result<Keys, String> {
        let req = Request::get(self.uri.clone())
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("wsgate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let response = self
            .client
            .send(req, FETCH_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        if response.status() != StatusCode::OK {
            return Err(format!("answered {}", response.status()));
        }
        let left = FETCH_TIMEOUT.saturating_sub(started.elapsed());
        let body = match tokio::time::timeout(left, read_body(response.into_body(), MAX_JWKS_BYTES))
            .await
        {
            Ok(body) => body.map_err(|e| e.to_string())?,
            Err(_) => return Err(FetchError::Timeout(FETCH_TIMEOUT.as_millis()).to_string()),
        };
        let set = parse(&body).map_err(|e| format!("not a JWK set: {e}"))?;
        for skipped in &set.skipped {
            warn!(jwks = %self.label, "JWKS key skipped: {skipped}");
        }
        if set.keys.is_empty() {
            return Err("no usable public key in the set".to_string());
        }
        Ok(Keys::new(&set.keys))
    }
}

fn same_set(a: &Option<Arc<Keys>>, b: &Option<Arc<Keys>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// A URL and the DER of the CA certificates its fetches trust.
type SetKey = (String, Vec<Vec<u8>>);

/// Every URL key set in use, by URL and CA, so a reload that keeps a URL keeps its keys
/// (and does not fetch it again). Sets no configuration uses any more are dropped, and
/// their refresh tasks end.
#[derive(Debug, Default)]
pub struct JwksCache {
    sets: Mutex<HashMap<SetKey, Weak<RemoteJwks>>>,
}

impl JwksCache {
    /// The shared set for `uri` and `ca`, fetched in the background from now on.
    pub fn get(
        &self,
        uri: &Uri,
        ca: &[CertificateDer<'static>],
        refresh: Duration,
        metrics: &Arc<Metrics>,
    ) -> Arc<RemoteJwks> {
        let key = (
            uri.to_string(),
            ca.iter().map(|c| c.as_ref().to_vec()).collect::<Vec<_>>(),
        );
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        sets.retain(|_, weak| weak.strong_count() > 0);
        if let Some(set) = sets.get(&key).and_then(Weak::upgrade) {
            *set.refresh.lock().unwrap_or_else(|e| e.into_inner()) = refresh;
            return set;
        }
        let set = Arc::new(RemoteJwks {
            uri: uri.clone(),
            label: uri.to_string(),
            client: HttpClient::new(ca),
            refresh: Mutex::new(refresh),
            keys: ArcSwapOption::empty(),
            fetching: tokio::sync::Mutex::new(None),
            metrics: metrics.clone(),
        });
        sets.insert(key, Arc::downgrade(&set));
        tokio::spawn(keep_fresh(Arc::downgrade(&set)));
        set
    }
}

/// Fetches a set now and then every `jwks_refresh` (sooner after a failure), until no
/// configuration uses it.
async fn keep_fresh(set: Weak<RemoteJwks>) {
    let mut first = true;
    loop {
        let Some(strong) = set.upgrade() else { return };
        let guard = strong.fetching.lock().await;
        // A handshake may have fetched the set before this task first ran.
        let ok = if first && strong.keys.load().is_some() {
            true
        } else {
            strong.fetch().await
        };
        drop(guard);
        first = false;
        let refresh = *strong.refresh.lock().unwrap_or_else(|e| e.into_inner());
        let wait = if ok {
            refresh
        } else {
            refresh.min(RETRY_AFTER_ERROR)
        };
        drop(strong);
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_N: &str = "u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw";

    fn rsa(extra: &str) -> String {
        format!(r#"{{"kty":"RSA","n":"{RSA_N}","e":"AQAB"{extra}}}"#)
    }

    #[test]
    fn unusable_keys_are_skipped_with_a_reason() {
        let doc = format!(
            r#"{{"keys":[{},{},{{"kty":"oct","k":"c2VjcmV0","kid":"s"}},{},{{"kty":"EC","crv":"P-521","x":"AA","y":"AA","kid":"p521"}}]}}"#,
            rsa(r#","kid":"good","alg":"RS256""#),
            rsa(r#","kid":"enc","use":"enc""#),
            rsa(r#","kid":"oaep","alg":"RSA-OAEP""#),
        );
        let set = parse(doc.as_bytes()).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].common.key_id.as_deref(), Some("good"));
        let notes = set.skipped.join("\n");
        for phrase in ["\"enc\"", "symmetric", "RSA_OAEP", "curve"] {
            assert!(notes.contains(phrase), "{phrase} not in {notes}");
        }
        assert!(parse(b"{\"nokeys\":1}").is_err());
        assert!(parse(b"[").is_err());
    }

    #[test]
    fn a_key_verifies_its_own_algorithm_only() {
        let declared = Keys::new(
            &parse(format!(r#"{{"keys":[{}]}}"#, rsa(r#","alg":"PS256""#)).as_bytes())
                .unwrap()
                .keys,
        );
        let undeclared = Keys::new(
            &parse(format!(r#"{{"keys":[{}]}}"#, rsa("")).as_bytes())
                .unwrap()
                .keys,
        );
        let (d, u) = (&declared.0[0], &undeclared.0[0]);
        assert!(d.permits(Algorithm::PS256, None));
        assert!(!d.permits(Algorithm::RS256, None));
        assert!(!d.permits(
            Algorithm::RS256,
            Some(&[Algorithm::RS256, Algorithm::PS256])
        ));
        assert!(u.permits(Algorithm::RS256, None));
        assert!(!u.permits(Algorithm::RS512, None));
        assert!(u.permits(Algorithm::RS512, Some(&[Algorithm::RS512])));
        // Never across families: an RSA key is not an HMAC secret.
        assert!(!u.permits(Algorithm::HS256, Some(&[Algorithm::HS256])));
        assert!(!u.permits(Algorithm::ES256, Some(&[Algorithm::ES256])));
    }
}
