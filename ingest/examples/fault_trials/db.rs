//! Reading a trial's database directly, on either backend, into plain
//! values for the checks: what is stored, not what the server says.

use std::str::FromStr;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{ConnectOptions, Connection};

pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub event_id: i64,
    pub alert_id: i64,
    pub kind: String,
    pub rule_id: String,
    pub device_id: String,
    pub value: Option<f64>,
    pub time: i64,
}

#[derive(Debug, Clone)]
pub struct StoredAlert {
    pub alert_id: i64,
    pub rule_id: String,
    pub device_id: String,
    pub fired_time: i64,
    pub fired_value: Option<f64>,
    pub resolved_time: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    /// (device_id, committed_sequence)
    pub devices: Vec<(String, i64)>,
    /// (device_id, time, value), by device and time.
    pub readings: Vec<(String, i64, f64)>,
    pub events: Vec<StoredEvent>,
    pub alerts: Vec<StoredAlert>,
    /// Every stored reading with its dedup key: (device_id, batch
    /// sequence, index in batch, time, value).
    pub keyed_readings: Vec<(String, i64, i32, i64, f64)>,
    /// The readings feed's batches: (position, device_id, batch sequence).
    pub feed: Vec<(i64, String, i64)>,
    pub commands: Vec<StoredCommand>,
}

/// (command_id, device_id, state)
pub type StoredCommand = (i64, String, String);

const DEVICES: &str = "SELECT device_id, committed_sequence FROM devices ORDER BY device_id";
const READINGS: &str = "SELECT d.device_id, r.time_unix_nano, r.value
     FROM readings r JOIN sensors s ON s.pk = r.sensor_pk JOIN devices d ON d.pk = s.device_pk
     ORDER BY d.device_id, r.time_unix_nano";
const EVENTS: &str = "SELECT event_id, alert_id, kind, rule_id, device_id, value, time_unix_nano
     FROM alert_events ORDER BY event_id";
const ALERTS: &str = "SELECT a.alert_id, a.rule_id, d.device_id, a.fired_unix_nano, a.fired_value,
            a.resolved_unix_nano
     FROM alerts a JOIN devices d ON d.pk = a.device_pk ORDER BY a.alert_id";
const MAX_EVENT: &str = "SELECT COALESCE(MAX(event_id), 0) FROM alert_events";
const KEYED_READINGS: &str =
    "SELECT d.device_id, r.batch_sequence, r.batch_index, r.time_unix_nano, r.value
     FROM readings r JOIN sensors s ON s.pk = r.sensor_pk JOIN devices d ON d.pk = s.device_pk";
const FEED: &str = "SELECT f.position, d.device_id, f.batch_sequence
     FROM readings_feed f JOIN devices d ON d.pk = f.device_pk ORDER BY f.position";
const LAST_POSITION: &str = "SELECT last_position FROM readings_feed_counter";
const COMMANDS: &str = "SELECT c.command_id, d.device_id, c.state
     FROM commands c JOIN devices d ON d.pk = c.device_pk ORDER BY c.command_id";

type EventRow = (i64, i64, String, String, String, Option<f64>, i64);
type AlertRow = (i64, String, String, i64, Option<f64>, Option<i64>);
type Tables = (
    Vec<(String, i64)>,
    Vec<(String, i64, f64)>,
    Vec<EventRow>,
    Vec<AlertRow>,
);

/// The same queries on either pool; the row types decode on both.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

impl Db {
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("sqlite:") {
            // Read-only: the server may still be running while we look.
            let options = SqliteConnectOptions::from_str(url)?.read_only(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .with_context(|| format!("opening {url}"))?;
            Ok(Self::Sqlite(pool))
        } else {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            Ok(Self::Postgres(pool))
        }
    }

    pub async fn max_event_id(&self) -> anyhow::Result<i64> {
        Ok(on_pool!(self, p => sqlx::query_scalar::<_, i64>(MAX_EVENT).fetch_one(p).await?))
    }

    pub async fn last_feed_position(&self) -> anyhow::Result<i64> {
        Ok(on_pool!(self, p => sqlx::query_scalar::<_, i64>(LAST_POSITION).fetch_one(p).await?))
    }

    pub async fn commands(&self) -> anyhow::Result<Vec<StoredCommand>> {
        Ok(on_pool!(self, p => sqlx::query_as(COMMANDS).fetch_all(p).await?))
    }

    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let commands = self.commands().await?;
        let (keyed_readings, feed) = on_pool!(self, p => (
            sqlx::query_as(KEYED_READINGS).fetch_all(p).await?,
            sqlx::query_as(FEED).fetch_all(p).await?,
        ));
        let (devices, readings, events, alerts): Tables = on_pool!(self, p => (
            sqlx::query_as(DEVICES).fetch_all(p).await?,
            sqlx::query_as(READINGS).fetch_all(p).await?,
            sqlx::query_as(EVENTS).fetch_all(p).await?,
            sqlx::query_as(ALERTS).fetch_all(p).await?,
        ));
        Ok(Snapshot {
            commands,
            keyed_readings,
            feed,
            devices,
            readings,
            events: events
                .into_iter()
                .map(
                    |(event_id, alert_id, kind, rule_id, device_id, value, time)| StoredEvent {
                        event_id,
                        alert_id,
                        kind,
                        rule_id,
                        device_id,
                        value,
                        time,
                    },
                )
                .collect(),
            alerts: alerts
                .into_iter()
                .map(
                    |(alert_id, rule_id, device_id, fired_time, fired_value, resolved_time)| {
                        StoredAlert {
                            alert_id,
                            rule_id,
                            device_id,
                            fired_time,
                            fired_value,
                            resolved_time,
                        }
                    },
                )
                .collect(),
        })
    }

    pub async fn close(self) {
        on_pool!(self, p => p.close().await)
    }
}

/// Runs statements one by one (CREATE and DROP DATABASE refuse to share a
/// transaction) in the server's `postgres` database.
pub async fn postgres_admin(base: &str, statements: &[&str]) -> anyhow::Result<()> {
    let options = PgConnectOptions::from_str(&format!("{base}/postgres"))?;
    let mut conn = options
        .connect()
        .await
        .with_context(|| format!("connecting to {base}/postgres"))?;
    for sql in statements {
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .with_context(|| (*sql).to_owned())?;
    }
    conn.close().await?;
    Ok(())
}
