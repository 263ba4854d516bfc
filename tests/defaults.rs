//! Defaults serve real traffic: the example configuration, unchanged but for its ports,
//! takes a load test from one address (5,000 live WebSockets, then 200 handshakes at once)
//! without refusing any of them.

mod support;

use support::{http_request, spawn_proxy, within, RawClient, TestDir};

/// Live WebSockets held open from 127.0.0.1, as a load test or an office behind NAT would.
const LIVE: usize = 5000;
/// Handshakes sent at once on top of them (a reconnect burst).
const BURST: usize = 200;
/// Each connection costs a descriptor in the client and one in the proxy (same process).
const NEEDED_FDS: u64 = 2 * (LIVE + BURST) as u64 + 1000;

/// Raises the soft descriptor limit towards `want`; returns the limit now in force.
fn raise_nofile(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        let target = want.min(limit.rlim_max);
        if limit.rlim_cur < target {
            limit.rlim_cur = target;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

fn upgrade() -> Vec<u8> {
    http_request("GET", "/echo", &support::ws_headers("load.test"))
}

async fn open(addr: std::net::SocketAddr) -> RawClient {
    let mut client = RawClient::connect(addr).await;
    client.send(&upgrade()).await;
    let response = client.read_response().await;
    assert_eq!(response.status, 101, "{response:?}");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_config_serves_a_load_test_from_one_address() {
    let fds = raise_nofile(NEEDED_FDS);
    if fds < NEEDED_FDS {
        eprintln!("skipped: needs {NEEDED_FDS} file descriptors, the hard limit allows {fds}");
        return;
    }
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml.example"))
            .expect("read proxy.toml.example");
    let config = example
        .replace("bind = \"127.0.0.1:8080\"", "bind = \"127.0.0.1:0\"")
        .replace("bind = \"127.0.0.1:9090\"", "bind = \"127.0.0.1:0\"");
    let active_lines: Vec<&str> = config
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert!(!active_lines
        .iter()
        .any(|l| l.contains(":8080") || l.contains(":9090")));
    assert!(
        !active_lines.contains(&"[limits]"),
        "the example sets no limits"
    );
    let dir = TestDir::new();
    let proxy = spawn_proxy(&config, &dir).await;
    let addr = proxy.addr("public");

    // 5,000 live WebSockets, opened 100 at a time.
    let mut live = Vec::with_capacity(LIVE);
    within("5,000 WebSockets to open", async {
        for _ in 0..LIVE / 100 {
            let batch: Vec<_> = (0..100).map(|_| tokio::spawn(open(addr))).collect();
            for task in batch {
                live.push(task.await.expect("handshake task"));
            }
        }
    })
    .await;

    // Then a burst of 200 more at once, from the same address.
    let burst: Vec<_> = (0..BURST).map(|_| tokio::spawn(open(addr))).collect();
    let mut more = Vec::with_capacity(BURST);
    for task in burst {
        more.push(task.await.expect("burst handshake task"));
    }
    assert_eq!(live.len() + more.len(), LIVE + BURST);

    // Each tunnel counts itself once its task runs, just after the 101 went out: poll.
    let text = within("every WebSocket to be counted", async {
        loop {
            let mut metrics = RawClient::connect(proxy.admin()).await;
            metrics
                .send(&http_request("GET", "/metrics", &[("Host", "admin")]))
                .await;
            let text = metrics.read_response().await.body_text();
            let active: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("wsgate_connections_active{route=\"echo\"} "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0);
            if active as usize == LIVE + BURST {
                return text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        !text.lines().any(|l| l.starts_with("wsgate_rejected_total")),
        "something was refused:\n{}",
        text.lines()
            .filter(|l| l.starts_with("wsgate_rejected_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
