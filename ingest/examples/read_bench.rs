//! The read side of `bench/run` (step 7): QueryReadings through the
//! generated client against a server holding readings that `backfill` put
//! there, chunks discarded after counting their rows.
//!
//! ```sh
//! cargo run --release -p ingest --example read_bench -- \
//!     --ops-token-file ./big/ops.token --devices 1000 --span 365d
//! ```
//!
//! Prints `key=value` lines:
//! - `raw_rows`, `raw_seconds`, `raw_rows_per_s`: every stored reading of
//!   every device, one stream, `--repeat` times (the median);
//! - `first_chunk_p50_ms`, `first_chunk_p99_ms`: time to the first chunk of
//!   `--windows` random one-hour windows of one random device;
//! - `daily_p50_ms`, `daily_p99_ms`: one sensor's whole span in daily
//!   buckets (count, min, max, avg, last: the hourly rollup answers them),
//!   `--daily` queries.
//!
//! - `cancel_p50_ms`, `cancel_p99_ms` (with `--metrics URL`, the server's
//!   /metrics): from dropping an export after its first chunk to the
//!   server's `read_streams_open` falling back to zero, `--cancels` times.
//!
//! With `--readers N --for SECS`, instead: N clients (a connection each)
//! export everything over and over for SECS seconds, and it prints
//! `readers_rows_per_s` (all of them together). With `--chunk-interval`,
//! each reader takes one chunk per interval (a slow client, held back by
//! HTTP/2 flow control) and it prints `slow_readers_rows`.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rand::Rng;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ops_client::OpsClient;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    #[arg(long, default_value = "./data/ops.token")]
    ops_token_file: std::path::PathBuf,
    /// The devices `backfill` registered: PREFIX0000 .. (four digits).
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    #[arg(long, default_value = "backfill-")]
    prefix: String,
    /// How far back the readings go (as given to backfill).
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    span: Duration,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long, default_value_t = 100)]
    windows: usize,
    #[arg(long, default_value_t = 20)]
    daily: usize,
    /// The server's /metrics, to time cancels by.
    #[arg(long)]
    metrics: Option<String>,
    #[arg(long, default_value_t = 20)]
    cancels: usize,
    /// Concurrent exporting clients instead of the measurements.
    #[arg(long, default_value_t = 0)]
    readers: usize,
    /// How long the readers read.
    #[arg(long = "for", default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Each reader takes one chunk per interval.
    #[arg(long, value_parser = humantime::parse_duration)]
    chunk_interval: Option<Duration>,
}

type Ops =
    OpsClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

fn ids(devices: &[String]) -> Option<pb::DeviceSelector> {
    Some(pb::DeviceSelector {
        selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
            device_ids: devices.to_vec(),
        })),
    })
}

/// Rows of a whole stream, and the time to its first chunk.
async fn query(
    ops: &mut Ops,
    request: pb::QueryReadingsRequest,
) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let mut stream = ops.query_readings(request).await?.into_inner();
    let mut rows = 0u64;
    let mut first = None;
    while let Some(chunk) = stream.message().await? {
        first.get_or_insert_with(|| started.elapsed());
        rows += match chunk.data {
            Some(pb::readings_chunk::Data::Series(s)) => s.time_unix_nano.len() as u64,
            Some(pb::readings_chunk::Data::Buckets(b)) => b.bucket_start_unix_nano.len() as u64,
            Some(pb::readings_chunk::Data::Heartbeat(_)) | None => 0,
        };
    }
    Ok((rows, first.unwrap_or_else(|| started.elapsed())))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn connect(args: &Args, token: &str) -> anyhow::Result<Ops> {
    let channel = tonic::transport::Endpoint::from_shared(args.server.clone())?
        .connect()
        .await?;
    Ok(OpsClient::with_interceptor(channel, Bearer::new(token)?)
        .max_decoding_message_size(16 << 20))
}

