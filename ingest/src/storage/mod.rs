//! Durable storage: one interface ([`Store`]), one module per backend, and
//! the group transaction ([`GroupBackend`], [`GroupTx`]) the group commit
//! drives.
//!
//! The backend is chosen at run time from the database URL: SQLite (the
//! embedded default, a file in the data directory) or PostgreSQL.
//!
//! A query that reads the same on both backends is written once, as a
//! method of [`Store`] in the file of what it stores (`devices`, `alerts`,
//! `commands`, `credentials`, `cluster`), and runs on either through
//! `sql.rs`'s statements; the connections it runs on (`Store::query`,
//! `write_conn`, `begin_write`) and the few words of SQL that differ are
//! defined here. `sqlite` and `postgres` hold what differs beyond words:
//! connecting, the group transaction's bulk statements, retention of raw
//! readings, PostgreSQL's day partitions and replicas, opening sessions.

pub mod alerts;
pub mod backup;
pub mod cluster;
pub mod commands;
mod copy_binary;
pub mod credentials;
mod devices;
mod error;
pub mod feed;
pub mod mqtt_sessions;
pub mod partitions;
mod postgres;
mod read_page;
mod readings_query;
pub mod rollup;
mod sql;
mod sqlite;
mod sqlite_bulk;
mod sqlite_ffi;
mod sqlite_read;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

pub use devices::{BulkRegistrationError, DeviceRecord, NewDevice, SensorRecord};
pub use error::{Clash, StorageError};
pub use postgres::{PgGroupTx, PgStore};
pub use read_page::{RawRows, RowsFrom, RowsPage};
pub use readings_query::{Chosen, ReadPool, SelectedDevice, SeriesInfo, Wanted};
pub use sqlite::{SqliteGroupTx, SqliteStore};

use sqlx::pool::PoolConnection;
use sqlx::{Postgres, Sqlite, Transaction};
use tokio::sync::OwnedMutexGuard;

use crate::domain::time::UnixNanos;
use crate::domain::{SensorName, Unit};
use sql::{Conn, On, Statement};
use sqlite::SqliteWriteTx;

/// Where the data lives.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite { path: std::path::PathBuf },
    Postgres { url: String },
}

impl Database {
    /// `--database-url` if given (postgres:// or sqlite://), else the SQLite
    /// file in the data directory.
    pub fn from_config(url: Option<&str>, data_dir: &Path) -> Result<Self, String> {
        match url {
            None => Ok(Self::Sqlite {
                path: data_dir.join("telemetry.db"),
            }),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Self::Postgres { url: u.to_owned() })
            }
            Some(u) if u.starts_with("sqlite://") => Ok(Self::Sqlite {
                path: u.trim_start_matches("sqlite://").into(),
            }),
            Some(_) => {
                Err("--database-url must start with postgres://, postgresql:// or sqlite://".into())
            }
        }
    }
}

/// The storage interface, over either backend. Its methods live in the
/// files of what they store; see the module's documentation.
#[derive(Clone)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

impl Store {
    /// Connects and brings the schema up to date.
    pub async fn open(db: &Database) -> Result<Self, StorageError> {
        Self::open_named(db, "ingest").await
    }

    /// [`Store::open`], naming the connections `name` on PostgreSQL
    /// (`application_name`, as `pg_stat_activity` shows it).
    pub async fn open_named(db: &Database, name: &str) -> Result<Self, StorageError> {
        let store = match db {
            Database::Sqlite { path } => Self::Sqlite(sqlite::SqliteStore::connect(path).await?),
            Database::Postgres { url } => {
                Self::Postgres(postgres::PgStore::connect(url, name).await?)
            }
        };
        store.migrate().await?;
        Ok(store)
    }

    /// With the test hook `hold` (see [`EventTxHold`]).
    pub fn with_event_tx_hold(mut self, hold: Duration) -> Self {
        match &mut self {
            Self::Sqlite(s) => s.event_tx_hold = EventTxHold(hold),
            Self::Postgres(s) => s.event_tx_hold = EventTxHold(hold),
        }
        self
    }

