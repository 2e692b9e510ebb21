//! PostgreSQL backend, chosen by `--database-url postgres://...`.
//!
//! Readings go in with one `INSERT ... SELECT FROM UNNEST(...)` per group:
//! three array parameters however many rows, so the statement is prepared
//! once and the rows travel in PostgreSQL's binary array format.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};

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

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self, StorageError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
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
             VALUES ($1, $2, $3::jsonb, $4, $5) RETURNING {DEVICE_COLUMNS}"
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
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = $1");
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
        // COLLATE "C" orders like SQLite's byte-wise comparison, so pages are
        // the same on both backends whatever the database's locale.
        let sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id COLLATE \"C\" > $1 \
             ORDER BY device_id COLLATE \"C\" LIMIT $2"
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
        let row = sqlx::query("SELECT pk, device_id FROM devices WHERE token_sha256 = $1")
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
        let seq: i64 = sqlx::query_scalar("SELECT committed_sequence FROM devices WHERE pk = $1")
            .bind(device_pk)
            .fetch_one(&self.pool)
            .await?;
        to_u64(seq, "committed_sequence")
    }

    pub(crate) async fn begin_group(&self) -> Result<PgGroupTx, sqlx::Error> {
        Ok(PgGroupTx {
            tx: self.pool.begin().await?,
        })
    }
}

pub(crate) struct PgGroupTx {
    tx: Transaction<'static, Postgres>,
}

