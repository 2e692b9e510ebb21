//! Storage of the command queue and of device presence: the types and the
//! SQL, shared by both backends (`?` placeholders; numbered for
//! PostgreSQL).

use crate::domain::command::{CommandKind, CommandState};
use crate::domain::time::UnixNanos;

use super::{StorageError, Store};

/// A command as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub command_id: u64,
    pub device_pk: i64,
    pub device_id: String,
    pub kind: CommandKind,
    pub state: CommandState,
    pub result: String,
    pub created: UnixNanos,
    pub sent: Option<UnixNanos>,
    pub finished: Option<UnixNanos>,
    pub expires: UnixNanos,
}

/// Why a command was not queued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("the device already has {0} commands waiting")]
    QueueFull(u64),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub(super) const COMMAND_COLUMNS: &str = "c.command_id, c.device_pk, d.device_id, c.kind, c.arguments, c.state, c.result, \
     c.created_unix_nano, c.sent_unix_nano, c.finished_unix_nano, c.expires_unix_nano \
     FROM commands c JOIN devices d ON d.pk = c.device_pk";
pub(super) const COUNT_PENDING: &str =
    "SELECT COUNT(*) FROM commands WHERE device_pk = ? AND state IN ('queued', 'sent')";
pub(super) const INSERT_COMMAND: &str = "INSERT INTO commands (device_pk, kind, arguments, state, created_unix_nano, expires_unix_nano) \
     VALUES (?, ?, ?, 'queued', ?, ?) RETURNING command_id";
// Also for a command the device already answered (its acknowledgement can
// be recorded first): the delivery time is kept, the final state stays.
pub(super) const MARK_SENT: &str = "UPDATE commands SET sent_unix_nano = COALESCE(sent_unix_nano, ?), \
     state = CASE WHEN state = 'queued' THEN 'sent' ELSE state END \
     WHERE command_id = ? AND state <> 'expired'";
// ACCEPTED then DONE (or FAILED) both land: only final-by-server states
// (expired) and failures are left alone. The sent mark is written beside
// the session, so an acknowledgement can land first: it then stands in for
// the delivery time (no later than the truth), so no answered command
// reads as never delivered; the mark's COALESCE keeps it.
pub(super) const ACK: &str = "UPDATE commands SET state = ?, result = ?, finished_unix_nano = ?, \
     sent_unix_nano = COALESCE(sent_unix_nano, ?) \
     WHERE command_id = ? AND device_pk = ? AND state IN ('queued', 'sent', 'acked')";
pub(super) const EXPIRE: &str = "UPDATE commands SET state = 'expired', finished_unix_nano = ? \
     WHERE state = 'queued' AND expires_unix_nano <= ? RETURNING command_id";
pub(super) const PRESENCE: &str = "UPDATE devices SET online = ?, last_seen_unix_nano = ?, \
     firmware_version = COALESCE(?, firmware_version) WHERE pk = ?";
/// Devices per `last_seen` refresh transaction: each holds SQLite's write
/// lock (and PostgreSQL's row locks, which group commits also take) for
/// about a millisecond.
pub(super) const LAST_SEEN_CHUNK: usize = 500;
pub(super) const ALL_OFFLINE: &str = "UPDATE devices SET online = FALSE WHERE online";

pub(super) fn deliverable_sql() -> String {
    format!(
        "SELECT {COMMAND_COLUMNS} WHERE c.device_pk = ? \
         AND (c.state = 'sent' OR (c.state = 'queued' AND c.expires_unix_nano > ?)) ORDER BY c.command_id"
    )
}

pub(super) fn list_sql(by_device: bool, by_state: bool) -> String {
    let mut sql = format!("SELECT {COMMAND_COLUMNS} WHERE c.command_id > ?");
    if by_device {
        sql.push_str(" AND d.device_id = ?");
    }
    if by_state {
        sql.push_str(" AND c.state = ?");
    }
    sql.push_str(" ORDER BY c.command_id LIMIT ?");
    sql
}

