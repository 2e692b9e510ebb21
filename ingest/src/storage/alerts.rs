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

impl NewAlertEvent {
    /// An event of a rule itself rather than of a reading (a silence, a
    /// rule changed or deleted): no value, the server's time, the rule's
    /// sensor (empty for inactivity of any sensor).
    pub fn of_rule(
        kind: EventKind,
        alert_id: Option<u64>,
        rule: &Rule,
        device_pk: i64,
        device_id: DeviceId,
        message: String,
    ) -> Self {
        Self {
            kind,
            alert_id,
            rule_id: rule.id.clone(),
            device_pk,
            device_id,
            sensor: rule
                .sensor
                .as_ref()
                .map_or(String::new(), |s| s.as_str().to_owned()),
            severity: rule.severity,
            value: None,
            time: crate::domain::time::now_unix_nanos(),
            message,
        }
    }
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

/// What became of an event handed to `record_alert_events`. The checks
/// are the database's, so an event is never recorded twice whoever judged
/// it (a restarted server, another server process).
#[derive(Debug, Clone, PartialEq)]
pub enum EventOutcome {
    Recorded(AlertEventRecord),
    /// A FIRED for a (rule, device) whose alert is open already: not
    /// recorded; this is the open alert.
    AlreadyOpen {
        alert_id: u64,
    },
    /// An ACKED or RESOLVED for an alert that is resolved (or, for ACKED,
    /// acknowledged) already: not recorded.
    Skipped,
}

/// The `alert_id` of a RESOLVED whose FIRED comes earlier in the same
/// call, before its id exists.
pub const FIRED_EARLIER: u64 = u64::MAX;

/// A change of a rule's remembered hold start for a device; `None` clears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChange {
    pub rule_id: RuleId,
    pub device_pk: i64,
    pub since: Option<UnixNanos>,
}

/// `alerts_one_open` decides: a second FIRED for an open alert inserts nothing.
pub(super) const INSERT_ALERT: &str = "INSERT INTO alerts (rule_id, device_pk, sensor, severity, fired_unix_nano, fired_value, message) \
     VALUES (?, ?, ?, ?, ?, ?, ?) \
     ON CONFLICT (rule_id, device_pk) WHERE resolved_unix_nano IS NULL DO NOTHING RETURNING alert_id";
pub(super) const OPEN_ALERT: &str = "SELECT alert_id FROM alerts WHERE rule_id = ? AND device_pk = ? AND resolved_unix_nano IS NULL";
pub(super) const ACK_ALERT: &str = "UPDATE alerts SET acked_unix_nano = ? \
     WHERE alert_id = ? AND resolved_unix_nano IS NULL AND acked_unix_nano IS NULL";
pub(super) const RESOLVE_ALERT: &str = "UPDATE alerts SET resolved_unix_nano = ?, resolved_value = ? \
     WHERE alert_id = ? AND resolved_unix_nano IS NULL";
/// Taken last in a transaction: the row lock is held until commit, so the
/// next writer of events numbers after this one is visible.
pub(super) const TAKE_EVENT_IDS: &str =
    "UPDATE alert_event_counter SET last_id = last_id + ? RETURNING last_id";
pub(super) const INSERT_EVENT: &str = "INSERT INTO alert_events (event_id, alert_id, kind, rule_id, device_id, sensor, severity, value, time_unix_nano, message, recorded_unix_nano) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
pub(super) const UPSERT_PENDING: &str = "INSERT INTO alert_pending (rule_id, device_pk, since_unix_nano) VALUES (?, ?, ?) \
     ON CONFLICT (device_pk, rule_id) DO UPDATE SET since_unix_nano = excluded.since_unix_nano";
pub(super) const DELETE_PENDING: &str =
    "DELETE FROM alert_pending WHERE device_pk = ? AND rule_id = ?";
pub(super) const DELETE_RULE_PENDING: &str = "DELETE FROM alert_pending WHERE rule_id = ?";
/// The newest stored reading of a device's sensor (any unit).
pub(super) const LAST_READING: &str = "SELECT r.time_unix_nano, r.value FROM readings r \
     JOIN sensors s ON s.pk = r.sensor_pk WHERE s.device_pk = ? AND s.sensor = ? \
     ORDER BY r.time_unix_nano DESC LIMIT 1";
pub(super) const OPEN_ALERTS_OF_RULE: &str =
    "SELECT alert_id, device_pk FROM alerts WHERE rule_id = ? AND resolved_unix_nano IS NULL";
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
    /// Creates or replaces a rule, forgets its remembered hold starts and
    /// records `closing` (RESOLVED events of alerts the new version no
    /// longer selects), in one transaction.
    pub async fn put_rule(
        &self,
        rule: &Rule,
        closing: &[NewAlertEvent],
        now: UnixNanos,
    ) -> Result<Vec<EventOutcome>, StorageError> {
        dispatch!(self, s => s.put_rule(rule, closing, now).await)
    }

    /// Deletes a rule and records `closing` (its alerts' RESOLVED events) in
    /// one transaction; `None` if there was no such rule.
    pub async fn delete_rule(
        &self,
        id: &RuleId,
        closing: &[NewAlertEvent],
        now: UnixNanos,
    ) -> Result<Option<Vec<EventOutcome>>, StorageError> {
        dispatch!(self, s => s.delete_rule(id, closing, now).await)
    }

    pub async fn list_rules(&self) -> Result<Vec<Rule>, StorageError> {
        dispatch!(self, s => s.list_rules().await)
    }

    /// The open alerts of a rule: (alert id, device pk).
    pub async fn open_alerts_of_rule(&self, id: &RuleId) -> Result<Vec<(u64, i64)>, StorageError> {
        dispatch!(self, s => s.open_alerts_of_rule(id).await)
    }

    /// Records events in one transaction, in order, creating, acknowledging
    /// or resolving their alerts (see [`EventOutcome`]).
    pub async fn record_alert_events(
        &self,
        events: &[NewAlertEvent],
        now: UnixNanos,
    ) -> Result<Vec<EventOutcome>, StorageError> {
        dispatch!(self, s => s.record_alert_events(events, now).await)
    }

    /// The id of the newest recorded event (0 if none).
    pub async fn last_event_id(&self) -> Result<u64, StorageError> {
        dispatch!(self, s => s.last_event_id().await)
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
