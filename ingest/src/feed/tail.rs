//! The one task per server process that follows the feed: it reads newly
//! committed batches in position order and broadcasts them to watchers.
//!
//! It is woken by this process's group commit and polls for the batches
//! other processes commit. Reading back rather than forwarding what the
//! writers hand over keeps commit order across writers and processes
//! without coordinating them (positions are gap-free and visible in
//! order, see `storage::feed`). While nobody watches, it follows only the
//! counter: the log is not read for nobody.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, broadcast, watch};

use crate::metrics::Metrics;
use crate::storage::Store;
use crate::storage::feed::FeedBatch;

pub(super) struct Tail {
    pub store: Store,
    pub live: broadcast::Sender<Arc<FeedBatch>>,
    pub committed: Arc<Notify>,
    pub poll: Duration,
    /// Batches and readings per read.
    pub page: (u32, u32),
    /// The newest position already considered.
    pub last: u64,
    pub stopping: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
}

pub(super) async fn run(tail: Tail) {
    let Tail {
        store,
        live,
        committed,
        poll,
        page,
        mut last,
        mut stopping,
        metrics,
    } = tail;
    metrics.feed_last_position.set(last as i64);
    let mut tick = tokio::time::interval(poll.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = committed.notified() => {}
            _ = tick.tick() => {}
            _ = stopping.wait_for(|s| *s) => break,
        }
        loop {
            if live.receiver_count() == 0 {
                // A watcher that subscribes after this reads what it
                // needs from the database: it finds the broadcast ahead of
                // its cursor and catches up first.
                match store.feed_bounds().await {
                    Ok(bounds) => last = last.max(bounds.last),
                    Err(error) => {
                        tracing::warn!(%error, last, "readings feed: cannot read the counter")
                    }
                }
                break;
            }
            let batches = match store.feed_after(last, page.0, page.1).await {
                Ok(batches) => batches,
                Err(error) => {
                    // Nothing is lost: the next wake-up reads from `last`.
                    tracing::warn!(%error, last, "readings feed: cannot read committed batches");
                    break;
                }
            };
            let full = super::page_is_full(&batches, page.0, page.1);
            for batch in batches {
                last = batch.position;
                // No receiver is fine: watchers catch up from the database.
                let _ = live.send(Arc::new(batch));
            }
            if !full {
                break;
            }
        }
        metrics.feed_last_position.set(last as i64);
    }
    tracing::debug!("readings feed follower stopped");
}
