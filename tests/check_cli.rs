//! `wsgate check --config PATH`: exit 0 with a summary for a good file, exit 1 with one
//! `file:line:col: message` line per problem for a bad one.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `wsgate check --config <config>` from `cwd`.
fn check(cwd: &Path, config: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config", config])
        .current_dir(cwd)
        .env_remove("WSGATE_CONFIG")
        .env_remove("WSGATE_LOG")
        .output()
        .expect("cannot run the wsgate binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `toml` as `bad.toml` in a fresh folder, checks it, and asserts exit 1 with
/// `bad.toml:LINE:COL: ` followed (on the same line) by `phrase`.
#[track_caller]
fn assert_rejected(toml: &str, position: &str, phrase: &str) {
    let dir = tempfile::tempdir().expect("cannot create a temporary folder");
    std::fs::write(dir.path().join("bad.toml"), toml).expect("cannot write bad.toml");
    let out = check(dir.path(), "bad.toml");
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "want exit 1 for:\n{toml}\nstdout:\n{}\nstderr:\n{stderr}",
        text(&out.stdout)
    );
    let want = format!("bad.toml:{position}: ");
    assert!(
        stderr
            .lines()
            .any(|line| line.contains(&want) && line.contains(phrase)),
        "want a line with {want:?} and {phrase:?}; stderr was:\n{stderr}"
    );
}

#[test]
fn the_example_config_passes() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml.example");
    let out = check(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        example.to_str().expect("the path is UTF-8"),
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    for part in [
        "configuration OK",
        "public",
        "127.0.0.1:8080",
        "127.0.0.1:9090",
        "path /echo",
        "-> builtin echo",
        "-> upstream app",
        "round_robin",
        "127.0.0.1:9001",
    ] {
        assert!(stdout.contains(part), "missing {part:?} in:\n{stdout}");
    }
    assert!(stdout.ends_with('\n'));
}

#[test]
fn tls_paths_are_relative_to_the_config_folder() {
    let dir = tempfile::tempdir().expect("cannot create a temporary folder");
    let sub = dir.path().join("conf");
    std::fs::create_dir_all(sub.join("certs")).expect("cannot create conf/certs");
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("cannot generate a certificate");
    std::fs::write(sub.join("certs/server.crt"), pair.cert.pem()).expect("write cert");
    std::fs::write(
        sub.join("certs/server.key"),
        pair.signing_key.serialize_pem(),
    )
    .expect("write key");
    let toml = r#"
[listeners.secure]
bind = "127.0.0.1:8443"
[listeners.secure.tls]
cert = "certs/server.crt"
key = "certs/server.key"

[routes.echo]
path = "/echo"
builtin = "echo"
"#;
    std::fs::write(sub.join("proxy.toml"), toml).expect("write proxy.toml");
    // Run from the parent folder: the paths must still resolve against conf/.
    let out = check(dir.path(), "conf/proxy.toml");
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("tls: yes"), "{stdout}");
}

#[test]
fn unknown_key() {
    assert_rejected(
        r#"[listeners.public]
bind = "127.0.0.1:8080"
binnd = "0.0.0.0:8080"
[routes.echo]
builtin = "echo"
"#,
        "3:1",
        "unknown key `binnd` in [listeners.public]; expected one of: bind, http2, http2_max_streams, tls",
    );
}

#[test]
fn bad_duration() {
    assert_rejected(
        r#"[listeners.public]
bind = "127.0.0.1:8080"
[timeouts]
idle = "30 seconds"
[routes.echo]
builtin = "echo"
"#,
        "4:8",
        r#"invalid duration "30 seconds" for timeouts.idle: expected a number and a unit (ms, s, m, h)"#,
    );
}

#[test]
fn unknown_upstream() {
    assert_rejected(
        r#"[listeners.public]
bind = "127.0.0.1:8080"
[upstreams.chat]
servers = ["127.0.0.1:9001"]
[routes.chat]
path = "/ws"
upstream = "chta"
"#,
        "7:12",
        "unknown upstream `chta` for routes.chat.upstream; known upstreams: chat",
    );
}

#[test]
fn duplicate_listener_address() {
    assert_rejected(
        r#"[listeners.a]
bind = "127.0.0.1:8080"
[listeners.b]
bind = "127.0.0.1:8080"
[routes.echo]
builtin = "echo"
"#,
        "4:8",
        "listeners.b.bind 127.0.0.1:8080 clashes with listeners.a.bind",
    );
}

#[test]
fn bad_size() {
    assert_rejected(
        r#"[listeners.public]
bind = "127.0.0.1:8080"
[limits]
max_frame_size = "1M"
[routes.echo]
builtin = "echo"
"#,
        "4:18",
        r#"invalid size "1M" for limits.max_frame_size: unknown unit "M""#,
    );
}

