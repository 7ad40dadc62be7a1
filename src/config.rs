//! Configuration: the command line (every flag also read from `PROGRESSD_*`), validated once
//! into a typed [`Config`] that the rest of the daemon takes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::listen::ListenAddr;
use crate::model::MAX_BATCH;

/// The largest `--max-body`. One request's events are stored as one value, and the store
/// reads no record over 16 MiB (`store::codec`): a request of 8 MiB, with the few bytes each
/// event adds, stays well under it.
pub const MAX_BODY_LIMIT: usize = 8 << 20;
use crate::store::Faults;

#[derive(Debug, Parser)]
#[command(
    name = "progressd",
    version,
    about = "Durable job progress: publish over HTTP, watch live over SSE and WebSocket."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Validate the configuration (flags and PROGRESSD_* variables) and exit: 0 if it is
    /// good, 2 with a message if not. For `ExecStartPre=`.
    CheckConfig(ServeArgs),
    /// Back up a running daemon: every job with its retained events, as JSON lines.
    Export(ExportArgs),
    /// Restore an export into an empty data directory (with the daemon stopped).
    Import(ImportArgs),
    /// Publish one update to a job; prints its seq.
    Publish(crate::cli::publish::PublishArgs),
    /// Follow a job live (a progress bar on a terminal, else a line per event), resuming
    /// after disconnects. Exits 0 succeeded, 1 failed, 2 cancelled, 3 daemon unreachable,
    /// 4 job deleted.
    Watch(crate::cli::watch::WatchArgs),
    /// Block until a job ends; prints how it ended. Exit codes as `watch`, and 124 when
    /// --timeout runs out.
    Wait(crate::cli::watch::WaitArgs),
    /// List jobs: id, status, percent, stage, last update.
    Jobs(crate::cli::jobs::JobsArgs),
    /// Run a command as a job: its output lines become progress; exits with its exit code.
    Exec(crate::cli::exec::ExecArgs),
    /// Load-test a daemon (or another SSE server): publish, fanout, idle, resume-storm,
    /// startup.
    Bench(crate::bench::BenchArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The daemon to export from.
    #[arg(long, env = "PROGRESSD_URL", default_value = "http://127.0.0.1:7700")]
    pub url: String,
    /// Write here instead of standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Data directory to fill [default: $STATE_DIRECTORY if set, else ./progressd-data].
    #[arg(long, env = "PROGRESSD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Finished jobs expire this long after they finished (as in `serve`).
    #[arg(long, env = "PROGRESSD_FINISHED_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub finished_ttl: Duration,
    /// The export to read; `-` for standard input.
    pub file: PathBuf,
}

