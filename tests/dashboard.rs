//! The dashboard at `/`: served with its headers and the usual 405 (in-process), and followed
//! in a real browser across a daemon restart.
//!
//! The browser half is `tests/browser/dashboard.mjs`: Debian's chromium driven by
//! playwright-core (pinned in `tests/browser/package.json`). This test owns the daemon: it
//! starts it, runs the script against it, and restarts it (SIGTERM, then the same data dir
//! and port) when the script prints `restart`, answering `restarted`. Both are needed on the
//! machine (CI: `apt-get install -y chromium nodejs`, `npm ci --prefix tests/browser`); a
//! missing one fails the test with what to install, never skips it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Daemon, Process, PATIENCE};
use reqwest::StatusCode;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_without_a_token_under_a_strict_policy() {
    let d = Daemon::start().await;
    let res = d.http.get(d.url("/")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let header = |name: &str| res.headers()[name].to_str().unwrap().to_owned();
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    assert_eq!(header("cache-control"), "no-cache");
    assert_eq!(header("x-content-type-options"), "nosniff");
    let csp = header("content-security-policy");
    for directive in [
        "default-src 'none'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    let page = res.text().await.unwrap();
    assert_eq!(page, progressd::dashboard::PAGE);
    // Self-contained: nothing is fetched from another origin.
    for external in [
        "http://",
        "https://",
        "//cdn",
        "<link rel=\"stylesheet\"",
        "src=",
    ] {
        assert!(!page.contains(external), "the page refers to {external}");
    }

    let head = d.http.head(d.url("/")).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-type"], "text/html; charset=utf-8");
    assert!(head.bytes().await.unwrap().is_empty());

    let post = d.http.post(d.url("/")).send().await.unwrap();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers()["allow"], "GET, HEAD");
    let body: Value = post.json().await.unwrap();
    assert_eq!(body["error"], "method_not_allowed");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_needs_no_token_but_the_api_does() {
    let d =
        Daemon::with(|c| c.jwt_secret = Some(b"0123456789abcdef0123456789abcdef".to_vec())).await;
    let page = d.http.get(d.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let list = d.http.get(d.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(list.status(), StatusCode::UNAUTHORIZED);
    d.stop().await;
}

/// Publish, watch the list and the detail view, restart the daemon under the open page, see
/// it reconnect and resume with every job and event exactly once, through to `succeeded`;
/// then pages opened on a finished job and on a job being published to.
#[test]
fn a_real_browser_follows_jobs_live_across_a_daemon_restart() {
    // The `retry:` the stopping daemon sends keeps the page away for a second, so the script
    // publishes while it is gone and the update must come from the replay.
    browser_scenario("restart", &["--retry", "1s"], &[]);
}

/// With auth on: the page asks for a token, keeps it in the `progressd_token` cookie and
/// streams with it (the list and the stream show only the token's jobs); `?access_token=`
/// in the page's URL works too.
#[test]
fn a_real_browser_asks_for_a_token_and_streams_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "an HS256 secret of at least 32 bytes, for the dashboard test";
    let file = dir.path().join("secret");
    std::fs::write(&file, secret).unwrap();
    let file = file.to_str().unwrap();
    browser_scenario(
        "auth",
        &["--jwt-secret-file", file],
        &[("PROGRESSD_SECRET", secret)],
    );
}

/// Runs `SCENARIO=<scenario> node tests/browser/dashboard.mjs` against a daemon started with
/// `args`, restarting the daemon (same data dir, same port) whenever the script asks.
fn browser_scenario(scenario: &str, args: &[&str], env: &[(&str, &str)]) {
    let browser = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        browser.exists(),
        "{} is missing: this test drives a real browser (apt-get install -y chromium, or set \
         CHROMIUM to one)",
        browser.display()
    );
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        scripts.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: npm ci --prefix tests/browser"
    );

    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut daemon = Some(Process::start(&data, args));
    let addr = daemon.as_ref().unwrap().addr;

    let mut env = env.to_vec();
    env.push(("SCENARIO", scenario));
    let mut node = Node::start(&scripts, &daemon.as_ref().unwrap().base, &browser, &env);
    let outcome = (|| -> Result<(), String> {
        loop {
            match node.line()?.as_str() {
                "restart" => {
                    let old = daemon.take().unwrap();
                    if old.terminate() != Some(0) {
                        return Err("the daemon did not stop cleanly".into());
                    }
                    let mut cmd = Command::new(env!("CARGO_BIN_EXE_progressd"));
                    cmd.args(["serve", "--listen", &addr.to_string(), "--data-dir"])
                        .arg(&data)
                        .args(args);
                    daemon = Some(Process::spawn(cmd));
                    node.send("restarted")?;
                }
                "ok" => return Ok(()),
                other => return Err(format!("unexpected line from the script: {other:?}")),
            }
        }
    })();
    let (success, log) = node.finish(outcome.is_err());
    if let Err(e) = outcome {
        panic!("{e}\n--- dashboard.mjs ({scenario}) ---\n{log}");
    }
    assert!(
        success,
        "dashboard.mjs ({scenario}) failed\n--- dashboard.mjs ---\n{log}"
    );
    println!("{log}{scenario}: {:.1?}", started.elapsed());
}

/// `node dashboard.mjs`, talked to in lines; its stderr is kept for the failure message.
struct Node {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    log: Option<JoinHandle<String>>,
}

impl Node {
    fn start(scripts: &Path, base: &str, browser: &Path, env: &[(&str, &str)]) -> Node {
        let mut child = Command::new("node")
            .arg("dashboard.mjs")
            .current_dir(scripts)
            .env("PROGRESSD_URL", base)
            .env("CHROMIUM", browser)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("node is needed for the browser test (Node.js 18+): {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Node {
            stdin: child.stdin.take(),
            child,
            lines,
            log: Some(log),
        }
    }

    /// The script's next line; an error if it ends or goes quiet.
    fn line(&self) -> Result<String, String> {
        self.lines
            .recv_timeout(PATIENCE + Duration::from_secs(10))
            .map_err(|e| format!("no line from dashboard.mjs ({e})"))
    }

    fn send(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("writing to dashboard.mjs: {e}"))
    }

    /// Waits for the script (killing it first if `kill`); whether it succeeded, and its log.
    fn finish(&mut self, kill: bool) -> (bool, String) {
        self.stdin.take();
        if kill {
            let _ = self.child.kill();
        }
        let success = self.child.wait().map(|s| s.success()).unwrap_or(false);
        let log = self
            .log
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (success, log)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
