//! Which rows of a report: the query, checked before any I/O, and its SQL
//! for each backend.

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use super::{ReportError, ReportName};
use crate::domain::time::UnixNanos;

/// `--since` / `--until`: a duration back from now (`24h`, `90m`, `7d`) or
/// an RFC 3339 time (`2025-01-31T12:00:00Z`), taken as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeArg {
    Ago(Duration),
    At(UnixNanos),
}

impl FromStr for TimeArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(ago) = humantime::parse_duration(s) {
            return Ok(Self::Ago(ago));
        }
        match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(time) => time
                .timestamp_nanos_opt()
                .map(Self::At)
                .ok_or_else(|| format!("{s} is out of range (years 1677 to 2262)")),
            Err(_) => Err(format!(
                "expected a duration back from now (24h, 90m, 7d) or an RFC 3339 time \
                 (2025-01-31T12:00:00Z), got {s:?}"
            )),
        }
    }
}

impl TimeArg {
    /// Unix nanoseconds, durations counted back from `now`.
    pub fn resolve(self, now: UnixNanos) -> UnixNanos {
        match self {
            Self::Ago(ago) => now.saturating_sub(i64::try_from(ago.as_nanos()).unwrap_or(i64::MAX)),
            Self::At(time) => time,
        }
    }
}

/// Which rows of which report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportQuery {
    pub name: ReportName,
    /// Only rows of these devices (all when empty).
    pub devices: Vec<String>,
    /// Only rows of these sensors (all when empty); for reports with a
    /// sensor column only.
    pub sensors: Vec<String>,
    /// Only rows whose time column ([`ReportName::time_column`]) is at or
    /// after this, in unix nanoseconds.
    pub since: Option<UnixNanos>,
    /// Only rows whose time column is before this (exclusive).
    pub until: Option<UnixNanos>,
    /// At most this many rows.
    pub limit: Option<u64>,
}

impl ReportQuery {
    /// All rows of a report.
    pub fn new(name: ReportName) -> Self {
        Self {
            name,
            devices: Vec::new(),
            sensors: Vec::new(),
            since: None,
            until: None,
            limit: None,
        }
    }

    /// Refuses what cannot be answered: a sensor filter on a report without
    /// sensors, an empty time range.
    pub fn check(&self) -> Result<(), ReportError> {
        if !self.sensors.is_empty() && !self.name.has_sensor() {
            return Err(ReportError::NoSensorColumn(self.name));
        }
        if let (Some(since), Some(until)) = (self.since, self.until)
            && since >= until
        {
            return Err(ReportError::EmptyRange {
                since: rfc3339(since),
                until: rfc3339(until),
            });
        }
        Ok(())
    }

    /// The statement and its parameters. Text columns are ordered byte-wise
    /// on PostgreSQL (`COLLATE "C"`), as SQLite does, so the rows come in the
    /// same order on both.
    pub(super) fn sql(&self, dialect: Dialect) -> Sql {
        let mut sql = Sql {
            text: format!("SELECT * FROM {}", self.name.view()),
            binds: Vec::new(),
        };
        let mut conditions = Vec::new();
        if !self.devices.is_empty() {
            let list = sql.bind_list(dialect, &self.devices);
            conditions.push(format!("device_id IN ({list})"));
        }
        if !self.sensors.is_empty() {
            let list = sql.bind_list(dialect, &self.sensors);
            conditions.push(format!("sensor IN ({list})"));
        }
        let time = self.name.time_column();
        if let Some(since) = self.since {
            let p = sql.bind(dialect, Bind::Int(since));
            conditions.push(format!("{time} >= {p}"));
        }
        if let Some(until) = self.until {
            let p = sql.bind(dialect, Bind::Int(until));
            conditions.push(format!("{time} < {p}"));
        }
        if !conditions.is_empty() {
            let _ = write!(sql.text, " WHERE {}", conditions.join(" AND "));
        }
        let order: Vec<String> = self
            .name
            .order_by()
            .iter()
            .map(|&(column, text)| match (dialect, text) {
                (Dialect::Postgres, true) => format!("{column} COLLATE \"C\""),
                _ => column.to_owned(),
            })
            .collect();
        let order = order.join(", ");
        match self.limit {
            None => {
                let _ = write!(sql.text, " ORDER BY {order}");
            }
            // The latest N rows by the report's time (rows without one
            // last), shown in the report's usual order.
            Some(limit) => {
                let p = sql.bind(dialect, Bind::Int(i64::try_from(limit).unwrap_or(i64::MAX)));
                sql.text = format!(
                    "SELECT * FROM ({} ORDER BY {time} IS NULL, {time} DESC, {order} LIMIT {p}) \
                     AS latest ORDER BY {order}",
                    sql.text
                );
            }
        }
        sql
    }
}

pub(super) use crate::domain::time::rfc3339;

/// How parameters are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Bind {
    Int(i64),
    Text(String),
}

