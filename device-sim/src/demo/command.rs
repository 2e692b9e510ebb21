//! With `--local-server`: halfway through the run, tell every device to
//! sample twice as fast, and say what happened, so the one-command demo
//! shows a command going down, being acknowledged, and taking effect
//! (the readings per second on the progress line double).

use std::time::{Duration, Instant};

use anyhow::Context;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Sends the command to `device_ids` after `delay`.
pub fn start(
    url: String,
    ops_token: String,
    device_ids: Vec<String>,
    sample_rate: f64,
    delay: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        if let Err(error) = send(&url, &ops_token, &device_ids, sample_rate).await {
            eprintln!("demo command failed: {error:#}");
        }
    })
}

async fn send(
    url: &str,
    ops_token: &str,
    device_ids: &[String],
    sample_rate: f64,
) -> anyhow::Result<()> {
    let channel = Channel::from_shared(url.to_owned())?
        .connect()
        .await
        .context("connecting")?;
    let ops = OpsClient::with_interceptor(channel, Bearer::new(ops_token)?);
    let interval_ms = ((1000.0 / sample_rate) / 2.0).round().max(10.0) as u32;
    let started = Instant::now();
    let sends = device_ids.iter().map(|device_id| {
        let mut ops = ops.clone();
        let request = pb::SendCommandRequest {
            device_id: device_id.clone(),
            command: Some(pb::Command {
                kind: Some(pb::command::Kind::SetSamplingInterval(
                    pb::SetSamplingInterval { interval_ms },
                )),
                ..Default::default()
            }),
            ttl_millis: 30_000,
            wait_millis: 5_000,
        };
        async move { ops.send_command(request).await.map(|r| r.into_inner()) }
    });
    let results = futures::future::join_all(sends).await;
    let acked = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_ok_and(|c| c.state() == pb::CommandState::Acked)
        })
        .count();
    let detail = results
        .iter()
        .find_map(|r| r.as_ref().ok().map(|c| c.result.clone()))
        .unwrap_or_default();
    eprintln!(
        "command set-interval {interval_ms}ms sent to {} devices: {acked} acknowledged in {} ms (\"{detail}\"); \
         the fleet now samples twice as fast",
        device_ids.len(),
        started.elapsed().as_millis()
    );
    Ok(())
}
