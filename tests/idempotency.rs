//! Idempotent publishing: a worker whose POST timed out retries it with the same
//! Idempotency-Key and gets the first answer; nothing is appended twice.

mod common;

use std::time::Duration;

use common::{Api, Daemon};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn publish_with_key(d: &Daemon, job: &str, key: &str, body: Value) -> (StatusCode, Value) {
    let res = d
        .http
        .post(d.url(&format!("/v1/jobs/{job}/events")))
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = res.status();
    (status, res.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_gets_the_first_answer_and_appends_nothing() {
    let d = Daemon::start().await;
    let (status, first) = publish_with_key(&d, "j", "attempt-1", json!({"percent": 10})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, again) = publish_with_key(&d, "j", "attempt-1", json!({"percent": 10})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, first);
    assert_eq!(d.history("j").await.len(), 1);
    // Another key appends; the same key on another job is another key.
    let (status, second) = publish_with_key(
        &d,
        "j",
        "attempt-2",
        json!([{"percent": 20}, {"percent": 30}]),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(second["seq"], 3);
    let (status, other) = publish_with_key(&d, "k", "attempt-1", json!({"percent": 1})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(other["seq"], 1);
    // A batch replays its last event's answer.
    let (status, replay) = publish_with_key(
        &d,
        "j",
        "attempt-2",
        json!([{"percent": 20}, {"percent": 30}]),
    )
    .await;
    assert_eq!((status, replay), (StatusCode::OK, second));
    // Retrying the publish that finished the job is safe too: the first answer, not 409.
    let (status, done) = publish_with_key(&d, "j", "finish", json!({"status": "succeeded"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, again) = publish_with_key(&d, "j", "finish", json!({"status": "succeeded"})).await;
    assert_eq!((status, again), (StatusCode::OK, done));
    assert_eq!(d.history("j").await.len(), 4);
    // Without a key, behaviour is unchanged.
    let (status, _) = d.publish("j", json!({"percent": 1})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_survive_a_restart_and_expire_after_the_window() {
    let d = Daemon::with(|c| c.idempotency_window = Duration::from_secs(3600)).await;
    let (_, first) = publish_with_key(&d, "j", "k1", json!({"percent": 10})).await;
    let dir = d.stop().await.unwrap();
    let d = Daemon::on(&dir.path().join("data"), |c| {
        c.idempotency_window = Duration::from_secs(3600)
    })
    .await;
    let (status, again) = publish_with_key(&d, "j", "k1", json!({"percent": 10})).await;
    assert_eq!((status, again), (StatusCode::OK, first));
    assert_eq!(d.history("j").await.len(), 1);
    let _ = d.stop().await;

    let d = Daemon::with(|c| {
        c.idempotency_window = Duration::from_millis(100);
        c.gc_interval = Duration::from_millis(20);
    })
    .await;
    let (status, _) = publish_with_key(&d, "j", "k1", json!({"percent": 10})).await;
    assert_eq!(status, StatusCode::CREATED);
    // The window is time itself: let it pass.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (status, later) = publish_with_key(&d, "j", "k1", json!({"percent": 10})).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a key past its window is a new publish"
    );
    assert_eq!(later["seq"], 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_are_refused() {
    let d = Daemon::start().await;
    let long = "k".repeat(256);
    for bad in ["", long.as_str(), "with space", "é"] {
        let res = d
            .http
            .post(d.url("/v1/jobs/j/events"))
            .header(
                "Idempotency-Key",
                reqwest::header::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            )
            .json(&json!({"percent": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "invalid_body");
    }
    let (status, _) = d.get("/v1/jobs/j").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was stored");
    d.stop().await;
}
