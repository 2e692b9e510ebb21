//! One WatchReadings stream: the batches after its cursor from the
//! database, then live ones from the broadcast, with no gap and no
//! duplicate at the switch.
//!
//! The stream subscribes before it reads the database, so a batch committed
//! meanwhile is in both; positions it has passed are skipped. It takes a
//! live batch only at the very next position: anything further means the
//! broadcast ran ahead of it (it lagged, or it subscribed while the follower
//! was skipping reads for want of watchers), and it reads the database
//! again. Positions are gap-free, so "the next one" is exact.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{OwnedSemaphorePermit, broadcast, mpsc, watch};

use super::cursor::{Cursor, CursorKey};
use super::{FeedConfig, FeedError, expired, page_is_full, stopped};
use crate::domain::time::{UnixNanos, now_unix_nanos};
use crate::metrics::Metrics;
use crate::storage::Store;
use crate::storage::feed::FeedBatch;

/// Readings of one series of one batch: the dedup key of reading `i` is
/// (device, `batch_sequence`, `first_index + i`).
#[derive(Debug, Clone, PartialEq)]
pub struct FeedChunk {
    pub device_id: String,
    pub sensor: String,
    pub unit: String,
    pub times: Vec<i64>,
    pub values: Vec<f64>,
    pub position: u64,
    pub batch_sequence: u64,
    pub first_index: u32,
    pub committed_unix_nano: UnixNanos,
    /// Resumes right after this chunk.
    pub cursor: String,
}

/// What a watch stream carries.
#[derive(Debug)]
pub enum WatchItem {
    Chunk(FeedChunk),
    /// Nothing was sent for a while (or the stream starts): every batch up
    /// to the cursor was considered.
    Heartbeat {
        cursor: String,
        position: u64,
        time: UnixNanos,
    },
    /// The stream ends: the server is stopping, storage failed, or
    /// retention overtook a slow stream.
    End(FeedError),
}

/// What a stream follows: `None` devices means all.
pub(super) struct Selection {
    pub devices: Option<HashSet<i64>>,
    pub sensors: HashSet<String>,
}

impl Selection {
    fn wants_device(&self, pk: i64) -> bool {
        self.devices.as_ref().is_none_or(|d| d.contains(&pk))
    }

    fn wants_sensor(&self, sensor: &str) -> bool {
        self.sensors.is_empty() || self.sensors.contains(sensor)
    }
}

pub(super) struct WatchStream {
    pub store: Store,
    pub key: CursorKey,
    pub live: broadcast::Sender<Arc<FeedBatch>>,
    pub selection: Selection,
    pub config: FeedConfig,
    pub metrics: Arc<Metrics>,
    pub stopping: watch::Receiver<bool>,
    /// Held while the stream runs: `--max-watch-streams`.
    pub _permit: OwnedSemaphorePermit,
}

/// Whether the client is still there.
type Open = bool;

impl WatchStream {
    pub(super) async fn run(self, mut cursor: Cursor, announce: bool, tx: mpsc::Sender<WatchItem>) {
        self.metrics.watch_streams_open.inc();
        let mut last_sent = Instant::now();
        let mut stopping = self.stopping.clone();
        let end = if announce && !self.heartbeat(cursor, &tx, &mut last_sent).await {
            None
        } else {
            self.follow(&mut cursor, &tx, &mut last_sent, &mut stopping)
                .await
        };
        if let Some(end) = end {
            let _ = tx.send(WatchItem::End(end)).await;
        }
        self.metrics.watch_streams_open.dec();
    }

    /// Returns why the stream ended, or `None` if the client went away.
    async fn follow(
        &self,
        cursor: &mut Cursor,
        tx: &mpsc::Sender<WatchItem>,
        last_sent: &mut Instant,
        stopping: &mut watch::Receiver<bool>,
    ) -> Option<FeedError> {
        loop {
            let mut live = self.live.subscribe();
            match self.catch_up(cursor, tx, last_sent).await {
                Ok(true) => {}
                Ok(false) => return None,
                Err(error) => {
                    if let FeedError::Storage(e) = &error {
                        tracing::error!(error = %e, "readings watch cannot read the feed");
                    }
                    return Some(error);
                }
            }
            loop {
                // A heartbeat is due this long after the last message,
                // whatever it was: a quiet stream hears from the server at
                // least this often.
                let due = tokio::time::Instant::from_std(*last_sent + self.config.heartbeat);
                tokio::select! {
                    received = live.recv() => match received {
                        Ok(batch) => {
                            let next = cursor.first_unread();
                            if batch.position < next {
                                continue;
                            }
                            if batch.position > next {
                                // The broadcast is ahead: read the rest
                                // from the database.
                                break;
                            }
                            if !self.send_batch(&batch, cursor, tx, last_sent).await {
                                return None;
                            }
                        }
                        Err(RecvError::Lagged(missed)) => {
                            self.metrics.watch_streams_lagged.inc();
                            tracing::debug!(missed, position = cursor.position, "slow readings watcher catches up from the database");
                            break;
                        }
                        Err(RecvError::Closed) => return Some(FeedError::ShuttingDown),
                    },
                    () = tokio::time::sleep_until(due) => {
                        if !self.heartbeat(*cursor, tx, last_sent).await {
                            return None;
                        }
                    }
                    () = stopped(stopping) => return Some(FeedError::ShuttingDown),
                    () = tx.closed() => return None,
                }
            }
        }
    }

