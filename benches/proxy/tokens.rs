//! Signing keys and bearer tokens for the JWT workloads (`handshake-jwt-rs256`,
//! `handshake-jwt-es256`, `idle-jwt`): a fresh key per run (RSA-2048 made by `openssl`,
//! P-256 by ring, with the tests' helpers in tests/support/jwt.rs), its public half as a JWKS
//! file for wsgate's `[routes.X.auth] jwt = { jwks = ... }`, and one token signed with it
//! (`sub`, `exp` one hour ahead) for the load client's `--bearer-file`.
//!
//! `cargo bench --bench proxy -- jwt --alg rs256 --dir DIR` writes the same files on its own
//! (benches/instructions.sh uses it); with `--time`, it also times wsgate's token check and
//! ring's signature check alone on that token, in a loop.

use std::fs;
use std::future::Future;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::signature as ring_sig;
use serde_json::json;

use crate::signer::{self, Signer};

/// How long the tokens are valid: far longer than any run.
const TOKEN_LIFETIME_S: u64 = 3600;

/// The signing algorithm of a JWT workload.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlg {
    /// RSA-2048, PKCS#1 v1.5 with SHA-256.
    Rs256,
    /// ECDSA P-256 with SHA-256.
    Es256,
}

impl JwtAlg {
    /// Lower-case name, as in file names, route names and paths.
    pub fn id(self) -> &'static str {
        match self {
            JwtAlg::Rs256 => "rs256",
            JwtAlg::Es256 => "es256",
        }
    }

    /// The route path whose `auth` verifies tokens of this algorithm.
    pub fn path(self) -> String {
        format!("/jwt-{}", self.id())
    }
}

/// The files of one algorithm's key and token.
#[derive(Debug, Clone)]
pub struct TokenFiles {
    pub alg: JwtAlg,
    /// The JWKS (public key) wsgate verifies with.
    pub jwks: PathBuf,
    /// The token alone, no newline.
    pub token: PathBuf,
}

/// Makes a key, writes `DIR/jwks-ALG.json` and `DIR/token-ALG.txt`.
pub fn make(alg: JwtAlg, dir: &Path) -> anyhow::Result<TokenFiles> {
    make_with_key(alg, dir).map(|(files, _)| files)
}

/// [`make`], also returning the key.
fn make_with_key(alg: JwtAlg, dir: &Path) -> anyhow::Result<(TokenFiles, Signer)> {
    let kid = format!("bench-{}", alg.id());
    let key = match alg {
        JwtAlg::Rs256 => {
            // The helper panics without openssl: say so plainly instead.
            let found = Command::new("openssl")
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                bail!("RS256 needs the `openssl` command to make an RSA key (apt-get install openssl)");
            }
            Signer::rsa(&kid)
        }
        JwtAlg::Es256 => Signer::ec(&kid),
    };
    let claims = json!({
        "sub": "bench-client",
        "iat": signer::now(),
        "exp": signer::now() + TOKEN_LIFETIME_S,
    });
    let files = TokenFiles {
        alg,
        jwks: dir.join(format!("jwks-{}.json", alg.id())),
        token: dir.join(format!("token-{}.txt", alg.id())),
    };
    fs::write(&files.jwks, signer::jwks(&[&key]))
        .with_context(|| format!("write {}", files.jwks.display()))?;
    fs::write(&files.token, key.sign(&claims))
        .with_context(|| format!("write {}", files.token.display()))?;
    Ok((files, key))
}

/// wsgate routes that verify each algorithm's tokens, to append to the bench config: the
/// same upstream as the plain route, `[routes.X.auth]` with the JWKS file and every other
/// auth setting at its default (token from `Authorization: Bearer`, `close_on_expiry` on).
pub fn wsgate_routes(files: &[TokenFiles]) -> String {
    let mut out = String::new();
    for f in files {
        out.push_str(&format!(
            "\n[routes.jwt_{id}]\npath = \"{path}\"\nupstream = \"echo\"\n\
             [routes.jwt_{id}.auth]\njwt = {{ jwks = {jwks} }}\n",
            id = f.alg.id(),
            path = f.alg.path(),
            jwks = toml_string(&f.jwks.display().to_string()),
        ));
    }
    out
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// The signing algorithm.
    #[arg(long, value_enum)]
    alg: JwtAlg,
    /// Where to write jwks-ALG.json and token-ALG.txt.
    #[arg(long)]
    dir: PathBuf,
    /// Also time, on this token, wsgate's whole token check (a route's `JwtAuth::verify`)
    /// and ring's signature check alone: microseconds per call, best of five batches of 2,000,
    /// on stderr.
    #[arg(long)]
    time: bool,
}

