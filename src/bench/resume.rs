//! `bench resume-storm`: S subscribers over J jobs see one event each, all disconnect, N more
//! events per job are published, then all reconnect at once with the last id they saw while
//! publishing goes on. Time until every one has caught up, gaps, duplicates.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use serde_json::json;

use super::sse::{self, Seen};
use super::{now_us, on_threads, Report, Samples, Signal, Target};

#[derive(Debug, Args)]
pub struct ResumeBench {
    #[command(flatten)]
    pub target: Target,
    /// Subscribers.
    #[arg(short = 's', long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Jobs they are spread over.
    #[arg(short = 'j', long, default_value_t = 10)]
    pub jobs: usize,
    /// Events each subscriber is behind when it reconnects.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub behind: u64,
    /// Events per second published (over all jobs) during the storm.
    #[arg(short = 'r', long, default_value_t = 50.0)]
    pub rate: f64,
    /// Give up on stragglers after this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Connections opened at once before the storm (the storm itself opens all at once).
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
}

struct Shared {
    connected: AtomicUsize,
    dropped: AtomicUsize,
    caught_up: AtomicUsize,
    failed: AtomicUsize,
    published: Vec<AtomicU64>,
    /// The `n` each job had when the storm began: caught up means having it.
    target: Vec<AtomicU64>,
    storm: AtomicBool,
    storm_at_us: AtomicU64,
    /// The publisher stopped: everyone caught up, or the timeout ran out.
    over: AtomicBool,
    /// Raised when the storm begins and when it is over.
    moment: Signal,
}

struct Outcome {
    seen: Seen,
    /// Microseconds from the storm's start until this subscriber had the target.
    caught_up_us: Option<u64>,
}

pub fn run(b: ResumeBench) -> Result<Report, String> {
    let t = &b.target;
    let run = format!("{}-resume", t.run_prefix());
    let clients = t.clients()?;
    let jobs = b.jobs.max(1);
    let shared = Shared {
        connected: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
        caught_up: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        published: (0..jobs).map(|_| AtomicU64::new(0)).collect(),
        target: (0..jobs).map(|_| AtomicU64::new(u64::MAX)).collect(),
        storm: AtomicBool::new(false),
        storm_at_us: AtomicU64::new(0),
        over: AtomicBool::new(false),
        moment: Signal::default(),
    };
    let threads = t.threads.max(1);
    let results = on_threads(threads, |thread| {
        let (run, clients, shared, b) = (&run, &clients, &shared, &b);
        async move {
            let subs = futures_util::stream::iter((thread..b.subscribers).step_by(threads))
                .map(|i| subscriber(b, run, &clients[i % clients.len()], shared, i))
                // Unbounded during the storm: every subscriber waits for it at once.
                .buffer_unordered(b.subscribers.max(1))
                .collect::<Vec<Outcome>>();
            if thread == 0 {
                let (subs, tally) = tokio::join!(subs, publisher(b, run, &clients[0], shared));
                (subs, tally)
            } else {
                (subs.await, StormTally::default())
            }
        }
    })?;
    let mut all = Seen::default();
    let mut times = Samples::default();
    let mut missing = 0;
    let mut publish_errors = 0;
    let mut storm_cpu = None;
    let mut errors = 0;
    for (outcomes, tally) in results {
        publish_errors += tally.errors;
        storm_cpu = storm_cpu.or(tally.server_cpu);
        for o in outcomes {
            all.duplicates += o.seen.duplicates;
            all.out_of_order += o.seen.out_of_order;
            all.gaps += o.seen.gaps;
            all.resets += o.seen.resets;
            all.delivered += o.seen.delivered;
            if let Some(e) = o.seen.error {
                errors += 1;
                all.error.get_or_insert(e);
            }
            match o.caught_up_us {
                Some(us) => times.0.push(us),
                None => missing += 1,
            }
        }
    }
    if let Some(e) = &all.error {
        eprintln!("progressd bench: first error: {e}");
    }
    let correct = missing == 0
        && all.gaps == 0
        && all.duplicates == 0
        && all.out_of_order == 0
        && all.resets == 0
        && publish_errors == 0;
    Ok(Report {
        scenario: "resume-storm",
        params: json!({"subscribers": b.subscribers, "jobs": jobs, "behind": b.behind, "rate": b.rate}),
        figures: vec![
            ("caught_up", json!(times.0.len())),
            ("not_caught_up", json!(missing)),
            ("all_caught_up_ms", json!(times.ms(1.0))),
            ("caught_up_p50_ms", json!(times.ms(0.5))),
            ("caught_up_p99_ms", json!(times.ms(0.99))),
            ("delivered", json!(all.delivered)),
            ("gaps", json!(all.gaps)),
            ("duplicates", json!(all.duplicates)),
            ("out_of_order", json!(all.out_of_order)),
            ("resets", json!(all.resets)),
            ("stream_errors", json!(errors)),
            ("publish_errors", json!(publish_errors)),
            // The daemon's CPU from the storm's start until all caught up (with --pid): what
            // the storm costs the server alone, whatever the generator's share of the cores.
            ("server_cpu_s", json!(storm_cpu.map(|d| d.as_secs_f64()))),
            (
                "server_cpu_ms_per_1000_deliveries",
                json!(storm_cpu.map(|d| d.as_secs_f64() * 1e6 / all.delivered.max(1) as f64)),
            ),
        ],
        correct,
    })
}

