//! The recipes in `examples/` run, against a live daemon, as a user would run them: the Python
//! worker (httpx, retries with an `Idempotency-Key`), the Python and Node consumers (SSE,
//! resuming with `Last-Event-ID`), the browser page (EventSource in headless Chromium, through
//! CORS, with and without a token), and the README's "Try it" one-liners.
//!
//! Each recipe is a child process; the tests read its output as it comes and wait for a line
//! rather than sleeping. They need python3 with `examples/python/requirements.txt`, Node 20
//! with `npm ci --prefix examples/node` and `--prefix tests/browser`, and `/usr/bin/chromium`;
//! a missing one fails the test with the command that installs it (CI installs them all).

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Api, Process, PATIENCE};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------
// What the recipes need, checked once: a missing tool is a failure that says how to install
// it, never a silent skip.

fn need(what: &str, install: &str, cmd: &mut Command) {
    let failure = match cmd.output() {
        Ok(out) if out.status.success() => return,
        Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
        Err(e) => e.to_string(),
    };
    panic!("tests/examples.rs needs {what}; install it with `{install}`\n{cmd:?}: {failure}");
}

fn require_python() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        need(
            "python3 with httpx and httpx-sse",
            "python3 -m pip install -r examples/python/requirements.txt",
            Command::new("python3").args(["-c", "import httpx, httpx_sse"]),
        )
    });
}

/// Node 20 or later, and `module` importable from `dir`'s node_modules.
fn require_node(dir: &str, module: &str, install: &str) {
    let script = format!(
        "if (+process.versions.node.split('.')[0] < 20) \
           throw new Error('Node ' + process.version + ' is older than 20'); \
         await import('{module}');"
    );
    need(
        &format!("Node 20+ with the `{module}` package in {dir}"),
        install,
        Command::new("node")
            .args(["--input-type=module", "-e", &script])
            .current_dir(root().join(dir)),
    );
}

fn require_node_consumer() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        require_node(
            "examples/node",
            "eventsource",
            "npm ci --prefix examples/node",
        )
    });
}

fn require_browser() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        require_node(
            "tests/browser",
            "playwright-core",
            "npm ci --prefix tests/browser",
        );
        need(
            "Debian's chromium at /usr/bin/chromium",
            "apt-get install -y chromium",
            Command::new("/usr/bin/chromium").arg("--version"),
        );
    });
}

// ---------------------------------------------------------------------------------------
// Child processes whose output is read line by line as it comes.

/// A recipe (or curl, or the browser driver) running as a child process.
struct Run {
    name: String,
    child: Child,
    lines: mpsc::Receiver<(Pipe, String)>,
    out: Vec<String>,
    err: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Pipe {
    Out,
    Err,
}

/// How a [`Run`] ended.
struct Finished {
    name: String,
    code: Option<i32>,
    out: Vec<String>,
    err: Vec<String>,
}

impl Run {
    fn spawn(name: &str, mut cmd: Command) -> Run {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot run {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        forward(child.stdout.take().unwrap(), Pipe::Out, tx.clone());
        forward(child.stderr.take().unwrap(), Pipe::Err, tx);
        Run {
            name: name.to_owned(),
            child,
            lines,
            out: Vec::new(),
            err: Vec::new(),
        }
    }

    /// Waits for a line on `pipe` that satisfies `pred`, and returns it.
    fn wait_for(&mut self, pipe: Pipe, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok((from, line)) => {
                    let found = from == pipe && pred(&line);
                    self.keep(from, line.clone());
                    if found {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no {what} within {PATIENCE:?}\n{}",
                    self.name,
                    transcript(&self.out, &self.err)
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: exited ({:?}) before {what}\n{}",
                    self.name,
                    self.child.wait().ok().and_then(|s| s.code()),
                    transcript(&self.out, &self.err)
                ),
            }
        }
    }

    fn wait_out(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for(Pipe::Out, what, pred)
    }

