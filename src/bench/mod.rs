//! `progressd bench`: a load generator in the binary, like `redis-benchmark`, that any user
//! can aim at their own deployment — or, through the URL templates, at another SSE server.
//!
//! Scenarios: [`publish`] (events/s and POST latency), [`fanout`] (delivery latency, delivered
//! vs expected, duplicates, out-of-order, daemon CPU), [`idle`] (daemon RSS per idle SSE
//! connection), [`resume`] (a storm of reconnects N events behind) and [`startup`] (time to
//! ready on a large store). Each prints a table, or one JSON object with `--json`.
//!
//! Every payload carries `{"n": k, "sent_us": t}` in its `data`: `k` counts the events of a
//! job from 1, so a subscriber can tell a gap, a duplicate and a reordering apart on any
//! server that relays the body (progressd embeds it in the event, Nchan sends it as is);
//! `t` is microseconds on this process's clock, so delivery latency needs no clock sync.
//!
//! The generator runs on `--threads` OS threads (default 1), each with its own single-threaded
//! runtime and its share of the connections; nothing is spawned.

pub mod fanout;
pub mod idle;
pub mod publish;
pub mod resume;
pub mod sse;
pub mod startup;

use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// C keep-alive connections POSTing single events or batches for D seconds.
    Publish(publish::PublishBench),
    /// S subscribers over J jobs, events published at R/s: delivery latency and correctness.
    Fanout(fanout::FanoutBench),
    /// S idle SSE connections held for T seconds: daemon RSS per connection (`--pid`).
    Idle(idle::IdleBench),
    /// S subscribers drop and reconnect N events behind while publishing goes on.
    ResumeStorm(resume::ResumeBench),
    /// Time from start to /readyz 200 with a store of E events over J jobs.
    Startup(startup::StartupBench),
}

/// The server under test, and how to talk to it.
#[derive(Clone, Debug, Args)]
pub struct Target {
    /// Base URL, substituted for `{url}` in the templates.
    #[arg(long, env = "PROGRESSD_URL", default_value = "http://127.0.0.1:7700")]
    pub url: String,
    /// Where to POST an event for `{job}`.
    #[arg(long, default_value = "{url}/v1/jobs/{job}/events")]
    pub publish_url: String,
    /// Where to subscribe (SSE) to `{job}`.
    #[arg(long, default_value = "{url}/v1/jobs/{job}/stream")]
    pub subscribe_url: String,
    /// How a reconnecting subscriber names the last id it saw.
    #[arg(long, value_enum, default_value_t = Resume::Header)]
    pub resume: Resume,
    /// Body format: progressd's update JSON (batches as arrays), or the bare payload for
    /// servers that relay bodies verbatim.
    #[arg(long, value_enum, default_value_t = BodyFormat::Progressd)]
    pub body: BodyFormat,
    /// A Bearer token for every request.
    #[arg(long, env = "PROGRESSD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The server's process ids (comma-separated, e.g. nginx's master and workers): their
    /// CPU time and RSS, summed, are read from /proc.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Spread client connections over this many source addresses 127.0.0.1…, so that
    /// 10,000+ connections do not run out of ephemeral ports.
    #[arg(long, default_value_t = 16)]
    pub source_addrs: u8,
    /// Load-generator threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Prefix of the job ids this run uses (default: unique per run).
    #[arg(long)]
    pub job_prefix: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Resume {
    /// `Last-Event-ID: <id>` (EventSource's way).
    Header,
    /// `?after=<id>`.
    Query,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BodyFormat {
    Progressd,
    Raw,
}

impl Target {
    pub fn job(&self, run: &str, i: usize) -> String {
        format!("{run}-{i}")
    }

    pub fn run_prefix(&self) -> String {
        self.job_prefix.clone().unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default();
            format!("bench-{nanos}")
        })
    }

    pub fn publish_url(&self, job: &str) -> String {
        fill(&self.publish_url, &self.url, job)
    }

    pub fn subscribe_url(&self, job: &str) -> String {
        fill(&self.subscribe_url, &self.url, job)
    }

    /// One HTTP client per source address; connection `i` uses `clients[i % len]`.
    pub fn clients(&self) -> Result<Vec<reqwest::Client>, String> {
        (0..self.source_addrs.max(1))
            .map(|k| {
                let mut b = reqwest::Client::builder()
                    .pool_max_idle_per_host(usize::MAX)
                    .connect_timeout(Duration::from_secs(10))
                    .tcp_nodelay(true);
                if self.url.contains("://127.") || self.url.contains("://localhost") {
                    b = b.local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, k + 1)));
                }
                b.build().map_err(|e| e.to_string())
            })
            .collect()
    }

    /// CPU time of the server's processes, if `--pid` named them.
    pub fn server_cpu(&self) -> Option<Duration> {
        (!self.pid.is_empty())
            .then(|| {
                self.pid
                    .iter()
                    .map(|&p| cpu_time(p))
                    .sum::<Option<Duration>>()
            })
            .flatten()
    }

    /// Resident memory of the server's processes in KiB, if `--pid` named them.
    pub fn server_rss_kib(&self) -> Option<u64> {
        (!self.pid.is_empty())
            .then(|| self.pid.iter().map(|&p| rss_kib(p)).sum::<Option<u64>>())
            .flatten()
    }

    /// POSTs a JSON `body` to `url`. `Ok` for a 2xx, whose answer is read so the connection
    /// is reused; otherwise the status and answer, or the transport error.
    pub async fn post(
        &self,
        client: &reqwest::Client,
        url: &str,
        body: String,
    ) -> Result<(), String> {
        let res = self
            .authorized(client.post(url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = res.status();
        let text = res.text().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{status}: {text}"))
        }
    }

    pub fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// The body of `count` events numbered from `first`.
    pub fn body(&self, first: u64, count: u64) -> String {
        let one = |n: u64| {
            let payload = json!({"n": n, "sent_us": now_us()});
            match self.body {
                BodyFormat::Progressd => {
                    json!({"stage": "bench", "message": format!("event {n}"), "data": payload})
                }
                BodyFormat::Raw => payload,
            }
        };
        if count == 1 && self.body == BodyFormat::Raw {
            return one(first).to_string();
        }
        match count {
            1 => one(first).to_string(),
            _ => Value::Array((first..first + count).map(one).collect()).to_string(),
        }
    }
}

