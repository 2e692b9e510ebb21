//! Reading readings back (the read path, `QueryReadings`): which series a
//! request means, then their readings or hourly rollups page by page.
//!
//! Every page is one short statement, keyset-paginated by the series'
//! sensor key and then (time, value): nothing holds a transaction or a
//! cursor open between pages, so a long export neither pins SQLite's WAL
//! nor keeps a PostgreSQL snapshot, and nothing here holds more than a
//! page. The statements run on a [`ReadPool`] of their own, so readers
//! never take the connections the group commit and the control plane use.

use super::read_page::{RawRows, RowsPage};
use super::rollup::RollupRows;
use std::collections::BTreeMap;

use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{PgPool, SqlitePool};

use super::sql::{On, Row, Statement};
use super::{StorageError, Store};
use crate::domain::Labels;
use crate::domain::time::now_unix_nanos;

/// Connections for reading readings, apart from the store's own.
#[derive(Clone)]
pub enum ReadPool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Which devices a read asks for.
#[derive(Debug, Clone, Copy)]
pub enum Wanted<'a> {
    Ids(&'a [String]),
    Labels(&'a BTreeMap<String, String>),
}

/// What [`ReadPool::choose_devices`] found.
#[derive(Debug)]
pub enum Chosen {
    Devices(Vec<SelectedDevice>),
    /// A listed id that no device has.
    Missing(String),
    /// The labels match more devices than the limit.
    TooMany,
}

/// A device a request selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedDevice {
    pub pk: i64,
    pub device_id: String,
}

/// One series: a sensor of a device, with its unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesInfo {
    pub sensor_pk: i64,
    pub device_id: String,
    pub sensor: String,
    pub unit: String,
}

/// A page of raw readings on PostgreSQL (see [`ReadPool::raw_rows`]).
/// The series bound the index scans (a range of the key); membership is
/// only a filter (`+ 0` keeps it out of the index condition), so a page
/// costs one descent per day partition. As an index condition, an array of
/// 256 series cost 256 descents in each of 365 partitions: 350 ms before
/// the first row.
///
/// The page comes back as one row per series, its times and values as
/// arrays. Row by row, this process spent more CPU decoding than
/// PostgreSQL spent on the statement (a profile of an export: sqlx's
/// per-row stream, rows and type checks were about half of the server's
/// samples); arrays decode as a block. They are built in the order the
/// inner statement gives, without an `ORDER BY` of their own: that sorted
/// every series again and cost PostgreSQL a quarter more per page. SQL
/// does not promise that order, so [`RawRows::extend_series`] checks it
/// and sorts when it was not kept.
const PG_RAW_ROWS: &str = "SELECT sensor_pk, array_agg(time_unix_nano), array_agg(value) \
     FROM (SELECT sensor_pk, time_unix_nano, value FROM readings \
       WHERE (sensor_pk, time_unix_nano) >= ($1, $2) AND sensor_pk <= $3 \
         AND sensor_pk + 0 = ANY($4) \
         AND (sensor_pk > $1 OR time_unix_nano > $2 OR value >= $5) \
         AND time_unix_nano >= $6 AND time_unix_nano < $7 \
       ORDER BY sensor_pk, time_unix_nano, value LIMIT $8) page \
     GROUP BY sensor_pk ORDER BY sensor_pk";