    fn event_tx_hold(&self) -> EventTxHold {
        match self {
            Self::Sqlite(s) => s.event_tx_hold,
            Self::Postgres(s) => s.event_tx_hold,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    pub async fn migrate(&self) -> Result<(), StorageError> {
        match self {
            Self::Sqlite(s) => s.migrate().await,
            Self::Postgres(s) => s.migrate().await,
        }
    }

    pub async fn close(&self) {
        match self {
            Self::Sqlite(s) => s.close().await,
            Self::Postgres(s) => s.close().await,
        }
    }

    /// One trivial query, for readiness: the database answers. Returns how
    /// long getting a pooled connection took.
    pub async fn ping(&self) -> Result<std::time::Duration, StorageError> {
        let started = std::time::Instant::now();
        let mut conn = self.read().await?;
        let acquired = started.elapsed();
        conn.query("SELECT 1").execute().await?;
        Ok(acquired)
    }

    /// Makes sure readings of these days (see [`partitions::day_of`]) have
    /// somewhere to go: creates PostgreSQL's missing day partitions. SQLite
    /// has one table and needs nothing.
    pub async fn ensure_partitions(&self, days: &[i64]) -> Result<usize, StorageError> {
        match self {
            Self::Sqlite(_) => Ok(0),
            Self::Postgres(s) => s.ensure_partitions(days).await,
        }
    }

    /// Removes raw readings older than `cutoff`: PostgreSQL drops the
    /// partitions of whole days before it, SQLite deletes rows in steps of
    /// `step_rows`.
    pub async fn expire_readings(
        &self,
        cutoff: UnixNanos,
        step_rows: usize,
    ) -> Result<Expired, StorageError> {
        match self {
            Self::Sqlite(s) => s.expire_readings(cutoff, step_rows.max(1)).await,
            Self::Postgres(s) => s.expire_readings(cutoff).await,
        }
    }

    /// Removes hourly rollup rows of hours before `cutoff`, `step_rows` at
    /// a time, each step a statement of its own: on SQLite each queues on
    /// the write gate like a group commit, so ingest waits for one short
    /// step at most.
    pub async fn expire_rollups(
        &self,
        cutoff: UnixNanos,
        step_rows: usize,
    ) -> Result<Expired, StorageError> {
        let step_rows = step_rows.max(1);
        // Rows are picked by where they are stored: SQLite's rowid,
        // PostgreSQL's ctid.
        let sql = match self {
            Self::Sqlite(_) => {
                "DELETE FROM readings_hourly_rollup WHERE rowid IN (SELECT rowid \
                 FROM readings_hourly_rollup WHERE hour_unix_nano < $1 LIMIT $2)"
            }
            Self::Postgres(_) => {
                "DELETE FROM readings_hourly_rollup WHERE ctid = ANY(ARRAY( \
                 SELECT ctid FROM readings_hourly_rollup WHERE hour_unix_nano < $1 LIMIT $2))"
            }
        };
        in_steps(step_rows, || async {
            let mut conn = self.write_conn().await?;
            let step = conn.query(sql).bind(cutoff).bind(step_rows as i64);
            Ok(step.execute().await?)
        })
        .await
    }
}

/// A pooled connection; taken for a write on SQLite, it also holds the
/// write gate (see `SqliteStore`) until dropped.
struct Pooled {
    conn: PooledConn,
    /// Dropped after `conn` is back in the pool.
    _gate: Option<OwnedMutexGuard<()>>,
}

enum PooledConn {
    Sqlite(PoolConnection<Sqlite>),
    Postgres(PoolConnection<Postgres>),
}

impl Pooled {
    fn conn(&mut self) -> Conn<'_> {
        match &mut self.conn {
            PooledConn::Sqlite(c) => Conn::Sqlite(c),
            PooledConn::Postgres(c) => Conn::Postgres(c),
        }
    }

    fn query<'q>(&mut self, sql: &'q str) -> Statement<'_, 'q> {
        self.conn().into_query(sql)
    }
}

/// A write transaction of either backend. Dropped without `commit`, it
/// rolls back.
enum WriteTx {
    /// Holds SQLite's write lock and the write gate from its start.
    Sqlite(SqliteWriteTx),
    Postgres(Transaction<'static, Postgres>),
}

impl WriteTx {
    fn conn(&mut self) -> Conn<'_> {
        match self {
            Self::Sqlite(tx) => Conn::Sqlite(tx),
            Self::Postgres(tx) => Conn::Postgres(tx),
        }
    }

    fn query<'q>(&mut self, sql: &'q str) -> Statement<'_, 'q> {
        self.conn().into_query(sql)
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(tx) => tx.commit().await,
            Self::Postgres(tx) => tx.commit().await,
        }
    }
}

