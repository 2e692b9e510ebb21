//! Measures the command round trip: `SendCommand(ping, wait)` until the
//! device's acknowledgement makes it ACKED, against a device of a running
//! fleet (device-sim holds a Control stream per device and answers pings).
//!
//! ```sh
//! cargo run --release -p ingest --example command_round_trip -- \
//!     --device sim-00001 --samples 300
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ops_client::OpsClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    #[arg(long, default_value = "./data/ops.token")]
    ops_token_file: std::path::PathBuf,
    /// The device to ping; it must be online.
    #[arg(long, default_value = "sim-00001")]
    device: String,
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Pause between commands.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    interval: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = std::fs::read_to_string(&args.ops_token_file).context("reading the ops token")?;
    let header: MetadataValue<_> = format!("Bearer {}", token.trim()).parse()?;
    let channel = Channel::from_shared(args.server.clone())?.connect().await?;
    let mut ops = OpsClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", header.clone());
        Ok(r)
    });
    let mut round_trips = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let started = Instant::now();
        let command = ops
            .send_command(pb::SendCommandRequest {
                device_id: args.device.clone(),
                command: Some(pb::Command {
                    kind: Some(pb::command::Kind::Ping(pb::Ping {})),
                    ..Default::default()
                }),
                ttl_millis: 10_000,
                wait_millis: 5_000,
            })
            .await?
            .into_inner();
        anyhow::ensure!(
            command.state() == pb::CommandState::Acked,
            "command {} ended {:?}: is {} online?",
            command.command_id,
            command.state(),
            args.device
        );
        round_trips.push(started.elapsed());
        tokio::time::sleep(args.interval).await;
    }
    round_trips.sort();
    let q = |p: f64| {
        round_trips
            [((round_trips.len() as f64 * p).ceil() as usize).clamp(1, round_trips.len()) - 1]
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "command round trip over {} pings: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        round_trips.len(),
        ms(q(0.50)),
        ms(q(0.90)),
        ms(q(0.99)),
        ms(q(1.0))
    );
    Ok(())
}
