//! Measures what hostile upload messages cost the server in memory: opens
//! `--streams` UploadReadings streams at once, each on its own connection,
//! each sending one message of `--message-bytes` built to be as expensive as
//! possible to decode, and reports the server's peak resident memory
//! (VmHWM from /proc, so run it against a freshly started server).
//!
//! ```sh
//! ingest serve --data-dir /tmp/d &
//! cargo run --release -p ingest --example hostile_memory -- \
//!     --ops-token-file /tmp/d/ops.token --server-pid $! --kind empty-series
//! ```
//!
//! Kinds, each the worst of its shape:
//! - `empty-series`: 2-byte empty `SensorSeries` entries, as many as fit;
//! - `tiny-series`: series of one reading each (unpacked), 22 bytes apiece;
//! - `unpacked-times`: one series whose timestamps and values are sent
//!   unpacked, 9 bytes per 8-byte element;
//! - `long-sensor`: one series whose sensor name fills the message.

use std::time::Instant;

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use telemetry_client::bearer::Bearer;
use telemetry_proto::raw::RawCodec;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ops_client::OpsClient;
use tonic::codegen::http::uri::PathAndQuery;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    EmptySeries,
    TinySeries,
    UnpackedTimes,
    LongSensor,
}

#[derive(Parser)]
struct Args {
    /// http://HOST:PORT, or https://HOST:PORT with --tls-ca.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    #[command(flatten)]
    tls: ingest::cli::tls_args::ClientTlsArgs,
    #[arg(long, default_value = "./data/ops.token")]
    ops_token_file: std::path::PathBuf,
    /// The server's process id, to read its peak resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Size of each message; the server's --max-message-bytes is the worst.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    message_bytes: usize,
    #[arg(long, value_enum, default_value = "empty-series")]
    kind: Kind,
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// One ReadingBatch of at most `size` bytes, shaped by `kind`.
fn message(kind: Kind, size: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(size);
    // sequence = 1
    buf.put_slice(&[0x08, 0x01]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    match kind {
        Kind::EmptySeries => {
            while buf.len() + 2 <= size {
                buf.put_slice(&[0x12, 0x00]);
            }
        }
        Kind::TinySeries => {
            // series { time_unix_nano: [now] (unpacked), value: [1.0] (unpacked) }
            let mut one = BytesMut::new();
            one.put_u8(0x19); // field 3, fixed64
            one.put_u64_le(now);
            one.put_u8(0x21); // field 4, fixed64 (double)
            one.put_f64_le(1.0);
            while buf.len() + 2 + one.len() <= size {
                buf.put_u8(0x12);
                put_varint(&mut buf, one.len() as u64);
                buf.put_slice(&one);
            }
        }
        Kind::UnpackedTimes => {
            let n = (size.saturating_sub(32)) / 18;
            let mut series = BytesMut::with_capacity(n * 18 + 8);
            series.put_slice(&[0x0a, 0x01, b't']);
            for i in 0..n {
                series.put_u8(0x19);
                series.put_u64_le(now + i as u64);
            }
            for _ in 0..n {
                series.put_u8(0x21);
                series.put_f64_le(1.0);
            }
            buf.put_u8(0x12);
            put_varint(&mut buf, series.len() as u64);
            buf.put_slice(&series);
        }
        Kind::LongSensor => {
            let n = size.saturating_sub(24);
            let mut series = BytesMut::with_capacity(n + 8);
            series.put_u8(0x0a);
            put_varint(&mut series, n as u64);
            series.put_bytes(b'a', n);
            buf.put_u8(0x12);
            put_varint(&mut buf, series.len() as u64);
            buf.put_slice(&series);
        }
    }
    buf.freeze()
}

fn peak_rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = std::fs::read_to_string(&args.ops_token_file).context("reading the ops token")?;
    let bearer = Bearer::new(&token)?;
    let channel = args.tls.connect(&args.server).await?;
    let mut ops = OpsClient::with_interceptor(channel, bearer);
    let device_id = format!("hostile-{}", std::process::id());
    let registered = ops
        .register_device(pb::RegisterDeviceRequest {
            device_id: device_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let device_bearer = Bearer::new(&registered.token)?;
    if let Some(pid) = args.server_pid
        && let Some((hwm, rss)) = peak_rss_kib(pid)
    {
        println!(
            "server before: peak {} MiB, resident {} MiB",
            hwm / 1024,
            rss / 1024
        );
    }

    let body = message(args.kind, args.message_bytes);
    println!(
        "kind {:?}: {} streams x {} bytes",
        args.kind,
        args.streams,
        body.len()
    );
    let started = Instant::now();
    let mut calls = Vec::new();
    for _ in 0..args.streams {
        let channel = args.tls.connect(&args.server).await?;
        let body = body.clone();
        let bearer = device_bearer.clone();
        calls.push(tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel)
                .max_encoding_message_size(usize::MAX)
                .max_decoding_message_size(64 * 1024 * 1024);
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unknown(e.to_string()))?;
            let mut request = tonic::Request::new(futures::stream::iter([body]));
            bearer.authorize(&mut request);
            grpc.client_streaming(
                request,
                PathAndQuery::from_static("/telemetry.v1.Ingest/UploadReadings"),
                RawCodec::<pb::UploadSummary>::default(),
            )
            .await
        }));
    }
    let mut codes = std::collections::BTreeMap::new();
    for call in calls {
        let outcome = call.await?;
        let key = match outcome {
            Ok(_) => "OK".to_owned(),
            Err(status) => format!("{:?}: {}", status.code(), status.message()),
        };
        *codes.entry(key).or_insert(0) += 1;
    }
    println!("answered in {:?}", started.elapsed());
    for (status, n) in codes {
        println!("  {n} x {status}");
    }
    if let Some(pid) = args.server_pid
        && let Some((hwm, rss)) = peak_rss_kib(pid)
    {
        let bound = 64 + 4 * args.streams as u64 * args.message_bytes as u64 / (1024 * 1024);
        println!(
            "server after: peak {} MiB (bound 64 + 4 x {} x message = {} MiB), resident {} MiB",
            hwm / 1024,
            args.streams,
            bound,
            rss / 1024
        );
    }
    Ok(())
}
