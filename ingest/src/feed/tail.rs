//! The one task per server process that follows the feed: it reads newly
//! committed batches in position order and broadcasts them to watchers.
//!
//! It is woken by this process's group commit and polls for the batches
//! other processes commit. Reading back rather than forwarding what the
//! writers hand over keeps commit order across writers and processes
//! without coordinating them (positions are gap-free and visible in
//! order, see `storage::feed`). While nobody watches, it follows only the
//! counter: the log is not read for nobody.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, broadcast, watch};

use crate::metrics::{ConsumerLabel, Metrics};
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

/// How often the named consumers' lag metrics are brought up to date.
const CONSUMER_LAG_EVERY: Duration = Duration::from_secs(5);

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
    let mut lags = tokio::time::interval(CONSUMER_LAG_EVERY);
    lags.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut consumers = HashSet::new();
    loop {
        tokio::select! {
            () = committed.notified() => {}
            _ = tick.tick() => {}
            _ = lags.tick() => {
                consumer_lags(&store, &metrics, last, &mut consumers).await;
                continue;
            }
            () = super::stopped(&mut stopping) => break,
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

/// Sets each named consumer's lag metric against `last`, and removes the
/// metric of a consumer deleted since (by any process); `known` is the
/// names the last call saw.
async fn consumer_lags(store: &Store, metrics: &Metrics, last: u64, known: &mut HashSet<String>) {
    match store.consumers().await {
        Ok(consumers) => {
            let now: HashSet<String> = consumers.iter().map(|c| c.name.clone()).collect();
            for gone in known.difference(&now) {
                metrics.feed_consumer_lag.remove(&ConsumerLabel {
                    consumer: gone.clone(),
                });
            }
            for record in &consumers {
                super::record_lag(metrics, record, last);
            }
            *known = now;
        }
        Err(error) => tracing::warn!(%error, "readings feed: cannot read the named consumers"),
    }
}
