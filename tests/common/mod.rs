//! Test harness: a real daemon on 127.0.0.1:0 with sled in a temp dir, in-process
//! ([`Daemon`]) or as a child process ([`Process`], for signals and kill -9), and real
//! clients: reqwest, an SSE parser, tokio-tungstenite.
//!
//! No sleeps for synchronisation: the listener is bound before the daemon starts, so the first
//! request simply waits in the accept queue until the daemon is ready; streams are read until
//! the expected event arrives. The timeouts below only turn a hang into a failure.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{SinkExt, Stream, StreamExt};
use progressd::Config;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Longest we wait for anything before calling it a hang.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct Daemon {
    pub addr: SocketAddr,
    pub base: String,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), progressd::RunError>>>,
    pub data_dir: PathBuf,
    _dir: Option<TempDir>,
}

impl Daemon {
    pub async fn start() -> Daemon {
        Daemon::with(|_| {}).await
    }

    /// A daemon with the defaults of `progressd serve`, adjusted by `adjust`.
    pub async fn with(adjust: impl FnOnce(&mut Config)) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let mut d = Daemon::on(&data_dir, adjust).await;
        d._dir = Some(dir);
        d
    }

    /// A daemon on an existing data dir (for restarts).
    pub async fn on(data_dir: &Path, adjust: impl FnOnce(&mut Config)) -> Daemon {
        let mut config = Config::new(data_dir);
        adjust(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(progressd::run(
            vec![progressd::Listener::Tcp(listener)],
            config,
            shutdown.clone(),
        ));
        Daemon {
            addr,
            base: format!("http://{addr}"),
            http: client(),
            shutdown,
            task: Some(task),
            data_dir: data_dir.to_owned(),
            _dir: None,
        }
    }

    /// Graceful shutdown; panics if the daemon failed.
    pub async fn stop(mut self) -> Option<TempDir> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("daemon did not stop in time")
                .unwrap()
                .unwrap();
        }
        self._dir.take()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }
}

impl Api for Daemon {
    fn base(&self) -> &str {
        &self.base
    }
    fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

/// Requests every test makes, against any daemon.
#[allow(async_fn_in_trait)]
pub trait Api {
    fn base(&self) -> &str;
    fn http(&self) -> &reqwest::Client;

