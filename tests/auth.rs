//! Authentication at the edge: JWTs from every location and with every key type, each
//! way a token is refused, JWKS URLs (rotation, outage, reload), forward auth, claims as
//! headers, and a live WebSocket closed when its token expires.

#[path = "support/jwt.rs"]
mod jwt;
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt as _;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jwt::{jwks, now, Signer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use support::*;

const SECRET: &str = "an HMAC secret of at least 32 bytes!";

/// Test keys and the JWKS file that holds their public halves.
struct Keys {
    rsa: Signer,
    ec: Signer,
    ed: Signer,
    hmac: Signer,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            rsa: Signer::rsa("rsa-1"),
            ec: Signer::ec("ec-1"),
            ed: Signer::ed("ed-1"),
            hmac: Signer::hmac(SECRET.as_bytes()),
        }
    }

    fn write(&self, dir: &TestDir) {
        dir.write("jwks.json", jwks(&[&self.rsa, &self.ec, &self.ed]));
        dir.write("secret.txt", format!("{SECRET}\n"));
    }
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"sub": sub, "iss": "https://issuer.test", "aud": "chat", "exp": now() + 3600, "iat": now()})
}

/// Listener `public`, a WebSocket upstream route `/ws` with `auth`, and `extra` tables.
fn config(upstream: SocketAddr, auth: &str, extra: &str) -> String {
    format!(
        r#"{RELAXED_TIMEOUTS}
[listeners.public]
bind = "127.0.0.1:0"

[upstreams.app]
servers = ["{upstream}"]

[routes.ws]
path = "/ws"
upstream = "app"

[routes.ws.auth]
{auth}
{extra}
"#
    )
}

const JWT_FILE: &str = r#"jwt = { jwks = "jwks.json", secret_file = "secret.txt", algorithms = ["RS256", "ES256", "EdDSA", "HS256"], issuer = "https://issuer.test", audience = "chat", from = ["header:Authorization", "query:access_token", "cookie:session", "protocol"] }
claims_to_headers = { sub = "X-User-Id" }"#;

/// A WebSocket request to `/ws{suffix}` on `addr` with extra headers.
fn ws_request(addr: SocketAddr, suffix: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut req = format!("ws://{addr}/ws{suffix}")
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    req
}

/// The value of one metric series line (`name{labels} value`), 0 when absent.
async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let text = raw_exchange(
        admin,
        &http_request("GET", "/metrics", &[("Host", "admin")]),
    )
    .await
    .body_text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().expect("a counter value"))
}

fn auth_series(result: &str) -> String {
    format!("wsgate_auth_total{{result=\"{result}\",route=\"ws\"}}")
}

