//! The client commands (`publish`, `watch`, `wait`, `jobs`, `exec`), run as the real binary
//! against a live daemon: their output and exit codes.

mod common;

use std::process::{Output, Stdio};

use common::{Api, Daemon, Process, PATIENCE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

fn progressd(base: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_progressd"));
    cmd.env("PROGRESSD_URL", base)
        .env_remove("PROGRESSD_TOKEN")
        .kill_on_drop(true);
    cmd
}

/// Runs a client command to its end.
async fn run(base: &str, args: &[&str]) -> Output {
    let out = tokio::time::timeout(PATIENCE, progressd(base).args(args).output())
        .await
        .expect("the command hung")
        .unwrap();
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A long-running command whose stdout we read line by line.
struct Running {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Running {
    fn start(base: &str, args: &[&str]) -> Running {
        let mut child = progressd(base)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        Running {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("no output line in time")
            .unwrap()
            .expect("stdout closed")
    }

    /// The remaining lines and the exit code.
    async fn finish(mut self) -> (Vec<String>, i32) {
        let mut rest = Vec::new();
        while let Some(line) = tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("the command did not end")
            .unwrap()
        {
            rest.push(line);
        }
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .unwrap()
            .unwrap();
        (rest, status.code().unwrap())
    }
}

/// `#N` of a watch line (`<at> <job> #N …`).
fn seq_of(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix('#'))
        .and_then(|n| n.parse().ok())
}

#[tokio::test]
async fn publish_prints_the_seq_and_stores_every_field() {
    let d = Daemon::start().await;
    let out = run(
        &d.base,
        &[
            "publish",
            "deploy-1",
            "--current",
            "3",
            "--total",
            "4",
            "--stage",
            "upload",
            "--message",
            "half-way",
            "--status",
            "running",
            "--data",
            r#"{"host":"a"}"#,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "1\n");
    let out = run(&d.base, &["publish", "deploy-1", "--percent", "80"]).await;
    assert_eq!(text(&out.stdout), "2\n");

    let (_, snap) = d.get("/v1/jobs/deploy-1").await;
    assert_eq!(snap["percent"], json!(80.0));
    assert_eq!(snap["current"], json!(3));
    assert_eq!(snap["total"], json!(4));
    assert_eq!(snap["stage"], json!("upload"));
    assert_eq!(snap["message"], json!("half-way"));
    assert_eq!(snap["data"], json!({"host": "a"}));

    // The same Idempotency-Key twice stores once and prints the first seq both times.
    for _ in 0..2 {
        let out = run(
            &d.base,
            &[
                "publish",
                "deploy-1",
                "--message",
                "once",
                "--idempotency-key",
                "k-1",
            ],
        )
        .await;
        assert_eq!(text(&out.stdout), "3\n", "{}", text(&out.stderr));
    }
    assert_eq!(d.history("deploy-1").await.len(), 3);
}

#[tokio::test]
async fn publish_errors_are_one_line_and_a_failure() {
    let d = Daemon::start().await;
    d.publish_ok("done-1", json!({"status": "succeeded"})).await;
    let out = run(&d.base, &["publish", "done-1", "--percent", "5"]).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("409") && err.contains("job_finished"), "{err}");

    // Refused before any request: a bad status, JSON, or --current without --total.
    for args in [
        &["publish", "x", "--status", "done"][..],
        &["publish", "x", "--data", "{nope"],
        &["publish", "x", "--current", "3"],
    ] {
        let out = run(&d.base, args).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // An invalid id is the API's answer.
    let out = run(&d.base, &["publish", "bad id!", "--percent", "1"]).await;
    assert!(text(&out.stderr).contains("invalid_job_id"));

    // No daemon there: a clear line, not a panic.
    let out = run("http://127.0.0.1:9", &["publish", "x", "--percent", "1"]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).starts_with("progressd: http://127.0.0.1:9"));
}

#[tokio::test]
async fn jobs_lists_a_table_and_json_lines_with_filters() {
    let d = Daemon::start().await;
    d.publish_ok("build-1", json!({"percent": 40, "stage": "compile"}))
        .await;
    d.publish_ok("build-2", json!({"status": "succeeded"}))
        .await;
    d.publish_ok("other-1", json!({"status": "queued"})).await;

    let out = run(&d.base, &["jobs"]).await;
    assert!(out.status.success());
    let table = text(&out.stdout);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(rows[0].starts_with("JOB") && rows[0].contains("PERCENT"));
    assert!(rows[1].starts_with("build-1") && rows[1].contains("running"));
    assert!(rows[1].contains("40%") && rows[1].contains("compile"));
    assert!(rows[1].trim_end().ends_with("s ago"), "{}", rows[1]);

    let out = run(&d.base, &["jobs", "--prefix", "build-", "--json"]).await;
    let jobs: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = jobs.iter().map(|j| j["job"].as_str().unwrap()).collect();
    assert_eq!(ids, ["build-1", "build-2"]);

    let out = run(&d.base, &["jobs", "--status", "succeeded", "--json"]).await;
    assert_eq!(text(&out.stdout).lines().count(), 1);
    assert!(text(&out.stdout).contains("\"build-2\""));

    // Paging: more jobs than one page holds, all listed once.
    for i in 0..30 {
        d.publish_ok(&format!("page-{i:02}"), json!({"percent": i}))
            .await;
    }
    let out = run(
        &d.base,
        &["jobs", "--prefix", "page-", "--json", "--limit", "25"],
    )
    .await;
    assert_eq!(text(&out.stdout).lines().count(), 25);
}

#[tokio::test]
async fn wait_exits_with_the_outcome() {
    let d = Daemon::start().await;
    d.publish_ok("ok", json!({"status": "succeeded"})).await;
    d.publish_ok("bad", json!({"status": "failed"})).await;
    d.publish_ok("stop", json!({"status": "cancelled"})).await;
    for (job, code, said) in [
        ("ok", 0, "succeeded"),
        ("bad", 1, "failed"),
        ("stop", 2, "cancelled"),
    ] {
        let out = run(&d.base, &["wait", job]).await;
        assert_eq!(out.status.code(), Some(code), "{job}");
        assert_eq!(text(&out.stdout).trim(), said);
    }

    // A running job: the timeout, with the state it was in.
    d.publish_ok("slow", json!({"percent": 30})).await;
    let out = run(&d.base, &["wait", "slow", "--timeout", "2s"]).await;
    assert_eq!(out.status.code(), Some(124));
    assert!(text(&out.stderr).contains("slow still running at 30%"));

    // It ends while we wait: the stream carries it to us.
    let waiting = Running::start(&d.base, &["wait", "slow"]);
    d.publish_ok("slow", json!({"status": "succeeded"})).await;
    let (lines, code) = waiting.finish().await;
    assert_eq!((lines, code), (vec!["succeeded".to_owned()], 0));

    // No daemon: exit 3 once --reconnect-for runs out.
    let out = run(
        "http://127.0.0.1:9",
        &["wait", "x", "--reconnect-for", "300ms"],
    )
    .await;
    assert_eq!(out.status.code(), Some(3));
}

#[tokio::test]
async fn watch_prints_a_line_per_event_and_json_on_request() {
    let d = Daemon::start().await;
    d.publish_ok(
        "w",
        json!({"status": "running", "percent": 10, "stage": "fetch"}),
    )
    .await;
    let mut watch = Running::start(&d.base, &["watch", "w"]);
    let first = watch.line().await;
    assert!(
        first.contains(" w #1 running 10% [fetch]"),
        "the current state first: {first}"
    );
    d.publish_ok("w", json!({"current": 1, "total": 2, "message": "half"}))
        .await;
    let line = watch.line().await;
    assert!(line.ends_with(" w #2 50% (1/2) half"), "{line}");
    d.publish_ok("w", json!({"status": "failed"})).await;
    let (rest, code) = watch.finish().await;
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert!(rest[0].ends_with(" w #3 failed"));
    assert_eq!(rest[1], "w failed");
    assert_eq!(code, 1);

    // --json --after 0: the whole history as {"event","data"} lines, then the end.
    let out = run(&d.base, &["watch", "w", "--json", "--after", "0"]).await;
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["progress", "progress", "progress", "end"]);
    assert_eq!(lines[1]["data"]["seq"], json!(2));
    assert_eq!(lines[3]["data"], json!({"job": "w", "status": "failed"}));

    // Deleted while watched: exit 4.
    d.publish_ok("gone", json!({"percent": 1})).await;
    let mut watch = Running::start(&d.base, &["watch", "gone"]);
    watch.line().await;
    let res = d.http.delete(d.url("/v1/jobs/gone")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let (rest, code) = watch.finish().await;
    assert_eq!((rest, code), (vec!["gone deleted".to_owned()], 4));
}

/// The daemon restarts under a running `watch`: it reconnects with Last-Event-ID and prints
/// every event exactly once, in order.
#[tokio::test]
async fn watch_resumes_across_a_daemon_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Process::start(&data, &[]);
    let addr = daemon.addr.to_string();
    let base = daemon.base.clone();
    daemon.publish_ok("r", common::step(1)).await;

    let mut watch = Running::start(&base, &["watch", "r"]);
    let mut seen = vec![seq_of(&watch.line().await).unwrap()];
    for i in 2..=5 {
        daemon.publish_ok("r", common::step(i)).await;
        seen.push(seq_of(&watch.line().await).unwrap());
    }
    assert_eq!(daemon.terminate(), Some(0));
    // Published while the daemon is down for the watcher: 6 and 7 land before it reconnects
    // or after; either way it must print them once.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_progressd"));
    cmd.args(["serve", "--listen", &addr, "--data-dir"])
        .arg(&data);
    let daemon = Process::spawn(cmd);
    for i in 6..=9 {
        daemon.publish_ok("r", common::step(i)).await;
    }
    let mut last = common::step(10);
    last["status"] = json!("succeeded");
    daemon.publish_ok("r", last).await;
    let (rest, code) = watch.finish().await;
    assert_eq!(code, 0, "{rest:?}");
    assert_eq!(rest.last().map(String::as_str), Some("r succeeded"));
    seen.extend(rest.iter().filter_map(|l| seq_of(l)));
    assert_eq!(seen, (1..=10).collect::<Vec<_>>(), "{rest:?}");
}

#[tokio::test]
async fn exec_reports_output_as_progress_and_keeps_the_exit_code() {
    let d = Daemon::start().await;
    // The command echoes what we feed it, so each line is published before the next is sent.
    let mut child = progressd(&d.base)
        .args([
            "exec",
            "ex-1",
            "--interval",
            "10ms",
            "--stage",
            "import",
            "--",
            "sh",
            "-c",
            r#"while read l; do echo "$l"; done; echo "to stderr" >&2; exit 3"#,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (_, mut live) = d.sse("/v1/jobs/ex-1/stream?after=0", None).await;
    let started = live.expect().await;
    assert_eq!(started.data["status"], json!("running"));
    assert!(started.data["message"]
        .as_str()
        .unwrap()
        .starts_with("$ sh -c"));
    stdin.write_all(b"rows 1/4\n").await.unwrap();
    let ev = live.expect().await;
    assert_eq!(
        (&ev.data["current"], &ev.data["total"], &ev.data["stage"]),
        (&json!(1), &json!(4), &json!("import"))
    );
    assert_eq!(ev.data["message"], json!("rows 1/4"));
    stdin.write_all(b"copying 75%\n").await.unwrap();
    let ev = live.expect().await;
    assert_eq!(ev.data["percent"], json!(75.0));
    drop(stdin);

    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "the command's own exit code");
    assert_eq!(text(&out.stdout), "rows 1/4\ncopying 75%\n");
    assert!(text(&out.stderr).contains("to stderr"));
    let (_, snap) = d.get("/v1/jobs/ex-1").await;
    assert_eq!(snap["status"], json!("failed"));
    assert_eq!(snap["data"], json!({"exit_code": 3}));
    assert_eq!(snap["percent"], json!(75.0));

    // Success, and a command that does not exist (the shell's 127).
    let out = run(&d.base, &["exec", "ex-2", "--", "sh", "-c", "echo 3/3"]).await;
    assert_eq!(out.status.code(), Some(0));
    let (_, snap) = d.get("/v1/jobs/ex-2").await;
    assert_eq!(snap["status"], json!("succeeded"));
    assert_eq!((&snap["current"], &snap["total"]), (&json!(3), &json!(3)));
    let out = run(&d.base, &["exec", "ex-3", "--", "/nonexistent/tool"]).await;
    assert_eq!(out.status.code(), Some(127));
    let (_, snap) = d.get("/v1/jobs/ex-3").await;
    assert_eq!(snap["status"], json!("failed"));

    // The daemon unreachable: the command still runs, with its own exit code.
    let out = run(
        "http://127.0.0.1:9",
        &["exec", "ex-4", "--", "sh", "-c", "echo hi; exit 5"],
    )
    .await;
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(text(&out.stdout), "hi\n");
    assert!(text(&out.stderr).contains("cannot report progress of ex-4"));
}
