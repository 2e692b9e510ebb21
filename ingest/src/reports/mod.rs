//! Reports: the public reporting views (`migrations/*/0004_reporting.sql`)
//! read back for people, spreadsheets and scripts (`ingest report`).
//!
//! - [`ReportName`]: the six views; [`ReportQuery`]: which rows of one of
//!   them (devices, sensors, a time range, a limit), checked before any I/O.
//! - [`ReportDb`]: a read-only connection that never creates nor migrates a
//!   database; it streams a report's rows as [`Value`]s, decoded by each
//!   value's type at run time, so the same data reads the same on SQLite and
//!   PostgreSQL.
//! - [`RowWriter`]: where a report's rows go; the CLI's output module
//!   writes them as a table, CSV or JSON lines.

mod db;
pub mod format;
mod query;

use std::path::PathBuf;

pub use db::{Report, ReportDb};
pub use format::RowWriter;
pub use query::{ReportQuery, TimeArg};

/// One of the public reporting views; the names are the views' names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum ReportName {
    /// Per device, sensor and UTC hour: count, min, max, average.
    #[value(name = "readings_hourly", alias = "readings-hourly")]
    ReadingsHourly,
    /// Per device, sensor and UTC day: count, min, max, average.
    #[value(name = "readings_daily", alias = "readings-daily")]
    ReadingsDaily,
    /// The newest reading of every sensor.
    #[value(name = "latest_readings", alias = "latest-readings")]
    LatestReadings,
    /// Per device: presence, last upload, readings in the last 24 hours,
    /// open alerts.
    #[value(name = "device_status", alias = "device-status")]
    DeviceStatus,
    /// Every alert: when it fired, was acknowledged and resolved.
    #[value(name = "alert_history", alias = "alert-history")]
    AlertHistory,
    /// Every command: its state and how long delivery and acknowledgement
    /// took.
    #[value(name = "command_log", alias = "command-log")]
    CommandLog,
}

impl ReportName {
    pub const ALL: [Self; 6] = [
        Self::ReadingsHourly,
        Self::ReadingsDaily,
        Self::LatestReadings,
        Self::DeviceStatus,
        Self::AlertHistory,
        Self::CommandLog,
    ];

    /// The view's name.
    pub fn view(self) -> &'static str {
        match self {
            Self::ReadingsHourly => "readings_hourly",
            Self::ReadingsDaily => "readings_daily",
            Self::LatestReadings => "latest_readings",
            Self::DeviceStatus => "device_status",
            Self::AlertHistory => "alert_history",
            Self::CommandLog => "command_log",
        }
    }

    /// Whether the view has a `sensor` column (`--sensor` applies).
    pub fn has_sensor(self) -> bool {
        match self {
            Self::ReadingsHourly
            | Self::ReadingsDaily
            | Self::LatestReadings
            | Self::AlertHistory => true,
            Self::DeviceStatus | Self::CommandLog => false,
        }
    }

    /// The column `--since` and `--until` filter on.
    pub fn time_column(self) -> &'static str {
        match self {
            Self::ReadingsHourly => "hour_unix_nano",
            Self::ReadingsDaily => "day_unix_nano",
            Self::LatestReadings => "time_unix_nano",
            Self::DeviceStatus => "last_upload_unix_nano",
            Self::AlertHistory => "fired_unix_nano",
            Self::CommandLog => "created_unix_nano",
        }
    }

    /// The row order, the same on both backends: each entry is a column and
    /// whether it is text (compared byte-wise on PostgreSQL too).
    fn order_by(self) -> &'static [(&'static str, bool)] {
        match self {
            Self::ReadingsHourly => &[
                ("device_id", true),
                ("sensor", true),
                ("unit", true),
                ("hour_unix_nano", false),
            ],
            Self::ReadingsDaily => &[
                ("device_id", true),
                ("sensor", true),
                ("unit", true),
                ("day_unix_nano", false),
            ],
            Self::LatestReadings => &[
                ("device_id", true),
                ("sensor", true),
                ("unit", true),
                ("time_unix_nano", false),
            ],
            Self::DeviceStatus => &[("device_id", true)],
            Self::AlertHistory => &[("device_id", true), ("sensor", true), ("alert_id", false)],
            Self::CommandLog => &[("device_id", true), ("command_id", false)],
        }
    }
}

impl std::fmt::Display for ReportName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.view())
    }
}

/// One value of a report row, typed by what the database holds: integers
/// (ids, counts, unix nanoseconds, `online` as 0/1) are `Int`, doubles are
/// `Float` even when whole, on both backends.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
}

/// Why a report could not be produced; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "--sensor does not apply to {0}: it has no sensor column \
         (it applies to readings_hourly, readings_daily, latest_readings and alert_history)"
    )]
    NoSensorColumn(ReportName),
    #[error("--since ({since}) must be before --until ({until}): the time range is empty")]
    EmptyRange { since: String, until: String },
    #[error(
        "no database at {}: run `ingest serve` or `ingest migrate` first to create it, \
         or point --data-dir or --database-url at an existing one",
        .0.display()
    )]
    MissingDatabase(PathBuf),
    #[error(
        "the database has no {0} view: its schema is older than the reporting views; \
         run `ingest migrate` to bring it up to date"
    )]
    MissingView(ReportName),
    #[error("column {column} holds a value of type {type_name}, which reports cannot show")]
    UnsupportedType { column: String, type_name: String },
    #[error("cannot open the {backend} database: {error}")]
    Connect {
        backend: &'static str,
        error: sqlx::Error,
    },
    /// The message is sqlx's, which already names its cause: no `source`,
    /// or error chains would repeat it.
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// Writing the output failed (e.g. a closed pipe); kept as the I/O
    /// error so the caller can tell.
    #[error(transparent)]
    Write(#[from] std::io::Error),
}

impl From<sqlx::Error> for ReportError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error)
    }
}