/// Connections, and the few words of SQL that differ between the backends.
impl Store {
    /// A statement run on any of the pool's connections: for reads.
    fn query<'q>(&self, sql: &'q str) -> Statement<'_, 'q> {
        match self {
            Self::Sqlite(s) => Statement::Sqlite(On::Pool(&s.pool), sqlx::query(sql)),
            Self::Postgres(s) => Statement::Postgres(On::Pool(&s.pool), sqlx::query(sql)),
        }
    }

    /// A pooled connection, for several reads on one.
    async fn read(&self) -> Result<Pooled, sqlx::Error> {
        let conn = match self {
            Self::Sqlite(s) => PooledConn::Sqlite(s.pool.acquire().await?),
            Self::Postgres(s) => PooledConn::Postgres(s.pool.acquire().await?),
        };
        Ok(Pooled { conn, _gate: None })
    }

    /// A connection for one write statement: on SQLite it waits for the
    /// write gate first. Use it as a temporary,
    /// `self.write_conn().await?.query(...)`.
    async fn write_conn(&self) -> Result<Pooled, sqlx::Error> {
        match self {
            Self::Sqlite(s) => {
                let gate = s.lock_writes().await;
                Ok(Pooled {
                    conn: PooledConn::Sqlite(s.pool.acquire().await?),
                    _gate: Some(gate),
                })
            }
            Self::Postgres(_) => self.read().await,
        }
    }

    /// A write transaction (on SQLite holding the write lock from its
    /// start, see `SqliteStore::begin_write`).
    async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(s) => WriteTx::Sqlite(s.begin_write().await?),
            Self::Postgres(s) => WriteTx::Postgres(s.pool.begin().await?),
        })
    }

    /// Appended to a read of a row the transaction goes on to change, so
    /// that a group commit reading the same row waits for it. SQLite has no
    /// row locks: its write transaction holds the database's one write lock
    /// from its start, which is more. NO KEY, as every such change leaves
    /// the row's keys alone: rows that refer to the device (a command, a
    /// token) can still be inserted meanwhile.
    fn row_lock(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "",
            Self::Postgres(_) => " FOR NO KEY UPDATE",
        }
    }

    /// The type a JSON parameter is cast to for a JSON column: PostgreSQL
    /// stores `jsonb`, SQLite text.
    fn json_type(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "TEXT",
            Self::Postgres(_) => "jsonb",
        }
    }

    /// Appended to a text column to compare byte by byte, as SQLite does
    /// by default, whatever PostgreSQL's locale: pages of ids are then the
    /// same on both.
    fn bytewise(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "",
            Self::Postgres(_) => " COLLATE \"C\"",
        }
    }
}

/// What one retention pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Rows deleted one by one (SQLite readings; rollups on both).
    pub rows: u64,
    /// Whole day partitions dropped (PostgreSQL readings).
    pub partitions: u64,
    /// Separate transactions (or partition drops) it took.
    pub steps: u64,
}

impl std::ops::AddAssign for Expired {
    fn add_assign(&mut self, other: Self) {
        self.rows += other.rows;
        self.partitions += other.partitions;
        self.steps += other.steps;
    }
}

/// Repeats `step`, which deletes at most `step_rows` rows and says how many,
/// until one deletes fewer: nothing is left.
async fn in_steps<F, Fut>(step_rows: usize, mut step: F) -> Result<Expired, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, StorageError>>,
{
    let mut expired = Expired::default();
    loop {
        let deleted = step().await?;
        expired.rows += deleted;
        expired.steps += 1;
        if deleted < step_rows as u64 {
            return Ok(expired);
        }
    }
}

/// A test hook (`serve --test-hold-event-tx`, `Config::test_hold_event_tx`):
/// how long a transaction that records alert events stays open after taking
/// its event ids, as a slow commit would. Zero (the default) in service.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventTxHold(pub Duration);

impl EventTxHold {
    async fn wait(self) {
        if !self.0.is_zero() {
            tokio::time::sleep(self.0).await;
        }
    }
}

/// A backend that can open a group-commit transaction: what the group
/// commit (`pipeline::commit`) drives, the same way for both.
pub trait GroupBackend: Clone + Send + Sync + 'static {
    type Tx: GroupTx;

    /// What must exist before a transaction holding readings at `times`
    /// (unix nanoseconds): the days whose partitions [`Self::prepare`] makes.
    fn days_to_prepare(&self, times: impl Iterator<Item = i64>) -> Vec<i64>;

    /// Creates what a group needs, outside its transaction.
    fn prepare(&self, days: &[i64]) -> impl Future<Output = Result<(), StorageError>> + Send;

    fn begin(&self) -> impl Future<Output = Result<Self::Tx, sqlx::Error>> + Send;
}

impl GroupBackend for SqliteStore {
    type Tx = SqliteGroupTx;

