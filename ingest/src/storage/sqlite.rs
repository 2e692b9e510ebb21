//! SQLite backend: the embedded default.
//!
//! WAL mode so readers never block the writer, `synchronous=FULL` so a
//! committed group survives a power cut (group commit pays for the fsync).
//! All writes of readings go through the single group-commit writer.

use super::EventTxHold;
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, SqliteConnection, Transaction};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

use super::alerts::{self, EventOutcome, NewAlertEvent, PendingChange};
use super::cluster;
use super::devices::{self, ALL_OFFLINE, PRESENCE, to_u64};
use super::rollup::RollupRows;
use super::sql::Conn;
use super::{Expired, GroupTx, ReadingColumns, StorageError, in_steps};
use crate::domain::time::UnixNanos;
use crate::domain::{SensorName, Unit};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Page cache per connection, in KiB (64 MiB).
const SQLITE_CACHE_KIB: u32 = 64 * 1024;

#[derive(Clone)]
pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    /// Taken by the group writer and by retention for each of their write
    /// transactions. SQLite has one writer at a time and makes the others
    /// wait by sleeping and polling (up to 100 ms per nap), so two of our
    /// own tasks contending on the file lock would stall ingest; queueing
    /// them on this fair lock instead hands the file over without a nap.
    write_gate: Arc<Mutex<()>>,
    checkpoints: Arc<Checkpoints>,
    pub(super) event_tx_hold: EventTxHold,
}

/// WAL checkpoints beside the writer rather than inside its commits.
///
/// SQLite's automatic checkpoint runs in the commit that crosses 1000 WAL
/// pages, so one group in a few dozen paid for copying pages to the
/// database file and syncing it (a tenth of the writer's time in a
/// profile, all of it in that group's latency). Automatic checkpoints are
/// off; a task runs PASSIVE checkpoints on another connection while the
/// writer goes on, and the WAL restarts from its beginning whenever a
/// write transaction finds it fully copied.
struct Checkpoints {
    /// Rung after each commit.
    wake: Notify,
    /// The WAL outgrew `WAL_RESTART_FRAMES`. The WAL starts over only when a
    /// write transaction begins with every frame copied, which a busy writer
    /// never gives the checkpointer time for; so the next group first
    /// copies the rest itself.
    restart: AtomicBool,
}

/// Checkpoints at most this often; commits in between are copied together.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// WAL frames (pages) beyond which the writer makes the WAL start over:
/// 32 MiB, a fraction of a second of a busy writer's frames.
const WAL_RESTART_FRAMES: i64 = 8_192;

