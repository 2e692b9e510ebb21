//! The read path: `QueryReadings`, a fleet's history streamed in bounded
//! memory. The handler (`grpc/ops.rs`) validates the request
//! ([`query::QueryRequest`]) and calls [`Reader::query`]; this folder takes
//! a stream permit, checks the resume token, resolves the devices and their
//! series, and spawns the task ([`stream`]) that reads storage page by page
//! into a bounded channel: a slow client fills the channel, the task waits,
//! and HTTP/2 flow control holds the rest back. A client that goes away
//! drops the channel's receiver, which ends the task.

pub mod buckets;
mod limits;
pub mod query;
mod runtime;
mod stream;
pub mod token;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::storage::{Chosen, ReadPool, StorageError, Store, Wanted};
pub use buckets::{Aggregate, BucketColumns, Bucketing, CalendarUnit};
pub use limits::{StreamLimits, StreamPermit};
pub use query::{InvalidQuery, QueryRequest, ReadQuery};
pub use runtime::ReadRuntime;
pub use token::{Position, TokenError, TokenKey};

/// The read path's settings (`ingest serve --read-*`, `--max-read-*`).
#[derive(Debug, Clone)]
pub struct ReadConfig {
    /// Largest chunk, in bytes of encoded message (about).
    pub chunk_bytes: usize,
    /// Device ids one call may list, and devices a label selector may match.
    pub max_devices: usize,
    /// How long a resume token stays valid.
    pub token_ttl: Duration,
    /// Open QueryReadings streams, all callers together.
    pub max_streams: usize,
    /// Open QueryReadings streams per ops token.
    pub max_streams_per_token: usize,
    /// Connections of the read pool, apart from the writer's.
    pub pool_connections: u32,
    /// Raw readings read per statement. Big, because on PostgreSQL every
    /// statement opens an index scan in each day partition of the range
    /// (365 for a year); small, because a stream holds its page: 32,768
    /// rows are 768 KiB as columns. Tests make it tiny, so pages end
    /// inside runs of equal readings.
    pub page_rows: usize,
    /// Chunks queued between the reading task and the response stream.
    pub queued_chunks: usize,
    /// Raw readings older than this are not read (`--retention`): they are
    /// being removed, SQLite row by row and PostgreSQL a day partition at
    /// a time, so reading them would answer differently per backend and
    /// per minute. Rollup rows have a retention of their own.
    pub raw_retention: Option<Duration>,
    /// Threads of the read runtime.
    pub threads: usize,
    /// Their niceness, 0 to 19: how far reads come second to ingest for
    /// the CPU (see [`runtime`]). The library leaves its threads' priority
    /// alone unless asked; `ingest serve` asks for 19.
    pub nice: i32,
}

impl Default for ReadConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: 64 * 1024,
            max_devices: 1000,
            token_ttl: Duration::from_secs(3 * 24 * 3600),
            max_streams: 64,
            max_streams_per_token: 16,
            pool_connections: 4,
            page_rows: 32_768,
            queued_chunks: 2,
            raw_retention: None,
            threads: 2,
            nice: 0,
        }
    }
}

/// A piece of one series, with the token that resumes after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub device_id: String,
    pub sensor: String,
    pub unit: String,
    pub data: ChunkData,
    pub resume_token: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChunkData {
    Raw { time: Vec<i64>, value: Vec<f64> },
    Buckets(BucketColumns),
}

/// Why a query is refused or ends early.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("device {0} does not exist")]
    NoSuchDevice(String),
    #[error("devices: the selector matches more than {max} devices, the most one call reads")]
    TooManyDevices { max: usize },
    #[error("{open} QueryReadings streams are open ({what}); retry later")]
    Busy {
        what: &'static str,
        open: usize,
        retry_after: Duration,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What a query stream yields: chunks, then perhaps an error.
pub type ChunkResult = Result<Chunk, ReadError>;

/// The read path's entry: shared by every QueryReadings call.
#[derive(Clone)]
pub struct Reader {
    pool: ReadPool,
    key: TokenKey,
    config: ReadConfig,
    limits: Arc<StreamLimits>,
    metrics: Arc<Metrics>,
    runtime: Arc<ReadRuntime>,
    /// Whose turn it is to read while ingest is pressed.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Reader {
    /// Opens the read pool beside `store` and takes the shared token key.
    pub async fn open(
        store: &Store,
        config: ReadConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let pool = ReadPool::open(store, config.pool_connections).await?;
        let key = store.server_secret("read_resume_token_key").await?;
        let runtime = ReadRuntime::start(config.threads, config.nice)?;
        Ok(Self {
            pool,
            key: TokenKey::new(key, config.token_ttl),
            limits: Arc::new(StreamLimits::new(
                config.max_streams,
                config.max_streams_per_token,
            )),
            config,
            metrics,
            runtime: Arc::new(runtime),
            turn: Arc::default(),
        })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Device ids one call may list.
    pub fn max_devices(&self) -> usize {
        self.config.max_devices
    }

    /// Counts a chunk the handler sent: its rows and encoded bytes.
    pub fn record_sent(&self, rows: usize, bytes: usize) {
        self.metrics.read_rows_sent.inc_by(rows as u64);
        self.metrics.read_bytes_sent.inc_by(bytes as u64);
    }

    /// Starts a query for the caller holding ops token `token_name`:
    /// refusals come back at once, chunks through the receiver.
    pub async fn query(
        &self,
        query: ReadQuery,
        resume_token: &str,
        token_name: &str,
    ) -> Result<mpsc::Receiver<ChunkResult>, ReadError> {
        let permit = self.limits.acquire(token_name)?;
        let arguments = token::arguments_hash(&query.canonical());
        let from = if resume_token.is_empty() {
            None
        } else {
            Some(self.key.check(resume_token, &arguments, now_secs())?)
        };
        let wanted = match &query.devices {
            query::DeviceSelection::Ids(ids) => Wanted::Ids(ids),
            query::DeviceSelection::Labels(labels) => Wanted::Labels(labels),
        };
        let max = self.config.max_devices;
        let devices = match self.pool.choose_devices(wanted, max).await? {
            Chosen::Devices(found) => found,
            Chosen::Missing(id) => return Err(ReadError::NoSuchDevice(id)),
            Chosen::TooMany => return Err(ReadError::TooManyDevices { max }),
        };
        let pks: Vec<i64> = devices.iter().map(|d| d.pk).collect();
        tracing::debug!(
            devices = pks.len(),
            resumed = from.is_some(),
            downsampled = query.downsample.is_some(),
            "QueryReadings starts"
        );
        let (tx, rx) = mpsc::channel(self.config.queued_chunks.max(1));
        let task = stream::QueryTask {
            pool: self.pool.clone(),
            key: self.key.clone(),
            arguments,
            chunk_bytes: self.config.chunk_bytes,
            page_rows: self.config.page_rows.max(1),
            raw_floor: self.config.raw_retention.map_or(i64::MIN, |r| {
                crate::domain::time::now_unix_nanos()
                    .saturating_sub(i64::try_from(r.as_nanos()).unwrap_or(i64::MAX))
            }),
            metrics: self.metrics.clone(),
            permit,
            turn: self.turn.clone(),
        };
        self.runtime.spawn(task.run(query, pks, from, tx));
        Ok(rx)
    }
}

fn now_secs() -> i64 {
    crate::domain::time::now_unix_nanos() / 1_000_000_000
}
