//! With `--anomalies`: alert rules that the injected anomalies trip, and a
//! watcher that prints each alert as it fires and resolves, so the demo
//! shows the whole loop. Installed on whatever server the fleet runs
//! against (the local one, or any other the ops token is good for); the
//! rules judge only the simulated devices (label `fleet=sim`), never a real
//! device on the same server.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use telemetry_client::balance::Transport;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::alert_rule::Condition;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::task::JoinHandle;

use super::registration::FLEET_LABEL;

/// Alert counts for the final report.
#[derive(Default)]
pub struct AlertCounts {
    pub fired: AtomicU64,
    pub resolved: AtomicU64,
}

fn rules() -> Vec<pb::AlertRule> {
    let threshold = |fire, clear| {
        Condition::Threshold(pb::ThresholdCondition {
            direction: pb::threshold_condition::Direction::Above as i32,
            fire_value: fire,
            clear_value: clear,
            for_millis: 0,
        })
    };
    let rate_of_change = |max_change_per_minute| {
        Condition::RateOfChange(pb::RateOfChangeCondition {
            max_change_per_minute,
        })
    };
    let silent_for_millis =
        |silence_millis| Condition::Inactivity(pb::InactivityCondition { silence_millis });
    // Every rule watches one sensor on every simulated device.
    let simulated = pb::DeviceSelector {
        selector: Some(pb::device_selector::Selector::Labels(pb::LabelMatch {
            labels: [FLEET_LABEL]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        })),
    };
    let rule = |rule_id: &str, sensor: &str, severity: pb::Severity, condition| pb::AlertRule {
        rule_id: rule_id.into(),
        devices: Some(simulated.clone()),
        sensor: sensor.into(),
        severity: severity as i32,
        condition: Some(condition),
        warnings: Vec::new(),
    };
    vec![
        // Spikes and drifts carry temperature far past its daily range.
        rule(
            "demo-too-hot",
            "temperature",
            pb::Severity::Critical,
            threshold(40.0, 35.0),
        ),
        // A pressure spike is a jump no weather makes.
        rule(
            "demo-pressure-jump",
            "pressure",
            pb::Severity::Warning,
            rate_of_change(600.0),
        ),
        // A dropout silences one sensor while the others go on.
        rule(
            "demo-humidity-silent",
            "humidity",
            pb::Severity::Warning,
            silent_for_millis(2000),
        ),
    ]
}

/// Installs the demo rules through `channel` (the fleet's, so TLS and
/// several servers work as for the devices) and starts printing alert
/// events to stderr.
pub async fn start(
    channel: &Transport,
    ops_token: &str,
) -> anyhow::Result<(Arc<AlertCounts>, JoinHandle<()>)> {
    let mut ops = OpsClient::with_interceptor(channel.clone(), Bearer::new(ops_token)?);
    let rules = rules();
    let rule_ids = rules.iter().map(|r| r.rule_id.clone()).collect();
    for rule in rules {
        let rule_id = rule.rule_id.clone();
        ops.put_alert_rule(pb::PutAlertRuleRequest { rule: Some(rule) })
            .await
            .map_err(|status| anyhow::anyhow!(crate::device::client::describe(&status)))
            .with_context(|| format!("installing alert rule {rule_id}"))?;
    }
    // Earlier runs' alerts are replayed first; only news is printed.
    let since = now_nanos();
    let counts = Arc::new(AlertCounts::default());
    let task = {
        let counts = counts.clone();
        tokio::spawn(async move {
            let request = pb::WatchAlertsRequest {
                after_event_id: 0,
                rule_ids,
                ..Default::default()
            };
            let Ok(response) = ops.watch_alerts(request).await else {
                return;
            };
            let mut events = response.into_inner();
            while let Ok(Some(e)) = events.message().await {
                if e.time_unix_nano < since {
                    continue;
                }
                let kind = match e.kind() {
                    pb::AlertEventKind::Fired => {
                        counts.fired.fetch_add(1, Ordering::Relaxed);
                        "FIRED   "
                    }
                    pb::AlertEventKind::Resolved => {
                        counts.resolved.fetch_add(1, Ordering::Relaxed);
                        "RESOLVED"
                    }
                    pb::AlertEventKind::Acked => "ACKED   ",
                    pb::AlertEventKind::Heartbeat | pb::AlertEventKind::Unspecified => continue,
                };
                let value = e.value.map_or(String::new(), |v| format!(" value={v:.2}"));
                // Over the progress line, when there is one.
                let clear = if std::io::stderr().is_terminal() {
                    "\r\x1b[K"
                } else {
                    ""
                };
                eprintln!(
                    "{clear}alert {kind} {:<8} {:<21} {} {}{value}  {}",
                    e.severity()
                        .as_str_name()
                        .trim_start_matches("SEVERITY_")
                        .to_lowercase(),
                    e.rule_id,
                    e.device_id,
                    e.sensor,
                    e.message
                );
            }
        })
    };
    Ok((counts, task))
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
