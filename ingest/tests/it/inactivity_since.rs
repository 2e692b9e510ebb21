//! Where an inactivity rule's silence starts: the latest of the device's
//! registration, its last reading, the rule's creation and the server's
//! start, named in the alert's message. A device registered after the rule
//! must not fire at once (issue 25).
//!
//! Timing is asserted on the server's clock (events carry its time; the
//! test runs on the same host), with short silences instead of sleeping a
//! real one.

use std::time::Duration;

use crate::common::alert_helpers::*;
use crate::common::*;
use telemetry_proto::v1 as pb;

backend_tests!(
    a_device_registered_after_the_rule_is_silent_from_its_registration,
    silence_counts_from_the_rule_then_from_the_server_start,
);

const SILENCE: Duration = Duration::from_millis(2000);
/// Longer than any silence here takes to be noticed and recorded.
const WITHIN: Duration = Duration::from_secs(20);

fn silent_rule() -> pb::AlertRule {
    rule(
        "silent",
        "",
        pb::Severity::Critical,
        pb::alert_rule::Condition::Inactivity(pb::InactivityCondition {
            silence_millis: SILENCE.as_millis() as u64,
        }),
    )
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// The next FIRED event (skipping others), checked to be `device`'s.
async fn next_fired(watcher: &mut Watcher, device: &str) -> pb::AlertEvent {
    loop {
        let event = watcher.event().await;
        if event.kind() == pb::AlertEventKind::Fired {
            assert_eq!(event.device_id, device);
            return event;
        }
    }
}

async fn open_alerts(server: &TestServer, device: &str) -> Vec<pb::Alert> {
    server
        .ops()
        .await
        .list_alerts(pb::ListAlertsRequest {
            device_ids: vec![device.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .alerts
}

async fn a_device_registered_after_the_rule_is_silent_from_its_registration(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let mut watcher = Watcher::from(&server, 0).await;
    put(&mut server.ops().await, silent_rule()).await;
    // The rule has watched for most of a silence before the device exists:
    // measured from the rule, the device would fire soon after registering.
    tokio::time::sleep(SILENCE * 3 / 5).await;
    let registered = server
        .ops()
        .await
        .register_device(pb::RegisterDeviceRequest {
            device_id: "late-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let created = registered.device.unwrap().created_time_unix_nano;
    let token = registered.token;

    // Past the moment a silence counted from the rule would have fired (and
    // a tick of the judge), but before one counted from the registration.
    let probe = created + nanos(SILENCE * 3 / 5);
    tokio::time::sleep(Duration::from_nanos(probe.saturating_sub(now_nanos()))).await;
    let alerts = open_alerts(&server, "late-1").await;
    if now_nanos() < created + nanos(SILENCE) {
        assert!(alerts.is_empty(), "fired before its silence: {alerts:?}");
    }

    let fired = next_fired(&mut watcher, "late-1").await;
    assert!(
        fired.time_unix_nano >= created + nanos(SILENCE),
        "fired {} ms after registering, before the silence of {SILENCE:?}",
        (fired.time_unix_nano - created) / 1_000_000
    );
    assert!(
        fired.message.starts_with("no reading of any sensor for ")
            && fired.message.ends_with(" since the device registered"),
        "{}",
        fired.message
    );

    // A reading resolves it; the next silence counts from that reading.
    let before_reading = now_nanos();
    temperatures(&mut server.ingest(&token).await, 1, before_reading, &[20.0]).await;
    let resolved = watcher.event().await;
    assert_eq!(resolved.kind(), pb::AlertEventKind::Resolved);
    // The reading that ended the silence is the resolved value, in the
    // event and in `alert_history` (docs/schema.md).
    assert_eq!(resolved.value, Some(20.0));
    let stored = server
        .storage
        .scalar(&format!(
            "SELECT COUNT(*) FROM alert_history WHERE alert_id = {} AND resolved_value = 20",
            resolved.alert_id
        ))
        .await;
    assert_eq!(
        stored, 1,
        "alert_history.resolved_value of an inactivity alert"
    );
    let fired = next_fired(&mut watcher, "late-1").await;
    assert!(fired.time_unix_nano >= before_reading + nanos(SILENCE));
    assert!(
        fired.message.ends_with(" since its last reading"),
        "{}",
        fired.message
    );
}

async fn silence_counts_from_the_rule_then_from_the_server_start(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let token = server.register("early-1").await;
    let mut watcher = Watcher::from(&server, 0).await;
    let before_rule = now_nanos();
    put(&mut server.ops().await, silent_rule()).await;
    let fired = next_fired(&mut watcher, "early-1").await;
    assert!(fired.time_unix_nano >= before_rule + nanos(SILENCE));
    assert!(
        fired.message.ends_with(" since the rule was created"),
        "{}",
        fired.message
    );
    // Resolved by a reading, which the next server process never sees.
    temperatures(&mut server.ingest(&token).await, 1, now_nanos(), &[20.0]).await;
    let last_event = watcher.event().await;
    assert_eq!(last_event.kind(), pb::AlertEventKind::Resolved);
    drop(watcher);

    let before_start = now_nanos();
    let server = server.restart().await;
    let mut watcher = Watcher::from(&server, last_event.event_id).await;
    let fired = next_fired(&mut watcher, "early-1").await;
    assert!(fired.time_unix_nano >= before_start + nanos(SILENCE));
    assert!(
        fired.message.ends_with(" since the server started"),
        "{}",
        fired.message
    );
    eventually("the alert is listed", WITHIN, async || {
        open_alerts(&server, "early-1").await.len() == 1
    })
    .await;
}
