//! `ingest readings tail`: the readings feed (WatchReadings) as it
//! commits, into a table, CSV or JSON lines; and `ingest readings
//! consumers`, the named consumers with their lag.
//!
//! Made for a downstream job as much as for a person: every row carries
//! its dedup key (device, batch sequence, index) and the cursor after its
//! chunk; the cursor file is replaced atomically after each chunk; a named
//! consumer's cursor is committed as it goes and on exit; a broken
//! connection is resumed from the last cursor after a backoff.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use telemetry_proto::v1 as pb;

use super::client::{Ops, Resumes, ServerArgs, StreamFailure};
use super::output::{Answer, Column, Format, Table, reply, status_error, time, utc_nanos};
use crate::reports::{RowWriter, Value};

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Only this device (repeat for several; default: every device, also
    /// those registered later).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Only this sensor (repeat for several; default: every sensor).
    #[arg(long = "sensor")]
    sensors: Vec<String>,
    /// Where to start without a saved cursor: `now`, `earliest` (the
    /// oldest batch the feed holds), or a cursor from an earlier run.
    #[arg(long, default_value = "now")]
    from: String,
    /// A named consumer: start at its committed cursor (if it has one) and
    /// commit the cursor as rows are written and on exit.
    #[arg(long)]
    consumer: Option<String>,
    /// Save the cursor here after each chunk (replaced atomically) and
    /// start from it when it exists; it wins over --from and --consumer.
    #[arg(long)]
    cursor_file: Option<PathBuf>,
    /// How often the consumer's cursor is committed (with --consumer).
    #[arg(long, default_value = "5s", value_parser = super::duration)]
    commit_every: Duration,
    /// table for people, csv for spreadsheets, jsonl for scripts.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// The same as --format jsonl.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum ConsumersCommand {
    /// Removes a named consumer (its committed cursor).
    Delete {
        /// The consumer's name (see `ingest readings consumers`).
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Args)]
pub struct ConsumersArgs {
    #[command(subcommand)]
    command: Option<ConsumersCommand>,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

const COLUMNS: [&str; 9] = [
    "device_id",
    "sensor",
    "unit",
    "time_unix_nano",
    "time_utc",
    "value",
    "batch_sequence",
    "index",
    "cursor",
];

/// Where the tail stands, and what it still owes the consumer.
struct Position {
    cursor: String,
    committed: String,
    last_commit: Instant,
}

pub async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let mut ops = args.server.ops().await?;
    let saved = match &args.cursor_file {
        Some(path) => read_cursor(path)?,
        None => None,
    };
    let start = match (&saved, &args.consumer) {
        (Some(cursor), _) => pb::watch_readings_request::Start::FromCursor(cursor.clone()),
        (None, Some(name)) if consumer_exists(&mut ops, name).await? => {
            pb::watch_readings_request::Start::FromConsumer(name.clone())
        }
        (None, _) => match args.from.as_str() {
            "now" => pb::watch_readings_request::Start::FromNow(true),
            "earliest" => pb::watch_readings_request::Start::FromEarliest(true),
            cursor => pb::watch_readings_request::Start::FromCursor(cursor.to_owned()),
        },
    };
    let format = if args.json { Format::Json } else { args.format };
    let mut out = format.writer(BufWriter::new(std::io::stdout()));
    let columns = if format == Format::Table {
        &COLUMNS[..COLUMNS.len() - 1]
    } else {
        &COLUMNS[..]
    };
    out.header(&columns.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>())?;
    let mut position = Position {
        cursor: String::new(),
        committed: String::new(),
        last_commit: Instant::now(),
    };
    let request = |start| pb::WatchReadingsRequest {
        devices: (!args.devices.is_empty()).then(|| pb::DeviceSelector {
            selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
                device_ids: args.devices.clone(),
            })),
        }),
        sensors: args.sensors.clone(),
        start: Some(start),
    };
    let mut start = Some(start);
    let mut resumes = Resumes::new();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let ended = loop {
        let from = match start.take() {
            Some(start) => start,
            None => pb::watch_readings_request::Start::FromCursor(position.cursor.clone()),
        };
        let received_before = position.cursor.clone();
        let run = follow(&mut ops, request(from), &args, &mut *out, &mut position);
        let result = tokio::select! {
            result = run => result,
            _ = &mut interrupted => break Ok(()),
        };
        match result {
            Ok(()) => break Ok(()),
            Err(StreamFailure::Status(status)) => {
                let progressed = position.cursor != received_before;
                let delay = match resumes.after(status, progressed, "from the last cursor") {
                    Ok(delay) => delay,
                    Err(e) => break Err(e),
                };
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = &mut interrupted => break Ok(()),
                }
            }
            Err(StreamFailure::Write(e)) => break Err(e.into()),
        }
    };
    out.finish()?;
    if let Some(name) = &args.consumer
        && position.cursor != position.committed
        && !position.cursor.is_empty()
    {
        commit(&mut ops, name, &position.cursor).await?;
    }
    if !position.cursor.is_empty() {
        eprintln!("last cursor: {}", position.cursor);
    }
    ended
}

