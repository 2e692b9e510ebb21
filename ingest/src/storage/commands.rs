//! Storage of the command queue: the types and the queries, written once
//! for both backends (see `sql.rs`).

use crate::domain::command::{CommandKind, CommandState};
use crate::domain::time::UnixNanos;

use super::cluster;
use super::sql::{Row, bigint};
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

const COMMAND_COLUMNS: &str = "c.command_id, c.device_pk, d.device_id, c.kind, c.arguments, c.state, c.result, \
     c.created_unix_nano, c.sent_unix_nano, c.finished_unix_nano, c.expires_unix_nano \
     FROM commands c JOIN devices d ON d.pk = c.device_pk";
const COUNT_PENDING: &str =
    "SELECT COUNT(*) FROM commands WHERE device_pk = $1 AND state IN ('queued', 'sent')";
const INSERT_COMMAND: &str = "INSERT INTO commands (device_pk, kind, arguments, state, created_unix_nano, expires_unix_nano) \
     VALUES ($1, $2, $3, 'queued', $4, $5) RETURNING command_id";
// Also for a command the device already answered (its acknowledgement can
// be recorded first): the delivery time is kept, the final state stays.
/// A device's command queue, locked until the transaction ends: the
/// two-key form of PostgreSQL's advisory locks, a space apart from the
/// leader's one-key lock. The first key is "cmds" in ASCII; a device pk past
/// 2^31 shares its lock with another device, which only makes them wait in
/// turn.
const COMMAND_QUEUE_LOCK: &str =
    "SELECT pg_advisory_xact_lock(1668113523, CAST($1 % 2147483647 AS INTEGER))";

const MARK_SENT: &str = "UPDATE commands SET sent_unix_nano = COALESCE(sent_unix_nano, $1), \
     state = CASE WHEN state = 'queued' THEN 'sent' ELSE state END \
     WHERE command_id = $2 AND state <> 'expired'";
// ACCEPTED then DONE (or FAILED) both land: only final-by-server states
// (expired) and failures are left alone. The sent mark is written beside
// the session, so an acknowledgement can land first: it then stands in for
// the delivery time (no later than the truth), so no answered command
// reads as never delivered; the mark's COALESCE keeps it.
const ACK: &str = "UPDATE commands SET state = $1, result = $2, finished_unix_nano = $3, \
     sent_unix_nano = COALESCE(sent_unix_nano, $4) \
     WHERE command_id = $5 AND device_pk = $6 AND state IN ('queued', 'sent', 'acked')";
const EXPIRE: &str = "UPDATE commands SET state = 'expired', finished_unix_nano = $1 \
     WHERE state = 'queued' AND expires_unix_nano <= $2 RETURNING command_id";

/// The `SELECT` of commands after `$1`, filtered by device (`$2`) and
/// state (`$2` or `$3`) when asked, then the limit.
fn list_sql(by_device: bool, by_state: bool) -> String {
    let mut sql = format!("SELECT {COMMAND_COLUMNS} WHERE c.command_id > $1");
    let mut n = 1;
    if by_device {
        n += 1;
        sql.push_str(&format!(" AND d.device_id = ${n}"));
    }
    if by_state {
        n += 1;
        sql.push_str(&format!(" AND c.state = ${n}"));
    }
    sql.push_str(&format!(" ORDER BY c.command_id LIMIT ${}", n + 1));
    sql
}