/// A statement with its parameters, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sql {
    pub text: String,
    pub binds: Vec<Bind>,
}

impl Sql {
    /// Adds a parameter and returns its placeholder.
    fn bind(&mut self, dialect: Dialect, value: Bind) -> String {
        self.binds.push(value);
        match dialect {
            Dialect::Sqlite => "?".to_owned(),
            Dialect::Postgres => format!("${}", self.binds.len()),
        }
    }

    fn bind_list(&mut self, dialect: Dialect, values: &[String]) -> String {
        let placeholders: Vec<String> = values
            .iter()
            .map(|v| self.bind(dialect, Bind::Text(v.clone())))
            .collect();
        placeholders.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000_000_000;

    #[test]
    fn durations_count_back_from_now_and_times_are_taken_as_is() {
        let now = 1_000 * HOUR;
        assert_eq!("24h".parse::<TimeArg>().unwrap().resolve(now), 976 * HOUR);
        assert_eq!(
            "90m".parse::<TimeArg>().unwrap().resolve(now),
            now - 90 * 60_000_000_000
        );
        assert_eq!(
            "2025-01-31T12:00:00Z"
                .parse::<TimeArg>()
                .unwrap()
                .resolve(now),
            1_738_324_800_000_000_000
        );
        assert_eq!(
            "2025-01-31T14:00:00.5+02:00".parse::<TimeArg>().unwrap(),
            TimeArg::At(1_738_324_800_500_000_000)
        );
        let error = "yesterday".parse::<TimeArg>().unwrap_err();
        assert!(error.contains("RFC 3339"), "{error}");
    }

    #[test]
    fn sql_filters_orders_and_limits_on_both_backends() {
        let query = ReportQuery {
            devices: vec!["a".into(), "b".into()],
            sensors: vec!["temperature".into()],
            since: Some(HOUR),
            until: Some(3 * HOUR),
            limit: Some(10),
            ..ReportQuery::new(ReportName::ReadingsHourly)
        };
        let sqlite = query.sql(Dialect::Sqlite);
        assert_eq!(
            sqlite.text,
            "SELECT * FROM (SELECT * FROM readings_hourly WHERE device_id IN (?, ?) AND sensor IN (?) \
             AND hour_unix_nano >= ? AND hour_unix_nano < ? \
             ORDER BY hour_unix_nano IS NULL, hour_unix_nano DESC, \
             device_id, sensor, unit, hour_unix_nano LIMIT ?) \
             AS latest ORDER BY device_id, sensor, unit, hour_unix_nano"
        );
        assert_eq!(
            sqlite.binds,
            vec![
                Bind::Text("a".into()),
                Bind::Text("b".into()),
                Bind::Text("temperature".into()),
                Bind::Int(HOUR),
                Bind::Int(3 * HOUR),
                Bind::Int(10),
            ]
        );
        let postgres = query.sql(Dialect::Postgres);
        assert_eq!(
            postgres.text,
            "SELECT * FROM (SELECT * FROM readings_hourly WHERE device_id IN ($1, $2) AND sensor IN ($3) \
             AND hour_unix_nano >= $4 AND hour_unix_nano < $5 \
             ORDER BY hour_unix_nano IS NULL, hour_unix_nano DESC, \
             device_id COLLATE \"C\", sensor COLLATE \"C\", unit COLLATE \"C\", hour_unix_nano LIMIT $6) \
             AS latest ORDER BY device_id COLLATE \"C\", sensor COLLATE \"C\", unit COLLATE \"C\", \
             hour_unix_nano"
        );
        assert_eq!(postgres.binds, sqlite.binds);
        assert_eq!(
            ReportQuery::new(ReportName::CommandLog)
                .sql(Dialect::Sqlite)
                .text,
            "SELECT * FROM command_log ORDER BY device_id, command_id"
        );
    }

    #[test]
    fn sensor_filter_and_empty_ranges_are_refused() {
        let sensor = ReportQuery {
            sensors: vec!["temperature".into()],
            ..ReportQuery::new(ReportName::DeviceStatus)
        };
        assert!(matches!(
            sensor.check(),
            Err(ReportError::NoSensorColumn(ReportName::DeviceStatus))
        ));
        let empty = ReportQuery {
            since: Some(2 * HOUR),
            until: Some(2 * HOUR),
            ..ReportQuery::new(ReportName::AlertHistory)
        };
        let message = empty.check().unwrap_err().to_string();
        assert_eq!(
            message,
            "--since (1970-01-01T02:00:00Z) must be before --until (1970-01-01T02:00:00Z): \
             the time range is empty"
        );
        let fine = ReportQuery {
            sensors: vec!["temperature".into()],
            since: Some(HOUR),
            until: Some(2 * HOUR),
            ..ReportQuery::new(ReportName::AlertHistory)
        };
        fine.check().unwrap();
    }
}
