//! Who may do what: JWT grants for publish, subscribe and admin; token sources; streams
//! that end with their token; the refusal to serve anonymously off loopback; CORS.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{ws_read, Api, Daemon, WsRead};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SECRET: &[u8] = b"a-test-secret-of-at-least-32-bytes!!";

fn token(claims: Value, ttl: Duration) -> String {
    let exp = (SystemTime::now() + ttl)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = claims;
    claims["exp"] = exp.into();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

fn grant(publish: &[&str], subscribe: &[&str], admin: bool) -> String {
    token(
        json!({"progressd": {"publish": publish, "subscribe": subscribe, "admin": admin}}),
        Duration::from_secs(3600),
    )
}

async fn secured() -> Daemon {
    Daemon::with(|c| c.jwt_secret = Some(SECRET.to_vec())).await
}

async fn call(
    d: &Daemon,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = d.http.request(method.parse().unwrap(), d.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_checked() {
    let d = secured().await;
    let (status, body) = call(&d, "GET", "/v1/jobs/j", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "unauthorized");
    let sign = |claims: Value, secret: &[u8]| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap()
    };
    let forged = sign(
        json!({"progressd": {"admin": true}, "exp": 4_000_000_000u64}),
        b"another-secret-another-secret-xx",
    );
    let (status, _) = call(&d, "GET", "/v1/jobs", Some(&forged), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let past = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 10;
    let expired = sign(json!({"progressd": {"admin": true}, "exp": past}), SECRET);
    let (status, _) = call(&d, "GET", "/v1/jobs", Some(&expired), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Probes need no token.
    let (status, _) = d.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_subscribe_and_admin_claims() {
    let d = secured().await;
    let worker = grant(&["build-*"], &[], false);
    let browser = grant(&[], &["build-42"], false);
    let admin = grant(&[], &[], true);
    let (status, _) = call(
        &d,
        "POST",
        "/v1/jobs/build-42/events",
        Some(&worker),
        Some(json!({"percent": 5})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    call(
        &d,
        "POST",
        "/v1/jobs/build-43/events",
        Some(&worker),
        Some(json!({"percent": 6})),
    )
    .await;
    let (status, body) = call(
        &d,
        "POST",
        "/v1/jobs/deploy-1/events",
        Some(&worker),
        Some(json!({"percent": 5})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"], "forbidden");
    // Reading needs subscribe.
    let (status, snap) = call(&d, "GET", "/v1/jobs/build-42", Some(&browser), None).await;
    assert_eq!(
        (status, snap["percent"].clone()),
        (StatusCode::OK, json!(5.0))
    );
    let (status, _) = call(&d, "GET", "/v1/jobs/build-43", Some(&browser), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(&d, "GET", "/v1/jobs/build-42", Some(&worker), None).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "publish does not imply subscribe"
    );
    let (status, _) = call(
        &d,
        "POST",
        "/v1/jobs/build-42/events",
        Some(&browser),
        Some(json!({"percent": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(&d, "GET", "/v1/jobs/build-43/events", Some(&browser), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Listing shows only what the token may read; a filter outside the claims is refused.
    let (status, list) = call(&d, "GET", "/v1/jobs", Some(&browser), None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["build-42"]);
    let (status, _) = call(&d, "GET", "/v1/jobs?prefix=deploy", Some(&browser), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(&d, "GET", "/v1/stream?job=build-43", Some(&browser), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Delete and export need admin.
    let (status, _) = call(&d, "DELETE", "/v1/jobs/build-43", Some(&worker), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(&d, "GET", "/v1/admin/export", Some(&browser), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let res = d
        .http
        .get(d.url("/v1/admin/export"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let (status, _) = call(&d, "DELETE", "/v1/jobs/build-43", Some(&admin), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_pass_the_token_by_query_or_cookie_and_multi_streams_are_filtered() {
    let d = secured().await;
    let worker = grant(&["*"], &[], false);
    let browser = grant(&[], &["mine-*"], false);
    // EventSource cannot set headers: ?access_token=.
    let (status, mut sse) = d
        .sse(&format!("/v1/stream?access_token={browser}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    call(
        &d,
        "POST",
        "/v1/jobs/theirs-1/events",
        Some(&worker),
        Some(json!({"percent": 1})),
    )
    .await;
    call(
        &d,
        "POST",
        "/v1/jobs/mine-1/events",
        Some(&worker),
        Some(json!({"percent": 2})),
    )
    .await;
    let ev = sse.expect().await;
    assert_eq!(
        ev.data["job"], "mine-1",
        "the other job's event was not delivered"
    );
    let res = d
        .http
        .get(d.url("/v1/jobs/mine-1"))
        .header("cookie", format!("theme=dark; progressd_token={browser}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_when_their_token_expires() {
    let d = secured().await;
    let worker = grant(&["*"], &[], false);
    call(
        &d,
        "POST",
        "/v1/jobs/j/events",
        Some(&worker),
        Some(json!({"percent": 1})),
    )
    .await;
    let short = token(
        json!({"progressd": {"subscribe": ["j"]}}),
        Duration::from_secs(3),
    );
    let (status, mut sse) = d
        .sse(&format!("/v1/jobs/j/stream?access_token={short}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let url = d.ws_url(&format!("/v1/jobs/j/ws?access_token={short}"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(sse.expect().await.event, "snapshot");
    // No `end` (the job goes on): the stream just closes; the socket closes with 1008.
    sse.expect_closed().await;
    loop {
        match ws_read(&mut ws).await {
            WsRead::Close(code) => {
                assert_eq!(code, Some(1008));
                break;
            }
            WsRead::Json(v) => assert_eq!(v["type"], "snapshot"),
        }
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_service_off_loopback_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_progressd"))
        .args([
            "check-config",
            "--listen",
            "0.0.0.0:7700",
            "--data-dir",
            "/tmp/x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--jwt-secret-file") && err.contains("--allow-anonymous"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_progressd"))
        .args([
            "check-config",
            "--listen",
            "0.0.0.0:7700",
            "--data-dir",
            "/tmp/x",
            "--allow-anonymous",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_preflight_for_listed_origins_only() {
    let d = Daemon::with(|c| c.cors_origins = vec!["https://app.example".into()]).await;
    let res = d
        .http
        .request(reqwest::Method::OPTIONS, d.url("/v1/jobs/j/events"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,idempotency-key",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(res.headers()["access-control-allow-credentials"], "true");
    let res = d
        .http
        .request(reqwest::Method::OPTIONS, d.url("/v1/jobs/j/events"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(res.headers().get("access-control-allow-origin").is_none());
    // A listed origin's real request gets the header too.
    let res = d
        .http
        .get(d.url("/healthz"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    d.stop().await;
}
