//! What survives: a graceful restart (SIGTERM), a kill -9 after a 201 in sync mode, and
//! retention by count and by time dropping what it should and nothing else.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{step, Api, Daemon, Process};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_restart_loses_nothing_and_seq_continues_densely() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Process::start(dir.path(), &[]);
    for i in 1..=20 {
        daemon.publish_ok("j", step(i)).await;
    }
    daemon.publish_ok("k", json!({"stage": "other"})).await;
    // A subscriber connected across the restart resumes by Last-Event-ID with no gap.
    let (_, mut sse) = daemon.sse("/v1/jobs/j/stream", None).await;
    assert_eq!(sse.expect().await.id, "20");
    assert_eq!(daemon.terminate(), Some(0), "clean exit on SIGTERM");
    sse.expect_closed().await;

    let daemon = Process::start(dir.path(), &[]);
    for i in 21..=30 {
        assert_eq!(daemon.publish_ok("j", step(i)).await, i);
    }
    let (_, mut resumed) = daemon.sse("/v1/jobs/j/stream", Some("20")).await;
    for i in 21..=30 {
        let ev = resumed.expect().await;
        assert_eq!(ev.id, i.to_string());
        assert_eq!(ev.data["current"], i);
    }
    let events = daemon.history("j").await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    // Offsets stay strictly increasing across the restart.
    let offsets: Vec<u64> = events
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    assert_eq!(
        offsets[20], 22,
        "k's event took offset 21 before the restart"
    );
    let (_, k) = daemon.get("/v1/jobs/k").await;
    assert_eq!(k["stage"], "other");
    assert_eq!(daemon.terminate(), Some(0));
}

/// Publishers hammer the daemon; it is killed with SIGKILL at `after`; every publish whose
/// 201 arrived must be there after restart, same seq, same content, seqs dense, snapshot the
/// fold of the events.
async fn kill_under_load(after: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Process::start(dir.path(), &["--durability", "sync"]);
    let acked: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut publishers = Vec::new();
    for p in 0..4 {
        let (http, base, acked) = (daemon.http.clone(), daemon.base.clone(), Arc::clone(&acked));
        let ack_tx = ack_tx.clone();
        publishers.push(tokio::spawn(async move {
            let job = format!("job-{p}");
            for i in 1.. {
                let body = if i % 5 == 0 {
                    json!([step(i * 10), step(i * 10 + 1)])
                } else {
                    step(i * 10)
                };
                let res = http
                    .post(format!("{base}/v1/jobs/{job}/events"))
                    .json(&body)
                    .send()
                    .await;
                // Once the daemon is gone, requests fail: that is the end of the run.
                let Ok(res) = res else { return };
                if res.status() != StatusCode::CREATED {
                    return;
                }
                let Ok(ack) = res.json::<Value>().await else {
                    return;
                };
                acked
                    .lock()
                    .unwrap()
                    .entry(job.clone())
                    .or_default()
                    .push(ack["seq"].as_u64().unwrap());
                let _ = ack_tx.send(());
            }
        }));
    }
    // Wait until real load is flowing (20 acknowledgements), then pick the moment to kill.
    for _ in 0..20 {
        ack_rx.recv().await.unwrap();
    }
    tokio::time::sleep(after).await;
    daemon.kill();
    for p in publishers {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let daemon = Process::start(dir.path(), &[]);
    for (job, seqs) in &acked {
        let events = daemon.history(job).await;
        let stored: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            stored,
            (1..=stored.len() as u64).collect::<Vec<_>>(),
            "{job}: seqs dense"
        );
        let last_acked = *seqs.iter().max().unwrap();
        assert!(
            stored.len() as u64 >= last_acked,
            "{job}: acknowledged seq {last_acked} lost; store has {}",
            stored.len()
        );
        // Content matches what the publisher sent for that seq: seq n of a single update
        // carries current = 10 * i; the check is that every event is a step the publisher
        // made, in increasing order.
        let currents: Vec<u64> = events
            .iter()
            .map(|e| e["current"].as_u64().unwrap())
            .collect();
        assert!(currents.windows(2).all(|w| w[0] < w[1]), "{job}: order");
        let (_, snap) = daemon.get(&format!("/v1/jobs/{job}")).await;
        assert_eq!(
            snap["seq"],
            stored.len() as u64,
            "{job}: snapshot is the fold"
        );
        assert_eq!(snap["current"], *currents.last().unwrap());
        // And publishing continues densely.
        let next = daemon.publish_ok(job, json!({"stage": "after"})).await;
        assert_eq!(next, stored.len() as u64 + 1);
    }
    assert_eq!(acked.len(), 4);
}