    /// POST an update or batch; returns the status and the JSON body.
    async fn publish(&self, job: &str, body: Value) -> (StatusCode, Value) {
        let res = self
            .http()
            .post(format!("{}/v1/jobs/{job}/events", self.base()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// POST that must succeed; returns the seq.
    async fn publish_ok(&self, job: &str, body: Value) -> u64 {
        let (status, body) = self.publish(job, body).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["seq"].as_u64().unwrap()
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let res = self
            .http()
            .get(format!("{}{path}", self.base()))
            .send()
            .await
            .unwrap();
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Every retained event of a job, via the history endpoint.
    async fn history(&self, job: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let (status, page) = self
                .get(&format!("/v1/jobs/{job}/events?after={after}&limit=1000"))
                .await;
            assert_eq!(status, StatusCode::OK, "{page}");
            let events = page["events"].as_array().unwrap().clone();
            if events.is_empty() {
                return out;
            }
            after = events.last().unwrap()["seq"].as_u64().unwrap();
            out.extend(events);
        }
    }

    /// The Prometheus text of `/metrics`.
    async fn metrics(&self) -> String {
        self.http()
            .get(format!("{}/metrics", self.base()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Publishes `step(2..=total)` to `job` one request at a time in the background, the
    /// last one with status succeeded; each must get its 201.
    fn spawn_publisher(&self, job: &str, total: u64) -> tokio::task::JoinHandle<()> {
        let (http, url) = (
            self.http().clone(),
            format!("{}/v1/jobs/{job}/events", self.base()),
        );
        tokio::spawn(async move {
            for i in 2..=total {
                let mut body = step(i);
                if i == total {
                    body["status"] = json!("succeeded");
                }
                let res = http.post(&url).json(&body).send().await.unwrap();
                assert_eq!(res.status(), StatusCode::CREATED);
            }
        })
    }

    /// Opens an SSE stream; `last_event_id` sets the header.
    async fn sse(&self, path: &str, last_event_id: Option<&str>) -> (StatusCode, Sse) {
        let mut req = self
            .http()
            .get(format!("{}{path}", self.base()))
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let events = res.bytes_stream().eventsource();
        (
            status,
            Sse {
                events: Box::pin(events.map(|e| e.map_err(|e| e.to_string()))),
            },
        )
    }
}

/// One parsed SSE event.
#[derive(Clone, Debug)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: Value,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<eventsource_stream::Event, String>> + Send>>;

pub struct Sse {
    events: EventStream,
}

impl Sse {
    /// The next event, or None when the server closed the stream.
    pub async fn next(&mut self) -> Option<SseEvent> {
        let item = tokio::time::timeout(PATIENCE, self.events.next())
            .await
            .expect("timed out waiting for an SSE event");
        match item {
            None => None,
            Some(Err(e)) if e.contains("closed") || e.contains("decoding") => None,
            Some(Err(e)) => panic!("SSE error: {e}"),
            Some(Ok(ev)) => Some(SseEvent {
                event: ev.event,
                id: ev.id,
                data: serde_json::from_str(&ev.data).unwrap_or(Value::String(ev.data)),
            }),
        }
    }

    /// The next event, which must exist.
    pub async fn expect(&mut self) -> SseEvent {
        self.next().await.expect("stream ended early")
    }

    /// Asserts the server closes the stream next.
    pub async fn expect_closed(&mut self) {
        if let Some(ev) = self.next().await {
            panic!("expected the stream to close, got {ev:?}");
        }
    }
}

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn ws_connect(url: &str) -> WsStream {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

/// What a WebSocket read gave: a JSON text frame or a close code.
#[derive(Debug)]
pub enum WsRead {
    Json(Value),
    Close(Option<u16>),
}

/// Next text frame as JSON, or the close; pings and pongs are skipped.
pub async fn ws_read(ws: &mut WsStream) -> WsRead {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("timed out waiting for a WebSocket frame");
        match msg {
            None => return WsRead::Close(None),
            Some(Err(e)) => panic!("websocket error: {e}"),
            Some(Ok(Message::Text(t))) => return WsRead::Json(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                return WsRead::Close(frame.map(|f| u16::from(f.code)))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Binary(_))) => panic!("unexpected binary frame"),
        }
    }
}

pub async fn ws_json(ws: &mut WsStream) -> Value {
    match ws_read(ws).await {
        WsRead::Json(v) => v,
        WsRead::Close(code) => panic!("expected a frame, got close {code:?}"),
    }
}

pub async fn ws_send(ws: &mut WsStream, value: Value) {
    ws.send(Message::text(value.to_string())).await.unwrap();
}

/// A daemon as a child process of the real binary, for signals and kill -9.
pub struct Process {
    pub child: Child,
    pub base: String,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    logs: std_mpsc::Receiver<String>,
}

impl Process {
    /// Starts `progressd serve` on `data_dir`, on a free port, with extra arguments.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Process {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_progressd"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra);
        Process::spawn(cmd)
    }

    /// Runs `cmd` (a `progressd serve` of some form) and waits for its listening line.
    pub fn spawn(mut cmd: Command) -> Process {
        let mut child = cmd
            .env("RUST_LOG", "progressd=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = std_mpsc::channel();
        // Drain stderr for the life of the child, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let addr = loop {
            let line = logs
                .recv_timeout(PATIENCE)
                .expect("daemon did not report its address");
            if let Some(rest) = line.split(" listen=").nth(1) {
                let first = rest.split([' ', ',']).next().unwrap();
                match first.parse::<SocketAddr>() {
                    Ok(addr) => break addr,
                    // A Unix socket: no TCP address to report.
                    Err(_) => break SocketAddr::from(([127, 0, 0, 1], 0)),
                }
            }
        };
        Process {
            child,
            base: format!("http://{addr}"),
            addr,
            http: client(),
            logs,
        }
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        self.child.wait().unwrap().code()
    }

    /// kill -9.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Log lines since the last call.
    pub fn logs(&self) -> Vec<String> {
        self.logs.try_iter().collect()
    }

    /// SIGTERM, then the exit code and every log line up to the exit.
    pub fn terminate_with_logs(mut self) -> (Option<i32>, Vec<String>) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let code = self.child.wait().unwrap().code();
        let mut lines = Vec::new();
        while let Ok(line) = self.logs.recv_timeout(PATIENCE) {
            lines.push(line);
        }
        (code, lines)
    }
}

impl Api for Process {
    fn base(&self) -> &str {
        &self.base
    }
    fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A progress update with `current` set to `i`, so content can be checked after the fact.
pub fn step(i: u64) -> Value {
    json!({"current": i, "total": 1_000_000, "stage": format!("step {i}")})
}
