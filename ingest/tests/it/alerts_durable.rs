//! Alerts are committed with the readings that cause them: a failed commit
//! leaves neither, what a rule remembers survives a restart, silences are
//! retried until recorded, and event ids have no gap. Both backends.

use std::time::Duration;

use crate::common::alert_helpers::*;
use crate::common::*;
use telemetry_proto::v1 as pb;
use tonic::Code;

backend_tests!(
    a_failed_commit_stores_neither_readings_nor_alerts,
    a_hold_survives_a_restart,
    rate_of_change_resumes_after_a_restart,
    inactivity_alerts_are_retried_until_recorded,
    concurrent_devices_get_gap_free_ids_in_order,
);

fn hot(for_millis: u64) -> pb::AlertRule {
    rule(
        "hot",
        "temperature",
        pb::Severity::Critical,
        above(100.0, 50.0, for_millis),
    )
}

/// Every stored event id, in order.
async fn ids_in_table(server: &TestServer) -> Vec<i64> {
    let n = server
        .storage
        .scalar("SELECT COUNT(*) FROM alert_events")
        .await;
    let max = server
        .storage
        .scalar("SELECT COALESCE(MAX(event_id), 0) FROM alert_events")
        .await;
    let min = server
        .storage
        .scalar("SELECT COALESCE(MIN(event_id), 1) FROM alert_events")
        .await;
    assert_eq!((min, max), (1, n), "event ids are 1..=n with no gap");
    (1..=n).collect()
}

async fn a_failed_commit_stores_neither_readings_nor_alerts(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    put(&mut server.ops().await, hot(0)).await;
    server.storage.install_insert_failure("alert_events").await;
    let mut client = server.ingest(&token).await;
    let t = now_nanos() - 60 * SEC;

    // The batch crosses the rule; recording its event fails, so the whole
    // group fails: the readings are not stored either, and the device is
    // told to retry.
    server.storage.set_insert_failure(true).await;
    let points = [(t, 150.0)];
    let failed = upload(
        &mut client,
        vec![batch(1, vec![series("temperature", "Cel", &points)])],
    )
    .await
    .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    assert_eq!(server.storage.count_readings().await, 0);
    assert_eq!(cursor(&mut client).await, 0);

    // The judgment made for the failed group was not kept: resent, the
    // same batch fires the alert, once.
    server.storage.set_insert_failure(false).await;
    let mut watcher = Watcher::from(&server, 0).await;
    let summary = upload(
        &mut client,
        vec![batch(1, vec![series("temperature", "Cel", &points)])],
    )
    .await
    .unwrap();
    assert_eq!(summary.committed_sequence, 1);
    let fired = watcher.event().await;
    assert_eq!(fired.kind(), pb::AlertEventKind::Fired);
    assert_eq!((fired.event_id, fired.value), (1, Some(150.0)));
    temperatures(&mut client, 2, t + SEC, &[0.0]).await;
    let resolved = watcher.event().await;
    assert_eq!(resolved.kind(), pb::AlertEventKind::Resolved);
    assert_eq!((resolved.event_id, resolved.alert_id), (2, fired.alert_id));
    assert!(watcher.until_quiet().await.is_empty());
    assert_eq!(server.storage.count_readings().await, 2);
    assert_eq!(ids_in_table(&server).await, vec![1, 2]);
}

async fn a_hold_survives_a_restart(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    put(&mut server.ops().await, hot(10_000)).await;
    let t = now_nanos() - 100 * SEC;
    // Past the fire value since t: the hold has begun, nothing fires yet.
    temperatures(&mut server.ingest(&token).await, 1, t, &[150.0]).await;

    let server = server.restart().await;
    let mut watcher = Watcher::from(&server, 0).await;
    let mut client = server.ingest(&token).await;
    assert!(watcher.until_quiet().await.is_empty());
    // Ten seconds later by the readings' clock: held long enough, as if the
    // server had never stopped.
    temperatures(&mut client, 2, t + 10 * SEC, &[150.0]).await;
    let fired = watcher.event().await;
    assert_eq!(fired.kind(), pb::AlertEventKind::Fired);
    assert_eq!(fired.time_unix_nano, t + 10 * SEC);
    assert!(fired.message.contains("for 10s"), "{}", fired.message);
}

async fn rate_of_change_resumes_after_a_restart(backend: Backend) {
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
    let t = now_nanos() - 200 * SEC;
    temperatures(&mut server.ingest(&token).await, 1, t, &[20.0]).await;

    let server = server.restart().await;
    let mut watcher = Watcher::from(&server, 0).await;
    // 30 degrees in a minute, measured against the reading stored before
    // the restart.
    temperatures(&mut server.ingest(&token).await, 2, t + 60 * SEC, &[50.0]).await;
    let fired = watcher.event().await;
    assert_eq!(fired.kind(), pb::AlertEventKind::Fired);
    assert_eq!(fired.value, Some(50.0));
}

async fn inactivity_alerts_are_retried_until_recorded(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    server.register("quiet-1").await;
    server.storage.install_insert_failure("alert_events").await;
    server.storage.set_insert_failure(true).await;
    let mut silent = rule(
        "silent",
        "",
        pb::Severity::Warning,
        pb::alert_rule::Condition::Inactivity(pb::InactivityCondition {
            silence_millis: 200,
        }),
    );
    silent.devices = Some(pb::DeviceSelector {
        selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
            device_ids: vec!["quiet-1".into()],
        })),
    });
    put(&mut server.ops().await, silent).await;
    // The silence is a matter of the server's clock: let it pass, and a
    // few of the engine's attempts (one per 100 ms) fail meanwhile.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        server
            .storage
            .scalar("SELECT COUNT(*) FROM alert_events")
            .await,
        0
    );

    let mut watcher = Watcher::from(&server, 0).await;
    server.storage.set_insert_failure(false).await;
    let fired = watcher.event().await;
    assert_eq!(fired.kind(), pb::AlertEventKind::Fired);
    assert_eq!((fired.event_id, fired.device_id.as_str()), (1, "quiet-1"));
    assert!(watcher.until_quiet().await.is_empty(), "recorded once");
}

async fn concurrent_devices_get_gap_free_ids_in_order(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    put(&mut server.ops().await, hot(0)).await;
    let mut watcher = Watcher::from(&server, 0).await;
    let t = now_nanos() - 1000 * SEC;
    let devices = 16;
    let rounds = 10u64;
    let mut tasks = Vec::new();
    for d in 0..devices {
        let token = server.register(&format!("dev-{d}")).await;
        let mut client = server.ingest(&token).await;
        tasks.push(tokio::spawn(async move {
            for seq in 1..=rounds {
                // Alternating: every batch is a FIRED or a RESOLVED.
                let v = if seq % 2 == 1 { 150.0 } else { 0.0 };
                temperatures(&mut client, seq, t + seq * SEC, &[v]).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let expected = devices * rounds as usize;
    let mut seen = Vec::new();
    while seen.len() < expected {
        seen.push(watcher.event().await.event_id);
    }
    let in_order: Vec<u64> = (1..=expected as u64).collect();
    assert_eq!(seen, in_order, "live ids in commit order, no gap");
    assert_eq!(ids_in_table(&server).await.len(), expected);
    assert!(watcher.until_quiet().await.is_empty(), "no duplicate");
}