/// `--data-dir`, else systemd's `$STATE_DIRECTORY` (a colon-separated list; the first), else
/// `./progressd-data`.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| {
        std::env::var_os("STATE_DIRECTORY")
            .and_then(|v| {
                v.to_str()
                    .and_then(|s| s.split(':').next())
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("progressd-data"))
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    /// Acknowledge a publish only once it is on disk (group commit).
    Sync,
    /// Acknowledge at once; flush every `--flush-interval`.
    Relaxed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen: `host:port` or `unix:/path`; repeat (or separate with commas) for
    /// several. Ignored when systemd passes sockets (socket activation).
    #[arg(
        long,
        env = "PROGRESSD_LISTEN",
        default_value = "127.0.0.1:7700",
        value_delimiter = ','
    )]
    pub listen: Vec<ListenAddr>,
    /// Permissions of Unix sockets we create, in octal.
    #[arg(long, env = "PROGRESSD_UNIX_MODE", default_value = "660", value_parser = parse_mode)]
    pub unix_mode: u32,
    /// Data directory [default: $STATE_DIRECTORY if set, else ./progressd-data].
    #[arg(long, env = "PROGRESSD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// When a publish is acknowledged.
    #[arg(long, env = "PROGRESSD_DURABILITY", value_enum, default_value = "sync")]
    pub durability: Durability,
    /// Flush period in relaxed mode.
    #[arg(long, env = "PROGRESSD_FLUSH_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub flush_interval: Duration,
    /// Events kept per job; older ones are dropped (the snapshot stays).
    #[arg(long, env = "PROGRESSD_HISTORY", default_value_t = 1000)]
    pub history: u64,
    /// How long a finished job and its history are kept after it finished.
    #[arg(long, env = "PROGRESSD_FINISHED_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub finished_ttl: Duration,
    /// SSE keepalive comment and WebSocket ping interval.
    #[arg(long, env = "PROGRESSD_KEEPALIVE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,
    /// SSE `retry:` sent to clients.
    #[arg(long, env = "PROGRESSD_RETRY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry: Duration,
    /// Largest serialized `data` of one update, in bytes.
    #[arg(long, env = "PROGRESSD_MAX_DATA", default_value_t = 16 * 1024)]
    pub max_data: usize,
    /// Largest request body, in bytes (chunked bodies included): 1 KiB to 8 MiB.
    #[arg(long, env = "PROGRESSD_MAX_BODY", default_value_t = 64 * 1024)]
    pub max_body: usize,
    /// Open connections beyond which new ones get 503 and are closed.
    #[arg(long, env = "PROGRESSD_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,
    /// Time a client has to send its request headers (slowloris).
    #[arg(long, env = "PROGRESSD_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// Threads of the runtime event streams run on (fan-out and writing to subscribers),
    /// apart from the one that serves requests and stores events; 0 shares that one. Default:
    /// half the CPUs, at least 1.
    #[arg(long, env = "PROGRESSD_STREAM_THREADS")]
    pub stream_threads: Option<usize>,
    /// Jobs one /v1/ws socket may follow at once.
    #[arg(
        long,
        env = "PROGRESSD_MAX_SUBSCRIPTIONS_PER_SOCKET",
        default_value_t = 100
    )]
    pub max_subscriptions_per_socket: usize,
    /// Most updates in one batch (the contract allows 1000).
    #[arg(long, env = "PROGRESSD_MAX_BATCH", default_value_t = MAX_BATCH as u16, value_parser = clap::value_parser!(u16).range(1..=MAX_BATCH as i64))]
    pub max_batch: u16,
    /// Largest page of GET /v1/jobs and history (the contract allows 1000).
    #[arg(long, env = "PROGRESSD_MAX_LIST", default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_list: u16,
    /// How long a publish's Idempotency-Key is remembered: a repeat within it appends
    /// nothing and gets the first answer.
    #[arg(long, env = "PROGRESSD_IDEMPOTENCY_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub idempotency_window: Duration,
    /// Grace period for shutdown; past it the daemon warns and exits anyway.
    #[arg(long, env = "PROGRESSD_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Size of sled's page cache, in bytes.
    #[arg(long, env = "PROGRESSD_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub cache_bytes: u64,
    /// File holding the HS256 secret of the JWTs the application's backend mints. Without
    /// it every request is allowed, which is only accepted on loopback and Unix sockets.
    #[arg(long, env = "PROGRESSD_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Serve without tokens on a non-loopback address, on purpose.
    #[arg(long, env = "PROGRESSD_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,
    /// An origin (scheme://host[:port]) whose pages may call the API from a browser;
    /// repeat for several. None by default.
    #[arg(
        long = "cors-origin",
        env = "PROGRESSD_CORS_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Inject a store fault, for tests and failure drills (e.g. stall-flush-after=3).
    #[arg(long, env = "PROGRESSD_FAULT", hide = true)]
    pub fault: Option<Faults>,
    /// Log format [default: pretty on a terminal, pretty without colours otherwise].
    #[arg(long, env = "PROGRESSD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?}: expected an octal mode such as 660"))
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--history must be at least 1")]
    History,
    #[error("--{0} must be longer than zero")]
    ZeroDuration(&'static str),
    #[error("--max-body must be between 1024 and {MAX_BODY_LIMIT} bytes")]
    MaxBody,
    #[error("--jwt-secret-file {path}: {reason}")]
    JwtSecret { path: String, reason: String },
    #[error("--cors-origin {0:?}: expected scheme://host[:port], e.g. https://app.example.com")]
    CorsOrigin(String),
    #[error(transparent)]
    Exposed(#[from] crate::auth::ExposureError),
}

/// The validated configuration of `progressd serve`.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<ListenAddr>,
    pub unix_mode: u32,
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub flush_interval: Duration,
    pub history: u64,
    pub finished_ttl: Duration,
    pub keepalive: Duration,
    pub retry: Duration,
    pub max_data: usize,
    pub max_body: usize,
    pub max_connections: usize,
    pub header_timeout: Duration,
    /// Workers of the stream runtime (`supervisor::StreamRuntime`); 0: none.
    pub stream_threads: usize,
    pub max_subscriptions_per_socket: usize,
    pub max_batch: usize,
    pub max_list: usize,
    pub idempotency_window: Duration,
    pub shutdown_timeout: Duration,
    pub cache_bytes: u64,
    /// How often retention looks for expired jobs.
    pub gc_interval: Duration,
    /// Slots of each watched job's live channel; a fan-out stage further behind hands its
    /// subscribers back to catch up from the store.
    pub job_channel: usize,
    /// Slots of the all-jobs live channel.
    pub all_channel: usize,
    /// Store faults to inject (tests and drills only).
    pub faults: Faults,
    /// The HS256 secret of accepted JWTs; None: no auth.
    pub jwt_secret: Option<Vec<u8>>,
    pub allow_anonymous: bool,
    pub cors_origins: Vec<String>,
}

