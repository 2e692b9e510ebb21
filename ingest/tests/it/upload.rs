//! UploadReadings end to end: summaries, idempotent resends, the cursor,
//! per-reading rejections and stream-level errors, on both backends.

use crate::common::*;
use ingest::Limits;
use ingest::domain::ReadingLimits;
use telemetry_proto::v1 as pb;
use tonic::Code;

backend_tests!(
    summary_reports_every_figure,
    resent_batches_are_counted_as_duplicates_and_stored_once,
    cursor_lets_a_device_resume,
    each_bad_reading_is_rejected_with_its_reason,
    sequence_going_backwards_ends_the_stream,
    zero_sequence_and_mismatched_columns_are_invalid,
    batch_over_the_reading_limit_is_resource_exhausted,
    message_over_the_size_limit_is_resource_exhausted,
    many_devices_uploading_at_once_lose_nothing,
    an_empty_stream_reports_the_stored_cursor,
    hundreds_of_concurrent_calls_share_one_connection,
    large_batches_are_stored_row_for_row,
);

async fn summary_reports_every_figure(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    let t = now_nanos();
    let summary = upload(
        &mut client,
        vec![
            batch(
                1,
                vec![
                    series("temperature", "Cel", &[(t, 20.0), (t + 10, 24.0)]),
                    series("humidity", "%", &[(t + 5, 50.0)]),
                ],
            ),
            batch(
                2,
                vec![
                    series("temperature", "Cel", &[(t + 20, 22.0), (t + 30, f64::NAN)]),
                    series("Bad Name", "", &[(t, 1.0), (t, 2.0)]),
                ],
            ),
        ],
    )
    .await
    .unwrap();

    assert_eq!(summary.batches_received, 2);
    assert_eq!(summary.batches_committed, 2);
    assert_eq!(summary.duplicate_batches, 0);
    assert_eq!(summary.readings_accepted, 4);
    assert_eq!(summary.readings_rejected, 3);
    assert_eq!(summary.committed_sequence, 2);
    assert_eq!(summary.first_reading_time_unix_nano, t);
    assert_eq!(summary.last_reading_time_unix_nano, t + 20);
    let reasons: Vec<_> = summary
        .rejections
        .iter()
        .map(|r| (r.reason(), r.count))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (pb::RejectReason::NonFiniteValue, 1),
            (pb::RejectReason::SensorNameMalformed, 2),
        ]
    );
    assert_eq!(
        summary.first_rejected[0],
        pb::RejectedReading {
            sequence: 2,
            series_index: 0,
            reading_index: 1,
            reason: pb::RejectReason::NonFiniteValue as i32,
        }
    );
    assert_eq!(summary.first_rejected[1].series_index, 1);
    let sensors: Vec<_> = summary
        .sensors
        .iter()
        .map(|s| (s.sensor.as_str(), s.count, s.min, s.max, s.mean))
        .collect();
    assert_eq!(
        sensors,
        vec![
            ("humidity", 1, 50.0, 50.0, 50.0),
            ("temperature", 3, 20.0, 24.0, 22.0)
        ]
    );

    assert_eq!(server.storage.count_readings().await, 4);
    assert_eq!(
        server.storage.scalar("SELECT COUNT(*) FROM sensors").await,
        2
    );
}

async fn resent_batches_are_counted_as_duplicates_and_stored_once(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    let first = upload(&mut client, (1..=3).map(|s| simple_batch(s, 10)).collect())
        .await
        .unwrap();
    assert_eq!((first.batches_committed, first.duplicate_batches), (3, 0));

    // The connection dropped before the device saw the summary: it resends
    // 2 and 3 along with new batches.
    let second = upload(&mut client, (2..=5).map(|s| simple_batch(s, 10)).collect())
        .await
        .unwrap();
    assert_eq!(second.batches_received, 4);
    assert_eq!(second.duplicate_batches, 2);
    assert_eq!(second.batches_committed, 2);
    assert_eq!(second.readings_accepted, 20);
    assert_eq!(second.committed_sequence, 5);
    assert_eq!(server.storage.count_readings().await, 50);
}

