//! Alert rules, the alert lifecycle and WatchAlerts, end to end on both
//! backends.

use std::time::Duration;

use crate::common::alert_helpers::*;
use crate::common::*;
use telemetry_proto::v1 as pb;
use tonic::Code;

backend_tests!(
    threshold_fires_and_resolves_before_the_summary,
    values_inside_the_hysteresis_band_do_not_flap,
    threshold_hold_time_uses_reading_timestamps,
    rate_of_change_fires_and_resolves,
    inactivity_fires_with_no_traffic_at_all,
    replay_then_live_has_no_gap_and_no_duplicate_during_ingest,
    a_slow_watcher_catches_up_from_storage,
    many_watchers_see_the_same_events,
    open_alerts_and_event_ids_survive_a_restart,
    invalid_rules_are_refused_with_a_reason,
    watchers_need_the_ops_token,
    acknowledging_an_alert,
    deleting_a_rule_resolves_its_alerts,
    filters_select_events,
);

async fn threshold_fires_and_resolves_before_the_summary(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut ops = server.ops().await;
    put(&mut ops, too_hot()).await;
    let mut watcher = Watcher::from(&server, 0).await;
    let mut client = server.ingest(&token).await;
    let t = now_nanos() - 60 * SEC;
    temperatures(&mut client, 1, t, &[30.0, 41.0, 45.0, 38.0, 34.0]).await;

    // Recorded before the summary: visible as soon as upload returns.
    let alerts = ops
        .list_alerts(pb::ListAlertsRequest {
            include_resolved: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(alerts.len(), 1);
    assert!(!alerts[0].open);
    assert_eq!(alerts[0].fired_value, Some(41.0));

    let fired = watcher.event().await;
    assert_eq!(fired.kind(), pb::AlertEventKind::Fired);
    assert_eq!(
        (
            fired.rule_id.as_str(),
            fired.device_id.as_str(),
            fired.sensor.as_str()
        ),
        ("too-hot", "dev-1", "temperature")
    );
    assert_eq!(fired.severity(), pb::Severity::Critical);
    assert_eq!(fired.value, Some(41.0));
    assert_eq!(fired.time_unix_nano, t + SEC);
    let resolved = watcher.event().await;
    assert_eq!(resolved.kind(), pb::AlertEventKind::Resolved);
    assert_eq!(resolved.value, Some(34.0));
    assert_eq!(resolved.alert_id, fired.alert_id);
    assert!(resolved.event_id > fired.event_id);
    assert!(watcher.until_quiet().await.is_empty());
}

async fn values_inside_the_hysteresis_band_do_not_flap(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    put(
        &mut server.ops().await,
        rule(
            "hot",
            "temperature",
            pb::Severity::Warning,
            above(40.0, 35.0, 0),
        ),
    )
    .await;
    let mut watcher = Watcher::from(&server, 0).await;
    let mut client = server.ingest(&token).await;
    let t = now_nanos() - 100 * SEC;
    let flapping: Vec<f64> = (0..60)
        .map(|i| if i % 2 == 0 { 41.0 } else { 36.0 })
        .collect();
    temperatures(&mut client, 1, t, &flapping).await;
    let events = watcher.until_quiet().await;
    assert_eq!(
        kinds(&events),
        vec![pb::AlertEventKind::Fired],
        "one alert, no flapping"
    );
}

async fn threshold_hold_time_uses_reading_timestamps(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    put(
        &mut server.ops().await,
        rule(
            "hot-10s",
            "temperature",
            pb::Severity::Warning,
            above(40.0, 35.0, 10_000),
        ),
    )
    .await;
    let mut watcher = Watcher::from(&server, 0).await;
    let mut client = server.ingest(&token).await;
    let t = now_nanos() - 200 * SEC;
    // Above for 9 s, a dip, then above again for 9 s: never 10 s in a row.
    let mut values = vec![41.0; 10];
    values.push(39.0);
    values.extend([41.0; 10]);
    temperatures(&mut client, 1, t, &values).await;
    assert!(watcher.until_quiet().await.is_empty());
    // One more second above: 10 s held.
    temperatures(&mut client, 2, t + 21 * SEC, &[41.0]).await;
    let fired = watcher.event().await;
    assert_eq!(fired.kind(), pb::AlertEventKind::Fired);
    assert_eq!(fired.time_unix_nano, t + 21 * SEC);
}

async fn rate_of_change_fires_and_resolves(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let condition = pb::alert_rule::Condition::RateOfChange(pb::RateOfChangeCondition {
        max_change_per_minute: 6.0,
    });
    put(
        &mut server.ops().await,
        rule("jump", "temperature", pb::Severity::Info, condition),
    )
    .await;
    let mut watcher = Watcher::from(&server, 0).await;
    let mut client = server.ingest(&token).await;
    let t = now_nanos() - 100 * SEC;
    // Readings 1 s apart: 0.05/s = 3/min is fine; a 1-degree step is 60/min.
    temperatures(&mut client, 1, t, &[20.0, 20.05, 20.1, 21.1, 21.15, 21.2]).await;
    let events = watcher.until_quiet().await;
    assert_eq!(
        kinds(&events),
        vec![pb::AlertEventKind::Fired, pb::AlertEventKind::Resolved]
    );
    assert_eq!(events[0].value, Some(21.1));
}

async fn inactivity_fires_with_no_traffic_at_all(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let token = server.register("quiet-1").await;
    server.register("other").await;
    let mut condition = rule(
        "silent",
        "",
        pb::Severity::Critical,
        pb::alert_rule::Condition::Inactivity(pb::InactivityCondition {
            silence_millis: 300,
        }),
    );
    condition.devices = Some(pb::DeviceSelector {
        selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
            device_ids: vec!["quiet-1".into()],
        })),
    });
    let mut watcher = Watcher::from(&server, 0).await;
    put(&mut server.ops().await, condition).await;
    // Nothing is sent; the server's clock decides.
    let fired = watcher.event().await;
    assert_eq!(fired.kind(), pb::AlertEventKind::Fired);
    assert_eq!(fired.device_id, "quiet-1", "only the selected device");
    assert_eq!(fired.value, None);
    assert!(fired.message.contains("no reading"), "{}", fired.message);
    // A reading ends the silence.
    let mut client = server.ingest(&token).await;
    temperatures(&mut client, 1, now_nanos(), &[20.0]).await;
    let resolved = watcher.event().await;
    assert_eq!(resolved.kind(), pb::AlertEventKind::Resolved);
    assert_eq!(resolved.alert_id, fired.alert_id);
}