    /// Waits for the process to exit; its code and everything it printed.
    fn finish(mut self) -> Finished {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok((from, line)) => self.keep(from, line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: did not exit within {PATIENCE:?}\n{}",
                    self.name,
                    transcript(&self.out, &self.err)
                ),
            }
        }
        Finished {
            code: self.child.wait().unwrap().code(),
            name: std::mem::take(&mut self.name),
            out: std::mem::take(&mut self.out),
            err: std::mem::take(&mut self.err),
        }
    }

    fn keep(&mut self, from: Pipe, line: String) {
        match from {
            Pipe::Out => self.out.push(line),
            Pipe::Err => self.err.push(line),
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends each line of `pipe` to `tx` until the pipe closes.
fn forward(pipe: impl Read + Send + 'static, from: Pipe, tx: mpsc::Sender<(Pipe, String)>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send((from, line)).is_err() {
                break;
            }
        }
    });
}

fn transcript(out: &[String], err: &[String]) -> String {
    format!(
        "--- stdout\n{}\n--- stderr\n{}\n---",
        out.join("\n"),
        err.join("\n")
    )
}

impl Finished {
    /// Asserts the exit code, showing everything the process printed if it differs.
    fn expect_code(&self, code: i32) -> &Finished {
        assert_eq!(
            self.code,
            Some(code),
            "{}: exit code\n{}",
            self.name,
            transcript(&self.out, &self.err)
        );
        self
    }

    fn expect_out(&self, expected: &[String]) -> &Finished {
        assert_eq!(
            self.out,
            expected,
            "{}: stdout\n{}",
            self.name,
            transcript(&self.out, &self.err)
        );
        self
    }

    fn stderr_has(&self, needle: &str) -> bool {
        self.err.iter().any(|l| l.contains(needle))
    }
}

// ---------------------------------------------------------------------------------------
// The recipes' command lines.

fn python(script: &str, job: &str, url: &str) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("examples/python").join(script))
        .args([job, "--url", url])
        .env_remove("PROGRESSD_TOKEN")
        .env_remove("PROGRESSD_URL");
    cmd
}

fn worker(job: &str, url: &str) -> Command {
    require_python();
    python("worker.py", job, url)
}

fn py_consumer(job: &str, url: &str) -> Command {
    require_python();
    python("consumer.py", job, url)
}

fn node_consumer(job: &str, url: &str) -> Command {
    require_node_consumer();
    let mut cmd = Command::new("node");
    cmd.arg(root().join("examples/node/consumer.mjs"))
        .args([job, "--url", url])
        .env_remove("PROGRESSD_TOKEN")
        .env_remove("PROGRESSD_URL");
    cmd
}

/// The Python and the Node consumer of `job`, each once it has its stream open.
fn consumers(job: &str, url: &str, token: Option<&str>) -> Vec<Run> {
    let mut runs = Vec::new();
    for (name, mut cmd) in [
        ("consumer.py", py_consumer(job, url)),
        ("consumer.mjs", node_consumer(job, url)),
    ] {
        if let Some(t) = token {
            cmd.env("PROGRESSD_TOKEN", t);
        }
        runs.push(Run::spawn(&format!("{name} {job}"), cmd));
    }
    for run in &mut runs {
        run.wait_out("stream open", |l| l.starts_with("connected"));
    }
    runs
}

/// What each consumer prints for a job the worker ran with its default three steps, having
/// subscribed before it started.
fn worker_job_seen(end: &str) -> Vec<String> {
    vec![
        "connected after=-".to_owned(),
        r#"progress seq=1 status=running percent=0 stage="start""#.to_owned(),
        r#"progress seq=2 percent=33.3 stage="step 1""#.to_owned(),
        r#"progress seq=3 percent=66.7 stage="step 2""#.to_owned(),
        r#"progress seq=4 percent=100 stage="step 3""#.to_owned(),
        format!(r#"progress seq=5 status={end} message="job {end}""#),
        format!("end status={end}"),
    ]
}

/// The seqs the worker printed (`seq=N {update}`).
fn worker_seqs(run: &Finished) -> Vec<u64> {
    run.out
        .iter()
        .filter_map(|l| l.strip_prefix("seq=")?.split(' ').next()?.parse().ok())
        .collect()
}

/// The stored events of a job the worker ran with its default three steps must be exactly
/// these: nothing lost, nothing stored twice.
async fn assert_worker_job_stored(d: &impl Api, job: &str, end: &str) {
    let events = d.history(job).await;
    let got: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            for derived in ["job", "offset", "at", "percent"] {
                e.as_object_mut().unwrap().remove(derived);
            }
            e
        })
        .collect();
    let expected = vec![
        json!({"seq": 1, "status": "running", "stage": "start", "current": 0, "total": 3}),
        json!({"seq": 2, "current": 1, "total": 3, "stage": "step 1"}),
        json!({"seq": 3, "current": 2, "total": 3, "stage": "step 2"}),
        json!({"seq": 4, "current": 3, "total": 3, "stage": "step 3"}),
        json!({"seq": 5, "status": end, "message": format!("job {end}")}),
    ];
    assert_eq!(got, expected, "stored events of {job}");
}

