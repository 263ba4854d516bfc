//! The proxy benchmark: wsgate against nginx, HAProxy and a direct connection, in
//! one run, on one machine. `cargo bench --bench proxy -- all` (or `benches/run.sh`, which
//! also installs the peers and builds wsgate) runs everything; docs/performance.md explains
//! what is measured and shows the latest results.
//!
//! Subcommands, each usable on its own:
//! - `upstream`: the echo server every target forwards to (`upstream`).
//! - `load`: the load client; prints one JSON object (`load`).
//! - `slowloris`: memory per connection waiting for its head, and handshake latency while
//!   thousands of such connections trickle (`slowloris`).
//! - `jwt`: a signing key's JWKS file and a token signed with it, for the JWT workloads
//!   (`tokens`).
//! - `all`: starts everything pinned to CPUs, runs every workload against every target,
//!   prints the markdown table, writes target/bench/results.json and ratios.svg (`all`,
//!   `report`).

#[path = "proxy/all.rs"]
mod all;
#[path = "proxy/load.rs"]
mod load;
#[path = "proxy/report.rs"]
mod report;
#[path = "../tests/support/jwt.rs"]
mod signer;
#[path = "proxy/slowloris.rs"]
mod slowloris;
#[path = "proxy/sys.rs"]
mod sys;
#[path = "proxy/tokens.rs"]
mod tokens;
#[path = "proxy/upstream.rs"]
mod upstream;
#[path = "proxy/ws.rs"]
mod ws;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "proxy",
    about = "wsgate vs nginx vs HAProxy: WebSocket proxy benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Added by `cargo bench`; ignored.
    #[arg(long, global = true, hide = true)]
    bench: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the whole benchmark (what benches/run.sh does).
    All(all::Opts),
    /// The echo upstream.
    Upstream(upstream::Opts),
    /// The load client: one workload against one URL, JSON on stdout.
    Load(load::Opts),
    /// Slow request heads: memory per waiting connection, handshake latency during the attack.
    Slowloris(slowloris::Opts),
    /// A JWKS file and a bearer token signed with its key (for benches/instructions.sh);
    /// `--time` times wsgate's check of the token.
    Jwt(tokens::Opts),
}

/// Durations on the command line: "10s", "500ms", "1m30s" (wsgate's own syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    wsgate::config::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // `cargo bench` with no arguments runs every bench target: do nothing heavy then.
        None => {
            eprintln!(
                "proxy benchmark: run `benches/run.sh` or `cargo bench --bench proxy -- all` \
                 (`-- --help` for options)"
            );
            Ok(())
        }
        Some(Cmd::All(opts)) => {
            let command_line = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
            all::run(opts, command_line)
        }
        Some(Cmd::Upstream(opts)) => upstream::run(opts),
        Some(Cmd::Load(opts)) => load::run(opts),
        Some(Cmd::Slowloris(opts)) => slowloris::run(opts),
        Some(Cmd::Jwt(opts)) => tokens::run(opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