    /// None: SQLite is not partitioned, and the times are not even read.
    fn days_to_prepare(&self, _times: impl Iterator<Item = i64>) -> Vec<i64> {
        Vec::new()
    }

    async fn prepare(&self, _days: &[i64]) -> Result<(), StorageError> {
        Ok(())
    }

    async fn begin(&self) -> Result<SqliteGroupTx, sqlx::Error> {
        self.begin_group().await
    }
}

impl GroupBackend for PgStore {
    type Tx = PgGroupTx;

    fn days_to_prepare(&self, times: impl Iterator<Item = i64>) -> Vec<i64> {
        partitions::days_of(times)
    }

    /// The day partitions of the group's readings: already there unless the
    /// data is late or backfilled past what was created ahead. Creating one
    /// is DDL, kept out of the group's transaction so that the parent
    /// table's lock is held only for that moment.
    async fn prepare(&self, days: &[i64]) -> Result<(), StorageError> {
        self.ensure_partitions(days).await.map(drop)
    }

    async fn begin(&self) -> Result<PgGroupTx, sqlx::Error> {
        self.begin_group().await
    }
}

/// The columns of many batches' readings, ready for one bulk insert.
#[derive(Debug, Default)]
pub struct ReadingColumns {
    pub sensor_pk: Vec<i64>,
    pub time: Vec<i64>,
    pub value: Vec<f64>,
    /// The sequence of the batch each reading came in.
    pub batch_sequence: Vec<i64>,
    /// Each reading's place in its batch, counted series after series
    /// from 0 (refused series keep their places).
    pub batch_index: Vec<i32>,
}

impl ReadingColumns {
    pub fn len(&self) -> usize {
        self.sensor_pk.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sensor_pk.is_empty()
    }

    pub fn clear(&mut self) {
        self.sensor_pk.clear();
        self.time.clear();
        self.value.clear();
        self.batch_sequence.clear();
        self.batch_index.clear();
    }
}

/// One group commit's transaction. Each backend implements it with the bulk
/// statement it does fastest; the writer drives it the same way for both.
pub trait GroupTx: Send + Sized {
    /// The committed sequence of each device, locked until commit so another
    /// server process cannot commit the same batch concurrently.
    fn committed_sequences(
        &mut self,
        device_pks: &[i64],
    ) -> impl Future<Output = Result<HashMap<i64, u64>, sqlx::Error>> + Send;

    /// The pk of a device's sensor, created if new, unless the device has
    /// `max_sensors` already: then `None`.
    fn sensor_pk(
        &mut self,
        device_pk: i64,
        sensor: &SensorName,
        unit: &Unit,
        max_sensors: usize,
    ) -> impl Future<Output = Result<Option<i64>, sqlx::Error>> + Send;

    fn insert_readings(
        &mut self,
        rows: &ReadingColumns,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// Adds a group's sums to the hourly rollup.
    fn add_rollups(
        &mut self,
        rows: &rollup::RollupRows,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    fn set_committed_sequences(
        &mut self,
        updates: &[(i64, u64)],
        now: UnixNanos,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// The open alerts of these devices: (device pk, rule id, alert id).
    fn open_alerts(
        &mut self,
        device_pks: &[i64],
    ) -> impl Future<Output = Result<Vec<(i64, String, i64)>, sqlx::Error>> + Send;

    /// The remembered hold starts of these devices: (device pk, rule id, since).
    fn pending_holds(
        &mut self,
        device_pks: &[i64],
    ) -> impl Future<Output = Result<Vec<(i64, String, i64)>, sqlx::Error>> + Send;

    /// The newest stored reading of a device's sensor.
    fn last_reading(
        &mut self,
        device_pk: i64,
        sensor: &SensorName,
    ) -> impl Future<Output = Result<Option<(UnixNanos, f64)>, sqlx::Error>> + Send;

    /// Appends the group's batches to the readings feed, taking their
    /// positions: the last statement before `commit`, since the feed's
    /// counter row stays locked until then (see [`feed`]). Returns the
    /// first position.
    fn append_feed(
        &mut self,
        batches: &[feed::FeedAppend],
        now: UnixNanos,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send;

    /// Records alert events in this transaction (see `Store::record_alert_events`).
    fn record_alert_events(
        &mut self,
        events: &[alerts::NewAlertEvent],
        now: UnixNanos,
    ) -> impl Future<Output = Result<Vec<alerts::EventOutcome>, sqlx::Error>> + Send;

    fn set_pending_holds(
        &mut self,
        changes: &[alerts::PendingChange],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    fn commit(self) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}