/// A daemon on a fresh data dir; streams say `retry: 200` so reconnections are quick.
fn daemon(extra: &[&str]) -> (tempfile::TempDir, Process) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--retry", "200ms"];
    args.extend_from_slice(extra);
    let d = Process::start(&dir.path().join("data"), &args);
    (dir, d)
}

/// `progressd serve` on a given address (a restart on the same port, or a late start).
fn daemon_at(addr: SocketAddr, data: &Path, extra: &[&str]) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_progressd"));
    cmd.args(["serve", "--listen", &addr.to_string(), "--data-dir"])
        .arg(data)
        .args(["--retry", "200ms"])
        .args(extra);
    Process::spawn(cmd)
}

// ---------------------------------------------------------------------------------------
// Worker and consumers.

#[tokio::test]
async fn consumers_follow_the_worker_and_exit_with_how_the_job_ended() {
    let (_dir, d) = daemon(&[]);
    let endings = [("succeeded", 0), ("failed", 1), ("cancelled", 2)];
    let mut watching = Vec::new();
    for (end, _) in endings {
        watching.push(consumers(&format!("recipe-{end}"), &d.base, None));
    }
    let workers: Vec<Run> = endings
        .iter()
        .map(|(end, _)| {
            let job = format!("recipe-{end}");
            let mut cmd = worker(&job, &d.base);
            cmd.args(["--final", end]);
            Run::spawn(&format!("worker.py {job}"), cmd)
        })
        .collect();
    for w in workers {
        let w = w.finish();
        w.expect_code(0);
        assert_eq!(worker_seqs(&w), [1, 2, 3, 4, 5], "{}", w.name);
    }
    for ((end, code), runs) in endings.into_iter().zip(watching) {
        for run in runs {
            run.finish()
                .expect_code(code)
                .expect_out(&worker_job_seen(end));
        }
        assert_worker_job_stored(&d, &format!("recipe-{end}"), end).await;
    }

    // A consumer that arrives after the end gets the final state, then the end.
    for cmd in [
        py_consumer("recipe-failed", &d.base),
        node_consumer("recipe-failed", &d.base),
    ] {
        Run::spawn("late consumer", cmd)
            .finish()
            .expect_code(1)
            .expect_out(&[
                "connected after=-".to_owned(),
                r#"snapshot seq=5 status=failed percent=100 stage="step 3" message="job failed""#
                    .to_owned(),
                "end status=failed".to_owned(),
            ]);
    }
}