async fn checkpoint_beside_the_writer(pool: SqlitePool, checkpoints: Arc<Checkpoints>) {
    loop {
        tokio::select! {
            () = checkpoints.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if pool.is_closed() {
            return;
        }
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await
        {
            Ok((_, wal_frames, _)) => {
                if wal_frames > WAL_RESTART_FRAMES {
                    checkpoints.restart.store(true, Ordering::Release);
                }
            }
            Err(error) if pool.is_closed() => {
                tracing::debug!(%error, "checkpointer stops with the pool");
                return;
            }
            Err(error) => tracing::warn!(%error, "WAL checkpoint failed; retrying"),
        }
        tokio::time::sleep(CHECKPOINT_INTERVAL).await;
    }
}

impl SqliteStore {
    pub async fn connect(path: &Path) -> Result<Self, StorageError> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // SQLite's default page cache is 2 MiB. Inserting readings walks
            // the (sensor, time) index at a spot per sensor, and a profile at
            // saturation showed a fifth of the writer's time in pread()
            // fetching evicted index pages back from the OS. A page cache the
            // size of the index's working set keeps them. Per connection, as
            // an upper bound: readers rarely fill theirs.
            .pragma("cache_size", format!("-{}", SQLITE_CACHE_KIB))
            // See `Checkpoints`. The limit truncates the WAL file when it
            // restarts after a burst.
            .pragma("wal_autocheckpoint", "0")
            .pragma("journal_size_limit", (32 * 1024 * 1024).to_string());
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        let checkpoints = Arc::new(Checkpoints {
            wake: Notify::new(),
            restart: AtomicBool::new(false),
        });
        tokio::spawn(checkpoint_beside_the_writer(
            pool.clone(),
            checkpoints.clone(),
        ));
        Ok(Self {
            pool,
            write_gate: Arc::new(Mutex::new(())),
            checkpoints,
            event_tx_hold: EventTxHold::default(),
        })
    }

    pub async fn migrate(&self) -> Result<(), StorageError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn record_last_seen(&self, seen: &[(i64, UnixNanos)]) -> Result<(), StorageError> {
        let rows = serde_json::to_string(seen).expect("integers serialise");
        let _gate = self.lock_writes().await;
        sqlx::query(
            "UPDATE devices SET last_seen_unix_nano = j.value ->> 1 FROM json_each(?) j \
             WHERE devices.pk = j.value ->> 0 \
             AND (last_seen_unix_nano IS NULL OR last_seen_unix_nano < j.value ->> 1)",
        )
        .bind(rows)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Waits for the write gate; a write outside [`Self::begin_write`]
    /// holds it until the write is done.
    pub(super) async fn lock_writes(&self) -> OwnedMutexGuard<()> {
        self.write_gate.clone().lock_owned().await
    }

    /// A write transaction, holding the write lock from the start (see
    /// `begin_group`) and the write gate until it ends.
    pub(super) async fn begin_write(&self) -> Result<SqliteWriteTx, sqlx::Error> {
        let gate = self.lock_writes().await;
        Ok(SqliteWriteTx {
            tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
            _gate: gate,
        })
    }

    /// `BEGIN IMMEDIATE` takes the write lock up front: a deferred transaction
    /// that reads then writes can fail with SQLITE_BUSY when another
    /// connection wrote in between, which no busy timeout can resolve.
    pub(crate) async fn begin_group(&self) -> Result<SqliteGroupTx, sqlx::Error> {
        if self.checkpoints.restart.swap(false, Ordering::AcqRel) {
            let started = std::time::Instant::now();
            let _gate = self.write_gate.lock().await;
            // PASSIVE with no writer beside it copies what is left, and the
            // transaction below then starts the WAL over. RESTART would also
            // wait for every reader to leave the WAL, which under load (one
            // token lookup per upload stream) took tens of milliseconds.
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&self.pool)
                .await?;
            tracing::debug!(
                elapsed_us = started.elapsed().as_micros() as u64,
                "WAL caught up for a restart"
            );
        }
        Ok(SqliteGroupTx {
            tx: self.begin_write().await?,
            rollup_statements: HashMap::new(),
            checkpoints: self.checkpoints.clone(),
            event_tx_hold: self.event_tx_hold,
        })
    }
}

