//! Backfills history through the real ingest path: registers devices and
//! uploads readings spread evenly over the past `--span`, as fast as the
//! server takes them. It fills a database for measuring reports over a month
//! of data, and measures the ingest rate of that backfill.
//!
//! ```sh
//! ingest serve --data-dir ./big --retention 35d &
//! cargo run --release -p ingest --example backfill -- \
//!     --ops-token-file ./big/ops.token --devices 100 --readings 50000000 --span 30d
//! ```
//!
//! Each device holds one upload stream and sends its batches in time order
//! (`--sensors` series of `--per-sensor` readings each); devices share
//! `--connections` HTTP/2 connections. Prints readings/s when done.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ingest_client::IngestClient;
use telemetry_proto::v1::ops_client::OpsClient;

#[derive(Parser)]
struct Args {
    /// http://HOST:PORT, or https://HOST:PORT with --tls-ca.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    #[command(flatten)]
    tls: ingest::cli::tls_args::ClientTlsArgs,
    #[arg(long, default_value = "./data/ops.token")]
    ops_token_file: std::path::PathBuf,
    #[arg(long, default_value_t = 100)]
    devices: usize,
    #[arg(long, default_value_t = 4)]
    sensors: usize,
    /// Readings in all, over all devices and sensors.
    #[arg(long, default_value_t = 1_000_000)]
    readings: u64,
    /// How far back the readings go.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    span: Duration,
    /// Readings per sensor per batch.
    #[arg(long, default_value_t = 250)]
    per_sensor: usize,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Prefix of the device ids; a second run with a new prefix adds devices.
    #[arg(long, default_value = "backfill-")]
    prefix: String,
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// A plausible signal: daily cycle plus a per-sensor offset and some wobble.
fn value(sensor: usize, t: u64) -> f64 {
    let day = (t % 86_400_000_000_000) as f64 / 86_400_000_000_000.0;
    let wobble = ((t / 1_000_000_007) % 1000) as f64 / 1000.0;
    20.0 + 10.0 * sensor as f64 + 5.0 * (day * std::f64::consts::TAU).sin() + wobble
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ops_token =
        std::fs::read_to_string(&args.ops_token_file).context("reading the ops token")?;
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(args.tls.connect(&args.server).await?);
    }
    let mut ops = OpsClient::with_interceptor(channels[0].clone(), Bearer::new(&ops_token)?);

    let per_device = args.readings / args.devices as u64;
    let per_sensor_total = per_device / args.sensors as u64;
    let end = now_nanos() - 60_000_000_000;
    let start = end - args.span.as_nanos() as u64;
    let step = (end - start) / per_sensor_total.max(1);
    println!(
        "{} devices x {} sensors x {per_sensor_total} readings, one every {:.1} s, from {} to {}",
        args.devices,
        args.sensors,
        step as f64 / 1e9,
        chrono::DateTime::from_timestamp_nanos(start as i64),
        chrono::DateTime::from_timestamp_nanos(end as i64),
    );

    let mut tokens = Vec::with_capacity(args.devices);
    for d in 0..args.devices {
        let reply = ops
            .register_device(pb::RegisterDeviceRequest {
                device_id: format!("{}{d:04}", args.prefix),
                ..Default::default()
            })
            .await
            .with_context(|| format!("registering device {d}"))?;
        tokens.push(reply.into_inner().token);
    }

    let started = Instant::now();
    let mut tasks = Vec::new();
    // Streams open a few at a time: a stream whose first batch waits
    // behind a thousand others' for longer than the server's
    // --upload-first-message-timeout is cut off.
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    for (d, token) in tokens.into_iter().enumerate() {
        let channel = channels[d % channels.len()].clone();
        let (sensors, per_sensor) = (args.sensors, args.per_sensor as u64);
        let open = open.clone();
        tasks.push(tokio::spawn(async move {
            let _open = open.acquire_owned().await?;
            let mut client = IngestClient::with_interceptor(channel, Bearer::new(&token)?)
                .max_encoding_message_size(64 * 1024 * 1024);
            // Batches are generated as the stream pulls them: memory stays
            // at a few batches whatever the total.
            let batches = (0..per_sensor_total.div_ceil(per_sensor)).map(move |b| {
                let first = b * per_sensor;
                let last = (first + per_sensor).min(per_sensor_total);
                let series = (0..sensors)
                    .map(|s| {
                        // Sensors are offset by a few ns so none share a time.
                        let times: Vec<u64> =
                            (first..last).map(|i| start + i * step + s as u64).collect();
                        pb::SensorSeries {
                            sensor: format!("sensor-{s}"),
                            unit: "Cel".into(),
                            value: times.iter().map(|&t| value(s, t)).collect(),
                            time_unix_nano: times,
                        }
                    })
                    .collect();
                pb::ReadingBatch {
                    sequence: b + 1,
                    series,
                }
            });
            let summary = client
                .upload_readings(tokio_stream::iter(batches))
                .await?
                .into_inner();
            anyhow::Ok(summary.readings_accepted)
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await??;
    }
    let elapsed = started.elapsed();
    println!(
        "accepted {accepted} readings in {:.1} s: {:.0} readings/s",
        elapsed.as_secs_f64(),
        accepted as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
