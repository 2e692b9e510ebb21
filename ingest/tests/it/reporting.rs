//! The reporting side of storage: the hourly rollup kept by the writer,
//! retention, and PostgreSQL's day partitions. Each test runs on SQLite and
//! on a fresh PostgreSQL database, against the real server over HTTP/2.

use std::time::Duration;

use crate::common::{
    Backend, TestServer, TestStorage, batch, hour_start, now_nanos, series, simple_batch, upload,
};
use ingest::retention::{self, RetentionConfig};
use ingest::storage::Store;
use ingest::storage::partitions::{DAY_NANOS, day_of, partition_name};
use ingest::storage::rollup::HOUR_NANOS;

const HOUR: u64 = HOUR_NANOS as u64;
const DAY: u64 = DAY_NANOS as u64;

/// (sensor_pk, hour, count, sum, min, max, last_time, last_value)
type RollupRow = (i64, i64, i64, f64, f64, f64, i64, f64);

/// The rollup as the writer kept it.
const STORED_ROLLUP: &str = "SELECT sensor_pk, hour_unix_nano, reading_count, value_sum, value_min, \
     value_max, last_time_unix_nano, last_value FROM readings_hourly_rollup \
     ORDER BY sensor_pk, hour_unix_nano";

/// The same aggregates computed from the raw rows. On a tie for the newest
/// time the larger value is taken; the tests avoid such ties.
const RAW_ROLLUP: &str = "SELECT g.sensor_pk, g.hour, COUNT(*), SUM(g.value), MIN(g.value), MAX(g.value), \
     MAX(g.time_unix_nano), \
     (SELECT MAX(r.value) FROM readings r WHERE r.sensor_pk = g.sensor_pk \
       AND r.time_unix_nano = MAX(g.time_unix_nano)) \
     FROM (SELECT sensor_pk, time_unix_nano, value, \
             time_unix_nano - (((time_unix_nano % 3600000000000) + 3600000000000) % 3600000000000) AS hour \
           FROM readings) g \
     GROUP BY g.sensor_pk, g.hour ORDER BY g.sensor_pk, g.hour";

async fn rollup_rows(storage: &TestStorage, sql: &str) -> Vec<RollupRow> {
    use ingest::storage::Database;
    match &storage.database {
        Database::Sqlite { path } => {
            let url = format!("sqlite://{}", path.display());
            let mut conn: sqlx::SqliteConnection = sqlx::Connection::connect(&url).await.unwrap();
            sqlx::query_as(sql).fetch_all(&mut conn).await.unwrap()
        }
        Database::Postgres { url } => {
            let mut conn: sqlx::PgConnection = sqlx::Connection::connect(url).await.unwrap();
            sqlx::query_as(sql).fetch_all(&mut conn).await.unwrap()
        }
    }
}

/// Readings of one sensor: `n` points from `start`, `step` apart, with
/// values exact in binary floating point so sums do not depend on order.
fn points(start: u64, step: u64, n: usize, base: f64) -> Vec<(u64, f64)> {
    (0..n)
        .map(|i| (start + i as u64 * step, base + i as f64 * 0.5))
        .collect()
}