/// `$from, $from+1, …` for `n` values: the shared SQL has no arrays.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl ReadPool {
    /// A pool of `connections` beside `store`'s, on the same database.
    pub async fn open(store: &Store, connections: u32) -> Result<Self, StorageError> {
        let connections = connections.max(1);
        Ok(match store {
            Store::Sqlite(s) => {
                // Pages are read once, in key order: a small page cache
                // per connection does (the writer's is 64 MiB).
                let options = (*s.pool.connect_options())
                    .clone()
                    .pragma("cache_size", format!("-{}", 8 * 1024));
                Self::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(connections)
                        .connect_with(options)
                        .await?,
                )
            }
            Store::Postgres(s) => Self::Postgres(
                PgPoolOptions::new()
                    .max_connections(connections)
                    .min_connections(connections)
                    .acquire_timeout(std::time::Duration::from_secs(10))
                    // A custom plan of a statement over the readings plans
                    // every day partition, each time: tens of milliseconds
                    // with a year of them. A generic plan is made once per
                    // connection and prunes partitions when it starts; the
                    // connection makes it as it opens, so no query waits
                    // for it.
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::query(PG_RAW_ROWS)
                                .bind(0i64)
                                .bind(0i64)
                                .bind(0i64)
                                .bind(Vec::<i64>::new())
                                .bind(0f64)
                                .bind(0i64)
                                .bind(0i64)
                                .bind(0i64)
                                .execute(conn)
                                .await?;
                            Ok(())
                        })
                    })
                    .connect_with(
                        s.connect_options("ingest-read")
                            .options([("plan_cache_mode", "force_generic_plan")]),
                    )
                    .await?,
            ),
        })
    }

    pub async fn close(&self) {
        match self {
            Self::Sqlite(p) => p.close().await,
            Self::Postgres(p) => p.close().await,
        }
    }

    fn query<'q>(&self, sql: &'q str) -> Statement<'_, 'q> {
        match self {
            Self::Sqlite(p) => Statement::Sqlite(On::Pool(p), sqlx::query(sql)),
            Self::Postgres(p) => Statement::Postgres(On::Pool(p), sqlx::query(sql)),
        }
    }

    /// The devices a read selects, by ids or by labels, at most `limit`
    /// by labels: what QueryReadings and WatchReadings both resolve.
    pub async fn choose_devices(
        &self,
        wanted: Wanted<'_>,
        limit: usize,
    ) -> Result<Chosen, StorageError> {
        Ok(match wanted {
            Wanted::Ids(ids) => {
                let found = self.devices_by_id(ids).await?;
                match ids
                    .iter()
                    .find(|id| !found.iter().any(|d| &d.device_id == *id))
                {
                    Some(missing) => Chosen::Missing(missing.clone()),
                    None => Chosen::Devices(found),
                }
            }
            Wanted::Labels(labels) => {
                let found = self.devices_by_labels(labels, limit).await?;
                if found.len() > limit {
                    Chosen::TooMany
                } else {
                    Chosen::Devices(found)
                }
            }
        })
    }

    /// The devices among `ids` that exist, in no particular order.
    pub async fn devices_by_id(&self, ids: &[String]) -> Result<Vec<SelectedDevice>, StorageError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT pk, device_id FROM devices WHERE device_id IN ({})",
            placeholders(1, ids.len())
        );
        let mut q = self.query(&sql);
        for id in ids {
            q = q.bind(id.as_str());
        }
        q.fetch_all_as(selected).await
    }

    /// Devices carrying every label of `labels` (all devices when empty),
    /// by key, at most `limit + 1` of them: one more than allowed tells the
    /// caller the selection is too large without reading the whole fleet's
    /// matches.
    pub async fn devices_by_labels(
        &self,
        labels: &BTreeMap<String, String>,
        limit: usize,
    ) -> Result<Vec<SelectedDevice>, StorageError> {
        const PAGE: i64 = 1000;
        let mut found = Vec::new();
        let mut after = i64::MIN;
        loop {
            let rows = self
                .query(
                    "SELECT pk, device_id, CAST(labels AS TEXT) FROM devices \
                     WHERE pk > $1 ORDER BY pk LIMIT $2",
                )
                .bind(after)
                .bind(PAGE)
                .fetch_all()
                .await?;
            for row in &rows {
                let device = selected(row)?;
                let json: String = row.get(2)?;
                let have = Labels::from_json(&json).map_err(|e| {
                    StorageError::Corrupt(format!("labels of device {}: {e}", device.device_id))
                })?;
                after = device.pk;
                if labels.iter().all(|(k, v)| have.get(k) == Some(v.as_str())) {
                    found.push(device);
                    if found.len() > limit {
                        return Ok(found);
                    }
                }
            }
            if (rows.len() as i64) < PAGE {
                return Ok(found);
            }
        }
    }

    /// At most `limit` series of these devices (only the named sensors,
    /// unless `sensors` is empty) with sensor keys above `after`, ordered
    /// by key: the order a query streams them in, and the first part of its
    /// resume position. Paged, so a fleet's thousands of series are never
    /// all in memory.
    pub async fn series(
        &self,
        device_pks: &[i64],
        sensors: &[String],
        after: i64,
        limit: usize,
    ) -> Result<Vec<SeriesInfo>, StorageError> {
        if device_pks.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = format!(
            "SELECT s.pk, d.device_id, s.sensor, s.unit FROM sensors s \
             JOIN devices d ON d.pk = s.device_pk WHERE s.device_pk IN ({})",
            placeholders(1, device_pks.len())
        );
        if !sensors.is_empty() {
            sql.push_str(&format!(
                " AND s.sensor IN ({})",
                placeholders(device_pks.len() + 1, sensors.len())
            ));
        }
        let next = device_pks.len() + sensors.len() + 1;
        sql.push_str(&format!(
            " AND s.pk > ${next} ORDER BY s.pk LIMIT ${}",
            next + 1
        ));
        let mut q = self.query(&sql);
        for &pk in device_pks {
            q = q.bind(pk);
        }
        for s in sensors {
            q = q.bind(s.as_str());
        }
        q = q.bind(after).bind(limit as i64);
        q.fetch_all_as(|row| {
            Ok(SeriesInfo {
                sensor_pk: row.get(0)?,
                device_id: row.get(1)?,
                sensor: row.get(2)?,
                unit: row.get(3)?,
            })
        })
        .await
    }

    /// The readings of `page`, by (series, time, value): one statement for
    /// many series, so an export pays a statement's start (on PostgreSQL,
    /// opening an index scan in every day partition of the range) once per
    /// page, not per series.
    pub async fn raw_rows(&self, page: &RowsPage<'_>) -> Result<RawRows, StorageError> {
        let Some(&last) = page.sensor_pks.last() else {
            return Ok(RawRows::default());
        };
        match self {
            Self::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                Ok(super::sqlite_read::raw_rows(&mut conn, page).await?)
            }
            Self::Postgres(pool) => {
                use futures::TryStreamExt;
                use sqlx::Row as _;
                let mut rows = sqlx::query(PG_RAW_ROWS)
                    .bind(page.from.sensor_pk)
                    .bind(page.from.time)
                    .bind(last)
                    .bind(page.sensor_pks)
                    .bind(page.from.value)
                    .bind(page.start)
                    .bind(page.end)
                    .bind(page.limit as i64)
                    .fetch(pool);
                let mut read = RawRows::with_capacity(page.limit);
                while let Some(row) = rows.try_next().await? {
                    read.extend_series(row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
                }
                Ok(read)
            }
        }
    }

    /// Whether every rollup row of the series in hours `[start, end)` knows
    /// its first reading (rows from before migration 0011 whose readings
    /// had partly expired do not).
    pub async fn rollup_has_first(
        &self,
        sensor_pk: i64,
        start: i64,
        end: i64,
    ) -> Result<bool, StorageError> {
        let missing: Option<i64> = self
            .query(
                "SELECT CAST(1 AS BIGINT) FROM readings_hourly_rollup WHERE sensor_pk = $1 \
                 AND hour_unix_nano >= $2 AND hour_unix_nano < $3 \
                 AND first_time_unix_nano IS NULL LIMIT 1",
            )
            .bind(sensor_pk)
            .bind(start)
            .bind(end)
            .fetch_optional_scalar()
            .await?;
        Ok(missing.is_none())
    }

    /// At most `limit` rollup rows of one series with hours in
    /// `[from, end)`, by hour.
    pub async fn rollup_page(
        &self,
        sensor_pk: i64,
        from: i64,
        end: i64,
        limit: usize,
    ) -> Result<RollupRows, StorageError> {
        let rows = self
            .query(
                "SELECT hour_unix_nano, reading_count, value_sum, value_min, value_max, \
                 COALESCE(first_time_unix_nano, last_time_unix_nano), \
                 COALESCE(first_value, last_value), last_time_unix_nano, last_value \
                 FROM readings_hourly_rollup WHERE sensor_pk = $1 \
                 AND hour_unix_nano >= $2 AND hour_unix_nano < $3 \
                 ORDER BY hour_unix_nano LIMIT $4",
            )
            .bind(sensor_pk)
            .bind(from)
            .bind(end)
            .bind(limit as i64)
            .fetch_all()
            .await?;
        // `first_*` are present: a series with rows lacking them is read
        // raw (see [`ReadPool::rollup_has_first`]).
        let mut page = RollupRows::default();
        for row in &rows {
            page.sensor_pk.push(sensor_pk);
            page.hour.push(row.get(0)?);
            page.count.push(row.get(1)?);
            page.sum.push(row.get(2)?);
            page.min.push(row.get(3)?);
            page.max.push(row.get(4)?);
            page.first_time.push(row.get(5)?);
            page.first_value.push(row.get(6)?);
            page.last_time.push(row.get(7)?);
            page.last_value.push(row.get(8)?);
        }
        Ok(page)
    }
}

fn selected(row: &Row) -> Result<SelectedDevice, StorageError> {
    Ok(SelectedDevice {
        pk: row.get(0)?,
        device_id: row.get(1)?,
    })
}

impl Store {
    /// The secret named `name`, shared by every server process on this
    /// database: created at random by the first that asks, then read by all.
    pub async fn server_secret(&self, name: &str) -> Result<Vec<u8>, StorageError> {
        let fresh: [u8; 32] = rand::random();
        self.write_conn()
            .await?
            .query(
                "INSERT INTO server_secrets (name, secret, created_unix_nano) \
                 VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(fresh.to_vec())
            .bind(now_unix_nanos())
            .execute()
            .await?;
        Ok(self
            .query("SELECT secret FROM server_secrets WHERE name = $1")
            .bind(name)
            .fetch_scalar()
            .await?)
    }
}
