//! Model-based property test of replay: any interleaving of publishes, subscribes,
//! disconnects, resumes and slow reads delivers to every subscriber each retained seq exactly
//! once and in order, or says `reset` (only when retention really dropped what it missed).
//!
//! It drives the real store, writer, hub and subscriptions (no HTTP), with tiny channels and a
//! tiny history so that lag, catch-up and trimming happen in almost every case.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use progressd::config::Durability;
use progressd::model::{JobId, Status, Update};
use progressd::subscription::{Filter, Frame, Source, Start};
use progressd::supervisor::Supervisor;
use progressd::Config;
use proptest::prelude::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const JOBS: usize = 2;
const CLIENTS: usize = 5;
const HISTORY: u64 = 6;

#[derive(Clone, Debug)]
enum Op {
    /// Publish `n` events (a batch when n > 1) to a job.
    Publish {
        job: usize,
        n: usize,
    },
    /// End a job (terminal status).
    Finish {
        job: usize,
    },
    /// Connect a client: fresh the first time, then resuming from what it has seen.
    Connect {
        client: usize,
    },
    Disconnect {
        client: usize,
    },
    /// Take whatever frames are ready, up to `max` (a slow reader reads little).
    Read {
        client: usize,
        max: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..JOBS, 1..8usize).prop_map(|(job, n)| Op::Publish { job, n }),
        1 => (0..JOBS).prop_map(|job| Op::Finish { job }),
        3 => (0..CLIENTS).prop_map(|client| Op::Connect { client }),
        2 => (0..CLIENTS).prop_map(|client| Op::Disconnect { client }),
        4 => (0..CLIENTS, 0..6usize).prop_map(|(client, max)| Op::Read { client, max }),
    ]
}

fn job_name(job: usize) -> String {
    format!("job-{job}")
}

/// What the model knows of a job.
#[derive(Default, Clone, Copy)]
struct JobModel {
    published: u64,
    finished: bool,
}

impl JobModel {
    fn first_retained(&self) -> u64 {
        self.published.saturating_sub(HISTORY) + 1
    }
}

/// A subscriber: clients 0..3 follow one job each (by seq), the last two follow all jobs
/// (by offset).
struct Client {
    job: Option<usize>,
    conn: Option<(mpsc::Receiver<Frame>, CancellationToken)>,
    /// Per-job stream: last seq seen. Multi-job stream: last offset seen.
    last: u64,
    /// Multi-job stream: last seq seen per job.
    seqs: BTreeMap<String, u64>,
    connected_once: bool,
    ended: bool,
}

impl Client {
    fn new(id: usize) -> Client {
        Client {
            job: (id < 3).then_some(id % JOBS),
            conn: None,
            last: 0,
            seqs: BTreeMap::new(),
            connected_once: false,
            ended: false,
        }
    }

    fn connect(&mut self, src: &Source, head: u64) {
        if self.conn.is_some() || self.ended {
            return;
        }
        if self.job.is_none() && !self.connected_once {
            // A fresh multi-job stream starts at the present.
            self.last = head;
        }
        let resume = self.connected_once.then_some(self.last);
        let (tx, rx) = mpsc::channel(2);
        let token = CancellationToken::new();
        match self.job {
            Some(job) => {
                let id = JobId::parse(&job_name(job)).unwrap();
                match src.open_job(id, resume).unwrap() {
                    Start::Follow(sub) => {
                        tokio::spawn(sub.run(src.clone(), tx, token.clone()));
                    }
                    Start::Finished(_) => {
                        self.ended = true;
                        return;
                    }
                    Start::Gone => panic!("no job is deleted in this model"),
                }
            }
            None => {
                let sub = src.open_many(Filter::default(), resume);
                tokio::spawn(sub.run(src.clone(), tx, token.clone()));
            }
        }
        self.connected_once = true;
        self.conn = Some((rx, token));
    }

    fn disconnect(&mut self) {
        if let Some((_, token)) = self.conn.take() {
            token.cancel();
        }
    }