/// Rollups equal the aggregates of the raw rows after in-order, late and
/// duplicate batches from several devices; latest_readings shows the newest
/// reading by time, not the last one sent.
async fn rollups_match_raw_readings(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let a = server.register("rollup-a").await;
    let b = server.register("rollup-b").await;
    let (h2, h1, h0) = (hour_start(2), hour_start(1), hour_start(0));

    let mut ca = server.ingest(&a).await;
    let first = vec![
        batch(
            1,
            vec![
                series("temp", "Cel", &points(h1 + 1_000, 1_000_000, 50, 10.0)),
                series("hum", "%", &points(h1 + 5_000, 1_000_000, 20, 40.0)),
            ],
        ),
        // Straddles two hours.
        batch(
            2,
            vec![series(
                "temp",
                "Cel",
                &points(h0 - 5 * 1_000_000, 1_000_000, 10, -3.0),
            )],
        ),
    ];
    upload(&mut ca, first.clone()).await.unwrap();
    // Late: readings from two hours ago, after newer ones were stored.
    let late = batch(
        3,
        vec![series("temp", "Cel", &points(h2 + 7, 2_000_000, 30, 100.0))],
    );
    upload(&mut ca, vec![late.clone()]).await.unwrap();
    // Duplicates: resent batches are not stored, nor counted twice.
    let summary = upload(&mut ca, [first, vec![late]].concat()).await.unwrap();
    assert_eq!(summary.duplicate_batches, 3, "{summary:?}");

    let mut cb = server.ingest(&b).await;
    upload(
        &mut cb,
        vec![batch(
            1,
            vec![series("temp", "Cel", &points(h1 + 9, 3_000_000, 40, 1.5))],
        )],
    )
    .await
    .unwrap();

    let stored = rollup_rows(&server.storage, STORED_ROLLUP).await;
    let raw = rollup_rows(&server.storage, RAW_ROLLUP).await;
    assert_eq!(stored, raw);
    // a/temp spans h2, h1 and h0; a/hum and b/temp one hour each.
    assert_eq!(stored.len(), 5, "{stored:?}");
    assert_eq!(
        stored.iter().map(|r| r.2).sum::<i64>(),
        server.storage.count_readings().await
    );

    // The newest a/temp reading is from batch 2 (h0 + 4 ms), although the
    // late batch 3 came after it.
    let latest = server
        .storage
        .scalar(
            "SELECT time_unix_nano FROM latest_readings \
             WHERE device_id = 'rollup-a' AND sensor = 'temp'",
        )
        .await;
    assert_eq!(latest as u64, h0 + 4 * 1_000_000);
    assert_eq!(
        server
            .storage
            .scalar("SELECT COUNT(*) FROM latest_readings")
            .await,
        3
    );
    // The hourly view reads the rollup: same counts.
    assert_eq!(
        server
            .storage
            .scalar("SELECT CAST(SUM(reading_count) AS BIGINT) FROM readings_hourly")
            .await,
        server.storage.count_readings().await
    );
}

fn retention_config(step_rows: usize) -> RetentionConfig {
    RetentionConfig {
        step_rows,
        ..RetentionConfig::default()
    }
}

/// Retention removes raw readings past it and keeps the rollups; on
/// PostgreSQL by dropping whole day partitions.
async fn retention_removes_only_old_readings_and_keeps_rollups(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("keeper").await;
    let mut client = server.ingest(&token).await;
    let now = now_nanos();
    let old = now - 10 * DAY;
    let recent = now - 2 * DAY;
    upload(
        &mut client,
        vec![
            batch(
                1,
                vec![series("temp", "Cel", &points(old, 1_000, 300, 1.0))],
            ),
            batch(
                2,
                vec![series("temp", "Cel", &points(recent, 1_000, 200, 2.0))],
            ),
            batch(
                3,
                vec![series("temp", "Cel", &points(now - HOUR, 1_000, 100, 3.0))],
            ),
        ],
    )
    .await
    .unwrap();
    let rollups_before = rollup_rows(&server.storage, STORED_ROLLUP).await;
    assert_eq!(server.storage.count_readings().await, 600);

    let store = Store::open(&server.storage.database).await.unwrap();
    let pass = retention::run_once(
        &store,
        &retention_config(64),
        Duration::from_secs(5 * 86_400),
        now as i64,
    )
    .await
    .unwrap();

    assert_eq!(server.storage.count_readings().await, 300);
    assert_eq!(
        server
            .storage
            .scalar(&format!(
                "SELECT COUNT(*) FROM readings WHERE time_unix_nano < {}",
                now - 5 * DAY
            ))
            .await,
        0
    );
    match backend {
        Backend::Sqlite => {
            assert_eq!(pass.readings.rows, 300);
            // 64 rows per step: 300 rows take 5 steps.
            assert_eq!(pass.readings.steps, 5);
        }
        Backend::Postgres => {
            assert_eq!(pass.readings.partitions, 1, "{pass:?}");
            let old_partition = partition_name(day_of(old as i64));
            assert_eq!(
                server
                    .storage
                    .scalar(&format!(
                        "SELECT COUNT(*) FROM pg_class WHERE relname = '{old_partition}'"
                    ))
                    .await,
                0
            );
        }
    }
    // Rollups outlive the raw rows.
    assert_eq!(
        rollup_rows(&server.storage, STORED_ROLLUP).await,
        rollups_before
    );
    assert_eq!(
        server
            .storage
            .scalar("SELECT CAST(SUM(reading_count) AS BIGINT) FROM readings_hourly")
            .await,
        600
    );

    // Rollups go too once past their own retention.
    let config = RetentionConfig {
        rollups: Duration::from_secs(5 * 86_400),
        ..retention_config(1)
    };
    let pass = retention::run_once(&store, &config, Duration::from_secs(5 * 86_400), now as i64)
        .await
        .unwrap();
    assert_eq!(pass.rollups.rows, 1, "{pass:?}");
    assert_eq!(
        server
            .storage
            .scalar("SELECT CAST(SUM(reading_count) AS BIGINT) FROM readings_hourly")
            .await,
        300
    );
    store.close().await;
}

