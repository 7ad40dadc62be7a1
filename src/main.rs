//! The `progressd` binary: parse the command line, set up logging, bind, run.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use std::io::Write;

use progressd::cli;
use progressd::config::{Cli, Command, ExportArgs, ImportArgs, LogFormat, ServeArgs};
use progressd::{Config, Listener};

/// jemalloc rather than glibc's malloc: a quarter fewer CPU cycles per publish, the same memory
/// per idle stream (README "Performance", allocator).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::CheckConfig(args) => check_config(args),
        Command::Export(args) => export(args),
        Command::Import(args) => import(args),
        Command::Publish(args) => cli::block_on(cli::publish::run(args)),
        Command::Watch(args) => cli::block_on(cli::watch::watch(args)),
        Command::Wait(args) => cli::block_on(cli::watch::wait(args)),
        Command::Jobs(args) => cli::block_on(cli::jobs::run(args)),
        Command::Exec(args) => cli::block_on(cli::exec::run(args)),
        Command::Bench(args) => progressd::bench::run(args),
    }
}

/// `progressd export`: pages through `/v1/admin/export` into one JSON-lines file.
fn export(args: ExportArgs) -> ExitCode {
    let run = async {
        let mut out: Box<dyn Write> = match &args.output {
            Some(path) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
            )),
            None => Box::new(std::io::stdout().lock()),
        };
        let client = reqwest::Client::new();
        let base = args.url.trim_end_matches('/');
        let mut cursor: Option<String> = None;
        let (mut jobs, mut lines) = (0u64, 0u64);
        loop {
            let mut req = client
                .get(format!("{base}/v1/admin/export"))
                .query(&[("limit", "100")]);
            if let Some(c) = &cursor {
                req = req.query(&[("cursor", c)]);
            }
            let res = req.send().await.map_err(|e| format!("{base}: {e}"))?;
            if !res.status().is_success() {
                let status = res.status();
                return Err(format!(
                    "{base}: {status}: {}",
                    res.text().await.unwrap_or_default()
                ));
            }
            let page = res.text().await.map_err(|e| format!("{base}: {e}"))?;
            cursor = None;
            for line in page.lines() {
                let parsed: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| format!("bad export line: {e}"))?;
                match parsed["type"].as_str() {
                    Some("next") => {
                        cursor = parsed["cursor"].as_str().map(str::to_owned);
                        continue;
                    }
                    Some("job") => jobs += 1,
                    _ => {}
                }
                lines += 1;
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
            }
            if cursor.is_none() {
                break;
            }
        }
        out.flush().map_err(|e| e.to_string())?;
        Ok::<_, String>((jobs, lines))
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(run))
    {
        Ok((jobs, lines)) => {
            eprintln!("progressd: exported {jobs} jobs ({lines} lines)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("progressd export: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `progressd import`: restores an export into an empty data directory, offline.
fn import(args: ImportArgs) -> ExitCode {
    let dir = progressd::config::data_dir(args.data_dir);
    let result = (|| -> Result<(u64, u64), String> {
        let store = progressd::store::Store::open(&dir, 64 * 1024 * 1024, Default::default())
            .map_err(|e| format!("{e} (is a daemon running on it?)"))?;
        let input: Box<dyn std::io::BufRead> = if args.file.as_os_str() == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(&args.file)
                    .map_err(|e| format!("{}: {e}", args.file.display()))?,
            ))
        };
        progressd::backup::import(&store, input, args.finished_ttl).map_err(|e| e.to_string())
    })();
    match result {
        Ok((jobs, events)) => {
            eprintln!(
                "progressd: imported {jobs} jobs and {events} events into {}",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("progressd import: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `progressd check-config`: the same validation as `serve`, and nothing else.
fn check_config(args: ServeArgs) -> ExitCode {
    match Config::try_from(args) {
        Ok(config) => {
            println!(
                "progressd: configuration ok (listen {}, data dir {}, durability {:?})",
                config
                    .listen
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                config.data_dir.display(),
                config.durability
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("progressd: {e}");
            ExitCode::from(2)
        }
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
    // Sockets passed by systemd: read (and cleared from the environment, as the protocol
    // asks) here, before the runtime starts any thread.
    let activated = listenfd::ListenFd::from_env();
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
        let listeners = match listeners(activated, &config).await {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        let daemon = async {
            let result = progressd::run(listeners, config, shutdown.clone()).await;
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

/// systemd's sockets if it passed any, else `--listen`.
async fn listeners(
    activated: listenfd::ListenFd,
    config: &Config,
) -> Result<Vec<Listener>, progressd::ListenError> {
    let passed = Listener::from_systemd(activated)?;
    if !passed.is_empty() {
        info!(count = passed.len(), "using sockets passed by systemd");
        return Ok(passed);
    }
    let mut out = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
        out.push(Listener::bind(addr, config.unix_mode).await?);
    }
    Ok(out)
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
