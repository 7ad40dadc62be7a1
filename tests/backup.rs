//! Backups while running: export from a live daemon, import into a fresh data dir, and get
//! every job, snapshot and retained event back exactly.

mod common;

use std::path::Path;
use std::process::Command;

use common::{step, Api, Daemon};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// `progressd import FILE --data-dir DIR`, which must succeed.
fn import(file: &Path, dir: &Path) {
    let out = progressd(&["import", file.to_str().unwrap()], Some(dir));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn progressd(args: &[&str], dir: Option<&Path>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_progressd"));
    cmd.args(args);
    if let Some(dir) = dir {
        cmd.arg("--data-dir").arg(dir);
    }
    cmd.output().unwrap()
}

async fn everything(d: &Daemon) -> (Value, Vec<Vec<Value>>) {
    let (status, list) = d.get("/v1/jobs?limit=1000").await;
    assert_eq!(status, StatusCode::OK);
    let mut histories = Vec::new();
    for job in list["jobs"].as_array().unwrap() {
        histories.push(d.history(job["job"].as_str().unwrap()).await);
    }
    (list, histories)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_reproduces_every_job_snapshot_and_event() {
    let d = Daemon::with(|c| c.history = 5).await;
    let batch: Vec<Value> = (1..=12).map(step).collect();
    d.publish_ok("a-trimmed", Value::Array(batch)).await;
    d.publish_ok("b:done", json!({"percent": 100, "data": null}))
        .await;
    d.publish_ok("b:done", json!({"status": "succeeded", "message": "ok"}))
        .await;
    d.publish_ok(
        "c",
        json!({"data": {"nested": [1, "two", {"three": 3.5}]}, "stage": "é ✓"}),
    )
    .await;
    d.publish_ok("gone", json!({"percent": 1})).await;
    let res = d.http.delete(d.url("/v1/jobs/gone")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    // Many jobs, so the export spans several pages.
    for i in 0..230 {
        d.publish_ok(&format!("many-{i:03}"), json!({"current": i, "total": 230}))
            .await;
    }
    let before = everything(&d).await;

    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("backup.jsonl");
    let base = d.base.clone();
    let file_arg = file.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        progressd(&["export", "--url", &base, "--output", &file_arg], None)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("exported 233 jobs"));
    // The original keeps running: publishing goes on after the export.
    d.publish_ok("c", json!({"percent": 50})).await;
    d.stop().await;

    let restored = work.path().join("restored");
    import(&file, &restored);
    // Never into a store that holds jobs.
    let again = progressd(&["import", file.to_str().unwrap()], Some(&restored));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("empty"));

    let r = Daemon::on(&restored, |c| c.history = 5).await;
    let after = everything(&r).await;
    assert_eq!(before.0, after.0, "snapshots");
    assert_eq!(
        before.1, after.1,
        "retained events, with their seqs, offsets and times"
    );
    let (status, _) = r.get("/v1/jobs/gone").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The restored store goes on densely, with offsets above everything imported.
    let (_, ack) = r.publish("a-trimmed", step(13)).await;
    assert_eq!(ack["seq"], 13);
    let newest = before
        .1
        .iter()
        .flatten()
        .map(|e| e["offset"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(ack["offset"].as_u64().unwrap() > newest);
    let (status, _) = r.publish("b:done", json!({"percent": 1})).await;
    assert_eq!(status, StatusCode::CONFLICT, "finished stays finished");
    // Resuming a per-job stream within the retained range works as before.
    let (_, mut sse) = r.sse("/v1/jobs/a-trimmed/stream", Some("10")).await;
    assert_eq!(sse.expect().await.id, "11");
    r.stop().await;
}

/// An import joins consecutive events into runs, but none larger than one publish could
/// make: a job of 5,000 events with 4 KiB messages (20 MiB, over the store's record limit as
/// one run) imports and reads back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_job_imports_in_runs_a_publish_could_make() {
    // A real export of one event is the template for the long one.
    let d = Daemon::start().await;
    d.publish_ok("long", json!({"current": 1, "message": "m"}))
        .await;
    let work = tempfile::tempdir().unwrap();
    let one = work.path().join("one.jsonl");
    let (base, one_arg) = (d.base.clone(), one.to_str().unwrap().to_owned());
    let out = tokio::task::spawn_blocking(move || {
        progressd(&["export", "--url", &base, "--output", &one_arg], None)
    })
    .await
    .unwrap();
    assert!(out.status.success());
    d.stop().await;
    let lines: Vec<Value> = std::fs::read_to_string(&one)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |kind: &str| lines.iter().find(|l| l["type"] == kind).unwrap().clone();
    let (mut header, mut job, event) = (of("header"), of("job"), of("event"));
    let total = 5000u64;
    header["head"] = json!(total);
    job["job"]["seq"] = json!(total);
    let message = "m".repeat(4096);
    let mut text = format!("{header}\n{job}\n");
    for i in 1..=total {
        let mut e = event.clone();
        e["event"]["seq"] = json!(i);
        e["event"]["offset"] = json!(i);
        e["event"]["current"] = json!(i);
        e["event"]["message"] = json!(message);
        text.push_str(&format!("{e}\n"));
    }
    let long = work.path().join("long.jsonl");
    std::fs::write(&long, text).unwrap();

    let restored = work.path().join("restored");
    import(&long, &restored);
    let r = Daemon::on(&restored, |c| c.history = total).await;
    let events = r.history("long").await;
    assert_eq!(events.len(), total as usize);
    assert_eq!(events[4999]["current"], total);
    assert_eq!(events[4999]["message"].as_str().map(str::len), Some(4096));
    r.stop().await;
}