/// Ingest goes on while retention deletes many old rows in small steps:
/// every batch is committed, and retention removes exactly the old rows.
async fn retention_runs_beside_ingest(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let now = now_nanos();
    let old_token = server.register("old-data").await;
    let mut old_client = server.ingest(&old_token).await;
    // 20,000 old readings, in 4 sensors.
    let old_batches: Vec<_> = (0..10u64)
        .map(|i| {
            let start = now - 20 * DAY + i * 10_000_000;
            batch(
                i + 1,
                (0..4)
                    .map(|s| {
                        series(
                            &format!("s{s}"),
                            "",
                            &points(start + s, 1_000, 500, f64::from(s as u32)),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    upload(&mut old_client, old_batches).await.unwrap();
    assert_eq!(server.storage.count_readings().await, 20_000);

    let store = Store::open(&server.storage.database).await.unwrap();
    let retention = tokio::spawn(async move {
        let pass = retention::run_once(
            &store,
            &retention_config(100),
            Duration::from_secs(10 * 86_400),
            now as i64,
        )
        .await
        .unwrap();
        store.close().await;
        pass
    });

    let mut uploads = Vec::new();
    for d in 0..4 {
        let token = server.register(&format!("live-{d}")).await;
        let mut client = server.ingest(&token).await;
        uploads.push(tokio::spawn(async move {
            let batches: Vec<_> = (1..=25u64)
                .map(|seq| {
                    batch(
                        seq,
                        vec![series(
                            "temp",
                            "Cel",
                            &points(now - seq * 1_000_000, 1, 100, 7.0),
                        )],
                    )
                })
                .collect();
            upload(&mut client, batches).await.unwrap()
        }));
    }
    for u in uploads {
        let summary = u.await.unwrap();
        assert_eq!(summary.readings_accepted, 2_500, "{summary:?}");
    }
    let pass = retention.await.unwrap();

    assert_eq!(server.storage.count_readings().await, 10_000);
    assert_eq!(
        server
            .storage
            .scalar("SELECT CAST(SUM(reading_count) AS BIGINT) FROM readings_hourly")
            .await,
        30_000
    );
    if backend == Backend::Sqlite {
        assert_eq!(pass.readings.rows, 20_000);
        assert!(pass.readings.steps >= 200, "{pass:?}");
    }
}

/// PostgreSQL: partitions exist ahead of today after a retention pass, and
/// a reading for a day without one (late data) gets its partition on
/// demand. SQLite has no partitions and needs none.
async fn partitions_are_created_ahead_and_on_demand(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    // Registering first also waits until the server has migrated the schema.
    let token = server.register("late").await;
    let store = Store::open(&server.storage.database).await.unwrap();
    let now = now_nanos() as i64;
    let config = RetentionConfig {
        partitions_ahead_days: 5,
        ..RetentionConfig::default()
    };
    retention::run_once(&store, &config, Duration::from_secs(30 * 86_400), now)
        .await
        .unwrap();

    let mut client = server.ingest(&token).await;
    let late = now_nanos() - 17 * DAY;
    upload(
        &mut client,
        vec![batch(
            1,
            vec![series("temp", "Cel", &points(late, 1, 10, 0.0))],
        )],
    )
    .await
    .unwrap();
    assert_eq!(server.storage.count_readings().await, 10);

    match backend {
        Backend::Sqlite => {
            assert_eq!(store.ensure_partitions(&[day_of(now)]).await.unwrap(), 0);
        }
        Backend::Postgres => {
            let today = day_of(now);
            for day in (today..=today + 5).chain([day_of(late as i64)]) {
                let name = partition_name(day);
                assert_eq!(
                    server
                        .storage
                        .scalar(&format!(
                            "SELECT COUNT(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                             WHERE i.inhparent = 'readings'::regclass AND c.relname = '{name}'"
                        ))
                        .await,
                    1,
                    "partition {name}"
                );
            }
            // Each reading sits in its day's partition.
            let name = partition_name(day_of(late as i64));
            assert_eq!(
                server
                    .storage
                    .scalar(&format!("SELECT COUNT(*) FROM {name}"))
                    .await,
                10
            );
            // Creating them again is a no-op.
            assert_eq!(
                store.ensure_partitions(&[today, today + 1]).await.unwrap(),
                0
            );
        }
    }
    store.close().await;
}

/// The views promise the same value types on both backends: integers,
/// doubles and text. On PostgreSQL that means bigint, double precision and
/// text only (an int4 or numeric would decode differently).
async fn view_columns_have_portable_types(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    server.register("types").await;
    if backend == Backend::Postgres {
        let odd = server
            .storage
            .scalar(
                "SELECT COUNT(*) FROM information_schema.columns \
                 WHERE table_name IN ('readings_hourly', 'readings_daily', 'latest_readings', \
                   'device_status', 'alert_history', 'command_log') \
                 AND data_type NOT IN ('bigint', 'double precision', 'text')",
            )
            .await;
        assert_eq!(
            odd, 0,
            "a view column has a type other than bigint, double, text"
        );
    }
    let columns = |view: &str| format!("SELECT COUNT(*) FROM {view}");
    for view in [
        "readings_hourly",
        "readings_daily",
        "latest_readings",
        "device_status",
        "alert_history",
        "command_log",
    ] {
        // Every view exists and is readable on both backends.
        server.storage.scalar(&columns(view)).await;
    }
}

/// Right after an upload, not a hair below zero (whole-second "now" made
/// it about -0.1 s).
async fn seconds_since_last_upload_is_never_negative(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("fresh").await;
    let mut client = server.ingest(&token).await;
    for sequence in 1..=3 {
        upload(&mut client, vec![simple_batch(sequence, 3)])
            .await
            .unwrap();
        let micros = server
            .storage
            .scalar(
                "SELECT CAST(seconds_since_last_upload * 1000000 AS BIGINT) \
                 FROM device_status WHERE device_id = 'fresh'",
            )
            .await;
        assert!(
            (0..5_000_000).contains(&micros),
            "{micros} µs since the upload"
        );
    }
}

/// A device that has never uploaded has NULL there, not 0: the README's
/// "devices gone silent" query must not list it as heard from just now.
/// (PostgreSQL's GREATEST skipped the NULL difference and gave 0.)
async fn seconds_since_last_upload_is_null_before_any_upload(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    server.register("never-uploaded").await;
    assert_eq!(
        server
            .storage
            .scalar(
                "SELECT COUNT(*) FROM device_status WHERE device_id = 'never-uploaded' \
                 AND last_upload_unix_nano IS NULL AND seconds_since_last_upload IS NULL",
            )
            .await,
        1
    );
}

backend_tests!(
    seconds_since_last_upload_is_null_before_any_upload,
    seconds_since_last_upload_is_never_negative,
    view_columns_have_portable_types,
    rollups_match_raw_readings,
    retention_removes_only_old_readings_and_keeps_rollups,
    retention_runs_beside_ingest,
    partitions_are_created_ahead_and_on_demand,
);
