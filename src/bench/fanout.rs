//! `bench fanout`: S subscribers over J jobs, then one publisher, one POST at a time, at R
//! events/s for D seconds; every payload carries its send time. Delivery latency, delivered
//! vs expected, duplicates, out-of-order, and the server's CPU per 1,000 deliveries.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::json;

use super::sse::{self, Seen};
use super::{on_threads, Report, Samples, Signal, Target};

#[derive(Debug, Args)]
pub struct FanoutBench {
    #[command(flatten)]
    pub target: Target,
    /// Subscribers.
    #[arg(short = 's', long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Jobs the subscribers are spread over (subscriber i watches job i mod J).
    #[arg(short = 'j', long, default_value_t = 1)]
    pub jobs: usize,
    /// Events per second, over all jobs.
    #[arg(short = 'r', long, default_value_t = 50.0)]
    pub rate: f64,
    /// How long to publish.
    #[arg(short = 'd', long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How long after the last publish a missing delivery is still waited for.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    pub transport: Transport,
    /// WebSocket URL template for `--transport ws`.
    #[arg(long, default_value = "{url}/v1/jobs/{job}/ws")]
    pub ws_url: String,
    /// Subscriptions opened at once while connecting.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Sse,
    Ws,
}

/// What the publisher shares with the subscribers.
struct Shared {
    /// Subscriptions settled (connected or failed).
    settled: AtomicUsize,
    connect_errors: AtomicUsize,
    /// Events published to each job so far.
    published: Vec<AtomicU64>,
    finished: AtomicBool,
    /// The grace after the last publish ran out: whoever is still missing events stops.
    expired: AtomicBool,
    /// Raised when publishing is finished, and when the grace ran out.
    phase: Signal,
    /// Subscribers that are done; the last one tells the publisher it need not wait longer.
    ended: AtomicUsize,
    all_ended: tokio::sync::Notify,
}

#[derive(Default)]
struct PublisherTally {
    latencies: Samples,
    events: u64,
    errors: u64,
    elapsed: f64,
    /// The server's CPU time when publishing began.
    cpu_before: Option<Duration>,
}

pub fn run(b: FanoutBench) -> Result<Report, String> {
    let t = &b.target;
    let run = t.run_prefix();
    let clients = t.clients()?;
    let jobs = b.jobs.max(1);
    let shared = Shared {
        settled: AtomicUsize::new(0),
        connect_errors: AtomicUsize::new(0),
        published: (0..jobs).map(|_| AtomicU64::new(0)).collect(),
        finished: AtomicBool::new(false),
        expired: AtomicBool::new(false),
        phase: Signal::default(),
        ended: AtomicUsize::new(0),
        all_ended: tokio::sync::Notify::new(),
    };
    let threads = t.threads.max(1);
    // The publisher has an OS thread of its own: its POST latency is the server's answer,
    // not the time the generator takes to parse thousands of deliveries.
    let results = on_threads(threads + 1, |thread| {
        let (run, clients, shared, b) = (&run, &clients, &shared, &b);
        async move {
            if thread == threads {
                return (
                    Vec::new(),
                    Some(publisher(b, run, &clients[0], shared).await),
                );
            }
            let connecting = tokio::sync::Semaphore::new(b.connect_concurrency.max(1));
            let connecting = &connecting;
            let subs = (thread..b.subscribers)
                .step_by(threads)
                .map(|i| subscriber(b, run, &clients[i % clients.len()], shared, connecting, i));
            (futures_util::future::join_all(subs).await, None)
        }
    })?;

    let mut all = Seen::default();
    let mut stream_errors = 0;
    let mut tally = PublisherTally::default();
    for (seen, publisher) in results {
        for s in seen {
            all.delivered += s.delivered;
            all.duplicates += s.duplicates;
            all.out_of_order += s.out_of_order;
            all.gaps += s.gaps;
            all.resets += s.resets;
            all.latencies.merge(s.latencies);
            if let Some(e) = s.error {
                stream_errors += 1;
                all.error.get_or_insert(e);
            }
        }
        if let Some(p) = publisher {
            tally = p;
        }
    }
    if let Some(e) = &all.error {
        eprintln!("progressd bench: first stream error: {e}");
    }
    // Every subscriber is done (all delivered, or the grace ran out): the server's work for
    // this run is over.
    let cpu = match (tally.cpu_before, t.server_cpu()) {
        (Some(a), Some(z)) => Some((z - a).as_secs_f64()),
        _ => None,
    };
    let expected: u64 = (0..b.subscribers)
        .map(|i| shared.published[i % jobs].load(Ordering::Relaxed))
        .sum();
    let connect_errors = shared.connect_errors.load(Ordering::Relaxed);
    let correct = all.delivered == expected
        && all.duplicates == 0
        && all.out_of_order == 0
        && all.gaps == 0
        && connect_errors == 0
        && tally.errors == 0;
    Ok(Report {
        scenario: "fanout",
        params: json!({"subscribers": b.subscribers, "jobs": jobs, "rate": b.rate, "duration_s": b.duration.as_secs_f64(), "transport": format!("{:?}", b.transport).to_lowercase()}),
        figures: vec![
            ("published", json!(tally.events)),
            (
                "publish_rate",
                json!((tally.events as f64 / tally.elapsed.max(1e-9)).round()),
            ),
            ("post_p50_ms", json!(tally.latencies.ms(0.5))),
            ("post_p99_ms", json!(tally.latencies.ms(0.99))),
            ("publish_errors", json!(tally.errors)),
            ("expected", json!(expected)),
            ("delivered", json!(all.delivered)),
            ("duplicates", json!(all.duplicates)),
            ("out_of_order", json!(all.out_of_order)),
            ("gaps", json!(all.gaps)),
            ("resets", json!(all.resets)),
            ("connect_errors", json!(connect_errors)),
            ("stream_errors", json!(stream_errors)),
            ("latency_p50_ms", json!(all.latencies.ms(0.5))),
            ("latency_p90_ms", json!(all.latencies.ms(0.9))),
            ("latency_p99_ms", json!(all.latencies.ms(0.99))),
            ("latency_max_ms", json!(all.latencies.ms(1.0))),
            ("server_cpu_s", json!(cpu)),
            (
                "server_cpu_ms_per_1000_deliveries",
                json!(cpu
                    .filter(|_| all.delivered > 0)
                    .map(|c| c * 1e6 / all.delivered as f64)),
            ),
        ],
        correct,
    })
}

