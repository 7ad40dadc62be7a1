//! Hostile clients: while each misbehaves at scale, a normal publisher and subscriber on the
//! side keep working and the daemon's memory stays bounded.
//!
//! The side traffic's latency is printed (run with `--nocapture` to see it, README records
//! it); the assertions are that everything is delivered, in order, and nothing hangs.

mod common;

use std::time::{Duration, Instant};

use common::{step, ws_connect, Api, Daemon, Sse};
use futures_util::SinkExt;
use reqwest::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Resident memory of this process (daemon and clients together), in MiB.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb / 1024
}

/// Publishes `n` events to `side` one at a time while `sub` follows it; returns the median
/// publish-to-delivery time.
async fn side_traffic(d: &Daemon, sub: &mut Sse, from: u64, n: u64) -> Duration {
    let mut times = Vec::new();
    for i in from..from + n {
        let start = Instant::now();
        d.publish_ok("side", step(i)).await;
        let ev = sub.expect().await;
        assert_eq!(ev.id, i.to_string(), "the side subscriber lost its order");
        times.push(start.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_side_keeps_working_under_hostile_clients() {
    let mut d = Daemon::with(|c| c.header_timeout = Duration::from_secs(30)).await;
    d.publish_ok("side", step(1)).await;
    let (_, mut sub) = d.sse("/v1/jobs/side/stream", Some("1")).await;
    let unloaded = side_traffic(&d, &mut sub, 2, 20).await;
    let rss_before = rss_mib();
    let mut next = 22;

    // 1. 5,000 connections that send half a request header and stop.
    let mut half = Vec::with_capacity(5000);
    for _ in 0..5000 {
        let mut s = TcpStream::connect(d.addr).await.unwrap();
        s.write_all(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        half.push(s);
    }
    let with_half = side_traffic(&d, &mut sub, next, 20).await;
    next += 20;
    drop(half);

    // 2. 5,000 SSE clients that never read, while events with some weight are published.
    let mut mute = Vec::with_capacity(5000);
    for _ in 0..5000 {
        let mut s = TcpStream::connect(d.addr).await.unwrap();
        s.write_all(b"GET /v1/jobs/heavy/stream HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        mute.push(s);
    }
    for i in 0..20 {
        let batch: Vec<serde_json::Value> = (0..50)
            .map(|j| serde_json::json!({"current": i * 50 + j, "message": "x".repeat(500)}))
            .collect();
        d.publish_ok("heavy", serde_json::Value::Array(batch)).await;
    }
    let with_mute = side_traffic(&d, &mut sub, next, 20).await;
    next += 20;
    let rss_mute = rss_mib();
    drop(mute);

    // 3. A WebSocket client flooding pings and subscribe/unsubscribe messages.
    let mut flood = ws_connect(&d.ws_url("/v1/ws")).await;
    let flooding = tokio::spawn(async move {
        for i in 0..5000 {
            let _ = flood.send(Message::Ping(vec![0u8; 64].into())).await;
            let job = format!("flood-{}", i % 50);
            let _ = flood
                .send(Message::text(format!(
                    r#"{{"type":"subscribe","job":"{job}"}}"#
                )))
                .await;
            let _ = flood
                .send(Message::text(format!(
                    r#"{{"type":"unsubscribe","job":"{job}"}}"#
                )))
                .await;
        }
        flood
    });
    let with_flood = side_traffic(&d, &mut sub, next, 20).await;
    next += 20;
    drop(flooding.await.unwrap());

    // 4. A 10 MB body without Content-Length: refused at --max-body, not buffered.
    let chunks = futures_util::stream::iter(
        (0..160).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 64 * 1024])),
    );
    let res = d
        .http
        .post(d.url("/v1/jobs/big/events"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    if let Ok(res) = res {
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    // A 413 closes its connection (the body was never read): go on with a new one.
    d.http = common::client();
    let with_big = side_traffic(&d, &mut sub, next, 20).await;
    let rss_after = rss_mib();

    println!(
        "side publish-to-delivery median: unloaded {unloaded:?}, 5000 half headers {with_half:?}, \
         5000 mute SSE {with_mute:?}, ws flood {with_flood:?}, 10 MB body {with_big:?}; \
         RSS MiB before {rss_before}, with mute SSE {rss_mute}, after {rss_after}"
    );
    // Bounded memory: the mute subscribers hold small buffers, not the backlog.
    assert!(
        rss_mute < rss_before + 400,
        "RSS grew from {rss_before} to {rss_mute} MiB"
    );
    d.stop().await;
}