/// Kill -9 cycles: `PROGRESSD_KILL_CYCLES` of them (8 in CI; the recorded run in README used
/// 50), each at a different moment after load starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_201_in_sync_mode_loses_nothing() {
    let cycles: u64 = std::env::var("PROGRESSD_KILL_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    for cycle in 0..cycles {
        // Spread the moments over 0..200 ms, deterministically (a fixed multiplicative hash).
        let ms = (cycle * 2_654_435_761) % 200;
        kill_under_load(Duration::from_millis(ms)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_keeps_the_last_n_events_and_the_snapshot() {
    let d = Daemon::with(|c| c.history = 10).await;
    for i in 1..=5 {
        d.publish_ok("j", step(i)).await;
    }
    let batch: Vec<Value> = (6..=25).map(step).collect();
    d.publish_ok("j", Value::Array(batch)).await;
    d.publish_ok("other", step(1)).await;
    let events = d.history("j").await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (16..=25).collect::<Vec<_>>());
    let (_, snap) = d.get("/v1/jobs/j").await;
    assert_eq!(snap["first_seq"], 16);
    assert_eq!(snap["seq"], 25);
    assert_eq!(snap["current"], 25);
    assert_eq!(snap["stage"], "step 25");
    // Other jobs are untouched.
    assert_eq!(d.history("other").await.len(), 1);
    // Restart: the same retention state, and trimming continues from it.
    let dir = d.stop().await.unwrap();
    let d = Daemon::on(&dir.path().join("data"), |c| c.history = 10).await;
    d.publish_ok("j", step(26)).await;
    let seqs: Vec<u64> = d
        .history("j")
        .await
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (17..=26).collect::<Vec<_>>());
    d.stop().await;
}

/// Each publish's events are stored as one run; retention drops whole runs and cuts through
/// one. Concurrent batches to one job (several in one group commit, cut while still staged)
/// leave exactly the last N events, counted right, and the multi-job stream replays exactly
/// those from the log, before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_cuts_through_runs_of_concurrent_batches() {
    let d = Daemon::with(|c| c.history = 10).await;
    let batches = (0..20u64).map(|i| {
        let batch: Vec<Value> = (1..=7).map(|k| step(i * 7 + k)).collect();
        d.publish_ok("j", Value::Array(batch))
    });
    futures_util::future::join_all(batches).await;
    d.publish_ok("other", step(1)).await;
    let (mut d, mut _dir) = (d, None);
    for restarted in [false, true] {
        let events = d.history("j").await;
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (131..=140).collect::<Vec<_>>(),
            "restarted: {restarted}"
        );
        let (_, snap) = d.get("/v1/jobs/j").await;
        assert_eq!(snap["first_seq"], 131);
        assert!(
            d.metrics().await.contains("progressd_events_stored 11\n"),
            "ten of j and one of other"
        );
        // The log, from just before the first retained event: those ten, then `other`.
        let first_offset = events[0]["offset"].as_u64().unwrap();
        let (_, mut all) = d
            .sse("/v1/stream", Some(&(first_offset - 1).to_string()))
            .await;
        let mut replayed = Vec::new();
        loop {
            let ev = all.expect().await;
            assert_eq!(ev.event, "progress", "{ev:?}");
            if ev.data["job"] == "other" {
                break;
            }
            replayed.push(ev.data["seq"].as_u64().unwrap());
        }
        assert_eq!(replayed, seqs);
        if !restarted {
            let dir = d.stop().await.unwrap();
            d = Daemon::on(&dir.path().join("data"), |c| c.history = 10).await;
            _dir = Some(dir);
        }
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_expire_after_the_ttl_and_nothing_else_does() {
    let d = Daemon::with(|c| {
        c.finished_ttl = Duration::from_millis(300);
        c.gc_interval = Duration::from_millis(50);
    })
    .await;
    // Watch removals as events: no polling.
    let (_, mut log) = d.sse("/v1/stream", None).await;
    d.publish_ok("done", json!([{"percent": 100}, {"status": "succeeded"}]))
        .await;
    d.publish_ok("busy", json!({"percent": 10})).await;
    let finished_at = std::time::Instant::now();
    let mut removed = None;
    while removed.is_none() {
        let ev = log.expect().await;
        if ev.event == "deleted" {
            removed = Some(ev);
        }
    }
    assert!(
        finished_at.elapsed() >= Duration::from_millis(250),
        "not before its TTL"
    );
    let removed = removed.unwrap();
    assert_eq!(removed.data["job"], "done");
    let (status, err) = d.get("/v1/jobs/done").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["error"], "job_not_found");
    let (status, _) = d.get("/v1/jobs/done/events").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The running job stays, with its history.
    let (status, busy) = d.get("/v1/jobs/busy").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(busy["percent"], 10.0);
    assert_eq!(d.history("busy").await.len(), 1);
    // The id can be used again, from seq 1.
    assert_eq!(d.publish_ok("done", json!({"percent": 1})).await, 1);
    d.stop().await;
}
