//! The same uploads give the same answers and the same stored data on
//! SQLite and PostgreSQL.

use crate::common::*;
use telemetry_proto::v1 as pb;

/// A scripted session: two devices, resends, rejections, a gap.
async fn session(
    server: &TestServer,
    t: u64,
) -> (Vec<pb::UploadSummary>, Vec<(String, u64)>, (i64, i64, i64)) {
    let a = server.register("dev-a").await;
    let b = server.register("dev-b").await;
    let mut a = server.ingest(&a).await;
    let mut b = server.ingest(&b).await;
    let mk = |seq: u64, base: f64| {
        batch(
            seq,
            vec![
                series(
                    "temperature",
                    "Cel",
                    &[(t + seq, base), (t + seq + 1, base + 0.5)],
                ),
                series(
                    "humidity",
                    "%",
                    &[(t + seq, base * 2.0), (t + seq, f64::NAN)],
                ),
                series("Nope", "", &[(t, 1.0)]),
            ],
        )
    };
    let mut summaries = Vec::new();
    summaries.push(
        upload(&mut a, vec![mk(1, 20.0), mk(2, 21.0), mk(4, 19.5)])
            .await
            .unwrap(),
    );
    summaries.push(
        upload(&mut a, vec![mk(2, 0.0), mk(4, 0.0), mk(5, 18.0)])
            .await
            .unwrap(),
    );
    summaries.push(upload(&mut b, vec![mk(7, -3.25)]).await.unwrap());
    let mut ops = server.ops().await;
    let devices = ops
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices
        .into_iter()
        .map(|d| (d.device_id, d.committed_sequence))
        .collect();
    let stored = (
        server.storage.count_readings().await,
        // Exact integer checksums of what is stored.
        server
            .storage
            .scalar("SELECT CAST(SUM(time_unix_nano % 1000003) AS BIGINT) FROM readings")
            .await,
        server
            .storage
            .scalar("SELECT CAST(SUM(value * 4) AS BIGINT) FROM readings")
            .await,
    );
    (summaries, devices, stored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_postgres_agree() {
    let Some(pg) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let sqlite = TestServer::start(Backend::Sqlite).await.unwrap();
    let t = now_nanos();
    let on_sqlite = session(&sqlite, t).await;
    let on_postgres = session(&pg, t).await;
    assert_eq!(on_sqlite, on_postgres);
    // And the session did what it says.
    let (summaries, devices, (count, _, _)) = on_sqlite;
    assert_eq!(summaries[1].duplicate_batches, 2);
    assert_eq!(
        devices,
        vec![("dev-a".to_owned(), 5), ("dev-b".to_owned(), 7)]
    );
    assert_eq!(count, 5 * 3);
}
