//! Helpers of the alert tests: rules, uploads of temperatures, and a
//! watcher over WatchAlerts.

use std::time::Duration;

use telemetry_proto::v1 as pb;

use super::*;

pub async fn alert_server(backend: Backend) -> Option<TestServer> {
    TestServer::start_configured(backend, |config| {
        // A quick heartbeat tells a test that a stream has gone quiet.
        config.alerts.watch.heartbeat = Duration::from_millis(200);
    })
    .await
}

pub fn rule(
    id: &str,
    sensor: &str,
    severity: pb::Severity,
    condition: pb::alert_rule::Condition,
) -> pb::AlertRule {
    pb::AlertRule {
        rule_id: id.into(),
        devices: None,
        sensor: sensor.into(),
        severity: severity as i32,
        condition: Some(condition),
        warnings: Vec::new(),
    }
}

pub fn above(fire: f64, clear: f64, for_millis: u64) -> pb::alert_rule::Condition {
    pb::alert_rule::Condition::Threshold(pb::ThresholdCondition {
        direction: pb::threshold_condition::Direction::Above as i32,
        fire_value: fire,
        clear_value: clear,
        for_millis,
    })
}

/// `too-hot`: critical above 40 degrees at once, cleared below 35.
pub fn too_hot() -> pb::AlertRule {
    rule(
        "too-hot",
        "temperature",
        pb::Severity::Critical,
        above(40.0, 35.0, 0),
    )
}

pub async fn put(ops: &mut Ops, rule: pb::AlertRule) {
    ops.put_alert_rule(pb::PutAlertRuleRequest { rule: Some(rule) })
        .await
        .unwrap();
}

/// Uploads one batch of `temperature` readings, one second apart.
pub async fn temperatures(
    client: &mut Ingest,
    sequence: u64,
    start: u64,
    values: &[f64],
) -> pb::UploadSummary {
    let points: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| (start + i as u64 * SEC, v))
        .collect();
    upload(
        client,
        vec![batch(sequence, vec![series("temperature", "Cel", &points)])],
    )
    .await
    .unwrap()
}

pub struct Watcher(pub tonic::Streaming<pb::AlertEvent>);

impl Watcher {
    pub async fn open(server: &TestServer, request: pb::WatchAlertsRequest) -> Self {
        let stream = server
            .ops()
            .await
            .watch_alerts(request)
            .await
            .unwrap()
            .into_inner();
        Self(stream)
    }

    pub async fn from(server: &TestServer, after_event_id: u64) -> Self {
        Self::open(
            server,
            pb::WatchAlertsRequest {
                after_event_id,
                ..Default::default()
            },
        )
        .await
    }

    /// The next stream item, heartbeats included.
    pub async fn item(&mut self) -> pb::AlertEvent {
        tokio::time::timeout(Duration::from_secs(20), self.0.message())
            .await
            .expect("the watch stream went silent: not even a heartbeat")
            .unwrap()
            .expect("the watch stream ended")
    }

    /// The next event that is not a heartbeat.
    pub async fn event(&mut self) -> pb::AlertEvent {
        loop {
            let item = self.item().await;
            if item.kind() != pb::AlertEventKind::Heartbeat {
                return item;
            }
        }
    }

    /// Events until the stream goes quiet (a heartbeat).
    pub async fn until_quiet(&mut self) -> Vec<pb::AlertEvent> {
        let mut events = Vec::new();
        loop {
            let item = self.item().await;
            if item.kind() == pb::AlertEventKind::Heartbeat {
                return events;
            }
            events.push(item);
        }
    }
}

pub fn kinds(events: &[pb::AlertEvent]) -> Vec<pb::AlertEventKind> {
    events.iter().map(|e| e.kind()).collect()
}

pub async fn stored_event_ids(server: &TestServer) -> Vec<u64> {
    let n = server
        .storage
        .scalar("SELECT COUNT(*) FROM alert_events")
        .await;
    let mut ids = Vec::new();
    let mut watcher = Watcher::from(server, 0).await;
    while (ids.len() as i64) < n {
        ids.push(watcher.event().await.event_id);
    }
    ids
}