impl GroupTx for PgGroupTx {
    async fn committed_sequences(
        &mut self,
        device_pks: &[i64],
    ) -> Result<HashMap<i64, u64>, sqlx::Error> {
        // Locked in pk order so that two server processes sharing the
        // database cannot deadlock on each other's groups.
        let rows = sqlx::query(
            "SELECT pk, committed_sequence FROM devices WHERE pk = ANY($1) ORDER BY pk FOR UPDATE",
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
    ) -> Result<i64, sqlx::Error> {
        // The no-op update makes RETURNING yield the existing row too.
        sqlx::query_scalar(
            "INSERT INTO sensors (device_pk, sensor, unit) VALUES ($1, $2, $3) \
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
        sqlx::query(
            "INSERT INTO readings (sensor_pk, time_unix_nano, value) \
             SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::float8[])",
        )
        .bind(&rows.sensor_pk)
        .bind(&rows.time)
        .bind(&rows.value)
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

    async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

// ---- alerts (SQL shared in storage::alerts) --------------------------------

impl PgStore {
    pub async fn put_rule(&self, rule: &Rule, now: UnixNanos) -> Result<(), StorageError> {
        let definition = serde_json::to_string(rule).expect("rules serialise");
        sqlx::query(&alerts::numbered(alerts::UPSERT_RULE))
            .bind(rule.id.as_str())
            .bind(rule.severity.as_str())
            .bind(rule.sensor.as_ref().map(|s| s.as_str()))
            .bind(definition)
            .bind(now)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_rule(&self, id: &RuleId) -> Result<bool, StorageError> {
        let done = sqlx::query(&alerts::numbered(alerts::DELETE_RULE))
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn list_rules(&self) -> Result<Vec<Rule>, StorageError> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT definition::text FROM alert_rules ORDER BY rule_id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|json| alerts::rule_from_json(json))
            .collect()
    }

    pub async fn record_alert_events(
        &self,
        events: &[NewAlertEvent],
        now: UnixNanos,
    ) -> Result<Vec<AlertEventRecord>, StorageError> {
        let mut tx = self.pool.begin().await?;
        let mut recorded = Vec::with_capacity(events.len());
        for e in events {
            let alert_id: i64 = match (e.kind, e.alert_id) {
                (EventKind::Fired, _) => {
                    sqlx::query_scalar(&alerts::numbered(alerts::INSERT_ALERT))
                        .bind(e.rule_id.as_str())
                        .bind(e.device_pk)
                        .bind(&e.sensor)
                        .bind(e.severity.as_str())
                        .bind(e.time)
                        .bind(e.value)
                        .bind(&e.message)
                        .fetch_one(&mut *tx)
                        .await?
                }
                (EventKind::Acked, Some(id)) => {
                    sqlx::query(&alerts::numbered(alerts::ACK_ALERT))
                        .bind(e.time)
                        .bind(id as i64)
                        .execute(&mut *tx)
                        .await?;
                    id as i64
                }
                (EventKind::Resolved, Some(id)) => {
                    sqlx::query(&alerts::numbered(alerts::RESOLVE_ALERT))
                        .bind(e.time)
                        .bind(e.value)
                        .bind(id as i64)
                        .execute(&mut *tx)
                        .await?;
                    id as i64
                }
                (EventKind::Acked | EventKind::Resolved, None) => {
                    return Err(StorageError::Corrupt("event without its alert".into()));
                }
            };
            let event_id: i64 = sqlx::query_scalar(&alerts::numbered(alerts::INSERT_EVENT))
                .bind(alert_id)
                .bind(e.kind.as_str())
                .bind(e.rule_id.as_str())
                .bind(e.device_id.as_str())
                .bind(&e.sensor)
                .bind(e.severity.as_str())
                .bind(e.value)
                .bind(e.time)
                .bind(&e.message)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
            recorded.push(AlertEventRecord {
                event_id: alerts::id(event_id),
                kind: e.kind,
                alert_id: alerts::id(alert_id),
                rule_id: e.rule_id.as_str().to_owned(),
                device_id: e.device_id.as_str().to_owned(),
                sensor: e.sensor.clone(),
                severity: e.severity,
                value: e.value,
                time: e.time,
                message: e.message.clone(),
            });
        }
        tx.commit().await?;
        Ok(recorded)
    }

    pub async fn alert_events_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AlertEventRecord>, StorageError> {
        let rows = sqlx::query(&alerts::numbered(alerts::EVENTS_AFTER))
            .bind(after.min(i64::MAX as u64) as i64)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(alerts::event_from_row).collect()
    }

    pub async fn list_alerts(
        &self,
        include_resolved: bool,
        device_ids: &[String],
        limit: u32,
    ) -> Result<Vec<AlertRecord>, StorageError> {
        let sql = alerts::numbered(&alerts::list_alerts_sql(include_resolved, device_ids.len()));
        let mut query = sqlx::query(&sql);
        for d in device_ids {
            query = query.bind(d);
        }
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter().map(alerts::alert_from_row).collect()
    }

    pub async fn get_alert(&self, alert_id: u64) -> Result<AlertRecord, StorageError> {
        let sql = alerts::numbered(&format!(
            "SELECT {} WHERE a.alert_id = ?",
            alerts::ALERT_COLUMNS
        ));
        let row = sqlx::query(&sql)
            .bind(alert_id.min(i64::MAX as u64) as i64)
            .fetch_one(&self.pool)
            .await?;
        alerts::alert_from_row(&row)
    }
}
// ---- commands and presence (SQL shared in storage::commands) ----------------

impl PgStore {
    pub async fn enqueue_command(
        &self,
        device_pk: i64,
        kind: &CommandKind,
        created: UnixNanos,
        expires: UnixNanos,
        max_pending: u64,
    ) -> Result<CommandRecord, EnqueueError> {
        let mut tx = self.pool.begin().await.map_err(StorageError::from)?;
        let pending: i64 = sqlx::query_scalar(&alerts::numbered(commands::COUNT_PENDING))
            .bind(device_pk)
            .fetch_one(&mut *tx)
            .await
            .map_err(StorageError::from)?;
        if pending as u64 >= max_pending {
            return Err(EnqueueError::QueueFull(pending as u64));
        }
        let id: i64 = sqlx::query_scalar(&alerts::numbered(commands::INSERT_COMMAND))
            .bind(device_pk)
            .bind(kind.name())
            .bind(kind.arguments().to_string())
            .bind(created)
            .bind(expires)
            .fetch_one(&mut *tx)
            .await
            .map_err(StorageError::from)?;
        tx.commit().await.map_err(StorageError::from)?;
        Ok(self.get_command(id as u64).await?)
    }

    pub async fn deliverable_commands(
        &self,
        device_pk: i64,
        now: UnixNanos,
    ) -> Result<Vec<CommandRecord>, StorageError> {
        let rows = sqlx::query(&alerts::numbered(&commands::deliverable_sql()))
            .bind(device_pk)
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(commands::command_from_row).collect()
    }

    pub async fn mark_command_sent(
        &self,
        command_id: u64,
        now: UnixNanos,
    ) -> Result<bool, StorageError> {
        let done = sqlx::query(&alerts::numbered(commands::MARK_SENT))
            .bind(now)
            .bind(command_id as i64)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn ack_command(
        &self,
        device_pk: i64,
        command_id: u64,
        state: CommandState,
        result: &str,
        now: UnixNanos,
    ) -> Result<Option<CommandRecord>, StorageError> {
        let done = sqlx::query(&alerts::numbered(commands::ACK))
            .bind(state.as_str())
            .bind(result)
            .bind(now)
            .bind(command_id.min(i64::MAX as u64) as i64)
            .bind(device_pk)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        Ok(Some(self.get_command(command_id).await?))
    }

    pub async fn expire_commands(&self, now: UnixNanos) -> Result<Vec<u64>, StorageError> {
        let ids: Vec<i64> = sqlx::query_scalar(&alerts::numbered(commands::EXPIRE))
            .bind(now)
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        Ok(ids.into_iter().map(|id| id.max(0) as u64).collect())
    }

    pub async fn get_command(&self, command_id: u64) -> Result<CommandRecord, StorageError> {
        let sql = alerts::numbered(&format!(
            "SELECT {} WHERE c.command_id = ?",
            commands::COMMAND_COLUMNS
        ));
        let row = sqlx::query(&sql)
            .bind(command_id.min(i64::MAX as u64) as i64)
            .fetch_one(&self.pool)
            .await?;
        commands::command_from_row(&row)
    }

    pub async fn list_commands(
        &self,
        device_id: Option<&str>,
        state: Option<CommandState>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<CommandRecord>, StorageError> {
        let sql = alerts::numbered(&commands::list_sql(device_id.is_some(), state.is_some()));
        let mut query = sqlx::query(&sql).bind(after.min(i64::MAX as u64) as i64);
        if let Some(d) = device_id {
            query = query.bind(d);
        }
        if let Some(s) = state {
            query = query.bind(s.as_str());
        }
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter().map(commands::command_from_row).collect()
    }

    pub async fn set_presence(
        &self,
        device_pk: i64,
        online: bool,
        seen: UnixNanos,
        firmware: Option<&str>,
    ) -> Result<(), StorageError> {
        sqlx::query(&alerts::numbered(commands::PRESENCE))
            .bind(online)
            .bind(seen)
            .bind(firmware)
            .bind(device_pk)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn mark_all_offline(&self) -> Result<(), StorageError> {
        sqlx::query(commands::ALL_OFFLINE)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