impl SqliteStore {
    /// Deletes readings older than `cutoff`, sensor by sensor (the table is
    /// stored by sensor and time), at most `step_rows` per transaction. Each
    /// step queues on the write gate like a group commit, so ingest waits
    /// for one short step at most. A step ends at the key of its last row:
    /// keys are unique, so it deletes exactly `step_rows` rows, or all that
    /// are left.
    pub async fn expire_readings(
        &self,
        cutoff: UnixNanos,
        step_rows: usize,
    ) -> Result<Expired, StorageError> {
        let sensors: Vec<i64> = sqlx::query_scalar("SELECT pk FROM sensors ORDER BY pk")
            .fetch_all(&self.pool)
            .await?;
        let mut expired = Expired::default();
        for pk in sensors {
            expired += in_steps(step_rows, || async {
                let _gate = self.lock_writes().await;
                let last: Option<(i64, f64, i64, i64)> = sqlx::query_as(
                    "SELECT time_unix_nano, value, batch_sequence, batch_index FROM readings \
                     WHERE sensor_pk = $1 AND time_unix_nano < $2 \
                     ORDER BY time_unix_nano, value, batch_sequence, batch_index \
                     LIMIT 1 OFFSET $3",
                )
                .bind(pk)
                .bind(cutoff)
                .bind(step_rows.max(1) as i64 - 1)
                .fetch_optional(&self.pool)
                .await?;
                let done = match last {
                    Some((time, value, sequence, index)) => {
                        sqlx::query(
                            "DELETE FROM readings WHERE sensor_pk = $1 \
                             AND (time_unix_nano, value, batch_sequence, batch_index) \
                                 <= ($2, $3, $4, $5)",
                        )
                        .bind(pk)
                        .bind(time)
                        .bind(value)
                        .bind(sequence)
                        .bind(index)
                        .execute(&self.pool)
                        .await?
                    }
                    None => {
                        sqlx::query(
                            "DELETE FROM readings WHERE sensor_pk = $1 AND time_unix_nano < $2",
                        )
                        .bind(pk)
                        .bind(cutoff)
                        .execute(&self.pool)
                        .await?
                    }
                };
                Ok(done.rows_affected())
            })
            .await?;
        }
        Ok(expired)
    }
}

/// A write transaction holding the write gate.
pub(super) struct SqliteWriteTx {
    tx: Transaction<'static, Sqlite>,
    _gate: OwnedMutexGuard<()>,
}

impl SqliteWriteTx {
    pub(super) async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

impl std::ops::Deref for SqliteWriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for SqliteWriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

pub struct SqliteGroupTx {
    /// Holds the write gate until commit.
    tx: SqliteWriteTx,
    /// Multi-row rollup statement texts by row count. Chunks are sized in
    /// powers of two so that only a handful of distinct statements exist,
    /// and the connection's prepared-statement cache keeps them all.
    rollup_statements: HashMap<usize, String>,
    checkpoints: Arc<Checkpoints>,
    event_tx_hold: EventTxHold,
}

/// Values per rollup row.
const ROLLUP_COLUMNS: usize = 10;
/// Most rollup rows per statement within SQLite's 32766 bound parameters.
const ROLLUP_MAX_ROWS: usize = 2048;

/// The rollup upsert of `rows` rows. Adding to a bucket that already has
/// readings (late data, or the rest of the hour) merges the aggregates. SET
/// expressions all see the row as it was, so last_time decides both columns.
fn rollup_sql(rows: usize) -> String {
    const HEAD: &str = "INSERT INTO readings_hourly_rollup (sensor_pk, hour_unix_nano, \
        reading_count, value_sum, value_min, value_max, first_time_unix_nano, first_value, \
        last_time_unix_nano, last_value) VALUES ";
    // A NULL first (a row from before migration 0011 whose raw readings
    // are partly gone) stays NULL: the read path then scans raw readings.
    const TAIL: &str = " ON CONFLICT (sensor_pk, hour_unix_nano) DO UPDATE SET \
         reading_count = reading_count + excluded.reading_count, \
         value_sum = value_sum + excluded.value_sum, \
         value_min = MIN(value_min, excluded.value_min), \
         value_max = MAX(value_max, excluded.value_max), \
         first_value = CASE WHEN (excluded.first_time_unix_nano, excluded.first_value) \
             < (first_time_unix_nano, first_value) \
             THEN excluded.first_value ELSE first_value END, \
         first_time_unix_nano = CASE WHEN (excluded.first_time_unix_nano, excluded.first_value) \
             < (first_time_unix_nano, first_value) \
             THEN excluded.first_time_unix_nano ELSE first_time_unix_nano END, \
         last_value = CASE WHEN (excluded.last_time_unix_nano, excluded.last_value) \
             > (last_time_unix_nano, last_value) \
             THEN excluded.last_value ELSE last_value END, \
         last_time_unix_nano = MAX(last_time_unix_nano, excluded.last_time_unix_nano)";
    let row = format!("({})", ["?"; ROLLUP_COLUMNS].join(","));
    let mut sql = String::with_capacity(HEAD.len() + TAIL.len() + rows * (row.len() + 1));
    sql.push_str(HEAD);
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(&row);
    }
    sql.push_str(TAIL);
    sql
}

