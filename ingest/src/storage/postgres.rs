//! PostgreSQL backend, chosen by `--database-url postgres://...`.
//!
//! Readings go in with one `INSERT ... SELECT FROM UNNEST(...)` per group:
//! three array parameters however many rows, so the statement is prepared
//! once and the rows travel in PostgreSQL's binary array format.

use super::EventTxHold;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::Mutex;

use super::alerts::{self, EventOutcome, NewAlertEvent, PendingChange};
use super::cluster;
use super::devices::{self, to_u64};
use super::partitions::{DAY_NANOS, parse_partition_name, partition_name};
use super::rollup::RollupRows;
use super::sql::Conn;
use super::{Expired, GroupTx, ReadingColumns, StorageError};
use crate::domain::time::UnixNanos;
use crate::domain::{SensorName, Unit};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

#[derive(Clone)]
pub struct PgStore {
    pub(super) pool: PgPool,
    /// How the pool connects, for the connections a server keeps beside it
    /// (the notification listener, the leader's lock).
    options: Arc<PgConnectOptions>,
    /// Days whose readings partition is known to exist. The lock also keeps
    /// this process's writers from creating the same partition at once.
    partitions: Arc<Mutex<BTreeSet<i64>>>,
    pub(super) event_tx_hold: EventTxHold,
}

/// How long the first connection may take before PostgreSQL counts as
/// unreachable: an operator starting a server should not wait for the
/// pool's own timeout to learn that nothing listens there.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection before the pool: the two mistakes of a first start (no
/// server at that address, no such database) become one plain answer
/// saying what to do, instead of a pool timeout.
async fn probe(options: &PgConnectOptions) -> Result<(), StorageError> {
    use sqlx::Connection;
    let at = format!("{}:{}", options.get_host(), options.get_port());
    let unreachable = |why: String| StorageError::Unreachable {
        at: at.clone(),
        why,
    };
    let connecting = sqlx::PgConnection::connect_with(options);
    match tokio::time::timeout(PROBE_TIMEOUT, connecting).await {
        Err(_) => Err(unreachable(format!(
            "no answer within {}s",
            PROBE_TIMEOUT.as_secs()
        ))),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(sqlx::Error::Io(e))) => Err(unreachable(match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
            _ => e.to_string(),
        })),
        // invalid_catalog_name: the server is there, the database is not.
        Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("3D000") => {
            Err(StorageError::NoDatabase {
                // Without one in the URL, PostgreSQL takes the user's name.
                name: options
                    .get_database()
                    .unwrap_or(options.get_username())
                    .to_owned(),
                host: options.get_host().to_owned(),
                port: options.get_port(),
            })
        }
        Ok(Err(e)) => Err(e.into()),
    }
}

impl PgStore {
    /// Connects with `application_name` set to `name`, so each process's
    /// connections can be told apart in `pg_stat_activity`.
    pub async fn connect(url: &str, name: &str) -> Result<Self, StorageError> {
        let options = url.parse::<PgConnectOptions>()?;
        probe(&options).await?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone().application_name(name))
            .await?;
        Ok(Self {
            pool,
            options: Arc::new(options),
            partitions: Arc::default(),
            event_tx_hold: EventTxHold::default(),
        })
    }

    /// Options for a connection of this process kept apart from the pool.
    pub fn connect_options(&self, name: &str) -> PgConnectOptions {
        PgConnectOptions::clone(&self.options).application_name(name)
    }

    pub async fn migrate(&self) -> Result<(), StorageError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn record_last_seen(&self, seen: &[(i64, UnixNanos)]) -> Result<(), StorageError> {
        let mut seen = seen.to_vec();
        seen.sort_unstable();
        let (pks, times): (Vec<i64>, Vec<i64>) = seen.into_iter().unzip();
        let mut tx = self.pool.begin().await?;
        // The rows in pk order first, as group commits lock them: an UPDATE
        // over a join locks in the join's order, and deadlocked with them
        // (each deadlock stalled both for PostgreSQL's deadlock_timeout).
        sqlx::query("SELECT pk FROM devices WHERE pk = ANY($1) ORDER BY pk FOR NO KEY UPDATE")
            .bind(&pks)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE devices d SET last_seen_unix_nano = u.seen \
             FROM UNNEST($1::int8[], $2::int8[]) AS u(pk, seen) \
             WHERE d.pk = u.pk AND (d.last_seen_unix_nano IS NULL OR d.last_seen_unix_nano < u.seen)",
        )
        .bind(&pks)
        .bind(&times)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn begin_group(&self) -> Result<PgGroupTx, sqlx::Error> {
        Ok(PgGroupTx {
            tx: self.pool.begin().await?,
            event_tx_hold: self.event_tx_hold,
        })
    }
}

