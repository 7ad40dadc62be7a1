//! `bench idle`: S SSE connections that receive nothing, held for T seconds; the server's
//! RSS per connection (with `--pid`).

use std::time::Duration;

use clap::Args;
use futures_util::StreamExt;
use serde_json::json;

use super::{on_threads, sse, Report, Target};

#[derive(Debug, Args)]
pub struct IdleBench {
    #[command(flatten)]
    pub target: Target,
    /// Connections.
    #[arg(short = 's', long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Jobs they watch (none is ever published to).
    #[arg(short = 'j', long, default_value_t = 100)]
    pub jobs: usize,
    /// How long to hold them once all are open.
    #[arg(short = 't', long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
}

pub fn run(b: IdleBench) -> Result<Report, String> {
    let t = &b.target;
    let run = format!("{}-idle", t.run_prefix());
    let clients = t.clients()?;
    let before = t.server_rss_kib();
    let threads = t.threads.max(1);
    let barrier = std::sync::Barrier::new(threads);
    let per_thread = on_threads(threads, |thread| {
        let (run, clients, b, barrier) = (&run, &clients, &b, &barrier);
        async move {
            let opened: Vec<Result<reqwest::Response, String>> = futures_util::stream::iter(
                (thread..b.subscribers).step_by(threads),
            )
            .map(|i| {
                let job = t.job(run, i % b.jobs.max(1));
                async move { sse::connect(&clients[i % clients.len()], t, &job, None).await }
            })
            .buffer_unordered(b.connect_concurrency.max(1))
            .collect()
            .await;
            // Every thread's connections are open before the memory is read, and held while
            // it is.
            barrier.wait();
            let rss = t.server_rss_kib();
            tokio::time::sleep(b.hold).await;
            let held_rss = t.server_rss_kib();
            let errors: Vec<String> = opened
                .iter()
                .filter_map(|r| r.as_ref().err().cloned())
                .collect();
            let open = opened.len() - errors.len();
            (open, errors, rss, held_rss)
        }
    })?;
    let open: usize = per_thread.iter().map(|p| p.0).sum();
    let errors: Vec<&String> = per_thread.iter().flat_map(|p| &p.1).collect();
    if let Some(e) = errors.first() {
        eprintln!("progressd bench: first connect error: {e}");
    }
    let during = per_thread.iter().filter_map(|p| p.2).max();
    let held = per_thread.iter().filter_map(|p| p.3).max();
    let after = held.max(during);
    let per_conn = match (before, after) {
        (Some(a), Some(z)) if open > 0 => Some(z.saturating_sub(a) as f64 / open as f64),
        _ => None,
    };
    Ok(Report {
        scenario: "idle",
        params: json!({"subscribers": b.subscribers, "jobs": b.jobs, "hold_s": b.hold.as_secs_f64()}),
        figures: vec![
            ("open", json!(open)),
            ("connect_errors", json!(errors.len())),
            ("server_rss_before_kib", json!(before)),
            ("server_rss_held_kib", json!(after)),
            ("server_rss_per_connection_kib", json!(per_conn)),
        ],
        correct: errors.is_empty() && open == b.subscribers,
    })
}
