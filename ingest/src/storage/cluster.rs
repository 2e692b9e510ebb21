//! What several server processes share through the database: which of them
//! are alive (`replicas`), which holds each device's Control stream
//! (`device_sessions`), and the notifications that tell the others.
//!
//! Sessions are written once for both backends (see `sql.rs`), but
//! for opening them, which PostgreSQL does for a batch in three statements;
//! replicas, leases and notifications exist on PostgreSQL only, where
//! several processes can share a database.

use std::time::Duration;

use super::devices::PRESENCE;
use super::sql::{bigint, placeholders};
use super::{StorageError, Store};
use crate::domain::SensorName;
use crate::domain::time::UnixNanos;

/// The notification channels. Only alert, command and session transactions
/// notify: a NOTIFY takes a lock every notifying commit in the instance
/// waits for, so the readings path never does.
pub mod channel {
    /// Payload: the last event id the transaction recorded.
    pub const ALERTS: &str = "ingest_alerts";
    /// Payload: the device pk a command was queued for.
    pub const CONTROL: &str = "ingest_control";
    /// Payload: `pk:generation` pairs, comma-separated, of opened streams.
    pub const SESSIONS: &str = "ingest_sessions";
    /// Payload: `command_id:state` of a command that changed state.
    pub const COMMANDS: &str = "ingest_commands";
    /// Payload: a credential event as JSON (see `auth::revocation`).
    pub const CREDENTIALS: &str = "ingest_credentials";
    /// Payload: empty; the rules changed.
    pub const RULES: &str = "ingest_rules";

    pub const ALL: [&str; 6] = [ALERTS, CONTROL, SESSIONS, COMMANDS, CREDENTIALS, RULES];
}

/// A NOTIFY payload must stay under 8000 bytes; session batches are cut
/// below it.
pub(super) const MAX_PAYLOAD: usize = 7900;

/// A Control stream being opened.
#[derive(Debug, Clone)]
pub struct SessionOpen {
    pub device_pk: i64,
    pub at: UnixNanos,
    pub firmware: Option<String>,
}

/// A replica's stream of a device, as the database issued it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTicket {
    pub device_pk: i64,
    pub generation: u64,
}

/// The comma-separated `pk:generation` payload of opened sessions.
pub fn sessions_payload(tickets: &[SessionTicket]) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut current = String::new();
    for t in tickets {
        let item = format!("{}:{}", t.device_pk, t.generation);
        if !current.is_empty() && current.len() + 1 + item.len() > MAX_PAYLOAD {
            payloads.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(',');
        }
        current.push_str(&item);
    }
    if !current.is_empty() {
        payloads.push(current);
    }
    payloads
}

/// Reads a payload of [`sessions_payload`]; malformed items are skipped.
pub fn parse_sessions_payload(payload: &str) -> Vec<SessionTicket> {
    payload
        .split(',')
        .filter_map(|item| {
            let (pk, generation) = item.split_once(':')?;
            Some(SessionTicket {
                device_pk: pk.parse().ok()?,
                generation: generation.parse().ok()?,
            })
        })
        .collect()
}

/// The database's clock in unix nanoseconds, on PostgreSQL: leases are
/// compared on one clock whatever the processes' clocks say.
pub(super) const DB_NOW: &str =
    "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000 AS BIGINT)";

/// Opens a stream: the generation goes up by one, whoever held it before.
pub(super) const OPEN_SESSION: &str = "INSERT INTO device_sessions (device_pk, replica_id, generation, connected_unix_nano) \
     VALUES ($1, $2, 1, $3) ON CONFLICT (device_pk) DO UPDATE SET replica_id = excluded.replica_id, \
     generation = device_sessions.generation + 1, connected_unix_nano = excluded.connected_unix_nano \
     RETURNING generation";

/// Ends a stream only if it is still the device's newest: a superseded
/// stream's late disconnect matches nothing.
const CLOSE_SESSION: &str = "UPDATE device_sessions SET replica_id = NULL \
     WHERE device_pk = $1 AND generation = $2 AND replica_id = $3";

/// Devices locked per statement when streams close: far below both
/// backends' limits on parameters.
const CLOSES_PER_LOCK: usize = 1000;

/// When a device last uploaded (the server's clock at commit).
const LAST_UPLOAD: &str = "SELECT last_upload_unix_nano FROM devices WHERE pk = $1";

/// The newest reading of one of a device's sensors (the device's clock),
/// if newer than a bound: a short walk of the index by sensor and time
/// (on SQLite, the table itself).
const LAST_SENSOR_READING: &str = "SELECT MAX(r.time_unix_nano) FROM sensors s \
     JOIN readings r ON r.sensor_pk = s.pk WHERE s.device_pk = $1 AND s.sensor = $2 AND r.time_unix_nano > $3";

impl Store {
    /// Opens Control streams: each gets the next generation of its device
    /// (issued by the database) and marks it online; on PostgreSQL the other
    /// processes hear of it at commit. One transaction for the batch.
    pub async fn open_sessions(
        &self,
        opens: &[SessionOpen],
        replica_id: &str,
    ) -> Result<Vec<SessionTicket>, StorageError> {
        match self {
            Self::Sqlite(s) => s.open_sessions(opens, replica_id).await,
            Self::Postgres(s) => s.open_sessions(opens, replica_id).await,
        }
    }

