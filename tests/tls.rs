//! TLS listeners: wss through the proxy, certificates chosen by SNI with a default for
//! clients that send no name or an unknown one, TLS 1.2+ only with ALPN `http/1.1`, and a
//! listener that survives clients speaking something other than TLS.

mod support;

use std::net::SocketAddr;

use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

use support::*;

/// Certificates of one test: `a.crt` (default; also valid for `c.test` and 127.0.0.1, so
/// clients that fall back to it can verify it) and `b.crt` (chosen by SNI `b.test`).
struct Certs {
    ca: TestCa,
    default: TestCert,
    b: TestCert,
}

fn certs(dir: &TestDir) -> Certs {
    let ca = TestCa::new();
    let default = ca.issue(&["a.test", "c.test", "127.0.0.1"]);
    let b = ca.issue(&["b.test"]);
    default.write(dir, "a");
    b.write(dir, "b");
    Certs { ca, default, b }
}

/// A TLS listener `secure` with the default and SNI certificates, and a route to `upstream`.
fn tls_config(upstream: SocketAddr) -> String {
    format!(
        r#"
[listeners.secure]
bind = "127.0.0.1:0"
[listeners.secure.tls]
cert = "a.crt"
key = "a.key"
sni = [ {{ server_name = "b.test", cert = "b.crt", key = "b.key" }} ]
{RELAXED_TIMEOUTS}
[upstreams.app]
servers = ["{upstream}"]
[routes.app]
path = "/"
upstream = "app"
"#
    )
}

/// A wss echo of a text and a 1 MiB binary message through `secure`, compared with the same
/// exchange run directly (plain ws) against the upstream.
async fn wss_echo_matches_direct(proxy: &Proxy, upstream: &WsUpstream, certs: &Certs) {
    let messages = vec![
        Message::text("hello over TLS"),
        Message::binary(pattern(1 << 20)),
    ];
    let (mut ws, _) = ws_connect(upstream.url("/echo")).await;
    let direct = echo_transcript(&mut ws, &messages).await;

    let url = format!("wss://127.0.0.1:{}/echo", proxy.addr("secure").port());
    let (mut wss, response) = within(
        "a wss handshake",
        tokio_tungstenite::connect_async_tls_with_config(
            url,
            None,
            false,
            Some(Connector::Rustls(certs.ca.client_config())),
        ),
    )
    .await
    .expect("wss handshake through the proxy");
    assert_eq!(response.status(), 101);
    let proxied = echo_transcript(&mut wss, &messages).await;

    assert_same_messages("direct echo", &direct, &messages);
    assert_same_messages("wss echo through the proxy", &proxied, &direct);
}

#[tokio::test]
async fn wss_echo_through_a_tls_listener() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let certs = certs(&dir);
    let proxy = spawn_proxy(&tls_config(upstream.addr), &dir).await;
    wss_echo_matches_direct(&proxy, &upstream, &certs).await;
}

#[tokio::test]
async fn sni_picks_the_certificate() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let certs = certs(&dir);
    let proxy = spawn_proxy(&tls_config(upstream.addr), &dir).await;
    let addr = proxy.addr("secure");

    for (name, expected, which) in [
        ("b.test", &certs.b, "the sni certificate"),
        ("a.test", &certs.default, "the default certificate"),
        (
            "B.TEST",
            &certs.b,
            "the sni certificate (names are case-insensitive)",
        ),
        (
            "c.test",
            &certs.default,
            "the default (no sni entry for c.test)",
        ),
    ] {
        let tls = within(
            "a TLS handshake",
            tls_connect(addr, name, certs.ca.client_config()),
        )
        .await
        .unwrap_or_else(|e| panic!("TLS handshake for {name}: {e}"));
        assert!(peer_leaf(&tls) == expected.der, "{name} should get {which}");
    }
}

#[tokio::test]
async fn no_sni_gets_the_default_certificate() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let certs = certs(&dir);
    let proxy = spawn_proxy(&tls_config(upstream.addr), &dir).await;

    // An IP address as server name: rustls sends no SNI extension.
    let tls = within(
        "a TLS handshake",
        tls_connect(proxy.addr("secure"), "127.0.0.1", certs.ca.client_config()),
    )
    .await
    .expect("TLS handshake without SNI");
    assert!(peer_leaf(&tls) == certs.default.der);
}