    /// Sends the stored batches after the cursor; false if the client went
    /// away.
    async fn catch_up(
        &self,
        cursor: &mut Cursor,
        tx: &mpsc::Sender<WatchItem>,
        last_sent: &mut Instant,
    ) -> Result<Open, FeedError> {
        loop {
            let next = cursor.first_unread();
            let batches = self
                .store
                .feed_after(
                    next.saturating_sub(1),
                    self.config.page_batches,
                    self.config.page_readings,
                )
                .await?;
            let full = page_is_full(
                &batches,
                self.config.page_batches,
                self.config.page_readings,
            );
            // Nothing at `next`, or something later: retention may have
            // overtaken the stream.
            if batches.first().is_none_or(|b| b.position != next) {
                let bounds = self.store.feed_bounds().await?;
                if let Some(gone) = expired(&self.key, *cursor, bounds) {
                    return Err(gone);
                }
            }
            for batch in &batches {
                if batch.position != cursor.first_unread() {
                    return Err(FeedError::Storage(crate::storage::StorageError::Corrupt(
                        format!(
                            "readings feed: position {} follows {}",
                            batch.position, cursor.position
                        ),
                    )));
                }
                if !self.send_batch(batch, cursor, tx, last_sent).await {
                    return Ok(false);
                }
                // A long replay that the selection mostly skips still tells
                // the client how far it got.
                if last_sent.elapsed() >= self.config.heartbeat
                    && !self.heartbeat(*cursor, tx, last_sent).await
                {
                    return Ok(false);
                }
            }
            if !full {
                return Ok(true);
            }
        }
    }

    /// Sends the selected readings of `batch` still unread at `cursor`, in
    /// chunks, and moves the cursor past the batch.
    async fn send_batch(
        &self,
        batch: &FeedBatch,
        cursor: &mut Cursor,
        tx: &mpsc::Sender<WatchItem>,
        last_sent: &mut Instant,
    ) -> Open {
        if !self.selection.wants_device(batch.device_pk) {
            *cursor = Cursor::after(batch.position);
            return true;
        }
        let rows_per_chunk = (self.config.chunk_bytes / 16).max(1);
        // (series, from, to) of every chunk, so the last one can carry the
        // cursor past the whole batch.
        let mut pieces = Vec::new();
        for (s, series) in batch.series.iter().enumerate() {
            if !self.selection.wants_sensor(&series.sensor) {
                continue;
            }
            let n = series.times.len();
            let mut from = if batch.position == cursor.position {
                (cursor.next_index.saturating_sub(series.first_index) as usize).min(n)
            } else {
                0
            };
            while from < n {
                let to = (from + rows_per_chunk).min(n);
                pieces.push((s, from, to));
                from = to;
            }
        }
        let count = pieces.len();
        for (i, (s, from, to)) in pieces.into_iter().enumerate() {
            let series = &batch.series[s];
            let after = if i + 1 == count {
                Cursor::after(batch.position)
            } else {
                Cursor {
                    position: batch.position,
                    next_index: series.first_index + to as u32,
                }
            };
            let chunk = FeedChunk {
                device_id: batch.device_id.clone(),
                sensor: series.sensor.clone(),
                unit: series.unit.clone(),
                times: series.times[from..to].to_vec(),
                values: series.values[from..to].to_vec(),
                position: batch.position,
                batch_sequence: batch.batch_sequence,
                first_index: series.first_index + from as u32,
                committed_unix_nano: batch.committed_unix_nano,
                cursor: self.key.issue(after),
            };
            if tx.send(WatchItem::Chunk(chunk)).await.is_err() {
                return false;
            }
            *cursor = after;
            *last_sent = Instant::now();
        }
        *cursor = Cursor::after(batch.position);
        true
    }

    async fn heartbeat(
        &self,
        cursor: Cursor,
        tx: &mpsc::Sender<WatchItem>,
        last_sent: &mut Instant,
    ) -> Open {
        *last_sent = Instant::now();
        tx.send(WatchItem::Heartbeat {
            cursor: self.key.issue(cursor),
            position: cursor.position,
            time: now_unix_nanos(),
        })
        .await
        .is_ok()
    }
}