#[test]
fn missing_cert_file() {
    let toml = r#"[listeners.secure]
bind = "127.0.0.1:8443"
[listeners.secure.tls]
cert = "missing.crt"
key = "missing.key"
[routes.echo]
builtin = "echo"
"#;
    assert_rejected(
        toml,
        "4:8",
        r#"cannot read certificate file "missing.crt" for listeners.secure.tls.cert"#,
    );
    assert_rejected(
        toml,
        "5:7",
        r#"cannot read private key file "missing.key" for listeners.secure.tls.key"#,
    );
}

#[test]
fn bad_balance() {
    assert_rejected(
        r#"[listeners.public]
bind = "127.0.0.1:8080"
[upstreams.app]
servers = ["127.0.0.1:9001"]
balance = "fastest"
[routes.app]
upstream = "app"
"#,
        "5:11",
        r#"invalid balance "fastest" for upstreams.app.balance: expected one of round_robin, least_conn, ip_hash"#,
    );
}

#[test]
fn every_problem_is_reported() {
    let toml = r#"[listeners.public]
bind = "127.0.0.1:8080"
[timeouts]
ping_interval = "often"
[upstreams.app]
servers = []
[routes.app]
upstream = "ap"
"#;
    for (position, phrase) in [
        (
            "4:17",
            "invalid duration \"often\" for timeouts.ping_interval",
        ),
        ("6:11", "upstreams.app.servers is empty"),
        ("8:12", "unknown upstream `ap`"),
    ] {
        assert_rejected(toml, position, phrase);
    }
}

#[test]
fn unreadable_file() {
    let dir = tempfile::tempdir().expect("cannot create a temporary folder");
    let out = check(dir.path(), "nowhere.toml");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("nowhere.toml: cannot read the config file"),
        "{stderr}"
    );
}

/// The TOML inside `deploy/kubernetes/configmap.yaml` (the `proxy.toml: |` block).
fn configmap_toml() -> String {
    let yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/configmap.yaml"),
    )
    .expect("read configmap.yaml");
    let lines = yaml
        .lines()
        .skip_while(|l| l.trim() != "proxy.toml: |")
        .skip(1);
    let first = lines
        .clone()
        .find(|l| !l.trim().is_empty())
        .expect("a TOML block");
    let indent = first.len() - first.trim_start().len();
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_config_shipped_in_the_repository_passes() {
    // The ConfigMap's file, with the Secret's mount point replaced by a file holding a
    // token as the Secret would (the only path outside the config it names).
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").expect("write the token");
    let toml = configmap_toml();
    assert!(
        toml.contains("token_file = \"/etc/wsgate-admin/token\""),
        "{toml}"
    );
    let toml = toml.replace("/etc/wsgate-admin/token", token.to_str().expect("UTF-8"));
    std::fs::write(dir.path().join("proxy.toml"), &toml).expect("write proxy.toml");
    let out = check(dir.path(), "proxy.toml");
    assert_eq!(
        out.status.code(),
        Some(0),
        "configmap.yaml's proxy.toml:\n{}",
        text(&out.stderr)
    );
    // Without the token file it would be refused: the admin listener is on 0.0.0.0.
    let open = configmap_toml().replace("token_file = \"/etc/wsgate-admin/token\"", "");
    std::fs::write(dir.path().join("open.toml"), open).expect("write open.toml");
    let out = check(dir.path(), "open.toml");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is reachable from other machines: set admin.token_file"),
        "{}",
        text(&out.stderr)
    );
    // The benchmark's template, placeholders filled as benches/proxy.rs does.
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers/wsgate.toml"),
    )
    .expect("read benches/peers/wsgate.toml");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let issued =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
    std::fs::write(&cert, issued.cert.pem()).expect("write the certificate");
    std::fs::write(&key, issued.signing_key.serialize_pem()).expect("write the key");
    let mut filled = template;
    for (placeholder, value) in [
        ("{{CERT}}", cert.to_str().expect("UTF-8").to_string()),
        ("{{KEY}}", key.to_str().expect("UTF-8").to_string()),
    ] {
        filled = filled.replace(placeholder, &value);
    }
    let mut port = 19000;
    while let Some(start) = filled.find("{{") {
        let end = filled[start..].find("}}").expect("a closed placeholder") + start + 2;
        port += 1;
        filled.replace_range(start..end, &port.to_string());
    }
    std::fs::write(dir.path().join("bench.toml"), filled).expect("write bench.toml");
    let out = check(dir.path(), "bench.toml");
    assert_eq!(
        out.status.code(),
        Some(0),
        "benches/peers/wsgate.toml:\n{}",
        text(&out.stderr)
    );
}
