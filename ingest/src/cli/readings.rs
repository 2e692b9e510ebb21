//! `ingest readings query`: a fleet's readings, raw or in buckets, out of
//! QueryReadings into a table, CSV or JSON lines.
//!
//! Made for long exports: rows are written as chunks arrive, and a broken
//! connection is resumed from the last chunk's token after a backoff, so
//! an export never starts over and never writes a row twice.

use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use telemetry_proto::v1 as pb;

use super::client::{Ops, Resumes, ServerArgs, StreamFailure};
use super::output::{Format, utc_nanos};
use crate::domain::time::now_unix_nanos;
use crate::reports::{RowWriter, TimeArg, Value};

#[derive(Debug, Subcommand)]
pub enum ReadingsCommand {
    /// Readings of some devices in a time range, raw or in buckets.
    ///
    /// Examples:
    ///   ingest readings query --device pump-1 --from -1h
    ///   ingest readings query --device pump-1 --device pump-2 --from 2026-01-01T00:00:00Z
    ///     --to 2027-01-01T00:00:00Z --every 1d --tz Europe/Berlin --agg min,max,avg
    ///     --format csv --output pumps-2026.csv
    #[command(verbatim_doc_comment)]
    Query(QueryArgs),
    /// The readings feed as it commits: every committed batch in commit
    /// order, with each reading's dedup key (device_id, batch_sequence,
    /// index) and the cursor to resume after it. Ctrl-C prints the last
    /// cursor.
    ///
    /// Examples:
    ///   ingest readings tail --device pump-1
    ///   ingest readings tail --from earliest --consumer lake-loader --format jsonl
    ///   ingest readings tail --cursor-file feed.cursor --format csv >> feed.csv
    #[command(verbatim_doc_comment)]
    Tail(super::readings_tail::TailArgs),
    /// Named consumers of the feed with their lag, or `delete NAME`.
    Consumers(super::readings_tail::ConsumersArgs),
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// A device to read (repeat for several).
    #[arg(long = "device", required = true)]
    devices: Vec<String>,
    /// Only this sensor (repeat for several; default: every sensor).
    #[arg(long = "sensor")]
    sensors: Vec<String>,
    /// Start of the range (included): an RFC 3339 time, `now`, or a
    /// duration back from now (`-1h`, `-7d`).
    #[arg(long, value_parser = parse_time, allow_hyphen_values = true)]
    from: TimeArg,
    /// End of the range (excluded), as --from.
    #[arg(long, value_parser = parse_time, default_value = "now", allow_hyphen_values = true)]
    to: TimeArg,
    /// Buckets instead of raw readings: a width of 1 s or more (`10s`,
    /// `5m`, `1h`), or calendar `1d`, `1w` (from Monday), `1mo` in --tz.
    #[arg(long, value_parser = parse_every)]
    every: Option<Every>,
    /// IANA time zone of calendar buckets (`1d`, `1w`, `1mo`); default UTC.
    #[arg(long)]
    tz: Option<String>,
    /// Aggregates of each bucket; their columns come in this order:
    /// count, min, max, sum, avg, first, last.
    #[arg(long, value_delimiter = ',', default_value = "count,min,max,avg",
          value_parser = ["count", "min", "max", "sum", "avg", "first", "last"])]
    agg: Vec<String>,
    /// table for people, csv for spreadsheets, jsonl for scripts.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// The same as --format jsonl, as every other command has it.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// Write to this file instead of standard output.
    #[arg(long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
}

/// `--every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Every {
    Width(Duration),
    Calendar(pb::CalendarUnit),
}

fn parse_every(s: &str) -> Result<Every, String> {
    match s.trim() {
        "1d" | "d" => Ok(Every::Calendar(pb::CalendarUnit::Day)),
        "1w" | "w" => Ok(Every::Calendar(pb::CalendarUnit::Week)),
        "1mo" | "mo" => Ok(Every::Calendar(pb::CalendarUnit::Month)),
        other => super::duration(other)
            .map(Every::Width)
            .map_err(|e| format!("{e}; or a calendar unit: 1d, 1w, 1mo")),
    }
}

