//! The store: the only module that touches sled.
//!
//! Trees and their keys (all integers fixed-width big-endian, so sled's byte order is the
//! numeric order and a resume is a seek, not a scan):
//!
//! | tree     | key                                   | value                         |
//! |----------|---------------------------------------|-------------------------------|
//! | `jobs`   | job id                                | [`JobRecord`] (the snapshot)  |
//! | `events` | job num (8) + first seq (8)           | a run of events (see below)   |
//! | `log`    | first offset (8)                      | [`LogRecord`]                 |
//! | `expiry` | due ms (8) + kind (1) + job/offset/…  | empty                         |
//! | `meta`   | name                                  | u64                           |
//! | `idem`   | job id + 0 + idempotency key          | [`Remembered`] answer         |
//!
//! Values are encoded with bincode in [`codec`], the one place that knows the encoding.
//!
//! **Runs.** The events of one publish (one update or a batch) have consecutive seqs and
//! consecutive offsets, and are stored as one value: a *run*, with one log record naming it.
//! sled's cost is per key (every insert copies the leaf it lands in), so a batch of 100 costs
//! two inserts, not two hundred. Retention drops whole runs and rewrites the one it cuts
//! through (under its new first seq and first offset), so a run is always exactly what its log
//! record says. Readers get events and log entries one by one, as before.
//!
//! The layout has a version in `meta` (`layout`); a store written by an earlier progressd
//! (one key per event) is converted on open, in one transaction.
//!
//! The store does not decide anything: the writer (`writer.rs`) is its only mutator and hands
//! it a [`Mutation`] that it applies in one sled transaction. Reads are free for anyone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use thiserror::Error;

use crate::model::{Event, JobRecord};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store: cannot open {path}: {source}; {hint}")]
    Open {
        path: String,
        #[source]
        source: sled::Error,
        hint: &'static str,
    },
    #[error("store: {op}: {source}")]
    Sled {
        op: &'static str,
        #[source]
        source: sled::Error,
    },
    #[error(
        "store: {path} is damaged: it opens with offset {found}, but it had reached offset \
         {expected} (recorded in {marker}); restore the last export into an empty directory \
         with `progressd import` (progressd does not repair or delete data itself)"
    )]
    Damaged {
        path: String,
        marker: String,
        expected: u64,
        found: u64,
    },
    #[error("store: {op} panicked: {detail}")]
    Panicked { op: &'static str, detail: String },
    #[error("store: decode {what}: {detail}")]
    Decode { what: &'static str, detail: String },
    #[error("store: encode {what}: {detail}")]
    Encode { what: &'static str, detail: String },
}

impl StoreError {
    fn sled(op: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
        move |source| StoreError::Sled { op, source }
    }
}

/// A record of the global log, keyed by its (first) offset: every offset is either an event
/// of a run or the removal of a job, so a multi-job stream can replay deletions too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LogRecord {
    /// `count` events of job incarnation `num`, seqs from `first_seq`, offsets from the key.
    Run {
        job: String,
        num: u64,
        first_seq: u64,
        count: u64,
    },
    Removed {
        job: String,
        num: u64,
    },
}

/// One offset of the log, as [`Store::log_after`] reads it.
#[derive(Clone, Debug)]
pub enum Logged {
    Event {
        num: u64,
        event: Event,
    },
    Removed {
        job: String,
        num: u64,
    },
    /// An event of a job the reader did not ask for (read no further than its log record).
    Elsewhere,
}

/// What a group commit does to one run of events, keyed by (job num, first seq).
#[derive(Clone, Debug)]
pub enum RunChange {
    /// Store these events (non-empty; consecutive seqs and offsets) as one run.
    Put(Vec<Event>),
    /// Remove the stored run, and its log record at `first_offset`.
    Drop { first_offset: u64 },
}

/// Where a stored run starts and how long it is: read without decoding its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunHead {
    pub first_seq: u64,
    pub first_offset: u64,
    pub count: u64,
}

/// How the store was written before runs: one key per event, one log entry per offset.
/// Read only to convert such a store.
#[derive(Deserialize, Serialize)]
enum LegacyLogEntry {
    Event { job: String, num: u64, seq: u64 },
    Removed { job: String, num: u64 },
}

/// What the retention collector may have to do at a due time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// A finished job whose TTL has run out.
    Job(String),
    /// The tombstone of a removed job at this log offset.
    Tombstone(u64),
    /// The remembered answer to an idempotency key of a job.
    Idempotency { job: String, key: String },
}

/// The answer given to a publish with an idempotency key, remembered for the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub seq: u64,
    pub offset: u64,
    pub at_ms: u64,
}

/// Counters kept in the meta tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heads {
    /// Last global offset allocated.
    pub offset: u64,
    /// Last job number allocated.
    pub num: u64,
    /// Highest log offset dropped with a tombstone: a multi-job stream resuming before it
    /// cannot know what it missed.
    pub log_floor: u64,
    /// Events retained, all jobs together.
    pub events: u64,
    /// Jobs in the store.
    pub jobs: u64,
}

/// Everything one group commit changes, applied atomically by [`Store::commit`].
#[derive(Debug, Default)]
pub struct Mutation {
    pub jobs: Vec<(String, Option<JobRecord>)>,
    pub runs: Vec<((u64, u64), RunChange)>,
    /// Tombstones of removed jobs: (offset, job and num), or None to drop one.
    pub removals: Vec<(u64, Option<(String, u64)>)>,
    pub expiry: Vec<((u64, Expiry), bool)>,
    pub idem: Vec<((String, String), Option<Remembered>)>,
    pub heads: Option<Heads>,
}

/// Faults to inject at the store boundary, for tests and failure drills (`--fault`, hidden).
/// Shared: a test holding a clone can switch them while the daemon runs.
#[derive(Clone, Debug, Default)]
pub struct Faults(Arc<FaultState>);