/// The `jwt` subcommand: writes the files and prints their paths, one a line.
pub fn run(opts: Opts) -> anyhow::Result<()> {
    fs::create_dir_all(&opts.dir)?;
    let (files, key) = make_with_key(opts.alg, &opts.dir)?;
    println!("{}\n{}", files.jwks.display(), files.token.display());
    if opts.time {
        time_checks(&files, &key)?;
    }
    Ok(())
}

/// Microseconds per call of `f`: best of five batches of 2,000, after 200 unmeasured.
fn per_call_us(mut f: impl FnMut()) -> f64 {
    const BATCH: u32 = 2000;
    for _ in 0..200 {
        f();
    }
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..BATCH {
                f();
            }
            start.elapsed().as_secs_f64() * 1e6 / f64::from(BATCH)
        })
        .fold(f64::MAX, f64::min)
}

/// Runs a future that never waits (a check against a key file) to completion.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a check against a key file waited"),
    }
}

/// `--time`: the route's check as wsgate builds it from a config, and the signature alone.
fn time_checks(files: &TokenFiles, key: &Signer) -> anyhow::Result<()> {
    let token = fs::read_to_string(&files.token)?;
    let config_text = format!(
        "[listeners.plain]\nbind = \"127.0.0.1:1\"\n[upstreams.echo]\n\
         servers = [\"127.0.0.1:1\"]\n[routes.echo]\npath = \"/\"\nupstream = \"echo\"\n\
         [routes.echo.auth]\njwt = {{ jwks = {} }}\n",
        toml_string(&files.jwks.display().to_string())
    );
    let config = wsgate::config::Config::from_toml(&config_text, Path::new("bench.toml"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let jwt_config = config
        .route("echo")
        .and_then(|r| r.auth.as_ref())
        .and_then(|a| a.jwt.as_ref())
        .context("the route has no jwt")?;
    let auth = wsgate::auth::jwt::JwtAuth::new(jwt_config, |_| unreachable!("a key file"));
    if let Err(e) = ready(auth.verify(&token)) {
        bail!("wsgate refused the token: {}", e.reason());
    }
    let whole = per_call_us(|| {
        black_box(ready(auth.verify(black_box(&token))).is_ok());
    });
    let (input, signature) = token.rsplit_once('.').context("a token has three parts")?;
    let signature = B64.decode(signature)?;
    let jwk = key.jwk();
    let part = |name: &str| -> anyhow::Result<Vec<u8>> {
        let text = jwk[name].as_str().context("JWK member")?;
        Ok(B64.decode(text)?)
    };
    let (what, alone) = match files.alg {
        JwtAlg::Rs256 => {
            let (n, e) = (part("n")?, part("e")?);
            let check = || {
                ring_sig::RsaPublicKeyComponents { n: &n, e: &e }
                    .verify(
                        &ring_sig::RSA_PKCS1_2048_8192_SHA256,
                        input.as_bytes(),
                        &signature,
                    )
                    .is_ok()
            };
            anyhow::ensure!(check(), "ring refused the RS256 signature");
            (
                "ring RSA-2048 verification (RsaPublicKeyComponents)",
                per_call_us(|| {
                    black_box(check());
                }),
            )
        }
        JwtAlg::Es256 => {
            let mut point = vec![4u8];
            point.extend(part("x")?);
            point.extend(part("y")?);
            let check = || {
                ring_sig::UnparsedPublicKey::new(&ring_sig::ECDSA_P256_SHA256_FIXED, &point)
                    .verify(input.as_bytes(), &signature)
                    .is_ok()
            };
            anyhow::ensure!(check(), "ring refused the ES256 signature");
            (
                "ring P-256 verification (UnparsedPublicKey)",
                per_call_us(|| {
                    black_box(check());
                }),
            )
        }
    };
    eprintln!(
        "{}: token of {} bytes; wsgate's check (JwtAuth::verify) {whole:.2} µs; {what} {alone:.2} µs; \
         the rest of the check {:.2} µs",
        files.alg.id().to_uppercase(),
        token.len(),
        whole - alone
    );
    Ok(())
}