async fn subscriber(
    b: &FanoutBench,
    run: &str,
    client: &reqwest::Client,
    shared: &Shared,
    connecting: &tokio::sync::Semaphore,
    i: usize,
) -> Seen {
    let jobs = b.jobs.max(1);
    let job = b.target.job(run, i % jobs);
    let mut seen = Seen::default();
    let mut wake = shared.phase.waiter();
    let done = |seen: &Seen| {
        if !shared.finished.load(Ordering::Acquire) {
            return false;
        }
        let target = shared.published[i % jobs].load(Ordering::Relaxed);
        seen.last_n >= target || shared.expired.load(Ordering::Acquire)
    };
    // At most --connect-concurrency handshakes at once; reading is not limited.
    let permit = connecting.acquire().await;
    match b.transport {
        Transport::Sse => match sse::connect(client, &b.target, &job, None).await {
            Ok(res) => {
                shared.settled.fetch_add(1, Ordering::AcqRel);
                drop(permit);
                sse::consume(res, &mut seen, &done, &mut wake).await;
            }
            Err(e) => {
                shared.connect_errors.fetch_add(1, Ordering::Relaxed);
                shared.settled.fetch_add(1, Ordering::AcqRel);
                seen.error = Some(e);
            }
        },
        Transport::Ws => {
            let url = super::fill(&b.ws_url, &b.target.url, &job).replacen("http", "ws", 1);
            // The subscription is made during the handshake; count it settled just before.
            shared.settled.fetch_add(1, Ordering::AcqRel);
            drop(permit);
            sse::consume_ws(&url, &mut seen, &done, &mut wake).await;
        }
    }
    if shared.ended.fetch_add(1, Ordering::AcqRel) + 1 == b.subscribers {
        shared.all_ended.notify_one();
    }
    seen
}

/// Waits for every subscriber, then publishes `rate` events/s for `duration`, one POST at a
/// time, round-robin over the jobs.
async fn publisher(
    b: &FanoutBench,
    run: &str,
    client: &reqwest::Client,
    shared: &Shared,
) -> PublisherTally {
    while shared.settled.load(Ordering::Acquire) < b.subscribers {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if b.transport == Transport::Ws {
        // WebSocket handshakes complete after we count them; give them a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let jobs = b.jobs.max(1);
    let urls: Vec<String> = (0..jobs)
        .map(|j| b.target.publish_url(&b.target.job(run, j)))
        .collect();
    let mut tally = PublisherTally::default();
    let cpu_before = b.target.server_cpu();
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / b.rate.max(0.001));
    let mut k: u64 = 0;
    while start.elapsed() < b.duration {
        let due = start + interval.mul_f64(k as f64);
        tokio::time::sleep_until(due.into()).await;
        let j = (k % jobs as u64) as usize;
        let n = shared.published[j].load(Ordering::Relaxed) + 1;
        let sent = Instant::now();
        match b.target.post(client, &urls[j], b.target.body(n, 1)).await {
            Ok(()) => {
                tally.latencies.0.push(sent.elapsed().as_micros() as u64);
                tally.events += 1;
                shared.published[j].store(n, Ordering::Relaxed);
            }
            Err(e) => {
                tally.errors += 1;
                eprintln!("progressd bench: publish: {e}");
            }
        }
        k += 1;
    }
    tally.elapsed = start.elapsed().as_secs_f64();
    shared.finished.store(true, Ordering::Release);
    shared.phase.raise();
    // Missing deliveries are waited for until the grace runs out (or nobody misses any).
    tokio::select! {
        () = tokio::time::sleep(b.grace) => {}
        () = shared.all_ended.notified() => {}
    }
    shared.expired.store(true, Ordering::Release);
    shared.phase.raise();
    tally.cpu_before = cpu_before;
    tally
}
