//! `[routes.X.auth]`: token locations, algorithms, key files, URLs and header names, each
//! problem reported at the value that has it.

use std::str::FromStr;
use std::sync::Arc;

use http::header::HeaderName;
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use toml::Spanned;

use super::defaults;
use super::raw::{RawAuth, RawForward, RawJwt};
use super::Checker;
use crate::config::{AuthConfig, ForwardConfig, JwksSource, JwtConfig, Secret, TokenSource};

/// Shortest HMAC secret accepted: RFC 7518 §3.2 asks for a key at least as long as the
/// hash (256 bits for HS256); shorter ones can be guessed offline from one token.
const MIN_SECRET_BYTES: usize = 32;

/// Headers a claim or an auth answer may not set: they frame the request or the upgrade.
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "connection",
    "upgrade",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
];

impl Checker<'_> {
    pub(super) fn route_auth(
        &mut self,
        raw: Spanned<RawAuth>,
        path_key: &str,
    ) -> Option<Arc<AuthConfig>> {
        let key = format!("{path_key}.auth");
        let span = raw.span();
        let raw = raw.into_inner();
        if raw.jwt.is_none() && raw.forward.is_none() {
            self.report(
                span.clone(),
                format!(
                    r#"{key} needs `jwt` or `forward` (or both), e.g. jwt = {{ jwks = "jwks.json" }} or forward = {{ url = "http://127.0.0.1:9000/auth" }}"#
                ),
            );
            return None;
        }
        let has_jwt = raw.jwt.is_some();
        let jwt = raw.jwt.and_then(|j| self.jwt(j, &format!("{key}.jwt")));
        let forward = raw
            .forward
            .and_then(|f| self.forward(f.into_inner(), &format!("{key}.forward")));
        let mut claims_to_headers = Vec::new();
        if let Some(map) = raw.claims_to_headers {
            if !has_jwt {
                self.report(
                    map.span(),
                    format!(
                        "{key}.claims_to_headers needs `jwt`: claims come from a verified token"
                    ),
                );
            }
            for (claim, header) in map.into_inner() {
                if claim.get_ref().is_empty() {
                    self.report(
                        claim.span(),
                        format!("empty claim name in {key}.claims_to_headers"),
                    );
                    continue;
                }
                let place = format!("for claim {:?} in {key}.claims_to_headers", claim.get_ref());
                if let Some(name) = self.parse(&header, "header name", &place, |h| header_name(h)) {
                    claims_to_headers.push((claim.into_inner(), name));
                }
            }
        }
        let close_on_expiry = match raw.close_on_expiry {
            Some(c) if *c.get_ref() && !has_jwt => {
                self.report(
                    c.span(),
                    format!("{key}.close_on_expiry needs `jwt`: only a verified token has an `exp` to close at"),
                );
                false
            }
            Some(c) => *c.get_ref(),
            None => jwt.is_some(),
        };
        if jwt.is_none() && forward.is_none() {
            return None;
        }
        Some(Arc::new(AuthConfig {
            jwt,
            forward,
            claims_to_headers,
            close_on_expiry,
        }))
    }

    fn jwt(&mut self, raw: Spanned<RawJwt>, key: &str) -> Option<JwtConfig> {
        let span = raw.span();
        let raw = raw.into_inner();
        let mark = self.mark();
        if raw.jwks.is_none() && raw.secret_file.is_none() {
            self.report(
                span,
                format!(
                    r#"{key} needs `jwks` (a JWKS file or an https URL) or `secret_file` (for HS256), e.g. jwks = "jwks.json""#
                ),
            );
        }
        let jwks = raw.jwks.as_ref().and_then(|j| self.jwks(j, key));
        // Whether jwks is an https URL; unknown when its value was refused already.
        let https = match &jwks {
            Some(JwksSource::Url(uri)) => Some(uri.scheme_str() == Some("https")),
            Some(JwksSource::File { .. }) => Some(false),
            None => raw.jwks.is_none().then_some(false),
        };
        let jwks_ca = self.https_ca(
            raw.jwks_ca.as_ref(),
            https,
            &format!("{key}.jwks_ca"),
            "jwks is an https URL",
        );
        let jwks_refresh = match &raw.jwks_refresh {
            Some(v) => {
                self.positive_duration(v, &format!("{key}.jwks_refresh"), defaults::JWKS_REFRESH)
            }
            None => defaults::JWKS_REFRESH,
        };
        let secret = raw.secret_file.as_ref().and_then(|f| self.secret(f, key));
        let algorithms = raw
            .algorithms
            .as_ref()
            .and_then(|list| self.algorithms(list, key, &raw));
        let leeway = match &raw.leeway {
            Some(v) => {
                match self.duration(v, &format!("{key}.leeway")) {
                    Some(d) if d.subsec_nanos() != 0 => {
                        self.report(
                        v.span(),
                        format!("{key}.leeway must be whole seconds (exp and nbf are), e.g. \"30s\""),
                    );
                        defaults::JWT_LEEWAY
                    }
                    Some(d) => d,
                    None => defaults::JWT_LEEWAY,
                }
            }
            None => defaults::JWT_LEEWAY,
        };
        let issuers = self.claim_values(raw.issuer, &format!("{key}.issuer"));
        let audiences = self.claim_values(raw.audience, &format!("{key}.audience"));
        let from = match &raw.from {
            None => vec![TokenSource::Header("authorization".to_string())],
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.report(
                        list.span(),
                        format!(
                            r#"{key}.from is empty: list where the token may be, e.g. ["{}"]"#,
                            defaults::JWT_FROM
                        ),
                    );
                }
                let place = format!("in {key}.from");
                list.get_ref()
                    .iter()
                    .filter_map(|s| self.parse(s, "token location", &place, |s| token_source(s)))
                    .collect()
            }
        };
        if !self.clean_since(mark) {
            return None;
        }
        Some(JwtConfig {
            jwks,
            jwks_refresh,
            jwks_ca,
            secret,
            issuers,
            audiences,
            algorithms,
            leeway,
            from,
        })
    }

    fn jwks(&mut self, value: &Spanned<String>, key: &str) -> Option<JwksSource> {
        let text = value.get_ref();
        if text.contains("://") {
            let place = format!("for {key}.jwks");
            return self
                .parse(value, "URL", &place, |u| fetch_url(u))
                .map(JwksSource::Url);
        }
        let bytes = self.read_file(value, "JWKS", &format!("{key}.jwks"))?;
        match crate::auth::jwks::parse(&bytes) {
            Ok(set) if !set.keys.is_empty() => Some(JwksSource::File {
                path: self.resolve(text),
                keys: Arc::new(set.keys),
            }),
            Ok(set) => {
                let skipped = if set.skipped.is_empty() {
                    String::new()
                } else {
                    format!(" (skipped: {})", set.skipped.join("; "))
                };
                self.report(
                    value.span(),
                    format!("JWKS file {text:?} for {key}.jwks has no usable public key{skipped}"),
                );
                None
            }
            Err(e) => {
                self.report(
                    value.span(),
                    format!("JWKS file {text:?} for {key}.jwks is not a JWK set: {e}"),
                );
                None
            }
        }
    }

    fn secret(&mut self, value: &Spanned<String>, key: &str) -> Option<Secret> {
        let mut bytes = self.read_file(value, "secret", &format!("{key}.secret_file"))?;
        // A file written by `echo` or an editor ends in a newline that is not part of the key.
        while bytes.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
            bytes.pop();
        }
        if bytes.len() < MIN_SECRET_BYTES {
            self.report(
                value.span(),
                format!(
                    "secret in {:?} for {key}.secret_file is {} bytes; HMAC keys need at least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)",
                    value.get_ref(),
                    bytes.len()
                ),
            );
            return None;
        }
        Some(Secret(bytes))
    }

    fn algorithms(
        &mut self,
        list: &Spanned<Vec<Spanned<String>>>,
        key: &str,
        raw: &RawJwt,
    ) -> Option<Vec<Algorithm>> {
        if list.get_ref().is_empty() {
            self.report(
                list.span(),
                format!(r#"{key}.algorithms is empty: list the accepted ones, e.g. ["RS256"], or remove the key to accept what the keys declare"#),
            );
            return None;
        }
        let mut algorithms = Vec::new();
        for name in list.get_ref() {
            let text = name.get_ref();
            let problem = match Algorithm::from_str(text) {
                _ if text.eq_ignore_ascii_case("none") => Some(format!(
                    "algorithm \"none\" in {key}.algorithms is never accepted: an unsigned token proves nothing"
                )),
                Err(_) => Some(format!(
                    "unknown algorithm {text:?} in {key}.algorithms: expected RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384 or HS512"
                )),
                Ok(alg) if alg.family() == AlgorithmFamily::Hmac && raw.secret_file.is_none() => {
                    Some(format!(
                        "{text} in {key}.algorithms needs `secret_file`: HMAC keys never come from a JWKS, so a public key cannot be used as a secret"
                    ))
                }
                Ok(alg) if alg.family() != AlgorithmFamily::Hmac && raw.jwks.is_none() => Some(
                    format!("{text} in {key}.algorithms needs `jwks` to get its public keys from"),
                ),
                Ok(alg) => {
                    if !algorithms.contains(&alg) {
                        algorithms.push(alg);
                    }
                    None
                }
            };
            if let Some(message) = problem {
                self.report(name.span(), message);
            }
        }
        Some(algorithms)
    }

    fn claim_values(
        &mut self,
        raw: Option<Spanned<super::raw::OneOrMany>>,
        key: &str,
    ) -> Vec<String> {
        let Some(raw) = raw else { return Vec::new() };
        let span = raw.span();
        let values = raw.into_inner().into_vec();
        if values.is_empty() || values.iter().any(String::is_empty) {
            self.report(
                span,
                format!("{key} must be a non-empty string or list of non-empty strings; remove the key to accept any"),
            );
        }
        values
    }

    /// The trust anchors of a `ca` key that goes with a URL: loaded when the URL is https,
    /// refused when it is not (`https` is `None` when the URL itself was refused).
    fn https_ca(
        &mut self,
        ca: Option<&Spanned<String>>,
        https: Option<bool>,
        key: &str,
        applies: &str,
    ) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        match (ca, https) {
            (Some(ca), Some(true)) => self.certificates(ca, key).unwrap_or_default(),
            (Some(ca), Some(false)) => {
                self.report(ca.span(), format!("{key} only applies when {applies}"));
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn forward(&mut self, raw: RawForward, key: &str) -> Option<ForwardConfig> {
        let mark = self.mark();
        let url = self.parse(&raw.url, "URL", &format!("for {key}.url"), |u| {
            forward_url(u)
        });
        let https = url.as_ref().map(|u| u.scheme_str() == Some("https"));
        let ca = self.https_ca(raw.ca.as_ref(), https, &format!("{key}.ca"), "url is https");
        let timeout = match &raw.timeout {
            Some(v) => {
                self.positive_duration(v, &format!("{key}.timeout"), defaults::FORWARD_TIMEOUT)
            }
            None => defaults::FORWARD_TIMEOUT,
        };
        let mut copy_headers = Vec::new();
        if let Some(list) = &raw.copy_headers {
            let place = format!("in {key}.copy_headers");
            for h in list.get_ref() {
                if let Some(name) = self.parse(h, "header name", &place, |h| header_name(h)) {
                    copy_headers.push(name);
                }
            }
        }
        let url = url?;
        self.clean_since(mark).then_some(ForwardConfig {
            url,
            timeout,
            copy_headers,
            ca,
        })
    }
}

/// A header name wsgate may set on the upstream request, lower-cased.
fn header_name(s: &str) -> Result<String, String> {
    let name = HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| "not a valid header name (letters, digits and -)".to_string())?;
    if RESERVED_HEADERS.contains(&name.as_str()) {
        return Err(format!(
            "{} frames the request or the upgrade and cannot be set; pick a name such as \"X-User-Id\"",
            name.as_str()
        ));
    }
    Ok(name.as_str().to_string())
}

/// `header:NAME`, `query:NAME`, `cookie:NAME` or `protocol`.
pub fn token_source(s: &str) -> Result<TokenSource, String> {
    const EXPECTED: &str = r#"expected "header:NAME", "query:NAME", "cookie:NAME" or "protocol""#;
    if s == "protocol" {
        return Ok(TokenSource::Protocol);
    }
    let (kind, name) = s.split_once(':').ok_or_else(|| EXPECTED.to_string())?;
    if name.is_empty() {
        return Err(format!("the name after \"{kind}:\" is missing; {EXPECTED}"));
    }
    match kind {
        "header" => HeaderName::from_bytes(name.as_bytes())
            .map(|h| TokenSource::Header(h.as_str().to_string()))
            .map_err(|_| format!("{name:?} is not a valid header name")),
        "query" => Ok(TokenSource::Query(name.to_string())),
        "cookie"
            if name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b";=,".contains(&b)) =>
        {
            Ok(TokenSource::Cookie(name.to_string()))
        }
        "cookie" => Err(format!("{name:?} is not a valid cookie name")),
        _ => Err(EXPECTED.to_string()),
    }
}

