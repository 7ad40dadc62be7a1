//! Server-Sent Events: snapshot, live, resume without gap or duplicate, reset, end, 204,
//! deleted, multi-job streams, and a slow subscriber beside a fast one.

mod common;

use std::time::Duration;

use common::{step, Api, Daemon, Sse, SseEvent};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn seq_of(e: &SseEvent) -> u64 {
    e.id.parse().unwrap()
}

/// The stream's bytes as they come, until `done` says enough.
async fn read_raw_until(res: &mut reqwest::Response, done: impl Fn(&str) -> bool) -> String {
    let mut raw = String::new();
    while !done(&raw) {
        let chunk = tokio::time::timeout(common::PATIENCE, res.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        raw.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_retry_and_keepalive_are_on_the_wire() {
    let d = Daemon::with(|c| {
        c.keepalive = Duration::from_millis(200);
        c.retry = Duration::from_millis(2500);
    })
    .await;
    let mut res = d.http.get(d.url("/v1/jobs/j/stream")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let h = res.headers();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    let raw = read_raw_until(&mut res, |raw| raw.contains(": keepalive")).await;
    assert!(raw.starts_with("retry:2500\n"), "{raw:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_subscribe_gets_snapshot_then_live_events() {
    let d = Daemon::start().await;
    d.publish_ok("j", json!([{"stage": "a"}, {"percent": 10}]))
        .await;
    let (status, mut sse) = d.sse("/v1/jobs/j/stream", None).await;
    assert_eq!(status, StatusCode::OK);
    let snap = sse.expect().await;
    assert_eq!(snap.event, "snapshot");
    assert_eq!(snap.id, "2");
    assert_eq!(snap.data["percent"], 10.0);
    assert_eq!(snap.data["stage"], "a");
    d.publish_ok("j", json!({"percent": 20})).await;
    let ev = sse.expect().await;
    assert_eq!(ev.event, "progress");
    assert_eq!(ev.id, "3");
    assert_eq!(ev.data["seq"], 3);
    assert_eq!(ev.data["job"], "j");
    assert_eq!(ev.data["percent"], 20.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_before_the_first_event_delivers_from_seq_one() {
    let d = Daemon::start().await;
    let (status, mut sse) = d.sse("/v1/jobs/later/stream", None).await;
    assert_eq!(status, StatusCode::OK);
    d.publish_ok("later", json!({"status": "queued"})).await;
    d.publish_ok("later", json!({"percent": 1})).await;
    assert_eq!(seq_of(&sse.expect().await), 1);
    assert_eq!(seq_of(&sse.expect().await), 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_job_sends_end_and_closes_then_204() {
    let d = Daemon::start().await;
    d.publish_ok("j", json!({"percent": 50})).await;
    let (_, mut live) = d.sse("/v1/jobs/j/stream", None).await;
    assert_eq!(live.expect().await.event, "snapshot");
    d.publish_ok("j", json!({"status": "failed", "message": "boom"}))
        .await;
    let ev = live.expect().await;
    assert_eq!((ev.event.as_str(), ev.id.as_str()), ("progress", "2"));
    let end = live.expect().await;
    assert_eq!(end.event, "end");
    assert_eq!(end.data, json!({"job": "j", "status": "failed"}));
    live.expect_closed().await;

    // A fresh subscribe to a finished job: snapshot, end, close.
    let (_, mut fresh) = d.sse("/v1/jobs/j/stream", None).await;
    let snap = fresh.expect().await;
    assert_eq!((snap.event.as_str(), snap.id.as_str()), ("snapshot", "2"));
    assert_eq!(snap.data["status"], "failed");
    assert_eq!(fresh.expect().await.event, "end");
    fresh.expect_closed().await;

    // Resuming at or past the end: 204, so EventSource stops reconnecting.
    let (status, _) = d.sse("/v1/jobs/j/stream", Some("2")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = d.sse("/v1/jobs/j/stream?after=2", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Past the end (the id may have been reused since): a reset, then end.
    let (status, mut past) = d.sse("/v1/jobs/j/stream", Some("5")).await;
    assert_eq!(status, StatusCode::OK);
    let reset = past.expect().await;
    assert_eq!((reset.event.as_str(), reset.id.as_str()), ("reset", "2"));
    assert_eq!(past.expect().await.event, "end");
    past.expect_closed().await;
    // Resuming before the end: the missing events, then end.
    let (status, mut behind) = d.sse("/v1/jobs/j/stream", Some("1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seq_of(&behind.expect().await), 2);
    assert_eq!(behind.expect().await.event, "end");
    behind.expect_closed().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resume_points_are_refused() {
    let d = Daemon::start().await;
    for (path, header) in [
        ("/v1/jobs/j/stream", Some("abc")),
        ("/v1/jobs/j/stream", Some("-1")),
        ("/v1/jobs/j/stream?after=1.5", None),
        ("/v1/stream", Some("x")),
    ] {
        let mut req = d.http.get(d.url(path));
        if let Some(h) = header {
            req = req.header("Last-Event-ID", h);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{path} {header:?}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "invalid_last_event_id");
    }
    let res = d
        .http
        .get(d.url("/v1/jobs/bad%20id/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_for_a_too_old_and_for_a_future_resume_point() {
    let d = Daemon::with(|c| c.history = 5).await;
    let batch: Vec<Value> = (1..=12).map(step).collect();
    d.publish_ok("j", Value::Array(batch)).await;
    let (_, snap) = d.get("/v1/jobs/j").await;
    assert_eq!(snap["first_seq"], 8);

    // Retained: 8..=12. Resuming after 7 is exact; after 6 lost seq 7.
    let (_, mut ok) = d.sse("/v1/jobs/j/stream", Some("7")).await;
    let first = ok.expect().await;
    assert_eq!((first.event.as_str(), seq_of(&first)), ("progress", 8));
    let (_, mut old) = d.sse("/v1/jobs/j/stream", Some("6")).await;
    let reset = old.expect().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.id, "12");
    assert_eq!(reset.data["seq"], 12);
    assert_eq!(reset.data["first_seq"], 8);
    // Then live, from after the reset.
    d.publish_ok("j", step(13)).await;
    assert_eq!(seq_of(&old.expect().await), 13);

    let (_, mut future) = d.sse("/v1/jobs/j/stream", Some("99")).await;
    let reset = future.expect().await;
    assert_eq!((reset.event.as_str(), reset.id.as_str()), ("reset", "13"));
    d.publish_ok("j", step(14)).await;
    assert_eq!(seq_of(&future.expect().await), 14);
    d.stop().await;
}

/// Reads a stream until seq `last`, asserting each seq comes exactly once and in order from
/// `*next`; returns early (leaving `*next` where it stopped) after `stop_after` events.
async fn read_in_order(sse: &mut Sse, next: &mut u64, last: u64, stop_after: usize) {
    let mut n = 0;
    while *next <= last && n < stop_after {
        let ev = sse.expect().await;
        match ev.event.as_str() {
            "progress" => {
                assert_eq!(seq_of(&ev), *next, "gap or duplicate");
                assert_eq!(ev.data["current"], *next);
                *next += 1;
                n += 1;
            }
            "snapshot" => *next = seq_of(&ev) + 1,
            "end" => break,
            other => panic!("unexpected {other} event: {ev:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_while_publishing_delivers_every_seq_once_in_order() {
    let d = Daemon::start().await;
    const TOTAL: u64 = 600;
    d.publish_ok("j", step(1)).await;
    let publisher = d.spawn_publisher("j", TOTAL);
    let mut next = 1;
    let mut round = 0;
    while next <= TOTAL {
        // Alternate the two ways of resuming, and a fresh first connection.
        let (status, mut sse) = match round {
            0 => d.sse("/v1/jobs/j/stream", None).await,
            r if r % 2 == 1 => {
                d.sse("/v1/jobs/j/stream", Some(&(next - 1).to_string()))
                    .await
            }
            _ => {
                d.sse(&format!("/v1/jobs/j/stream?after={}", next - 1), None)
                    .await
            }
        };
        if status == StatusCode::NO_CONTENT {
            break;
        }
        assert_eq!(status, StatusCode::OK);
        read_in_order(&mut sse, &mut next, TOTAL, 37).await;
        round += 1;
        // Dropping `sse` disconnects mid-stream.
    }
    publisher.await.unwrap();
    assert_eq!(next, TOTAL + 1, "every event was seen");
    assert!(round > 10, "the test reconnected many times ({round})");
    d.stop().await;
}

/// Until the daemon has seen every SSE subscriber go.
async fn until_no_sse_subscriber(d: &Daemon) {
    while !d
        .metrics()
        .await
        .contains("progressd_subscribers{transport=\"sse\"} 0\n")
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_drop_and_come_back_together_catch_up_from_memory() {
    let d = Daemon::start().await;
    d.publish_ok("j", step(1)).await;
    let mut gone = Vec::new();
    for _ in 0..2 {
        let (status, mut sse) = d.sse("/v1/jobs/j/stream", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(sse.expect().await.event, "snapshot");
        gone.push(sse);
    }
    for i in 2..=6 {
        d.publish_ok("j", step(i)).await;
    }
    for sse in &mut gone {
        let mut next = 2;
        read_in_order(sse, &mut next, 6, 5).await;
    }
    // Both leave, and the daemon has seen them go: the job has no subscriber.
    drop(gone);
    until_no_sse_subscriber(&d).await;
    for i in 7..=9 {
        d.publish_ok("j", step(i)).await;
    }
    // They come back (a network blip) a little behind: exactly what they missed, from the
    // job's recent events the stage kept, none read from the store.
    for resume in ["4", "5"] {
        let (status, mut sse) = d.sse("/v1/jobs/j/stream", Some(resume)).await;
        assert_eq!(status, StatusCode::OK);
        let mut next = resume.parse::<u64>().unwrap() + 1;
        read_in_order(&mut sse, &mut next, 9, 9).await;
        assert_eq!(next, 10);
    }
    let metrics = d.metrics().await;
    assert!(
        metrics.contains("progressd_replayed_events_total{from=\"store\"} 0\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("progressd_replayed_events_total{from=\"memory\"} 0\n"),
        "{metrics}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_gets_everything_and_does_not_delay_a_fast_one() {
    const TOTAL: u64 = 12_000;
    let d = Daemon::with(|c| c.history = 20_000).await;
    d.publish_ok("j", step(1)).await;
    let (_, mut slow) = d.sse("/v1/jobs/j/stream", None).await;
    let (_, mut fast) = d.sse("/v1/jobs/j/stream", None).await;
    assert_eq!(slow.expect().await.event, "snapshot");
    assert_eq!(fast.expect().await.event, "snapshot");
    let mut i = 2;
    while i <= TOTAL {
        // Padded events, so the backlog is far larger than the socket buffers can hide.
        let batch: Vec<Value> = (i..(i + 50).min(TOTAL + 1))
            .map(|n| {
                let mut e = step(n);
                e["message"] = json!("x".repeat(600));
                e
            })
            .collect();
        i += batch.len() as u64;
        d.publish_ok("j", Value::Array(batch)).await;
    }
    // The fast one gets all of it while the slow one has read nothing.
    let mut next = 2;
    read_in_order(&mut fast, &mut next, TOTAL, usize::MAX).await;
    assert_eq!(next, TOTAL + 1);
    // Now the slow one reads: everything, in order, no reset.
    let mut next = 2;
    read_in_order(&mut slow, &mut next, TOTAL, usize::MAX).await;
    assert_eq!(next, TOTAL + 1);
    let metrics = d.metrics().await;
    assert!(metrics.contains("progressd_resets_total 0"), "{metrics}");
    // The slow one really fell behind the live channel and caught up from the store.
    let catchups: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("progressd_lag_catchups_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(catchups >= 1, "{metrics}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_job_ends_its_streams() {
    let d = Daemon::start().await;
    d.publish_ok("j", json!({"percent": 1})).await;
    let (_, mut sse) = d.sse("/v1/jobs/j/stream", None).await;
    assert_eq!(sse.expect().await.event, "snapshot");
    let res = d.http.delete(d.url("/v1/jobs/j")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let ev = sse.expect().await;
    assert_eq!(ev.event, "deleted");
    assert_eq!(ev.data["job"], "j");
    sse.expect_closed().await;
    // EventSource reconnects with the last id it saw: the job is gone, so 204 stops it.
    let (status, _) = d.sse("/v1/jobs/j/stream", Some("1")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_job_stream_filters_and_resumes_by_offset() {
    let d = Daemon::start().await;
    let (_, mut all) = d.sse("/v1/stream", None).await;
    let (_, mut builds) = d.sse("/v1/stream?prefix=build-", None).await;
    let (_, mut two) = d.sse("/v1/stream?job=a&job=b", None).await;
    d.publish_ok("build-1", json!({"percent": 1})).await; // offset 1
    d.publish_ok("a", json!({"percent": 2})).await; // offset 2
    d.publish_ok("build-2", json!({"percent": 3})).await; // offset 3
    d.publish_ok("c", json!({"percent": 4})).await; // offset 4
    d.publish_ok("b", json!({"status": "succeeded"})).await; // offset 5

    let ids = |evs: &[SseEvent]| evs.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(all.expect().await);
    }
    assert_eq!(ids(&got), ["1", "2", "3", "4", "5"]);
    assert!(got.iter().all(|e| e.event == "progress"));
    assert_eq!(got[3].data["job"], "c");
    let b1 = builds.expect().await;
    let b2 = builds.expect().await;
    assert_eq!((b1.id.as_str(), b2.id.as_str()), ("1", "3"));
    let t1 = two.expect().await;
    let t2 = two.expect().await;
    assert_eq!((t1.id.as_str(), t2.id.as_str()), ("2", "5"));
    // No `end` on multi-job streams: it stays open for what comes next.
    d.publish_ok("a", json!({"percent": 9})).await; // offset 6
    assert_eq!(two.expect().await.id, "6");

    // Resume by offset: exactly what came after.
    let (_, mut resumed) = d.sse("/v1/stream", Some("3")).await;
    let r: Vec<String> = [
        resumed.expect().await,
        resumed.expect().await,
        resumed.expect().await,
    ]
    .iter()
    .map(|e| e.id.clone())
    .collect();
    assert_eq!(r, ["4", "5", "6"]);
    let (_, mut resumed) = d.sse("/v1/stream?prefix=build-&after=1", None).await;
    assert_eq!(resumed.expect().await.id, "3");
    d.publish_ok("build-9", json!({"percent": 1})).await; // offset 7
    assert_eq!(resumed.expect().await.id, "7");

    // A resume point in the future: reset with the matching jobs, at the head.
    let (_, mut future) = d.sse("/v1/stream?job=a", Some("100")).await;
    let reset = future.expect().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.id, "7");
    assert_eq!(reset.data["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(reset.data["jobs"][0]["job"], "a");

    // Deletions travel the log too.
    d.http.delete(d.url("/v1/jobs/c")).send().await.unwrap();
    let del = all.expect().await;
    // (skip the events 6 and 7 first)
    let del = if del.event == "progress" {
        let _ = all.expect().await;
        all.expect().await
    } else {
        del
    };
    assert_eq!(del.event, "deleted");
    assert_eq!(del.id, "8");
    assert_eq!(del.data["job"], "c");
    let (_, mut replay) = d.sse("/v1/stream", Some("7")).await;
    let del = replay.expect().await;
    assert_eq!((del.event.as_str(), del.id.as_str()), ("deleted", "8"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_job_stream_resets_when_retention_dropped_what_it_missed() {
    let d = Daemon::with(|c| c.history = 3).await;
    d.publish_ok("a", json!({"percent": 1})).await; // offset 1
    d.publish_ok("b", json!({"percent": 1})).await; // offset 2
    let batch: Vec<Value> = (1..=5).map(step).collect();
    d.publish_ok("a", Value::Array(batch)).await; // offsets 3..=7; a keeps seqs 4..=6
                                                  // After offset 2, a's events at offsets 3 and 4 are gone: reset.
    let (_, mut sse) = d.sse("/v1/stream", Some("2")).await;
    let reset = sse.expect().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.id, "7");
    let jobs = reset.data["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    // But a stream of b alone lost nothing.
    let (_, mut only_b) = d.sse("/v1/stream?job=b", Some("1")).await;
    assert_eq!(only_b.expect().await.id, "2");
    // After offset 4 nothing of a is lost.
    let (_, mut sse) = d.sse("/v1/stream", Some("4")).await;
    let ids: Vec<String> = [sse.expect().await, sse.expect().await, sse.expect().await]
        .iter()
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(ids, ["5", "6", "7"]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams() {
    let d = Daemon::start().await;
    let (_, mut one) = d.sse("/v1/jobs/j/stream", None).await;
    let (_, mut many) = d.sse("/v1/stream", None).await;
    d.publish_ok("j", json!({"percent": 1})).await;
    assert_eq!(one.expect().await.id, "1");
    assert_eq!(many.expect().await.id, "1");
    // stop() fails if the daemon does not finish within the patience window: an endless
    // stream would hold warp's graceful shutdown forever.
    d.stop().await;
    one.expect_closed().await;
    many.expect_closed().await;
}

/// A fresh multi-job stream says where it starts (`id:` alone, which EventSource records
/// without firing an event), so a client that drops before any event resumes from there:
/// what was published while it was away is delivered, not skipped as "the past".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_many_job_stream_gives_a_resume_point_before_any_event() {
    let d = Daemon::start().await;
    d.publish_ok("before", json!({"percent": 1})).await; // offset 1
    let mut res = d.http.get(d.url("/v1/stream")).send().await.unwrap();
    let raw = read_raw_until(&mut res, |raw| raw.contains("id:") && raw.ends_with("\n\n")).await;
    assert!(
        raw.ends_with("\nid:1\n\n"),
        "an id-only block at the head: {raw:?}"
    );
    assert!(!raw.contains("data:"), "no event is fired: {raw:?}");
    drop(res);

    d.publish_ok("away", json!({"percent": 2})).await; // offset 2, while disconnected
    let (_, mut sse) = d.sse("/v1/stream", Some("1")).await;
    let ev = sse.expect().await;
    assert_eq!((ev.event.as_str(), ev.id.as_str()), ("progress", "2"));
    assert_eq!(ev.data["job"], "away");
    d.stop().await;
}

/// Reads from `s` into `got` until `done(got)` says enough.
async fn read_socket_until(
    s: &mut tokio::net::TcpStream,
    got: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> bool,
) {
    use tokio::io::AsyncReadExt;
    while !done(got) {
        got.reserve(64 * 1024);
        let n = tokio::time::timeout(common::PATIENCE, s.read_buf(got))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed early, after {:?}",
            String::from_utf8_lossy(got)
        );
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A stream is written by the daemon's own loop once its head is ready (`handoff.rs`): its
/// body is delimited by the connection's end, not chunked, each frame as it is; and a client
/// leaving a quiet stream is noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_handed_off_from_hyper_and_framed_by_the_connection() {
    use tokio::io::AsyncWriteExt;
    let d = Daemon::start().await;
    d.publish_ok("j", step(1)).await;
    let mut s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    s.write_all(b"GET /v1/jobs/j/stream HTTP/1.1\r\nHost: progressd\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    read_socket_until(&mut s, &mut got, |got| contains(got, "event:snapshot")).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: close"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: text/event-stream"),
        "{head}"
    );
    assert!(head.contains("\r\ndate: "), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    // No chunk sizes between the frames: the body is the frames.
    assert!(body.starts_with("retry:"), "{body:?}");
    d.publish_ok("j", step(2)).await;
    let mut got = Vec::new();
    read_socket_until(&mut s, &mut got, |got| contains(got, "id:2\n")).await;
    let block = String::from_utf8_lossy(&got).into_owned();
    assert!(block.starts_with("event:progress\n"), "{block:?}");
    assert!(block.ends_with("\n\n"), "{block:?}");
    // The client leaves while nothing is being sent: its subscription ends.
    drop(s);
    until_no_sse_subscriber(&d).await;
    d.stop().await;
}

/// Per-job and multi-job streams are served, live events and all, whether they have a runtime
/// of their own (`--stream-threads N`: the stage and the handed-off stream there, the socket
/// moved to its reactor) or share the request runtime (`0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_served_with_and_without_a_stream_runtime() {
    for threads in [0, 1, 2] {
        let d = Daemon::with(|c| c.stream_threads = threads).await;
        d.publish_ok("j", step(1)).await;
        let (status, mut one) = d.sse("/v1/jobs/j/stream", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(one.expect().await.event, "snapshot", "{threads} threads");
        let (status, mut all) = d.sse("/v1/stream?after=1", None).await;
        assert_eq!(status, StatusCode::OK);
        for seq in 2..=4u64 {
            d.publish_ok("j", step(seq)).await;
            let ev = one.expect().await;
            assert_eq!(
                (ev.event.as_str(), ev.data["seq"].as_u64()),
                ("progress", Some(seq))
            );
            let ev = all.expect().await;
            assert_eq!(ev.id, seq.to_string(), "{threads} threads");
        }
        drop((one, all));
        until_no_sse_subscriber(&d).await;
        d.stop().await;
    }
}

/// A stream requested behind a large response on the same connection (pipelined, the client
/// reading through a small window) comes after that response in full, then handed off (its
/// body unchunked): taking the socket never loses bytes of the response before it. (hyper
/// reads the second request only once the first response is flushed; the decline for the
/// case where it would not is `handoff::tests`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_pipelined_behind_a_large_response_follows_it_whole() {
    use tokio::io::AsyncWriteExt;
    let d = Daemon::with(|c| c.max_body = 16 * 1024 * 1024).await;
    // 12 MB of history: more than the kernel's socket buffers take at once (4 MiB at most
    // for the daemon's send buffer), so hyper writes it over many rounds.
    let pad = "x".repeat(12_000);
    let batch: Vec<Value> = (1..=1000)
        .map(|i| json!({"percent": i as f64 / 10.0, "data": {"pad": pad}}))
        .collect();
    assert_eq!(d.publish_ok("big", json!(batch)).await, 1000);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut s = socket.connect(d.addr).await.unwrap();
    s.write_all(
        b"GET /v1/jobs/big/events?after=0&limit=1000 HTTP/1.1\r\nHost: progressd\r\n\r\n\
          GET /v1/jobs/big/stream HTTP/1.1\r\nHost: progressd\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    read_socket_until(&mut s, &mut got, |got| contains(got, "\r\n\r\n")).await;
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .parse()
        .unwrap();
    read_socket_until(&mut s, &mut got, |got| got.len() >= end + length).await;
    let mut rest = got.split_off(end + length);
    let history: Value = serde_json::from_slice(&got[end..]).unwrap();
    assert_eq!(history["events"].as_array().unwrap().len(), 1000);
    read_socket_until(&mut s, &mut rest, |rest| contains(rest, "retry:")).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
    assert!(rest.contains("\r\n\r\nretry:"), "{rest}");
    d.stop().await;
}
