//! Storage of devices and their sensors: registration, lookup, the committed
//! sequence, presence. Written once for both backends (see `sql.rs`).

use std::collections::HashMap;

use super::sql::{Conn, Row, bigint, placeholders};
use super::{Clash, StorageError, Store};
use crate::domain::time::UnixNanos;
use crate::domain::{CertFingerprint, DeviceId, DisplayName, Labels, SensorName, TokenHash, Unit};

/// A registered device as stored.
#[derive(Debug, Clone)]
pub struct DeviceRecord {
    /// Internal key; other tables refer to the device by it.
    pub pk: i64,
    pub id: DeviceId,
    pub display_name: DisplayName,
    pub labels: Labels,
    pub created: UnixNanos,
    pub committed_sequence: u64,
    pub last_upload: Option<UnixNanos>,
    /// Holds a Control stream now.
    pub online: bool,
    pub last_seen: Option<UnixNanos>,
    pub firmware_version: Option<String>,
    /// Since when an operator has disabled it.
    pub disabled: Option<UnixNanos>,
}

/// A sensor of a device and its newest reading, if one is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorRecord {
    pub sensor: String,
    pub unit: String,
    pub last: Option<(UnixNanos, f64)>,
}

/// A device to register.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub id: DeviceId,
    pub display_name: DisplayName,
    pub labels: Labels,
    /// The token issued at registration (the first of `device_tokens`).
    pub token_hash: TokenHash,
    pub created: UnixNanos,
    /// A certificate bound at registration.
    pub certificate: Option<CertFingerprint>,
    pub require_mtls: bool,
}

/// The columns [`device_from_row`] reads, in order.
const DEVICE_COLUMNS: &str = "pk, device_id, display_name, CAST(labels AS TEXT), created_unix_nano, committed_sequence, \
     last_upload_unix_nano, online, last_seen_unix_nano, firmware_version, disabled_unix_nano";

/// `device_tokens`' first row, written with the device.
pub(super) const INSERT_TOKEN: &str = "INSERT INTO device_tokens (device_pk, token_sha256, created_unix_nano) \
     VALUES ($1, $2, $3) RETURNING pk";

/// A device's presence: whether it holds a Control stream, when it was
/// last heard, the firmware it reported (kept when it reports none).
pub(super) const PRESENCE: &str = "UPDATE devices SET online = $1, last_seen_unix_nano = $2, \
     firmware_version = COALESCE($3, firmware_version) WHERE pk = $4";

pub(super) const ALL_OFFLINE: &str = "UPDATE devices SET online = FALSE WHERE online";

/// Devices per `last_seen` refresh transaction: each holds SQLite's write
/// lock (and PostgreSQL's row locks, which group commits also take) for
/// about a millisecond.
const LAST_SEEN_CHUNK: usize = 500;

/// Devices per statement of a bulk registration. On PostgreSQL each
/// statement is a round trip, so many (8 parameters each, far under its
/// 65,535). On SQLite statements cost no trip, while sqlx looks up each
/// numbered parameter by name, a cost that grows with the square of their
/// number: 500 rows spent 55% of the time there.
fn register_rows_per_statement(store: &Store) -> usize {
    match store {
        Store::Sqlite(_) => 32,
        Store::Postgres(_) => 500,
    }
}

/// `INSERT OR FAIL` on SQLite: a multi-row statement that fails keeps the
/// rows it inserted, so SQLite needs no statement journal to undo them,
/// which copied every page the statement touched (20% of a registration's
/// time). Nothing is kept in fact: a failed statement fails the
/// registration, and its transaction rolls back.
fn insert_into(store: &Store) -> &'static str {
    match store {
        Store::Sqlite(_) => "INSERT OR FAIL INTO",
        Store::Postgres(_) => "INSERT INTO",
    }
}

