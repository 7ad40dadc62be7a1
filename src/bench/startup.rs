//! `bench startup`: fills a store with E events over J jobs (through a daemon it starts), then
//! restarts the daemon on it and times start → `/readyz` 200, with its RSS when ready.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use serde_json::json;

use super::{rss_kib, Report};

#[derive(Debug, Args)]
pub struct StartupBench {
    /// Events to store.
    #[arg(short = 'e', long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Jobs they are spread over.
    #[arg(short = 'j', long, default_value_t = 10_000)]
    pub jobs: u64,
    /// The data directory; filled if empty, reused (not refilled) if not.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Extra arguments for `progressd serve` (repeatable), e.g. `--serve-arg=--cache-bytes=33554432`.
    #[arg(long, allow_hyphen_values = true)]
    pub serve_arg: Vec<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A `progressd serve` child and the address it reported.
struct Served {
    child: Child,
    base: String,
    started: Instant,
}

impl Served {
    fn start(dir: &std::path::Path, extra: &[String]) -> Result<Served, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut child = Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "progressd=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .ok_or("the daemon exited before listening")?
                .map_err(|e| e.to_string())?;
            if let Some(rest) = line.split(" listen=").nth(1) {
                break rest.split([' ', ',']).next().unwrap_or_default().to_owned();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Served {
            child,
            base: format!("http://{addr}"),
            started,
        })
    }

    fn stop(mut self) -> Result<(), String> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("kill -TERM failed".to_owned());
        }
        self.child.wait().map_err(|e| e.to_string())?;
        Ok(())
    }
}

pub fn run(b: StartupBench) -> Result<Report, String> {
    let dir = match &b.data_dir {
        Some(d) => d.clone(),
        None => {
            std::env::temp_dir().join(format!("progressd-bench-startup-{}-{}", b.events, b.jobs))
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let http = reqwest::Client::new();
    let fresh = std::fs::read_dir(&dir)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    let mut fill_s = None;
    if fresh {
        let served = Served::start(&dir, &b.serve_arg)?;
        let started = Instant::now();
        rt.block_on(fill(&http, &served.base, b.events, b.jobs))?;
        fill_s = Some(started.elapsed().as_secs_f64());
        served.stop()?;
    }
    let served = Served::start(&dir, &b.serve_arg)?;
    let ready = rt.block_on(async {
        loop {
            match http.get(format!("{}/readyz", served.base)).send().await {
                Ok(r) if r.status().is_success() => break Ok(served.started.elapsed()),
                Ok(_) | Err(_) if served.started.elapsed() > Duration::from_secs(120) => {
                    break Err("not ready after 120 s".to_owned())
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    })?;
    let rss = rss_kib(served.child.id());
    let stored = rt.block_on(async {
        let text = http
            .get(format!("{}/metrics", served.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("progressd_events_stored "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    served.stop()?;
    let disk: u64 = walk_size(&dir);
    Ok(Report {
        scenario: "startup",
        params: json!({"events": b.events, "jobs": b.jobs, "data_dir": dir.display().to_string()}),
        figures: vec![
            ("fill_s", json!(fill_s)),
            ("events_stored", json!(stored)),
            ("ready_ms", json!(ready.as_secs_f64() * 1000.0)),
            ("rss_at_ready_kib", json!(rss)),
            ("disk_bytes", json!(disk)),
        ],
        correct: stored.is_some_and(|s| s as u64 >= b.events.min(b.jobs * 1000)),
    })
}

/// E events over J jobs in batches of up to 1,000, 16 requests at a time.
async fn fill(http: &reqwest::Client, base: &str, events: u64, jobs: u64) -> Result<(), String> {
    let jobs = jobs.max(1);
    let per_job = events / jobs;
    let requests = (0..jobs).flat_map(|j| {
        let batches = per_job.div_ceil(1000);
        (0..batches).map(move |k| (j, k * 1000, (per_job - k * 1000).min(1000)))
    });
    let results: Vec<Result<(), String>> = futures_util::stream::iter(requests)
        .map(|(j, first, count)| async move {
            let body: Vec<_> = (first..first + count)
                .map(|n| json!({"current": n + 1, "total": per_job, "stage": "fill", "message": format!("event {n}")}))
                .collect();
            let res = http
                .post(format!("{base}/v1/jobs/startup-{j}/events"))
                .json(&body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if res.status().is_success() {
                Ok(())
            } else {
                Err(format!("fill: {}", res.status()))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

fn walk_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