/// One call: writes each chunk's rows, then saves and commits its cursor.
async fn follow(
    ops: &mut Ops,
    req: pb::WatchReadingsRequest,
    args: &TailArgs,
    out: &mut dyn RowWriter,
    position: &mut Position,
) -> Result<(), StreamFailure> {
    let mut stream = ops
        .watch_readings(req)
        .await
        .map_err(StreamFailure::Status)?
        .into_inner();
    while let Some(chunk) = stream.message().await.map_err(StreamFailure::Status)? {
        write_chunk(&chunk, out).map_err(StreamFailure::Write)?;
        out.finish().map_err(StreamFailure::Write)?;
        position.cursor = chunk.cursor;
        if let Some(path) = &args.cursor_file {
            write_cursor(path, &position.cursor)
                .map_err(|e| StreamFailure::Write(std::io::Error::other(format!("{e:#}"))))?;
        }
        if let Some(name) = &args.consumer
            && position.last_commit.elapsed() >= args.commit_every
        {
            commit_status(ops, name, &position.cursor)
                .await
                .map_err(StreamFailure::Status)?;
            position.committed = position.cursor.clone();
            position.last_commit = Instant::now();
        }
    }
    Ok(())
}

fn write_chunk(chunk: &pb::ReadingsChunk, out: &mut dyn RowWriter) -> std::io::Result<()> {
    let Some(pb::readings_chunk::Data::Series(s)) = &chunk.data else {
        return Ok(());
    };
    let device = Value::Text(chunk.device_id.clone());
    let (sensor, unit) = (Value::Text(s.sensor.clone()), Value::Text(s.unit.clone()));
    let cursor = Value::Text(chunk.cursor.clone());
    for (i, (&t, &v)) in s.time_unix_nano.iter().zip(&s.value).enumerate() {
        out.row(&[
            device.clone(),
            sensor.clone(),
            unit.clone(),
            Value::Int(t as i64),
            Value::Text(utc_nanos(t as i64)),
            Value::Float(v),
            Value::Int(chunk.batch_sequence as i64),
            Value::Int(i64::from(chunk.first_index) + i as i64),
            cursor.clone(),
        ])?;
    }
    Ok(())
}

async fn consumer_exists(ops: &mut Ops, name: &str) -> anyhow::Result<bool> {
    let consumers = reply(
        ops.list_readings_consumers(pb::ListReadingsConsumersRequest {})
            .await,
    )?;
    Ok(consumers.consumers.iter().any(|c| c.name == name))
}

async fn commit_status(ops: &mut Ops, name: &str, cursor: &str) -> Result<(), tonic::Status> {
    ops.commit_readings_cursor(pb::CommitReadingsCursorRequest {
        consumer: name.to_owned(),
        cursor: cursor.to_owned(),
    })
    .await
    .map(drop)
}

async fn commit(ops: &mut Ops, name: &str, cursor: &str) -> anyhow::Result<()> {
    commit_status(ops, name, cursor)
        .await
        .map_err(status_error)
        .with_context(|| format!("committing consumer {name}'s cursor"))
}

/// The saved cursor, if the file exists.
fn read_cursor(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the cursor file {}", path.display())),
    }
}

/// Replaces the cursor file atomically, so a crash leaves either the old
/// cursor or the new one.
fn write_cursor(path: &Path, cursor: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{cursor}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("saving the cursor to {}", path.display()))
}

pub async fn consumers(args: ConsumersArgs) -> anyhow::Result<()> {
    match args.command {
        Some(ConsumersCommand::Delete { name, json, server }) => {
            server
                .call(async |ops| {
                    ops.delete_readings_consumer(pb::DeleteReadingsConsumerRequest {
                        consumer: name.clone(),
                    })
                    .await
                })
                .await?;
            Answer::stdout(json).one(
                &name,
                |name| serde_json::json!({ "consumer": name, "deleted": true }),
                |name| format!("deleted consumer {name}"),
            )?;
            Ok(())
        }
        None => {
            let list = args
                .server
                .call(async |ops| {
                    ops.list_readings_consumers(pb::ListReadingsConsumersRequest {})
                        .await
                })
                .await?;
            Answer::stdout(args.json).list(&list.consumers, consumer_json, consumers_table)?;
            Ok(())
        }
    }
}

fn consumer_json(c: &pb::ReadingsConsumer) -> serde_json::Value {
    serde_json::json!({
        "name": c.name,
        "position": c.position,
        "last_position": c.last_position,
        "lag_positions": c.lag_positions,
        "lag_seconds": c.lag_seconds,
        "updated_time_unix_nano": c.updated_time_unix_nano,
        "cursor": c.cursor,
    })
}

fn consumers_table(consumers: &[pb::ReadingsConsumer]) -> Table {
    Table::new([
        Column::left("CONSUMER"),
        Column::right("POSITION"),
        Column::right("LAG"),
        Column::right("LAG (S)"),
        Column::time("COMMITTED (UTC)"),
    ])
    .rows(consumers, |c| {
        [
            c.name.clone(),
            c.position.to_string(),
            c.lag_positions.to_string(),
            c.lag_seconds.map_or("-".to_owned(), |s| format!("{s:.1}")),
            time(c.updated_time_unix_nano),
        ]
    })
}
