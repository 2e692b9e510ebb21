//! The readings feed: `WatchReadings`, every committed batch in commit
//! order, replayed from a cursor and then followed live, and named
//! consumers' committed cursors (`CommitReadingsCursor`).
//!
//! Positions are handed out by the group commit (`storage::feed`): gap-free,
//! visible in the order they were taken. One task per server process
//! ([`tail`]) reads newly committed batches back in position order and
//! broadcasts them; each watch stream ([`watch`]) subscribes, reads what it
//! missed from the database, then takes the broadcast, and goes back to the
//! database whenever the broadcast runs ahead of it. A watcher never slows
//! the writer: the broadcast drops what a slow watcher has not taken, and
//! that watcher reads it from the database instead.

pub mod cursor;
mod tail;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::domain::consumer::ConsumerName;
use crate::domain::time::{UnixNanos, now_unix_nanos};
use crate::metrics::{ConsumerLabel, Metrics};
use crate::storage::feed::{ConsumerRecord, FeedBatch, FeedBounds};
use crate::storage::{Chosen, ReadPool, StorageError, Store, Wanted};
pub use cursor::{Cursor, CursorError, CursorKey};
pub use watch::{FeedChunk, WatchItem};

/// The feed's settings (`ingest serve --feed-*`, `--max-watch-streams`).
#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// How often the feed is read for batches nobody announced: those
    /// other server processes committed (PostgreSQL).
    pub poll: Duration,
    /// A quiet stream sends its cursor at least this often.
    pub heartbeat: Duration,
    /// Batches per database read, at most ...
    pub page_batches: u32,
    /// ... and readings (one batch more at most): what a stream catching
    /// up holds at once.
    pub page_readings: u32,
    /// Batches the live broadcast holds for slow watchers before they
    /// must read from the database.
    pub live_batches: usize,
    /// Open WatchReadings streams, all callers together.
    pub max_streams: usize,
    /// Largest chunk, in bytes of readings (about).
    pub chunk_bytes: usize,
    /// Chunks queued towards each client.
    pub queued_chunks: usize,
    /// Devices a label selector may match, and ids one call may list.
    pub max_devices: usize,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(20),
            heartbeat: Duration::from_secs(1),
            page_batches: 256,
            page_readings: 32_768,
            live_batches: 1024,
            max_streams: 64,
            chunk_bytes: 64 * 1024,
            queued_chunks: 4,
            max_devices: 1000,
        }
    }
}

/// Which devices a watch follows.
#[derive(Debug, Clone)]
pub enum Devices {
    /// Every device, also those registered later: the change feed.
    All,
    Ids(Vec<String>),
    /// Devices carrying all these labels when the watch starts.
    Labels(std::collections::BTreeMap<String, String>),
}

/// Where a watch starts.
#[derive(Debug, Clone)]
pub enum StartFrom {
    /// After the newest committed batch.
    Now,
    /// At the oldest batch the feed still holds.
    Earliest,
    /// Right after a cursor a chunk or heartbeat carried.
    Cursor(String),
    /// At a named consumer's committed cursor.
    Consumer(ConsumerName),
}

#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub devices: Devices,
    /// Empty: every sensor.
    pub sensors: Vec<String>,
    pub start: StartFrom,
}

/// Why a feed call is refused or a watch ends.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Cursor(#[from] CursorError),
    #[error(
        "cursor is at position {position}, past the newest committed batch ({last}): it does not come from this feed"
    )]
    CursorAhead { position: u64, last: u64 },
    #[error(
        "the feed no longer holds the batches after this cursor (retention removed up to position {removed_through}); the earliest valid cursor is {earliest_cursor}"
    )]
    Expired {
        removed_through: u64,
        earliest_cursor: String,
    },
    #[error("consumer {0} does not exist (a consumer exists once it commits a cursor)")]
    NoSuchConsumer(ConsumerName),
    #[error("device {0} does not exist")]
    NoSuchDevice(String),
    #[error("devices: the selector matches more than {max} devices, the most one watch follows")]
    TooManyDevices { max: usize },
    #[error(
        "{open} WatchReadings streams are open (the server's limit, --max-watch-streams); retry later"
    )]
    Busy { open: usize, retry_after: Duration },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A named consumer with how far it is behind.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerStatus {
    pub name: String,
    pub cursor: String,
    pub position: u64,
    pub updated_unix_nano: UnixNanos,
    /// The newest committed position.
    pub last_position: u64,
    /// Batches committed after the consumer's cursor.
    pub lag_positions: u64,
    /// From the commit of the consumer's batch to the newest commit; `None`
    /// when the feed no longer holds either.
    pub lag_seconds: Option<f64>,
}