/// `now`, `-1h` (back from now) or an RFC 3339 time.
fn parse_time(s: &str) -> Result<TimeArg, String> {
    match s.trim() {
        "now" => Ok(TimeArg::Ago(Duration::ZERO)),
        t => t.strip_prefix('-').unwrap_or(t).parse(),
    }
}

fn aggregate(name: &str) -> pb::Aggregate {
    match name {
        "count" => pb::Aggregate::Count,
        "min" => pb::Aggregate::Min,
        "max" => pb::Aggregate::Max,
        "sum" => pb::Aggregate::Sum,
        "avg" => pb::Aggregate::Avg,
        "first" => pb::Aggregate::First,
        "last" => pb::Aggregate::Last,
        _ => pb::Aggregate::Unspecified,
    }
}

pub async fn run(cmd: ReadingsCommand) -> anyhow::Result<()> {
    match cmd {
        ReadingsCommand::Query(args) => query(args).await,
        ReadingsCommand::Tail(args) => super::readings_tail::tail(args).await,
        ReadingsCommand::Consumers(args) => super::readings_tail::consumers(args).await,
    }
}

async fn query(args: QueryArgs) -> anyhow::Result<()> {
    let now = now_unix_nanos();
    let (from, to) = (args.from.resolve(now), args.to.resolve(now));
    let request = request(&args, from, to);
    // Columns in the order asked, duplicates dropped, as the server does.
    let mut aggs: Vec<pb::Aggregate> = args.agg.iter().map(|a| aggregate(a)).collect();
    aggs.sort_by_key(|a| *a as i32);
    aggs.dedup();
    let out: Box<dyn Write + Send> = match &args.output {
        Some(path) => Box::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let format = if args.json { Format::Json } else { args.format };
    let mut out = format.writer(BufWriter::new(out));
    let mut header: Vec<String> = ["device_id", "sensor", "unit"].map(String::from).to_vec();
    if args.every.is_none() {
        header.extend(["time_unix_nano", "time_utc", "value"].map(String::from));
    } else {
        header.extend(["bucket_unix_nano", "bucket_utc"].map(String::from));
        header.extend(aggs.iter().map(|a| name(*a).to_owned()));
    }
    out.header(&header)?;

    let mut ops = args.server.ops().await?;
    let mut progress = Progress::new(std::io::stderr().is_terminal());
    let mut token = String::new();
    let mut resumes = Resumes::new();
    loop {
        let req = pb::QueryReadingsRequest {
            resume_token: token.clone(),
            ..request.clone()
        };
        let sent = progress.rows;
        match stream(&mut ops, req, &aggs, &mut *out, &mut token, &mut progress).await {
            Ok(()) => break,
            Err(StreamFailure::Status(status)) => {
                progress.clear();
                let from = format!("after {} rows", progress.rows);
                let delay = resumes.after(status, progress.rows > sent, &from)?;
                tokio::time::sleep(delay).await;
            }
            Err(StreamFailure::Write(e)) => return Err(e.into()),
        }
    }
    out.finish()?;
    progress.done();
    Ok(())
}

fn request(args: &QueryArgs, from: i64, to: i64) -> pb::QueryReadingsRequest {
    let downsample = args.every.map(|every| pb::Downsample {
        bucket: Some(match every {
            Every::Width(w) => pb::downsample::Bucket::WidthMillis(w.as_millis() as u64),
            Every::Calendar(unit) => pb::downsample::Bucket::Calendar(unit as i32),
        }),
        time_zone: args.tz.clone().unwrap_or_default(),
        aggregates: args.agg.iter().map(|a| aggregate(a) as i32).collect(),
    });
    pb::QueryReadingsRequest {
        devices: Some(pb::DeviceSelector {
            selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
                device_ids: args.devices.clone(),
            })),
        }),
        sensors: args.sensors.clone(),
        start_time_unix_nano: from.max(0) as u64,
        end_time_unix_nano: to.max(0) as u64,
        downsample,
        resume_token: String::new(),
    }
}