/// A JWKS URL: https, or http to a loopback address (a local key-serving sidecar); keys
/// fetched in the clear from anywhere else could be replaced on the way.
fn fetch_url(s: &str) -> Result<http::Uri, String> {
    let uri = absolute_url(s)?;
    if uri.scheme_str() == Some("http") && !is_loopback(uri.host().unwrap_or("")) {
        return Err(
            "keys fetched over plain http could be replaced on the way; use https (http is accepted for loopback addresses only)"
                .to_string(),
        );
    }
    Ok(uri)
}

/// A forward-auth URL: http or https.
fn forward_url(s: &str) -> Result<http::Uri, String> {
    absolute_url(s)
}

fn absolute_url(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|_| {
        r#"expected an absolute URL such as "https://auth.example.com/jwks.json""#.to_string()
    })?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("the scheme must be http or https".to_string()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_string());
    }
    Ok(uri)
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::config::{Config, JwksSource, TokenSource};

    const RSA_JWK: &str = r#"{"kty":"RSA","kid":"k1","alg":"RS256","e":"AQAB","n":"u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw"}"#;

    struct Files(tempfile::TempDir);

    impl Files {
        fn new() -> Files {
            let files = Files(tempfile::tempdir().unwrap());
            files.write("jwks.json", &format!(r#"{{"keys":[{RSA_JWK}]}}"#));
            files.write("secret.txt", "0123456789abcdef0123456789abcdef\n");
            files.write("short.txt", "tooshort\n");
            files.write("oct.json", r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#);
            files
        }

        fn write(&self, name: &str, contents: &str) {
            std::fs::write(self.0.path().join(name), contents).unwrap();
        }

        fn source(&self) -> PathBuf {
            self.0.path().join("proxy.toml")
        }

        /// A config whose echo route has `auth` (the auth table starts on line 5).
        fn load(&self, auth: &str) -> Result<Config, Vec<String>> {
            let text = format!(
                "[listeners.public]\nbind = \"127.0.0.1:8080\"\n[routes.echo]\nbuiltin = \"echo\"\n[routes.echo.auth]\n{auth}\n"
            );
            super::super::on_disk::load(&self.source(), &text)
        }

        #[track_caller]
        fn one_problem(&self, auth: &str, position: &str, phrase: &str) {
            super::super::on_disk::one_problem(self.load(auth), position, phrase);
        }
    }

    #[test]
    fn defaults_and_every_key() {
        let files = Files::new();
        let config = files.load(r#"jwt = { jwks = "jwks.json" }"#).unwrap();
        let auth = config.routes[0].auth.as_ref().unwrap();
        let jwt = auth.jwt.as_ref().unwrap();
        assert!(auth.close_on_expiry, "on by default with jwt");
        assert_eq!(jwt.leeway, super::defaults::JWT_LEEWAY);
        assert_eq!(jwt.jwks_refresh, super::defaults::JWKS_REFRESH);
        assert_eq!(jwt.from, [TokenSource::Header("authorization".into())]);
        assert_eq!(jwt.algorithms, None);
        assert!(matches!(&jwt.jwks, Some(JwksSource::File { keys, .. }) if keys.len() == 1));

        let config = files
            .load(
                r#"jwt = { jwks = "https://keys.example.com/jwks.json", jwks_refresh = "1m", secret_file = "secret.txt", issuer = ["a", "b"], audience = "chat", algorithms = ["ES256", "HS256"], leeway = "0s", from = ["query:access_token", "cookie:session", "protocol", "header:X-Token"] }
claims_to_headers = { sub = "X-User-Id", "org.id" = "x-org" }
forward = { url = "http://127.0.0.1:9000/auth", timeout = "500ms", copy_headers = ["X-User"] }
close_on_expiry = false"#,
            )
            .unwrap();
        let auth = config.routes[0].auth.as_ref().unwrap();
        let jwt = auth.jwt.as_ref().unwrap();
        assert!(!auth.close_on_expiry);
        assert_eq!(
            jwt.secret.as_ref().unwrap().0.len(),
            32,
            "the newline is not part of it"
        );
        assert_eq!(jwt.issuers, ["a", "b"]);
        assert_eq!(jwt.audiences, ["chat"]);
        assert_eq!(jwt.from.len(), 4);
        assert_eq!(jwt.from[3], TokenSource::Header("x-token".into()));
        assert_eq!(
            auth.claims_to_headers,
            [
                ("org.id".to_string(), "x-org".to_string()),
                ("sub".to_string(), "x-user-id".to_string())
            ]
        );
        let forward = auth.forward.as_ref().unwrap();
        assert_eq!(forward.timeout, std::time::Duration::from_millis(500));
        assert_eq!(forward.copy_headers, ["x-user"]);
        assert!(
            format!("{:?}", jwt.secret).contains("32 bytes"),
            "secrets are never printed"
        );
    }

    #[test]
    fn each_problem_is_reported_at_its_value() {
        let f = Files::new();
        f.one_problem(
            "close_on_expiry = true",
            "5:1: ",
            "needs `jwt` or `forward`",
        );
        f.one_problem("jwt = { issuer = \"x\" }", "6:7: ", "needs `jwks`");
        f.one_problem(
            r#"jwt = { jwks = "jwks.json", algorithms = ["none"] }"#,
            "6:43: ",
            "never accepted",
        );
        f.one_problem(
            r#"jwt = { jwks = "jwks.json", algorithms = ["HS256"] }"#,
            "6:43: ",
            "needs `secret_file`",
        );
        f.one_problem(
            r#"jwt = { secret_file = "secret.txt", algorithms = ["RS256"] }"#,
            "6:51: ",
            "needs `jwks`",
        );
        f.one_problem(
            r#"jwt = { jwks = "jwks.json", algorithms = ["RS257"] }"#,
            "6:43: ",
            "unknown algorithm \"RS257\"",
        );
        f.one_problem(
            r#"jwt = { secret_file = "short.txt" }"#,
            "6:23: ",
            "at least 32",
        );
        f.one_problem(
            r#"jwt = { jwks = "missing.json" }"#,
            "6:16: ",
            "cannot read JWKS file",
        );
        f.one_problem(
            r#"jwt = { jwks = "oct.json" }"#,
            "6:16: ",
            "no usable public key (skipped: key 0: a symmetric key",
        );
        f.one_problem(
            r#"jwt = { jwks = "secret.txt" }"#,
            "6:16: ",
            "is not a JWK set",
        );
        f.one_problem(
            r#"jwt = { jwks = "http://keys.example.com/jwks" }"#,
            "6:16: ",
            "use https",
        );
        f.one_problem(
            r#"jwt = { jwks = "jwks.json", from = ["body:token"] }"#,
            "6:37: ",
            "expected \"header:NAME\"",
        );
        f.one_problem(
            r#"jwt = { jwks = "jwks.json", jwks_ca = "ca.pem" }"#,
            "6:39: ",
            "only applies when jwks is an https URL",
        );
        f.one_problem(
            "jwt = { jwks = \"jwks.json\" }\nclaims_to_headers = { sub = \"Host\" }",
            "7:29: ",
            "host frames the request",
        );
        f.one_problem(
            "forward = { url = \"http://127.0.0.1:9/a\" }\nclaims_to_headers = { sub = \"X-User\" }",
            "7:21: ",
            "needs `jwt`",
        );
        f.one_problem(
            "forward = { url = \"ftp://auth\" }",
            "6:19: ",
            "http or https",
        );
        f.one_problem(
            "forward = { url = \"http://auth/a\", timeout = \"0s\" }",
            "6:46: ",
            "must be more than zero",
        );
        f.one_problem("forward = { url = \"http://auth/a\", bogus = 1 }", "6:36: ", "unknown key `bogus` in [routes.echo.auth.forward]; expected one of: url, timeout, copy_headers, ca");
        // A loopback key server may speak plain http.
        assert!(f
            .load(r#"jwt = { jwks = "http://127.0.0.1:8000/jwks" }"#)
            .is_ok());
    }
}
