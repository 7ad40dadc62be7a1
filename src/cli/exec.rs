//! `progressd exec JOB -- COMMAND ARGS…`: runs a command as a job.
//!
//! Publishes `running`, passes the command's output through unchanged while forwarding its
//! last line as the job's `message` (at most once per `--interval`), takes `NN%` or `N/M` found
//! in a line as progress, and ends the job `succeeded` (exit 0), `failed` (any other exit) or
//! `cancelled` (killed by SIGINT or SIGTERM) with the exit code or signal in `data`. Exits with
//! the command's own code (128 + the signal when killed), so it can wrap cron jobs and CI
//! steps without changing their outcome. The daemon being unreachable is a warning on stderr,
//! never a reason to fail the command.

use std::ffi::OsString;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use futures_util::future::OptionFuture;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};

use super::{CliError, Client, ClientArgs, Published};
use crate::model::{Status, Update};

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job's id.
    pub job: String,
    /// Publish the command's latest output line at most this often.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// A stage to report with every update.
    #[arg(long)]
    pub stage: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// The API's limit on `message`, in bytes.
const MAX_MESSAGE: usize = 4096;

type Publishing<'a> = Pin<Box<dyn Future<Output = Result<Published, CliError>> + 'a>>;

pub async fn run(args: ExecArgs) -> ExitCode {
    let client = match Client::new(&args.client) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("progressd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reporter = Reporter {
        client: &client,
        job: &args.job,
    };
    let Some((program, rest)) = args.command.split_first() else {
        eprintln!("progressd: exec needs a command after `--`");
        return ExitCode::from(2);
    };
    let shown = args
        .command
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let started = Update {
        status: Some(Status::Running),
        stage: args.stage.clone(),
        message: Some(truncate(format!("$ {shown}"))),
        ..Update::default()
    };
    reporter.warn_on_error(reporter.publish(vec![started]).await);

    let spawned = Command::new(program)
        .args(rest)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            eprintln!("progressd: cannot run {}: {e}", program.to_string_lossy());
            // The shell's codes: 127 not found, 126 found but not runnable.
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            let failed = Update {
                status: Some(Status::Failed),
                message: Some(truncate(format!(
                    "cannot run {}: {e}",
                    program.to_string_lossy()
                ))),
                data: Some(serde_json::json!({ "exit_code": code })),
                ..Update::default()
            };
            reporter.warn_on_error(reporter.publish_final(vec![failed]).await);
            return ExitCode::from(code);
        }
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        eprintln!("progressd: the command's output pipes were not set up");
        return ExitCode::FAILURE;
    };
    let mut out = BufReader::new(stdout).split(b'\n');
    let mut err = BufReader::new(stderr).split(b'\n');
    let (mut out_open, mut err_open) = (true, true);
    // Ours to catch, so that we live to report how the command ended. A terminal's Ctrl-C or
    // systemd's stop reaches the whole process group, the command included; a second signal
    // kills the command outright.
    let (mut sigint, mut sigterm) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("progressd: cannot watch signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut signals = 0u32;

    let mut pending: Option<Update> = None;
    let mut inflight: Option<Publishing<'_>> = None;
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    while out_open || err_open {
        tokio::select! {
            line = out.next_segment(), if out_open => match line {
                Ok(Some(line)) => {
                    pass_through(&mut std::io::stdout(), &line);
                    absorb(&mut pending, &line, args.stage.as_deref());
                }
                Ok(None) | Err(_) => out_open = false,
            },
            line = err.next_segment(), if err_open => match line {
                Ok(Some(line)) => {
                    pass_through(&mut std::io::stderr(), &line);
                    absorb(&mut pending, &line, args.stage.as_deref());
                }
                Ok(None) | Err(_) => err_open = false,
            },
            Some(result) = OptionFuture::from(inflight.as_mut()) => {
                inflight = None;
                reporter.warn_on_error(result);
            }
            _ = tick.tick(), if pending.is_some() && inflight.is_none() => {
                if let Some(update) = pending.take() {
                    inflight = Some(Box::pin(reporter.publish(vec![update])));
                }
            }
            _ = sigint.recv() => signals = interrupted(&mut child, signals),
            _ = sigterm.recv() => signals = interrupted(&mut child, signals),
        }
    }
    let status = match child.wait().await {
        Ok(status) => status,
        Err(e) => {
            eprintln!("progressd: lost the command: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(publishing) = inflight.take() {
        reporter.warn_on_error(publishing.await);
    }
    let (end, code) = ending(status);
    let mut updates: Vec<Update> = pending.into_iter().collect();
    updates.push(end);
    reporter.warn_on_error(reporter.publish_final(updates).await);
    ExitCode::from(code)
}

/// The first signal is the command's to handle; the second kills it.
fn interrupted(child: &mut tokio::process::Child, seen: u32) -> u32 {
    if seen >= 1 {
        if let Err(e) = child.start_kill() {
            eprintln!("progressd: cannot kill the command: {e}");
        }
    }
    seen + 1
}

/// The job's last update and our exit code, from how the command ended.
fn ending(status: ExitStatus) -> (Update, u8) {
    match (status.code(), status.signal()) {
        (Some(code), _) => {
            let update = Update {
                status: Some(if code == 0 {
                    Status::Succeeded
                } else {
                    Status::Failed
                }),
                message: Some(format!("exited with code {code}")),
                data: Some(serde_json::json!({ "exit_code": code })),
                ..Update::default()
            };
            (update, (code & 0xff) as u8)
        }
        (None, Some(sig)) => {
            // Interrupted or told to stop: cancelled, not failed.
            let cancelled = sig == 2 || sig == 15;
            let update = Update {
                status: Some(if cancelled {
                    Status::Cancelled
                } else {
                    Status::Failed
                }),
                message: Some(format!("killed by signal {sig}")),
                data: Some(serde_json::json!({ "signal": sig })),
                ..Update::default()
            };
            (update, (128 + sig).clamp(0, 255) as u8)
        }
        (None, None) => {
            let update = Update {
                status: Some(Status::Failed),
                message: Some("ended without an exit code".to_owned()),
                ..Update::default()
            };
            (update, 1)
        }
    }
}

struct Reporter<'a> {
    client: &'a Client,
    job: &'a str,
}

impl<'a> Reporter<'a> {
    async fn publish(&self, updates: Vec<Update>) -> Result<Published, CliError> {
        self.client.publish(self.job, &updates, None).await
    }

    /// The job's ending: retried while the daemon is unavailable, under one Idempotency-Key
    /// so that a retry after a lost answer stores it once.
    async fn publish_final(&self, updates: Vec<Update>) -> Result<Published, CliError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let key = format!("exec-{}-{nanos}", std::process::id());
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.client.publish(self.job, &updates, Some(&key)).await {
                Err(e) if e.is_transient() && attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                result => return result,
            }
        }
    }

    fn warn_on_error(&self, result: Result<Published, CliError>) {
        if let Err(e) = result {
            eprintln!("progressd: cannot report progress of {}: {e}", self.job);
        }
    }
}

