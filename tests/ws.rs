//! WebSocket: per-job sockets with `?after=`, the multi-job socket's subscribe protocol,
//! close codes, error frames, pings.

mod common;

use std::time::Duration;

use common::{step, ws_connect, ws_json, ws_read, ws_send, Api, Daemon, WsRead};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_job_socket_snapshot_events_end_and_close_1000() {
    let d = Daemon::start().await;
    d.publish_ok("j", json!({"percent": 5})).await;
    let mut ws = ws_connect(&d.ws_url("/v1/jobs/j/ws")).await;
    let snap = ws_json(&mut ws).await;
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["job"]["job"], "j");
    assert_eq!(snap["job"]["seq"], 1);
    d.publish_ok("j", json!({"percent": 50})).await;
    let ev = ws_json(&mut ws).await;
    assert_eq!(ev["type"], "event");
    assert_eq!(ev["event"]["seq"], 2);
    assert_eq!(ev["event"]["percent"], 50.0);
    d.publish_ok("j", json!({"status": "cancelled"})).await;
    assert_eq!(ws_json(&mut ws).await["event"]["seq"], 3);
    let end = ws_json(&mut ws).await;
    assert_eq!(
        end,
        json!({"type": "end", "job": "j", "status": "cancelled"})
    );
    assert!(matches!(ws_read(&mut ws).await, WsRead::Close(Some(1000))));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_job_socket_resumes_with_after_while_publishing() {
    let d = Daemon::start().await;
    const TOTAL: u64 = 400;
    d.publish_ok("j", step(1)).await;
    let publisher = d.spawn_publisher("j", TOTAL);
    let mut next = 1;
    let mut reconnects = 0;
    'outer: loop {
        let url = d.ws_url(&format!("/v1/jobs/j/ws?after={}", next - 1));
        let mut ws = ws_connect(&url).await;
        for _ in 0..29 {
            match ws_read(&mut ws).await {
                WsRead::Json(v) if v["type"] == "event" => {
                    assert_eq!(v["event"]["seq"], next, "gap or duplicate");
                    next += 1;
                }
                WsRead::Json(v) if v["type"] == "end" => break 'outer,
                other => panic!("unexpected {other:?}"),
            }
        }
        reconnects += 1;
    }
    publisher.await.unwrap();
    assert_eq!(next, TOTAL + 1);
    assert!(reconnects > 5);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_job_socket_reset_204_equivalent_and_bad_after() {
    let d = Daemon::with(|c| c.history = 3).await;
    let batch: Vec<Value> = (1..=6).map(step).collect();
    d.publish_ok("j", Value::Array(batch)).await;
    let mut ws = ws_connect(&d.ws_url("/v1/jobs/j/ws?after=1")).await;
    let reset = ws_json(&mut ws).await;
    assert_eq!(reset["type"], "reset");
    assert_eq!(reset["job"]["seq"], 6);
    let mut ws = ws_connect(&d.ws_url("/v1/jobs/j/ws?after=3")).await;
    assert_eq!(ws_json(&mut ws).await["event"]["seq"], 4);

    // A bad `after` is refused at the handshake.
    let err = tokio_tungstenite::connect_async(d.ws_url("/v1/jobs/j/ws?after=-2"))
        .await
        .unwrap_err();
    match err {
        tungstenite::Error::Http(res) => {
            assert_eq!(res.status(), 400);
            let body: Value = serde_json::from_slice(res.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"], "invalid_last_event_id");
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }

    // At the end of a finished job: `end`, close 1000.
    d.publish_ok("j", json!({"status": "succeeded"})).await;
    let mut ws = ws_connect(&d.ws_url("/v1/jobs/j/ws?after=7")).await;
    assert_eq!(ws_json(&mut ws).await["type"], "end");
    assert!(matches!(ws_read(&mut ws).await, WsRead::Close(Some(1000))));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_job_closes_per_job_socket_with_1000() {
    let d = Daemon::start().await;
    d.publish_ok("j", json!({"percent": 5})).await;
    let mut ws = ws_connect(&d.ws_url("/v1/jobs/j/ws")).await;
    assert_eq!(ws_json(&mut ws).await["type"], "snapshot");
    d.http.delete(d.url("/v1/jobs/j")).send().await.unwrap();
    assert_eq!(
        ws_json(&mut ws).await,
        json!({"type": "deleted", "job": "j"})
    );
    assert!(matches!(ws_read(&mut ws).await, WsRead::Close(Some(1000))));
    // Resuming the deleted job: told so at once.
    let mut ws = ws_connect(&d.ws_url("/v1/jobs/j/ws?after=1")).await;
    assert_eq!(
        ws_json(&mut ws).await,
        json!({"type": "deleted", "job": "j"})
    );
    assert!(matches!(ws_read(&mut ws).await, WsRead::Close(Some(1000))));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_job_socket_subscribe_unsubscribe_and_errors() {
    let d = Daemon::start().await;
    d.publish_ok("a", json!([{"percent": 1}, {"percent": 2}, {"percent": 3}]))
        .await;
    let mut ws = ws_connect(&d.ws_url("/v1/ws")).await;

    ws_send(
        &mut ws,
        json!({"type": "subscribe", "job": "a", "after": 1}),
    )
    .await;
    assert_eq!(
        ws_json(&mut ws).await,
        json!({"type": "subscribed", "job": "a"})
    );
    assert_eq!(ws_json(&mut ws).await["event"]["seq"], 2);
    assert_eq!(ws_json(&mut ws).await["event"]["seq"], 3);

    ws_send(&mut ws, json!({"type": "subscribe", "job": "b"})).await;
    assert_eq!(
        ws_json(&mut ws).await,
        json!({"type": "subscribed", "job": "b"})
    );
    d.publish_ok("b", json!({"stage": "x"})).await;
    let ev = ws_json(&mut ws).await;
    assert_eq!(
        (ev["event"]["job"].as_str(), ev["event"]["seq"].as_u64()),
        (Some("b"), Some(1))
    );

    // Malformed messages get error frames; the socket stays open.
    for (msg, code) in [
        ("not json", "invalid_json"),
        (r#"{"type":"dance"}"#, "invalid_body"),
        (r#"{"type":"subscribe"}"#, "invalid_body"),
        (r#"{"type":"subscribe","job":"bad id"}"#, "invalid_job_id"),
        (
            r#"{"type":"subscribe","job":"a","after":-1}"#,
            "invalid_last_event_id",
        ),
        (
            r#"{"type":"subscribe","job":"a","extra":1}"#,
            "invalid_body",
        ),
    ] {
        ws.send(Message::text(msg)).await.unwrap();
        let err = ws_json(&mut ws).await;
        assert_eq!(err["type"], "error", "{msg}");
        assert_eq!(err["error"], code, "{msg}: {err}");
        assert!(err["message"].is_string());
    }

    ws_send(&mut ws, json!({"type": "unsubscribe", "job": "a"})).await;
    assert_eq!(
        ws_json(&mut ws).await,
        json!({"type": "unsubscribed", "job": "a"})
    );
    d.publish_ok("a", json!({"percent": 4})).await;
    d.publish_ok("b", json!({"percent": 5})).await;
    // Only b's event arrives: a is no longer followed.
    let ev = ws_json(&mut ws).await;
    assert_eq!(ev["event"]["job"], "b");
    assert_eq!(ev["event"]["seq"], 2);

    // A finished job ends its subscription, not the socket.
    d.publish_ok("b", json!({"status": "succeeded"})).await;
    assert_eq!(ws_json(&mut ws).await["event"]["seq"], 3);
    assert_eq!(
        ws_json(&mut ws).await,
        json!({"type": "end", "job": "b", "status": "succeeded"})
    );
    ws_send(
        &mut ws,
        json!({"type": "subscribe", "job": "b", "after": 3}),
    )
    .await;
    assert_eq!(ws_json(&mut ws).await["type"], "subscribed");
    assert_eq!(ws_json(&mut ws).await["type"], "end");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_oversized_frames_close_the_socket() {
    let d = Daemon::start().await;
    let mut ws = ws_connect(&d.ws_url("/v1/ws")).await;
    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert!(matches!(ws_read(&mut ws).await, WsRead::Close(Some(1003))));

    let mut ws = ws_connect(&d.ws_url("/v1/ws")).await;
    ws.send(Message::text("x".repeat(70 * 1024))).await.unwrap();
    assert!(matches!(ws_read(&mut ws).await, WsRead::Close(Some(1009))));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_pings_and_drops_a_client_that_never_answers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Daemon::with(|c| c.keepalive = Duration::from_millis(100)).await;
    // A raw socket: it completes the handshake and then never answers a ping (a WebSocket
    // library would answer them for us while we read).
    let mut sock = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    sock.write_all(
        b"GET /v1/ws HTTP/1.1\r\nHost: progressd\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(common::PATIENCE, sock.read(&mut buf))
            .await
            .expect("the server never dropped the silent client")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // Server pings are unmasked, empty frames: 0x89 0x00.
    let pings = seen.windows(2).filter(|w| w == &[0x89, 0x00]).count();
    assert!(pings >= 2, "saw {pings} pings before being dropped");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sockets_with_1001() {
    let d = Daemon::start().await;
    let mut one = ws_connect(&d.ws_url("/v1/jobs/j/ws")).await;
    let mut many = ws_connect(&d.ws_url("/v1/ws")).await;
    ws_send(&mut many, json!({"type": "subscribe", "job": "j"})).await;
    assert_eq!(ws_json(&mut many).await["type"], "subscribed");
    d.publish_ok("j", json!({"percent": 1})).await;
    assert_eq!(ws_json(&mut one).await["event"]["seq"], 1);
    assert_eq!(ws_json(&mut many).await["event"]["seq"], 1);
    let stopping = tokio::spawn(d.stop());
    assert!(matches!(ws_read(&mut one).await, WsRead::Close(Some(1001))));
    assert!(matches!(
        ws_read(&mut many).await,
        WsRead::Close(Some(1001))
    ));
    stopping.await.unwrap();
}
