//! Storage faults: a store that refuses writes, and a data directory that cannot be opened.

mod common;

use std::process::Command;

use common::{step, Api, Daemon, Process};
use progressd::store::Faults;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_write_gets_503_keeps_readers_and_recovers_by_itself() {
    let faults = Faults::default();
    let switch = faults.clone();
    let d = Daemon::with(move |c| c.faults = faults).await;
    for i in 1..=3 {
        d.publish_ok("j", step(i)).await;
    }
    let (_, mut live) = d.sse("/v1/jobs/j/stream", None).await;
    assert_eq!(live.expect().await.id, "3");

    switch.set_fail_writes(true);
    // Every publish is refused, none acknowledged; after a few the daemon is not ready.
    for i in 4..=7 {
        let (status, body) = d.publish("j", step(i)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"], "unavailable");
    }
    let (status, _) = d.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Readers keep working.
    let (status, snap) = d.get("/v1/jobs/j").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(snap["seq"], 3);
    assert_eq!(d.history("j").await.len(), 3);
    let metrics = d.metrics().await;
    assert!(
        metrics.contains("progressd_task_failures_total{task=\"writer\"}"),
        "{metrics}"
    );

    // Writes work again: publishing resumes by itself, densely, and the live stream gets it.
    switch.set_fail_writes(false);
    assert_eq!(d.publish_ok("j", step(4)).await, 4);
    assert_eq!(live.expect().await.id, "4");
    let (status, _) = d.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    let seqs: Vec<u64> = d
        .history("j")
        .await
        .iter()
        .map(|e| e["current"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4],
        "nothing stored was damaged or duplicated"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_in_use_is_refused_with_a_message_that_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let first = Process::start(dir.path(), &[]);
    first.publish_ok("j", json!({"percent": 1})).await;
    let second = Command::new(env!("CARGO_BIN_EXE_progressd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&dir.path().display().to_string()),
        "names the dir: {err}"
    );
    assert!(err.contains("another process"), "says what to do: {err}");
    // The first one was not disturbed.
    let (status, snap) = first.get("/v1/jobs/j").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(snap["seq"], 1);
    assert_eq!(first.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_refused_not_served_empty() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Process::start(dir.path(), &[]);
    for i in 1..=5 {
        daemon.publish_ok("j", step(i)).await;
    }
    assert_eq!(daemon.terminate(), Some(0));
    // Garble sled's main file, as a bad disk would.
    let db = dir.path().join("db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    let garbage: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&db, garbage).unwrap();
    // Started under `timeout`: a daemon that serves instead of refusing shows up as 124.
    let start = || {
        Command::new("timeout")
            .arg("20")
            .arg(env!("CARGO_BIN_EXE_progressd"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let out = start();
    assert_eq!(
        out.status.code(),
        Some(1),
        "refused, not served (124 would be a hang)"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("damaged"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(err.contains("progressd import"), "says what to do: {err}");
    // It stays refused: nothing "repaired" the store behind the operator's back.
    let again = start();
    assert_eq!(again.status.code(), Some(1));
}
