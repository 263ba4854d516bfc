//! Hostile and ambiguous request heads, as a corpus: each case sends raw bytes to a real
//! wsgate in front of raw recording upstreams and checks the exact status, the one-line
//! reason, and what the upstream received: nothing at all, or exactly the expected request
//! line and `Host`.
//!
//! "Nothing" is proven with a sentinel: after the case's answer, a known request goes
//! through the same proxy to the same upstream, and it must be the first head that upstream
//! recorded since the case began. Every case runs, and all failures are reported together.

mod support;

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use support::{
    http_request, spawn_proxy, within, AbortOnDrop, Ended, Proxy, RawClient, TestDir, WS_KEY,
};

/// An upstream that records every request head it receives, byte for byte, and answers
/// `200 ok` (or, to an upgrade, a correct 101 and then silence).
struct RawRecorder {
    addr: SocketAddr,
    heads: mpsc::UnboundedReceiver<String>,
    _task: AbortOnDrop,
}

impl RawRecorder {
    async fn spawn() -> RawRecorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, heads) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(record(stream, tx.clone()));
            }
        });
        RawRecorder {
            addr,
            heads,
            _task: AbortOnDrop(task),
        }
    }

    /// The next head recorded.
    async fn next(&mut self, what: &str) -> String {
        within(what, self.heads.recv())
            .await
            .unwrap_or_else(|| panic!("the recorder stopped before {what}"))
    }
}

