//! `progressd watch JOB` and `progressd wait JOB`: follow one job's SSE stream to its end.
//!
//! [`follow`] is the resuming client both share: it remembers the last `id:` (the job's seq)
//! and reconnects with `Last-Event-ID` after a dropped connection or a daemon restart, so the
//! daemon replays exactly what was missed: no line is repeated or lost. It gives up (exit 3)
//! only after `--reconnect-for` without a working connection.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::StatusCode;
use serde::Deserialize;

use super::{exit, CliError, Client, ClientArgs, Outcome, Snapshot};
use crate::model::Status;

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job's id.
    pub job: String,
    /// Print every event as a JSON line (`{"event":…,"data":…}`) instead of a progress bar.
    #[arg(long)]
    pub json: bool,
    /// Start after this seq (0: the whole retained history) instead of at the current state.
    #[arg(long)]
    pub after: Option<u64>,
    /// Give up (exit 3) after this long without a working connection.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconnect_for: Duration,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job's id.
    pub job: String,
    /// Give up (exit 124) if the job has not ended by then.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Give up (exit 3) after this long without a working connection.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconnect_for: Duration,
}

/// One event as the stream carries it (the fields a line shows).
#[derive(Debug, Deserialize)]
pub struct EventView {
    pub job: String,
    pub seq: u64,
    pub at: String,
    pub status: Option<Status>,
    pub percent: Option<f64>,
    pub current: Option<u64>,
    pub total: Option<u64>,
    pub stage: Option<String>,
    pub message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct End {
    status: Status,
}

/// What [`follow`] reports as it goes.
pub enum Frame<'a> {
    /// The state when we started (no resume point).
    Snapshot(Snapshot),
    /// Events we would have resumed from are no longer retained: this is the state now.
    Reset(Snapshot),
    Progress(EventView),
    /// The SSE event as it came, for `--json`; sent before the typed frame.
    Raw {
        event: &'a str,
        data: &'a str,
    },
    Reconnecting {
        error: &'a CliError,
        after: Option<u64>,
    },
    Connected,
}

const FIRST_RETRY: Duration = Duration::from_millis(100);