#[tokio::test]
async fn tokens_from_every_location_and_key_type_reach_the_upstream_as_claims() {
    let keys = Keys::new();
    let dir = TestDir::new();
    keys.write(&dir);
    let mut upstream = spawn_ws_upstream_with_protocols(&["chat"]).await;
    let proxy = spawn_proxy(&config(upstream.addr, JWT_FILE, ""), &dir).await;
    let addr = proxy.addr("public");

    // RS256 in the Authorization header, with a spoofed X-User-Id that must not survive.
    let token = keys.rsa.sign(&claims("alice"));
    let bearer = format!("Bearer {token}");
    let req = ws_request(
        addr,
        "",
        &[("Authorization", &bearer), ("X-User-Id", "mallory")],
    );
    let (mut ws, _) = ws_connect(req).await;
    let echoed = echo_transcript(&mut ws, &[Message::text("hello")]).await;
    assert_eq!(echoed, [Message::text("hello")]);
    let seen = upstream.requests.next("the RS256 upgrade").await;
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    assert_eq!(
        seen.header("authorization"),
        Some(bearer.as_str()),
        "a header token stays"
    );

    // ES256 in the query: removed from what the upstream sees, the other parameters kept.
    let token = keys.ec.sign(&claims("bob"));
    let (mut ws, _) = ws_connect(ws_request(
        addr,
        &format!("?room=7&access_token={token}&x=1"),
        &[],
    ))
    .await;
    echo_transcript(&mut ws, &[Message::text("q")]).await;
    let seen = upstream.requests.next("the ES256 upgrade").await;
    assert_eq!(seen.uri, "/ws?room=7&x=1");
    assert_eq!(seen.header("x-user-id"), Some("bob"));

    // EdDSA in a cookie.
    let token = keys.ed.sign(&claims("carol"));
    let cookie = format!("theme=dark; session={token}");
    let (mut ws, _) = ws_connect(ws_request(addr, "", &[("Cookie", &cookie)])).await;
    echo_transcript(&mut ws, &[Message::text("c")]).await;
    assert_eq!(
        upstream
            .requests
            .next("the EdDSA upgrade")
            .await
            .header("x-user-id"),
        Some("carol")
    );

    // HS256 with the secret file, as a subprotocol next to the real one (the browser way):
    // the upstream sees only "chat" and chooses it.
    let token = keys.hmac.sign(&claims("dave"));
    let offer = format!("chat, {token}");
    let (mut ws, response) =
        ws_connect(ws_request(addr, "", &[("Sec-WebSocket-Protocol", &offer)])).await;
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
    echo_transcript(&mut ws, &[Message::text("p")]).await;
    let seen = upstream.requests.next("the subprotocol upgrade").await;
    assert_eq!(seen.header("sec-websocket-protocol"), Some("chat"));
    assert_eq!(seen.header("x-user-id"), Some("dave"));

    // The token as the only subprotocol: the upstream sees none and chooses none, and the
    // 101 names the token so a browser accepts it.
    let token = keys.rsa.sign(&claims("erin"));
    let (mut ws, response) =
        ws_connect(ws_request(addr, "", &[("Sec-WebSocket-Protocol", &token)])).await;
    assert_eq!(response.headers()["sec-websocket-protocol"], token.as_str());
    echo_transcript(&mut ws, &[Message::text("only")]).await;
    let seen = upstream.requests.next("the token-only upgrade").await;
    assert_eq!(seen.header("sec-websocket-protocol"), None);

    assert_eq!(metric(proxy.admin(), &auth_series("ok")).await, 5);
}

#[tokio::test]
async fn every_bad_token_gets_401_with_its_reason_and_never_reaches_the_upstream() {
    let keys = Keys::new();
    let dir = TestDir::new();
    keys.write(&dir);
    let upstream = spawn_ws_upstream().await;
    let proxy = spawn_proxy(&config(upstream.addr, JWT_FILE, ""), &dir).await;
    let addr = proxy.addr("public");
    let stranger = Signer::ec("ec-1");
    let none_header = json!({"alg": "none", "typ": "JWT"});
    let unsigned = format!(
        "{}.{}.",
        jwt::b64(none_header.to_string().as_bytes()),
        jwt::b64(claims("x").to_string().as_bytes())
    );
    let mut c = claims("x");
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "expired",
            keys.rsa.sign(&{
                c["exp"] = json!(now() - 120);
                c.clone()
            }),
            "token expired",
            "expired",
        ),
        (
            "not yet valid",
            keys.rsa.sign(&{
                c = claims("x");
                c["nbf"] = json!(now() + 600);
                c.clone()
            }),
            "token not yet valid",
            "invalid",
        ),
        (
            "wrong issuer",
            keys.rsa.sign(&{
                c = claims("x");
                c["iss"] = json!("https://evil.test");
                c.clone()
            }),
            "wrong issuer",
            "invalid",
        ),
        (
            "wrong audience",
            keys.ec.sign(&{
                c = claims("x");
                c["aud"] = json!("billing");
                c.clone()
            }),
            "wrong audience",
            "invalid",
        ),
        (
            "no issuer",
            keys.ec.sign(&{
                c = claims("x");
                c.as_object_mut().unwrap().remove("iss");
                c.clone()
            }),
            "wrong issuer",
            "invalid",
        ),
        (
            "no audience",
            keys.ed.sign(&{
                c = claims("x");
                c.as_object_mut().unwrap().remove("aud");
                c.clone()
            }),
            "wrong audience",
            "invalid",
        ),
        (
            "exp as a string",
            keys.ec.sign(&{
                c = claims("x");
                c["exp"] = json!("never");
                c.clone()
            }),
            "malformed token",
            "invalid",
        ),
        (
            "bad signature",
            stranger.sign(&claims("x")),
            "bad signature",
            "invalid",
        ),
        (
            "alg none",
            unsigned,
            "signing algorithm not accepted",
            "invalid",
        ),
        (
            "HS256 signed with the RSA public key",
            jwt::hs256_with(
                &keys.rsa.rsa_public_der(),
                &json!({"alg": "HS256", "kid": "rsa-1"}),
                &claims("x"),
            ),
            "bad signature",
            "invalid",
        ),
        (
            "unknown kid",
            Signer::ec("ec-9").sign(&claims("x")),
            "unknown signing key",
            "invalid",
        ),
        (
            "garbage",
            "not.a.token".to_string(),
            "malformed token",
            "invalid",
        ),
    ];
    for (what, token, reason, _) in &cases {
        let bearer = format!("Bearer {token}");
        let mut headers = ws_headers("chat.test");
        headers.push(("Authorization", &bearer));
        let answer = raw_exchange(addr, &http_request("GET", "/ws", &headers)).await;
        assert_eq!(answer.status, 401, "{what}: {}", answer.body_text());
        assert_eq!(
            answer.body_text(),
            format!("invalid token: {reason}\n"),
            "{what}"
        );
        assert_eq!(
            answer.header("www-authenticate"),
            Some(
                format!("Bearer error=\"invalid_token\", error_description=\"{reason}\"").as_str()
            ),
            "{what}"
        );
        assert!(
            !answer.body_text().contains(token.as_str()),
            "{what}: the token is never echoed"
        );
    }
    // No token at all: a plain challenge.
    let answer = raw_exchange(addr, &http_request("GET", "/ws", &ws_headers("chat.test"))).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
    assert_one_line(&answer.body_text());
    // A broken handshake is a 400 whatever its token: handshake checks come before auth.
    let mut broken = ws_headers("chat.test");
    remove_header(&mut broken, "Sec-WebSocket-Key");
    let answer = raw_exchange(addr, &http_request("GET", "/ws", &broken)).await;
    assert_eq!(answer.status, 400, "{}", answer.body_text());
    // A Basic Authorization is not a bearer token.
    let mut headers = ws_headers("chat.test");
    headers.push(("Authorization", "Basic dXNlcjpwdw=="));
    assert_eq!(
        raw_exchange(addr, &http_request("GET", "/ws", &headers))
            .await
            .status,
        401
    );

    assert_eq!(upstream.connections(), 0, "nothing reached the upstream");
    let admin = proxy.admin();
    assert_eq!(metric(admin, &auth_series("missing")).await, 2);
    assert_eq!(metric(admin, &auth_series("expired")).await, 1);
    assert_eq!(
        metric(admin, &auth_series("invalid")).await,
        cases.len() as u64 - 1
    );
    assert_eq!(metric(admin, &auth_series("ok")).await, 0);
}

