//! A first measure of the core: publish throughput and fan-out latency.
//!
//! `cargo bench --bench core` (release build). The daemon runs in this process on
//! 127.0.0.1:0 with sled in a temp dir, so the load generator shares the two cores with it:
//! read the figures as a floor and compare runs on the same machine, not across machines.
//! Knobs: `BENCH_SECS` (default 5), `BENCH_SUBSCRIBERS` (default 1000).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use progressd::config::Durability;
use serde_json::{json, Value};

#[path = "../tests/common/mod.rs"]
mod common;
use common::Daemon;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn daemon(durability: Durability) -> Daemon {
    Daemon::with(|c| c.durability = durability).await
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(micros)
        .unwrap_or(0)
}

/// `conns` keep-alive clients POST for `secs`, each to its own job, `batch` updates a request.
async fn publish(durability: Durability, conns: usize, batch: usize, secs: u64) {
    let d = daemon(durability).await;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let events = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let body: Value = if batch == 1 {
        json!({"current": 1, "total": 100, "stage": "bench"})
    } else {
        Value::Array(
            (0..batch)
                .map(|i| json!({"current": i, "total": batch, "stage": "bench"}))
                .collect(),
        )
    };
    let body = body.to_string();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let client = reqwest::Client::new();
        let url = format!("{}/v1/jobs/bench-{c}/events", d.base);
        let (latencies, errors, events, body) = (
            Arc::clone(&latencies),
            Arc::clone(&errors),
            Arc::clone(&events),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let start = Instant::now();
                let res = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 201 => {
                        let _ = r.bytes().await;
                        mine.push(micros(start.elapsed()));
                        events.fetch_add(batch as u64, Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Relaxed);
                    }
                }
            }
            latencies.lock().expect("lock").extend(mine);
        }));
    }
    let started = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat = latencies.lock().expect("lock").clone();
    lat.sort_unstable();
    println!(
        "publish  {:<8} conns={conns:<3} batch={batch:<4} {:>9.0} events/s  {:>7.0} req/s  \
         p50={:>6}us p99={:>6}us p999={:>6}us  errors={}",
        format!("{durability:?}").to_lowercase(),
        events.load(Relaxed) as f64 / elapsed,
        lat.len() as f64 / elapsed,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        errors.load(Relaxed)
    );
    d.stop().await;
}

/// `subs` SSE subscribers on one job; events at `rate`/s for `secs`, each carrying its send
/// time; delivery latency as each subscriber parses it.
async fn fanout(subs: usize, rate: u64, secs: u64) {
    let d = daemon(Durability::Sync).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let url = format!("{}/v1/jobs/fan/events", d.base);
    // The job exists before anyone subscribes, so every subscriber starts with its snapshot.
    client
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"status":"running"}"#)
        .send()
        .await
        .expect("first publish");
    let total = rate * secs;
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(subs * total as usize)));
    let duplicates = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subs);
    let mut tasks = Vec::new();
    for _ in 0..subs {
        let stream_url = format!("{}/v1/jobs/fan/stream", d.base);
        let (latencies, duplicates, ready_tx) = (
            Arc::clone(&latencies),
            Arc::clone(&duplicates),
            ready_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let Ok(res) = client.get(&stream_url).send().await else {
                return;
            };
            let mut events = res.bytes_stream().eventsource();
            let mut mine = Vec::with_capacity(total as usize);
            let mut last = 0;
            while let Some(Ok(ev)) = events.next().await {
                match ev.event.as_str() {
                    "snapshot" => {
                        let _ = ready_tx.send(()).await;
                    }
                    "progress" => {
                        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                            continue;
                        };
                        let seq = v["seq"].as_u64().unwrap_or(0);
                        if seq <= last {
                            duplicates.fetch_add(1, Relaxed);
                        }
                        last = seq;
                        let sent = v["data"]["sent_us"].as_u64().unwrap_or(0);
                        mine.push(now_micros().saturating_sub(sent));
                        if v["status"] == "succeeded" {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            latencies.lock().expect("lock").extend(mine);
        }));
    }
    for _ in 0..subs {
        ready_rx.recv().await;
    }
    let period = Duration::from_micros(1_000_000 / rate);
    let mut tick = tokio::time::interval(period);
    for i in 0..total {
        tick.tick().await;
        let mut body = json!({"current": i, "total": total, "data": {"sent_us": now_micros()}});
        if i + 1 == total {
            body["status"] = json!("succeeded");
        }
        let _ = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut lat = latencies.lock().expect("lock").clone();
    lat.sort_unstable();
    println!(
        "fanout   sse subs={subs:<5} rate={rate}/s  delivered {}/{}  dup={}  \
         p50={:.1}ms p90={:.1}ms p99={:.1}ms max={:.1}ms",
        lat.len(),
        total as usize * subs,
        duplicates.load(Relaxed),
        percentile(&lat, 0.50) as f64 / 1000.0,
        percentile(&lat, 0.90) as f64 / 1000.0,
        percentile(&lat, 0.99) as f64 / 1000.0,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    d.stop().await;
}

fn main() {
    let secs = env_or("BENCH_SECS", 5);
    let subs = env_or("BENCH_SUBSCRIBERS", 1000) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        publish(Durability::Sync, 16, 1, secs).await;
        publish(Durability::Relaxed, 16, 1, secs).await;
        publish(Durability::Sync, 16, 100, secs).await;
        fanout(subs, 50, secs).await;
    });
}