async fn cursor_lets_a_device_resume(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let a = server.register("dev-a").await;
    let b = server.register("dev-b").await;
    let mut client_a = server.ingest(&a).await;
    let mut client_b = server.ingest(&b).await;
    assert_eq!(cursor(&mut client_a).await, 0);
    // Gaps are allowed; the cursor is the highest committed sequence.
    upload(&mut client_a, vec![simple_batch(1, 1), simple_batch(4, 1)])
        .await
        .unwrap();
    let reply = client_a
        .get_upload_cursor(pb::GetUploadCursorRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.device_id, "dev-a");
    assert_eq!(reply.committed_sequence, 4);
    assert_eq!(
        cursor(&mut client_b).await,
        0,
        "another device's cursor is its own"
    );

    let device = server.device("dev-a").await;
    assert_eq!(device.committed_sequence, 4);
    assert!(device.last_upload_time_unix_nano > 0);
}

async fn each_bad_reading_is_rejected_with_its_reason(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    let t = now_nanos();
    let hour = 3_600_000_000_000u64;
    let summary = upload(
        &mut client,
        vec![batch(
            1,
            vec![
                series("ok", "", &[(t, 1.0)]),
                series(
                    "nan",
                    "",
                    &[(t, f64::NAN), (t, f64::INFINITY), (t, f64::NEG_INFINITY)],
                ),
                series("future", "", &[(t + hour, 1.0)]),
                series("old", "", &[(t - 31 * 24 * hour, 1.0), (0, 1.0)]),
                series("", "", &[(t, 1.0)]),
                series(&"x".repeat(65), "", &[(t, 1.0)]),
                series("Temp", "", &[(t, 1.0)]),
                series("unit", "°C", &[(t, 1.0)]),
            ],
        )],
    )
    .await
    .unwrap();
    let reasons: Vec<_> = summary
        .rejections
        .iter()
        .map(|r| (r.reason(), r.count))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (pb::RejectReason::NonFiniteValue, 3),
            (pb::RejectReason::TimestampInFuture, 1),
            (pb::RejectReason::TimestampTooOld, 2),
            (pb::RejectReason::SensorNameEmpty, 1),
            (pb::RejectReason::SensorNameTooLong, 1),
            (pb::RejectReason::SensorNameMalformed, 1),
            (pb::RejectReason::UnitMalformed, 1),
        ]
    );
    assert_eq!(summary.readings_accepted, 1);
    assert_eq!(summary.readings_rejected, 10);
    assert_eq!(summary.first_rejected.len(), 10);
    assert_eq!(
        server.storage.count_readings().await,
        1,
        "nothing bad lands"
    );
}

async fn sequence_going_backwards_ends_the_stream(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    let status = upload(
        &mut client,
        vec![simple_batch(5, 3), simple_batch(6, 3), simple_batch(6, 3)],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("6 after 6"),
        "{}",
        status.message()
    );
    // Batches before the error were committed, and the message says so.
    assert!(
        status.message().contains("up to sequence 6 are committed"),
        "{}",
        status.message()
    );
    assert_eq!(cursor(&mut client).await, 6);
    assert_eq!(server.storage.count_readings().await, 6);
}