fn command_from_row(row: &Row) -> Result<CommandRecord, StorageError> {
    let kind: String = row.get(3)?;
    let arguments: String = row.get(4)?;
    let state: String = row.get(5)?;
    Ok(CommandRecord {
        command_id: row.get::<i64>(0)?.max(0) as u64,
        device_pk: row.get(1)?,
        device_id: row.get(2)?,
        kind: CommandKind::from_stored(&kind, &arguments)
            .map_err(|e| StorageError::Corrupt(format!("command arguments: {e}")))?,
        state: CommandState::parse(&state)
            .ok_or_else(|| StorageError::Corrupt(format!("command state {state:?}")))?,
        result: row.get(6)?,
        created: row.get(7)?,
        sent: row.get(8)?,
        finished: row.get(9)?,
        expires: row.get(10)?,
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
        let mut tx = self.begin_write().await.map_err(StorageError::from)?;
        // Two senders (on any processes) counting at once would both see
        // room for one more: a lock of the device's command queue makes
        // them count in turn (SQLite's write transaction already does). Not
        // the device's row, which a group commit holds for its whole
        // transaction: a command would wait behind the readings.
        if let Self::Postgres(_) = self {
            tx.query(COMMAND_QUEUE_LOCK)
                .bind(device_pk)
                .execute()
                .await
                .map_err(StorageError::from)?;
        }
        let pending: i64 = tx
            .query(COUNT_PENDING)
            .bind(device_pk)
            .fetch_scalar()
            .await
            .map_err(StorageError::from)?;
        if pending as u64 >= max_pending {
            return Err(EnqueueError::QueueFull(pending as u64));
        }
        let id: i64 = tx
            .query(INSERT_COMMAND)
            .bind(device_pk)
            .bind(kind.name())
            .bind(kind.arguments().to_string())
            .bind(created)
            .bind(expires)
            .fetch_scalar()
            .await
            .map_err(StorageError::from)?;
        // Wakes the device's stream wherever it is, once committed.
        tx.conn()
            .notify(cluster::channel::CONTROL, &device_pk.to_string())
            .await
            .map_err(StorageError::from)?;
        tx.commit().await.map_err(StorageError::from)?;
        Ok(self.get_command(id as u64).await?)
    }

    /// Commands to (re)deliver to a device now: sent and not acknowledged,
    /// or queued and not expired, oldest first.
    pub async fn deliverable_commands(
        &self,
        device_pk: i64,
        now: UnixNanos,
    ) -> Result<Vec<CommandRecord>, StorageError> {
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} WHERE c.device_pk = $1 \
             AND (c.state = 'sent' OR (c.state = 'queued' AND c.expires_unix_nano > $2)) ORDER BY c.command_id"
        );
        self.query(&sql)
            .bind(device_pk)
            .bind(now)
            .fetch_all_as(command_from_row)
            .await
    }

    /// Records when a command went down its stream. False if it had
    /// expired meanwhile (an acknowledged command keeps its state).
    pub async fn mark_command_sent(
        &self,
        command_id: u64,
        now: UnixNanos,
    ) -> Result<bool, StorageError> {
        let changed = self
            .write_conn()
            .await?
            .query(MARK_SENT)
            .bind(now)
            .bind(command_id as i64)
            .execute()
            .await?;
        Ok(changed > 0)
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
        let mut tx = self.begin_write().await?;
        let changed = tx
            .query(ACK)
            .bind(state.as_str())
            .bind(result)
            .bind(now)
            .bind(now)
            .bind(bigint(command_id))
            .bind(device_pk)
            .execute()
            .await?;
        if changed == 0 {
            return Ok(None);
        }
        // For a SendCommand waiting on another process.
        let payload = format!("{command_id}:{}", state.as_str());
        tx.conn()
            .notify(cluster::channel::COMMANDS, &payload)
            .await?;
        tx.commit().await?;
        Ok(Some(self.get_command(command_id).await?))
    }

    /// Expires queued commands past their time to live; returns their ids.
    pub async fn expire_commands(&self, now: UnixNanos) -> Result<Vec<u64>, StorageError> {
        let mut tx = self.begin_write().await?;
        let ids: Vec<i64> = tx.query(EXPIRE).bind(now).bind(now).fetch_scalars().await?;
        for id in &ids {
            let payload = format!("{id}:{}", CommandState::Expired.as_str());
            tx.conn()
                .notify(cluster::channel::COMMANDS, &payload)
                .await?;
        }
        tx.commit().await?;
        Ok(ids.into_iter().map(|id| id.max(0) as u64).collect())
    }

    pub async fn get_command(&self, command_id: u64) -> Result<CommandRecord, StorageError> {
        let sql = format!("SELECT {COMMAND_COLUMNS} WHERE c.command_id = $1");
        let row = self
            .query(&sql)
            .bind(bigint(command_id))
            .fetch_one()
            .await?;
        command_from_row(&row)
    }

    pub async fn list_commands(
        &self,
        device_id: Option<&str>,
        state: Option<CommandState>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<CommandRecord>, StorageError> {
        let sql = list_sql(device_id.is_some(), state.is_some());
        let mut query = self.query(&sql).bind(bigint(after));
        if let Some(d) = device_id {
            query = query.bind(d);
        }
        if let Some(s) = state {
            query = query.bind(s.as_str());
        }
        query
            .bind(i64::from(limit))
            .fetch_all_as(command_from_row)
            .await
    }

    /// Commands queued or sent and not yet answered, all devices.
    pub async fn pending_commands(&self) -> Result<i64, StorageError> {
        Ok(self
            .query("SELECT COUNT(*) FROM commands WHERE state IN ('queued', 'sent')")
            .fetch_scalar()
            .await?)
    }
}