/// A bulk registration refused.
#[derive(Debug, thiserror::Error)]
pub enum BulkRegistrationError {
    #[error("device {0} already exists")]
    Taken(DeviceId),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// `($1, .., $w), ($w+1, ..), ...`: `n` rows of `w` placeholders. Where
/// `third` is set, it replaces each row's third placeholder, `{3}` standing
/// for its number (a cast the column needs).
fn rows_of(n: usize, w: usize, third: &str) -> String {
    (0..n)
        .map(|row| {
            let values: Vec<String> = (1..=w)
                .map(|col| {
                    let number = row * w + col;
                    if col == 3 && !third.is_empty() {
                        third.replace("{3}", &number.to_string())
                    } else {
                        format!("${number}")
                    }
                })
                .collect();
            format!("({})", values.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// `AlreadyExists` names what clashed: the id, the certificate (and
    /// the device holding it) or the token.
    pub async fn register_device(&self, d: &NewDevice) -> Result<DeviceRecord, StorageError> {
        match self.insert_device(d).await {
            Ok(device) => Ok(device),
            Err(e) => Err(self.naming_holder(e, d.certificate.as_ref()).await),
        }
    }

    async fn insert_device(&self, d: &NewDevice) -> Result<DeviceRecord, StorageError> {
        let sql = format!(
            "INSERT INTO devices (device_id, display_name, labels, token_sha256, created_unix_nano, \
             cert_sha256, cert_bound_unix_nano, require_mtls) \
             VALUES ($1, $2, CAST($3 AS {}), $4, $5, $6, $7, $8) RETURNING {DEVICE_COLUMNS}",
            self.json_type()
        );
        let mut tx = self.begin_write().await?;
        let row = tx
            .query(&sql)
            .bind(d.id.as_str())
            .bind(d.display_name.as_str())
            .bind(d.labels.to_json())
            .bind(d.token_hash.as_bytes().as_slice())
            .bind(d.created)
            .bind(d.certificate.map(|c| c.as_bytes().to_vec()))
            .bind(d.certificate.map(|_| d.created))
            .bind(d.require_mtls)
            .fetch_one()
            .await?;
        let device = device_from_row(&row)?;
        tx.query(INSERT_TOKEN)
            .bind(device.pk)
            .bind(d.token_hash.as_bytes().as_slice())
            .bind(d.created)
            .execute()
            .await?;
        tx.commit().await?;
        Ok(device)
    }

    /// Registers many devices in one transaction: all of them, or none.
    /// Rows go in a few hundred to a statement, so 100,000 devices are a
    /// few hundred statements and one commit (one fsync), not 100,000.
    /// `AlreadyExists` names the first id taken, or the certificate that
    /// clashed. Records come back in the order of `devices`.
    pub async fn register_devices(
        &self,
        devices: &[NewDevice],
    ) -> Result<Vec<DeviceRecord>, BulkRegistrationError> {
        match self.insert_devices(devices).await {
            Ok(records) => Ok(records),
            Err(BulkRegistrationError::Storage(e)) => {
                let mut e = e;
                for certificate in devices.iter().filter_map(|d| d.certificate.as_ref()) {
                    e = self.naming_holder(e, Some(certificate)).await;
                    if matches!(
                        e,
                        StorageError::AlreadyExists(Clash::Certificate { holder: Some(_) })
                    ) {
                        break;
                    }
                }
                Err(BulkRegistrationError::Storage(e))
            }
            Err(taken) => Err(taken),
        }
    }

    async fn insert_devices(
        &self,
        devices: &[NewDevice],
    ) -> Result<Vec<DeviceRecord>, BulkRegistrationError> {
        let rows_per_statement = register_rows_per_statement(self);
        let mut tx = self.begin_write().await.map_err(StorageError::from)?;
        // Taken ids are looked for first: a unique violation would not say
        // which of thousands of ids it was.
        for chunk in devices.chunks(rows_per_statement) {
            let sql = format!(
                "SELECT device_id FROM devices WHERE device_id IN ({})",
                placeholders(chunk.len())
            );
            let taken: Vec<String> = chunk
                .iter()
                .fold(tx.query(&sql), |q, d| q.bind(d.id.as_str()))
                .fetch_scalars()
                .await
                .map_err(StorageError::from)?;
            if let Some(first) = chunk
                .iter()
                .find(|d| taken.iter().any(|t| t == d.id.as_str()))
            {
                return Err(BulkRegistrationError::Taken(first.id.clone()));
            }
        }
        let mut records = Vec::with_capacity(devices.len());
        for chunk in devices.chunks(rows_per_statement) {
            let sql = format!(
                "{} devices (device_id, display_name, labels, token_sha256, created_unix_nano, \
                 cert_sha256, cert_bound_unix_nano, require_mtls) VALUES {} RETURNING {DEVICE_COLUMNS}",
                insert_into(self),
                rows_of(
                    chunk.len(),
                    8,
                    &format!("CAST(${{3}} AS {})", self.json_type())
                )
            );
            let rows = chunk
                .iter()
                .fold(tx.query(&sql), |q, d| {
                    q.bind(d.id.as_str())
                        .bind(d.display_name.as_str())
                        .bind(d.labels.to_json())
                        .bind(d.token_hash.as_bytes().to_vec())
                        .bind(d.created)
                        .bind(d.certificate.map(|c| c.as_bytes().to_vec()))
                        .bind(d.certificate.map(|_| d.created))
                        .bind(d.require_mtls)
                })
                .fetch_all()
                .await
                .map_err(StorageError::from)?;
            // RETURNING promises no order on PostgreSQL: rows are matched
            // back to the request by id.
            let mut by_id: HashMap<String, DeviceRecord> = rows
                .iter()
                .map(|row| device_from_row(row).map(|d| (d.id.as_str().to_owned(), d)))
                .collect::<Result<_, _>>()?;
            let chunk_records: Vec<DeviceRecord> = chunk
                .iter()
                .map(|d| {
                    by_id.remove(d.id.as_str()).ok_or_else(|| {
                        StorageError::Corrupt(format!(
                            "device {} was inserted but not returned",
                            d.id
                        ))
                    })
                })
                .collect::<Result<_, _>>()?;
            let sql = format!(
                "{} device_tokens (device_pk, token_sha256, created_unix_nano) VALUES {}",
                insert_into(self),
                rows_of(chunk.len(), 3, "")
            );
            chunk
                .iter()
                .zip(&chunk_records)
                .fold(tx.query(&sql), |q, (d, record)| {
                    q.bind(record.pk)
                        .bind(d.token_hash.as_bytes().to_vec())
                        .bind(d.created)
                })
                .execute()
                .await
                .map_err(StorageError::from)?;
            records.extend(chunk_records);
        }
        tx.commit().await.map_err(StorageError::from)?;
        Ok(records)
    }

    pub async fn get_device(&self, id: &DeviceId) -> Result<DeviceRecord, StorageError> {
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = $1");
        let row = self.query(&sql).bind(id.as_str()).fetch_one().await?;
        device_from_row(&row)
    }

    /// A device's sensors by name, with their newest readings. The newest
    /// reading is the hourly rollup's latest (kept in the same commit as
    /// the readings), one primary-key lookup a sensor, however many days of
    /// raw readings there are.
    pub async fn device_sensors(&self, device_pk: i64) -> Result<Vec<SensorRecord>, StorageError> {
        let latest = |column| {
            format!(
                "(SELECT {column} FROM readings_hourly_rollup r WHERE r.sensor_pk = s.pk \
                 ORDER BY r.hour_unix_nano DESC LIMIT 1)"
            )
        };
        let sql = format!(
            "SELECT s.sensor, s.unit, {}, {} FROM sensors s WHERE s.device_pk = $1 \
             ORDER BY s.sensor{}, s.unit",
            latest("last_time_unix_nano"),
            latest("last_value"),
            self.bytewise()
        );
        let rows = self.query(&sql).bind(device_pk).fetch_all().await?;
        rows.iter()
            .map(|row| {
                let time: Option<UnixNanos> = row.get(2)?;
                let value: Option<f64> = row.get(3)?;
                Ok(SensorRecord {
                    sensor: row.get(0)?,
                    unit: row.get(1)?,
                    last: time.zip(value),
                })
            })
            .collect()
    }

    /// Devices ordered by id, starting after `after`.
    pub async fn list_devices(
        &self,
        after: Option<&DeviceId>,
        limit: u32,
    ) -> Result<Vec<DeviceRecord>, StorageError> {
        let order = format!("device_id{}", self.bytewise());
        let sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE {order} > $1 ORDER BY {order} LIMIT $2"
        );
        self.query(&sql)
            .bind(after.map_or("", DeviceId::as_str))
            .bind(i64::from(limit))
            .fetch_all_as(device_from_row)
            .await
    }

    /// Every device, for the alert engine's view of the fleet.
    pub async fn all_devices(&self) -> Result<Vec<DeviceRecord>, StorageError> {
        let mut all = Vec::new();
        loop {
            let page = self
                .list_devices(all.last().map(|d: &DeviceRecord| &d.id), 1000)
                .await?;
            let done = page.len() < 1000;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    pub async fn committed_sequence(&self, device_pk: i64) -> Result<u64, StorageError> {
        let seq: i64 = self
            .query("SELECT committed_sequence FROM devices WHERE pk = $1")
            .bind(device_pk)
            .fetch_scalar()
            .await?;
        to_u64(seq, "committed_sequence")
    }

    /// Sets a device's committed sequence to `to` (at most `i64::MAX`; the
    /// API refuses more) and returns the previous one with the device as it
    /// is now. `NotFound` for an unknown id. The device's row is locked
    /// first (`Store::row_lock`), as a group commit locks it before
    /// reading the marks, so the reset lands between two groups, never
    /// inside one.
    pub async fn reset_committed_sequence(
        &self,
        id: &DeviceId,
        to: u64,
    ) -> Result<(u64, DeviceRecord), StorageError> {
        let lock = format!(
            "SELECT committed_sequence FROM devices WHERE device_id = $1{}",
            self.row_lock()
        );
        let update = format!(
            "UPDATE devices SET committed_sequence = $1 WHERE device_id = $2 RETURNING {DEVICE_COLUMNS}"
        );
        let mut tx = self.begin_write().await?;
        let previous: Option<i64> = tx
            .query(&lock)
            .bind(id.as_str())
            .fetch_optional_scalar()
            .await?;
        let previous = to_u64(
            previous.ok_or(StorageError::NotFound)?,
            "committed_sequence",
        )?;
        let row = tx
            .query(&update)
            // The API refused more; the bound only keeps the cast from
            // wrapping.
            .bind(bigint(to))
            .bind(id.as_str())
            .fetch_one()
            .await?;
        let device = device_from_row(&row)?;
        tx.commit().await?;
        Ok((previous, device))
    }

    pub async fn set_presence(
        &self,
        device_pk: i64,
        online: bool,
        seen: UnixNanos,
        firmware: Option<&str>,
    ) -> Result<(), StorageError> {
        self.write_conn()
            .await?
            .query(PRESENCE)
            .bind(online)
            .bind(seen)
            .bind(firmware)
            .bind(device_pk)
            .execute()
            .await?;
        Ok(())
    }

    /// Refreshes the `last_seen` of many connected devices in one
    /// transaction: (device pk, last seen).
    /// Never moves `last_seen` back: a disconnect may have written a later one.
    pub async fn record_last_seen(&self, seen: &[(i64, UnixNanos)]) -> Result<(), StorageError> {
        for chunk in seen.chunks(LAST_SEEN_CHUNK) {
            match self {
                Self::Sqlite(s) => s.record_last_seen(chunk).await?,
                Self::Postgres(s) => s.record_last_seen(chunk).await?,
            }
        }
        Ok(())
    }

    /// At start-up no device holds a stream to this server yet.
    pub async fn mark_all_offline(&self) -> Result<(), StorageError> {
        self.write_conn()
            .await?
            .query(ALL_OFFLINE)
            .execute()
            .await?;
        Ok(())
    }
}

/// The pk of a device's sensor, created if new, unless the device has
/// `max_sensors` already (then `None`). For the group transaction, which
/// holds the device's row lock (its committed sequence was read for
/// update), so the count cannot race.
pub(super) async fn sensor_pk(
    mut conn: Conn<'_>,
    device_pk: i64,
    sensor: &SensorName,
    unit: &Unit,
    max_sensors: usize,
) -> Result<Option<i64>, sqlx::Error> {
    let existing: Option<i64> = conn
        .query("SELECT pk FROM sensors WHERE device_pk = $1 AND sensor = $2 AND unit = $3")
        .bind(device_pk)
        .bind(sensor.as_str())
        .bind(unit.as_str())
        .fetch_optional_scalar()
        .await?;
    if existing.is_some() {
        return Ok(existing);
    }
    let count: i64 = conn
        .query("SELECT COUNT(*) FROM sensors WHERE device_pk = $1")
        .bind(device_pk)
        .fetch_scalar()
        .await?;
    if count as u64 >= max_sensors as u64 {
        return Ok(None);
    }
    conn.query("INSERT INTO sensors (device_pk, sensor, unit) VALUES ($1, $2, $3) RETURNING pk")
        .bind(device_pk)
        .bind(sensor.as_str())
        .bind(unit.as_str())
        .fetch_scalar()
        .await
        .map(Some)
}

pub(super) fn to_u64(v: i64, what: &str) -> Result<u64, StorageError> {
    u64::try_from(v).map_err(|_| StorageError::Corrupt(format!("{what} is negative: {v}")))
}

fn device_from_row(row: &Row) -> Result<DeviceRecord, StorageError> {
    let id: String = row.get(1)?;
    let labels: String = row.get(3)?;
    Ok(DeviceRecord {
        pk: row.get(0)?,
        id: DeviceId::parse(&id).map_err(|e| StorageError::Corrupt(e.to_string()))?,
        display_name: DisplayName::from_trusted(row.get(2)?),
        labels: Labels::from_json(&labels)
            .map_err(|e| StorageError::Corrupt(format!("labels of device {id}: {e}")))?,
        created: row.get(4)?,
        committed_sequence: to_u64(row.get(5)?, "committed_sequence")?,
        last_upload: row.get(6)?,
        online: row.get(7)?,
        last_seen: row.get(8)?,
        firmware_version: row.get(9)?,
        disabled: row.get(10)?,
    })
}