    /// Checks one frame against the model.
    fn check(&mut self, frame: Frame, jobs: &[JobModel]) {
        match (self.job, frame) {
            (Some(job), Frame::Snapshot(snapshot)) => {
                let (reset, seq) = (snapshot.reset, snapshot.seq);
                if reset {
                    assert!(
                        self.last + 1 < jobs[job].first_retained(),
                        "reset without cause: client at {}, job retains from {}",
                        self.last,
                        jobs[job].first_retained()
                    );
                }
                assert!(
                    seq >= self.last,
                    "snapshot went back from {} to {seq}",
                    self.last
                );
                self.last = seq;
            }
            (Some(_), Frame::Event(e)) => {
                assert_eq!(e.seq, self.last + 1, "per-job stream: gap or duplicate");
                self.last = e.seq;
            }
            // A catch-up's page: the same checks, event by event.
            (job, Frame::Events(page)) => {
                assert!(job.is_some(), "a page on a multi-job stream");
                assert!(page.len() > 1, "a page of one event (sent as an event)");
                for e in page {
                    self.check(Frame::Event(e), jobs);
                }
            }
            (Some(_), Frame::End { .. }) => {
                self.ended = true;
                self.disconnect();
            }
            (None, Frame::Event(e)) => {
                assert!(e.offset > self.last, "offsets went back");
                self.last = e.offset;
                let seen = self.seqs.entry(e.job.to_string()).or_insert(e.seq - 1);
                assert_eq!(
                    e.seq,
                    *seen + 1,
                    "multi-job stream: gap or duplicate in {}",
                    e.job
                );
                *seen = e.seq;
            }
            (None, Frame::Position { offset }) => {
                // Only a first connection (no resume point) starts with one: the head when it
                // subscribed, from which it resumes if it drops before any event.
                assert!(self.seqs.is_empty(), "a position after events");
                assert_eq!(offset, self.last, "the stream starts at the head");
            }
            (None, Frame::ResetAll { offset, json }) => {
                let lost = self.seqs.iter().any(|(job, seq)| {
                    let j: usize = job.trim_start_matches("job-").parse().unwrap();
                    seq + 1 < jobs[j].first_retained()
                });
                assert!(
                    lost || self.seqs.len() < JOBS,
                    "multi-job reset without cause"
                );
                assert!(offset >= self.last);
                self.last = offset;
                let v: serde_json::Value = serde_json::from_str(&json).unwrap();
                for snap in v["jobs"].as_array().unwrap() {
                    self.seqs.insert(
                        snap["job"].as_str().unwrap().to_owned(),
                        snap["seq"].as_u64().unwrap(),
                    );
                }
            }
            (_, frame) => panic!("unexpected frame {frame:?}"),
        }
    }

    fn caught_up(&self, jobs: &[JobModel], head: u64) -> bool {
        match self.job {
            Some(job) => self.ended || self.last == jobs[job].published,
            None => self.last >= head,
        }
    }
}

