//! The readings feed's side of `bench/run` (step 8): WatchReadings through
//! the generated client, chunks discarded after counting their readings.
//!
//! ```sh
//! cargo run --release -p ingest --example feed_bench -- \
//!     --ops-token-file ./data/ops.token --backfill 10000000
//! ```
//!
//! Prints `key=value` lines, by mode:
//! - `--backfill N`: one watch from the earliest batch until it has N
//!   readings, `--repeat` times: `backfill_rows`, `backfill_seconds`,
//!   `backfill_rows_per_s` (the median);
//! - `--latency --for SECS`: one watch from now; for each chunk, the time
//!   from its batch's commit (the server's clock, which this machine
//!   shares) to its arrival: `latency_chunks`, `latency_p50_ms`,
//!   `latency_p99_ms`, `latency_max_ms`, `latency_rows`;
//! - `--watchers N --for SECS`: N watches from now, each on a connection
//!   of its own, counting what they receive: `watchers_rows` (all of them);
//! - `--idle N --for SECS`: N watches from the earliest batch that take one
//!   message and then nothing for SECS (slow clients held back by HTTP/2
//!   flow control): `idle_watchers`.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Parser;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ops_client::OpsClient;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    #[arg(long, default_value = "./data/ops.token")]
    ops_token_file: std::path::PathBuf,
    /// Read the feed from its earliest batch until this many readings.
    #[arg(long)]
    backfill: Option<u64>,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Measure commit-to-delivery latency on one watch from now.
    #[arg(long)]
    latency: bool,
    /// Watches from now that count what they receive.
    #[arg(long, default_value_t = 0)]
    watchers: usize,
    /// Watches from the earliest batch that read nothing.
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// How long --latency, --watchers and --idle watch.
    #[arg(long = "for", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

type Ops =
    OpsClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

async fn connect(args: &Args) -> anyhow::Result<Ops> {
    let text = std::fs::read_to_string(&args.ops_token_file)
        .with_context(|| format!("reading {}", args.ops_token_file.display()))?;
    let token = text.trim();
    let channel = tonic::transport::Endpoint::from_shared(args.server.clone())?
        .connect()
        .await?;
    Ok(OpsClient::with_interceptor(channel, Bearer::new(token)?)
        .max_decoding_message_size(16 * 1024 * 1024))
}

fn watch_from(start: pb::watch_readings_request::Start) -> pb::WatchReadingsRequest {
    pb::WatchReadingsRequest {
        start: Some(start),
        ..Default::default()
    }
}

fn readings(chunk: &pb::ReadingsChunk) -> u64 {
    match &chunk.data {
        Some(pb::readings_chunk::Data::Series(s)) => s.time_unix_nano.len() as u64,
        _ => 0,
    }
}

async fn backfill(args: &Args, want: u64) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for _ in 0..args.repeat.max(1) {
        let mut ops = connect(args).await?;
        let started = Instant::now();
        let mut stream = ops
            .watch_readings(watch_from(pb::watch_readings_request::Start::FromEarliest(
                true,
            )))
            .await?
            .into_inner();
        let mut rows = 0;
        while rows < want {
            let chunk = stream.message().await?.context("the watch ended")?;
            rows += readings(&chunk);
        }
        runs.push((started.elapsed().as_secs_f64(), rows));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (seconds, rows) = runs[runs.len() / 2];
    println!("backfill_rows={rows}");
    println!("backfill_seconds={seconds:.3}");
    println!("backfill_rows_per_s={:.0}", rows as f64 / seconds);
    Ok(())
}

async fn latency(args: &Args) -> anyhow::Result<()> {
    let mut ops = connect(args).await?;
    let mut stream = ops
        .watch_readings(watch_from(pb::watch_readings_request::Start::FromNow(true)))
        .await?
        .into_inner();
    let until = Instant::now() + args.duration;
    let mut millis = Vec::new();
    let mut rows = 0;
    while let Ok(message) = tokio::time::timeout_at(until.into(), stream.message()).await {
        let Some(chunk) = message? else { break };
        if chunk.committed_time_unix_nano == 0 {
            continue;
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_nanos() as f64;
        millis.push((now - chunk.committed_time_unix_nano as f64) / 1e6);
        rows += readings(&chunk);
    }
    millis.sort_by(f64::total_cmp);
    let at = |q: f64| {
        millis
            .get(((millis.len() as f64 * q) as usize).min(millis.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!("latency_chunks={}", millis.len());
    println!("latency_rows={rows}");
    println!("latency_p50_ms={:.2}", at(0.50));
    println!("latency_p99_ms={:.2}", at(0.99));
    println!(
        "latency_max_ms={:.2}",
        millis.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}

async fn watchers(args: &Args) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for _ in 0..args.watchers {
        let mut ops = connect(args).await?;
        let until = Instant::now() + args.duration;
        tasks.push(tokio::spawn(async move {
            let mut stream = ops
                .watch_readings(watch_from(pb::watch_readings_request::Start::FromNow(true)))
                .await?
                .into_inner();
            let mut rows = 0;
            while let Ok(message) = tokio::time::timeout_at(until.into(), stream.message()).await {
                let Some(chunk) = message? else { break };
                rows += readings(&chunk);
            }
            Ok::<_, anyhow::Error>(rows)
        }));
    }
    let mut rows = 0;
    for task in tasks {
        rows += task.await??;
    }
    println!("watchers_rows={rows}");
    Ok(())
}

async fn idle(args: &Args) -> anyhow::Result<()> {
    let mut held = Vec::new();
    for _ in 0..args.idle {
        let mut ops = connect(args).await?;
        let mut stream = ops
            .watch_readings(watch_from(pb::watch_readings_request::Start::FromEarliest(
                true,
            )))
            .await?
            .into_inner();
        stream.message().await?;
        held.push((ops, stream));
    }
    tokio::time::sleep(args.duration).await;
    println!("idle_watchers={}", held.len());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.idle > 0 {
        return idle(&args).await;
    }
    if let Some(want) = args.backfill {
        backfill(&args, want).await?;
    }
    if args.latency {
        latency(&args).await?;
    }
    if args.watchers > 0 {
        watchers(&args).await?;
    }
    Ok(())
}