pub fn fill(template: &str, url: &str, job: &str) -> String {
    template
        .replace("{url}", url.trim_end_matches('/'))
        .replace("{job}", job)
}

/// Microseconds since this process first asked: the clock of every `sent_us`.
/// A moment every subscriber of a scenario waits for: the storm begins, the publisher is
/// done, the grace ran out. One shared signal rather than a timer per subscriber: 10,000
/// subscribers each polling every 100 ms were 100,000 timer wake-ups a second in the load
/// generator, on the cores the server shares; they saturated it, inflated its latencies and
/// delayed its own handshakes past the server's 10 s header timeout. A `watch` channel, so
/// that it wakes tasks on every generator thread's runtime.
pub struct Signal(tokio::sync::watch::Sender<u32>);

impl Default for Signal {
    fn default() -> Signal {
        Signal(tokio::sync::watch::channel(0).0)
    }
}

impl Signal {
    /// Wakes every waiter.
    pub fn raise(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A waiter for the raises after this call.
    pub fn waiter(&self) -> Waiter {
        Waiter(self.0.subscribe())
    }
}

pub struct Waiter(tokio::sync::watch::Receiver<u32>);

impl Waiter {
    /// Until the next raise (never, once the signal is gone).
    pub async fn next(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

pub fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Latency samples (µs), summarised as percentiles.
#[derive(Debug, Default)]
pub struct Samples(pub Vec<u64>);

impl Samples {
    pub fn merge(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    /// The value at quantile `q` (0–1) in milliseconds, `None` without samples.
    pub fn ms(&mut self, q: f64) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        self.0.sort_unstable();
        let idx = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        Some(self.0[idx.min(self.0.len() - 1)] as f64 / 1000.0)
    }
}

/// What a scenario found: named figures in print order.
pub struct Report {
    pub scenario: &'static str,
    pub params: Value,
    pub figures: Vec<(&'static str, Value)>,
    /// Correctness held (all delivered, no gap, no duplicate): the exit code says so.
    pub correct: bool,
}

impl Report {
    pub fn print(&self, as_json: bool) {
        if as_json {
            let results: serde_json::Map<String, Value> = self
                .figures
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect();
            println!(
                "{}",
                json!({"scenario": self.scenario, "params": self.params, "results": results, "correct": self.correct})
            );
            return;
        }
        println!("progressd bench {}  {}", self.scenario, self.params);
        let width = self.figures.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (name, value) in &self.figures {
            let shown = match value {
                Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() != 0.0) => {
                    format!("{:.2}", n.as_f64().unwrap_or_default())
                }
                Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            println!("  {name:<width$}  {shown}");
        }
        if !self.correct {
            println!("  INCORRECT: see the figures above");
        }
    }
}

/// CPU time (user + system) of a process, from /proc/PID/stat (clock ticks of 10 ms, the
/// USER_HZ of every Linux architecture we run on).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Resident memory of a process in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Runs `work(thread_index)` on `threads` OS threads, each on its own current-thread
/// runtime, and collects their results.
pub fn on_threads<T, F, Fut>(threads: usize, work: F) -> Result<Vec<T>, String>
where
    T: Send,
    F: Fn(usize) -> Fut + Sync,
    Fut: std::future::Future<Output = T>,
{
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|t| {
                let work = &work;
                scope.spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map(|rt| rt.block_on(work(t)))
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a load thread panicked".to_owned())?)
            .collect()
    })
}

pub fn run(args: BenchArgs) -> ExitCode {
    let as_json = match &args.scenario {
        Scenario::Publish(b) => b.target.json,
        Scenario::Fanout(b) => b.target.json,
        Scenario::Idle(b) => b.target.json,
        Scenario::ResumeStorm(b) => b.target.json,
        Scenario::Startup(b) => b.json,
    };
    let result = match args.scenario {
        Scenario::Publish(b) => publish::run(b),
        Scenario::Fanout(b) => fanout::run(b),
        Scenario::Idle(b) => idle::run(b),
        Scenario::ResumeStorm(b) => resume::run(b),
        Scenario::Startup(b) => startup::run(b),
    };
    match result {
        Ok(report) => {
            report.print(as_json);
            if report.correct {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("progressd bench: {e}");
            ExitCode::from(2)
        }
    }
}