/// Runs the ops and the final catch-up; returns (lag catch-ups, resets) seen by the daemon.
async fn run_model(ops: Vec<Op>, sync: bool) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path());
    config.durability = if sync {
        Durability::Sync
    } else {
        Durability::Relaxed
    };
    config.history = HISTORY;
    config.job_channel = 2;
    config.all_channel = 4;
    config.flush_interval = Duration::from_millis(5);
    let metrics = Arc::new(progressd::metrics::Metrics::default());
    let supervisor = Supervisor::new(CancellationToken::new(), Arc::clone(&metrics));
    let stop = CancellationToken::new();
    let src = progressd::open(&config, &supervisor, stop.clone()).unwrap();

    let mut jobs = [JobModel::default(); JOBS];
    let mut clients: Vec<Client> = (0..CLIENTS).map(Client::new).collect();
    let mut head = 0;
    for op in ops {
        match op {
            Op::Publish { job, n } => {
                if jobs[job].finished {
                    continue;
                }
                let changes = (0..n)
                    .map(|i| {
                        Update {
                            current: Some(jobs[job].published + i as u64 + 1),
                            ..Update::default()
                        }
                        .validate(1024)
                        .unwrap()
                    })
                    .collect();
                let id = JobId::parse(&job_name(job)).unwrap();
                let ack = src.writer.append(id, changes, None).await.unwrap();
                jobs[job].published += n as u64;
                assert_eq!(ack.seq, jobs[job].published, "seqs are dense");
                assert!(ack.offset > head, "offsets increase");
                head = ack.offset;
            }
            Op::Finish { job } => {
                if jobs[job].finished {
                    continue;
                }
                let change = Update {
                    status: Some(Status::Succeeded),
                    ..Update::default()
                }
                .validate(1024)
                .unwrap();
                let id = JobId::parse(&job_name(job)).unwrap();
                let ack = src.writer.append(id, vec![change], None).await.unwrap();
                jobs[job].published += 1;
                jobs[job].finished = true;
                head = ack.offset;
            }
            Op::Connect { client } => clients[client].connect(&src, head),
            Op::Disconnect { client } => clients[client].disconnect(),
            Op::Read { client, max } => {
                let c = &mut clients[client];
                for _ in 0..max {
                    let Some((rx, _)) = c.conn.as_mut() else {
                        break;
                    };
                    match rx.try_recv() {
                        Ok(frame) => c.check(frame, &jobs),
                        Err(_) => break,
                    }
                }
            }
        }
    }
    // Everyone (re)connects and reads until caught up.
    for c in &mut clients {
        c.connect(&src, head);
        while !c.caught_up(&jobs, head) {
            let Some((rx, _)) = c.conn.as_mut() else {
                panic!("client ended before catching up")
            };
            let frame = tokio::time::timeout(Duration::from_secs(3), rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "client never caught up: job {:?} last {} published {:?} head {head}",
                        c.job,
                        c.last,
                        c.job.map(|j| jobs[j].published)
                    )
                })
                .expect("subscription ended early");
            c.check(frame, &jobs);
        }
        c.disconnect();
    }
    stop.cancel();
    supervisor.shutdown(Duration::from_secs(5)).await;
    use std::sync::atomic::Ordering::Relaxed;
    (
        metrics.lag_catchups.load(Relaxed),
        metrics.resets.load(Relaxed),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The property below is only as good as the paths it reaches: this fixed run must go
/// through lag catch-up and reset.
#[test]
fn the_model_reaches_lag_and_reset() {
    let mut ops = vec![Op::Connect { client: 0 }, Op::Connect { client: 3 }];
    ops.extend((0..30).map(|_| Op::Publish { job: 0, n: 1 }));
    let (lags, resets) = runtime().block_on(run_model(ops, true));
    assert!(lags > 0, "no lag");
    assert!(resets > 0, "no reset");
}

/// A catch-up reaches its stream a page at a time (one message, one wake-up), not an event
/// at a time; what follows live comes as single events.
#[test]
fn a_catch_up_comes_in_pages() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path());
        config.history = 1000;
        let metrics = Arc::new(progressd::metrics::Metrics::default());
        let supervisor = Supervisor::new(CancellationToken::new(), Arc::clone(&metrics));
        let stop = CancellationToken::new();
        let src = progressd::open(&config, &supervisor, stop.clone()).unwrap();
        let job = || JobId::parse("paged").unwrap();
        let update = |n: u64| {
            Update {
                current: Some(n),
                ..Update::default()
            }
            .validate(1024)
            .unwrap()
        };
        for n in 1..=300 {
            src.writer
                .append(job(), vec![update(n)], None)
                .await
                .unwrap();
        }
        let Start::Follow(sub) = src.open_job(job(), Some(0)).unwrap() else {
            panic!("a job with events to replay");
        };
        let (tx, mut rx) = mpsc::channel(progressd::hub::OUTBOX);
        let token = CancellationToken::new();
        tokio::spawn(sub.run(src.clone(), tx, token.clone()));
        let mut pages = Vec::new();
        let mut next = 1;
        while next <= 300 {
            match rx.recv().await {
                Some(Frame::Events(page)) => {
                    pages.push(page.len());
                    for e in page {
                        assert_eq!(e.seq, next, "a page out of order");
                        next += 1;
                    }
                }
                other => panic!("expected a page of events, got {other:?}"),
            }
        }
        assert_eq!(pages, [256, 44], "pages of up to 256 events");
        src.writer
            .append(job(), vec![update(301)], None)
            .await
            .unwrap();
        match rx.recv().await {
            Some(Frame::Event(e)) => assert_eq!(e.seq, 301),
            other => panic!("expected the live event, got {other:?}"),
        }
        token.cancel();
        stop.cancel();
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn every_subscriber_gets_every_retained_seq_once_in_order_or_a_reset(
        ops in proptest::collection::vec(op(), 1..120),
        sync in any::<bool>(),
    ) {
        runtime().block_on(run_model(ops, sync));
    }
}
