//! SQLite backend: the embedded default.
//!
//! WAL mode so readers never block the writer, `synchronous=FULL` so a
//! committed group survives a power cut (group commit pays for the fsync).
//! All writes of readings go through the single group-commit writer.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::alerts::{self, AlertEventRecord, AlertRecord, EventKind, NewAlertEvent};
use super::commands::{self, CommandRecord, EnqueueError};
use super::{
    DEVICE_COLUMNS, DeviceKey, DeviceRecord, GroupTx, NewDevice, ReadingColumns, StorageError,
    device_from_row, to_u64,
};
use crate::auth::TokenHash;
use crate::domain::alert::{Rule, RuleId};
use crate::domain::command::{CommandKind, CommandState};
use crate::domain::time::UnixNanos;
use crate::domain::{DeviceId, SensorName, Unit};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// SQLite allows at most 32766 bound parameters per statement; 3 per row.
const MAX_ROWS_PER_INSERT: usize = 8192;

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(path: &Path) -> Result<Self, StorageError> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    pub async fn migrate(&self) -> Result<(), StorageError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn register_device(&self, d: &NewDevice) -> Result<DeviceRecord, StorageError> {
        let sql = format!(
            "INSERT INTO devices (device_id, display_name, labels, token_sha256, created_unix_nano) \
             VALUES (?, ?, ?, ?, ?) RETURNING {DEVICE_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(d.id.as_str())
            .bind(d.display_name.as_str())
            .bind(d.labels.to_json())
            .bind(d.token_hash.as_bytes().as_slice())
            .bind(d.created)
            .fetch_one(&self.pool)
            .await?;
        device_from_row(&row)
    }

    pub async fn get_device(&self, id: &DeviceId) -> Result<DeviceRecord, StorageError> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_one(&self.pool)
            .await?;
        device_from_row(&row)
    }

    pub async fn list_devices(
        &self,
        after: Option<&DeviceId>,
        limit: u32,
    ) -> Result<Vec<DeviceRecord>, StorageError> {
        let sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id > ? ORDER BY device_id LIMIT ?"
        );
        let rows = sqlx::query(&sql)
            .bind(after.map_or("", DeviceId::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(device_from_row).collect()
    }

    pub async fn device_by_token(
        &self,
        hash: &TokenHash,
    ) -> Result<Option<DeviceKey>, StorageError> {
        let row = sqlx::query("SELECT pk, device_id FROM devices WHERE token_sha256 = ?")
            .bind(hash.as_bytes().as_slice())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let id: String = r.try_get(1)?;
            Ok(DeviceKey {
                pk: r.try_get(0)?,
                id: DeviceId::parse(&id).map_err(|e| StorageError::Corrupt(e.to_string()))?,
            })
        })
        .transpose()
    }

    pub async fn committed_sequence(&self, device_pk: i64) -> Result<u64, StorageError> {
        let seq: i64 = sqlx::query_scalar("SELECT committed_sequence FROM devices WHERE pk = ?")
            .bind(device_pk)
            .fetch_one(&self.pool)
            .await?;
        to_u64(seq, "committed_sequence")
    }

    /// SQL with `?` placeholders, as SQLite takes it.
    fn sql(sql: &str) -> String {
        sql.to_owned()
    }

    /// A write transaction, holding the write lock from the start (see
    /// `begin_group`).
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// `BEGIN IMMEDIATE` takes the write lock up front: a deferred transaction
    /// that reads then writes can fail with SQLITE_BUSY when another
    /// connection wrote in between, which no busy timeout can resolve.
    pub(crate) async fn begin_group(&self) -> Result<SqliteGroupTx, sqlx::Error> {
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(SqliteGroupTx {
            tx,
            insert_sql: HashMap::new(),
        })
    }
}

pub(crate) struct SqliteGroupTx {
    tx: Transaction<'static, Sqlite>,
    /// Multi-row INSERT texts by row count. Chunks are sized in powers of two
    /// so that only a handful of distinct statements exist, and the
    /// connection's prepared-statement cache keeps them all.
    insert_sql: HashMap<usize, String>,
}

impl SqliteGroupTx {
    fn insert_sql(&mut self, rows: usize) -> String {
        self.insert_sql
            .entry(rows)
            .or_insert_with(|| {
                let mut sql = String::with_capacity(64 + rows * 8);
                sql.push_str("INSERT INTO readings (sensor_pk, time_unix_nano, value) VALUES ");
                for i in 0..rows {
                    if i > 0 {
                        sql.push(',');
                    }
                    sql.push_str("(?,?,?)");
                }
                sql
            })
            .clone()
    }
}

/// Splits `n` rows into chunks of `MAX_ROWS_PER_INSERT`, then powers of two.
fn chunk_sizes(mut n: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let size = if n >= MAX_ROWS_PER_INSERT {
            MAX_ROWS_PER_INSERT
        } else {
            1 << (usize::BITS - 1 - n.leading_zeros())
        };
        n -= size;
        Some(size)
    })
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
    ) -> Result<i64, sqlx::Error> {
        // The no-op update makes RETURNING yield the existing row too.
        sqlx::query_scalar(
            "INSERT INTO sensors (device_pk, sensor, unit) VALUES (?, ?, ?) \
             ON CONFLICT (device_pk, sensor, unit) DO UPDATE SET unit = excluded.unit \
             RETURNING pk",
        )
        .bind(device_pk)
        .bind(sensor.as_str())
        .bind(unit.as_str())
        .fetch_one(&mut *self.tx)
        .await
    }

    async fn insert_readings(&mut self, rows: &ReadingColumns) -> Result<(), sqlx::Error> {
        let mut start = 0;
        for size in chunk_sizes(rows.len()) {
            let sql = self.insert_sql(size);
            let mut query = sqlx::query(&sql);
            for i in start..start + size {
                query = query
                    .bind(rows.sensor_pk[i])
                    .bind(rows.time[i])
                    .bind(rows.value[i]);
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

    async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

super::shared::shared_queries!(SqliteStore);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_all_rows_with_few_shapes() {
        for n in [0, 1, 2, 3, 1000, 8191, 8192, 8193, 50_000] {
            let sizes: Vec<_> = chunk_sizes(n).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n);
            assert!(
                sizes
                    .iter()
                    .all(|s| s.is_power_of_two() && *s <= MAX_ROWS_PER_INSERT)
            );
        }
    }
}
