//! Storage of alert rules, alerts and alert events: the types and the
//! queries, written once for both backends (see `sql.rs`).

use super::EventTxHold;
use crate::domain::alert::{Rule, RuleId, Severity};
use crate::domain::time::UnixNanos;
use crate::domain::{DeviceId, SensorName};

use super::cluster;
use super::sql::{Conn, Row, bigint};
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
const INSERT_ALERT: &str = "INSERT INTO alerts (rule_id, device_pk, sensor, severity, fired_unix_nano, fired_value, message) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (rule_id, device_pk) WHERE resolved_unix_nano IS NULL DO NOTHING RETURNING alert_id";
const OPEN_ALERT: &str = "SELECT alert_id FROM alerts WHERE rule_id = $1 AND device_pk = $2 AND resolved_unix_nano IS NULL";
const ACK_ALERT: &str = "UPDATE alerts SET acked_unix_nano = $1 \
     WHERE alert_id = $2 AND resolved_unix_nano IS NULL AND acked_unix_nano IS NULL";
const RESOLVE_ALERT: &str = "UPDATE alerts SET resolved_unix_nano = $1, resolved_value = $2 \
     WHERE alert_id = $3 AND resolved_unix_nano IS NULL";
/// Taken last in a transaction: the row lock is held until commit, so the
/// next writer of events numbers after this one is visible.
const TAKE_EVENT_IDS: &str =
    "UPDATE alert_event_counter SET last_id = last_id + $1 RETURNING last_id";
const INSERT_EVENT: &str = "INSERT INTO alert_events (event_id, alert_id, kind, rule_id, device_id, sensor, severity, value, time_unix_nano, message, recorded_unix_nano) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
const UPSERT_PENDING: &str = "INSERT INTO alert_pending (rule_id, device_pk, since_unix_nano) VALUES ($1, $2, $3) \
     ON CONFLICT (device_pk, rule_id) DO UPDATE SET since_unix_nano = excluded.since_unix_nano";
const DELETE_PENDING: &str = "DELETE FROM alert_pending WHERE device_pk = $1 AND rule_id = $2";
const DELETE_RULE_PENDING: &str = "DELETE FROM alert_pending WHERE rule_id = $1";
/// The newest stored reading of a device's sensor (any unit).
const LAST_READING: &str = "SELECT r.time_unix_nano, r.value FROM readings r \
     JOIN sensors s ON s.pk = r.sensor_pk WHERE s.device_pk = $1 AND s.sensor = $2 \
     ORDER BY r.time_unix_nano DESC LIMIT 1";
const OPEN_ALERTS_OF_RULE: &str =
    "SELECT alert_id, device_pk FROM alerts WHERE rule_id = $1 AND resolved_unix_nano IS NULL";
const EVENTS_AFTER: &str = "SELECT event_id, kind, alert_id, rule_id, device_id, sensor, severity, value, time_unix_nano, message \
     FROM alert_events WHERE event_id > $1 ORDER BY event_id LIMIT $2";
const ALERT_COLUMNS: &str = "a.alert_id, a.rule_id, a.device_pk, d.device_id, a.sensor, a.severity, a.fired_unix_nano, a.fired_value, \
     a.acked_unix_nano, a.resolved_unix_nano, a.message FROM alerts a JOIN devices d ON d.pk = a.device_pk";
const UPSERT_RULE: &str = "INSERT INTO alert_rules (rule_id, severity, sensor, definition, created_unix_nano, updated_unix_nano) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (rule_id) DO UPDATE SET severity = excluded.severity, \
     sensor = excluded.sensor, definition = excluded.definition, updated_unix_nano = excluded.updated_unix_nano";
const DELETE_RULE: &str = "DELETE FROM alert_rules WHERE rule_id = $1";