#[derive(Debug, Default)]
struct FaultState {
    /// After this many flushes, every flush hangs: a wedged disk.
    stall_flush_after: Option<u64>,
    /// Every commit fails, as on a full disk or an I/O error.
    fail_writes: AtomicBool,
}

impl Faults {
    pub fn set_fail_writes(&self, fail: bool) {
        self.0.fail_writes.store(fail, Ordering::SeqCst);
    }
}

impl std::str::FromStr for Faults {
    type Err = String;

    fn from_str(s: &str) -> Result<Faults, String> {
        let state = match s.split_once('=') {
            Some(("stall-flush-after", n)) => FaultState {
                stall_flush_after: Some(
                    n.parse()
                        .map_err(|_| format!("{s:?}: expected stall-flush-after=N"))?,
                ),
                ..FaultState::default()
            },
            _ if s == "fail-writes" => FaultState {
                fail_writes: AtomicBool::new(true),
                ..FaultState::default()
            },
            _ => {
                return Err(format!(
                    "{s:?}: known faults are stall-flush-after=N and fail-writes"
                ))
            }
        };
        Ok(Faults(Arc::new(state)))
    }
}

/// A small file beside sled's, holding an offset the store is known to have made durable
/// (written after a flush, at most once a second, without fsync: it may lag, never lead).
/// On open, a store behind it is damaged.
struct Marker {
    path: PathBuf,
    last: Mutex<Option<Instant>>,
}

impl Marker {
    fn new(dir: &Path) -> Marker {
        Marker {
            path: dir.join("progressd.durable-offset"),
            last: Mutex::new(None),
        }
    }

    fn read(&self) -> Option<u64> {
        std::fs::read_to_string(&self.path)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Records `offset` if the last record is a second old.
    fn record(&self, offset: u64) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        self.force(offset);
    }

    fn force(&self, offset: u64) {
        // Write then rename: a reader sees the old number or the new one, never half.
        let tmp = self.path.with_extension("tmp");
        let written = std::fs::write(&tmp, offset.to_string())
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot record the durable offset");
        }
    }
}

/// The store: a handle, cheap to clone (every request and subscription holds one).
#[derive(Clone)]
pub struct Store(Arc<Trees>);

/// What a [`Store`] handle points to.
pub struct Trees {
    db: sled::Db,
    marker: Arc<Marker>,
    faults: Faults,
    flushes: Arc<AtomicU64>,
    jobs: sled::Tree,
    events: sled::Tree,
    log: sled::Tree,
    expiry: sled::Tree,
    meta: sled::Tree,
    idem: sled::Tree,
}

/// The [`Heads`], one record: a group commit writes one meta key, not one per counter.
const META_HEADS: &[u8] = b"heads";
/// The heads as layout 2 kept them, one key each (read to convert such a store).
const LEGACY_HEADS: [&[u8]; 5] = [b"offset", b"num", b"log_floor", b"events", b"jobs"];
const META_LAYOUT: &[u8] = b"layout";
/// The layout of the trees this build writes: 3 is runs with the heads in one record (2 was
/// runs with a key per head; 1, never recorded, one key per event).
const LAYOUT: u64 = 3;

impl std::ops::Deref for Store {
    type Target = Trees;

    fn deref(&self) -> &Trees {
        &self.0
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64, faults: Faults) -> Result<Store, StoreError> {
        let open_err = |source: sled::Error| StoreError::Open {
            path: dir.display().to_string(),
            hint: open_hint(&source),
            source,
        };
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // Durability comes from our own flushes (group commit); sled's timer flush only
            // adds writes the writer would issue anyway.
            .flush_every_ms(None)
            .open()
            .map_err(open_err)?;
        let tree = |name: &str| db.open_tree(name).map_err(open_err);
        let store = Store(Arc::new(Trees {
            faults,
            flushes: Arc::default(),
            marker: Arc::new(Marker::new(dir)),
            jobs: tree("jobs")?,
            events: tree("events")?,
            log: tree("log")?,
            expiry: tree("expiry")?,
            meta: tree("meta")?,
            idem: tree("idem")?,
            db,
        }));
        // sled recovers what it can read and carries on; a store that comes back behind
        // where it had durably been has lost data, and serving it would hide that. (Checked
        // before any conversion: a damaged store is kept as it was found.)
        let found = store.heads()?.offset;
        if let Some(expected) = store.marker.read().filter(|m| *m > found) {
            return Err(StoreError::Damaged {
                path: dir.display().to_string(),
                marker: store.marker.path.display().to_string(),
                expected,
                found,
            });
        }
        store.upgrade_layout()?;
        Ok(store)
    }

