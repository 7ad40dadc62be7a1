//! What sled alone costs per single-event publish, without HTTP or the writer around it: the
//! floor under `progressd bench publish -b 1` while every event is a few sled keys.
//!
//! `cargo bench --bench sled_commit` (release build). Each commit carries 4 publishes to 16
//! jobs in turn, as a group commit of the daemon does at 16 connections: per publish a job
//! record, a run and a log record; per commit the counters. Three ways to apply it:
//!
//! - `tx6`: one transaction over all six trees, as `Store::commit` did;
//! - `tx4`: one transaction over the four trees a publish touches, as it does now;
//! - `one`: every key in one tree, one batch (atomic by itself, no transaction).
//!
//! Knob: `SLED_COMMITS` (default 20,000). No fsync: this is the `relaxed` floor.

use std::time::Instant;

use sled::transaction::ConflictableTransactionError;
use sled::{Batch, Transactional};

const PUBLISHES_PER_COMMIT: u64 = 4;
const JOBS: u64 = 16;

fn main() {
    let commits: u64 = std::env::var("SLED_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    for variant in ["tx6", "tx4", "one"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .cache_capacity(64 << 20)
            .open()
            .expect("open sled");
        let per_publish = run(&db, variant, commits);
        println!("{variant}: {per_publish:.1} µs per publish ({commits} commits)");
    }
}

/// Applies `commits` commits the `variant` way; the mean time per publish, in µs.
fn run(db: &sled::Db, variant: &str, commits: u64) -> f64 {
    let names = ["jobs", "events", "log", "expiry", "meta", "idem"];
    let trees: Vec<sled::Tree> = names
        .iter()
        .map(|n| db.open_tree(n).expect("open tree"))
        .collect();
    let one = db.open_tree("all").expect("open tree");
    let (record, run, entry) = (vec![7u8; 120], vec![9u8; 80], vec![5u8; 30]);
    let started = Instant::now();
    let mut offset = 0u64;
    for commit in 0..commits {
        let mut batches: Vec<Batch> = (0..names.len()).map(|_| Batch::default()).collect();
        let mut single = Batch::default();
        for i in 0..PUBLISHES_PER_COMMIT {
            offset += 1;
            let job = (commit * PUBLISHES_PER_COMMIT + i) % JOBS;
            let job_key = format!("job-{job}").into_bytes();
            let mut run_key = [0u8; 16];
            run_key[..8].copy_from_slice(&job.to_be_bytes());
            run_key[8..].copy_from_slice(&(offset / JOBS + 1).to_be_bytes());
            let log_key = offset.to_be_bytes();
            batches[0].insert(job_key.as_slice(), record.as_slice());
            batches[1].insert(&run_key, run.as_slice());
            batches[2].insert(&log_key, entry.as_slice());
            single.insert([b"j".as_slice(), &job_key].concat(), record.as_slice());
            single.insert([b"e".as_slice(), &run_key].concat(), run.as_slice());
            single.insert([b"l".as_slice(), &log_key].concat(), entry.as_slice());
        }
        batches[4].insert(b"heads", vec![1u8; 40]);
        single.insert(b"mheads", vec![1u8; 40]);
        // The transactions take a slice of trees, as `Store::commit` does.
        let taking: &[usize] = match variant {
            "tx6" => &[0, 1, 2, 3, 4, 5],
            "tx4" => &[0, 1, 2, 4],
            _ => {
                one.apply_batch(single).expect("commit");
                continue;
            }
        };
        let in_tx: Vec<&sled::Tree> = taking.iter().map(|&i| &trees[i]).collect();
        in_tx
            .as_slice()
            .transaction(|views| {
                for (view, &i) in views.iter().zip(taking) {
                    view.apply_batch(&batches[i])?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .expect("commit");
    }
    started.elapsed().as_secs_f64() * 1e6 / (commits * PUBLISHES_PER_COMMIT) as f64
}