#[tokio::test]
async fn consumers_of_a_deleted_job_say_so() {
    let (_dir, d) = daemon(&[]);
    let job = "recipe-deleted";
    let mut runs = consumers(job, &d.base, None);
    d.publish_ok(job, json!({"percent": 5})).await;
    for run in &mut runs {
        run.wait_out("seq 1", |l| l.starts_with("progress seq=1 "));
    }
    let res = d
        .http
        .delete(format!("{}/v1/jobs/{job}", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    for run in runs {
        run.finish().expect_code(3).expect_out(
            &["connected after=-", "progress seq=1 percent=5", "deleted"].map(String::from),
        );
    }
}

#[tokio::test]
async fn consumers_resume_across_a_daemon_restart_without_gap_or_duplicate() {
    let (dir, d) = daemon(&[]);
    let addr = d.addr;
    let job = "resume-1";
    let mut runs = consumers(job, &d.base, None);
    for i in 1..=3 {
        d.publish_ok(job, common::step(i)).await;
    }
    for run in &mut runs {
        run.wait_out("seq 3", |l| l.starts_with("progress seq=3 "));
    }
    assert_eq!(d.terminate(), Some(0));
    // Same port, same data: what a restart under systemd looks like to a client.
    let d = daemon_at(addr, &dir.path().join("data"), &[]);
    for i in 4..=6 {
        d.publish_ok(job, common::step(i)).await;
    }
    d.publish_ok(job, json!({"status": "succeeded"})).await;

    for run in runs {
        let done = run.finish();
        done.expect_code(0);
        let name = &done.name;
        let all = transcript(&done.out, &done.err);
        let seqs: Vec<u64> = done
            .out
            .iter()
            .filter_map(|l| {
                l.strip_prefix("progress seq=")?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        assert_eq!(
            seqs,
            [1, 2, 3, 4, 5, 6, 7],
            "{name}: every seq once, in order\n{all}"
        );
        assert!(
            done.out
                .iter()
                .any(|l| l.starts_with("reconnecting after=3")),
            "{name}: it was disconnected\n{all}"
        );
        assert!(
            done.out.iter().any(|l| l == "connected after=3"),
            "{name}: it resumed from seq 3\n{all}"
        );
        assert!(
            !done
                .out
                .iter()
                .any(|l| l.starts_with("snapshot") || l.starts_with("reset")),
            "{name}: a resume, not a fresh start\n{all}"
        );
        assert_eq!(done.out.last().unwrap(), "end status=succeeded", "{all}");
    }
}

#[tokio::test]
async fn the_worker_waits_for_a_daemon_that_is_not_up_yet() {
    // A free port, and nothing listening on it yet.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let job = "late-daemon";
    let mut w = Run::spawn("worker.py", worker(job, &format!("http://{addr}")));
    w.wait_for(Pipe::Err, "a retry", |l| {
        l.contains("attempt 1 failed, retrying in") && l.contains("ConnectError")
    });
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_at(addr, &dir.path().join("data"), &[]);
    let done = w.finish();
    done.expect_code(0);
    assert_eq!(worker_seqs(&done), [1, 2, 3, 4, 5]);
    assert_worker_job_stored(&d, job, "succeeded").await;

    // The job is over: a 409 raises at once with the API's message, never retried.
    let again = Run::spawn("worker.py again", worker(job, &d.base)).finish();
    again.expect_code(1);
    assert!(again.stderr_has("409 job_finished"), "{:?}", again.err);
    assert!(!again.stderr_has("retrying"), "{:?}", again.err);
    assert!(again.out.is_empty(), "{:?}", again.out);
}

#[tokio::test]
async fn a_lost_answer_is_retried_with_its_key_and_stored_once() {
    let (_dir, d) = daemon(&[]);
    // Request 2 (the worker's second update) is stored but its answer is lost; request 4
    // (its third update) is answered 503 with Retry-After: 1 without reaching the daemon.
    let proxy = FlakyProxy::start(d.addr, 2, 4);
    let job = "lossy-1";
    let done = Run::spawn("worker.py", worker(job, &format!("http://{}", proxy.addr))).finish();
    done.expect_code(0);
    // The retried update kept the seq it was stored with: the daemon answered the repeated
    // Idempotency-Key with the first answer (200), and appended nothing.
    assert_eq!(worker_seqs(&done), [1, 2, 3, 4, 5]);
    assert_eq!(
        *proxy.log.lock().unwrap(),
        [
            "1 HTTP/1.1 201 Created",
            "2 HTTP/1.1 201 Created, answer lost",
            "3 HTTP/1.1 200 OK",
            "4 503 from the proxy",
            "5 HTTP/1.1 201 Created",
            "6 HTTP/1.1 201 Created",
            "7 HTTP/1.1 201 Created",
        ]
    );
    assert!(
        done.stderr_has("retrying in") && done.stderr_has("RemoteProtocolError"),
        "{:?}",
        done.err
    );
    assert!(
        done.stderr_has("retrying in 1.0s after 503 unavailable"),
        "Retry-After honoured: {:?}",
        done.err
    );
    assert_worker_job_stored(&d, job, "succeeded").await;
}

/// Between the worker and the daemon, a proxy that fails the way networks do: the answer to
/// request number `lose` never arrives (the daemon stored the update; the connection is cut),
/// and request number `busy` never reaches the daemon (the proxy answers `503` with
/// `Retry-After: 1` itself). It logs what became of each request.
struct FlakyProxy {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl FlakyProxy {
    fn start(upstream: SocketAddr, lose: usize, busy: usize) -> FlakyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (log2, count) = (log.clone(), Arc::new(AtomicUsize::new(0)));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let (log, count) = (log2.clone(), count.clone());
                std::thread::spawn(move || {
                    let _ = relay(conn, upstream, &count, &log, lose, busy);
                });
            }
        });
        FlakyProxy { addr, log }
    }
}

fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    count: &AtomicUsize,
    log: &Mutex<Vec<String>>,
    lose: usize,
    busy: usize,
) -> io::Result<()> {
    let mut requests = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let server = TcpStream::connect(upstream)?;
    let mut answers = BufReader::new(server.try_clone()?);
    let mut to_server = server;
    while let Some(request) = read_message(&mut requests)? {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        if n == busy {
            let body = r#"{"error":"unavailable","message":"try again shortly"}"#;
            write!(
                to_client,
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                 retry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )?;
            log.lock().unwrap().push(format!("{n} 503 from the proxy"));
            continue;
        }
        to_server.write_all(&request)?;
        let Some(answer) = read_message(&mut answers)? else {
            break;
        };
        let status = String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        if n == lose {
            log.lock()
                .unwrap()
                .push(format!("{n} {status}, answer lost"));
            return to_client.shutdown(Shutdown::Both);
        }
        log.lock().unwrap().push(format!("{n} {status}"));
        to_client.write_all(&answer)?;
    }
    Ok(())
}