/// `--readers`: each exports everything, again and again, until `for`
/// has passed; the rows all of them received.
async fn readers(
    args: &Args,
    token: &str,
    request: pb::QueryReadingsRequest,
) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + args.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.readers {
        let mut ops = connect(args, token).await?;
        let request = request.clone();
        let interval = args.chunk_interval;
        tasks.spawn(async move {
            let mut rows = 0u64;
            'again: loop {
                let mut stream = ops.query_readings(request.clone()).await?.into_inner();
                loop {
                    let next = tokio::time::timeout_at(deadline, stream.message()).await;
                    let Ok(next) = next else { break 'again };
                    let Some(chunk) = next? else { continue 'again };
                    if let Some(pb::readings_chunk::Data::Series(s)) = chunk.data {
                        rows += s.time_unix_nano.len() as u64;
                    }
                    if let Some(interval) = interval
                        && tokio::time::timeout_at(deadline, tokio::time::sleep(interval))
                            .await
                            .is_err()
                    {
                        break 'again;
                    }
                }
            }
            anyhow::Ok(rows)
        });
    }
    let mut total = 0;
    while let Some(rows) = tasks.join_next().await {
        total += rows??;
    }
    Ok(total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = std::fs::read_to_string(&args.ops_token_file)
        .with_context(|| format!("reading {}", args.ops_token_file.display()))?;
    let token = token.trim();
    let mut ops = connect(&args, token).await?;
    let devices: Vec<String> = (0..args.devices)
        .map(|i| format!("{}{i:04}", args.prefix))
        .collect();
    let end = now_nanos() + 3_600_000_000_000;
    let start = end - args.span.as_nanos() as u64 - 2 * 86_400_000_000_000;

    if args.readers > 0 {
        let everything = pb::QueryReadingsRequest {
            devices: ids(&devices),
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            ..Default::default()
        };
        let started = Instant::now();
        let rows = readers(&args, token, everything).await?;
        if args.chunk_interval.is_some() {
            println!("slow_readers_rows={rows}");
        } else {
            println!(
                "readers_rows_per_s={:.0}",
                rows as f64 / started.elapsed().as_secs_f64()
            );
        }
        return Ok(());
    }

    let mut raw = Vec::new();
    let mut rows = 0;
    for _ in 0..args.repeat.max(1) {
        let started = Instant::now();
        let (n, _) = query(
            &mut ops,
            pb::QueryReadingsRequest {
                devices: ids(&devices),
                start_time_unix_nano: start,
                end_time_unix_nano: end,
                ..Default::default()
            },
        )
        .await?;
        raw.push(started.elapsed());
        rows = n;
    }
    raw.sort();
    let median = raw[raw.len() / 2];
    println!("raw_rows={rows}");
    println!("raw_seconds={:.3}", median.as_secs_f64());
    println!("raw_rows_per_s={:.0}", rows as f64 / median.as_secs_f64());

    let mut rng = rand::rng();
    let hour = 3_600_000_000_000u64;
    let mut firsts = Vec::new();
    for _ in 0..args.windows.max(1) {
        let device = devices[rng.random_range(0..devices.len())].clone();
        let from = start + rng.random_range(0..(end - start) / hour) * hour;
        let (_, first) = query(
            &mut ops,
            pb::QueryReadingsRequest {
                devices: ids(&[device]),
                start_time_unix_nano: from,
                end_time_unix_nano: from + hour,
                ..Default::default()
            },
        )
        .await?;
        firsts.push(first);
    }
    firsts.sort();
    println!("first_chunk_p50_ms={:.2}", percentile(&firsts, 0.5));
    println!("first_chunk_p99_ms={:.2}", percentile(&firsts, 0.99));

    let day_aggregates = [
        pb::Aggregate::Count,
        pb::Aggregate::Min,
        pb::Aggregate::Max,
        pb::Aggregate::Avg,
        pb::Aggregate::Last,
    ];
    let mut daily = Vec::new();
    let mut buckets = 0;
    for _ in 0..args.daily.max(1) {
        let device = devices[rng.random_range(0..devices.len())].clone();
        let started = Instant::now();
        let (n, _) = query(
            &mut ops,
            pb::QueryReadingsRequest {
                devices: ids(&[device]),
                sensors: vec!["sensor-0".into()],
                // Whole UTC days, so every bucket comes from the rollup.
                start_time_unix_nano: start / (24 * hour) * (24 * hour),
                end_time_unix_nano: end.div_ceil(24 * hour) * (24 * hour),
                downsample: Some(pb::Downsample {
                    bucket: Some(pb::downsample::Bucket::Calendar(
                        pb::CalendarUnit::Day as i32,
                    )),
                    time_zone: String::new(),
                    aggregates: day_aggregates.iter().map(|a| *a as i32).collect(),
                }),
                ..Default::default()
            },
        )
        .await?;
        daily.push(started.elapsed());
        buckets = n;
    }
    daily.sort();
    println!("daily_buckets={buckets}");
    println!("daily_p50_ms={:.2}", percentile(&daily, 0.5));
    println!("daily_p99_ms={:.2}", percentile(&daily, 0.99));

    if let Some(url) = &args.metrics {
        let http = reqwest::Client::new();
        let mut cancels = Vec::new();
        for _ in 0..args.cancels.max(1) {
            wait_for_streams(&http, url, Instant::now()).await?;
            let mut stream = ops
                .query_readings(pb::QueryReadingsRequest {
                    devices: ids(&devices),
                    start_time_unix_nano: start,
                    end_time_unix_nano: end,
                    ..Default::default()
                })
                .await?
                .into_inner();
            stream.message().await?;
            drop(stream);
            let dropped = Instant::now();
            cancels.push(wait_for_streams(&http, url, dropped).await?);
        }
        cancels.sort();
        println!("cancel_p50_ms={:.2}", percentile(&cancels, 0.5));
        println!("cancel_p99_ms={:.2}", percentile(&cancels, 0.99));
    }
    Ok(())
}

/// Waits until the server has no QueryReadings stream open; the time
/// since `since`.
async fn wait_for_streams(
    http: &reqwest::Client,
    url: &str,
    since: Instant,
) -> anyhow::Result<Duration> {
    loop {
        let text = http.get(url).send().await?.text().await?;
        let open = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.split_once(' ')?;
                name.ends_with("read_streams_open")
                    .then(|| value.trim().parse::<f64>().ok())?
            })
            .context("no read_streams_open in /metrics")?;
        if open == 0.0 {
            return Ok(since.elapsed());
        }
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(10),
            "a stream stayed open 10 s after its client went away"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