async fn record(mut stream: TcpStream, tx: mpsc::UnboundedSender<String>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 16384];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    // Bytes that never became a head (a cut-off request, stray body bytes)
                    // were still sent to the upstream: record them too.
                    if !buf.is_empty() {
                        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
                    }
                    return;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let lower = head.to_ascii_lowercase();
        let _ = tx.send(head.clone());
        if lower.contains("\r\nupgrade: websocket") {
            let key = header(&head, "sec-websocket-key").unwrap_or_default();
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let mut sink = [0u8; 1024];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        // Bodies are skipped by Content-Length (wsgate forwards nothing chunked here).
        let body: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < body {
            let mut chunk = [0u8; 16384];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..body);
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The first value of header `name` in a raw head.
fn header(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Which recorder a case is about.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rec {
    /// Behind routes `/public` and `/strip`.
    Public,
    /// Behind route `admin.internal /`.
    Admin,
}

/// What the upstream must have received.
#[derive(Debug, Clone, Copy)]
enum Seen {
    /// Nothing (checked on both recorders).
    Nothing,
    /// Exactly one request with this request line and `Host` ("" = one `Host`, any value),
    /// each `(header, phrase)` of `also` present once with a value containing the phrase,
    /// and nothing at the other recorder.
    Request {
        rec: Rec,
        line: &'static str,
        host: &'static str,
        also: &'static [(&'static str, &'static str)],
    },
}

struct Case {
    name: &'static str,
    request: Vec<u8>,
    status: u16,
    /// A phrase the answer's body must contain; "" for answers that are not wsgate's own
    /// (an upstream's, or hyper's empty 400 for a head it cannot parse).
    body: &'static str,
    seen: Seen,
}

fn case(
    name: &'static str,
    request: impl Into<Vec<u8>>,
    status: u16,
    body: &'static str,
    seen: Seen,
) -> Case {
    Case {
        name,
        request: request.into(),
        status,
        body,
        seen,
    }
}

fn get(target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    http_request("GET", target, headers)
}

fn forwarded(rec: Rec, line: &'static str, host: &'static str) -> Seen {
    forwarded_with(rec, line, host, &[])
}

fn forwarded_with(
    rec: Rec,
    line: &'static str,
    host: &'static str,
    also: &'static [(&'static str, &'static str)],
) -> Seen {
    Seen::Request {
        rec,
        line,
        host,
        also,
    }
}

const PUBLIC: &str = "public.example";

/// What the admin upstream must see besides `Host` when the authority came from the target.
const ABSOLUTE_FORM_FORWARDING: &[(&str, &str)] = &[
    ("X-Forwarded-Host", "admin.internal"),
    ("Forwarded", "host=admin.internal"),
];

fn upgrade(target: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut headers = support::ws_headers(PUBLIC);
    headers.extend_from_slice(extra);
    get(target, &headers)
}

/// A request whose head is exactly `len` bytes, with `lines` header lines (Host included).
fn head_of(len: usize, lines: usize) -> Vec<u8> {
    let mut head = format!("GET /public/big HTTP/1.1\r\nHost: {PUBLIC}\r\n");
    for i in 1..lines {
        head.push_str(&format!("X-Fill-{i}: v\r\n"));
    }
    head.push_str("X-Pad: \r\n\r\n");
    // One more line than asked for (X-Pad): put the padding in the last filler instead.
    let mut head = head.replace("X-Pad: \r\n", "");
    let pad = len
        .checked_sub(head.len())
        .expect("the head is already longer than asked");
    let at = head.len() - 4;
    head.insert_str(at, &"p".repeat(pad));
    assert_eq!(head.len(), len);
    head.into_bytes()
}

struct World {
    proxy: Proxy,
    public: RawRecorder,
    admin: RawRecorder,
    _dir: TestDir,
}

impl World {
    async fn new(limits: &str, host_header: &str) -> World {
        let public = RawRecorder::spawn().await;
        let admin = RawRecorder::spawn().await;
        let dir = TestDir::new();
        let config = format!(
            r#"
[listeners.public]
bind = "127.0.0.1:0"

[timeouts]
upstream_connect = "2s"
upstream_handshake = "5s"
client_header = "5s"

[limits]
{limits}

[upstreams.rec]
servers = ["{public}"]
{host_header}

[upstreams.rec2]
servers = ["{admin}"]

[routes.public]
path = "/public"
upstream = "rec"

[routes.strip]
path = "/strip"
strip_prefix = true
upstream = "rec"

[routes.admin]
host = "admin.internal"
path = "/"
upstream = "rec2"
"#,
            public = public.addr,
            admin = admin.addr,
        );
        let proxy = spawn_proxy(&config, &dir).await;
        World {
            proxy,
            public,
            admin,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.addr("public")
    }

    fn recorder(&mut self, rec: Rec) -> &mut RawRecorder {
        match rec {
            Rec::Public => &mut self.public,
            Rec::Admin => &mut self.admin,
        }
    }

    /// Sends a sentinel to `rec` and returns every head it recorded before the sentinel.
    async fn recorded_before_sentinel(&mut self, rec: Rec) -> Vec<String> {
        let (target, host) = match rec {
            Rec::Public => ("/public/sentinel", PUBLIC),
            Rec::Admin => ("/sentinel", "admin.internal"),
        };
        let mut client = RawClient::connect(self.addr()).await;
        client.send(&get(target, &[("Host", host)])).await;
        let response = client.read_response().await;
        assert_eq!(response.status, 200, "the sentinel: {response:?}");
        let sentinel = format!("GET {target} HTTP/1.1\r\n");
        let mut before = Vec::new();
        loop {
            let head = self.recorder(rec).next("the sentinel").await;
            if let Some(at) = head.find(&sentinel) {
                // Stray bytes sent ahead of the sentinel on the same connection.
                if at > 0 {
                    before.push(head[..at].to_string());
                }
                return before;
            }
            before.push(head);
        }
    }

    /// Runs one case; returns what went wrong, if anything.
    async fn run(&mut self, case: &Case) -> Vec<String> {
        let mut problems = Vec::new();
        let mut client = RawClient::connect(self.addr()).await;
        client.send(&case.request).await;
        let response = client.read_response().await;
        if response.status != case.status {
            problems.push(format!(
                "status {} (want {}), body {:?}",
                response.status,
                case.status,
                response.body_text()
            ));
        }
        if !response.body_text().contains(case.body) {
            problems.push(format!(
                "body {:?} lacks {:?}",
                response.body_text(),
                case.body
            ));
        }
        // A case that names a phrase expects wsgate's own refusal: one line, and a 400 says
        // which kind of bad it is before the phrase.
        if (400..500).contains(&response.status) && !case.body.is_empty() {
            let body = response.body_text();
            if !body.ends_with('\n') || body.trim_end().contains('\n') {
                problems.push(format!("the reason is not one line: {body:?}"));
            }
            if response.status == 400
                && !body.starts_with("bad request: ")
                && !body.starts_with("bad WebSocket handshake: ")
            {
                problems.push(format!(
                    "a 400 whose reason starts with neither \"bad request\" nor \"bad WebSocket \
                     handshake\": {body:?}"
                ));
            }
        }
        match case.seen {
            Seen::Nothing => {
                for rec in [Rec::Public, Rec::Admin] {
                    let seen = self.recorded_before_sentinel(rec).await;
                    if !seen.is_empty() {
                        problems.push(format!("{rec:?} received {seen:?}"));
                    }
                }
            }
            Seen::Request {
                rec,
                line,
                host,
                also,
            } => {
                let other = match rec {
                    Rec::Public => Rec::Admin,
                    Rec::Admin => Rec::Public,
                };
                let stray = self.recorded_before_sentinel(other).await;
                if !stray.is_empty() {
                    problems.push(format!("{other:?} received {stray:?}"));
                }
                let mut seen = self.recorded_before_sentinel(rec).await;
                if seen.len() != 1 {
                    problems.push(format!("{rec:?} received {} heads: {seen:?}", seen.len()));
                } else {
                    let head = seen.remove(0);
                    let first = head.split("\r\n").next().unwrap_or_default();
                    if first != format!("{line} HTTP/1.1") {
                        problems.push(format!("forwarded {first:?}, want {line:?}"));
                    }
                    let hosts: Vec<_> = head
                        .split("\r\n")
                        .filter(|l| l.to_ascii_lowercase().starts_with("host:"))
                        .collect();
                    let value = |l: &&str| l.split_once(':').map(|(_, v)| v.trim().to_string());
                    let values: Vec<_> = hosts.iter().filter_map(value).collect();
                    if values.len() != 1 || (!host.is_empty() && values[0] != host) {
                        problems.push(format!("forwarded Host lines {hosts:?}, want {host:?}"));
                    }
                    for (name, phrase) in also {
                        let lines: Vec<_> = head
                            .split("\r\n")
                            .filter(|l| {
                                l.split_once(':')
                                    .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
                            })
                            .collect();
                        if lines.len() != 1 || !lines[0].contains(phrase) {
                            problems.push(format!(
                                "forwarded {name} lines {lines:?}, want one containing {phrase:?}"
                            ));
                        }
                    }
                }
            }
        }
        problems
    }

    async fn run_all(&mut self, cases: &[Case]) {
        let mut failures = Vec::new();
        for case in cases {
            let problems = self.run(case).await;
            if !problems.is_empty() {
                failures.push(format!("{}:\n    {}", case.name, problems.join("\n    ")));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
}

#[tokio::test]
async fn hostile_heads_get_the_right_answer_and_reach_no_upstream() {
    use Rec::*;
    let nothing = Seen::Nothing;
    let h = [("Host", PUBLIC)];
    let cases = vec![
        // One Host.
        case("two Host headers", get("/public/x", &[("Host", "admin.internal"), ("Host", PUBLIC)]), 400, "more than one Host header", nothing),
        case("two Host headers, same value", get("/public/x", &[("Host", PUBLIC), ("Host", PUBLIC)]), 400, "more than one Host header", nothing),
        case("no Host on HTTP/1.1", get("/public/x", &[]), 400, "no Host header", nothing),
        case("no Host on HTTP/1.0 is routed", &b"GET /public/old HTTP/1.0\r\n\r\n"[..], 200, "ok", forwarded(Public, "GET /public/old", "")),
        case("Host with two ports", get("/public/x", &[("Host", "host:port:x")]), 400, "invalid Host header", nothing),
        case("Host unclosed IPv6", get("/public/x", &[("Host", "[::1")]), 400, "invalid Host header", nothing),
        case("Host with a slash", get("/public/x", &[("Host", "a/b")]), 400, "invalid Host header", nothing),
        case("Host with user info", get("/public/x", &[("Host", "a@b")]), 400, "invalid Host header", nothing),
        case("Host port too large", get("/public/x", &[("Host", "host:99999")]), 400, "invalid Host header", nothing),
        case("Host empty port", get("/public/x", &[("Host", "host:")]), 400, "invalid Host header", nothing),
        case("Host empty", get("/public/x", &[("Host", "")]), 400, "invalid Host header", nothing),
        case("Host empty label", get("/public/x", &[("Host", "a..b")]), 400, "invalid Host header", nothing),
        // Absolute form: the authority replaces Host.
        case("absolute-form routes by its authority", get("http://admin.internal/x", &h), 200, "ok", forwarded_with(Admin, "GET /x", "admin.internal", ABSOLUTE_FORM_FORWARDING)),
        case("absolute-form with a port", get("http://admin.internal:8080/y?q=1", &h), 200, "ok", forwarded(Admin, "GET /y?q=1", "admin.internal:8080")),
        case("absolute-form with user info", get("http://u@admin.internal/x", &h), 400, "invalid host in the request target", nothing),
        case("absolute-form port too large", get("http://admin.internal:99999/x", &h), 400, "invalid host in the request target", nothing),
        case("absolute-form empty port", get("http://admin.internal:/x", &h), 400, "invalid host in the request target", nothing),
        case("absolute-form empty label", get("http://admin..internal/x", &h), 400, "invalid host in the request target", nothing),
        // Paths.
        case("dot-dot", get("/public/../secret", &h), 404, "\"/secret\"", nothing),
        case("encoded dot-dot", get("/public/%2e%2e/secret", &h), 404, "\"/secret\"", nothing),
        case("encoded dot-dot upper", get("/public/%2E%2E/secret", &h), 404, "\"/secret\"", nothing),
        case("dot then dot-dot", get("/public/./../secret", &h), 404, "\"/secret\"", nothing),
        case("dot-segments inside", get("/public/a/./b/../c", &h), 200, "ok", forwarded(Public, "GET /public/a/c", PUBLIC)),
        case("unreserved escapes decoded", get("/public/%41%7e", &h), 200, "ok", forwarded(Public, "GET /public/A~", PUBLIC)),
        case("encoded slash kept", get("/public/a%2fb", &h), 200, "ok", forwarded(Public, "GET /public/a%2Fb", PUBLIC)),
        case("repeated slashes kept", get("/public//x", &h), 200, "ok", forwarded(Public, "GET /public//x", PUBLIC)),
        case("query untouched", get("/public/./x?a=../b&c=%2e", &h), 200, "ok", forwarded(Public, "GET /public/x?a=../b&c=%2e", PUBLIC)),
        case("climbs above the root", get("/..", &h), 400, "climbs above /", nothing),
        case("climbs above the root later", get("/public/../../x", &h), 400, "climbs above /", nothing),
        case("climbs above the root encoded", get("/%2e%2e/x", &h), 400, "climbs above /", nothing),
        case("bad escape", get("/public/%zz", &h), 400, "invalid percent-encoding", nothing),
        case("short escape", get("/public/%4", &h), 400, "invalid percent-encoding", nothing),
        case("strip_prefix after normalising", get("/strip/a/../b", &h), 200, "ok", forwarded(Public, "GET /b", PUBLIC)),
        case("an upgrade's path is normalised", upgrade("/public/x/../ws", &[]), 101, "", forwarded(Public, "GET /public/ws", PUBLIC)),
        // Singletons.
        case("two Origin headers", get("/public/x", &[("Host", PUBLIC), ("Origin", "https://a"), ("Origin", "https://b")]), 400, "more than one Origin header", nothing),
        case("two Origin headers on an upgrade", upgrade("/public/ws", &[("Origin", "https://a"), ("Origin", "https://a")]), 400, "more than one Origin header", nothing),
        case("two Sec-WebSocket-Key", upgrade("/public/ws", &[("Sec-WebSocket-Key", WS_KEY)]), 400, "more than one Sec-WebSocket-Key header", nothing),
        case("two Sec-WebSocket-Version", upgrade("/public/ws", &[("Sec-WebSocket-Version", "13")]), 400, "more than one Sec-WebSocket-Version header", nothing),
        case("two equal Content-Length", &b"POST /public/x HTTP/1.1\r\nHost: public.example\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"[..], 400, "more than one Content-Length header", nothing),
        // Sizes (defaults: 64 KiB, 100 lines).
        case("head of exactly 64 KiB", head_of(65536, 3), 200, "ok", forwarded(Public, "GET /public/big", PUBLIC)),
        case("head one byte over 64 KiB", head_of(65537, 3), 431, "larger than 65536 bytes", nothing),
        case("exactly 100 header lines", head_of(2000, 100), 200, "ok", forwarded(Public, "GET /public/big", PUBLIC)),
        case("101 header lines", head_of(2000, 101), 431, "more than 100 header lines", nothing),
        // Smuggling.
        case("Content-Length then Transfer-Encoding", &b"POST /public/x HTTP/1.1\r\nHost: public.example\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..], 400, "both Content-Length and Transfer-Encoding", nothing),
        case("Transfer-Encoding then Content-Length", &b"POST /public/x HTTP/1.1\r\nHost: public.example\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"[..], 400, "both Content-Length and Transfer-Encoding", nothing),
        case("two different Content-Length", &b"POST /public/x HTTP/1.1\r\nHost: public.example\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"[..], 400, "more than one Content-Length header", nothing),
        case("obs-fold", &b"GET /public/x HTTP/1.1\r\nHost: public.example\r\nX-A: a\r\n  folded\r\n\r\n"[..], 400, "", nothing),
        case("upgrade with a body", upgrade("/public/ws", &[("Content-Length", "3")]).into_iter().chain(*b"abc").collect::<Vec<u8>>(), 400, "must not have a body", nothing),
    ];
    let mut world = World::new("", "").await;
    world.run_all(&cases).await;
}

#[tokio::test]
async fn configured_head_limits_hold_at_both_bounds() {
    let cases = vec![
        case(
            "head of exactly 2 KiB",
            head_of(2048, 3),
            200,
            "ok",
            forwarded(Rec::Public, "GET /public/big", PUBLIC),
        ),
        case(
            "head one byte over 2 KiB",
            head_of(2049, 3),
            431,
            "larger than 2048 bytes",
            Seen::Nothing,
        ),
        case(
            "exactly 10 header lines",
            head_of(500, 10),
            200,
            "ok",
            forwarded(Rec::Public, "GET /public/big", PUBLIC),
        ),
        case(
            "11 header lines",
            head_of(500, 11),
            431,
            "more than 10 header lines",
            Seen::Nothing,
        ),
    ];
    let mut world = World::new("max_request_head = \"2KiB\"\nmax_request_headers = 10", "").await;
    world.run_all(&cases).await;
}

#[tokio::test]
async fn a_refused_head_closes_the_connection_after_its_answer() {
    let world = World::new("", "").await;
    for (what, request) in [
        ("too large", head_of(65537, 3)),
        ("too many lines", head_of(2000, 101)),
    ] {
        let mut client = RawClient::connect(world.addr()).await;
        client.send(&request).await;
        let response = client.read_response().await;
        assert_eq!(response.status, 431, "{what}: {response:?}");
        assert_eq!(response.header("connection"), Some("close"), "{what}");
        let (rest, ended) = client.read_until_closed().await;
        assert!(
            rest.is_empty(),
            "{what}: {:?}",
            String::from_utf8_lossy(&rest)
        );
        assert_eq!(ended, Ended::Eof, "{what}");
    }
}

#[tokio::test]
async fn a_later_request_on_a_kept_alive_connection_is_checked_too() {
    let mut world = World::new("", "").await;
    let mut client = RawClient::connect(world.addr()).await;
    client
        .send(&get("/public/first", &[("Host", PUBLIC)]))
        .await;
    assert_eq!(client.read_response().await.status, 200);
    client
        .send(&get(
            "/public/second",
            &[("Host", PUBLIC), ("Host", "admin.internal")],
        ))
        .await;
    let response = client.read_response().await;
    assert_eq!(response.status, 400, "{response:?}");
    assert!(response.body_text().contains("more than one Host header"));
    let (_, ended) = client.read_until_closed().await;
    assert_eq!(ended, Ended::Eof);
    let seen = world.recorded_before_sentinel(Rec::Public).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("GET /public/first "), "{seen:?}");
}

/// The host an upstream received, with the forwarding headers beside it.
async fn host_seen(world: &mut World, request: Vec<u8>, status: u16) -> (String, String, String) {
    let mut client = RawClient::connect(world.addr()).await;
    client.send(&request).await;
    assert_eq!(client.read_response().await.status, status);
    let head = world.public.next("the forwarded request").await;
    (
        header(&head, "host").unwrap_or_default(),
        header(&head, "x-forwarded-host").unwrap_or_default(),
        header(&head, "forwarded").unwrap_or_default(),
    )
}

#[tokio::test]
async fn host_header_decides_what_the_upstream_sees() {
    for (setting, want) in [
        ("", Some(PUBLIC)),
        ("host_header = \"preserve\"", Some(PUBLIC)),
        ("host_header = \"upstream\"", None),
        (
            "host_header = \"backend.internal:8080\"",
            Some("backend.internal:8080"),
        ),
    ] {
        let mut world = World::new("", setting).await;
        let want = want.map_or_else(|| world.public.addr.to_string(), str::to_string);
        for (what, request, status) in [
            ("plain", get("/public/x", &[("Host", PUBLIC)]), 200),
            ("upgrade", upgrade("/public/ws", &[]), 101),
        ] {
            let (host, x_forwarded_host, forwarded) = host_seen(&mut world, request, status).await;
            assert_eq!(host, want, "{setting:?}, {what}");
            assert_eq!(x_forwarded_host, PUBLIC, "{setting:?}, {what}");
            assert!(
                forwarded.contains(&format!("host={PUBLIC}")),
                "{setting:?}, {what}: {forwarded}"
            );
        }
    }
}

#[tokio::test]
async fn a_refused_upgrade_ends_its_connection_so_nothing_after_it_goes_unchecked() {
    let mut world = World::new("", "").await;
    let mut client = RawClient::connect(world.addr()).await;
    // A version wsgate refuses (426), then a smuggling attempt on the same connection.
    let mut refused = support::ws_headers(PUBLIC);
    support::set_header(&mut refused, "Sec-WebSocket-Version", "8");
    client.send(&get("/public/ws", &refused)).await;
    client
        .send(b"POST /public/x HTTP/1.1\r\nHost: public.example\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await;
    let response = client.read_response().await;
    assert_eq!(response.status, 426, "{response:?}");
    assert_eq!(response.header("connection"), Some("close"));
    let (rest, ended) = client.read_until_closed().await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert_eq!(ended, Ended::Eof);
    assert!(world.recorded_before_sentinel(Rec::Public).await.is_empty());
}