async fn replay_then_live_has_no_gap_and_no_duplicate_during_ingest(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    put(
        &mut server.ops().await,
        rule(
            "hot",
            "temperature",
            pb::Severity::Warning,
            above(40.0, 35.0, 0),
        ),
    )
    .await;
    let mut devices = Vec::new();
    for d in 0..4 {
        devices.push(
            server
                .ingest(&server.register(&format!("dev-{d}")).await)
                .await,
        );
    }
    let t = now_nanos() - 300 * SEC;
    // Every batch fires and resolves once: two events.
    let ingest = tokio::spawn(async move {
        for seq in 1..=25u64 {
            for client in devices.iter_mut() {
                temperatures(client, seq, t + seq * 10 * SEC, &[50.0, 30.0]).await;
            }
        }
    });
    // Watchers join while events are being produced, from the start and
    // from a cursor.
    let mut from_start = Watcher::from(&server, 0).await;
    let first = from_start.event().await;
    let mut from_cursor = Watcher::from(&server, first.event_id + 3).await;
    ingest.await.unwrap();

    let expected = stored_event_ids(&server).await;
    assert_eq!(expected.len(), 4 * 25 * 2);
    let mut seen = vec![first.event_id];
    while seen.len() < expected.len() {
        seen.push(from_start.event().await.event_id);
    }
    assert_eq!(seen, expected, "every event once, in order");
    assert!(from_start.until_quiet().await.is_empty());
    let mut seen = Vec::new();
    while seen.len() < expected.len() - 4 {
        seen.push(from_cursor.event().await.event_id);
    }
    assert_eq!(seen, expected[4..].to_vec());
}

