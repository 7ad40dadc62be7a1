//! CI smoke of every `progressd bench` scenario against a live daemon: seconds long, and
//! asserting correctness only (all delivered, no gap, no duplicate) — speed is the
//! benchmark's to report, never a test's to assert.

mod common;

use std::process::Command;

use common::Process;
use serde_json::Value;

/// Runs `progressd bench ARGS --json` and returns its report, which must say `correct`.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_progressd"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not a report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "{args:?}: {report}");
    assert_eq!(report["correct"], Value::Bool(true), "{report}");
    report
}

#[test]
fn every_scenario_runs_and_is_correct() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Process::start(&dir.path().join("data"), &[]);
    let url = daemon.base.clone();
    let pid = daemon.child.id().to_string();
    let common = ["--url", &url, "--pid", &pid];
    let with = |scenario: &[&'static str]| -> Vec<&str> {
        scenario
            .iter()
            .copied()
            .chain(common.iter().copied())
            .collect()
    };

    let r = bench(&with(&["publish", "-c", "4", "-d", "1s"]));
    assert!(r["results"]["events"].as_u64().unwrap() > 0);
    assert_eq!(r["results"]["errors"], 0);
    let r = bench(&with(&["publish", "-c", "2", "-b", "50", "-d", "1s"]));
    assert_eq!(r["results"]["events"].as_u64().unwrap() % 50, 0);

    for transport in ["sse", "ws"] {
        let r = bench(&with(&[
            "fanout",
            "-s",
            "50",
            "-j",
            "2",
            "-r",
            "40",
            "-d",
            "1s",
            "--transport",
            transport,
        ]));
        let res = &r["results"];
        assert!(res["published"].as_u64().unwrap() >= 5, "{r}");
        assert_eq!(res["delivered"], res["expected"], "{r}");
        assert_eq!(
            res["expected"].as_u64().unwrap(),
            res["published"].as_u64().unwrap() * 25,
            "every subscriber expects its job's events: {r}"
        );
    }

    let r = bench(&with(&["idle", "-s", "200", "-t", "200ms"]));
    assert_eq!(r["results"]["open"], 200);
    assert!(r["results"]["server_rss_per_connection_kib"]
        .as_f64()
        .is_some());

    let r = bench(&with(&["resume-storm", "-s", "100", "-j", "4", "-n", "30"]));
    let res = &r["results"];
    assert_eq!(res["caught_up"], 100);
    // Each came back 30 behind and caught up from its own resume point: at least 30 each.
    assert!(res["delivered"].as_u64().unwrap() >= 100 * 31, "{r}");

    let startup_dir = dir.path().join("startup");
    let r = bench(&[
        "startup",
        "-e",
        "2000",
        "-j",
        "20",
        "--data-dir",
        startup_dir.to_str().unwrap(),
    ]);
    assert_eq!(r["results"]["events_stored"], 2000.0);
    assert!(r["results"]["ready_ms"].as_f64().unwrap() > 0.0);
}