/// One call: writes each chunk's rows, then remembers its token.
async fn stream(
    ops: &mut Ops,
    req: pb::QueryReadingsRequest,
    aggs: &[pb::Aggregate],
    out: &mut dyn RowWriter,
    token: &mut String,
    progress: &mut Progress,
) -> Result<(), StreamFailure> {
    let mut chunks = ops
        .query_readings(req)
        .await
        .map_err(StreamFailure::Status)?
        .into_inner();
    while let Some(chunk) = chunks.message().await.map_err(StreamFailure::Status)? {
        let rows = write_chunk(&chunk, aggs, out).map_err(StreamFailure::Write)?;
        *token = chunk.resume_token;
        progress.add(rows);
    }
    Ok(())
}

fn write_chunk(
    chunk: &pb::ReadingsChunk,
    aggs: &[pb::Aggregate],
    out: &mut dyn RowWriter,
) -> std::io::Result<usize> {
    let device = Value::Text(chunk.device_id.clone());
    match &chunk.data {
        Some(pb::readings_chunk::Data::Series(s)) => {
            let (sensor, unit) = (Value::Text(s.sensor.clone()), Value::Text(s.unit.clone()));
            for (&t, &v) in s.time_unix_nano.iter().zip(&s.value) {
                out.row(&[
                    device.clone(),
                    sensor.clone(),
                    unit.clone(),
                    Value::Int(t as i64),
                    Value::Text(utc_nanos(t as i64)),
                    Value::Float(v),
                ])?;
            }
            Ok(s.time_unix_nano.len())
        }
        Some(pb::readings_chunk::Data::Buckets(b)) => {
            let (sensor, unit) = (Value::Text(b.sensor.clone()), Value::Text(b.unit.clone()));
            for (i, &start) in b.bucket_start_unix_nano.iter().enumerate() {
                let mut row = vec![
                    device.clone(),
                    sensor.clone(),
                    unit.clone(),
                    Value::Int(start as i64),
                    Value::Text(utc_nanos(start as i64)),
                ];
                for a in aggs {
                    let column = match a {
                        pb::Aggregate::Count => {
                            row.push(
                                b.count
                                    .get(i)
                                    .map_or(Value::Null, |&c| Value::Int(c as i64)),
                            );
                            continue;
                        }
                        pb::Aggregate::Min => &b.min,
                        pb::Aggregate::Max => &b.max,
                        pb::Aggregate::Sum => &b.sum,
                        pb::Aggregate::Avg => &b.avg,
                        pb::Aggregate::First => &b.first,
                        pb::Aggregate::Last => &b.last,
                        pb::Aggregate::Unspecified => continue,
                    };
                    row.push(column.get(i).map_or(Value::Null, |&v| Value::Float(v)));
                }
                out.row(&row)?;
            }
            Ok(b.bucket_start_unix_nano.len())
        }
        Some(pb::readings_chunk::Data::Heartbeat(_)) | None => Ok(0),
    }
}

fn name(a: pb::Aggregate) -> &'static str {
    match a {
        pb::Aggregate::Count => "count",
        pb::Aggregate::Min => "min",
        pb::Aggregate::Max => "max",
        pb::Aggregate::Sum => "sum",
        pb::Aggregate::Avg => "avg",
        pb::Aggregate::First => "first",
        pb::Aggregate::Last => "last",
        pb::Aggregate::Unspecified => "unspecified",
    }
}

/// `rows, rows/s` on one line of stderr, rewritten in place, when stderr
/// is a terminal; nothing otherwise (logs and pipes stay clean).
struct Progress {
    shown: bool,
    rows: u64,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new(shown: bool) -> Self {
        let now = Instant::now();
        Self {
            shown,
            rows: 0,
            started: now,
            last: now,
        }
    }

    fn add(&mut self, rows: usize) {
        self.rows += rows as u64;
        if self.shown && self.last.elapsed() >= Duration::from_millis(200) {
            self.last = Instant::now();
            self.print();
        }
    }

    fn print(&self) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\r{} rows, {:.0} rows/s   ",
            self.rows,
            self.rows as f64 / secs
        );
    }

    fn clear(&self) {
        if self.shown {
            eprint!("\r\x1b[2K");
        }
    }

    fn done(&self) {
        if self.shown {
            self.print();
            eprintln!();
        }
    }
}
