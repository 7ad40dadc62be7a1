//! The client commands of the `progressd` binary: `publish`, `watch`, `wait`, `jobs` and
//! `exec`. Each talks HTTP to a daemon (`--url`, `PROGRESSD_URL`) through [`Client`], with
//! `--token` (`PROGRESSD_TOKEN`) as a Bearer token when auth is on.
//!
//! An error from the API is one line on stderr (`progressd: 404 job_not_found: …`) and a
//! non-zero exit. `watch` and `wait` exit with the job's outcome ([`Outcome::exit_code`]).

pub mod exec;
pub mod jobs;
pub mod publish;
pub mod watch;

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use thiserror::Error;

use crate::model::{Status, Update};

/// Where the daemon is, and how to authenticate to it.
#[derive(Clone, Debug, Args)]
pub struct ClientArgs {
    /// The daemon's base URL.
    #[arg(long, env = "PROGRESSD_URL", default_value = "http://127.0.0.1:7700")]
    pub url: String,
    /// A JWT sent as `Authorization: Bearer` (when the daemon runs with auth).
    #[arg(long, env = "PROGRESSD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// What went wrong talking to the daemon.
#[derive(Debug, Error)]
pub enum CliError {
    #[error("{url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The daemon answered with an error body (`{"error","message"}`).
    #[error("{status} {code}: {message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// The daemon sent something that is not the API (a malformed stream, say).
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl CliError {
    /// Worth another attempt: the daemon was unreachable or said it was unavailable.
    pub fn is_transient(&self) -> bool {
        match self {
            CliError::Connect { .. } | CliError::Protocol(_) => true,
            CliError::Api { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            CliError::Usage(_) | CliError::Io(_) => false,
        }
    }
}

/// How a watched job ended, and the exit code `watch` and `wait` give for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished(Status),
    /// Deleted or expired while (or before) we watched.
    Gone,
}

/// Exit codes of `watch` and `wait`, documented in `--help` and README.
pub mod exit {
    pub const SUCCEEDED: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const CANCELLED: u8 = 2;
    /// The daemon could not be reached (after retries), or refused the request.
    pub const UNREACHABLE: u8 = 3;
    /// The job was deleted or expired.
    pub const GONE: u8 = 4;
    /// `wait --timeout` ran out (the code of timeout(1)).
    pub const TIMEOUT: u8 = 124;
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Finished(Status::Succeeded) => exit::SUCCEEDED,
            Outcome::Finished(Status::Failed) => exit::FAILED,
            Outcome::Finished(Status::Cancelled) => exit::CANCELLED,
            // A stream only ends with a terminal status; anything else is a gone job.
            Outcome::Finished(Status::Queued | Status::Running) | Outcome::Gone => exit::GONE,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Outcome::Finished(status) => status.as_str(),
            Outcome::Gone => "deleted",
        }
    }
}

/// A job's snapshot as the API returns it (the fields the commands show).
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
pub struct Snapshot {
    pub job: String,
    pub status: Status,
    pub percent: Option<f64>,
    pub current: Option<u64>,
    pub total: Option<u64>,
    pub stage: Option<String>,
    pub message: Option<String>,
    pub seq: u64,
    pub created_at: String,
    pub updated_at: String,
}

/// The answer to a publish.
#[derive(Debug, Deserialize)]
pub struct Published {
    pub seq: u64,
}

#[derive(Debug, Deserialize)]
pub struct JobPage {
    pub jobs: Vec<serde_json::Value>,
    pub next_cursor: Option<String>,
}

/// A thin HTTP client for one daemon.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(args: &ClientArgs) -> Result<Client, CliError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // A keep-alive comment arrives every 15 s on a stream: silence for longer than
            // three of them is a dead connection.
            .read_timeout(Duration::from_secs(50))
            .build()
            .map_err(|source| CliError::Connect {
                url: args.url.clone(),
                source,
            })?;
        Ok(Client {
            base: args.url.trim_end_matches('/').to_owned(),
            token: args.token.clone().filter(|t| !t.is_empty()),
            http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `/v1/jobs/{job}` with the id percent-encoded as a path segment.
    pub fn job_url(&self, job: &str, rest: &str) -> String {
        let id = percent_encoding::utf8_percent_encode(job, percent_encoding::NON_ALPHANUMERIC);
        format!("{}/v1/jobs/{id}{rest}", self.base)
    }

    fn authorized(&self, req: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    pub fn get(&self, url: &str) -> RequestBuilder {
        self.authorized(self.http.get(url))
    }

    pub fn post(&self, url: &str) -> RequestBuilder {
        self.authorized(self.http.post(url))
    }

    /// Sends `req`; a non-success answer becomes [`CliError::Api`] with the body's code and
    /// message.
    pub async fn send(&self, req: RequestBuilder) -> Result<Response, CliError> {
        let res = req.send().await.map_err(|source| CliError::Connect {
            url: self.base.clone(),
            source,
        })?;
        if res.status().is_success() {
            return Ok(res);
        }
        Err(api_error(res).await)
    }

    /// `POST /v1/jobs/{job}/events` with one update or a batch, under an `Idempotency-Key`
    /// when one is given (a repeat then stores nothing and answers the first seq).
    pub async fn publish(
        &self,
        job: &str,
        updates: &[Update],
        key: Option<&str>,
    ) -> Result<Published, CliError> {
        let req = self.post(&self.job_url(job, "/events"));
        let req = match updates {
            [one] => req.json(one),
            many => req.json(many),
        };
        let req = match key {
            Some(key) => req.header("idempotency-key", key),
            None => req,
        };
        self.json(req).await
    }

    pub async fn snapshot(&self, job: &str) -> Result<Snapshot, CliError> {
        self.json(self.get(&self.job_url(job, ""))).await
    }

    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: RequestBuilder,
    ) -> Result<T, CliError> {
        let res = self.send(req).await?;
        res.json().await.map_err(|source| CliError::Connect {
            url: self.base.clone(),
            source,
        })
    }
}

/// The error body of a failed answer, or its status line when there is none.
pub async fn api_error(res: Response) -> CliError {
    #[derive(Deserialize)]
    struct Body {
        error: String,
        message: String,
    }
    let status = res.status();
    let text = res.text().await.unwrap_or_default();
    match serde_json::from_str::<Body>(&text) {
        Ok(body) => CliError::Api {
            status,
            code: body.error,
            message: body.message,
        },
        Err(_) => CliError::Api {
            status,
            code: status.canonical_reason().unwrap_or("error").to_owned(),
            message: text.trim().to_owned(),
        },
    }
}

/// Runs a client command on a small runtime of its own.
pub fn block_on<F: std::future::Future<Output = ExitCode>>(command: F) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(command),
        Err(e) => {
            eprintln!("progressd: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The instant an RFC 3339 time from the API names.
pub fn parse_time(raw: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339(raw).ok()
}

/// "5s", "3m", "2h", "4d": how long ago, at a glance.
pub fn ago(then: std::time::SystemTime) -> String {
    let secs = then.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}