/// Follows `job`'s stream until it ends, resuming after drops. `after`: start after this seq
/// (`None`: at the current state).
pub async fn follow(
    client: &Client,
    job: &str,
    mut after: Option<u64>,
    patience: Duration,
    on: &mut dyn FnMut(Frame<'_>),
) -> Result<Outcome, CliError> {
    let mut failing_since: Option<Instant> = None;
    let mut delay = FIRST_RETRY;
    // The daemon's `retry:` (what a browser would wait), our ceiling between attempts.
    let mut ceiling = Duration::from_secs(2);
    loop {
        let mut req = client
            .get(&client.job_url(job, "/stream"))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(n) = after {
            req = req.header("last-event-id", n.to_string());
        }
        let attempt = async {
            let res = client.send(req).await?;
            if res.status() == StatusCode::NO_CONTENT {
                // Nothing more will come: the job ended at our resume point, or is gone.
                return finished_or_gone(client, job).await;
            }
            on(Frame::Connected);
            let mut events = res.bytes_stream().eventsource();
            while let Some(event) = events.next().await {
                let event = event.map_err(|e| stream_error(client, e))?;
                failing_since = None;
                delay = FIRST_RETRY;
                if let Some(retry) = event.retry {
                    ceiling = retry.max(FIRST_RETRY);
                }
                if event.event.is_empty() {
                    continue; // `retry:` alone
                }
                on(Frame::Raw {
                    event: &event.event,
                    data: &event.data,
                });
                if let Ok(id) = event.id.parse::<u64>() {
                    after = Some(id);
                }
                match event.event.as_str() {
                    "snapshot" => on(Frame::Snapshot(parse(&event.data)?)),
                    "reset" => on(Frame::Reset(parse(&event.data)?)),
                    "progress" => on(Frame::Progress(parse(&event.data)?)),
                    "end" => {
                        let end: End = parse(&event.data)?;
                        return Ok(Outcome::Finished(end.status));
                    }
                    "deleted" => return Ok(Outcome::Gone),
                    other => tracing::debug!(event = other, "unknown SSE event ignored"),
                }
            }
            Err(CliError::Protocol(
                "the stream ended before the job did".to_owned(),
            ))
        }
        .await;
        let error = match attempt {
            Ok(outcome) => return Ok(outcome),
            Err(e) if e.is_transient() => e,
            Err(e) => return Err(e),
        };
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= patience {
            return Err(error);
        }
        on(Frame::Reconnecting {
            error: &error,
            after,
        });
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(ceiling);
    }
}

fn parse<T: serde::de::DeserializeOwned>(data: &str) -> Result<T, CliError> {
    serde_json::from_str(data).map_err(|e| CliError::Protocol(format!("bad event data: {e}")))
}

fn stream_error(client: &Client, e: EventStreamError<reqwest::Error>) -> CliError {
    match e {
        EventStreamError::Transport(source) => CliError::Connect {
            url: client.base().to_owned(),
            source,
        },
        EventStreamError::Utf8(e) => CliError::Protocol(format!("stream is not UTF-8: {e}")),
        EventStreamError::Parser(e) => CliError::Protocol(format!("malformed stream: {e}")),
    }
}

/// After a `204`: the job's own record says whether it finished or is gone.
async fn finished_or_gone(client: &Client, job: &str) -> Result<Outcome, CliError> {
    match client.snapshot(job).await {
        Ok(s) if s.status.is_terminal() => Ok(Outcome::Finished(s.status)),
        Ok(_) => Ok(Outcome::Gone),
        Err(CliError::Api { status, .. }) if status == StatusCode::NOT_FOUND => Ok(Outcome::Gone),
        Err(e) => Err(e),
    }
}

pub async fn watch(args: WatchArgs) -> ExitCode {
    let client = match Client::new(&args.client) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let mut view: Box<dyn View> = if args.json {
        Box::new(JsonLines)
    } else if std::io::stdout().is_terminal() {
        Box::new(Bar::new(&args.job))
    } else {
        Box::new(Lines)
    };
    let result = follow(
        &client,
        &args.job,
        args.after,
        args.reconnect_for,
        &mut |frame| view.show(frame),
    )
    .await;
    match result {
        Ok(outcome) => {
            view.done(&args.job, outcome);
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => {
            view.abandon();
            fail(&e)
        }
    }
}

pub async fn wait(args: WaitArgs) -> ExitCode {
    let client = match Client::new(&args.client) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let mut last: Option<(Status, Option<f64>)> = None;
    let mut track = |frame: Frame<'_>| match frame {
        Frame::Snapshot(s) | Frame::Reset(s) => last = Some((s.status, s.percent)),
        Frame::Progress(e) => {
            let (status, percent) = last.unwrap_or((Status::Running, None));
            last = Some((e.status.unwrap_or(status), e.percent.or(percent)));
        }
        Frame::Reconnecting { error, .. } => eprintln!("progressd: {error}; reconnecting"),
        Frame::Raw { .. } | Frame::Connected => {}
    };
    let following = follow(&client, &args.job, None, args.reconnect_for, &mut track);
    let result = match args.timeout {
        Some(limit) => match tokio::time::timeout(limit, following).await {
            Ok(result) => result,
            Err(_) => {
                let state = match last {
                    Some((status, Some(p))) => format!("{} at {p:.0}%", status.as_str()),
                    Some((status, None)) => status.as_str().to_owned(),
                    None => "not started".to_owned(),
                };
                eprintln!(
                    "progressd: {} still {state} after {}",
                    args.job,
                    humantime::format_duration(limit)
                );
                return ExitCode::from(exit::TIMEOUT);
            }
        },
        None => following.await,
    };
    match result {
        Ok(outcome) => {
            println!("{}", outcome.describe());
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &CliError) -> ExitCode {
    eprintln!("progressd: {e}");
    ExitCode::from(exit::UNREACHABLE)
}

/// How `watch` shows what it follows.
trait View {
    fn show(&mut self, frame: Frame<'_>);
    fn done(&mut self, job: &str, outcome: Outcome);
    fn abandon(&mut self) {}
}

/// `--json`: each SSE event as `{"event":…,"data":…}` on its own line.
struct JsonLines;

impl View for JsonLines {
    fn show(&mut self, frame: Frame<'_>) {
        match frame {
            Frame::Raw { event, data } => {
                let data = serde_json::from_str::<serde_json::Value>(data)
                    .unwrap_or_else(|_| serde_json::Value::String(data.to_owned()));
                let line = serde_json::json!({"event": event, "data": data});
                println_flushed(&line.to_string());
            }
            Frame::Reconnecting { error, after } => reconnecting(error, after),
            Frame::Snapshot(_) | Frame::Reset(_) | Frame::Progress(_) | Frame::Connected => {}
        }
    }

    fn done(&mut self, _job: &str, _outcome: Outcome) {}
}

/// Not a terminal: one plain line per event, for logs and pipes.
struct Lines;

impl View for Lines {
    fn show(&mut self, frame: Frame<'_>) {
        match frame {
            Frame::Snapshot(s) => println_flushed(&format!(
                "{} {} #{} {}",
                s.updated_at,
                s.job,
                s.seq,
                describe_snapshot(&s)
            )),
            Frame::Reset(s) => println_flushed(&format!(
                "{} {} #{} reset (earlier events are no longer retained): {}",
                s.updated_at,
                s.job,
                s.seq,
                describe_snapshot(&s)
            )),
            Frame::Progress(e) => {
                println_flushed(&format!("{} {} #{} {}", e.at, e.job, e.seq, describe(&e)))
            }
            Frame::Reconnecting { error, after } => reconnecting(error, after),
            Frame::Raw { .. } | Frame::Connected => {}
        }
    }

    fn done(&mut self, job: &str, outcome: Outcome) {
        println_flushed(&format!("{job} {}", outcome.describe()));
    }
}

/// A terminal: a live progress bar with percent, stage, message, elapsed and ETA.
struct Bar {
    job: String,
    bar: Option<ProgressBar>,
    message: String,
}

impl Bar {
    fn new(job: &str) -> Bar {
        Bar {
            job: job.to_owned(),
            bar: None,
            message: String::new(),
        }
    }

    /// The bar, made on the first frame so that its clock starts when the job did.
    fn bar(&mut self, started: Option<&str>) -> &ProgressBar {
        let job = &self.job;
        self.bar.get_or_insert_with(|| {
            let elapsed = started
                .and_then(super::parse_time)
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            let style = ProgressStyle::with_template(
                "{prefix:.bold} [{bar:30.cyan/blue}] {pos:>3}%  {elapsed} (ETA {eta})  {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            ProgressBar::new(100)
                .with_style(style)
                .with_prefix(job.clone())
                .with_elapsed(elapsed)
        })
    }

    fn update(&mut self, percent: Option<f64>, stage: Option<&str>, message: Option<&str>) {
        let text = match (stage, message) {
            (Some(s), Some(m)) => format!("[{s}] {m}"),
            (Some(s), None) => format!("[{s}]"),
            (None, Some(m)) => m.to_owned(),
            (None, None) => String::new(),
        };
        if let Some(bar) = &self.bar {
            if !text.is_empty() {
                self.message = text;
                bar.set_message(self.message.clone());
            }
            if let Some(p) = percent {
                bar.set_position(p.clamp(0.0, 100.0) as u64);
            }
        }
    }
}

impl View for Bar {
    fn show(&mut self, frame: Frame<'_>) {
        match frame {
            Frame::Snapshot(s) | Frame::Reset(s) => {
                self.bar(Some(&s.created_at));
                self.update(s.percent, s.stage.as_deref(), s.message.as_deref());
            }
            Frame::Progress(e) => {
                let started = (e.seq == 1).then_some(e.at.as_str());
                self.bar(started);
                self.update(e.percent, e.stage.as_deref(), e.message.as_deref());
            }
            Frame::Reconnecting { error, .. } => match &self.bar {
                Some(bar) => bar.set_message(format!("reconnecting… ({error})")),
                None => eprintln!("progressd: {error}; reconnecting"),
            },
            Frame::Connected => {
                if let Some(bar) = &self.bar {
                    bar.set_message(self.message.clone());
                }
            }
            Frame::Raw { .. } => {}
        }
    }

    fn done(&mut self, _job: &str, outcome: Outcome) {
        let bar = self.bar(None).clone();
        let text = format!("{} {}", outcome.describe(), self.message);
        match outcome {
            Outcome::Finished(Status::Succeeded) => {
                bar.set_position(100);
                bar.finish_with_message(text);
            }
            Outcome::Finished(_) | Outcome::Gone => bar.abandon_with_message(text),
        }
    }

    fn abandon(&mut self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

fn reconnecting(error: &CliError, after: Option<u64>) {
    match after {
        Some(n) => eprintln!("progressd: {error}; reconnecting after #{n}"),
        None => eprintln!("progressd: {error}; reconnecting"),
    }
}

fn println_flushed(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`watch … | head`) is not an error worth a panic.
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn describe_snapshot(s: &Snapshot) -> String {
    let mut parts = vec![s.status.as_str().to_owned()];
    push_progress(&mut parts, s.percent, s.current, s.total);
    push_text(&mut parts, s.stage.as_deref(), s.message.as_deref());
    parts.join(" ")
}

fn describe(e: &EventView) -> String {
    let mut parts = Vec::new();
    if let Some(status) = e.status {
        parts.push(status.as_str().to_owned());
    }
    push_progress(&mut parts, e.percent, e.current, e.total);
    push_text(&mut parts, e.stage.as_deref(), e.message.as_deref());
    parts.join(" ")
}

fn push_progress(
    parts: &mut Vec<String>,
    percent: Option<f64>,
    current: Option<u64>,
    total: Option<u64>,
) {
    if let Some(p) = percent {
        parts.push(format!("{p:.0}%"));
    }
    if let (Some(c), Some(t)) = (current, total) {
        parts.push(format!("({c}/{t})"));
    }
}

fn push_text(parts: &mut Vec<String>, stage: Option<&str>, message: Option<&str>) {
    if let Some(s) = stage {
        parts.push(format!("[{s}]"));
    }
    if let Some(m) = message {
        parts.push(m.to_owned());
    }
}