/// One HTTP/1.1 message with a Content-Length body (what httpx and progressd send here), or
/// None at the end of the connection.
fn read_message(from: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut message = Vec::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if from.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        message.extend_from_slice(line.as_bytes());
        if line == "\r\n" {
            break;
        }
    }
    let head = message.len();
    message.resize(head + length, 0);
    from.read_exact(&mut message[head..])?;
    Ok(Some(message))
}

// ---------------------------------------------------------------------------------------
// The browser page, in headless Chromium.

/// Serves examples/browser/index.html at every path of a port on 127.0.0.1, the page's own
/// origin, which is returned. EventSource then makes cross-origin requests to the daemon,
/// which `--cors-origin <this origin>` lets through. (A file:// page has the origin `null`,
/// which `--cors-origin` does not accept.)
fn serve_page() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let page = std::fs::read(root().join("examples/browser/index.html")).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let Ok(reader) = conn.try_clone() else {
                continue;
            };
            if let Ok(Some(_)) = read_message(&mut BufReader::new(reader)) {
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n",
                    page.len()
                )
                .and_then(|()| conn.write_all(&page));
            }
        }
    });
    origin
}

/// tests/browser/example_page.mjs on the page at `url`: it prints what the page shows, as a
/// JSON line, each time that changes, and exits once the page's stream is closed.
fn browser(url: &str) -> Run {
    require_browser();
    let mut cmd = Command::new("node");
    cmd.arg(root().join("tests/browser/example_page.mjs"))
        .arg(url);
    Run::spawn("example_page.mjs", cmd)
}

fn shown(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or(Value::Null)
}

#[tokio::test]
async fn the_browser_page_shows_a_job_and_resumes_after_a_restart() {
    let origin = serve_page();
    let (dir, d) = daemon(&["--cors-origin", &origin]);
    let job = "web-1";
    let mut page = browser(&format!("{origin}/?url={}&job={job}", d.base));
    page.wait_out("the page's stream open", |l| {
        shown(l)["connection"] == "open"
    });
    d.publish_ok(
        job,
        json!({"status": "running", "percent": 40, "stage": "compile", "message": "3 of 8"}),
    )
    .await;
    page.wait_out("40% shown", |l| shown(l)["label"] == "40%");

    // EventSource reconnects by itself, through CORS, with Last-Event-ID.
    let addr = d.addr;
    assert_eq!(d.terminate(), Some(0));
    page.wait_out("the page reconnecting", |l| {
        shown(l)["connection"] == "reconnecting"
    });
    let d = daemon_at(addr, &dir.path().join("data"), &["--cors-origin", &origin]);
    d.publish_ok(job, json!({"percent": 75, "stage": "test"}))
        .await;
    d.publish_ok(job, json!({"status": "succeeded", "message": "all green"}))
        .await;

    let done = page.finish();
    done.expect_code(0);
    assert_eq!(
        shown(done.out.last().unwrap()),
        json!({"connection": "closed", "status": "succeeded", "percent": 75, "label": "75%",
               "stage": "test", "message": "all green"}),
        "{}",
        transcript(&done.out, &done.err)
    );
}