impl Config {
    /// The defaults of `progressd serve`, storing in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 7700)))],
            unix_mode: 0o660,
            data_dir: data_dir.into(),
            durability: Durability::Sync,
            flush_interval: Duration::from_millis(100),
            history: 1000,
            finished_ttl: Duration::from_secs(24 * 3600),
            keepalive: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            max_data: 16 * 1024,
            max_body: 64 * 1024,
            max_connections: 50_000,
            header_timeout: Duration::from_secs(10),
            stream_threads: default_stream_threads(),
            max_subscriptions_per_socket: 100,
            max_batch: MAX_BATCH,
            max_list: 1000,
            idempotency_window: Duration::from_secs(600),
            shutdown_timeout: Duration::from_secs(10),
            cache_bytes: 64 * 1024 * 1024,
            gc_interval: Duration::from_secs(1),
            job_channel: 256,
            all_channel: 4096,
            faults: Faults::default(),
            jwt_secret: None,
            allow_anonymous: false,
            cors_origins: Vec::new(),
        }
    }
}

/// Half the CPUs, at least 1: on 2 cores a fan-out takes one, and publishes keep the other.
pub fn default_stream_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Config, ConfigError> {
        if a.history == 0 {
            return Err(ConfigError::History);
        }
        for (name, d) in [
            ("flush-interval", a.flush_interval),
            ("finished-ttl", a.finished_ttl),
            ("keepalive", a.keepalive),
            ("shutdown-timeout", a.shutdown_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        if !(1024..=MAX_BODY_LIMIT).contains(&a.max_body) {
            return Err(ConfigError::MaxBody);
        }
        let data_dir = data_dir(a.data_dir);
        let jwt_secret = match &a.jwt_secret_file {
            None => None,
            Some(path) => {
                let bad = |reason: String| ConfigError::JwtSecret {
                    path: path.display().to_string(),
                    reason,
                };
                let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
                let secret = text.trim_ascii().to_vec();
                if secret.len() < 32 {
                    return Err(bad("the secret must be at least 32 bytes".into()));
                }
                Some(secret)
            }
        };
        for origin in &a.cors_origins {
            let ok = (origin.starts_with("http://") || origin.starts_with("https://"))
                && origin
                    .split("://")
                    .nth(1)
                    .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
            if !ok {
                return Err(ConfigError::CorsOrigin(origin.clone()));
            }
        }
        let auth = crate::auth::Auth::new(jwt_secret.as_deref());
        crate::auth::check_exposure(&a.listen, &auth, a.allow_anonymous)?;
        let gc_interval =
            (a.finished_ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(60));
        Ok(Config {
            listen: a.listen,
            unix_mode: a.unix_mode,
            data_dir,
            durability: a.durability,
            flush_interval: a.flush_interval,
            history: a.history,
            finished_ttl: a.finished_ttl,
            keepalive: a.keepalive,
            retry: a.retry,
            max_data: a.max_data,
            max_body: a.max_body,
            max_connections: a.max_connections,
            header_timeout: a.header_timeout,
            stream_threads: a.stream_threads.unwrap_or_else(default_stream_threads),
            max_subscriptions_per_socket: a.max_subscriptions_per_socket,
            max_batch: usize::from(a.max_batch),
            max_list: usize::from(a.max_list),
            idempotency_window: a.idempotency_window,
            shutdown_timeout: a.shutdown_timeout,
            cache_bytes: a.cache_bytes,
            gc_interval,
            faults: a.fault.unwrap_or_default(),
            jwt_secret,
            allow_anonymous: a.allow_anonymous,
            cors_origins: a.cors_origins,
            ..Config::new(PathBuf::new())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cli = Cli::try_parse_from(["progressd", "serve"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        let (Command::Serve(a) | Command::CheckConfig(a)) = cli.command else {
            unreachable!("parse() is only given serve arguments")
        };
        Config::try_from(a).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = parse(&["--data-dir", "/tmp/x"]).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:7700".parse().unwrap()]);
        assert_eq!(c.unix_mode, 0o660);
        assert_eq!(c.durability, Durability::Sync);
        assert_eq!(c.flush_interval, Duration::from_millis(100));
        assert_eq!(c.history, 1000);
        assert_eq!(c.finished_ttl, Duration::from_secs(86_400));
        assert_eq!(c.keepalive, Duration::from_secs(15));
        assert_eq!(c.retry, Duration::from_secs(2));
        assert_eq!(c.max_data, 16_384);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
    }

    #[test]
    fn durations_and_bad_values() {
        let c = parse(&[
            "--data-dir",
            "x",
            "--keepalive",
            "500ms",
            "--finished-ttl",
            "2h",
        ])
        .unwrap();
        assert_eq!(c.keepalive, Duration::from_millis(500));
        assert_eq!(c.finished_ttl, Duration::from_secs(7200));
        assert!(parse(&["--history", "0"]).unwrap_err().contains("history"));
        assert!(parse(&["--listen", "nope"])
            .unwrap_err()
            .contains("host:port"));
        assert!(parse(&["--keepalive", "soon"]).is_err());
        assert!(parse(&["--max-body", "8388608"]).is_ok());
        assert!(parse(&["--max-body", "8388609"])
            .unwrap_err()
            .contains("--max-body"));
    }
}
