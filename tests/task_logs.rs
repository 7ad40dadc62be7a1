//! A supervised task that fails is logged with its name and counted in `/metrics`.
//!
//! Alone in its test binary: it captures logs with a global subscriber, and tracing caches
//! per call site whether anyone listens. In a binary whose other tests hit the same call site
//! on other threads, a thread-local subscriber can miss the event.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use progressd::metrics::{Metrics, StoreGauges};
use progressd::supervisor::Supervisor;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_task_is_logged_by_name_and_counted() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let metrics = Arc::new(Metrics::default());
    let sup = Supervisor::new(CancellationToken::new(), Arc::clone(&metrics));
    sup.spawn("doomed", async { Err::<(), _>("disk on fire") });
    sup.spawn("panicky", async {
        if true {
            panic!("boom");
        }
        Ok::<(), String>(())
    });
    sup.spawn("fine", async { Ok::<(), String>(()) });
    assert!(sup.shutdown(Duration::from_secs(5)).await);

    assert_eq!(metrics.task_failures("doomed"), 1);
    assert_eq!(metrics.task_failures("panicky"), 1);
    assert_eq!(metrics.task_failures("fine"), 0);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("task=\"doomed\"") || text.contains("task=doomed"),
        "{text}"
    );
    assert!(text.contains("disk on fire"), "{text}");
    assert!(text.contains("boom"), "{text}");
    let rendered = metrics.render(&StoreGauges {
        jobs: 0,
        events: 0,
        watched_jobs: 0,
        head_offset: 0,
        disk_bytes: 0,
        ready: true,
    });
    assert!(rendered.contains("progressd_task_failures_total{task=\"doomed\"} 1"));
}
