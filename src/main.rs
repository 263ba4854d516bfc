//! The `wsgate` command: parse arguments, load the configuration, build the runtime, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wsgate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "wsgate",
    version,
    about = "A reverse proxy for WebSocket traffic"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "WSGATE_CONFIG",
        default_value = "proxy.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the configuration and print a summary (exit 1 with file:line:col on errors).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Check) = cli.command {
        print!("{}", config.summary());
        return ExitCode::SUCCESS;
    }
    wsgate::logging::init(&config.log);
    // One worker: a single-threaded scheduler (no work-stealing queues, no cross-thread
    // wake-ups); the process still has tokio's blocking pool for reloads.
    let mut runtime = match config.runtime.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if n > 0 {
                builder.worker_threads(n);
            }
            builder
        }
    };
    runtime.enable_all();
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("wsgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let server = wsgate::Wsgate::bind(config).await?;
    let reloader = server.reloader();
    match signal(SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    // Blocking file reads and certificate parsing stay off the async workers.
                    let reloader = reloader.clone();
                    let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /reload"),
    }
    // Both signal streams exist before serving starts, so a second signal is never missed.
    let mut stop = StopSignals::new()?;
    server
        .run(async move {
            stop.recv().await;
            tracing::info!("draining; a second signal stops at once");
            tokio::spawn(async move {
                stop.recv().await;
                tracing::warn!("second signal: stopping now");
                std::process::exit(1);
            });
        })
        .await
}

/// SIGTERM and SIGINT, either of which starts the drain.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