#[tokio::test]
async fn only_tls_1_2_and_1_3_with_alpn_http_1_1() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let certs = certs(&dir);
    let proxy = spawn_proxy(&tls_config(upstream.addr), &dir).await;
    let addr = proxy.addr("secure");

    let cases: [(
        &[&'static rustls::SupportedProtocolVersion],
        rustls::ProtocolVersion,
    ); 2] = [
        (&[&rustls::version::TLS12], rustls::ProtocolVersion::TLSv1_2),
        (
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            rustls::ProtocolVersion::TLSv1_3,
        ),
    ];
    for (versions, expected) in cases {
        let offers: [&[&[u8]]; 2] = [&[b"http/1.1"], &[b"h2", b"http/1.1"]];
        for alpn in offers {
            let config = certs.ca.client_config_with(versions, alpn);
            let tls = within("a TLS handshake", tls_connect(addr, "a.test", config))
                .await
                .unwrap_or_else(|e| panic!("{expected:?} handshake: {e}"));
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.protocol_version(), Some(expected));
            assert_eq!(
                conn.alpn_protocol(),
                Some(b"http/1.1".as_slice()),
                "{expected:?}, offered {alpn:?} (http2 is off by default)"
            );
        }
    }
}

/// A TLS 1.1 ClientHello (record layer 1.0, client_version 3.2, no supported_versions
/// extension), as an old client would send it; rustls cannot produce one.
fn tls_1_1_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend([0x5a; 32]); // random
    hello.push(0); // no session id
    let suites: [u16; 4] = [0xc013, 0xc014, 0x002f, 0x0035]; // ECDHE/RSA CBC suites of the era
    hello.extend(((suites.len() * 2) as u16).to_be_bytes());
    for suite in suites {
        hello.extend(suite.to_be_bytes());
    }
    hello.extend([1, 0]); // compression: null only
                          // signature_algorithms (rsa_pkcs1_sha256, ecdsa_secp256r1_sha256): without it rustls
                          // stops earlier, with handshake_failure, before looking at the version.
    let schemes: [u16; 2] = [0x0401, 0x0403];
    let mut extension = 13u16.to_be_bytes().to_vec();
    extension.extend(((schemes.len() * 2 + 2) as u16).to_be_bytes());
    extension.extend(((schemes.len() * 2) as u16).to_be_bytes());
    for scheme in schemes {
        extension.extend(scheme.to_be_bytes());
    }
    hello.extend((extension.len() as u16).to_be_bytes());
    hello.extend(extension);
    let mut handshake = vec![1]; // ClientHello
    handshake.extend(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01]; // handshake record, TLS 1.0 record layer
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

#[tokio::test]
async fn tls_1_1_client_is_refused_with_a_protocol_version_alert() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let certs = certs(&dir);
    let proxy = spawn_proxy(&tls_config(upstream.addr), &dir).await;

    let mut client = RawClient::connect(proxy.addr("secure")).await;
    client.send(&tls_1_1_client_hello()).await;
    let (got, _) = client.read_until_closed().await;
    // One alert record: type 21, two bytes of body: level fatal (2), protocol_version (70).
    assert!(got.len() >= 7, "expected an alert, got {got:02x?}");
    assert_eq!(got[0], 21, "record type, got {got:02x?}");
    assert_eq!(
        &got[3..7],
        &[0, 2, 2, 70],
        "fatal protocol_version, got {got:02x?}"
    );
    assert_eq!(upstream.connections(), 0);
    // The listener still serves.
    wss_echo_matches_direct(&proxy, &upstream, &certs).await;
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_does_not_break_the_listener() {
    let upstream = spawn_ws_upstream().await;
    let dir = TestDir::new();
    let certs = certs(&dir);
    let proxy = spawn_proxy(&tls_config(upstream.addr), &dir).await;

    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"[..],
        &[0xff; 16],
        b"\x16\x03",
    ] {
        let mut client = RawClient::connect(proxy.addr("secure")).await;
        client.send(garbage).await;
        if garbage.len() > 2 {
            // A complete (if nonsensical) record: the proxy answers it and hangs up
            // (read_until_closed fails the test if it does not within the limit).
            client.read_until_closed().await;
        }
        // A good client is served meanwhile, whatever the bad one is doing.
        wss_echo_matches_direct(&proxy, &upstream, &certs).await;
    }
}
