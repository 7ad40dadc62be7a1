//! The OpenAPI description (openapi/openapi.json) against the implementation: it is served,
//! it names every route, and schemathesis (from PyPI; `.ci/run` installs it) finds no
//! response that contradicts it and no server error, over every operation.

mod common;

use std::process::Command;

use common::{Api, Daemon};
use reqwest::StatusCode;
use serde_json::Value;

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_served_and_names_every_route() {
    let d = Daemon::start().await;
    let (status, served) = d.get("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let doc = document();
    assert_eq!(
        served, doc,
        "the served document is the one in the repository"
    );
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/v1/jobs/{job}/events", &["post", "get"][..]),
        ("/v1/jobs/{job}", &["get", "delete"]),
        ("/v1/jobs", &["get"]),
        ("/v1/jobs/{job}/stream", &["get"]),
        ("/v1/stream", &["get"]),
        ("/v1/jobs/{job}/ws", &["get"]),
        ("/v1/ws", &["get"]),
        ("/v1/admin/export", &["get"]),
        ("/v1/openapi.json", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
        ("/", &["get"]),
    ] {
        for m in methods {
            assert!(paths[path][*m].is_object(), "{m} {path} is not described");
        }
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_contradiction() {
    let d = Daemon::with(|c| c.keepalive = std::time::Duration::from_secs(1)).await;
    let base = d.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-m", "schemathesis.cli", "run"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .args(["--url", &base])
            .args(SCHEMATHESIS_ARGS)
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
    })
    .await
    .unwrap()
    .expect("python3 is needed (and schemathesis: pip install schemathesis==4.32.5)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("No module named schemathesis"),
        "schemathesis is not installed: pip install schemathesis==4.32.5"
    );
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    println!(
        "{}",
        text.lines().rev().take(12).collect::<Vec<_>>().join("\n")
    );
    d.stop().await;
}

/// The checks and bounds of the run: every check but those that cannot hold here
/// (`positive_data_acceptance`: WebSocket endpoints refuse plain GETs, and JSON Schema calls
/// 45.0 an integer; `negative_data_rejection`: Last-Event-ID overrides a bad `?after=`;
/// `ignored_auth`: auth is off in this run). SSE streams never end by themselves: a 1 s request timeout ends each one.
/// One worker: with two, schemathesis 4.32.5 now and then crashes in its own generation cache
/// (a `KeyError` raised inside `schemathesis.generation.coverage`, no check failing), a race
/// between its worker threads rather than anything the daemon answered.
const SCHEMATHESIS_ARGS: &[&str] = &[
    "--workers",
    "1",
    "--checks",
    "all",
    "--exclude-checks",
    "positive_data_acceptance,negative_data_rejection,ignored_auth",
    "--request-timeout",
    "1",
    "--max-examples",
    "30",
    "--generation-database",
    "none",
    "--no-color",
];