async fn a_slow_watcher_catches_up_from_storage(backend: Backend) {
    let Some(server) = TestServer::start_configured(backend, |config| {
        config.alerts.live_buffer = 4;
        config.alerts.watch.buffer = 2;
        config.alerts.watch.heartbeat = Duration::from_millis(200);
    })
    .await
    else {
        return;
    };
    put(
        &mut server.ops().await,
        rule(
            "hot",
            "temperature",
            pb::Severity::Warning,
            above(40.0, 35.0, 0),
        ),
    )
    .await;
    let token = server.register("dev-1").await;
    let mut slow = Watcher::from(&server, 0).await;
    let mut client = server.ingest(&token).await;
    let t = now_nanos() - 300 * SEC;
    // 100 events while the watcher reads nothing: far past its buffers.
    let values: Vec<f64> = (0..100)
        .map(|i| if i % 2 == 0 { 50.0 } else { 30.0 })
        .collect();
    let summary = temperatures(&mut client, 1, t, &values).await;
    assert_eq!(
        summary.readings_accepted, 100,
        "ingest was not held up by the watcher"
    );
    let expected = stored_event_ids(&server).await;
    assert_eq!(expected.len(), 100);
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        seen.push(slow.event().await.event_id);
    }
    assert_eq!(seen, expected);
}

async fn many_watchers_see_the_same_events(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    put(
        &mut server.ops().await,
        rule(
            "hot",
            "temperature",
            pb::Severity::Warning,
            above(40.0, 35.0, 0),
        ),
    )
    .await;
    let token = server.register("dev-1").await;
    let mut watchers = Vec::new();
    for _ in 0..20 {
        watchers.push(Watcher::from(&server, 0).await);
    }
    let mut client = server.ingest(&token).await;
    temperatures(
        &mut client,
        1,
        now_nanos() - 100 * SEC,
        &[50.0, 30.0, 50.0, 30.0, 50.0],
    )
    .await;
    let expected = stored_event_ids(&server).await;
    assert_eq!(expected.len(), 5);
    for mut w in watchers {
        let mut seen = Vec::new();
        while seen.len() < 5 {
            seen.push(w.event().await.event_id);
        }
        assert_eq!(seen, expected);
    }
}

async fn open_alerts_and_event_ids_survive_a_restart(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    put(
        &mut server.ops().await,
        rule(
            "hot",
            "temperature",
            pb::Severity::Warning,
            above(40.0, 35.0, 0),
        ),
    )
    .await;
    let token = server.register("dev-1").await;
    let t = now_nanos() - 100 * SEC;
    temperatures(&mut server.ingest(&token).await, 1, t, &[50.0]).await;
    let fired = Watcher::from(&server, 0).await.event().await;

    let server = server.restart().await;
    let mut watcher = Watcher::from(&server, fired.event_id).await;
    let mut client = server.ingest(&token).await;
    temperatures(&mut client, 2, t + 10 * SEC, &[55.0]).await;
    assert!(
        watcher.until_quiet().await.is_empty(),
        "still open: not fired twice"
    );
    let open = server
        .ops()
        .await
        .list_alerts(pb::ListAlertsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(open.len(), 1, "the open alert did not vanish");
    assert_eq!(open[0].alert_id, fired.alert_id);
    temperatures(&mut client, 3, t + 20 * SEC, &[30.0]).await;
    let resolved = watcher.event().await;
    assert_eq!(resolved.kind(), pb::AlertEventKind::Resolved);
    assert_eq!(resolved.alert_id, fired.alert_id);
    assert!(resolved.event_id > fired.event_id);
}

async fn invalid_rules_are_refused_with_a_reason(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    let cases = [
        (
            rule("r", "t", pb::Severity::Unspecified, above(40.0, 35.0, 0)),
            "severity",
        ),
        (
            rule("r", "t", pb::Severity::Info, above(40.0, 45.0, 0)),
            "wrong side",
        ),
        (
            rule(
                "r",
                "t",
                pb::Severity::Info,
                pb::alert_rule::Condition::RateOfChange(pb::RateOfChangeCondition {
                    max_change_per_minute: 0.0,
                }),
            ),
            "greater than 0",
        ),
        (
            rule(
                "r",
                "",
                pb::Severity::Info,
                pb::alert_rule::Condition::Inactivity(pb::InactivityCondition {
                    silence_millis: 0,
                }),
            ),
            "at least 100 ms",
        ),
        (
            rule("r", "", pb::Severity::Info, above(40.0, 35.0, 0)),
            "needs a sensor",
        ),
        (
            rule("bad id", "t", pb::Severity::Info, above(40.0, 35.0, 0)),
            "rule id",
        ),
        (
            pb::AlertRule {
                rule_id: "r".into(),
                severity: pb::Severity::Info as i32,
                sensor: "t".into(),
                ..Default::default()
            },
            "condition",
        ),
    ];
    for (rule, reason) in cases {
        let status = ops
            .put_alert_rule(pb::PutAlertRuleRequest { rule: Some(rule) })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains(reason),
            "{:?} lacks {reason:?}",
            status.message()
        );
    }
    assert!(
        ops.list_alert_rules(pb::ListAlertRulesRequest {})
            .await
            .unwrap()
            .into_inner()
            .rules
            .is_empty()
    );
}

