//! The `progressd` binary: parse the command line, set up logging, bind, run.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use progressd::config::{Cli, Command, LogFormat, ServeArgs};
use progressd::Config;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let log_format = args.log_format;
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("progressd: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                error!(addr = %config.listen, error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        let daemon = async {
            let result = progressd::run(listener, config, shutdown.clone()).await;
            shutdown.cancel();
            result
        };
        let signals = async {
            tokio::select! {
                () = shutdown_signal() => {
                    info!("shutdown requested");
                    shutdown.cancel();
                }
                () = shutdown.cancelled() => {}
            }
        };
        match tokio::join!(daemon, signals).0 {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(error = %e, "progressd failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            error!(error = %e, "cannot watch SIGTERM; only SIGINT will stop the daemon");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Logs to stderr. Under journald (or any non-terminal) no colours and no timestamps of our
/// own; `--log-format json` for shippers; `RUST_LOG` overrides the levels.
fn init_tracing(format: Option<LogFormat>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("progressd=info,warn"));
    let plain = !std::io::stderr().is_terminal() || std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        Some(LogFormat::Json) => builder.json().init(),
        Some(LogFormat::Pretty) | None if plain => builder.with_ansi(false).without_time().init(),
        Some(LogFormat::Pretty) | None => builder.init(),
    }
}