/// Splits `n` rows into chunks of `max` rows, then powers of two.
fn chunk_sizes(mut n: usize, max: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let size = if n >= max {
            max
        } else {
            1 << (usize::BITS - 1 - n.leading_zeros())
        };
        n -= size;
        Some(size)
    })
}

impl SqliteGroupTx {
    /// The rows of `sql`, whose `$1` is the devices as a JSON array.
    async fn of_devices(
        &mut self,
        sql: &str,
        device_pks: &[i64],
    ) -> Result<Vec<(i64, String, i64)>, sqlx::Error> {
        sqlx::query_as(sql)
            .bind(serde_json::to_string(device_pks).expect("integers serialise"))
            .fetch_all(&mut *self.tx)
            .await
    }
}

impl GroupTx for SqliteGroupTx {
    async fn committed_sequences(
        &mut self,
        device_pks: &[i64],
    ) -> Result<HashMap<i64, u64>, sqlx::Error> {
        let pks = serde_json::to_string(device_pks).expect("integers serialise");
        let rows = sqlx::query(
            "SELECT pk, committed_sequence FROM devices WHERE pk IN (SELECT value FROM json_each(?))",
        )
        .bind(pks)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get::<i64, _>(1)?.max(0) as u64)))
            .collect()
    }

    async fn sensor_pk(
        &mut self,
        device_pk: i64,
        sensor: &SensorName,
        unit: &Unit,
        max_sensors: usize,
    ) -> Result<Option<i64>, sqlx::Error> {
        devices::sensor_pk(
            Conn::Sqlite(&mut self.tx),
            device_pk,
            sensor,
            unit,
            max_sensors,
        )
        .await
    }

    async fn insert_readings(&mut self, rows: &ReadingColumns) -> Result<(), sqlx::Error> {
        super::sqlite_bulk::insert_readings(&mut self.tx, rows).await
    }

    async fn add_rollups(&mut self, rows: &RollupRows) -> Result<(), sqlx::Error> {
        let mut start = 0;
        for size in chunk_sizes(rows.len(), ROLLUP_MAX_ROWS) {
            let sql = self
                .rollup_statements
                .entry(size)
                .or_insert_with(|| rollup_sql(size))
                .clone();
            let mut query = sqlx::query(&sql);
            for i in start..start + size {
                query = query
                    .bind(rows.sensor_pk[i])
                    .bind(rows.hour[i])
                    .bind(rows.count[i])
                    .bind(rows.sum[i])
                    .bind(rows.min[i])
                    .bind(rows.max[i])
                    .bind(rows.first_time[i])
                    .bind(rows.first_value[i])
                    .bind(rows.last_time[i])
                    .bind(rows.last_value[i]);
            }
            query.execute(&mut *self.tx).await?;
            start += size;
        }
        Ok(())
    }

    async fn set_committed_sequences(
        &mut self,
        updates: &[(i64, u64)],
        now: UnixNanos,
    ) -> Result<(), sqlx::Error> {
        for &(pk, seq) in updates {
            sqlx::query(
                "UPDATE devices SET committed_sequence = ?, last_upload_unix_nano = ? WHERE pk = ?",
            )
            .bind(seq as i64)
            .bind(now)
            .bind(pk)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    async fn open_alerts(
        &mut self,
        device_pks: &[i64],
    ) -> Result<Vec<(i64, String, i64)>, sqlx::Error> {
        let sql = "SELECT device_pk, rule_id, alert_id FROM alerts WHERE resolved_unix_nano IS NULL \
             AND device_pk IN (SELECT value FROM json_each($1))";
        self.of_devices(sql, device_pks).await
    }

    async fn pending_holds(
        &mut self,
        device_pks: &[i64],
    ) -> Result<Vec<(i64, String, i64)>, sqlx::Error> {
        let sql = "SELECT device_pk, rule_id, since_unix_nano FROM alert_pending \
             WHERE device_pk IN (SELECT value FROM json_each($1))";
        self.of_devices(sql, device_pks).await
    }

    async fn last_reading(
        &mut self,
        device_pk: i64,
        sensor: &SensorName,
    ) -> Result<Option<(UnixNanos, f64)>, sqlx::Error> {
        alerts::last_reading(Conn::Sqlite(&mut self.tx), device_pk, sensor).await
    }

    async fn append_feed(
        &mut self,
        batches: &[super::feed::FeedAppend],
        now: UnixNanos,
    ) -> Result<u64, sqlx::Error> {
        let first = super::feed::take_positions(Conn::Sqlite(&mut self.tx), batches.len()).await?;
        super::sqlite_bulk::insert_feed(&mut self.tx, first, batches, now).await?;
        Ok(first as u64)
    }

    async fn record_alert_events(
        &mut self,
        events: &[NewAlertEvent],
        now: UnixNanos,
    ) -> Result<Vec<EventOutcome>, sqlx::Error> {
        alerts::record_events(Conn::Sqlite(&mut self.tx), events, now, self.event_tx_hold).await
    }

    async fn set_pending_holds(&mut self, changes: &[PendingChange]) -> Result<(), sqlx::Error> {
        alerts::set_pending(Conn::Sqlite(&mut self.tx), changes).await
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await?;
        self.checkpoints.wake.notify_one();
        Ok(())
    }
}

/// One process serves a SQLite database: nobody listens for notifications.
impl SqliteStore {
    /// Opens streams in one transaction (a reconnect storm is many
    /// opens, and each notifying commit waits its turn): each gets
    /// the next generation of its device and marks it online. A
    /// statement per stream: SQLite's one writer has no lock order to keep.
    pub async fn open_sessions(
        &self,
        opens: &[cluster::SessionOpen],
        replica_id: &str,
    ) -> Result<Vec<cluster::SessionTicket>, StorageError> {
        let mut tx = self.begin_write().await?;
        let mut tickets = Vec::with_capacity(opens.len());
        for o in opens {
            let generation: i64 = sqlx::query_scalar(cluster::OPEN_SESSION)
                .bind(o.device_pk)
                .bind(replica_id)
                .bind(o.at)
                .fetch_one(&mut *tx)
                .await?;
            sqlx::query(PRESENCE)
                .bind(true)
                .bind(o.at)
                .bind(o.firmware.as_deref())
                .bind(o.device_pk)
                .execute(&mut *tx)
                .await?;
            tickets.push(cluster::SessionTicket {
                device_pk: o.device_pk,
                generation: to_u64(generation, "generation")?,
            });
        }
        tx.commit().await?;
        Ok(tickets)
    }

    /// At start: no stream survived the previous process.
    pub async fn reset_sessions(&self) -> Result<(), StorageError> {
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE device_sessions SET replica_id = NULL WHERE replica_id IS NOT NULL")
            .execute(&mut *tx)
            .await?;
        sqlx::query(ALL_OFFLINE).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_all_rows_with_few_shapes() {
        let max = ROLLUP_MAX_ROWS;
        assert!(
            max * ROLLUP_COLUMNS <= 32766,
            "rollups exceed SQLite's parameter limit"
        );
        for n in [0, 1, 2, 3, 1000, 2047, 2048, 2049, 8191, 8192, 8193, 50_000] {
            let sizes: Vec<_> = chunk_sizes(n, max).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n);
            assert!(sizes.iter().all(|s| s.is_power_of_two() && *s <= max));
        }
    }
}
