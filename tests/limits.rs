//! Limits that keep one client from hurting the others; each hit is counted in /metrics.

mod common;

use std::time::Duration;

use common::{ws_connect, ws_json, ws_send, Api, Daemon, PATIENCE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn hits(metrics: &str, limit: &str) -> u64 {
    let prefix = format!("progressd_limit_hits_total{{limit=\"{limit}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {limit} counter in {metrics}"))
        .parse()
        .unwrap()
}

/// Sends a keep-alive request on `s` and returns the status line's code.
async fn request(s: &mut TcpStream) -> Option<u16> {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: progressd\r\n\r\n")
        .await
        .ok()?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.get(9..12)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_maximum_get_503_and_retry_after() {
    let d = Daemon::with(|c| c.max_connections = 3).await;
    let (status, _) = d.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    let mut held = Vec::new();
    let refusal = loop {
        let mut s = TcpStream::connect(d.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: progressd\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.starts_with("HTTP/1.1 200") {
            held.push(s);
            assert!(held.len() <= 3, "more connections served than the maximum");
        } else {
            break text;
        }
    };
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal}");
    assert!(
        refusal.to_ascii_lowercase().contains("retry-after: 1"),
        "{refusal}"
    );
    assert!(refusal.contains(r#""error":"unavailable""#));
    // The held connections still work, and a freed slot is usable again.
    assert_eq!(request(&mut held[0]).await, Some(200));
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut s = TcpStream::connect(d.addr).await.unwrap();
        if request(&mut s).await == Some(200) {
            again = Some(s);
            break;
        }
        // The freed slot is released when the server sees the close: try again.
        tokio::task::yield_now().await;
    }
    assert!(
        again.is_some(),
        "a slot freed by a closed connection was never reused"
    );
    drop(held);
    drop(again);
    let metrics = d.metrics().await;
    assert!(hits(&metrics, "connections") >= 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_dropped() {
    let d = Daemon::with(|c| c.header_timeout = Duration::from_millis(300)).await;
    let mut slow = TcpStream::connect(d.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: progressd\r\n")
        .await
        .unwrap();
    // Meanwhile others are served.
    let (status, _) = d.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let mut buf = Vec::new();
    let read = tokio::time::timeout(PATIENCE, slow.read_to_end(&mut buf))
        .await
        .expect("the server never dropped the slow client");
    // Closed, with at most a 408 before.
    let text = String::from_utf8_lossy(&buf);
    assert!(
        read.is_err() || text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // On a new connection: the pooled one has idled past the 300 ms header timeout too, and
    // the server may be closing it just as the client reuses it.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let metrics = fresh
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(hits(&metrics, "header_timeout") >= 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_batch_and_list_limits() {
    let mut d = Daemon::with(|c| {
        c.max_batch = 10;
        c.max_list = 5;
        c.max_body = 2048;
    })
    .await;
    let batch: Vec<Value> = (0..11).map(|i| json!({"current": i})).collect();
    let (status, err) = d.publish("j", Value::Array(batch)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["error"], "invalid_body");
    let (status, _) = d.publish("j", json!({"message": "m".repeat(3000)})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // A 413 closes its connection (the body was never read): go on with a new one.
    d.http = common::client();
    for i in 0..8 {
        d.publish_ok(&format!("job-{i}"), json!({"percent": 1}))
            .await;
    }
    let (_, page) = d.get("/v1/jobs?limit=50").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 5);
    assert!(page["next_cursor"].is_string());
    let metrics = d.metrics().await;
    assert_eq!(hits(&metrics, "batch"), 1);
    assert_eq!(hits(&metrics, "body"), 1);
    assert_eq!(hits(&metrics, "list_limit"), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_follows_a_bounded_number_of_jobs() {
    let d = Daemon::with(|c| c.max_subscriptions_per_socket = 2).await;
    let mut ws = ws_connect(&d.ws_url("/v1/ws")).await;
    for job in ["a", "b"] {
        ws_send(&mut ws, json!({"type": "subscribe", "job": job})).await;
        assert_eq!(ws_json(&mut ws).await["type"], "subscribed");
    }
    ws_send(&mut ws, json!({"type": "subscribe", "job": "c"})).await;
    let err = ws_json(&mut ws).await;
    assert_eq!(
        (err["type"].as_str(), err["error"].as_str()),
        (Some("error"), Some("limit_exceeded"))
    );
    // Subscribing again to a followed job is no new subscription.
    ws_send(&mut ws, json!({"type": "subscribe", "job": "a"})).await;
    assert_eq!(ws_json(&mut ws).await["type"], "subscribed");
    ws_send(&mut ws, json!({"type": "unsubscribe", "job": "a"})).await;
    assert_eq!(ws_json(&mut ws).await["type"], "unsubscribed");
    ws_send(&mut ws, json!({"type": "subscribe", "job": "c"})).await;
    assert_eq!(ws_json(&mut ws).await["type"], "subscribed");
    // The socket works: c's events arrive.
    d.publish_ok("c", json!({"percent": 5})).await;
    assert_eq!(ws_json(&mut ws).await["event"]["job"], "c");
    assert_eq!(hits(&d.metrics().await, "subscriptions"), 1);
    d.stop().await;
}

/// A WebSocket session is a connection for `--max-connections` for as long as it lives,
/// though hyper is done with it after the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_sessions_count_against_the_maximum() {
    let d = Daemon::with(|c| c.max_connections = 2).await;
    let mut sessions = Vec::new();
    for _ in 0..2 {
        // Upgraded: hyper's part of the connection is over, the session goes on.
        sessions.push(ws_connect(&d.ws_url("/v1/ws")).await);
    }
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    assert_eq!(
        request(&mut s).await,
        Some(503),
        "a third connection was served beside two WebSocket sessions"
    );
    // A session that ends frees its slot.
    drop(sessions.pop());
    let mut served = false;
    for _ in 0..200 {
        let mut s = TcpStream::connect(d.addr).await.unwrap();
        if request(&mut s).await == Some(200) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        served,
        "the slot of a closed WebSocket session was never freed"
    );
    drop(sessions);
    d.stop().await;
}
