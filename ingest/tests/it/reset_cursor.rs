//! ResetUploadCursor and `ingest devices reset-cursor`: the repair for a
//! device whose committed sequence went so high (2^63-1, a firmware bug)
//! that every later batch is a duplicate. End to end on both backends.

use std::time::Duration;

use crate::common::alert_helpers::*;
use crate::common::*;
use telemetry_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

backend_tests!(
    a_device_stuck_at_the_maximum_uploads_again_after_a_reset,
    a_reset_to_n_skips_batches_up_to_n_and_stores_later_ones,
    batches_of_an_open_stream_meet_the_new_mark,
    resets_while_a_device_uploads_lose_no_batch,
    resent_batches_are_judged_by_the_alert_rules,
    unknown_and_malformed_devices_are_refused,
    a_sequence_above_the_maximum_is_refused,
    only_the_ops_token_may_reset,
    the_cli_resets_and_reports,
);

const MAX: u64 = i64::MAX as u64;

async fn reset(ops: &mut Ops, device: &str, to: u64) -> pb::ResetUploadCursorResponse {
    ops.reset_upload_cursor(pb::ResetUploadCursorRequest {
        device_id: device.into(),
        committed_sequence: to,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn stored_mark(server: &TestServer, device: &str) -> i64 {
    server
        .storage
        .scalar(&format!(
            "SELECT committed_sequence FROM devices WHERE device_id = '{device}'"
        ))
        .await
}

async fn a_device_stuck_at_the_maximum_uploads_again_after_a_reset(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("sim-0001").await;
    let mut device = server.ingest(&token).await;
    let mut ops = server.ops().await;

    let summary = upload(&mut device, vec![simple_batch(MAX, 2)])
        .await
        .unwrap();
    assert_eq!(
        (summary.batches_committed, summary.committed_sequence),
        (1, MAX)
    );
    // Stuck: every later batch is at or below the mark.
    let summary = upload(&mut device, vec![simple_batch(1, 3)]).await.unwrap();
    assert_eq!(
        (summary.batches_committed, summary.duplicate_batches),
        (0, 1)
    );
    assert_eq!(server.storage.count_readings().await, 2);

    let reply = reset(&mut ops, "sim-0001", 0).await;
    assert_eq!(reply.previous_committed_sequence, MAX);
    let after = reply.device.unwrap();
    assert_eq!(
        (after.device_id.as_str(), after.committed_sequence),
        ("sim-0001", 0)
    );
    assert_eq!(cursor(&mut device).await, 0);
    assert_eq!(stored_mark(&server, "sim-0001").await, 0);

    let summary = upload(&mut device, vec![simple_batch(1, 3), simple_batch(2, 3)])
        .await
        .unwrap();
    assert_eq!(summary.batches_received, 2);
    assert_eq!(summary.batches_committed, 2);
    assert_eq!(summary.duplicate_batches, 0);
    assert_eq!(summary.readings_accepted, 6);
    assert_eq!(summary.committed_sequence, 2);
    // What was stored before the reset stays.
    assert_eq!(server.storage.count_readings().await, 2 + 6);
    assert_eq!(stored_mark(&server, "sim-0001").await, 2);
    let got = ops
        .get_device(pb::GetDeviceRequest {
            device_id: "sim-0001".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.committed_sequence, 2);
}

async fn a_reset_to_n_skips_batches_up_to_n_and_stores_later_ones(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("sim-0002").await;
    let mut device = server.ingest(&token).await;
    let mut ops = server.ops().await;
    let ten: Vec<_> = (1..=10).map(|s| simple_batch(s, 1)).collect();
    upload(&mut device, ten).await.unwrap();

    // Down to the middle: 4 and 5 are duplicates, 6 and 7 stored again.
    let reply = reset(&mut ops, "sim-0002", 5).await;
    assert_eq!(reply.previous_committed_sequence, 10);
    assert_eq!(reply.device.unwrap().committed_sequence, 5);
    let again: Vec<_> = (4..=7).map(|s| simple_batch(s, 1)).collect();
    let summary = upload(&mut device, again).await.unwrap();
    assert_eq!(
        (
            summary.batches_committed,
            summary.duplicate_batches,
            summary.readings_accepted,
            summary.committed_sequence
        ),
        (2, 2, 2, 7)
    );
    assert_eq!(server.storage.count_readings().await, 10 + 2);

    // Up works the same way: batches up to 20 are now duplicates.
    let reply = reset(&mut ops, "sim-0002", 20).await;
    assert_eq!(reply.previous_committed_sequence, 7);
    let summary = upload(&mut device, vec![simple_batch(15, 1), simple_batch(21, 1)])
        .await
        .unwrap();
    assert_eq!(
        (
            summary.batches_committed,
            summary.duplicate_batches,
            summary.committed_sequence
        ),
        (1, 1, 21)
    );
    assert_eq!(server.storage.count_readings().await, 10 + 2 + 1);
    assert_eq!(stored_mark(&server, "sim-0002").await, 21);
}

/// A stream open across the reset: batches committed before it stay
/// committed, batches sent after it are compared with the new mark.
async fn batches_of_an_open_stream_meet_the_new_mark(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("sim-0003").await;
    let mut device = server.ingest(&token).await;
    let mut ops = server.ops().await;
    let (tx, rx) = mpsc::channel(16);
    let mut streaming = server.ingest(&token).await;
    let call = tokio::spawn(async move {
        streaming
            .upload_readings(ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner)
    });
    for s in 1..=5 {
        tx.send(simple_batch(s, 1)).await.unwrap();
    }
    eventually(
        "batches 1-5 committed",
        Duration::from_secs(20),
        async || cursor(&mut device).await >= 5,
    )
    .await;

    let reply = reset(&mut ops, "sim-0003", 100).await;
    assert_eq!(reply.previous_committed_sequence, 5);
    for s in [6, 7, 8, 101] {
        tx.send(simple_batch(s, 1)).await.unwrap();
    }
    drop(tx);
    let summary = call.await.unwrap().unwrap();
    assert_eq!(summary.batches_received, 9);
    assert_eq!(summary.batches_committed, 6);
    assert_eq!(summary.duplicate_batches, 3);
    assert_eq!(summary.committed_sequence, 101);
    assert_eq!(server.storage.count_readings().await, 6);
    assert_eq!(stored_mark(&server, "sim-0003").await, 101);
}

/// Resets racing a device's uploads neither fail nor lose a batch: each
/// lands between two group commits, and every batch is above whatever mark
/// it meets (the resets go to 0).
async fn resets_while_a_device_uploads_lose_no_batch(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("sim-0004").await;
    let mut ops = server.ops().await;
    const BATCHES: u64 = 200;
    let mut streaming = server.ingest(&token).await;
    let uploads = tokio::spawn(async move {
        let batches: Vec<_> = (1..=BATCHES).map(|s| simple_batch(s, 5)).collect();
        upload(&mut streaming, batches).await
    });
    let mut previous = Vec::new();
    while !uploads.is_finished() {
        previous.push(
            reset(&mut ops, "sim-0004", 0)
                .await
                .previous_committed_sequence,
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let summary = uploads.await.unwrap().unwrap();
    let resets = previous.len();
    assert!(resets > 0);
    // Each reset saw what the groups since the one before it committed:
    // nothing (0) or the latest of the stream's batches, always higher.
    let seen: Vec<u64> = previous.into_iter().filter(|&p| p > 0).collect();
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]) && seen.iter().all(|&p| p <= BATCHES),
        "{seen:?}"
    );
    assert_eq!(summary.batches_committed, BATCHES);
    assert_eq!(summary.duplicate_batches, 0);
    assert_eq!(summary.readings_accepted, BATCHES * 5);
    assert_eq!(server.storage.count_readings().await, (BATCHES * 5) as i64);
    let mark = stored_mark(&server, "sim-0004").await;
    assert!(
        (0..=BATCHES as i64).contains(&mark),
        "mark {mark} after {resets} resets"
    );
}

/// Batches stored again after a reset go through the alert rules like any
/// other: the alert the first upload opened is resolved by the resent one.
async fn resent_batches_are_judged_by_the_alert_rules(backend: Backend) {
    let Some(server) = alert_server(backend).await else {
        return;
    };
    let token = server.register("sim-0005").await;
    let mut ops = server.ops().await;
    put(&mut ops, too_hot()).await;
    let mut device = server.ingest(&token).await;
    let t = now_nanos() - 60 * SEC;
    temperatures(&mut device, MAX, t, &[50.0]).await;
    let alerts = |include_resolved| pb::ListAlertsRequest {
        include_resolved,
        ..Default::default()
    };
    let open = ops.list_alerts(alerts(false)).await.unwrap().into_inner();
    assert_eq!(open.alerts.len(), 1);

    reset(&mut ops, "sim-0005", 0).await;
    let summary = temperatures(&mut device, 1, t + SEC, &[30.0]).await;
    assert_eq!(summary.batches_committed, 1);
    let all = ops
        .list_alerts(alerts(true))
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(all.len(), 1);
    assert!(!all[0].open, "the resent 30.0 resolves the alert: {all:?}");
    assert_eq!(all[0].resolved_time_unix_nano, t + SEC);
}

async fn unknown_and_malformed_devices_are_refused(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    let missing = ops
        .reset_upload_cursor(pb::ResetUploadCursorRequest {
            device_id: "nope".into(),
            committed_sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("nope"), "{}", missing.message());

    let malformed = ops
        .reset_upload_cursor(pb::ResetUploadCursorRequest {
            device_id: "no spaces".into(),
            committed_sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
}

async fn a_sequence_above_the_maximum_is_refused(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("sim-0006").await;
    let mut device = server.ingest(&token).await;
    let mut ops = server.ops().await;
    upload(&mut device, vec![simple_batch(3, 1)]).await.unwrap();

    for too_big in [MAX + 1, u64::MAX] {
        let refused = ops
            .reset_upload_cursor(pb::ResetUploadCursorRequest {
                device_id: "sim-0006".into(),
                committed_sequence: too_big,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(
            refused.message().contains("committed_sequence")
                && refused.message().contains("9223372036854775807"),
            "{}",
            refused.message()
        );
    }
    assert_eq!(cursor(&mut device).await, 3);

    // The maximum itself is allowed.
    let reply = reset(&mut ops, "sim-0006", MAX).await;
    assert_eq!(reply.previous_committed_sequence, 3);
    assert_eq!(cursor(&mut device).await, MAX);
}

async fn only_the_ops_token_may_reset(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("sim-0007").await;
    let mut device = server.ingest(&token).await;
    upload(&mut device, vec![simple_batch(9, 1)]).await.unwrap();
    for bearer in [
        Bearer::new(&token).unwrap(),
        Bearer::new("wrong").unwrap(),
        Bearer::none(),
    ] {
        let refused = server
            .ops_with(bearer)
            .await
            .reset_upload_cursor(pb::ResetUploadCursorRequest {
                device_id: "sim-0007".into(),
                committed_sequence: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    assert_eq!(cursor(&mut device).await, 9);
}

// ---- the CLI -----------------------------------------------------------------

/// `ingest devices reset-cursor ARGS... --server URL`, with the ops token
/// from the environment, as an operator would run it.
async fn reset_cursor_cli(server: &TestServer, args: &[&str]) -> CliRun {
    let all: Vec<&str> = ["devices", "reset-cursor"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    server.operator_cli(&all).await
}

async fn the_cli_resets_and_reports(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("sim-0001").await;
    let mut device = server.ingest(&token).await;
    upload(&mut device, vec![simple_batch(MAX, 1)])
        .await
        .unwrap();

    let run = reset_cursor_cli(&server, &["sim-0001", "--to", "0"]).await;
    assert!(run.success, "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "sim-0001: committed sequence 9223372036854775807 -> 0\n"
    );
    assert_eq!(cursor(&mut device).await, 0);

    let run = reset_cursor_cli(&server, &["sim-0001", "--to", "42", "--json"]).await;
    assert!(run.success, "{}", run.stderr);
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["previous_committed_sequence"], 0);
    assert_eq!(json["device"]["device_id"], "sim-0001");
    assert_eq!(json["device"]["committed_sequence"], 42);
    assert_eq!(cursor(&mut device).await, 42);

    let run = reset_cursor_cli(&server, &["nope", "--to", "0"]).await;
    assert!(!run.success);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.contains("NotFound") && run.stderr.contains("nope"),
        "{}",
        run.stderr
    );

    let run = reset_cursor_cli(&server, &["sim-0001", "--to", "9223372036854775808"]).await;
    assert!(!run.success);
    assert!(
        run.stderr.contains("InvalidArgument") && run.stderr.contains("committed_sequence"),
        "{}",
        run.stderr
    );
    assert_eq!(cursor(&mut device).await, 42);
}