    /// Records the layout in a new store; converts a store of an earlier layout, in one
    /// transaction: a crash leaves it as it was. From layout 2 that is the heads alone; from 1
    /// (one key per event) also every event, to runs of one, and the transaction then holds
    /// the converted store in memory once, as large as the store's events.
    fn upgrade_layout(&self) -> Result<(), StoreError> {
        let layout = self
            .meta
            .get(META_LAYOUT)
            .map_err(StoreError::sled("read meta"))?
            .map(|v| codec::u64_from(&v));
        match layout {
            Some(LAYOUT) => return Ok(()),
            Some(newer) if newer > LAYOUT => {
                return Err(StoreError::Decode {
                    what: "store layout",
                    detail: format!(
                        "layout {newer} was written by a newer progressd (this one reads \
                         {LAYOUT}); run that version, or export with it and import here"
                    ),
                })
            }
            Some(_) | None => {}
        }
        let mut meta = sled::Batch::default();
        meta.insert(META_LAYOUT, &codec::u64_key(LAYOUT));
        // `heads` reads the layout-2 keys of a store not yet converted.
        meta.insert(META_HEADS, &codec::encode_heads(&self.heads()?)[..]);
        for key in LEGACY_HEADS {
            meta.remove(key);
        }
        if layout == Some(2) {
            // Runs already: the heads alone. One tree, so its batch is atomic by itself.
            self.meta
                .apply_batch(meta)
                .map_err(StoreError::sled("convert layout"))?;
            return self
                .db
                .flush()
                .map(drop)
                .map_err(StoreError::sled("flush converted layout"));
        }
        let mut events = sled::Batch::default();
        let mut converted = 0u64;
        for item in self.events.iter() {
            let (key, value) = item.map_err(StoreError::sled("read events"))?;
            let event: Event = codec::decode("event", &value)?;
            events.insert(key, codec::encode_run(std::slice::from_ref(&event))?);
            converted += 1;
        }
        let mut log = sled::Batch::default();
        for item in self.log.iter() {
            let (key, value) = item.map_err(StoreError::sled("read log"))?;
            let record = match codec::decode("log entry", &value)? {
                LegacyLogEntry::Event { job, num, seq } => LogRecord::Run {
                    job,
                    num,
                    first_seq: seq,
                    count: 1,
                },
                LegacyLogEntry::Removed { job, num } => LogRecord::Removed { job, num },
            };
            log.insert(key, codec::encode("log record", &record)?);
        }
        (&self.events, &self.log, &self.meta)
            .transaction(|(te, tl, tm)| {
                te.apply_batch(&events)?;
                tl.apply_batch(&log)?;
                tm.apply_batch(&meta)?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| transaction_error("convert layout", e))?;
        self.db
            .flush()
            .map_err(StoreError::sled("flush converted layout"))?;
        if converted > 0 {
            tracing::info!(events = converted, "store converted to the run layout");
        }
        Ok(())
    }

    /// The counters; all 0 in a new store. A store of layout 2 (one key per counter) is read
    /// as it is, since `open` checks it for damage before converting it.
    pub fn heads(&self) -> Result<Heads, StoreError> {
        let get = |key: &[u8]| self.meta.get(key).map_err(StoreError::sled("read meta"));
        if let Some(record) = get(META_HEADS)? {
            return codec::decode_heads(&record);
        }
        let mut legacy = [0u64; 5];
        for (n, key) in legacy.iter_mut().zip(LEGACY_HEADS) {
            *n = get(key)?.map(|v| codec::u64_from(&v)).unwrap_or(0);
        }
        let [offset, num, log_floor, events, jobs] = legacy;
        Ok(Heads {
            offset,
            num,
            log_floor,
            events,
            jobs,
        })
    }

    pub fn job(&self, job: &str) -> Result<Option<JobRecord>, StoreError> {
        self.jobs
            .get(job.as_bytes())
            .map_err(StoreError::sled("read job"))?
            .map(|v| codec::decode("job", &v))
            .transpose()
    }

    /// Jobs in id order after `cursor`, starting with `prefix`, that `keep` keeps; at most
    /// `limit`, and whether more follow.
    pub fn list_jobs(
        &self,
        cursor: Option<&str>,
        prefix: &str,
        keep: &dyn Fn(&str, &JobRecord) -> bool,
        limit: usize,
    ) -> Result<(Vec<(String, JobRecord)>, bool), StoreError> {
        let iter = match cursor {
            // Strictly after the cursor: the key followed by the smallest byte.
            Some(c) if c >= prefix => self.jobs.range([c.as_bytes(), &[0]].concat()..),
            _ => self.jobs.range(prefix.as_bytes()..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (key, value) = item.map_err(StoreError::sled("list jobs"))?;
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            let rec: JobRecord = codec::decode("job", &value)?;
            let job = codec::string_from(&key)?;
            if !keep(&job, &rec) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push((job, rec));
        }
        Ok((out, false))
    }

    /// Every job whose id starts with `prefix` (for the reset of a multi-job stream).
    pub fn jobs_with_prefix(&self, prefix: &str) -> Result<Vec<(String, JobRecord)>, StoreError> {
        self.jobs
            .scan_prefix(prefix.as_bytes())
            .map(|item| {
                let (key, value) = item.map_err(StoreError::sled("scan jobs"))?;
                Ok((codec::string_from(&key)?, codec::decode("job", &value)?))
            })
            .collect()
    }

    /// The remembered answer to idempotency key `key` of `job`, if any.
    pub fn remembered(&self, job: &str, key: &str) -> Result<Option<Remembered>, StoreError> {
        self.idem
            .get(codec::idem_key(job, key))
            .map_err(StoreError::sled("read idempotency key"))?
            .map(|v| codec::decode("idempotency record", &v))
            .transpose()
    }

    /// Every idempotency key remembered for `job`.
    pub fn remembered_keys(&self, job: &str) -> Result<Vec<String>, StoreError> {
        let prefix = codec::idem_key(job, "");
        self.idem
            .scan_prefix(&prefix)
            .map(|item| {
                let (k, _) = item.map_err(StoreError::sled("scan idempotency keys"))?;
                codec::string_from(&k[prefix.len()..])
            })
            .collect()
    }

    /// Up to `limit` retained events of job incarnation `num` with seq > `after`, in order.
    pub fn events_after(
        &self,
        num: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        let wanted = after.saturating_add(1);
        for item in self
            .events
            .range(self.run_key_holding(num, wanted)?..=codec::event_key(num, u64::MAX))
        {
            if out.len() >= limit {
                break;
            }
            let (_, value) = item.map_err(StoreError::sled("read events"))?;
            let events = codec::decode_run(&value)?;
            out.extend(
                events
                    .into_iter()
                    .filter(|e| e.seq >= wanted)
                    .take(limit - out.len()),
            );
        }
        Ok(out)
    }

    /// The key of the run of `num` that holds `seq`, or where one holding it would start.
    fn run_key_holding(&self, num: u64, seq: u64) -> Result<[u8; 16], StoreError> {
        let at = codec::event_key(num, seq);
        let before = self
            .events
            .range(codec::event_key(num, 0)..=at)
            .next_back()
            .transpose()
            .map_err(StoreError::sled("read events"))?;
        Ok(match before {
            Some((_, value)) => {
                let head = codec::run_head(&value)?;
                if head.first_seq + head.count > seq {
                    codec::event_key(num, head.first_seq)
                } else {
                    at
                }
            }
            None => at,
        })
    }

    /// Where up to `limit` stored runs of incarnation `num` start (the first at a seq ≥
    /// `from_seq`), in order: what the writer's trims and deletes need, without decoding
    /// any event.
    pub fn run_heads(
        &self,
        num: u64,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<RunHead>, StoreError> {
        self.events
            .range(codec::event_key(num, from_seq)..=codec::event_key(num, u64::MAX))
            .take(limit)
            .map(|item| {
                let (_, value) = item.map_err(StoreError::sled("read events"))?;
                codec::run_head(&value)
            })
            .collect()
    }

    /// Where the stored run of `num` that starts at `first_seq` is, if there is one (a point
    /// read: much cheaper in sled than a range).
    pub fn run_head_at(&self, num: u64, first_seq: u64) -> Result<Option<RunHead>, StoreError> {
        self.events
            .get(codec::event_key(num, first_seq))
            .map_err(StoreError::sled("read events"))?
            .map(|v| codec::run_head(&v))
            .transpose()
    }

    /// The events of the stored run of `num` that starts at `first_seq`.
    pub fn run(&self, num: u64, first_seq: u64) -> Result<Option<Vec<Event>>, StoreError> {
        self.events
            .get(codec::event_key(num, first_seq))
            .map_err(StoreError::sled("read events"))?
            .map(|v| codec::decode_run(&v))
            .transpose()
    }

    /// Up to `limit` offsets of the log after `after`, in order, with the events of the jobs
    /// `wanted` keeps (each run read once, however many of its events are taken).
    ///
    /// An offset with no entry was dropped by retention (or is an expired tombstone).
    pub fn log_after(
        &self,
        after: u64,
        limit: usize,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(u64, Logged)>, StoreError> {
        let mut out = Vec::new();
        let mut from = after.saturating_add(1);
        // A run missing when its record is read moved since (a trim stored it again from its
        // cut, under a new record) or was dropped. sled's iterator walks a copy of the leaf it
        // last read, which shows neither, so read the log again from there with a fresh one.
        // The same record read twice with its run missing is damage: skipped, a hole.
        let mut missing = None;
        'read: loop {
            // The run holding `from` may start before it.
            let start = match self
                .log
                .range(..=codec::u64_key(from))
                .next_back()
                .transpose()
                .map_err(StoreError::sled("read log"))?
            {
                Some((key, _)) => codec::u64_from(&key),
                None => from,
            };
            for item in self.log.range(codec::u64_key(start)..) {
                if out.len() >= limit {
                    break 'read;
                }
                let (key, value) = item.map_err(StoreError::sled("read log"))?;
                let first = codec::u64_from(&key);
                let room = limit - out.len();
                match codec::decode("log record", &value)? {
                    LogRecord::Removed { job, num } => {
                        if first >= from {
                            let entry = if wanted(&job) {
                                Logged::Removed { job, num }
                            } else {
                                Logged::Elsewhere
                            };
                            out.push((first, entry));
                        }
                    }
                    LogRecord::Run {
                        job,
                        num,
                        first_seq,
                        count,
                    } => {
                        let offsets = first.max(from)..first.saturating_add(count);
                        if offsets.is_empty() {
                            continue;
                        }
                        if !wanted(&job) {
                            out.extend(offsets.take(room).map(|o| (o, Logged::Elsewhere)));
                            continue;
                        }
                        let Some(events) = self.run(num, first_seq)? else {
                            if missing.replace((first, num, first_seq))
                                != Some((first, num, first_seq))
                            {
                                from = offsets.start;
                                continue 'read;
                            }
                            continue;
                        };
                        out.extend(
                            events
                                .into_iter()
                                .filter(|e| offsets.contains(&e.offset))
                                .take(room)
                                .map(|event| (event.offset, Logged::Event { num, event })),
                        );
                    }
                }
            }
            break;
        }
        Ok(out)
    }

    /// Expiries due at or before `now_ms`, oldest first.
    pub fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, Expiry)>, StoreError> {
        self.expiry
            .range(..codec::u64_key(now_ms.saturating_add(1)))
            .take(limit)
            .map(|item| {
                let (key, _) = item.map_err(StoreError::sled("read expiry"))?;
                codec::expiry_from(&key)
            })
            .collect()
    }

    /// Applies a mutation in one transaction: a crash keeps all of it or none of it.
    pub fn commit(&self, m: &Mutation) -> Result<(), StoreError> {
        if self.faults.0.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Sled {
                op: "commit",
                source: sled::Error::Io(std::io::Error::other("injected write failure")),
            });
        }
        let mut jobs = sled::Batch::default();
        for (key, rec) in &m.jobs {
            match rec {
                Some(rec) => jobs.insert(key.as_bytes(), codec::encode("job", rec)?),
                None => jobs.remove(key.as_bytes()),
            }
        }
        let mut events = sled::Batch::default();
        let mut log = sled::Batch::default();
        for ((num, first_seq), change) in &m.runs {
            let key = codec::event_key(*num, *first_seq);
            match change {
                RunChange::Put(run) => {
                    let Some(first) = run.first() else { continue };
                    events.insert(&key, codec::encode_run(run)?);
                    let record = LogRecord::Run {
                        job: first.job.clone(),
                        num: *num,
                        first_seq: *first_seq,
                        count: run.len() as u64,
                    };
                    log.insert(
                        &codec::u64_key(first.offset),
                        codec::encode("log record", &record)?,
                    );
                }
                RunChange::Drop { first_offset } => {
                    events.remove(&key);
                    log.remove(&codec::u64_key(*first_offset));
                }
            }
        }
        for (offset, removed) in &m.removals {
            let key = codec::u64_key(*offset);
            match removed {
                Some((job, num)) => {
                    let record = LogRecord::Removed {
                        job: job.clone(),
                        num: *num,
                    };
                    log.insert(&key, codec::encode("log record", &record)?);
                }
                None => log.remove(&key),
            }
        }
        let mut expiry = sled::Batch::default();
        for ((due, what), present) in &m.expiry {
            let key = codec::expiry_key(*due, what);
            if *present {
                expiry.insert(key, &[]);
            } else {
                expiry.remove(key);
            }
        }
        let mut idem = sled::Batch::default();
        for ((job, key), answer) in &m.idem {
            let k = codec::idem_key(job, key);
            match answer {
                Some(a) => idem.insert(k, codec::encode("idempotency record", a)?),
                None => idem.remove(k),
            }
        }
        let mut meta = sled::Batch::default();
        if let Some(h) = m.heads {
            meta.insert(META_HEADS, &codec::encode_heads(&h)[..]);
        }
        // Only the trees this commit writes take part in its transaction (usually four of
        // the six: jobs, events, log, meta).
        let writes = [
            (&self.jobs, jobs, !m.jobs.is_empty()),
            (&self.events, events, !m.runs.is_empty()),
            (&self.log, log, !m.runs.is_empty() || !m.removals.is_empty()),
            (&self.expiry, expiry, !m.expiry.is_empty()),
            (&self.meta, meta, m.heads.is_some()),
            (&self.idem, idem, !m.idem.is_empty()),
        ];
        let (trees, batches): (Vec<&sled::Tree>, Vec<sled::Batch>) = writes
            .into_iter()
            .filter(|(_, _, written)| *written)
            .map(|(tree, batch, _)| (tree, batch))
            .unzip();
        if trees.is_empty() {
            return Ok(());
        }
        trees
            .as_slice()
            .transaction(|views| {
                for (view, batch) in views.iter().zip(&batches) {
                    view.apply_batch(batch)?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| transaction_error("commit", e))
    }

    /// Makes every committed write durable. Concurrent callers share sled's flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let n = self.flushes.fetch_add(1, Ordering::Relaxed);
        if self
            .faults
            .0
            .stall_flush_after
            .is_some_and(|after| n >= after)
        {
            std::future::pending::<()>().await;
        }
        let committed = self.heads()?.offset;
        // On a blocking thread of tokio's rather than with `flush_async`, which hands the
        // flush to sled's IO pool: that pool wakes all its idle threads (seven) for every
        // job, and a flush is two jobs (the flush, then the write of the sealed buffer).
        let db = self.db.clone();
        crate::supervisor::blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Panicked {
                op: "flush",
                detail: e.to_string(),
            })?
            .map(drop)
            .map_err(StoreError::sled("flush"))?;
        self.marker.record(committed);
        Ok(())
    }