pub(super) fn command_from_row<'r, R>(row: &'r R) -> Result<CommandRecord, StorageError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let kind: String = row.try_get(3)?;
    let arguments: String = row.try_get(4)?;
    let state: String = row.try_get(5)?;
    Ok(CommandRecord {
        command_id: row.try_get::<i64, _>(0)?.max(0) as u64,
        device_pk: row.try_get(1)?,
        device_id: row.try_get(2)?,
        kind: CommandKind::from_stored(&kind, &arguments)
            .map_err(|e| StorageError::Corrupt(format!("command arguments: {e}")))?,
        state: CommandState::parse(&state)
            .ok_or_else(|| StorageError::Corrupt(format!("command state {state:?}")))?,
        result: row.try_get(6)?,
        created: row.try_get(7)?,
        sent: row.try_get(8)?,
        finished: row.try_get(9)?,
        expires: row.try_get(10)?,
    })
}

impl Store {
    /// Queues a command unless the device already has `max_pending`
    /// commands queued or sent.
    pub async fn enqueue_command(
        &self,
        device_pk: i64,
        kind: &CommandKind,
        created: UnixNanos,
        expires: UnixNanos,
        max_pending: u64,
    ) -> Result<CommandRecord, EnqueueError> {
        dispatch!(self, s => s.enqueue_command(device_pk, kind, created, expires, max_pending).await)
    }

    /// Commands to (re)deliver to a device now: sent and not acknowledged,
    /// or queued and not expired, oldest first.
    pub async fn deliverable_commands(
        &self,
        device_pk: i64,
        now: UnixNanos,
    ) -> Result<Vec<CommandRecord>, StorageError> {
        dispatch!(self, s => s.deliverable_commands(device_pk, now).await)
    }

    /// Records when a command went down its stream. False if it had
    /// expired meanwhile (an acknowledged command keeps its state).
    pub async fn mark_command_sent(
        &self,
        command_id: u64,
        now: UnixNanos,
    ) -> Result<bool, StorageError> {
        dispatch!(self, s => s.mark_command_sent(command_id, now).await)
    }

    /// Records a device's acknowledgement; `None` if the command is not the
    /// device's, or is already expired or failed.
    pub async fn ack_command(
        &self,
        device_pk: i64,
        command_id: u64,
        state: CommandState,
        result: &str,
        now: UnixNanos,
    ) -> Result<Option<CommandRecord>, StorageError> {
        dispatch!(self, s => s.ack_command(device_pk, command_id, state, result, now).await)
    }

    /// Expires queued commands past their time to live; returns their ids.
    pub async fn expire_commands(&self, now: UnixNanos) -> Result<Vec<u64>, StorageError> {
        dispatch!(self, s => s.expire_commands(now).await)
    }

    pub async fn get_command(&self, command_id: u64) -> Result<CommandRecord, StorageError> {
        dispatch!(self, s => s.get_command(command_id).await)
    }

    pub async fn list_commands(
        &self,
        device_id: Option<&str>,
        state: Option<CommandState>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<CommandRecord>, StorageError> {
        dispatch!(self, s => s.list_commands(device_id, state, after, limit).await)
    }

    pub async fn set_presence(
        &self,
        device_pk: i64,
        online: bool,
        seen: UnixNanos,
        firmware: Option<&str>,
    ) -> Result<(), StorageError> {
        dispatch!(self, s => s.set_presence(device_pk, online, seen, firmware).await)
    }

    /// Refreshes the `last_seen` of many connected devices in one
    /// transaction: (device pk, last seen).
    /// Never moves `last_seen` back: a disconnect may have written a later one.
    pub async fn record_last_seen(&self, seen: &[(i64, UnixNanos)]) -> Result<(), StorageError> {
        for chunk in seen.chunks(LAST_SEEN_CHUNK) {
            dispatch!(self, s => s.record_last_seen(chunk).await)?;
        }
        Ok(())
    }

    /// At start-up no device holds a stream to this server yet.
    pub async fn mark_all_offline(&self) -> Result<(), StorageError> {
        dispatch!(self, s => s.mark_all_offline().await)
    }
}