/// Writes a line of the command's output to ours, as it came.
fn pass_through(to: &mut dyn std::io::Write, line: &[u8]) {
    // Our own output closing (a pipe to `head`) must not stop the command.
    let _ = to
        .write_all(line)
        .and_then(|()| to.write_all(b"\n"))
        .and_then(|()| to.flush());
}

/// Folds one output line into the update waiting to be published.
fn absorb(pending: &mut Option<Update>, line: &[u8], stage: Option<&str>) {
    let text = String::from_utf8_lossy(line);
    // A line redrawn with carriage returns (a progress meter) shows its last drawing.
    let shown = text.rsplit('\r').next().unwrap_or_default().trim();
    if shown.is_empty() {
        return;
    }
    let update = pending.get_or_insert_with(|| Update {
        stage: stage.map(str::to_owned),
        ..Update::default()
    });
    update.message = Some(truncate(shown.to_owned()));
    match scan(shown) {
        Some(Progress::Percent(p)) => {
            update.percent = Some(p);
            (update.current, update.total) = (None, None);
        }
        Some(Progress::Fraction(current, total)) => {
            update.percent = None;
            (update.current, update.total) = (Some(current), Some(total));
        }
        None => {}
    }
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[derive(Debug, PartialEq)]
enum Progress {
    Percent(f64),
    Fraction(u64, u64),
}

/// The last `NN%` (0–100, decimals allowed) in a line, else its last `N/M` (whole numbers,
/// N ≤ M, M > 0, not part of a longer `a/b/c` such as a date or a path).
fn scan(line: &str) -> Option<Progress> {
    let bytes = line.as_bytes();
    let number_before = |end: usize| {
        let start = bytes[..end]
            .iter()
            .rposition(|b| !(b.is_ascii_digit() || *b == b'.'))
            .map_or(0, |i| i + 1);
        (start, &line[start..end])
    };
    for (i, _) in line.match_indices('%').rev() {
        let (_, digits) = number_before(i);
        if let Ok(p) = digits.parse::<f64>() {
            if (0.0..=100.0).contains(&p) {
                return Some(Progress::Percent(p));
            }
        }
    }
    for (i, _) in line.match_indices('/').rev() {
        let (start, left) = number_before(i);
        let right_len = bytes[i + 1..]
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(bytes.len() - i - 1);
        let right = &line[i + 1..i + 1 + right_len];
        let chained =
            (start > 0 && bytes[start - 1] == b'/') || bytes.get(i + 1 + right_len) == Some(&b'/');
        if chained || left.contains('.') {
            continue;
        }
        if let (Ok(n), Ok(m)) = (left.parse::<u64>(), right.parse::<u64>()) {
            if m > 0 && n <= m {
                return Some(Progress::Fraction(n, m));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_percent_and_fractions() {
        assert_eq!(scan("downloading 42%"), Some(Progress::Percent(42.0)));
        assert_eq!(scan("[ 12.5% ] building"), Some(Progress::Percent(12.5)));
        assert_eq!(scan("10% then 60%"), Some(Progress::Percent(60.0)));
        assert_eq!(scan("step 3/10"), Some(Progress::Fraction(3, 10)));
        assert_eq!(scan("(7/7) done"), Some(Progress::Fraction(7, 7)));
        // Not progress: over 100 %, more done than total, dates, paths, nothing at all.
        assert_eq!(scan("150% of quota"), None);
        assert_eq!(scan("11/10"), None);
        assert_eq!(scan("2026/11/26 started"), None);
        assert_eq!(scan("reading /usr/lib/x"), None);
        assert_eq!(scan("0/0"), None);
        assert_eq!(scan("% alone"), None);
        assert_eq!(scan("plain text"), None);
    }

    #[test]
    fn keeps_the_latest_line_and_progress() {
        let mut pending = None;
        absorb(&mut pending, b"step 1/4", Some("build"));
        absorb(&mut pending, b"\r 10%\r 55%", Some("build"));
        absorb(&mut pending, b"   ", Some("build"));
        let update = pending.expect("an update");
        assert_eq!(update.message.as_deref(), Some("55%"));
        assert_eq!(update.percent, Some(55.0));
        assert_eq!((update.current, update.total), (None, None));
        assert_eq!(update.stage.as_deref(), Some("build"));
    }

    #[test]
    fn truncates_on_a_char_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let cut = truncate(long);
        assert!(cut.len() <= MAX_MESSAGE);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