// ---------------------------------------------------------------------------------------
// A key server and auth service

/// What the test HTTP server answers and what it saw.
#[derive(Default)]
struct AuthorityState {
    jwks: Mutex<String>,
    /// When set, `/jwks.json` answers 500.
    failing: std::sync::atomic::AtomicBool,
    jwks_fetches: AtomicUsize,
    auth_requests: Mutex<Vec<Request<()>>>,
}

struct Authority {
    addr: SocketAddr,
    state: Arc<AuthorityState>,
    _task: AbortOnDrop,
}

/// An HTTP/1.1 server (TLS with `cert` when given): `/jwks.json` serves the key set,
/// `/auth` decides by the request's `x-test-decision` header.
async fn spawn_authority(cert: Option<&TestCert>) -> Authority {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(AuthorityState::default());
    let tls = cert.map(|cert| {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let served = state.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let state = served.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(req, &state).await) }
                });
                let builder = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                    }
                }
            });
        }
    });
    Authority {
        addr,
        state,
        _task: AbortOnDrop(task),
    }
}

async fn answer(req: Request<Incoming>, state: &AuthorityState) -> Response<Full<Bytes>> {
    let reply = |status: u16, headers: &[(&str, &str)], body: &str| {
        let mut r = Response::builder().status(status);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(Full::new(Bytes::from(body.to_string()))).unwrap()
    };
    if req.uri().path() == "/jwks.json" {
        state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
        if state.failing.load(Ordering::SeqCst) {
            return reply(500, &[], "down for maintenance");
        }
        let body = state.jwks.lock().unwrap().clone();
        return reply(200, &[("content-type", "application/json")], &body);
    }
    let (parts, _) = req.into_parts();
    let decision = parts
        .headers
        .get("x-test-decision")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("allow")
        .to_string();
    state
        .auth_requests
        .lock()
        .unwrap()
        .push(Request::from_parts(parts, ()));
    match decision.as_str() {
        "allow" => reply(
            200,
            &[
                ("x-auth-user", "alice"),
                ("x-auth-role", "admin"),
                ("x-other", "not copied"),
            ],
            "",
        ),
        "deny" => reply(403, &[("content-type", "text/plain")], "no entry for you\n"),
        "login" => reply(
            401,
            &[("www-authenticate", "Bearer realm=\"auth\"")],
            "log in first\n",
        ),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            reply(200, &[], "")
        }
        _ => reply(500, &[], "auth service broken\n"),
    }
}