    /// Blocking flush, for shutdown.
    pub fn flush_now(&self) -> Result<(), StoreError> {
        let committed = self.heads()?.offset;
        self.db
            .flush()
            .map(drop)
            .map_err(StoreError::sled("flush"))?;
        self.marker.force(committed);
        Ok(())
    }

    /// Size of the store on disk, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Number of jobs (kept in the meta tree by the writer).
    pub fn job_count(&self) -> u64 {
        self.heads().map(|h| h.jobs).unwrap_or(0)
    }

    /// Number of retained events (kept in the meta tree by the writer).
    pub fn event_count(&self) -> u64 {
        self.heads().map(|h| h.events).unwrap_or(0)
    }
}

fn transaction_error(op: &'static str, e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(source) => StoreError::Sled { op, source },
        TransactionError::Abort(()) => StoreError::Sled {
            op,
            source: sled::Error::Unsupported("transaction aborted".into()),
        },
    }
}

/// What an operator should do when the store cannot be opened. progressd itself never
/// deletes or "repairs" a data directory.
fn open_hint(e: &sled::Error) -> &'static str {
    match e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            "the daemon's user cannot read or write it: fix its ownership or permissions"
        }
        sled::Error::Io(_) => {
            "another process may hold it (sled locks its directory: stop the other progressd or \
             give this one its own --data-dir), or the disk refused: check space and permissions"
        }
        sled::Error::Corruption { .. }
        | sled::Error::ReportableBug(_)
        | sled::Error::Unsupported(_)
        | sled::Error::CollectionNotFound(_) => {
            "its files are damaged: keep them for analysis, and restore the last export into an \
             empty directory with `progressd import` (progressd never repairs or deletes data)"
        }
    }
}