async fn zero_sequence_and_mismatched_columns_are_invalid(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    let status = upload(&mut client, vec![simple_batch(0, 1)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("start at 1"),
        "{}",
        status.message()
    );

    let mut uneven = simple_batch(1, 2);
    uneven.series[0].value.pop();
    let status = upload(&mut client, vec![uneven]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("2 timestamps but 1 values"),
        "{}",
        status.message()
    );
    assert_eq!(server.storage.count_readings().await, 0);
}

async fn batch_over_the_reading_limit_is_resource_exhausted(backend: Backend) {
    let limits = Limits {
        readings: ReadingLimits {
            max_batch_readings: 100,
            ..Default::default()
        },
        ..Default::default()
    };
    let Some(server) = TestServer::start_with(backend, limits).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    let status = upload(
        &mut client,
        vec![simple_batch(1, 100), simple_batch(2, 101)],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("101 readings"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("limit of 100"),
        "{}",
        status.message()
    );
    assert_eq!(cursor(&mut client).await, 1);
}

async fn message_over_the_size_limit_is_resource_exhausted(backend: Backend) {
    let limits = Limits {
        max_message_bytes: 64 * 1024,
        ..Default::default()
    };
    let Some(server) = TestServer::start_with(backend, limits).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    // 8000 readings at 16 bytes each: about 128 KiB.
    let status = upload(
        &mut client,
        vec![simple_batch(1, 10), simple_batch(2, 8000)],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max-message-bytes"),
        "{}",
        status.message()
    );
    assert_eq!(cursor(&mut client).await, 1);
    assert_eq!(server.storage.count_readings().await, 10);
}

async fn many_devices_uploading_at_once_lose_nothing(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let channel = server.channel().await;
    let mut tasks = Vec::new();
    for d in 0..20 {
        let token = server.register(&format!("dev-{d}")).await;
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = telemetry_proto::v1::ingest_client::IngestClient::with_interceptor(
                channel,
                Bearer::new(&token).unwrap(),
            );
            let mut accepted = 0;
            for round in 0..3u64 {
                let batches = (1..=10).map(|i| simple_batch(round * 10 + i, 50)).collect();
                let s = upload(&mut client, batches).await.unwrap();
                assert_eq!(s.committed_sequence, round * 10 + 10);
                accepted += s.readings_accepted;
            }
            accepted
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, 20 * 3 * 10 * 50);
    assert_eq!(server.storage.count_readings().await, total as i64);
}

async fn an_empty_stream_reports_the_stored_cursor(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    upload(&mut client, vec![simple_batch(3, 1)]).await.unwrap();
    let summary = upload(&mut client, vec![]).await.unwrap();
    assert_eq!(summary.batches_received, 0);
    assert_eq!(summary.committed_sequence, 3);
}

async fn hundreds_of_concurrent_calls_share_one_connection(backend: Backend) {
    // A fleet multiplexed on one connection starts with a burst of tiny
    // unary calls; h2 must not take it for a flood of small DATA frames.
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let client = server.ingest(&token).await;
    let calls = (0..400).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .get_upload_cursor(pb::GetUploadCursorRequest {})
                .await
        })
    });
    for call in futures::future::join_all(calls).await {
        let reply = call
            .unwrap()
            .expect("every call on the shared connection succeeds");
        assert_eq!(reply.into_inner().device_id, "dev-1");
    }
}

/// Batches larger than the writer's bulk statements (512 rows on SQLite,
/// one binary COPY on PostgreSQL) and not a multiple of them: every reading
/// lands once, with its own sensor, time and value.
async fn large_batches_are_stored_row_for_row(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-bulk").await;
    let mut client = server.ingest(&token).await;
    let t = now_nanos();
    let points = |offset: u64, n: u64| -> Vec<(u64, f64)> {
        (0..n)
            .map(|i| (t + offset + i, (offset + i) as f64 * 0.25 - 100.0))
            .collect()
    };
    let batches = vec![
        batch(1, vec![series("a", "", &points(0, 1300))]),
        batch(
            2,
            vec![
                series("a", "", &points(1300, 511)),
                series("b", "", &points(1811, 513)),
                series("c", "", &points(2324, 1)),
            ],
        ),
    ];
    let summary = upload(&mut client, batches).await.unwrap();
    assert_eq!(summary.readings_accepted, 2325);
    assert_eq!(server.storage.count_readings().await, 2325);
    // Each reading's offset i is recoverable from its time and its value;
    // these sums are exact integers.
    assert_eq!(
        server
            .storage
            .scalar(&format!(
                "SELECT CAST(SUM(time_unix_nano - {t}) AS BIGINT) FROM readings"
            ))
            .await,
        (0..2325).sum::<i64>()
    );
    assert_eq!(
        server
            .storage
            .scalar(&format!(
                "SELECT COUNT(*) FROM readings WHERE value * 4 + 400 <> time_unix_nano - {t}"
            ))
            .await,
        0
    );
    assert_eq!(
        server
            .storage
            .scalar(&format!(
                "SELECT COUNT(DISTINCT time_unix_nano) FROM readings r JOIN sensors s \
                 ON s.pk = r.sensor_pk WHERE (s.sensor = 'a' AND r.time_unix_nano < {t} + 1811) \
                 OR (s.sensor = 'b' AND r.time_unix_nano BETWEEN {t} + 1811 AND {t} + 2323) \
                 OR (s.sensor = 'c' AND r.time_unix_nano = {t} + 2324)"
            ))
            .await,
        2325
    );
}