#[tokio::test]
async fn a_jwks_url_is_fetched_again_for_an_unknown_kid_at_most_once_per_10_seconds() {
    let ca = TestCa::new();
    let cert = ca.issue(&["127.0.0.1"]);
    let authority = spawn_authority(Some(&cert)).await;
    let old = Signer::ec("2026-old");
    let new = Signer::ec("2026-new");
    *authority.state.jwks.lock().unwrap() = jwks(&[&old]);
    let dir = TestDir::new();
    dir.write("ca.pem", ca.ca_pem());
    let auth = format!(
        r#"jwt = {{ jwks = "https://127.0.0.1:{}/jwks.json", jwks_ca = "ca.pem" }}"#,
        authority.addr.port()
    );
    let upstream = spawn_ws_upstream().await;
    let proxy = spawn_proxy(&config(upstream.addr, &auth, ""), &dir).await;
    let addr = proxy.addr("public");
    let connect = |signer: &Signer| {
        let bearer = format!("Bearer {}", signer.sign(&claims("u")));
        async move {
            let mut headers = ws_headers("chat.test");
            headers.push(("Authorization", &bearer));
            raw_exchange(addr, &http_request("GET", "/ws", &headers)).await
        }
    };

    // The first handshake may race the startup fetch; either way it gets the old key.
    assert_eq!(connect(&old).await.status, 101);
    let fetches = authority.state.jwks_fetches.load(Ordering::SeqCst);
    assert_eq!(fetches, 1, "one startup fetch");

    // The key server rotates: a token with the new kid makes wsgate fetch at once.
    *authority.state.jwks.lock().unwrap() = jwks(&[&old, &new]);
    assert_eq!(connect(&new).await.status, 101);
    assert_eq!(authority.state.jwks_fetches.load(Ordering::SeqCst), 2);

    // A made-up kid right after: refused without another fetch.
    let answer = connect(&Signer::ec("made-up")).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.body_text(), "invalid token: unknown signing key\n");
    assert_eq!(authority.state.jwks_fetches.load(Ordering::SeqCst), 2);
    assert_eq!(
        metric(proxy.admin(), &format!("wsgate_jwks_fetches_total{{result=\"success\",source=\"https://127.0.0.1:{}/jwks.json\"}}", authority.addr.port())).await,
        2
    );

    // Reload with another route added: the set for the same URL is kept, not fetched again.
    let reloaded = config(
        upstream.addr,
        &auth,
        "[routes.echo]\npath = \"/echo\"\nbuiltin = \"echo\"\n",
    );
    dir.write(
        "proxy.toml",
        format!("[admin]\nbind = \"127.0.0.1:0\"\n\n{reloaded}"),
    );
    let answer = raw_exchange(
        proxy.admin(),
        &http_request(
            "POST",
            "/reload",
            &[("Host", "admin"), ("Content-Length", "0")],
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body_text());
    assert_eq!(connect(&new).await.status, 101);
    assert_eq!(
        authority.state.jwks_fetches.load(Ordering::SeqCst),
        2,
        "kept across the reload"
    );
}

