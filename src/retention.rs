//! Retention in time: finished jobs expire `--finished-ttl` after they finished, and the
//! tombstones their removal leaves in the global log expire as long after that.
//!
//! This task only finds what is due (the store keeps an index ordered by due time) and asks
//! the writer to remove it; retention by count (`--history`) is done by the writer itself, in
//! the same transaction as the append that makes an event too old.

use std::time::Duration;

use thiserror::Error;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::model::now_ms;
use crate::store::{Store, StoreError};
use crate::writer::{WriteError, Writer};

/// Expiries handed to the writer at once.
const BATCH: usize = 512;

#[derive(Debug, Error)]
pub enum RetentionError {
    #[error("retention: {0}")]
    Store(#[from] StoreError),
    #[error("retention: {0}")]
    Write(#[from] WriteError),
}

pub async fn run(
    store: Store,
    writer: Writer,
    every: Duration,
    token: CancellationToken,
) -> Result<(), RetentionError> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = token.cancelled() => return Ok(()),
        }
        loop {
            let due = store.due(now_ms(), BATCH)?;
            let n = due.len();
            if n == 0 {
                break;
            }
            debug!(n, "expiring");
            writer.expire(due).await?;
            if n < BATCH {
                break;
            }
        }
    }
}