async fn watchers_need_the_ops_token(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let device = server.register("dev-1").await;
    for bearer in [Bearer::none(), Bearer::new(&device).unwrap()] {
        let status = server
            .ops_with(bearer)
            .await
            .watch_alerts(pb::WatchAlertsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
}

async fn acknowledging_an_alert(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    put(
        &mut ops,
        rule(
            "hot",
            "temperature",
            pb::Severity::Warning,
            above(40.0, 35.0, 0),
        ),
    )
    .await;
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    let t = now_nanos() - 100 * SEC;
    temperatures(&mut client, 1, t, &[50.0]).await;
    let mut watcher = Watcher::from(&server, 0).await;
    let fired = watcher.event().await;

    let acked = ops
        .ack_alert(pb::AckAlertRequest {
            alert_id: fired.alert_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(acked.acked && acked.open);
    let event = watcher.event().await;
    assert_eq!(event.kind(), pb::AlertEventKind::Acked);
    assert_eq!(event.alert_id, fired.alert_id);
    // Again: nothing new.
    ops.ack_alert(pb::AckAlertRequest {
        alert_id: fired.alert_id,
    })
    .await
    .unwrap();
    assert!(watcher.until_quiet().await.is_empty());

    temperatures(&mut client, 2, t + SEC, &[30.0]).await;
    assert_eq!(watcher.event().await.kind(), pb::AlertEventKind::Resolved);
    let status = ops
        .ack_alert(pb::AckAlertRequest {
            alert_id: fired.alert_id,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = ops
        .ack_alert(pb::AckAlertRequest { alert_id: 999_999 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

async fn deleting_a_rule_resolves_its_alerts(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    put(
        &mut ops,
        rule(
            "hot",
            "temperature",
            pb::Severity::Warning,
            above(40.0, 35.0, 0),
        ),
    )
    .await;
    let token = server.register("dev-1").await;
    temperatures(
        &mut server.ingest(&token).await,
        1,
        now_nanos() - 10 * SEC,
        &[50.0],
    )
    .await;
    let mut watcher = Watcher::from(&server, 0).await;
    assert_eq!(watcher.event().await.kind(), pb::AlertEventKind::Fired);
    ops.delete_alert_rule(pb::DeleteAlertRuleRequest {
        rule_id: "hot".into(),
    })
    .await
    .unwrap();
    let resolved = watcher.event().await;
    assert_eq!(resolved.kind(), pb::AlertEventKind::Resolved);
    assert!(resolved.message.contains("deleted"));
    let status = ops
        .delete_alert_rule(pb::DeleteAlertRuleRequest {
            rule_id: "hot".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

async fn filters_select_events(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    put(
        &mut ops,
        rule(
            "warm",
            "temperature",
            pb::Severity::Info,
            above(30.0, 25.0, 0),
        ),
    )
    .await;
    put(
        &mut ops,
        rule(
            "hot",
            "temperature",
            pb::Severity::Critical,
            above(40.0, 35.0, 0),
        ),
    )
    .await;
    let a = server.register("dev-a").await;
    let b = server.register("dev-b").await;
    let t = now_nanos() - 10 * SEC;
    temperatures(&mut server.ingest(&a).await, 1, t, &[50.0]).await;
    temperatures(&mut server.ingest(&b).await, 1, t, &[50.0]).await;
    let mut critical_of_b = Watcher::open(
        &server,
        pb::WatchAlertsRequest {
            min_severity: pb::Severity::Critical as i32,
            device_ids: vec!["dev-b".into()],
            ..Default::default()
        },
    )
    .await;
    let events = critical_of_b.until_quiet().await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].rule_id.as_str(), events[0].device_id.as_str()),
        ("hot", "dev-b")
    );
    let mut warm_only = Watcher::open(
        &server,
        pb::WatchAlertsRequest {
            rule_ids: vec!["warm".into()],
            ..Default::default()
        },
    )
    .await;
    let events = warm_only.until_quiet().await;
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.rule_id == "warm"));
}