    /// Ends streams, many in one transaction (a fleet that loses its
    /// network closes thousands at once); a device goes offline only if the
    /// stream was its newest. Returns, for each, whether it was.
    pub async fn close_sessions(
        &self,
        closes: &[(SessionTicket, UnixNanos)],
        replica_id: &str,
    ) -> Result<Vec<bool>, StorageError> {
        let mut tx = self.begin_write().await?;
        // The devices' rows first and in pk order, as opens and group
        // commits take them: taking the session's row first deadlocked with
        // an open of the same device.
        let mut pks: Vec<i64> = closes.iter().map(|(t, _)| t.device_pk).collect();
        pks.sort_unstable();
        pks.dedup();
        for chunk in pks.chunks(CLOSES_PER_LOCK) {
            let lock = format!(
                "SELECT pk FROM devices WHERE pk IN ({}) ORDER BY pk{}",
                placeholders(chunk.len()),
                self.row_lock()
            );
            chunk
                .iter()
                .fold(tx.query(&lock), |q, pk| q.bind(*pk))
                .fetch_all()
                .await?;
        }
        let mut closed = Vec::with_capacity(closes.len());
        for (ticket, at) in closes {
            let newest = tx
                .query(CLOSE_SESSION)
                .bind(ticket.device_pk)
                .bind(bigint(ticket.generation))
                .bind(replica_id)
                .execute()
                .await?
                > 0;
            if newest {
                tx.query(PRESENCE)
                    .bind(false)
                    .bind(*at)
                    .bind(None::<&str>)
                    .bind(ticket.device_pk)
                    .execute()
                    .await?;
            }
            closed.push(newest);
        }
        tx.commit().await?;
        Ok(closed)
    }

    /// When the device was last heard from, as the judge of an inactivity
    /// rule needs it when the device's batches may have been committed by
    /// another process: its last upload, or with a sensor, its newest
    /// reading of that sensor after `after`.
    pub async fn last_activity(
        &self,
        device_pk: i64,
        sensor: Option<&SensorName>,
        after: UnixNanos,
    ) -> Result<Option<UnixNanos>, StorageError> {
        let last: Option<i64> = match sensor {
            None => self
                .query(LAST_UPLOAD)
                .bind(device_pk)
                .fetch_optional_scalar::<Option<i64>>()
                .await?
                .flatten(),
            Some(sensor) => {
                self.query(LAST_SENSOR_READING)
                    .bind(device_pk)
                    .bind(sensor.as_str())
                    .bind(after)
                    .fetch_scalar()
                    .await?
            }
        };
        Ok(last)
    }

    /// Whether other processes may share the database (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// Tells the other processes of a change already committed; nothing on
    /// SQLite, which one process serves.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), StorageError> {
        match self {
            Self::Sqlite(_) => Ok(()),
            Self::Postgres(s) => s.notify(channel, payload).await,
        }
    }

    /// Options for a connection beside the pool, named `name`; `None` on
    /// SQLite.
    pub fn side_connection(&self, name: &str) -> Option<sqlx::postgres::PgConnectOptions> {
        match self {
            Self::Sqlite(_) => None,
            Self::Postgres(s) => Some(s.connect_options(name)),
        }
    }

    /// Announces this process, or renews its lease (PostgreSQL). False
    /// when renewing found the replica already swept as dead.
    pub async fn register_replica(
        &self,
        replica_id: &str,
        addr: &str,
        lease: Duration,
    ) -> Result<(), StorageError> {
        match self {
            Self::Sqlite(s) => s.reset_sessions().await,
            Self::Postgres(s) => s.register_replica(replica_id, addr, lease).await,
        }
    }

    pub async fn renew_replica(
        &self,
        replica_id: &str,
        lease: Duration,
    ) -> Result<bool, StorageError> {
        match self {
            Self::Sqlite(_) => Ok(true),
            Self::Postgres(s) => s.renew_replica(replica_id, lease).await,
        }
    }

    pub async fn sweep_dead_replicas(&self) -> Result<Vec<i64>, StorageError> {
        match self {
            Self::Sqlite(_) => Ok(Vec::new()),
            Self::Postgres(s) => s.sweep_dead_replicas().await,
        }
    }

    /// Which of `devices` have commands queued (PostgreSQL; SQLite's one
    /// process hears every command it queues).
    pub async fn devices_with_queued(&self, devices: &[i64]) -> Result<Vec<i64>, StorageError> {
        match self {
            Self::Sqlite(_) => Ok(Vec::new()),
            Self::Postgres(s) => s.devices_with_queued(devices).await,
        }
    }

    /// At a clean stop: this process's streams are over (some closed
    /// without a goodbye when the grace period ran out), so its devices go
    /// offline and, on PostgreSQL, its row goes. Other processes' devices
    /// are left alone.
    pub async fn release_replica(&self, replica_id: &str) -> Result<(), StorageError> {
        match self {
            Self::Sqlite(s) => s.reset_sessions().await,
            Self::Postgres(s) => {
                s.sweep_replica(replica_id).await?;
                s.deregister_replica(replica_id).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn session_payloads_round_trip_and_stay_short(
            tickets in proptest::collection::vec((any::<i64>(), any::<u64>()), 0..2000)
        ) {
            let tickets: Vec<SessionTicket> = tickets
                .into_iter()
                .map(|(device_pk, generation)| SessionTicket { device_pk, generation })
                .collect();
            let payloads = sessions_payload(&tickets);
            prop_assert!(payloads.iter().all(|p| !p.is_empty() && p.len() <= MAX_PAYLOAD));
            let back: Vec<SessionTicket> =
                payloads.iter().flat_map(|p| parse_sessions_payload(p)).collect();
            prop_assert_eq!(back, tickets);
        }
    }
}