/// Keys and values: the one place that knows how things are laid out in bytes. Public so
/// that the fuzz tests can feed it arbitrary bytes; nothing else uses it.
pub mod codec {
    use serde::de::DeserializeOwned;
    use serde::Serialize;

    use super::{Expiry, Heads, RunHead, StoreError};
    use crate::model::{Change, Event};

    /// The largest record is a run: one request's events, at most `--max-body` (≤ 8 MiB,
    /// `config::MAX_BODY_LIMIT`) and a few bytes per event. A length prefix that claims more
    /// is damage, and must not become an allocation of that size; and nothing larger is ever
    /// written, since it could not be read back.
    pub const MAX_RECORD: usize = 16 << 20;

    // bincode 2 with its standard (varint) configuration; pinned in Cargo.toml because the
    // encoding is our on-disk format. The limit changes no byte of the format.
    fn config() -> impl bincode::config::Config {
        bincode::config::standard().with_limit::<MAX_RECORD>()
    }

    /// Encodes a record; refuses one larger than [`MAX_RECORD`], which decoding would refuse.
    pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
        let bytes =
            bincode::serde::encode_to_vec(value, config()).map_err(|e| StoreError::Encode {
                what,
                detail: e.to_string(),
            })?;
        if bytes.len() > MAX_RECORD {
            return Err(StoreError::Encode {
                what,
                detail: format!("{} bytes, over the limit of {MAX_RECORD}", bytes.len()),
            });
        }
        Ok(bytes)
    }

    pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
        bincode::serde::decode_from_slice(bytes, config())
            .map(|(v, _)| v)
            .map_err(|e| StoreError::Decode {
                what,
                detail: e.to_string(),
            })
    }

    /// A run as stored: where it starts, then the job once and each event's time and change
    /// (seq and offset follow from the position).
    #[derive(serde::Deserialize)]
    struct StoredRun {
        offset: u64,
        seq: u64,
        count: u64,
        job: String,
        items: Vec<(u64, Change)>,
    }

    /// Its leading fields alone: bincode decodes fields in order and leaves the rest unread.
    #[derive(serde::Deserialize)]
    struct StoredRunHead {
        offset: u64,
        seq: u64,
        count: u64,
    }

    /// Encodes a run of events (consecutive seqs and offsets, all of one job; non-empty).
    pub fn encode_run(events: &[Event]) -> Result<Vec<u8>, StoreError> {
        struct Items<'a>(&'a [Event]);
        impl serde::Serialize for Items<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|e| (e.at_ms, &e.change)))
            }
        }
        let first = events.first().ok_or_else(|| StoreError::Encode {
            what: "run",
            detail: "a run without events".into(),
        })?;
        encode(
            "run",
            &(
                first.offset,
                first.seq,
                events.len() as u64,
                &first.job,
                Items(events),
            ),
        )
    }

    /// The events of an encoded run.
    pub fn decode_run(bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
        let run: StoredRun = decode("run", bytes)?;
        let bad = || StoreError::Decode {
            what: "run",
            detail: format!(
                "it claims {} events and holds {}",
                run.count,
                run.items.len()
            ),
        };
        if run.count != run.items.len() as u64 {
            return Err(bad());
        }
        Ok(run
            .items
            .into_iter()
            .zip(0u64..)
            .map(|((at_ms, change), i)| Event {
                job: run.job.clone(),
                seq: run.seq.wrapping_add(i),
                offset: run.offset.wrapping_add(i),
                at_ms,
                change,
            })
            .collect())
    }

    /// Where an encoded run starts and how long it is, read without decoding its events.
    pub fn run_head(bytes: &[u8]) -> Result<RunHead, StoreError> {
        let head: StoredRunHead = decode("run", bytes)?;
        Ok(RunHead {
            first_seq: head.seq,
            first_offset: head.offset,
            count: head.count,
        })
    }

    /// The heads record: its five counters, fixed-width.
    pub fn encode_heads(h: &Heads) -> [u8; 40] {
        let mut out = [0u8; 40];
        let counters = [h.offset, h.num, h.log_floor, h.events, h.jobs];
        for (chunk, n) in out.chunks_exact_mut(8).zip(counters) {
            chunk.copy_from_slice(&n.to_be_bytes());
        }
        out
    }

    pub fn decode_heads(bytes: &[u8]) -> Result<Heads, StoreError> {
        if bytes.len() != 40 {
            return Err(StoreError::Decode {
                what: "heads",
                detail: format!("{} bytes, not 40", bytes.len()),
            });
        }
        let n = |i: usize| u64_from(&bytes[i * 8..i * 8 + 8]);
        Ok(Heads {
            offset: n(0),
            num: n(1),
            log_floor: n(2),
            events: n(3),
            jobs: n(4),
        })
    }

    pub fn u64_key(n: u64) -> [u8; 8] {
        n.to_be_bytes()
    }

    pub fn u64_from(bytes: &[u8]) -> u64 {
        let mut buf = [0u8; 8];
        let n = bytes.len().min(8);
        buf[..n].copy_from_slice(&bytes[..n]);
        u64::from_be_bytes(buf)
    }

    pub fn string_from(bytes: &[u8]) -> Result<String, StoreError> {
        String::from_utf8(bytes.to_vec()).map_err(|e| StoreError::Decode {
            what: "job id",
            detail: e.to_string(),
        })
    }

    pub fn event_key(num: u64, seq: u64) -> [u8; 16] {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&num.to_be_bytes());
        key[8..].copy_from_slice(&seq.to_be_bytes());
        key
    }

    const EXPIRE_JOB: u8 = b'J';
    const EXPIRE_TOMBSTONE: u8 = b'T';
    const EXPIRE_IDEMPOTENCY: u8 = b'I';

    /// Job ids hold no 0 byte, so `job 0 key` splits unambiguously and a job's keys share
    /// the prefix `job 0`.
    pub fn idem_key(job: &str, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(job.len() + 1 + key.len());
        k.extend_from_slice(job.as_bytes());
        k.push(0);
        k.extend_from_slice(key.as_bytes());
        k
    }

    pub fn expiry_key(due: u64, what: &Expiry) -> Vec<u8> {
        let mut key = due.to_be_bytes().to_vec();
        match what {
            Expiry::Job(job) => {
                key.push(EXPIRE_JOB);
                key.extend_from_slice(job.as_bytes());
            }
            Expiry::Tombstone(offset) => {
                key.push(EXPIRE_TOMBSTONE);
                key.extend_from_slice(&offset.to_be_bytes());
            }
            Expiry::Idempotency { job, key: idem } => {
                key.push(EXPIRE_IDEMPOTENCY);
                key.extend_from_slice(&idem_key(job, idem));
            }
        }
        key
    }

    pub fn expiry_from(key: &[u8]) -> Result<(u64, Expiry), StoreError> {
        let bad = || StoreError::Decode {
            what: "expiry key",
            detail: format!("{} bytes", key.len()),
        };
        if key.len() < 9 {
            return Err(bad());
        }
        let due = u64_from(&key[..8]);
        let what = match key[8] {
            EXPIRE_JOB => Expiry::Job(string_from(&key[9..])?),
            EXPIRE_TOMBSTONE if key.len() == 17 => Expiry::Tombstone(u64_from(&key[9..])),
            EXPIRE_IDEMPOTENCY => {
                let rest = &key[9..];
                let split = rest.iter().position(|b| *b == 0).ok_or_else(bad)?;
                Expiry::Idempotency {
                    job: string_from(&rest[..split])?,
                    key: string_from(&rest[split + 1..])?,
                }
            }
            _ => return Err(bad()),
        };
        Ok((due, what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Change;

    /// Opens the store in `dir` right after a handle on it was dropped. sled releases its
    /// directory lock once its IO threads are done with the last buffer they were handed,
    /// which may be a moment after the drop: wait for the lock rather than fail on it.
    fn reopen(dir: &Path) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir, 1 << 20, Faults::default()) {
                Err(StoreError::Open {
                    source: sled::Error::Io(e),
                    ..
                }) if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                other => return other,
            }
        }
    }

    fn event(job: &str, seq: u64, offset: u64) -> Event {
        Event {
            job: job.into(),
            seq,
            offset,
            at_ms: 1,
            change: Change {
                percent: Some(seq as f64),
                ..Change::default()
            },
        }
    }

    fn run(
        job: &str,
        num: u64,
        seqs: std::ops::RangeInclusive<u64>,
        offset: u64,
    ) -> ((u64, u64), RunChange) {
        let events: Vec<Event> = seqs
            .clone()
            .zip(offset..)
            .map(|(seq, offset)| event(job, seq, offset))
            .collect();
        ((num, *seqs.start()), RunChange::Put(events))
    }

    /// A store in a temp dir (kept alive by the returned guard) holding `runs` and `removals`.
    fn store_with(
        runs: Vec<((u64, u64), RunChange)>,
        removals: Vec<(u64, Option<(String, u64)>)>,
    ) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path()).unwrap();
        let m = Mutation {
            runs,
            removals,
            ..Mutation::default()
        };
        store.commit(&m).unwrap();
        (dir, store)
    }

    fn log_offsets(store: &Store, after: u64) -> Vec<u64> {
        let log = store.log_after(after, 100, &|_| true).unwrap();
        log.iter().map(|(offset, _)| *offset).collect()
    }

    fn seqs(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn keys_sort_numerically_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path()).unwrap();
        let mut m = Mutation::default();
        for seq in [1u64, 2, 255, 256, 70_000] {
            m.runs.push(run("a", 7, seq..=seq, seq));
        }
        m.runs.push(run("b", 8, 1..=1, 99));
        m.expiry.push(((5, Expiry::Job("a".into())), true));
        m.expiry.push(((3, Expiry::Tombstone(9)), true));
        let idem = Expiry::Idempotency {
            job: "a".into(),
            key: "k-1".into(),
        };
        m.expiry.push(((7, idem.clone()), true));
        m.heads = Some(Heads {
            offset: 99,
            num: 8,
            ..Heads::default()
        });
        store.commit(&m).unwrap();
        assert_eq!(
            seqs(&store.events_after(7, 1, 10).unwrap()),
            vec![2, 255, 256, 70_000]
        );
        assert_eq!(store.heads().unwrap().offset, 99);
        assert_eq!(
            store.due(10, 10).unwrap(),
            vec![
                (3, Expiry::Tombstone(9)),
                (5, Expiry::Job("a".into())),
                (7, idem)
            ]
        );
        assert_eq!(store.due(4, 10).unwrap().len(), 1);
    }

    /// A run is one value, but every read starts and stops at any event inside it.
    #[test]
    fn reads_start_and_stop_inside_runs() {
        // Job a: seqs 1–5 at offsets 1–5, then 6–9 at offsets 8–11; job b: 1–2 at 6–7.
        let (_dir, store) = store_with(
            vec![
                run("a", 1, 1..=5, 1),
                run("b", 2, 1..=2, 6),
                run("a", 1, 6..=9, 8),
            ],
            vec![(12, Some(("c".into(), 3)))],
        );
        assert_eq!(
            seqs(&store.events_after(1, 0, 100).unwrap()),
            (1..=9).collect::<Vec<_>>()
        );
        assert_eq!(
            seqs(&store.events_after(1, 3, 4).unwrap()),
            vec![4, 5, 6, 7]
        );
        assert_eq!(
            seqs(&store.events_after(1, 9, 4).unwrap()),
            Vec::<u64>::new()
        );
        let offsets: Vec<u64> = store
            .events_after(1, 5, 2)
            .unwrap()
            .iter()
            .map(|e| e.offset)
            .collect();
        assert_eq!(offsets, vec![8, 9]);
        assert_eq!(
            store.run_heads(1, 2, 10).unwrap(),
            vec![RunHead {
                first_seq: 6,
                first_offset: 8,
                count: 4
            }]
        );
        // The log from inside a run, with job b not wanted.
        let log = store.log_after(3, 7, &|job| job != "b").unwrap();
        let described: Vec<String> = log
            .iter()
            .map(|(offset, entry)| match entry {
                Logged::Event { num, event } => format!("{offset}:{num}/{}", event.seq),
                Logged::Removed { job, .. } => format!("{offset}:-{job}"),
                Logged::Elsewhere => format!("{offset}:~"),
            })
            .collect();
        assert_eq!(
            described,
            ["4:1/4", "5:1/5", "6:~", "7:~", "8:1/6", "9:1/7", "10:1/8"]
        );
        assert_eq!(log_offsets(&store, 10), vec![11, 12]);
        // Dropping a run takes its log record with it.
        let mut m = Mutation::default();
        m.runs.push(((1, 1), RunChange::Drop { first_offset: 1 }));
        store.commit(&m).unwrap();
        assert_eq!(log_offsets(&store, 0), (6..=12).collect::<Vec<_>>());
        assert_eq!(
            seqs(&store.events_after(1, 0, 100).unwrap()),
            vec![6, 7, 8, 9]
        );
    }

    /// A log record whose run is missing (damage) is read past, not read forever.
    #[test]
    fn a_log_record_without_its_run_is_a_hole() {
        let (_dir, store) = store_with(
            vec![
                run("a", 1, 1..=2, 1),
                run("a", 1, 3..=4, 3),
                run("a", 1, 5..=5, 5),
            ],
            Vec::new(),
        );
        store.events.remove(codec::event_key(1, 3)).unwrap();
        assert_eq!(log_offsets(&store, 0), vec![1, 2, 5]);
        assert_eq!(log_offsets(&store, 3), vec![5]);
    }

    /// A run too large to be read back is refused when written, not stored unreadable.
    #[test]
    fn a_run_over_the_record_limit_is_refused() {
        let mut big = event("a", 1, 1);
        big.change.message = Some("m".repeat(codec::MAX_RECORD));
        let err = codec::encode_run(&[big]).unwrap_err();
        assert!(
            matches!(err, StoreError::Encode { what: "run", .. }),
            "{err}"
        );
        // The largest request the configuration allows fits, with room to spare.
        let events: Vec<Event> = (1..=1000u64)
            .map(|seq| {
                let mut e = event("a", seq, seq);
                e.change.message = Some("m".repeat(crate::config::MAX_BODY_LIMIT / 1000));
                e
            })
            .collect();
        let run = codec::encode_run(&events).unwrap();
        assert_eq!(codec::decode_run(&run).unwrap().len(), 1000);
    }

    /// A store of layout 2 (a meta key per counter) opens with the same counters, kept in
    /// one record from then on; the damage check reads the old keys before the conversion.
    #[test]
    fn a_store_with_a_key_per_counter_is_converted_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let meta = db.open_tree("meta").unwrap();
            for (key, n) in LEGACY_HEADS.iter().zip([41u64, 7, 3, 30, 5]) {
                meta.insert(key, &codec::u64_key(n)).unwrap();
            }
            meta.insert(META_LAYOUT, &codec::u64_key(2)).unwrap();
            db.flush().unwrap();
        }
        let marker = Marker::new(dir.path());
        marker.force(42);
        let err = reopen(dir.path()).err();
        assert!(
            matches!(
                err,
                Some(StoreError::Damaged {
                    expected: 42,
                    found: 41,
                    ..
                })
            ),
            "{err:?}"
        );
        marker.force(41);
        let expected = Heads {
            offset: 41,
            num: 7,
            log_floor: 3,
            events: 30,
            jobs: 5,
        };
        let store = reopen(dir.path()).unwrap();
        assert_eq!(store.heads().unwrap(), expected);
        for key in LEGACY_HEADS {
            assert_eq!(store.meta.get(key).unwrap(), None);
        }
        let layout = store.meta.get(META_LAYOUT).unwrap().unwrap();
        assert_eq!(codec::u64_from(&layout), LAYOUT);
        drop(store);
        let store = reopen(dir.path()).unwrap();
        assert_eq!(store.heads().unwrap(), expected);
        // A layout from a later progressd is refused, not read as this one.
        store
            .meta
            .insert(META_LAYOUT, &codec::u64_key(LAYOUT + 1))
            .unwrap();
        drop(store);
        let err = reopen(dir.path()).err();
        assert!(
            matches!(
                err,
                Some(StoreError::Decode {
                    what: "store layout",
                    ..
                })
            ),
            "{err:?}"
        );
    }

    /// A store written with one key per event (progressd before runs) is converted on open
    /// and reads the same.
    #[test]
    fn a_store_of_the_earlier_layout_is_converted_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let (events, log) = (
                db.open_tree("events").unwrap(),
                db.open_tree("log").unwrap(),
            );
            for (seq, offset) in [(1u64, 1u64), (2, 2), (3, 4)] {
                let ev = event("a", seq, offset);
                events
                    .insert(
                        codec::event_key(1, seq),
                        codec::encode("event", &ev).unwrap(),
                    )
                    .unwrap();
                let entry = LegacyLogEntry::Event {
                    job: "a".into(),
                    num: 1,
                    seq,
                };
                log.insert(
                    codec::u64_key(offset),
                    codec::encode("log entry", &entry).unwrap(),
                )
                .unwrap();
            }
            let gone = LegacyLogEntry::Removed {
                job: "b".into(),
                num: 2,
            };
            log.insert(
                codec::u64_key(3),
                codec::encode("log entry", &gone).unwrap(),
            )
            .unwrap();
            db.flush().unwrap();
        }
        let store = reopen(dir.path()).unwrap();
        let events = store.events_after(1, 1, 10).unwrap();
        assert_eq!(seqs(&events), vec![2, 3]);
        assert_eq!(events[1].to_json(), event("a", 3, 4).to_json());
        let log = store.log_after(0, 10, &|_| true).unwrap();
        let kinds: Vec<(u64, bool)> = log
            .iter()
            .map(|(o, e)| {
                (
                    *o,
                    matches!(e, Logged::Removed { job, num: 2 } if job == "b"),
                )
            })
            .collect();
        assert_eq!(kinds, vec![(1, false), (2, false), (3, true), (4, false)]);
        drop(store);
        // Opened again: already converted, nothing changes.
        let store = reopen(dir.path()).unwrap();
        assert_eq!(seqs(&store.events_after(1, 0, 10).unwrap()), vec![1, 2, 3]);
    }
}
