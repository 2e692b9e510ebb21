//! `ingest report NAME`: the rows of a reporting view, read straight from
//! the database (read-only), as a table, CSV or JSON lines.

use std::io::BufWriter;

use clap::Args;

use super::output::Format;
use super::serve::StorageArgs;
use crate::domain::time::now_unix_nanos;
use crate::reports::{ReportDb, ReportError, ReportName, ReportQuery, TimeArg};

#[derive(Debug, Args)]
#[command(after_help = "\
Time columns of --since/--until: readings_hourly hour_unix_nano, readings_daily day_unix_nano, \
latest_readings time_unix_nano, device_status last_upload_unix_nano, alert_history \
fired_unix_nano, command_log created_unix_nano.

The database is only read: it must exist and be migrated (`ingest serve` or `ingest migrate`).")]
pub struct ReportArgs {
    /// The report: the reporting view of that name.
    #[arg(value_enum)]
    name: ReportName,
    /// Only this device; repeat for more.
    #[arg(long = "device", value_name = "DEVICE_ID")]
    devices: Vec<String>,
    /// Only this sensor; repeat for more (reports with a sensor column).
    #[arg(long = "sensor", value_name = "SENSOR")]
    sensors: Vec<String>,
    /// Rows whose time is at or after this: a duration back from now (24h,
    /// 90m, 7d) or an RFC 3339 time (2025-01-31T12:00:00Z).
    #[arg(long, value_name = "TIME")]
    since: Option<TimeArg>,
    /// Rows whose time is before this (exclusive); like --since.
    #[arg(long, value_name = "TIME")]
    until: Option<TimeArg>,
    /// Only the latest N rows by the report's time (shown in the usual
    /// order).
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// table for people, csv for spreadsheets, json for scripts (one object
    /// per line).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// The same as --format json, as every other command has it.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    #[command(flatten)]
    storage: StorageArgs,
}

pub async fn run(args: ReportArgs) -> anyhow::Result<()> {
    let now = now_unix_nanos();
    let query = ReportQuery {
        name: args.name,
        devices: args.devices,
        sensors: args.sensors,
        since: args.since.map(|t| t.resolve(now)),
        until: args.until.map(|t| t.resolve(now)),
        limit: args.limit,
    };
    // A wrong query is refused before the database is touched.
    query.check()?;
    let mut db = ReportDb::open(&args.storage.database()?).await?;
    let format = if args.json { Format::Json } else { args.format };
    let mut out = format.writer(BufWriter::new(std::io::stdout()));
    let result = db.run(&query, &mut *out).await;
    let _ = db.close().await;
    match result {
        Ok(_) => Ok(()),
        // Kept an I/O error, so a closed pipe (`| head`) is not reported.
        Err(ReportError::Write(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}
