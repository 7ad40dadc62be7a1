//! The REST half of the contract: every endpoint and every error code, against a real daemon.

mod common;

use common::{client, Api, Daemon};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn error_code(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_answers_seq_and_offset_and_folds_the_snapshot() {
    let d = Daemon::start().await;
    let (status, body) = d
        .publish("build-1", json!({"status": "queued", "stage": "wait"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body, json!({"job": "build-1", "seq": 1, "offset": 1}));
    let (_, body) = d.publish("other", json!({"percent": 5})).await;
    assert_eq!(body["offset"], 2);
    // A batch answers with its last event.
    let (status, body) = d
        .publish(
            "build-1",
            json!([{"current": 1, "total": 4}, {"message": "half", "data": null}, {"percent": 60, "current": 2, "total": 4}]),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body, json!({"job": "build-1", "seq": 4, "offset": 5}));

    let (status, snap) = d.get("/v1/jobs/build-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(snap["job"], "build-1");
    assert_eq!(snap["status"], "queued");
    // An explicit percent wins over the derived one.
    assert_eq!(snap["percent"], 60.0);
    assert_eq!(snap["current"], 2);
    assert_eq!(snap["total"], 4);
    assert_eq!(snap["stage"], "wait");
    assert_eq!(snap["message"], "half");
    assert!(snap.as_object().unwrap().contains_key("data") && snap["data"].is_null());
    assert_eq!(snap["seq"], 4);
    assert_eq!(snap["first_seq"], 1);
    assert!(snap["finished_at"].is_null());
    let created = snap["created_at"].as_str().unwrap();
    assert_eq!(created.len(), "2026-11-26T12:00:00.123Z".len(), "{created}");
    assert!(created.ends_with('Z'));

    // The derived percent is stored in the event.
    let events = d.history("build-1").await;
    assert_eq!(events[1]["percent"], 25.0);
    assert_eq!(events[0]["status"], "queued");
    assert!(
        events[0].get("percent").is_none(),
        "unset fields are absent from events"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_running_until_set_and_terminal_statuses_finish_the_job() {
    let d = Daemon::start().await;
    d.publish_ok("j", json!({"percent": 1})).await;
    let (_, snap) = d.get("/v1/jobs/j").await;
    assert_eq!(snap["status"], "running");
    d.publish_ok("j", json!({"status": "succeeded", "percent": 100}))
        .await;
    let (_, snap) = d.get("/v1/jobs/j").await;
    assert_eq!(snap["status"], "succeeded");
    assert!(snap["finished_at"].is_string());
    let (status, body) = d.publish("j", json!({"percent": 5})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&body), "job_finished");
    assert_eq!(d.history("j").await.len(), 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_batches_store_nothing() {
    let d = Daemon::start().await;
    d.publish_ok("j", json!({"percent": 1})).await;
    // An update after its own terminal status: the whole batch is refused.
    let (status, body) = d
        .publish(
            "j",
            json!([{"percent": 2}, {"status": "failed"}, {"percent": 3}]),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&body), "job_finished");
    // One bad update anywhere: nothing of the batch.
    let (status, body) = d
        .publish("j", json!([{"percent": 2}, {"percent": 101}]))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "invalid_body");
    assert!(
        body["message"].as_str().unwrap().contains("update 1"),
        "{body}"
    );
    let too_many: Vec<Value> = (0..1001).map(|i| json!({"current": i})).collect();
    let (status, body) = d.publish("j", Value::Array(too_many)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "invalid_body");
    let (_, snap) = d.get("/v1/jobs/j").await;
    assert_eq!(snap["seq"], 1);
    assert_eq!(snap["status"], "running");
    assert_eq!(d.history("j").await.len(), 1);
    // A batch of exactly 1000 is fine.
    let full: Vec<Value> = (0..1000).map(|i| json!({"current": i})).collect();
    assert_eq!(d.publish_ok("j", Value::Array(full)).await, 1001);
    d.stop().await;
}

/// A batch is stored as one value. The largest the limits allow (1,000 updates with 4 KiB
/// messages, about 4 MiB) is read back whole, by history and by a stream, also after a
/// restart (it was once stored past the store's read limit and could not be read back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_batch_is_stored_and_read_back() {
    let d = Daemon::with(|c| c.max_body = 8 << 20).await;
    let message = "m".repeat(4096);
    let batch: Vec<Value> = (1..=1000)
        .map(|i| json!({"current": i, "total": 1000, "message": message}))
        .collect();
    assert_eq!(d.publish_ok("big", Value::Array(batch)).await, 1000);
    let dir = d.stop().await.unwrap();
    let d = Daemon::on(&dir.path().join("data"), |c| c.max_body = 8 << 20).await;
    let events = d.history("big").await;
    assert_eq!(events.len(), 1000);
    assert_eq!(events[999]["current"], 1000);
    assert_eq!(events[999]["message"].as_str().map(str::len), Some(4096));
    let (_, mut sse) = d.sse("/v1/jobs/big/stream", Some("998")).await;
    let ev = sse.expect().await;
    assert_eq!(
        (ev.event.as_str(), ev.data["seq"].as_u64()),
        ("progress", Some(999))
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_the_contract_errors() {
    let mut d = Daemon::with(|c| c.max_body = 8192).await;
    let post = |body: Vec<u8>, ct: Option<&'static str>| {
        let mut req = d.http.post(d.url("/v1/jobs/j/events")).body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status();
            (status, res.json::<Value>().await.unwrap())
        }
    };
    let json_ct = Some("application/json");
    for (body, code) in [
        (&b"{"[..], "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"42", "invalid_body"),
        (b"null", "invalid_body"),
        (b"{}", "invalid_body"),
        (b"[]", "invalid_body"),
        (b"{\"percent\": -1}", "invalid_body"),
        (b"{\"status\": \"done\"}", "invalid_body"),
        (b"{\"current\": -3}", "invalid_body"),
    ] {
        let (status, err) = post(body.to_vec(), json_ct).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
        assert_eq!(error_code(&err), code, "{body:?}: {err}");
        assert!(err["message"].is_string());
    }
    // Unknown fields: the message names the field and the allowed ones.
    let (_, err) = post(br#"{"precent": 5}"#.to_vec(), json_ct).await;
    assert_eq!(error_code(&err), "invalid_body");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("precent") && msg.contains("percent") && msg.contains("stage"),
        "{msg}"
    );
    // Content types.
    let (status, err) = post(br#"{"percent":1}"#.to_vec(), None).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(error_code(&err), "unsupported_media_type");
    let (status, _) = post(br#"{"percent":1}"#.to_vec(), Some("text/plain")).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, _) = post(
        br#"{"percent":1}"#.to_vec(),
        Some("application/json; charset=utf-8"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    // Limits on strings and data.
    let long_stage = json!({"stage": "s".repeat(257)});
    let long_message = json!({"message": "m".repeat(4097)});
    let big_data = json!({"data": "d".repeat(16 * 1024)});
    for body in [long_stage, long_message] {
        let (status, err) = d.publish("j", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error_code(&err), "invalid_body");
    }
    // Over --max-body: 413, with or without Content-Length.
    let (status, err) = post(big_data.to_string().into_bytes(), json_ct).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&err), "payload_too_large");
    // A 413 closes its connection (the body was never read): each next request goes on a new
    // one, not on a pooled connection the server may be closing.
    d.http = client();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(b"{\"message\":\"".to_vec()),
        Ok(vec![b'x'; 9000]),
        Ok(b"\"}".to_vec()),
    ];
    let res = d
        .http
        .post(d.url("/v1/jobs/j/events"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    d.http = client();
    assert_eq!(
        d.history("j").await.len(),
        1,
        "only the one good publish is stored"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_is_limited_by_max_data() {
    let d = Daemon::with(|c| c.max_data = 100).await;
    let (status, err) = d
        .publish("j", json!({"data": {"k": "v".repeat(100)}}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&err), "invalid_body");
    assert!(err["message"].as_str().unwrap().contains("data"));
    d.publish_ok("j", json!({"data": {"nested": [1, 2, {"x": null}]}}))
        .await;
    let (_, snap) = d.get("/v1/jobs/j").await;
    assert_eq!(snap["data"], json!({"nested": [1, 2, {"x": null}]}));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_ids_are_validated_after_percent_decoding() {
    let d = Daemon::start().await;
    // Browsers send ':' as %3A.
    assert_eq!(d.publish_ok("ns%3Ajob", json!({"percent": 1})).await, 1);
    let (status, snap) = d.get("/v1/jobs/ns:job").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(snap["job"], "ns:job");
    let long = "a".repeat(129);
    for bad in ["a%20b", "a%2Fb", "%C3%A9", long.as_str()] {
        let (status, err) = d.publish(bad, json!({"percent": 1})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(error_code(&err), "invalid_job_id");
        let (status, err) = d.get(&format!("/v1/jobs/{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error_code(&err), "invalid_job_id");
    }
    let max = "b".repeat(128);
    assert_eq!(d.publish_ok(&max, json!({"percent": 1})).await, 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods() {
    let d = Daemon::start().await;
    let (status, err) = d.get("/v1/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&err), "not_found");
    let (status, err) = d.get("/v1/jobs/missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&err), "job_not_found");
    let (status, err) = d.get("/v1/jobs/missing/events").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&err), "job_not_found");
    let res = d.http.put(d.url("/v1/jobs/x")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["allow"], "GET, DELETE");
    assert_eq!(
        error_code(&res.json::<Value>().await.unwrap()),
        "method_not_allowed"
    );
    let res = d
        .http
        .delete(d.url("/v1/jobs/x/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["allow"], "GET, POST");
    let res = d.http.post(d.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["allow"], "GET");
    let res = d.http.post(d.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["allow"], "GET");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_and_pages_in_id_order() {
    let d = Daemon::start().await;
    for i in 0..7 {
        d.publish_ok(&format!("build-{i}"), json!({"percent": i}))
            .await;
    }
    d.publish_ok("deploy-1", json!({"status": "failed"})).await;
    d.publish_ok("build-3", json!({"status": "succeeded"}))
        .await;

    let (status, page) = d.get("/v1/jobs").await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 8);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    assert!(page["next_cursor"].is_null());

    // Pages of 3 over the prefix, following the cursor.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("/v1/jobs?prefix=build-&limit=3&cursor={c}"),
            None => "/v1/jobs?prefix=build-&limit=3".to_owned(),
        };
        let (status, page) = d.get(&q).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for j in page["jobs"].as_array().unwrap() {
            seen.push(j["job"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        (0..7).map(|i| format!("build-{i}")).collect::<Vec<_>>()
    );

    let (_, page) = d.get("/v1/jobs?status=succeeded").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(page["jobs"][0]["job"], "build-3");
    let (_, page) = d.get("/v1/jobs?status=failed&prefix=deploy").await;
    assert_eq!(page["jobs"][0]["job"], "deploy-1");

    let (status, err) = d.get("/v1/jobs?cursor=not%20an%20id").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&err), "invalid_cursor");
    let (status, err) = d.get("/v1/jobs?status=done").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&err), "invalid_body");
    let (status, _) = d.get("/v1/jobs?limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Over the maximum reads as the maximum.
    let (status, _) = d.get("/v1/jobs?limit=5000").await;
    assert_eq!(status, StatusCode::OK);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_by_seq() {
    let d = Daemon::start().await;
    let batch: Vec<Value> = (1..=30).map(|i| json!({"current": i})).collect();
    d.publish_ok("j", Value::Array(batch)).await;
    let (status, page) = d.get("/v1/jobs/j/events?after=10&limit=5").await;
    assert_eq!(status, StatusCode::OK);
    let seqs: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![11, 12, 13, 14, 15]);
    assert_eq!(page["first_seq"], 1);
    assert_eq!(page["last_seq"], 30);
    let e = &page["events"][0];
    assert_eq!(e["job"], "j");
    assert_eq!(e["current"], 11);
    assert!(e["offset"].is_u64() && e["at"].is_string());
    let (_, page) = d.get("/v1/jobs/j/events").await;
    assert_eq!(page["events"].as_array().unwrap().len(), 30);
    let (_, page) = d.get("/v1/jobs/j/events?after=30").await;
    assert!(page["events"].as_array().unwrap().is_empty());
    let (status, err) = d.get("/v1/jobs/j/events?after=x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&err), "invalid_last_event_id");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_job_and_history_and_the_id_starts_afresh() {
    let d = Daemon::start().await;
    d.publish_ok("j", json!([{"percent": 1}, {"percent": 2}]))
        .await;
    let res = d.http.delete(d.url("/v1/jobs/j")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let (status, err) = d.get("/v1/jobs/j").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&err), "job_not_found");
    let (status, _) = d.get("/v1/jobs/j/events").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let res = d.http.delete(d.url("/v1/jobs/j")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // A new job with the same id: seq starts at 1, none of the old history shows.
    assert_eq!(d.publish_ok("j", json!({"percent": 9})).await, 1);
    let events = d.history("j").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["percent"], 9.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics() {
    let d = Daemon::start().await;
    let (status, body) = d.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    let (status, body) = d.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    d.publish_ok("j", json!([{"percent": 1}, {"percent": 2}]))
        .await;
    let (_, mut sse) = d.sse("/v1/jobs/j/stream", None).await;
    assert_eq!(sse.expect().await.event, "snapshot");
    let text = d.metrics().await;
    assert!(
        text.contains("progressd_events_published_total 2"),
        "{text}"
    );
    assert!(
        text.contains("progressd_subscribers{transport=\"sse\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("progressd_subscribers{transport=\"ws\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE progressd_task_failures_total counter"),
        "{text}"
    );
    assert!(text.contains("progressd_jobs 1"), "{text}");
    d.stop().await;
}

/// Found by schemathesis: a cookie that is not ASCII (a browser's, unrelated to us) made
/// every /v1 request fail, some with 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_non_ascii_cookie_does_not_break_requests() {
    let d = Daemon::start().await;
    let cookie = reqwest::header::HeaderValue::from_bytes("theme=café".as_bytes()).unwrap();
    let res = d
        .http
        .get(d.url("/v1/jobs/x"))
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let res = d
        .http
        .post(d.url("/v1/jobs/x/events"))
        .header("cookie", cookie)
        .json(&json!({"percent": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    d.stop().await;
}