async fn subscriber(
    b: &ResumeBench,
    run: &str,
    client: &reqwest::Client,
    shared: &Shared,
    i: usize,
) -> Outcome {
    let j = i % b.jobs.max(1);
    let job = b.target.job(run, j);
    let mut seen = Seen::default();
    let mut wake = shared.moment.waiter();
    let fail = |mut seen: Seen, e: String| {
        shared.failed.fetch_add(1, Ordering::AcqRel);
        seen.error.get_or_insert(e);
        Outcome {
            seen,
            caught_up_us: None,
        }
    };
    // 1. Subscribe and see the job's first event.
    let res = match sse::connect(client, &b.target, &job, None).await {
        Ok(res) => res,
        Err(e) => return fail(seen, e),
    };
    shared.connected.fetch_add(1, Ordering::AcqRel);
    sse::consume(res, &mut seen, &|s: &Seen| s.last_n >= 1, &mut wake).await;
    if seen.last_n < 1 {
        return fail(seen, "the first event never came".to_owned());
    }
    // 2. Gone (the response is dropped); wait for the storm.
    shared.dropped.fetch_add(1, Ordering::AcqRel);
    while !shared.storm.load(Ordering::Acquire) {
        wake.next().await;
    }
    // 3. Back, from the last id seen.
    let resume_from = seen.last_id.clone();
    let res = match sse::connect(client, &b.target, &job, resume_from.as_deref()).await {
        Ok(res) => res,
        Err(e) => return fail(seen, e),
    };
    let target = shared.target[j].load(Ordering::Acquire);
    let started = shared.storm_at_us.load(Ordering::Acquire);
    let done = |s: &Seen| s.last_n >= target || shared.over.load(Ordering::Acquire);
    sse::consume(res, &mut seen, &done, &mut wake).await;
    let caught_up_us = (seen.last_n >= target).then(|| now_us().saturating_sub(started));
    if caught_up_us.is_some() {
        shared.caught_up.fetch_add(1, Ordering::AcqRel);
    }
    Outcome { seen, caught_up_us }
}

/// What the publisher saw: its failed publishes, and the server's CPU time during the storm.
#[derive(Default)]
struct StormTally {
    errors: u64,
    server_cpu: Option<Duration>,
}

/// Publishes the first event per job, then `behind` more while everyone is away, then keeps
/// publishing at `rate` through the storm until all caught up (or gave up).
async fn publisher(
    b: &ResumeBench,
    run: &str,
    client: &reqwest::Client,
    shared: &Shared,
) -> StormTally {
    let jobs = b.jobs.max(1);
    let urls: Vec<String> = (0..jobs)
        .map(|j| b.target.publish_url(&b.target.job(run, j)))
        .collect();
    let mut errors = 0;
    let publish = |j: usize, count: u64| {
        let first = shared.published[j].load(Ordering::Relaxed) + 1;
        let (body, url) = (b.target.body(first, count), &urls[j]);
        async move {
            match b.target.post(client, url, body).await {
                Ok(()) => {
                    shared.published[j].store(first + count - 1, Ordering::Relaxed);
                    true
                }
                Err(e) => {
                    eprintln!("progressd bench: publish: {e}");
                    false
                }
            }
        }
    };
    let settled = |count: &AtomicUsize| {
        count.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire) >= b.subscribers
    };
    while !settled(&shared.connected) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for j in 0..jobs {
        errors += u64::from(!publish(j, 1).await);
    }
    while !settled(&shared.dropped) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The events they miss: batches where the server takes them, else one by one.
    let batch = match b.target.body {
        super::BodyFormat::Progressd => b.behind.clamp(1, 1000),
        super::BodyFormat::Raw => 1,
    };
    for j in 0..jobs {
        let mut left = b.behind;
        while left > 0 {
            let count = left.min(batch);
            errors += u64::from(!publish(j, count).await);
            left -= count;
        }
        shared.target[j].store(
            shared.published[j].load(Ordering::Relaxed),
            Ordering::Release,
        );
    }
    let cpu_before = b.target.server_cpu();
    shared.storm_at_us.store(now_us(), Ordering::Release);
    shared.storm.store(true, Ordering::Release);
    shared.moment.raise();
    let interval = Duration::from_secs_f64(1.0 / b.rate.max(0.001));
    let start = Instant::now();
    let mut k = 0u64;
    while shared.caught_up.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire)
        < b.subscribers
        && start.elapsed() < b.timeout
    {
        tokio::time::sleep_until((start + interval.mul_f64(k as f64)).into()).await;
        errors += u64::from(!publish((k % jobs as u64) as usize, 1).await);
        k += 1;
    }
    let server_cpu = match (cpu_before, b.target.server_cpu()) {
        (Some(a), Some(z)) => Some(z.saturating_sub(a)),
        _ => None,
    };
    // Whoever has not caught up by now gives up.
    shared.over.store(true, Ordering::Release);
    shared.moment.raise();
    StormTally { errors, server_cpu }
}