const SECRET: &[u8] = b"examples-test-secret-of-at-least-32-bytes";

/// An HS256 token for the daemon's secret, valid for an hour.
fn token(grant: Value) -> String {
    let exp = (SystemTime::now() + Duration::from_secs(3600))
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"progressd": grant, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

#[tokio::test]
async fn with_auth_on_every_recipe_sends_its_token() {
    let origin = serve_page();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), SECRET).unwrap();
    let secret_path = secret.path().to_str().unwrap();
    let (_dir, d) = daemon(&["--jwt-secret-file", secret_path, "--cors-origin", &origin]);
    let job = "auth-1";
    let reader = token(json!({"subscribe": [job]}));
    let writer = token(json!({"publish": ["auth-*"]}));

    // Without a token, or with one that may not read the job, the consumers are refused.
    let mut refused = Run::spawn("consumer.py, no token", py_consumer(job, &d.base));
    let mut cmd = node_consumer(job, &d.base);
    cmd.env("PROGRESSD_TOKEN", &writer);
    let mut refused_node = Run::spawn("consumer.mjs, publish-only token", cmd);
    refused.wait_for(Pipe::Err, "401", |l| l.contains("401"));
    refused_node.wait_for(Pipe::Err, "403", |l| l.contains("403"));
    refused.finish().expect_code(4);
    refused_node.finish().expect_code(4);
    let mut cmd = worker(job, &d.base);
    cmd.env("PROGRESSD_TOKEN", &reader);
    let denied = Run::spawn("worker.py, read-only token", cmd).finish();
    denied.expect_code(1);
    assert!(denied.stderr_has("403 forbidden"), "{:?}", denied.err);

    // With one: the consumers by header, the page by ?access_token=, the worker by header.
    let watching = consumers(job, &d.base, Some(&reader));
    let mut page = browser(&format!(
        "{origin}/?url={}&job={job}&access_token={reader}",
        d.base
    ));
    page.wait_out("the page's stream open", |l| {
        shown(l)["connection"] == "open"
    });
    let mut cmd = worker(job, &d.base);
    cmd.env("PROGRESSD_TOKEN", &writer);
    let w = Run::spawn("worker.py", cmd).finish();
    w.expect_code(0);
    assert_eq!(worker_seqs(&w), [1, 2, 3, 4, 5]);
    for run in watching {
        run.finish()
            .expect_code(0)
            .expect_out(&worker_job_seen("succeeded"));
    }
    let done = page.finish();
    done.expect_code(0);
    assert_eq!(
        shown(done.out.last().unwrap()),
        json!({"connection": "closed", "status": "succeeded", "percent": 100, "label": "100%",
               "stage": "step 3", "message": "job succeeded"}),
        "{}",
        transcript(&done.out, &done.err)
    );
}

// ---------------------------------------------------------------------------------------
// README.md, "Try it": each one-liner against a live daemon.

/// The commands of the ```sh block under "## Try it" (continuation lines joined), each with
/// the output documented on the comment line after it (`# {...}`), if any.
fn try_it_commands() -> Vec<(String, Option<String>)> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let block: Vec<&str> = readme
        .lines()
        .skip_while(|l| *l != "## Try it")
        .skip_while(|l| *l != "```sh")
        .skip(1)
        .take_while(|l| *l != "```")
        .collect();
    assert!(
        !block.is_empty(),
        "README.md: no ```sh block under ## Try it"
    );
    let mut commands: Vec<(String, Option<String>)> = Vec::new();
    let mut pending = String::new();
    for line in block {
        let line = line.trim_end();
        if !pending.is_empty() {
            pending.push('\n');
        }
        pending.push_str(line);
        if line.ends_with('\\') {
            continue;
        }
        let text = std::mem::take(&mut pending);
        let trimmed = text.trim();
        if let Some(comment) = trimmed.strip_prefix('#') {
            let comment = comment.trim();
            if comment.starts_with('{') {
                if let Some(last) = commands.last_mut() {
                    last.1 = Some(comment.to_owned());
                }
            }
        } else if !trimmed.is_empty() {
            commands.push((text, None));
        }
    }
    commands
}

