//! Storage of alert rules, alerts and alert events: the types and the SQL,
//! shared by both backends (written with `?` placeholders; PostgreSQL gets
//! them numbered by [`numbered`]).

use crate::domain::DeviceId;
use crate::domain::alert::{Rule, RuleId, Severity};
use crate::domain::time::UnixNanos;

use super::{StorageError, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Fired,
    Acked,
    Resolved,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fired => "fired",
            Self::Acked => "acked",
            Self::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StorageError> {
        match s {
            "fired" => Ok(Self::Fired),
            "acked" => Ok(Self::Acked),
            "resolved" => Ok(Self::Resolved),
            other => Err(StorageError::Corrupt(format!("alert event kind {other:?}"))),
        }
    }
}

/// An event to record; `alert_id` is `None` for FIRED, which creates the
/// alert.
#[derive(Debug, Clone)]
pub struct NewAlertEvent {
    pub kind: EventKind,
    pub alert_id: Option<u64>,
    pub rule_id: RuleId,
    pub device_pk: i64,
    pub device_id: DeviceId,
    pub sensor: String,
    pub severity: Severity,
    pub value: Option<f64>,
    pub time: UnixNanos,
    pub message: String,
}

/// A recorded event, as watchers receive it.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEventRecord {
    pub event_id: u64,
    pub kind: EventKind,
    pub alert_id: u64,
    pub rule_id: String,
    pub device_id: String,
    pub sensor: String,
    pub severity: Severity,
    pub value: Option<f64>,
    pub time: UnixNanos,
    pub message: String,
}

/// An alert, open or resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRecord {
    pub alert_id: u64,
    pub rule_id: String,
    pub device_pk: i64,
    pub device_id: String,
    pub sensor: String,
    pub severity: Severity,
    pub fired_time: UnixNanos,
    pub fired_value: Option<f64>,
    pub acked_time: Option<UnixNanos>,
    pub resolved_time: Option<UnixNanos>,
    pub message: String,
}

impl AlertRecord {
    pub fn is_open(&self) -> bool {
        self.resolved_time.is_none()
    }
}

pub(super) const INSERT_ALERT: &str = "INSERT INTO alerts (rule_id, device_pk, sensor, severity, fired_unix_nano, fired_value, message) \
     VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING alert_id";
pub(super) const ACK_ALERT: &str = "UPDATE alerts SET acked_unix_nano = ? WHERE alert_id = ?";
pub(super) const RESOLVE_ALERT: &str =
    "UPDATE alerts SET resolved_unix_nano = ?, resolved_value = ? WHERE alert_id = ?";
pub(super) const INSERT_EVENT: &str = "INSERT INTO alert_events (alert_id, kind, rule_id, device_id, sensor, severity, value, time_unix_nano, message, recorded_unix_nano) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING event_id";
pub(super) const EVENTS_AFTER: &str = "SELECT event_id, kind, alert_id, rule_id, device_id, sensor, severity, value, time_unix_nano, message \
     FROM alert_events WHERE event_id > ? ORDER BY event_id LIMIT ?";
pub(super) const ALERT_COLUMNS: &str = "a.alert_id, a.rule_id, a.device_pk, d.device_id, a.sensor, a.severity, a.fired_unix_nano, a.fired_value, \
     a.acked_unix_nano, a.resolved_unix_nano, a.message FROM alerts a JOIN devices d ON d.pk = a.device_pk";
pub(super) const UPSERT_RULE: &str = "INSERT INTO alert_rules (rule_id, severity, sensor, definition, created_unix_nano, updated_unix_nano) \
     VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rule_id) DO UPDATE SET severity = excluded.severity, \
     sensor = excluded.sensor, definition = excluded.definition, updated_unix_nano = excluded.updated_unix_nano";
pub(super) const DELETE_RULE: &str = "DELETE FROM alert_rules WHERE rule_id = ?";