impl PgStore {
    /// Creates the readings partitions of `days` that do not exist yet;
    /// returns how many it created.
    pub async fn ensure_partitions(&self, days: &[i64]) -> Result<usize, StorageError> {
        let mut known = self.partitions.lock().await;
        let mut created = 0;
        for &day in days {
            if known.contains(&day) {
                continue;
            }
            let name = partition_name(day);
            if !self.partition_exists(&name).await? {
                let sql = format!(
                    "CREATE TABLE IF NOT EXISTS {name} PARTITION OF readings \
                     FOR VALUES FROM ({}) TO ({})",
                    day * DAY_NANOS,
                    (day + 1) * DAY_NANOS
                );
                match sqlx::raw_sql(&sql).execute(&self.pool).await {
                    Ok(_) => {
                        created += 1;
                        tracing::info!(partition = %name, "created readings partition");
                    }
                    // Another server process created it a moment ago.
                    Err(e) if self.partition_exists(&name).await? => {
                        tracing::debug!(partition = %name, error = %e, "partition created concurrently");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            known.insert(day);
        }
        Ok(created)
    }

    async fn partition_exists(&self, name: &str) -> Result<bool, StorageError> {
        Ok(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(name)
            .fetch_one(&self.pool)
            .await?)
    }

    /// The readings partitions, by day, with whether a detach of it is
    /// pending (an interrupted earlier retention run).
    pub async fn list_partitions(&self) -> Result<Vec<(i64, String, bool)>, StorageError> {
        let rows = sqlx::query(
            "SELECT c.relname::text, i.inhdetachpending FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'readings'::regclass ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let name: String = row.try_get(0)?;
            if let Some(day) = parse_partition_name(&name) {
                out.push((day, name, row.try_get(1)?));
            }
        }
        Ok(out)
    }

    /// Drops every readings partition whose whole day is before `cutoff`.
    /// A partition is detached CONCURRENTLY first, which waits for
    /// transactions using it instead of locking out the writers.
    pub async fn expire_readings(&self, cutoff: UnixNanos) -> Result<Expired, StorageError> {
        let mut expired = Expired::default();
        for (day, name, pending) in self.list_partitions().await? {
            if (day + 1) * DAY_NANOS > cutoff {
                continue;
            }
            self.partitions.lock().await.remove(&day);
            let detach = if pending {
                format!("ALTER TABLE readings DETACH PARTITION {name} FINALIZE")
            } else {
                format!("ALTER TABLE readings DETACH PARTITION {name} CONCURRENTLY")
            };
            sqlx::raw_sql(&detach).execute(&self.pool).await?;
            sqlx::raw_sql(&format!("DROP TABLE {name}"))
                .execute(&self.pool)
                .await?;
            tracing::info!(partition = %name, "dropped readings partition past retention");
            expired.partitions += 1;
            expired.steps += 1;
        }
        Ok(expired)
    }
}

pub struct PgGroupTx {
    tx: Transaction<'static, Postgres>,
    event_tx_hold: EventTxHold,
}

impl GroupTx for PgGroupTx {
    async fn committed_sequences(
        &mut self,
        device_pks: &[i64],
    ) -> Result<HashMap<i64, u64>, sqlx::Error> {
        // Locked in pk order so that two server processes sharing the
        // database cannot deadlock on each other's groups. NO KEY: the
        // group changes no key of the row, and this lock lets a command's
        // insert (whose foreign key takes KEY SHARE on the device's row)
        // go ahead while a group holds the row.
        let rows = sqlx::query(
            "SELECT pk, committed_sequence FROM devices WHERE pk = ANY($1) ORDER BY pk FOR NO KEY UPDATE",
        )
        .bind(device_pks)
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
            Conn::Postgres(&mut self.tx),
            device_pk,
            sensor,
            unit,
            max_sensors,
        )
        .await
    }

    /// Binary COPY: PostgreSQL's cheapest way in, with no per-row parsing
    /// or planning. The rows land in the group's transaction like any
    /// statement's, and the partitioned table routes each to its day.
    async fn insert_readings(&mut self, rows: &ReadingColumns) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let data = super::copy_binary::readings(rows);
        let mut copy = self
            .tx
            .copy_in_raw(
                "COPY readings (sensor_pk, time_unix_nano, value, batch_sequence, batch_index) \
                 FROM STDIN (FORMAT binary)",
            )
            .await?;
        copy.send(data).await?;
        let copied = copy.finish().await?;
        debug_assert_eq!(copied, rows.len() as u64);
        Ok(())
    }

    async fn add_rollups(&mut self, rows: &RollupRows) -> Result<(), sqlx::Error> {
        // Rows are unique by key (summed per group first), as ON CONFLICT
        // requires, and sorted, so writers lock buckets in one order.
        sqlx::query(
            "INSERT INTO readings_hourly_rollup AS r (sensor_pk, hour_unix_nano, reading_count, \
             value_sum, value_min, value_max, first_time_unix_nano, first_value, \
             last_time_unix_nano, last_value) \
             SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::float8[], $5::float8[], \
                                  $6::float8[], $7::int8[], $8::float8[], $9::int8[], $10::float8[]) \
             ON CONFLICT (sensor_pk, hour_unix_nano) DO UPDATE SET \
             reading_count = r.reading_count + excluded.reading_count, \
             value_sum = r.value_sum + excluded.value_sum, \
             value_min = LEAST(r.value_min, excluded.value_min), \
             value_max = GREATEST(r.value_max, excluded.value_max), \
             first_value = CASE WHEN (excluded.first_time_unix_nano, excluded.first_value) \
                 < (r.first_time_unix_nano, r.first_value) \
                 THEN excluded.first_value ELSE r.first_value END, \
             first_time_unix_nano = CASE WHEN (excluded.first_time_unix_nano, excluded.first_value) \
                 < (r.first_time_unix_nano, r.first_value) \
                 THEN excluded.first_time_unix_nano ELSE r.first_time_unix_nano END, \
             last_value = CASE WHEN (excluded.last_time_unix_nano, excluded.last_value) \
                 > (r.last_time_unix_nano, r.last_value) \
                 THEN excluded.last_value ELSE r.last_value END, \
             last_time_unix_nano = GREATEST(r.last_time_unix_nano, excluded.last_time_unix_nano)",
        )
        .bind(&rows.sensor_pk)
        .bind(&rows.hour)
        .bind(&rows.count)
        .bind(&rows.sum)
        .bind(&rows.min)
        .bind(&rows.max)
        .bind(&rows.first_time)
        .bind(&rows.first_value)
        .bind(&rows.last_time)
        .bind(&rows.last_value)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn set_committed_sequences(
        &mut self,
        updates: &[(i64, u64)],
        now: UnixNanos,
    ) -> Result<(), sqlx::Error> {
        let pks: Vec<i64> = updates.iter().map(|u| u.0).collect();
        let seqs: Vec<i64> = updates.iter().map(|u| u.1 as i64).collect();
        sqlx::query(
            "UPDATE devices AS d SET committed_sequence = u.seq, last_upload_unix_nano = $3 \
             FROM UNNEST($1::int8[], $2::int8[]) AS u(pk, seq) WHERE d.pk = u.pk",
        )
        .bind(&pks)
        .bind(&seqs)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn open_alerts(
        &mut self,
        device_pks: &[i64],
    ) -> Result<Vec<(i64, String, i64)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT device_pk, rule_id, alert_id FROM alerts WHERE resolved_unix_nano IS NULL \
             AND device_pk = ANY($1)",
        )
        .bind(device_pks)
        .fetch_all(&mut *self.tx)
        .await
    }

    async fn pending_holds(
        &mut self,
        device_pks: &[i64],
    ) -> Result<Vec<(i64, String, i64)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT device_pk, rule_id, since_unix_nano FROM alert_pending WHERE device_pk = ANY($1)",
        )
        .bind(device_pks)
        .fetch_all(&mut *self.tx)
        .await
    }

    async fn last_reading(
        &mut self,
        device_pk: i64,
        sensor: &SensorName,
    ) -> Result<Option<(UnixNanos, f64)>, sqlx::Error> {
        alerts::last_reading(Conn::Postgres(&mut self.tx), device_pk, sensor).await
    }

    async fn append_feed(
        &mut self,
        batches: &[super::feed::FeedAppend],
        now: UnixNanos,
    ) -> Result<u64, sqlx::Error> {
        let first =
            super::feed::take_positions(Conn::Postgres(&mut self.tx), batches.len()).await?;
        super::feed::insert_pg(&mut self.tx, first, batches, now).await?;
        Ok(first as u64)
    }

    async fn record_alert_events(
        &mut self,
        events: &[NewAlertEvent],
        now: UnixNanos,
    ) -> Result<Vec<EventOutcome>, sqlx::Error> {
        alerts::record_events(
            Conn::Postgres(&mut self.tx),
            events,
            now,
            self.event_tx_hold,
        )
        .await
    }

    async fn set_pending_holds(&mut self, changes: &[PendingChange]) -> Result<(), sqlx::Error> {
        alerts::set_pending(Conn::Postgres(&mut self.tx), changes).await
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

/// Replicas and their leases: PostgreSQL only, where several processes can
/// share a database. Lease times are the database's clock.
impl PgStore {
    /// A notification in a transaction of its own, for a change already
    /// committed (a credential or rule change, whose transactions are shared
    /// with the single-process backend).
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), StorageError> {
        let mut conn = self.pool.acquire().await?;
        Conn::Postgres(&mut conn).notify(channel, payload).await?;
        Ok(())
    }

    pub async fn register_replica(
        &self,
        replica_id: &str,
        addr: &str,
        lease: Duration,
    ) -> Result<(), StorageError> {
        let now = cluster::DB_NOW;
        sqlx::query(&format!(
            "INSERT INTO replicas (replica_id, addr, started_unix_nano, lease_until_unix_nano) \
             VALUES ($1, $2, {now}, {now} + $3) \
             ON CONFLICT (replica_id) DO UPDATE SET lease_until_unix_nano = excluded.lease_until_unix_nano"
        ))
        .bind(replica_id)
        .bind(addr)
        .bind(lease.as_nanos().min(i64::MAX as u128) as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Extends the lease; false if the replica's row is gone (another
    /// replica found the lease lapsed and swept its sessions).
    pub async fn renew_replica(
        &self,
        replica_id: &str,
        lease: Duration,
    ) -> Result<bool, StorageError> {
        let done = sqlx::query(&format!(
            "UPDATE replicas SET lease_until_unix_nano = {} + $2 WHERE replica_id = $1",
            cluster::DB_NOW
        ))
        .bind(replica_id)
        .bind(lease.as_nanos().min(i64::MAX as u128) as i64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Deletes replicas whose lease lapsed and ends their sessions: their
    /// devices go offline unless they opened a stream elsewhere meanwhile
    /// (the session row then names the other replica). One transaction;
    /// the devices' rows are locked first in pk order, as opens, closes and
    /// group commits take them. Returns the devices taken offline.
    pub async fn sweep_dead_replicas(&self) -> Result<Vec<i64>, StorageError> {
        let mut tx = self.pool.begin().await?;
        let dead: Vec<String> = sqlx::query_scalar(&format!(
            "DELETE FROM replicas WHERE lease_until_unix_nano < {} RETURNING replica_id",
            cluster::DB_NOW
        ))
        .fetch_all(&mut *tx)
        .await?;
        let gone = Self::end_sessions_of(&mut tx, &dead).await?;
        tx.commit().await?;
        Ok(gone)
    }

    /// Opens streams in one transaction (a reconnect storm is many opens,
    /// and each notifying commit waits its turn): each gets the next
    /// generation of its device and marks it online, and the other
    /// processes are told at commit, so an older stream of the device
    /// ends wherever it is.
    ///
    /// Three statements whatever the batch's size, with the devices' rows
    /// locked first in pk order, as group commits lock them: a statement
    /// per stream held the rows for a second under load and, locking in
    /// arrival order, deadlocked with group commits.
    pub async fn open_sessions(
        &self,
        opens: &[cluster::SessionOpen],
        replica_id: &str,
    ) -> Result<Vec<cluster::SessionTicket>, StorageError> {
        let mut tx = self.pool.begin().await?;
        let mut tickets = Vec::with_capacity(opens.len());
        // A device opening twice in one batch: its streams go in rounds, as
        // one statement cannot upsert a row twice.
        let mut rest: Vec<&cluster::SessionOpen> = opens.iter().collect();
        while !rest.is_empty() {
            let mut seen = BTreeSet::new();
            let (round, later): (Vec<_>, Vec<_>) =
                rest.into_iter().partition(|o| seen.insert(o.device_pk));
            rest = later;
            let mut pks: Vec<i64> = round.iter().map(|o| o.device_pk).collect();
            let ats: Vec<i64> = round.iter().map(|o| o.at).collect();
            let firmware: Vec<Option<&str>> = round.iter().map(|o| o.firmware.as_deref()).collect();
            let mut sorted = pks.clone();
            sorted.sort_unstable();
            sqlx::query("SELECT pk FROM devices WHERE pk = ANY($1) ORDER BY pk FOR NO KEY UPDATE")
                .bind(&sorted)
                .execute(&mut *tx)
                .await?;
            let issued: Vec<(i64, i64)> = sqlx::query_as(
                "INSERT INTO device_sessions (device_pk, replica_id, generation, connected_unix_nano) \
                 SELECT u.pk, $2, 1, u.at FROM UNNEST($1::int8[], $3::int8[]) AS u(pk, at) \
                 ON CONFLICT (device_pk) DO UPDATE SET replica_id = excluded.replica_id, \
                 generation = device_sessions.generation + 1, connected_unix_nano = excluded.connected_unix_nano \
                 RETURNING device_pk, generation",
            )
            .bind(&pks)
            .bind(replica_id)
            .bind(&ats)
            .fetch_all(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE devices d SET online = TRUE, last_seen_unix_nano = u.at, \
                 firmware_version = COALESCE(u.firmware, d.firmware_version) \
                 FROM UNNEST($1::int8[], $2::int8[], $3::text[]) AS u(pk, at, firmware) WHERE d.pk = u.pk",
            )
            .bind(&pks)
            .bind(&ats)
            .bind(&firmware)
            .execute(&mut *tx)
            .await?;
            let generations: HashMap<i64, i64> = issued.into_iter().collect();
            for pk in pks.drain(..) {
                let generation = *generations.get(&pk).ok_or_else(|| {
                    StorageError::Corrupt(format!("no session issued for device {pk}"))
                })?;
                tickets.push(cluster::SessionTicket {
                    device_pk: pk,
                    generation: to_u64(generation, "generation")?,
                });
            }
        }
        for payload in cluster::sessions_payload(&tickets) {
            Conn::Postgres(&mut tx)
                .notify(cluster::channel::SESSIONS, &payload)
                .await?;
        }
        tx.commit().await?;
        // In the order asked.
        let mut by_open = Vec::with_capacity(opens.len());
        let mut issued = tickets
            .into_iter()
            .fold(HashMap::<i64, Vec<_>>::new(), |mut m, t| {
                m.entry(t.device_pk).or_default().push(t);
                m
            });
        for o in opens {
            let list = issued.get_mut(&o.device_pk).expect("issued above");
            by_open.push(list.remove(0));
        }
        Ok(by_open)
    }

    /// Ends every session of one replica (its devices go offline).
    pub async fn sweep_replica(&self, replica_id: &str) -> Result<(), StorageError> {
        let mut tx = self.pool.begin().await?;
        Self::end_sessions_of(&mut tx, &[replica_id.to_owned()]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn end_sessions_of(
        tx: &mut Transaction<'static, Postgres>,
        replicas: &[String],
    ) -> Result<Vec<i64>, sqlx::Error> {
        if replicas.is_empty() {
            return Ok(Vec::new());
        }
        let held: Vec<i64> = sqlx::query_scalar(
            "SELECT device_pk FROM device_sessions WHERE replica_id = ANY($1) ORDER BY device_pk",
        )
        .bind(replicas)
        .fetch_all(&mut **tx)
        .await?;
        sqlx::query("SELECT pk FROM devices WHERE pk = ANY($1) ORDER BY pk FOR NO KEY UPDATE")
            .bind(&held)
            .execute(&mut **tx)
            .await?;
        // Re-checked under the locks: a device that reopened elsewhere
        // meanwhile names another replica now.
        // One round trip: the sessions end and their devices go offline.
        sqlx::query_scalar(
            "WITH gone AS (UPDATE device_sessions SET replica_id = NULL \
                 WHERE device_pk = ANY($1) AND replica_id = ANY($2) RETURNING device_pk), \
             offline AS (UPDATE devices SET online = FALSE \
                 WHERE pk IN (SELECT device_pk FROM gone)) \
             SELECT device_pk FROM gone",
        )
        .bind(&held)
        .bind(replicas)
        .fetch_all(&mut **tx)
        .await
    }

    /// Which of `devices` have commands queued: one query for all the
    /// streams a process holds, in case a wake-up was not heard.
    pub async fn devices_with_queued(&self, devices: &[i64]) -> Result<Vec<i64>, StorageError> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT device_pk FROM commands WHERE state = 'queued' AND device_pk = ANY($1)",
        )
        .bind(devices)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A replica stopping cleanly: its streams have ended, its row goes.
    pub async fn deregister_replica(&self, replica_id: &str) -> Result<(), StorageError> {
        sqlx::query("DELETE FROM replicas WHERE replica_id = $1")
            .bind(replica_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