#[tokio::test]
async fn a_key_server_down_at_startup_gives_503_and_a_failed_refresh_keeps_the_last_set() {
    // Never fetched: wsgate cannot decide, so 503 (not 401: the token may be fine).
    let down = closed_port().await;
    let dir = TestDir::new();
    let upstream = spawn_ws_upstream().await;
    let auth = format!(
        r#"jwt = {{ jwks = "http://127.0.0.1:{}/jwks.json" }}"#,
        down.port()
    );
    let proxy = spawn_proxy(&config(upstream.addr, &auth, ""), &dir).await;
    let token = Signer::ec("k").sign(&claims("u"));
    let bearer = format!("Bearer {token}");
    let mut headers = ws_headers("chat.test");
    headers.push(("Authorization", &bearer));
    let answer = raw_exchange(proxy.addr("public"), &http_request("GET", "/ws", &headers)).await;
    assert_eq!(answer.status, 503, "{}", answer.body_text());
    assert_one_line(&answer.body_text());
    assert_eq!(metric(proxy.admin(), &auth_series("error")).await, 1);
    assert_eq!(upstream.connections(), 0);

    // Fetched once, then failing on every refresh (each second): the keys stay usable.
    let authority = spawn_authority(None).await;
    let signer = Signer::ec("k");
    *authority.state.jwks.lock().unwrap() = jwks(&[&signer]);
    let auth = format!(
        r#"jwt = {{ jwks = "http://127.0.0.1:{}/jwks.json", jwks_refresh = "1s" }}"#,
        authority.addr.port()
    );
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config(upstream.addr, &auth, ""), &dir).await;
    let bearer = format!("Bearer {}", signer.sign(&claims("u")));
    let mut headers = ws_headers("chat.test");
    headers.push(("Authorization", &bearer));
    assert_eq!(
        raw_exchange(proxy.addr("public"), &http_request("GET", "/ws", &headers))
            .await
            .status,
        101
    );
    authority.state.failing.store(true, Ordering::SeqCst);
    let errors = format!(
        "wsgate_jwks_fetches_total{{result=\"error\",source=\"http://127.0.0.1:{}/jwks.json\"}}",
        authority.addr.port()
    );
    within("a failed refresh", async {
        while metric(proxy.admin(), &errors).await == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(
        raw_exchange(proxy.addr("public"), &http_request("GET", "/ws", &headers))
            .await
            .status,
        101
    );
}

#[tokio::test]
async fn forward_auth_allows_denies_and_fails_clearly() {
    let authority = spawn_authority(None).await;
    let upstream = spawn_ws_upstream().await;
    let mut http = spawn_http_upstream().await;
    let dir = TestDir::new();
    let auth = format!(
        r#"forward = {{ url = "http://127.0.0.1:{}/auth?check=1", timeout = "500ms", copy_headers = ["X-Auth-User", "X-Auth-Role"] }}"#,
        authority.addr.port()
    );
    let extra = format!(
        "[upstreams.web]\nservers = [\"{}\"]\n[routes.web]\npath = \"/api\"\nupstream = \"web\"\n[routes.web.auth]\n{auth}\n",
        http.addr
    );
    let mut upstream = upstream;
    let proxy = spawn_proxy(&config(upstream.addr, &auth, &extra), &dir).await;
    let addr = proxy.addr("public");

    // Allowed: the answer's copy_headers reach the upstream, the client's copies do not.
    let req = ws_request(
        addr,
        "?room=1",
        &[
            ("X-Auth-User", "mallory"),
            ("Authorization", "Bearer letmein"),
        ],
    );
    let (mut ws, _) = ws_connect(req).await;
    echo_transcript(&mut ws, &[Message::text("in")]).await;
    let seen = upstream.requests.next("the allowed upgrade").await;
    assert_eq!(seen.header("x-auth-user"), Some("alice"));
    assert_eq!(seen.header("x-auth-role"), Some("admin"));
    assert_eq!(seen.header("x-other"), None);
    {
        let asked = authority.state.auth_requests.lock().unwrap();
        let sub = &asked[0];
        assert_eq!(sub.method(), "GET");
        assert_eq!(sub.uri(), "/auth?check=1");
        assert_eq!(sub.headers()["x-forwarded-uri"], "/ws?room=1");
        assert_eq!(sub.headers()["x-forwarded-method"], "GET");
        assert_eq!(sub.headers()["authorization"], "Bearer letmein");
        assert_eq!(sub.headers()["x-forwarded-for"], "127.0.0.1");
        for absent in ["upgrade", "sec-websocket-key", "sec-websocket-version"] {
            assert!(
                !sub.headers().contains_key(absent),
                "{absent} went to the auth service"
            );
        }
    }

    // Denied (403 with a body) and challenged (401 with WWW-Authenticate): relayed as is.
    let mut headers = ws_headers("chat.test");
    headers.push(("x-test-decision", "deny"));
    let answer = raw_exchange(addr, &http_request("GET", "/ws", &headers)).await;
    assert_eq!(
        (answer.status, answer.body_text().as_str()),
        (403, "no entry for you\n")
    );
    headers.pop();
    headers.push(("x-test-decision", "login"));
    let answer = raw_exchange(addr, &http_request("GET", "/ws", &headers)).await;
    assert_eq!(
        (answer.status, answer.body_text().as_str()),
        (401, "log in first\n")
    );
    assert_eq!(
        answer.header("www-authenticate"),
        Some("Bearer realm=\"auth\"")
    );

    // Broken (500) is 503, slow is 504, each with a one-line reason.
    for (decision, status) in [("broken", 503), ("slow", 504)] {
        headers.pop();
        headers.push(("x-test-decision", decision));
        let started = Instant::now();
        let answer = raw_exchange(addr, &http_request("GET", "/ws", &headers)).await;
        assert_eq!(answer.status, status, "{decision}: {}", answer.body_text());
        assert_one_line(&answer.body_text());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{decision} took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        upstream.connections(),
        1,
        "only the allowed upgrade reached the upstream"
    );

    // Plain HTTP requests on a route with forward auth.
    let mut client = HttpClient::connect(addr).await;
    let ok = client.get("chat.test", "/api/items", &[]).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(
        http.requests
            .next("the allowed GET")
            .await
            .header("x-auth-user"),
        Some("alice")
    );
    let denied = client
        .get("chat.test", "/api/items", &[("x-test-decision", "deny")])
        .await;
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    assert_eq!(denied.body().as_ref(), b"no entry for you\n");
    assert!(
        http.requests.try_next().is_none(),
        "the denied GET stayed at the edge"
    );

    let admin = proxy.admin();
    assert_eq!(metric(admin, &auth_series("ok")).await, 1);
    assert_eq!(metric(admin, &auth_series("denied")).await, 2);
    assert_eq!(metric(admin, &auth_series("error")).await, 2);

    // The auth service down: 503.
    drop(authority);
    let answer = raw_exchange(addr, &http_request("GET", "/ws", &ws_headers("chat.test"))).await;
    assert_eq!(answer.status, 503, "{}", answer.body_text());
}

#[tokio::test]
async fn a_live_websocket_is_closed_when_its_token_expires() {
    let keys = Keys::new();
    let dir = TestDir::new();
    keys.write(&dir);
    let mut upstream = spawn_ws_upstream().await;
    let auth = r#"jwt = { jwks = "jwks.json", leeway = "0s" }"#;
    let proxy = spawn_proxy(&config(upstream.addr, auth, ""), &dir).await;
    let exp = now() + 2;
    let mut c = claims("alice");
    c["exp"] = json!(exp);
    let bearer = format!("Bearer {}", keys.ec.sign(&c));
    let (mut ws, _) = ws_connect(ws_request(
        proxy.addr("public"),
        "",
        &[("Authorization", &bearer)],
    ))
    .await;
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("before"));
    let close = next_close(&mut ws).await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "token expired");
    // exp is whole seconds: the close comes within the second after it (1 s slack for CI).
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        at >= exp as f64 && at < exp as f64 + 2.0,
        "closed at {at}, exp {exp}"
    );
    let upstream_close = upstream
        .closes
        .next("the upstream's close")
        .await
        .expect("a close frame");
    assert_eq!(
        (
            u16::from(upstream_close.code),
            upstream_close.reason.as_str()
        ),
        (1001, "token expired")
    );
    assert_eq!(
        metric(
            proxy.admin(),
            "wsgate_closes_total{code=\"1008\",initiator=\"proxy\",route=\"ws\"}"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn an_upstream_choosing_a_subprotocol_nobody_offered_gets_502() {
    let upstream = spawn_raw_upstream(answer_101(&[("Sec-WebSocket-Protocol", "admin")])).await;
    let dir = TestDir::new();
    let text = format!(
        "{RELAXED_TIMEOUTS}\n[listeners.public]\nbind = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"{}\"]\n[routes.ws]\nupstream = \"app\"\n",
        upstream.addr
    );
    let proxy = spawn_proxy(&text, &dir).await;
    let mut headers = ws_headers("chat.test");
    headers.push(("Sec-WebSocket-Protocol", "chat"));
    let answer = raw_exchange(proxy.addr("public"), &http_request("GET", "/", &headers)).await;
    assert_eq!(answer.status, 502);
    assert!(
        answer
            .body_text()
            .contains("chose subprotocol \"admin\", which the client did not offer"),
        "{}",
        answer.body_text()
    );
}