/// `?` placeholders as PostgreSQL's `$1, $2, ...`.
pub(super) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// The `SELECT` of alerts, filtered. Devices are bound one by one.
pub(super) fn list_alerts_sql(include_resolved: bool, devices: usize) -> String {
    let mut sql = format!("SELECT {ALERT_COLUMNS} WHERE 1 = 1");
    if !include_resolved {
        sql.push_str(" AND a.resolved_unix_nano IS NULL");
    }
    if devices > 0 {
        sql.push_str(" AND d.device_id IN (");
        sql.push_str(&vec!["?"; devices].join(", "));
        sql.push(')');
    }
    sql.push_str(" ORDER BY a.alert_id DESC LIMIT ?");
    sql
}

pub(super) fn severity(s: &str) -> Result<Severity, StorageError> {
    Severity::parse(s).ok_or_else(|| StorageError::Corrupt(format!("severity {s:?}")))
}

pub(super) fn rule_from_json(json: &str) -> Result<Rule, StorageError> {
    serde_json::from_str(json)
        .map_err(|e| StorageError::Corrupt(format!("alert rule definition: {e}")))
}

pub(super) fn id(v: i64) -> u64 {
    v.max(0) as u64
}

impl Store {
    pub async fn put_rule(&self, rule: &Rule, now: UnixNanos) -> Result<(), StorageError> {
        dispatch!(self, s => s.put_rule(rule, now).await)
    }

    /// False if there was no such rule.
    pub async fn delete_rule(&self, id: &RuleId) -> Result<bool, StorageError> {
        dispatch!(self, s => s.delete_rule(id).await)
    }

    pub async fn list_rules(&self) -> Result<Vec<Rule>, StorageError> {
        dispatch!(self, s => s.list_rules().await)
    }

    /// Records events in one transaction, in order, creating, acknowledging
    /// or resolving their alerts. Returns them with their ids.
    pub async fn record_alert_events(
        &self,
        events: &[NewAlertEvent],
        now: UnixNanos,
    ) -> Result<Vec<AlertEventRecord>, StorageError> {
        dispatch!(self, s => s.record_alert_events(events, now).await)
    }

    pub async fn alert_events_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AlertEventRecord>, StorageError> {
        dispatch!(self, s => s.alert_events_after(after, limit).await)
    }

    pub async fn list_alerts(
        &self,
        include_resolved: bool,
        device_ids: &[String],
        limit: u32,
    ) -> Result<Vec<AlertRecord>, StorageError> {
        dispatch!(self, s => s.list_alerts(include_resolved, device_ids, limit).await)
    }

    pub async fn get_alert(&self, alert_id: u64) -> Result<AlertRecord, StorageError> {
        dispatch!(self, s => s.get_alert(alert_id).await)
    }

    /// Every device, for the alert engine's view of the fleet.
    pub async fn all_devices(&self) -> Result<Vec<super::DeviceRecord>, StorageError> {
        let mut all = Vec::new();
        loop {
            let page = self
                .list_devices(all.last().map(|d: &super::DeviceRecord| &d.id), 1000)
                .await?;
            let done = page.len() < 1000;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }
}

/// Row decoding shared by both backends.
pub(super) fn event_from_row<'r, R>(row: &'r R) -> Result<AlertEventRecord, StorageError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(AlertEventRecord {
        event_id: id(row.try_get(0)?),
        kind: EventKind::parse(&row.try_get::<String, _>(1)?)?,
        alert_id: id(row.try_get(2)?),
        rule_id: row.try_get(3)?,
        device_id: row.try_get(4)?,
        sensor: row.try_get(5)?,
        severity: severity(&row.try_get::<String, _>(6)?)?,
        value: row.try_get(7)?,
        time: row.try_get(8)?,
        message: row.try_get(9)?,
    })
}

pub(super) fn alert_from_row<'r, R>(row: &'r R) -> Result<AlertRecord, StorageError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(AlertRecord {
        alert_id: id(row.try_get(0)?),
        rule_id: row.try_get(1)?,
        device_pk: row.try_get(2)?,
        device_id: row.try_get(3)?,
        sensor: row.try_get(4)?,
        severity: severity(&row.try_get::<String, _>(5)?)?,
        fired_time: row.try_get(6)?,
        fired_value: row.try_get(7)?,
        acked_time: row.try_get(8)?,
        resolved_time: row.try_get(9)?,
        message: row.try_get(10)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered() {
        assert_eq!(
            numbered("a = ? AND b IN (?, ?)"),
            "a = $1 AND b IN ($2, $3)"
        );
    }
}