/// The feed's entry: shared by every WatchReadings call and the consumer
/// calls.
#[derive(Clone)]
pub struct Feed {
    store: Store,
    pool: ReadPool,
    key: CursorKey,
    live: broadcast::Sender<Arc<FeedBatch>>,
    streams: Arc<Semaphore>,
    config: FeedConfig,
    metrics: Arc<Metrics>,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Feed {
    /// Starts the task that follows the feed. `committed` is notified by
    /// this process's group commit after each commit.
    pub async fn start(
        store: &Store,
        config: FeedConfig,
        committed: Arc<Notify>,
        stopping: tokio::sync::watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, JoinHandle<()>), StorageError> {
        let key = CursorKey::new(store.server_secret("readings_feed_cursor_key").await?);
        let pool = ReadPool::open(store, 2).await?;
        let (live, _) = broadcast::channel(config.live_batches.max(1));
        let last = store.feed_bounds().await?.last;
        let task = tokio::spawn(tail::run(tail::Tail {
            store: store.clone(),
            live: live.clone(),
            committed,
            poll: config.poll,
            page: (config.page_batches.max(1), config.page_readings.max(1)),
            last,
            stopping: stopping.clone(),
            metrics: metrics.clone(),
        }));
        let feed = Self {
            store: store.clone(),
            pool,
            key,
            live,
            streams: Arc::new(Semaphore::new(config.max_streams.max(1))),
            config,
            metrics,
            stopping,
        };
        Ok((feed, task))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub fn max_devices(&self) -> usize {
        self.config.max_devices
    }

    /// Counts the readings of a chunk the handler sent.
    pub fn record_sent(&self, rows: usize) {
        self.metrics.watch_rows_sent.inc_by(rows as u64);
    }

    /// Starts a watch: refusals come back at once, items through the
    /// receiver.
    pub async fn watch(
        &self,
        request: WatchRequest,
    ) -> Result<mpsc::Receiver<WatchItem>, FeedError> {
        let permit = self
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| FeedError::Busy {
                open: self.config.max_streams,
                retry_after: Duration::from_secs(1),
            })?;
        let max = self.config.max_devices;
        let wanted = match &request.devices {
            Devices::All => None,
            Devices::Ids(ids) => Some(Wanted::Ids(ids)),
            Devices::Labels(labels) => Some(Wanted::Labels(labels)),
        };
        let devices = match wanted {
            None => None,
            Some(wanted) => match self.pool.choose_devices(wanted, max).await? {
                Chosen::Devices(found) => Some(found.iter().map(|d| d.pk).collect()),
                Chosen::Missing(id) => return Err(FeedError::NoSuchDevice(id)),
                Chosen::TooMany => return Err(FeedError::TooManyDevices { max }),
            },
        };
        let bounds = self.store.feed_bounds().await?;
        let (cursor, announce) = match &request.start {
            StartFrom::Now => (Cursor::after(bounds.last), true),
            StartFrom::Earliest => (Cursor::after(bounds.earliest.saturating_sub(1)), true),
            StartFrom::Cursor(text) => (self.key.check(text)?, false),
            StartFrom::Consumer(name) => {
                let record = self
                    .store
                    .consumer(name.as_str())
                    .await?
                    .ok_or_else(|| FeedError::NoSuchConsumer(name.clone()))?;
                (
                    Cursor {
                        position: record.position,
                        next_index: record.next_index,
                    },
                    true,
                )
            }
        };
        self.check_reachable(cursor, bounds)?;
        let (tx, rx) = mpsc::channel(self.config.queued_chunks.max(1));
        let stream = watch::WatchStream {
            store: self.store.clone(),
            key: self.key.clone(),
            live: self.live.clone(),
            selection: watch::Selection {
                devices,
                sensors: request.sensors.into_iter().collect(),
            },
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            stopping: self.stopping.clone(),
            _permit: permit,
        };
        tokio::spawn(stream.run(cursor, announce, tx));
        Ok(rx)
    }

    /// Refuses a cursor the feed cannot continue from: ahead of it, or
    /// behind what retention left.
    fn check_reachable(&self, cursor: Cursor, bounds: FeedBounds) -> Result<(), FeedError> {
        if cursor.position > bounds.last {
            return Err(FeedError::CursorAhead {
                position: cursor.position,
                last: bounds.last,
            });
        }
        expired(&self.key, cursor, bounds).map_or(Ok(()), Err)
    }

    /// Stores `cursor` as the consumer's position, creating the consumer.
    pub async fn commit_cursor(
        &self,
        name: &ConsumerName,
        cursor: &str,
    ) -> Result<ConsumerStatus, FeedError> {
        let cursor = self.key.check(cursor)?;
        let bounds = self.store.feed_bounds().await?;
        if cursor.position > bounds.last {
            return Err(FeedError::CursorAhead {
                position: cursor.position,
                last: bounds.last,
            });
        }
        self.store
            .commit_consumer(
                name.as_str(),
                cursor.position,
                cursor.next_index,
                now_unix_nanos(),
            )
            .await?;
        let record = self
            .store
            .consumer(name.as_str())
            .await?
            .ok_or_else(|| FeedError::NoSuchConsumer(name.clone()))?;
        Ok(self.status(record, bounds).await?)
    }

    /// Every named consumer with its lag; sets the lag metrics too.
    pub async fn consumers(&self) -> Result<Vec<ConsumerStatus>, FeedError> {
        let bounds = self.store.feed_bounds().await?;
        let mut out = Vec::new();
        for record in self.store.consumers().await? {
            out.push(self.status(record, bounds).await?);
        }
        Ok(out)
    }

    pub async fn delete_consumer(&self, name: &ConsumerName) -> Result<(), FeedError> {
        if self.store.delete_consumer(name.as_str()).await? {
            self.metrics.feed_consumer_lag.remove(&ConsumerLabel {
                consumer: name.to_string(),
            });
            Ok(())
        } else {
            Err(FeedError::NoSuchConsumer(name.clone()))
        }
    }

    async fn status(
        &self,
        record: ConsumerRecord,
        bounds: FeedBounds,
    ) -> Result<ConsumerStatus, StorageError> {
        let cursor = Cursor {
            position: record.position,
            next_index: record.next_index,
        };
        let lag_positions = record_lag(&self.metrics, &record, bounds.last);
        let lag_seconds = if lag_positions == 0 {
            Some(0.0)
        } else {
            match (
                record.position_committed_unix_nano,
                self.store.feed_committed_at(bounds.last).await?,
            ) {
                (Some(at), Some(newest)) => Some((newest - at).max(0) as f64 / 1e9),
                _ => None,
            }
        };
        Ok(ConsumerStatus {
            cursor: self.key.issue(cursor),
            name: record.name,
            position: record.position,
            updated_unix_nano: record.updated_unix_nano,
            last_position: bounds.last,
            lag_positions,
            lag_seconds,
        })
    }
}

/// Batches committed after a consumer's cursor, also set as its metric.
fn record_lag(metrics: &Metrics, record: &ConsumerRecord, last: u64) -> u64 {
    let cursor = Cursor {
        position: record.position,
        next_index: record.next_index,
    };
    let lag = last.saturating_sub(cursor.first_unread().saturating_sub(1));
    metrics
        .feed_consumer_lag
        .get_or_create(&ConsumerLabel {
            consumer: record.name.clone(),
        })
        .set(lag as i64);
    lag
}

/// `Some` when retention removed a batch the reader at `cursor` has still
/// to read.
fn expired(key: &CursorKey, cursor: Cursor, bounds: FeedBounds) -> Option<FeedError> {
    (cursor.first_unread() < bounds.earliest).then(|| FeedError::Expired {
        removed_through: bounds.earliest - 1,
        earliest_cursor: key.issue(Cursor::after(bounds.earliest - 1)),
    })
}

/// Whether a page came back as large as asked (in batches or readings):
/// more may follow it. A shorter page reached the end of the feed.
fn page_is_full(batches: &[FeedBatch], page_batches: u32, page_readings: u32) -> bool {
    batches.len() >= page_batches as usize
        || batches.iter().map(FeedBatch::readings).sum::<usize>() >= page_readings as usize
}

/// Resolves once the server begins shutting down (the guard `wait_for`
/// returns must not live across an await).
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}
