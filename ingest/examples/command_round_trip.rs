//! Measures the command round trip: `SendCommand(ping, wait)` until the
//! device's acknowledgement makes it ACKED, against a device of a running
//! fleet (device-sim holds a Control stream per device and answers pings).
//!
//! ```sh
//! cargo run --release -p ingest --example command_round_trip -- \
//!     --device sim-00001 --samples 300
//! ```
//!
//! A ping not ACKED within `--timeout` (no answer, an error, or another final
//! state) is counted LOST and the probe moves on; any lost ping makes the
//! exit code non-zero once the remaining pings are measured and reported.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
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
    /// The device to ping; it must be online.
    #[arg(long, default_value = "sim-00001")]
    device: String,
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Pause between commands.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// How long a ping may take to be ACKED before it counts as lost.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = std::fs::read_to_string(&args.ops_token_file).context("reading the ops token")?;
    let bearer = Bearer::new(&token)?;
    let channel = args.tls.connect(&args.server).await?;
    let mut ops = OpsClient::with_interceptor(channel, bearer);
    let mut round_trips = Vec::with_capacity(args.samples);
    let mut lost = Vec::new();
    for i in 0..args.samples {
        let started = Instant::now();
        let sent = ops.send_command(pb::SendCommandRequest {
            device_id: args.device.clone(),
            command: Some(pb::Command {
                kind: Some(pb::command::Kind::Ping(pb::Ping {})),
                ..Default::default()
            }),
            ttl_millis: 10_000,
            // The server answers by then; the client's timeout below, a
            // little longer, covers a server that does not.
            wait_millis: args.timeout.as_millis() as u64,
        });
        let failure = match tokio::time::timeout(args.timeout + Duration::from_secs(1), sent).await
        {
            Ok(Ok(command)) => {
                let command = command.into_inner();
                if command.state() == pb::CommandState::Acked {
                    round_trips.push(started.elapsed());
                    None
                } else {
                    Some(format!(
                        "command {} ended {:?}: is {} online?",
                        command.command_id,
                        command.state(),
                        args.device
                    ))
                }
            }
            Ok(Err(status)) => Some(format!("SendCommand failed: {}", status.message())),
            Err(_) => Some(format!("no answer within {:?}", args.timeout)),
        };
        if let Some(why) = failure {
            lost.push((i + 1, why));
        }
        tokio::time::sleep(args.interval).await;
    }
    round_trips.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let quantiles = if round_trips.is_empty() {
        "no ping acknowledged".to_owned()
    } else {
        let q = |p: f64| {
            round_trips
                [((round_trips.len() as f64 * p).ceil() as usize).clamp(1, round_trips.len()) - 1]
        };
        format!(
            "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            ms(q(0.50)),
            ms(q(0.90)),
            ms(q(0.99)),
            ms(q(1.0))
        )
    };
    println!(
        "command round trip over {} pings: {quantiles}  LOST {} of {} (timeout {:?})",
        round_trips.len(),
        lost.len(),
        args.samples,
        args.timeout
    );
    for (sample, why) in lost.iter().take(5) {
        eprintln!("lost ping {sample}: {why}");
    }
    if !lost.is_empty() {
        // The summary above is the report; an error's backtrace would only
        // bury it.
        eprintln!("{} of {} pings lost", lost.len(), args.samples);
        std::process::exit(1);
    }
    Ok(())
}