/// The `SELECT` of alerts, filtered. Devices are bound one by one, as
/// `$1, $2, ...`, then the limit.
fn list_alerts_sql(include_resolved: bool, devices: usize) -> String {
    let mut sql = format!("SELECT {ALERT_COLUMNS} WHERE 1 = 1");
    if !include_resolved {
        sql.push_str(" AND a.resolved_unix_nano IS NULL");
    }
    if devices > 0 {
        let list: Vec<String> = (1..=devices).map(|n| format!("${n}")).collect();
        sql.push_str(&format!(" AND d.device_id IN ({})", list.join(", ")));
    }
    sql.push_str(&format!(" ORDER BY a.alert_id DESC LIMIT ${}", devices + 1));
    sql
}

fn severity(s: &str) -> Result<Severity, StorageError> {
    Severity::parse(s).ok_or_else(|| StorageError::Corrupt(format!("severity {s:?}")))
}

fn rule_from_json(json: &str) -> Result<Rule, StorageError> {
    serde_json::from_str(json)
        .map_err(|e| StorageError::Corrupt(format!("alert rule definition: {e}")))
}

fn id(v: i64) -> u64 {
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
        let definition = serde_json::to_string(rule).expect("rules serialise");
        let mut tx = self.begin_write().await?;
        tx.query(UPSERT_RULE)
            .bind(rule.id.as_str())
            .bind(rule.severity.as_str())
            .bind(rule.sensor.as_ref().map(|s| s.as_str()))
            .bind(definition)
            .bind(now)
            .bind(now)
            .execute()
            .await?;
        // A new version judges from scratch, as it did in memory.
        tx.query(DELETE_RULE_PENDING)
            .bind(rule.id.as_str())
            .execute()
            .await?;
        let outcomes = record_events(tx.conn(), closing, now, self.event_tx_hold()).await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    /// Deletes a rule and records `closing` (its alerts' RESOLVED events) in
    /// one transaction; `None` if there was no such rule.
    pub async fn delete_rule(
        &self,
        id: &RuleId,
        closing: &[NewAlertEvent],
        now: UnixNanos,
    ) -> Result<Option<Vec<EventOutcome>>, StorageError> {
        let mut tx = self.begin_write().await?;
        let deleted = tx.query(DELETE_RULE).bind(id.as_str()).execute().await?;
        if deleted == 0 {
            return Ok(None);
        }
        tx.query(DELETE_RULE_PENDING)
            .bind(id.as_str())
            .execute()
            .await?;
        let outcomes = record_events(tx.conn(), closing, now, self.event_tx_hold()).await?;
        tx.commit().await?;
        Ok(Some(outcomes))
    }

    pub async fn list_rules(&self) -> Result<Vec<Rule>, StorageError> {
        let rows: Vec<String> = self
            .query("SELECT definition FROM alert_rules ORDER BY rule_id")
            .fetch_scalars()
            .await?;
        rows.iter().map(|json| rule_from_json(json)).collect()
    }

    /// The open alerts of a rule: (alert id, device pk).
    pub async fn open_alerts_of_rule(&self, id: &RuleId) -> Result<Vec<(u64, i64)>, StorageError> {
        let rows = self
            .query(OPEN_ALERTS_OF_RULE)
            .bind(id.as_str())
            .fetch_all()
            .await?;
        rows.iter()
            .map(|r| Ok((self::id(r.get(0)?), r.get(1)?)))
            .collect()
    }

    /// Records events in one transaction, in order, creating, acknowledging
    /// or resolving their alerts (see [`EventOutcome`]).
    pub async fn record_alert_events(
        &self,
        events: &[NewAlertEvent],
        now: UnixNanos,
    ) -> Result<Vec<EventOutcome>, StorageError> {
        let mut tx = self.begin_write().await?;
        let outcomes = record_events(tx.conn(), events, now, self.event_tx_hold()).await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    /// The id of the newest recorded event (0 if none).
    pub async fn last_event_id(&self) -> Result<u64, StorageError> {
        let last: i64 = self
            .query("SELECT last_id FROM alert_event_counter")
            .fetch_scalar()
            .await?;
        Ok(id(last))
    }

    pub async fn alert_events_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AlertEventRecord>, StorageError> {
        self.query(EVENTS_AFTER)
            .bind(bigint(after))
            .bind(i64::from(limit))
            .fetch_all_as(event_from_row)
            .await
    }

    /// The newest stored event's id, 0 if none: where a watch that starts
    /// "from now" begins.
    pub async fn latest_alert_event_id(&self) -> Result<u64, StorageError> {
        let row = self
            .query("SELECT COALESCE(MAX(event_id), 0) FROM alert_events")
            .fetch_one()
            .await?;
        Ok(id(row.get(0)?))
    }

    pub async fn list_alerts(
        &self,
        include_resolved: bool,
        device_ids: &[String],
        limit: u32,
    ) -> Result<Vec<AlertRecord>, StorageError> {
        let sql = list_alerts_sql(include_resolved, device_ids.len());
        let mut query = self.query(&sql);
        for d in device_ids {
            query = query.bind(d);
        }
        query
            .bind(i64::from(limit))
            .fetch_all_as(alert_from_row)
            .await
    }

    pub async fn get_alert(&self, alert_id: u64) -> Result<AlertRecord, StorageError> {
        let sql = format!("SELECT {ALERT_COLUMNS} WHERE a.alert_id = $1");
        let row = self.query(&sql).bind(bigint(alert_id)).fetch_one().await?;
        alert_from_row(&row)
    }

    /// Open alerts by severity.
    pub async fn open_alerts_by_severity(&self) -> Result<Vec<(String, i64)>, StorageError> {
        let rows = self.query(
                "SELECT severity, COUNT(*) FROM alerts WHERE resolved_unix_nano IS NULL GROUP BY severity",
            )
            .fetch_all()
            .await?;
        rows.iter().map(|r| Ok((r.get(0)?, r.get(1)?))).collect()
    }
}

/// The one writer of `alert_events`: every event of every path (a group's
/// readings, silences, acks, rule changes) is recorded here, inside the
/// caller's transaction. Alert rows first, the event ids last (see
/// `TAKE_EVENT_IDS`).
pub(super) async fn record_events(
    mut conn: Conn<'_>,
    events: &[NewAlertEvent],
    now: UnixNanos,
    hold: EventTxHold,
) -> Result<Vec<EventOutcome>, sqlx::Error> {
    let mut outcomes = Vec::with_capacity(events.len());
    // FIRED earlier in this call, for the RESOLVED that follow.
    let mut fired: Vec<((&RuleId, i64), i64)> = Vec::new();
    let mut to_record = Vec::new();
    for e in events {
        let alert_id: Option<i64> = match (e.kind, e.alert_id) {
            (EventKind::Fired, _) => {
                let inserted: Option<i64> = conn
                    .query(INSERT_ALERT)
                    .bind(e.rule_id.as_str())
                    .bind(e.device_pk)
                    .bind(&e.sensor)
                    .bind(e.severity.as_str())
                    .bind(e.time)
                    .bind(e.value)
                    .bind(&e.message)
                    .fetch_optional_scalar()
                    .await?;
                if inserted.is_none() {
                    let open: i64 = conn
                        .query(OPEN_ALERT)
                        .bind(e.rule_id.as_str())
                        .bind(e.device_pk)
                        .fetch_scalar()
                        .await?;
                    fired.push(((&e.rule_id, e.device_pk), open));
                    outcomes.push(EventOutcome::AlreadyOpen { alert_id: id(open) });
                    continue;
                }
                inserted
            }
            (EventKind::Acked | EventKind::Resolved, alert_id) => {
                let alert_id = match alert_id {
                    Some(FIRED_EARLIER) | None => fired
                        .iter()
                        .rev()
                        .find(|(key, _)| *key == (&e.rule_id, e.device_pk))
                        .map(|(_, id)| *id),
                    Some(id) => Some(bigint(id)),
                };
                match alert_id {
                    Some(alert_id) => {
                        let changed = if e.kind == EventKind::Acked {
                            conn.query(ACK_ALERT)
                                .bind(e.time)
                                .bind(alert_id)
                                .execute()
                                .await?
                        } else {
                            conn.query(RESOLVE_ALERT)
                                .bind(e.time)
                                .bind(e.value)
                                .bind(alert_id)
                                .execute()
                                .await?
                        };
                        (changed > 0).then_some(alert_id)
                    }
                    None => None,
                }
            }
        };
        let Some(alert_id) = alert_id else {
            outcomes.push(EventOutcome::Skipped);
            continue;
        };
        if e.kind == EventKind::Fired {
            fired.push(((&e.rule_id, e.device_pk), alert_id));
        }
        to_record.push((outcomes.len(), alert_id));
        // Replaced below, once the event has its id.
        outcomes.push(EventOutcome::Skipped);
    }
    if to_record.is_empty() {
        return Ok(outcomes);
    }
    let last: i64 = conn
        .query(TAKE_EVENT_IDS)
        .bind(to_record.len() as i64)
        .fetch_scalar()
        .await?;
    // Delivered at commit, when the events are visible.
    conn.notify(cluster::channel::ALERTS, &last.to_string())
        .await?;
    hold.wait().await;
    let first = last - to_record.len() as i64 + 1;
    for (n, (i, alert_id)) in to_record.into_iter().enumerate() {
        let e = &events[i];
        let event_id = first + n as i64;
        conn.query(INSERT_EVENT)
            .bind(event_id)
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
            .execute()
            .await?;
        outcomes[i] = EventOutcome::Recorded(AlertEventRecord {
            event_id: id(event_id),
            kind: e.kind,
            alert_id: id(alert_id),
            rule_id: e.rule_id.as_str().to_owned(),
            device_id: e.device_id.as_str().to_owned(),
            sensor: e.sensor.clone(),
            severity: e.severity,
            value: e.value,
            time: e.time,
            message: e.message.clone(),
        });
    }
    Ok(outcomes)
}

/// Stores changes of remembered hold starts, inside the caller's
/// transaction.
pub(super) async fn set_pending(
    mut conn: Conn<'_>,
    changes: &[PendingChange],
) -> Result<(), sqlx::Error> {
    for c in changes {
        match c.since {
            Some(since) => {
                conn.query(UPSERT_PENDING)
                    .bind(c.rule_id.as_str())
                    .bind(c.device_pk)
                    .bind(since)
                    .execute()
                    .await?
            }
            None => {
                conn.query(DELETE_PENDING)
                    .bind(c.device_pk)
                    .bind(c.rule_id.as_str())
                    .execute()
                    .await?
            }
        };
    }
    Ok(())
}

/// The newest stored reading of a device's sensor (any unit).
pub(super) async fn last_reading(
    mut conn: Conn<'_>,
    device_pk: i64,
    sensor: &SensorName,
) -> Result<Option<(UnixNanos, f64)>, sqlx::Error> {
    let row = conn
        .query(LAST_READING)
        .bind(device_pk)
        .bind(sensor.as_str())
        .fetch_optional()
        .await?;
    row.map(|r| Ok((r.get(0)?, r.get(1)?))).transpose()
}

fn event_from_row(row: &Row) -> Result<AlertEventRecord, StorageError> {
    Ok(AlertEventRecord {
        event_id: id(row.get(0)?),
        kind: EventKind::parse(&row.get::<String>(1)?)?,
        alert_id: id(row.get(2)?),
        rule_id: row.get(3)?,
        device_id: row.get(4)?,
        sensor: row.get(5)?,
        severity: severity(&row.get::<String>(6)?)?,
        value: row.get(7)?,
        time: row.get(8)?,
        message: row.get(9)?,
    })
}

fn alert_from_row(row: &Row) -> Result<AlertRecord, StorageError> {
    Ok(AlertRecord {
        alert_id: id(row.get(0)?),
        rule_id: row.get(1)?,
        device_pk: row.get(2)?,
        device_id: row.get(3)?,
        sensor: row.get(4)?,
        severity: severity(&row.get::<String>(5)?)?,
        fired_time: row.get(6)?,
        fired_value: row.get(7)?,
        acked_time: row.get(8)?,
        resolved_time: row.get(9)?,
        message: row.get(10)?,
    })
}
