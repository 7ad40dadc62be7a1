//! Running under systemd: the unit files, sd_notify (READY, WATCHDOG, STOPPING, STATUS),
//! socket activation, Unix sockets, and a restart under load that no client notices.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{step, ws_read, Api, Process, WsRead, PATIENCE};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The unit files with ExecStart pointing at the binary under test (verify checks that the
/// command exists), in a directory of their own.
fn units() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string(repo().join("deploy/progressd.service"))
        .unwrap()
        .replace("/usr/local/bin/progressd", env!("CARGO_BIN_EXE_progressd"));
    std::fs::write(dir.path().join("progressd.service"), service).unwrap();
    std::fs::copy(
        repo().join("deploy/progressd.socket"),
        dir.path().join("progressd.socket"),
    )
    .unwrap();
    dir
}

#[test]
fn unit_files_verify_cleanly() {
    let dir = units();
    let out = Command::new("systemd-analyze")
        .current_dir(dir.path())
        .args(["verify", "progressd.service", "progressd.socket"])
        .output()
        .expect("systemd-analyze (package systemd) is needed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.trim().is_empty(), "verify warned: {stderr}");
    assert!(stdout.trim().is_empty(), "verify printed: {stdout}");
}

#[test]
fn exposure_score_is_the_one_readme_states() {
    let dir = units();
    let out = Command::new("systemd-analyze")
        .current_dir(dir.path())
        .args(["security", "--offline=true", "progressd.service"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for progressd.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in {text}"));
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let stated: f64 = readme
        .split("exposure level ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.trim_end_matches(['.', ',']).parse().ok())
        .expect("README states the exposure level");
    assert!(score <= 2.0, "exposure {score} is above 2.0");
    assert!(
        score <= stated,
        "exposure {score} is worse than README's {stated}"
    );
}

#[test]
fn check_config_accepts_good_settings_and_explains_bad_ones() {
    let bin = env!("CARGO_BIN_EXE_progressd");
    let ok = Command::new(bin)
        .args(["check-config", "--data-dir", "/tmp/x"])
        .output()
        .unwrap();
    assert!(ok.status.success());
    let bad = Command::new(bin)
        .args(["check-config"])
        .env("PROGRESSD_HISTORY", "0")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--history"));
    let bad = Command::new(bin)
        .args(["check-config", "--listen", "nowhere"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("host:port"));
    let version = Command::new(bin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// A notify socket like systemd's: a Unix datagram socket at a path.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            sock,
            path,
            _dir: dir,
        }
    }

    /// The next message, or None after `wait`.
    fn recv(&self, wait: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Waits for a message containing `what`; returns it.
    fn expect(&self, what: &str) -> String {
        loop {
            let msg = self
                .recv(PATIENCE)
                .unwrap_or_else(|| panic!("no {what} from the daemon"));
            if msg.contains(what) {
                return msg;
            }
        }
    }
}

fn serve_with_notify(
    data: &Path,
    notify: &NotifySocket,
    extra: &[&str],
    watchdog_usec: Option<u64>,
) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_progressd"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(extra)
        .env("NOTIFY_SOCKET", &notify.path);
    if let Some(usec) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", usec.to_string());
    }
    Process::spawn(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_when_ready_then_status_and_stopping() {
    let notify = NotifySocket::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve_with_notify(dir.path(), &notify, &[], None);
    let ready = notify.expect("READY=1");
    assert!(ready.contains("STATUS="), "{ready}");
    // READY=1 came after /readyz says 200.
    let (status, _) = daemon.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    let (code, logs) = {
        let handle = std::thread::spawn(move || daemon.terminate_with_logs());
        let stopping = notify.expect("STOPPING=1");
        assert!(stopping.contains("STOPPING=1"));
        handle.join().unwrap()
    };
    assert_eq!(code, Some(0));
    assert!(logs.iter().any(|l| l.contains("stopped")), "{logs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_while_healthy_and_stops_when_the_store_hangs() {
    let notify = NotifySocket::new();
    let dir = tempfile::tempdir().unwrap();
    // The writer's start-up flush is the first; the first publish's flush hangs for good.
    let daemon = serve_with_notify(
        dir.path(),
        &notify,
        &["--fault", "stall-flush-after=1"],
        Some(400_000),
    );
    notify.expect("READY=1");
    for _ in 0..3 {
        notify.expect("WATCHDOG=1");
    }
    // Wedge the store: this publish never gets its answer.
    let url = format!("{}/v1/jobs/j/events", daemon.base);
    let wedged = tokio::spawn(async move {
        let _ = common::client()
            .post(url)
            .json(&json!({"percent": 1}))
            .timeout(Duration::from_secs(30))
            .send()
            .await;
    });
    // Watch five watchdog periods: at most one ping already on its way, while STATUS lines
    // show the daemon itself is still running.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let (mut pings, mut statuses) = (0, 0);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Some(msg) = notify.recv(left) else { break };
        pings += usize::from(msg.contains("WATCHDOG=1"));
        statuses += usize::from(msg.contains("STATUS="));
    }
    assert!(
        pings <= 1,
        "the watchdog kept pinging with a wedged store ({pings})"
    );
    assert!(statuses >= 2, "the daemon stopped reporting status");
    wedged.abort();
    daemon.kill();
}

/// A daemon that is merely full is not stuck: at `--max-connections` its own probe gets the
/// canned 503, which proves the accept loop runs, and the watchdog goes on being pinged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_pinged_at_the_connection_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let notify = NotifySocket::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve_with_notify(
        dir.path(),
        &notify,
        &["--max-connections", "1"],
        Some(400_000),
    );
    notify.expect("READY=1");
    // The one connection allowed: an event stream, held open.
    let mut stream = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/jobs/j/stream HTTP/1.1\r\nHost: progressd\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // Full: another client is turned away...
    let status_line = || async {
        let mut s = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: progressd\r\n\r\n")
            .await;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        head
    };
    assert_eq!(&status_line().await, b"HTTP/1.1 503");
    // ...and the watchdog is still pinged: more pings than could have been on their way.
    for _ in 0..3 {
        notify.expect("WATCHDOG=1");
    }
    assert_eq!(
        &status_line().await,
        b"HTTP/1.1 503",
        "the stream was let go"
    );
    drop(stream);
    daemon.kill();
}

/// Starts the daemon with `listener` as fd 3 and LISTEN_FDS=1, LISTEN_PID=its pid, as
/// systemd does (a shell moves the socket from stdin to fd 3 and execs the daemon).
fn serve_activated(data: &Path, listener: impl Into<std::os::fd::OwnedFd>) -> Process {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"exec 3<&0 0</dev/null; export LISTEN_FDS=1 LISTEN_PID=$$; exec "$0" "$@""#,
        env!("CARGO_BIN_EXE_progressd"),
        "serve",
        "--listen",
        "127.0.0.1:1",
        "--data-dir",
    ])
    .arg(data)
    .stdin(Stdio::from(listener.into()));
    Process::spawn(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_uses_the_passed_socket() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = serve_activated(dir.path(), listener);
    // It reports and serves the address we bound, not its --listen.
    assert_eq!(daemon.addr, addr);
    assert_eq!(daemon.publish_ok("j", json!({"percent": 3})).await, 1);
    let (status, snap) = daemon.get("/v1/jobs/j").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(snap["percent"], 3.0);
    assert_eq!(daemon.terminate(), Some(0));
}

/// One HTTP/1.1 request over a Unix socket; returns the status and the body.
fn unix_request(path: &Path, method: &str, target: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: progressd\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[test]
fn a_unix_socket_serves_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("progressd.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_progressd"));
    cmd.args(["serve", "--unix-mode", "600", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()));
    let daemon = Process::spawn(cmd);
    let (status, body) = unix_request(
        &sock,
        "POST",
        "/v1/jobs/u/events",
        Some(r#"{"stage":"via unix"}"#),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = unix_request(&sock, "GET", "/v1/jobs/u", None);
    assert_eq!(status, 200);
    let snap: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(snap["stage"], "via unix");
    // A stream over the Unix socket, written by the daemon's own loop (`handoff.rs`): the
    // job is finished, so it is the snapshot, `end`, and the connection's close.
    let (status, _) = unix_request(
        &sock,
        "POST",
        "/v1/jobs/u/events",
        Some(r#"{"status":"succeeded"}"#),
    );
    assert_eq!(status, 201);
    let (status, body) = unix_request(&sock, "GET", "/v1/jobs/u/stream", None);
    assert_eq!(status, 200);
    assert!(body.starts_with("retry:"), "{body}");
    let end = body.find("event:end").unwrap_or_else(|| panic!("{body}"));
    assert!(
        body.find("event:snapshot").is_some_and(|at| at < end),
        "{body}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(daemon.terminate(), Some(0));
}

/// Where clients find the daemon: its base URL changes with each restart.
type Base = Arc<Mutex<tokio::sync::watch::Sender<String>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_load_goes_unnoticed() {
    const TOTAL: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Process::start(dir.path(), &["--retry", "100ms"]);
    daemon.publish_ok("j", step(1)).await;
    let (base_tx, base_rx) = tokio::sync::watch::channel(daemon.base.clone());
    let base: Base = Arc::new(Mutex::new(base_tx));

    // A publisher that carries on against whichever daemon is up.
    let publisher = {
        let mut base = base_rx.clone();
        tokio::spawn(async move {
            let http = common::client();
            let mut next = 2;
            while next <= TOTAL {
                let url = format!("{}/v1/jobs/j/events", base.borrow().clone());
                let mut body = step(next);
                if next == TOTAL {
                    body["status"] = json!("succeeded");
                }
                match http.post(&url).json(&body).send().await {
                    Ok(r) if r.status() == StatusCode::CREATED => next += 1,
                    _ => {
                        // The daemon is restarting: wait for the new one, then continue from
                        // what it has (a publish in flight may or may not have landed).
                        base.changed().await.unwrap();
                        let url = format!("{}/v1/jobs/j", base.borrow().clone());
                        let snap: Value =
                            http.get(&url).send().await.unwrap().json().await.unwrap();
                        next = snap["seq"].as_u64().unwrap() + 1;
                    }
                }
            }
        })
    };

    // An SSE client and a WebSocket client, each resuming from what it has seen; each
    // says when it has seen 100 events.
    let (milestone, mut milestones) = tokio::sync::mpsc::channel::<()>(2);
    let sse_seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let sse_client = {
        let (mut base, seen, milestone) =
            (base_rx.clone(), Arc::clone(&sse_seen), milestone.clone());
        tokio::spawn(async move {
            let http = common::client();
            loop {
                let last = seen.lock().unwrap().last().copied();
                let url = format!("{}/v1/jobs/j/stream", base.borrow().clone());
                let mut req = http.get(&url).timeout(Duration::from_secs(3600));
                if let Some(last) = last {
                    req = req.header("Last-Event-ID", last.to_string());
                }
                let Ok(res) = req.send().await else {
                    base.changed().await.unwrap();
                    continue;
                };
                if res.status() == StatusCode::NO_CONTENT {
                    return;
                }
                use eventsource_stream::Eventsource;
                use futures_util::StreamExt;
                let mut events = res.bytes_stream().eventsource();
                while let Some(Ok(ev)) = events.next().await {
                    match ev.event.as_str() {
                        "progress" => {
                            let n = {
                                let mut seen = seen.lock().unwrap();
                                seen.push(ev.id.parse().unwrap());
                                seen.len()
                            };
                            if n == 100 {
                                milestone.send(()).await.unwrap();
                            }
                        }
                        "snapshot" => seen
                            .lock()
                            .unwrap()
                            .extend(1..=ev.id.parse::<u64>().unwrap()),
                        "end" => return,
                        other => panic!("unexpected {other}"),
                    }
                }
                // Ended by the shutdown: wait for the next daemon.
                base.changed().await.unwrap();
            }
        })
    };
    let ws_seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let ws_client = {
        let (mut base, seen, milestone) =
            (base_rx.clone(), Arc::clone(&ws_seen), milestone.clone());
        tokio::spawn(async move {
            loop {
                let after = seen.lock().unwrap().last().copied().unwrap_or(0);
                let url = format!(
                    "{}/v1/jobs/j/ws?after={after}",
                    base.borrow().replace("http://", "ws://")
                );
                let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&url).await else {
                    base.changed().await.unwrap();
                    continue;
                };
                loop {
                    match ws_read(&mut ws).await {
                        WsRead::Json(v) if v["type"] == "event" => {
                            let n = {
                                let mut seen = seen.lock().unwrap();
                                seen.push(v["event"]["seq"].as_u64().unwrap());
                                seen.len()
                            };
                            if n == 100 {
                                milestone.send(()).await.unwrap();
                            }
                        }
                        WsRead::Json(v) if v["type"] == "end" => return,
                        WsRead::Close(Some(1001)) => break,
                        other => panic!("unexpected {other:?}"),
                    }
                }
                base.changed().await.unwrap();
            }
        })
    };

    // Restart once both clients have seen a good part of the stream.
    for _ in 0..2 {
        milestones.recv().await.unwrap();
    }
    let (code, logs) = tokio::task::spawn_blocking(move || daemon.terminate_with_logs())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    assert!(
        !logs.iter().any(|l| l.contains("grace period")),
        "shutdown ran past its timeout: {logs:?}"
    );
    let daemon = Process::start(dir.path(), &["--retry", "100ms"]);
    base.lock().unwrap().send_replace(daemon.base.clone());

    publisher.await.unwrap();
    sse_client.await.unwrap();
    ws_client.await.unwrap();
    let want: Vec<u64> = (1..=TOTAL).collect();
    assert_eq!(
        *sse_seen.lock().unwrap(),
        want,
        "SSE: every seq exactly once, in order"
    );
    assert_eq!(
        *ws_seen.lock().unwrap(),
        want,
        "WebSocket: every seq exactly once, in order"
    );
    let history: BTreeMap<u64, u64> = daemon
        .history("j")
        .await
        .iter()
        .map(|e| (e["seq"].as_u64().unwrap(), e["current"].as_u64().unwrap()))
        .collect();
    assert!(history.iter().all(|(seq, cur)| seq == cur));
    assert_eq!(daemon.terminate(), Some(0));
}
