//! MQTT sessions kept across connections and restarts (see migration
//! 0014): written once for both backends (see `sql.rs`).

use super::{StorageError, Store};
use crate::domain::time::UnixNanos;

/// What a kept session holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptSession {
    pub commands_subscribed: bool,
}

impl Store {
    /// The device's kept session, unless it expired by `now`.
    pub async fn mqtt_session(
        &self,
        device_pk: i64,
        now: UnixNanos,
    ) -> Result<Option<KeptSession>, StorageError> {
        let row = self
            .query(
                "SELECT commands_subscribed FROM mqtt_sessions WHERE device_pk = $1 \
                 AND (expires_unix_nano IS NULL OR expires_unix_nano > $2)",
            )
            .bind(device_pk)
            .bind(now)
            .fetch_optional()
            .await?;
        Ok(match row {
            Some(row) => Some(KeptSession {
                commands_subscribed: row.get(0)?,
            }),
            None => None,
        })
    }

    /// Records the device's session as its connection from `connected`
    /// leaves it: kept until `expires` (`None`: for good; a time already
    /// past: not kept). A connection older than the one that last wrote
    /// the row changes nothing.
    pub async fn record_mqtt_session(
        &self,
        device_pk: i64,
        session: KeptSession,
        expires: Option<UnixNanos>,
        connected: UnixNanos,
    ) -> Result<(), StorageError> {
        self.write_conn()
            .await?
            .query(
                "INSERT INTO mqtt_sessions \
                 (device_pk, commands_subscribed, expires_unix_nano, connected_unix_nano) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (device_pk) DO UPDATE SET \
                 commands_subscribed = excluded.commands_subscribed, \
                 expires_unix_nano = excluded.expires_unix_nano, \
                 connected_unix_nano = excluded.connected_unix_nano \
                 WHERE mqtt_sessions.connected_unix_nano <= excluded.connected_unix_nano",
            )
            .bind(device_pk)
            .bind(session.commands_subscribed)
            .bind(expires)
            .bind(connected)
            .execute()
            .await?;
        Ok(())
    }
}