/// The `(event, id)` of each event in a curl'd SSE stream (an `end` has no id).
fn sse_events(lines: &[String]) -> Vec<(String, String)> {
    let mut events = Vec::new();
    let (mut event, mut id) = (None, String::new());
    for line in lines {
        let field = |name: &str| {
            let value = line.strip_prefix(name)?.strip_prefix(':')?;
            Some(value.strip_prefix(' ').unwrap_or(value).to_owned())
        };
        if line.is_empty() {
            if let Some(event) = event.take() {
                events.push((event, std::mem::take(&mut id)));
            }
        } else if let Some(value) = field("event") {
            event = Some(value);
        } else if let Some(value) = field("id") {
            id = value;
        }
    }
    events
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn the_readme_try_it_one_liners_work() {
    let (_dir, d) = daemon(&[]);
    let here = d.addr.to_string();
    let commands = try_it_commands();
    let (mut plain, mut streams, mut sockets) = (0, 0, 0);
    for (command, documented) in commands {
        let command = command.replace("localhost:7700", &here);
        let shell = |name: &str, cmd: &str| {
            let mut sh = Command::new("sh");
            sh.args(["-c", cmd]);
            Run::spawn(name, sh)
        };
        if command.contains("websocat") {
            sockets += 1;
            if !have("websocat") {
                eprintln!("websocat is not installed; not run: {command}");
                continue;
            }
            // The job is over by now: the server sends its frames and closes (websocat may
            // still wait for its input: at most 5 s).
            let quoted = command.replace('\'', r"'\''");
            let done = shell(&command, &format!("timeout 5 sh -c '{quoted}'")).finish();
            assert!(
                matches!(done.code, Some(0 | 124)),
                "{command}: {}",
                transcript(&done.out, &done.err)
            );
            let frames = done.out.join("\n");
            assert!(
                frames.contains(r#""type":"end""#),
                "{command}: {}",
                transcript(&done.out, &done.err)
            );
        } else if let Some(rest) = command.strip_prefix("curl -N ") {
            // Streams: at most two seconds each. Once one is open, an event of another build-
            // job, which only the many-jobs stream carries.
            streams += 1;
            let mut run = shell(&command, &format!("curl --max-time 2 -N {rest}"));
            run.wait_out("retry:", |l| l.starts_with("retry:"));
            let (status, published) = d.publish("build-43", json!({"percent": 1})).await;
            assert_eq!(status, StatusCode::CREATED);
            let done = run.finish();
            let events = sse_events(&done.out);
            let expected = if rest.contains("/v1/stream") {
                done.expect_code(28); // the stream stays open: curl's own time limit
                vec![("progress", published["offset"].to_string())]
            } else if rest.contains("Last-Event-ID: 1") {
                done.expect_code(0);
                vec![
                    ("progress", "2".to_owned()),
                    ("progress", "3".to_owned()),
                    ("end", String::new()),
                ]
            } else {
                done.expect_code(0);
                vec![("snapshot", "3".to_owned()), ("end", String::new())]
            };
            let expected: Vec<(String, String)> = expected
                .into_iter()
                .map(|(event, id)| (event.to_owned(), id))
                .collect();
            assert_eq!(events, expected, "{command}\n{}", done.out.join("\n"));
        } else {
            // Other curls: the status code on a last line of its own.
            plain += 1;
            assert!(
                command.starts_with("curl "),
                "unexpected command: {command}"
            );
            let cmd = command.replacen("curl ", "curl -w '\\n%{http_code}' ", 1);
            let mut done = shell(&command, &cmd).finish();
            done.expect_code(0);
            let code: u16 = done.out.pop().unwrap_or_default().parse().unwrap();
            let body = done.out.join("\n");
            assert!((200..300).contains(&code), "{command}: {code} {body}");
            if let Some(documented) = documented {
                assert_eq!(body, documented, "{command}: the documented answer");
            }
            // A trailing `# 204` documents the status.
            if let Some(status) = command
                .rsplit_once(" # ")
                .and_then(|(_, c)| c.trim().parse::<u16>().ok())
            {
                assert_eq!(code, status, "{command}: the documented status");
            }
        }
    }
    assert_eq!(
        (plain, streams, sockets),
        (6, 3, 2),
        "README.md's Try it has changed"
    );
    // The last one-liner deleted the job.
    let (status, _) = d.get("/v1/jobs/build-42").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
