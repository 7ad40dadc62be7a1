//! `bench publish`: C keep-alive connections POST for D seconds, one event or a batch of B
//! per request, each connection on its own job; events/s and POST latency.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use super::{on_threads, Report, Samples, Target};

#[derive(Debug, Args)]
pub struct PublishBench {
    #[command(flatten)]
    pub target: Target,
    /// Concurrent connections.
    #[arg(short = 'c', long, default_value_t = 16)]
    pub connections: usize,
    /// Events per POST (a batch when above 1).
    #[arg(short = 'b', long, default_value_t = 1)]
    pub batch: u64,
    /// How long to publish.
    #[arg(short = 'd', long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

#[derive(Default)]
struct Tally {
    latencies: Samples,
    events: u64,
    errors: u64,
    first_error: Option<String>,
}

pub fn run(b: PublishBench) -> Result<Report, String> {
    let t = &b.target;
    let run = t.run_prefix();
    let clients = t.clients()?;
    let cpu_before = t.server_cpu();
    let started = Instant::now();
    let deadline = started + b.duration;
    let threads = t.threads.max(1).min(b.connections.max(1));
    let tallies = on_threads(threads, |thread| {
        let (run, clients) = (&run, &clients);
        async move {
            let mine = (thread..b.connections).step_by(threads);
            let loops = mine.map(|c| async move {
                let client = &clients[c % clients.len()];
                let url = t.publish_url(&t.job(run, c));
                let mut tally = Tally::default();
                let mut n = 1;
                while Instant::now() < deadline {
                    let body = t.body(n, b.batch);
                    let sent = Instant::now();
                    match t.post(client, &url, body).await {
                        Ok(()) => {
                            tally.latencies.0.push(sent.elapsed().as_micros() as u64);
                            tally.events += b.batch;
                            n += b.batch;
                        }
                        Err(e) => {
                            tally.errors += 1;
                            tally.first_error.get_or_insert(e);
                        }
                    }
                }
                tally
            });
            futures_util::future::join_all(loops).await
        }
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, t.server_cpu()) {
        (Some(a), Some(b)) => Some((b - a).as_secs_f64()),
        _ => None,
    };
    let mut all = Tally::default();
    for tally in tallies.into_iter().flatten() {
        all.latencies.merge(tally.latencies);
        all.events += tally.events;
        all.errors += tally.errors;
        if all.first_error.is_none() {
            all.first_error = tally.first_error;
        }
    }
    if let Some(e) = &all.first_error {
        eprintln!("progressd bench: first error: {e}");
    }
    let rate = all.events as f64 / elapsed;
    Ok(Report {
        scenario: "publish",
        params: json!({"connections": b.connections, "batch": b.batch, "duration_s": b.duration.as_secs_f64(), "url": t.publish_url("{job}")}),
        figures: vec![
            ("events", json!(all.events)),
            ("events_per_s", json!(rate.round())),
            ("requests", json!(all.latencies.0.len())),
            ("post_p50_ms", json!(all.latencies.ms(0.50))),
            ("post_p99_ms", json!(all.latencies.ms(0.99))),
            ("post_p999_ms", json!(all.latencies.ms(0.999))),
            ("errors", json!(all.errors)),
            ("server_cpu_s", json!(cpu)),
            (
                "server_cpu_ms_per_1000_events",
                json!(cpu
                    .filter(|_| all.events > 0)
                    .map(|c| c * 1e6 / all.events as f64)),
            ),
        ],
        correct: all.errors == 0 && all.events > 0,
    })
}
