//! Measures alert latency: from a device sending a reading that crosses a
//! threshold to an operator's WatchAlerts stream receiving the event.
//!
//! Run it against a server under load (e.g. with device-sim uploading):
//!
//! ```sh
//! cargo run --release -p ingest --example alert_latency -- \
//!     --server http://127.0.0.1:50051 --ops-token-file ./data/ops.token --samples 400
//! ```
//!
//! It registers a probe device, installs a rule for it alone, and sends one
//! reading at a time, alternately far above and far below the threshold, so
//! every reading fires or resolves an alert. Prints p50/p90/p99/max.
//!
//! An event that has not arrived within `--timeout` is counted LOST and the
//! probe moves on: a probe that meets a fault reports it rather than wait
//! forever. Any lost sample makes the exit code non-zero, after the
//! remaining samples are measured and the summary is printed.
//! `--extra-rules 99` adds rules over the whole fleet, for the benchmark's
//! "100 active rules".

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
    /// Readings to send (each one an alert event).
    #[arg(long, default_value_t = 400)]
    samples: usize,
    /// Pause between readings.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Rules to install beside the probe's, over every device and the
    /// fleet's sensors, so the engine judges each reading against that many
    /// rules. Their thresholds are out of reach: they cost evaluation, not
    /// events. They are deleted at the end.
    #[arg(long, default_value_t = 0)]
    extra_rules: usize,
    /// How long to wait for a sample's upload and its event before counting
    /// it lost.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// A rule over all devices that never fires.
fn background_rule(i: usize) -> pb::AlertRule {
    const SENSORS: [&str; 4] = ["temperature", "humidity", "pressure", "battery"];
    pb::AlertRule {
        rule_id: format!("bench-background-{i:03}"),
        devices: None,
        sensor: SENSORS[i % SENSORS.len()].into(),
        severity: pb::Severity::Info as i32,
        condition: Some(pb::alert_rule::Condition::Threshold(
            pb::ThresholdCondition {
                direction: pb::threshold_condition::Direction::Above as i32,
                fire_value: 1e12 + i as f64,
                clear_value: 1e11,
                for_millis: 0,
            },
        )),
        warnings: Vec::new(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ops_token =
        std::fs::read_to_string(&args.ops_token_file).context("reading the ops token")?;
    let channel = args.tls.connect(&args.server).await?;
    let mut ops = OpsClient::with_interceptor(channel.clone(), Bearer::new(&ops_token)?);

    let probe = format!("latency-probe-{}", std::process::id());
    let token = ops
        .register_device(pb::RegisterDeviceRequest {
            device_id: probe.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .token;
    let rule_id = format!("{probe}-rule");
    let rule = pb::AlertRule {
        rule_id: rule_id.clone(),
        devices: Some(pb::DeviceSelector {
            selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
                device_ids: vec![probe.clone()],
            })),
        }),
        sensor: "probe".into(),
        severity: pb::Severity::Info as i32,
        condition: Some(pb::alert_rule::Condition::Threshold(
            pb::ThresholdCondition {
                direction: pb::threshold_condition::Direction::Above as i32,
                fire_value: 100.0,
                clear_value: 0.0,
                for_millis: 0,
            },
        )),
        warnings: Vec::new(),
    };
    ops.put_alert_rule(pb::PutAlertRuleRequest { rule: Some(rule) })
        .await?;
    for i in 0..args.extra_rules {
        ops.put_alert_rule(pb::PutAlertRuleRequest {
            rule: Some(background_rule(i)),
        })
        .await?;
    }

    // A watcher on its own connection, like an operator's; the rule is
    // new, so replaying from 0 yields nothing of it.
    let watch_channel = args.tls.connect(&args.server).await?;
    let mut watcher = OpsClient::with_interceptor(watch_channel, Bearer::new(&ops_token)?);
    let watch_request = |after_event_id| pb::WatchAlertsRequest {
        after_event_id,
        rule_ids: vec![rule_id.clone()],
        ..Default::default()
    };
    let mut events = Some(watcher.watch_alerts(watch_request(0)).await?.into_inner());
    let mut last_event_id = 0;

    let mut device = IngestClient::with_interceptor(channel, Bearer::new(&token)?);
    let mut latencies = Vec::with_capacity(args.samples);
    let mut lost = Vec::new();
    for i in 0..args.samples {
        let value = if i % 2 == 0 { 1000.0 } else { -1000.0 };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64;
        let batch = pb::ReadingBatch {
            sequence: i as u64 + 1,
            series: vec![pb::SensorSeries {
                sensor: "probe".into(),
                unit: String::new(),
                time_unix_nano: vec![now],
                value: vec![value],
            }],
        };
        if events.is_none() {
            // The watch broke on an earlier sample: resume after the last
            // event seen, so nothing is counted twice.
            events = watcher
                .watch_alerts(watch_request(last_event_id))
                .await
                .ok()
                .map(|r| r.into_inner());
        }
        let sent = Instant::now();
        let upload = device.upload_readings(tokio_stream::iter([batch]));
        let receive = async {
            let stream = events.as_mut().context("no watch stream")?;
            loop {
                let e = stream.message().await?.context("watch stream ended")?;
                if e.kind() == pb::AlertEventKind::Heartbeat {
                    continue;
                }
                last_event_id = e.event_id;
                // A late event of an earlier, lost sample is not this one's.
                if e.time_unix_nano == now {
                    return anyhow::Ok(sent.elapsed());
                }
            }
        };
        let (uploaded, latency) = tokio::join!(
            tokio::time::timeout(args.timeout, upload),
            tokio::time::timeout(args.timeout, receive)
        );
        let failure = match (uploaded, latency) {
            (Ok(Ok(_)), Ok(Ok(latency))) => {
                latencies.push(latency);
                None
            }
            (Err(_), _) => Some(format!("upload not acknowledged within {:?}", args.timeout)),
            (Ok(Err(status)), _) => Some(format!("upload failed: {}", status.message())),
            (_, Err(_)) => Some(format!("no event within {:?}", args.timeout)),
            (_, Ok(Err(e))) => {
                events = None;
                Some(format!("watch failed: {e:#}"))
            }
        };
        if let Some(why) = failure {
            lost.push((i + 1, why));
        }
        tokio::time::sleep(args.interval).await;
    }
    // A server that went away mid-run keeps its rules; the measurements
    // are still reported below.
    let rule_ids =
        std::iter::once(rule_id).chain((0..args.extra_rules).map(|i| background_rule(i).rule_id));
    for rule_id in rule_ids {
        if let Err(status) = ops
            .delete_alert_rule(pb::DeleteAlertRuleRequest {
                rule_id: rule_id.clone(),
            })
            .await
        {
            eprintln!("could not delete rule {rule_id}: {}", status.message());
            break;
        }
    }

    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let quantiles = if latencies.is_empty() {
        "no event arrived".to_owned()
    } else {
        let q = |p: f64| {
            latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
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
        "alert latency over {} events: {quantiles}  LOST {} of {} (timeout {:?})",
        latencies.len(),
        lost.len(),
        args.samples,
        args.timeout
    );
    for (sample, why) in lost.iter().take(5) {
        eprintln!("lost sample {sample}: {why}");
    }
    if !lost.is_empty() {
        // The summary above is the report; an error's backtrace would only
        // bury it.
        eprintln!("{} of {} alert samples lost", lost.len(), args.samples);
        std::process::exit(1);
    }
    Ok(())
}
