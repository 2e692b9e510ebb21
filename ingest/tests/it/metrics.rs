//! The admin listener: /healthz, /readyz and /metrics, with the figures the
//! calls made add up to.

use std::time::Duration;

use crate::common::control::{hello, open_control};
use crate::common::*;
use telemetry_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

backend_tests!(
    probes_answer,
    readings_add_up_by_outcome,
    calls_count_under_their_real_code_when_they_end,
);

async fn probes_answer(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    assert_eq!(server.admin("/healthz").await, (200, "ok\n".into()));
    assert_eq!(server.admin("/readyz").await, (200, "ready\n".into()));
    assert_eq!(server.admin("/nope").await.0, 404);
    let metrics = server.metrics().await;
    for name in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
        "ingest_writer_queue_capacity",
    ] {
        assert!(
            metrics.get(name, &[]).is_some(),
            "{name} missing from\n{metrics}"
        );
    }
    assert!(metrics.sum("process_resident_memory_bytes", &[]) > 1e6);
    assert!(metrics.sum("ingest_writer_queue_capacity", &[]) >= 1.0);
}

async fn readings_add_up_by_outcome(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    let now = now_nanos();
    let good = series("temperature", "Cel", &[(now, 1.0), (now - 1, 2.0)]);
    let bad = series(
        "humidity",
        "%",
        &[(now, f64::NAN), (now, 3.0), (now + 3_600_000_000_000, 4.0)],
    );
    let first = upload(&mut client, vec![batch(1, vec![good.clone(), bad])])
        .await
        .unwrap();
    assert_eq!(first.readings_accepted, 3);
    assert_eq!(first.readings_rejected, 2);
    // The same batch again: a duplicate, committed once.
    let again = upload(&mut client, vec![batch(1, vec![good.clone()])])
        .await
        .unwrap();
    assert_eq!(again.duplicate_batches, 1);
    let sent = 5 + 2;

    let metrics = server.metrics().await;
    let total = metrics.sum("ingest_readings_total", &[]);
    assert_eq!(total, sent as f64, "{metrics}");
    assert_eq!(
        metrics.sum("ingest_readings_total", &[("outcome", "committed")]),
        3.0
    );
    assert_eq!(
        metrics.sum("ingest_readings_total", &[("outcome", "duplicate")]),
        2.0
    );
    assert_eq!(
        metrics.sum(
            "ingest_readings_total",
            &[("outcome", "rejected"), ("reason", "non_finite_value")]
        ),
        1.0
    );
    assert_eq!(
        metrics.sum(
            "ingest_readings_total",
            &[("outcome", "rejected"), ("reason", "timestamp_in_future")]
        ),
        1.0
    );
    assert_eq!(
        metrics.sum("ingest_batches_total", &[("outcome", "committed")]),
        1.0
    );
    assert_eq!(
        metrics.sum("ingest_batches_total", &[("outcome", "duplicate")]),
        1.0
    );
    assert!(metrics.sum("ingest_group_commit_seconds_count", &[]) >= 1.0);
    assert_eq!(metrics.sum("ingest_batch_ack_seconds_count", &[]), 2.0);
    assert_eq!(metrics.sum("ingest_writer_queue_batches", &[]), 0.0);
    let upload_labels = [
        ("grpc_service", "telemetry.v1.Ingest"),
        ("grpc_method", "UploadReadings"),
        ("grpc_type", "client_stream"),
    ];
    assert_eq!(
        metrics.sum("grpc_server_started_total", &upload_labels),
        2.0
    );
    assert_eq!(
        metrics.sum("grpc_server_msg_received_total", &upload_labels),
        2.0
    );
    assert_eq!(
        metrics.sum("grpc_server_msg_sent_total", &upload_labels),
        2.0
    );
    let ok = [&upload_labels[..], &[("grpc_code", "OK")]].concat();
    assert_eq!(metrics.sum("grpc_server_handled_total", &ok), 2.0);
    assert_eq!(
        metrics.sum("grpc_server_handling_seconds_count", &upload_labels),
        2.0
    );
}

async fn calls_count_under_their_real_code_when_they_end(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    // A stream that starts well and fails mid-way (a sequence going back):
    // its headers went out as 200, its trailers say INVALID_ARGUMENT.
    let mut client = server.ingest(&token).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(simple_batch(2, 3)).await.unwrap();
    tx.send(simple_batch(1, 3)).await.unwrap();
    let failed = client
        .upload_readings(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::InvalidArgument);
    drop(tx);
    // Refused before any handler: no token.
    let refused = server
        .ingest_with(Bearer::none())
        .await
        .get_upload_cursor(pb::GetUploadCursorRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    // A Control stream the client drops: CANCELED once the server sees it.
    let (ctx, stream) = open_control(server.ingest(&token).await, vec![hello("t")]).await;
    drop(stream.unwrap());
    drop(ctx);

    let metrics = eventually_ok("every call counted", Duration::from_secs(10), async || {
        let metrics = server.metrics().await;
        let upload_failed = metrics.sum(
            "grpc_server_handled_total",
            &[
                ("grpc_method", "UploadReadings"),
                ("grpc_code", "InvalidArgument"),
            ],
        );
        let unauthenticated = metrics.sum(
            "grpc_server_handled_total",
            &[
                ("grpc_method", "GetUploadCursor"),
                ("grpc_code", "Unauthenticated"),
            ],
        );
        let control_ended = metrics.sum("grpc_server_handled_total", &[("grpc_method", "Control")]);
        let auth_failures = metrics.sum("auth_failures_total", &[("reason", "missing")]);
        if upload_failed == 1.0
            && unauthenticated == 1.0
            && control_ended == 1.0
            && auth_failures == 1.0
        {
            Ok(metrics)
        } else {
            Err(format!(
                "upload {upload_failed}, unauthenticated {unauthenticated}, control {control_ended}, auth {auth_failures}:\n{metrics}"
            ))
        }
    })
    .await;
    assert_eq!(
        metrics.sum(
            "grpc_server_msg_received_total",
            &[("grpc_method", "UploadReadings")]
        ),
        2.0
    );
    assert_eq!(
        metrics.sum("ingest_readings_total", &[("outcome", "committed")]),
        3.0
    );
    assert_eq!(
        metrics.sum(
            "ingest_readings_total",
            &[("outcome", "rejected"), ("reason", "invalid_batch")]
        ),
        3.0
    );
}
