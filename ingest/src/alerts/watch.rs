//! One WatchAlerts stream: stored events after the cursor, then live ones,
//! with no gap and no duplicate at the switch.
//!
//! The watcher subscribes to live events before reading the stored ones, so
//! an event committed meanwhile is in both; ids below the cursor are
//! skipped. A watcher that falls behind the live buffer is told so by the
//! broadcast channel and catches up from the database: it never blocks the
//! engine (and so never blocks ingest) and never loses an event.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, watch};

use super::AlertEngine;
use crate::domain::alert::Severity;
use crate::domain::time::{UnixNanos, now_unix_nanos};
use crate::storage::alerts::AlertEventRecord;
use crate::storage::{StorageError, Store};

/// Which events a watcher wants.
#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    pub min_severity: Option<Severity>,
    /// Empty: all devices.
    pub devices: HashSet<String>,
    /// Empty: all rules.
    pub rules: HashSet<String>,
}

impl WatchFilter {
    pub fn matches(&self, e: &AlertEventRecord) -> bool {
        self.min_severity.is_none_or(|min| e.severity >= min)
            && (self.devices.is_empty() || self.devices.contains(&e.device_id))
            && (self.rules.is_empty() || self.rules.contains(&e.rule_id))
    }
}

/// What a watch stream carries.
#[derive(Debug, Clone)]
pub enum WatchItem {
    Event(Arc<AlertEventRecord>),
    /// Nothing for a while; every event up to `last_event_id` was considered.
    Heartbeat {
        last_event_id: u64,
        time: UnixNanos,
    },
    /// The stream ends: the server is stopping, or storage failed.
    End(WatchEnd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    ShuttingDown { last_event_id: u64 },
    StorageFailed { last_event_id: u64 },
}

/// Settings of watch streams.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub heartbeat: Duration,
    /// Events per database read while catching up.
    pub page: u32,
    /// Items buffered towards a slow client.
    pub buffer: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            page: 500,
            buffer: 64,
        }
    }
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Start {
    /// Events after this id.
    pub after: u64,
    /// Send a heartbeat naming the cursor first, for a client that did not
    /// choose it (one that starts "from now").
    pub announce: bool,
}

/// Starts a watch; the stream ends when the receiver is dropped.
pub fn start(
    store: Store,
    engine: AlertEngine,
    filter: WatchFilter,
    from: Start,
    config: WatchConfig,
    shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<WatchItem> {
    let (tx, rx) = mpsc::channel(config.buffer.max(1));
    tokio::spawn(async move {
        let _open = engine.metrics().stream("watch");
        let mut cursor = from.after;
        if from.announce {
            let beat = WatchItem::Heartbeat {
                last_event_id: cursor,
                time: now_unix_nanos(),
            };
            if tx.send(beat).await.is_err() {
                return;
            }
        }
        let end = run(
            &store,
            &engine,
            &filter,
            &mut cursor,
            &config,
            shutdown,
            &tx,
        )
        .await;
        if let Some(end) = end {
            let _ = tx.send(WatchItem::End(end)).await;
        }
    });
    rx
}

/// Returns why the stream ended, or `None` if the client went away.
async fn run(
    store: &Store,
    engine: &AlertEngine,
    filter: &WatchFilter,
    cursor: &mut u64,
    config: &WatchConfig,
    mut shutdown: watch::Receiver<bool>,
    tx: &mpsc::Sender<WatchItem>,
) -> Option<WatchEnd> {
    loop {
        let mut live = engine.subscribe();
        match catch_up(store, filter, cursor, config.page, tx).await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(error) => {
                tracing::error!(%error, "alert watch cannot read stored events");
                return Some(WatchEnd::StorageFailed {
                    last_event_id: *cursor,
                });
            }
        }
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + config.heartbeat,
            config.heartbeat,
        );
        loop {
            tokio::select! {
                received = live.recv() => match received {
                    Ok(event) => {
                        if event.event_id <= *cursor {
                            continue;
                        }
                        *cursor = event.event_id;
                        if filter.matches(&event) {
                            if tx.send(WatchItem::Event(event)).await.is_err() {
                                return None;
                            }
                            heartbeat.reset();
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        engine.metrics().alert_watchers_lagged.inc();
                        tracing::debug!(missed, cursor = *cursor, "slow alert watcher catches up from storage");
                        break;
                    }
                    Err(RecvError::Closed) => return Some(WatchEnd::ShuttingDown { last_event_id: *cursor }),
                },
                _ = heartbeat.tick() => {
                    let beat = WatchItem::Heartbeat { last_event_id: *cursor, time: now_unix_nanos() };
                    if tx.send(beat).await.is_err() {
                        return None;
                    }
                }
                () = stopping(&mut shutdown) => {
                    return Some(WatchEnd::ShuttingDown { last_event_id: *cursor });
                }
                () = tx.closed() => return None,
            }
        }
    }
}

/// Sends stored events after the cursor; false if the client went away.
async fn catch_up(
    store: &Store,
    filter: &WatchFilter,
    cursor: &mut u64,
    page: u32,
    tx: &mpsc::Sender<WatchItem>,
) -> Result<bool, StorageError> {
    loop {
        let events = store.alert_events_after(*cursor, page).await?;
        let last_page = events.len() < page as usize;
        for event in events {
            *cursor = event.event_id;
            if filter.matches(&event) && tx.send(WatchItem::Event(Arc::new(event))).await.is_err() {
                return Ok(false);
            }
        }
        if last_page {
            return Ok(true);
        }
    }
}

/// Resolves once the server begins shutting down (the guard `wait_for`
/// returns must not live across an await).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}
