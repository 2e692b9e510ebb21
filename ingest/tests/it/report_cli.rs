//! `ingest report`: the real binary reads the database a real server wrote,
//! in every format, with every filter, on SQLite and PostgreSQL; the same
//! data gives the same rows on both; mistakes exit non-zero with a message.

use crate::common::alert_helpers::{put, too_hot};
use crate::common::control::{ping, send_command};
use crate::common::*;
use ingest::cli::output::Format;
use ingest::reports::{ReportDb, ReportName, ReportQuery};
use ingest::storage::Database;
use telemetry_proto::v1 as pb;

backend_tests!(
    readings_hourly_in_every_format,
    filters_narrow_readings_hourly,
    refused_queries_exit_non_zero_with_a_message,
    a_schema_without_the_views_asks_for_migrate,
    every_table_column_is_a_view_column,
);

/// As the views' `*_utc` columns and the table show times.
fn utc(nanos: u64) -> String {
    chrono::DateTime::from_timestamp((nanos / SEC) as i64, 0)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The same instant as an RFC 3339 argument, to the nanosecond.
fn rfc3339(nanos: u64) -> String {
    chrono::DateTime::from_timestamp_nanos(nanos as i64)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

// ---- running the binary -----------------------------------------------------

/// `ingest report ARGS...`, with no storage settings from the environment.
async fn report(args: Vec<String>) -> CliRun {
    ingest_cli(std::iter::once("report".to_owned()).chain(args).collect()).await
}

/// The arguments that point the CLI at a test server's database.
fn database_args(storage: &TestStorage) -> Vec<String> {
    match &storage.database {
        Database::Sqlite { .. } => vec![
            "--data-dir".into(),
            storage.data_dir.path().display().to_string(),
        ],
        Database::Postgres { url } => vec!["--database-url".into(), url.clone()],
    }
}

async fn report_ok(storage: &TestStorage, args: &[&str]) -> String {
    let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    all.extend(database_args(storage));
    let run = report(all).await;
    assert!(run.success, "ingest report {args:?} failed: {}", run.stderr);
    run.stdout
}

async fn report_err(storage: &TestStorage, args: &[&str]) -> String {
    let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    all.extend(database_args(storage));
    let run = report(all).await;
    assert!(
        !run.success,
        "ingest report {args:?} should have failed; printed {}",
        run.stdout
    );
    assert!(run.stdout.is_empty(), "nothing on stdout: {}", run.stdout);
    run.stderr
}

// ---- readings_hourly from the CLI ------------------------------------------

/// One expected row of readings_hourly.
struct Hourly {
    device: &'static str,
    sensor: &'static str,
    unit: &'static str,
    hour: u64,
    count: i64,
    min: f64,
    max: f64,
    avg: f64,
}

/// Two hours a day or so back, readings at fixed offsets; every value and
/// sum is exact in binary floating point.
struct Dataset {
    a: u64,
    b: u64,
}

impl Dataset {
    fn new() -> Self {
        Self {
            a: hour_start(30),
            b: hour_start(28),
        }
    }

    async fn ingest(&self, server: &TestServer) {
        let (a, b) = (self.a, self.b);
        let mut dev_a = server.ingest(&server.register("dev-a").await).await;
        let mut dev_b = server.ingest(&server.register("dev-b").await).await;
        upload(
            &mut dev_a,
            vec![batch(
                1,
                vec![
                    series(
                        "temperature",
                        "Cel",
                        &[
                            (a + MIN, 20.0),
                            (a + 2 * MIN, 21.5),
                            (a + 3 * MIN, 22.5),
                            (a + 59 * MIN, 24.0),
                            (b, 18.25),
                            (b + 30 * MIN, 19.0),
                        ],
                    ),
                    series("humidity", "%", &[(a + 10 * MIN, 40.5)]),
                ],
            )],
        )
        .await
        .unwrap();
        upload(
            &mut dev_b,
            vec![batch(
                1,
                vec![series(
                    "temperature",
                    "Cel",
                    &[(b + 5 * MIN, -3.25), (b + 6 * MIN, -1.75)],
                )],
            )],
        )
        .await
        .unwrap();
    }

    /// Every row readings_hourly has, in its order.
    fn rows(&self) -> Vec<Hourly> {
        let row = |device, sensor, unit, hour, count, min, max, avg| Hourly {
            device,
            sensor,
            unit,
            hour,
            count,
            min,
            max,
            avg,
        };
        vec![
            row("dev-a", "humidity", "%", self.a, 1, 40.5, 40.5, 40.5),
            row("dev-a", "temperature", "Cel", self.a, 4, 20.0, 24.0, 22.0),
            row(
                "dev-a",
                "temperature",
                "Cel",
                self.b,
                2,
                18.25,
                19.0,
                18.625,
            ),
            row("dev-b", "temperature", "Cel", self.b, 2, -3.25, -1.75, -2.5),
        ]
    }
}

const HOURLY_HEADER: &str =
    "device_id,sensor,unit,hour_unix_nano,hour_utc,reading_count,min_value,max_value,avg_value";

fn csv_line(r: &Hourly) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{}",
        r.device,
        r.sensor,
        r.unit,
        r.hour,
        utc(r.hour),
        r.count,
        r.min,
        r.max,
        r.avg
    )
}

/// A float as JSON has it: a whole one keeps `.0`.
fn json_float(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn json_line(r: &Hourly) -> String {
    format!(
        "{{\"device_id\":\"{}\",\"sensor\":\"{}\",\"unit\":\"{}\",\"hour_unix_nano\":{},\
         \"hour_utc\":\"{}\",\"reading_count\":{},\"min_value\":{},\"max_value\":{},\"avg_value\":{}}}",
        r.device,
        r.sensor,
        r.unit,
        r.hour,
        utc(r.hour),
        r.count,
        json_float(r.min),
        json_float(r.max),
        json_float(r.avg)
    )
}

/// Left-aligned text, right-aligned numbers; `hour_unix_nano` is left out
/// because the view has `hour_utc`.
fn table_line(cells: [&str; 8]) -> String {
    format!(
        "{:<9}  {:<11}  {:<4}  {:<20}  {:>13}  {:>9}  {:>9}  {:>9}",
        cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7]
    )
}

fn csv_of(rows: &[&Hourly]) -> String {
    let mut text = format!("{HOURLY_HEADER}\n");
    for r in rows {
        text.push_str(&csv_line(r));
        text.push('\n');
    }
    text
}

async fn readings_hourly_in_every_format(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let data = Dataset::new();
    data.ingest(&server).await;
    let rows = data.rows();
    let storage = &server.storage;

    let csv = report_ok(storage, &["readings_hourly", "--format", "csv"]).await;
    assert_eq!(csv, csv_of(&rows.iter().collect::<Vec<_>>()));
    // Whole floats print whole in CSV, with `.0` in JSON, on both backends.
    assert!(csv.contains(",4,20,24,22\n"), "{csv}");

    let json = report_ok(storage, &["readings_hourly", "--format", "json"]).await;
    let expected: Vec<String> = rows.iter().map(json_line).collect();
    assert_eq!(json.lines().collect::<Vec<_>>(), expected);
    assert!(json.ends_with('\n'));
    assert!(
        json.contains(
            "\"reading_count\":4,\"min_value\":20.0,\"max_value\":24.0,\"avg_value\":22.0}"
        )
    );

    let table = report_ok(storage, &["readings_hourly"]).await;
    let mut expected = vec![table_line([
        "device_id",
        "sensor",
        "unit",
        "hour_utc",
        "reading_count",
        "min_value",
        "max_value",
        "avg_value",
    ])];
    for r in &rows {
        let (hour, count, min, max, avg) = (
            utc(r.hour),
            r.count.to_string(),
            r.min.to_string(),
            r.max.to_string(),
            r.avg.to_string(),
        );
        expected.push(table_line([
            r.device, r.sensor, r.unit, &hour, &count, &min, &max, &avg,
        ]));
    }
    assert_eq!(table.lines().collect::<Vec<_>>(), expected, "\n{table}");
    let table_default = report_ok(storage, &["readings_hourly", "--format", "table"]).await;
    assert_eq!(table_default, table);
}

async fn filters_narrow_readings_hourly(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let data = Dataset::new();
    data.ingest(&server).await;
    let rows = data.rows();
    let storage = &server.storage;
    let pick = |indexes: &[usize]| csv_of(&indexes.iter().map(|&i| &rows[i]).collect::<Vec<_>>());
    let (a, b) = (rfc3339(data.a), rfc3339(data.b));
    let a_plus_1 = rfc3339(data.a + 1);

    let cases: Vec<(Vec<&str>, Vec<usize>)> = vec![
        (vec!["--device", "dev-b"], vec![3]),
        (
            vec!["--device", "dev-b", "--device", "dev-a"],
            vec![0, 1, 2, 3],
        ),
        (vec!["--device", "nobody"], vec![]),
        (vec!["--sensor", "humidity"], vec![0]),
        (vec!["--sensor", "temperature"], vec![1, 2, 3]),
        (vec!["--since", &a_plus_1], vec![2, 3]),
        // --until is exclusive: the hour starting at b is left out.
        (vec!["--until", &b], vec![0, 1]),
        (vec!["--since", &a, "--until", &a_plus_1], vec![0, 1]),
        (vec!["--since", &b], vec![2, 3]),
        // Durations count back from now: the data is 28 to 31 hours old.
        (vec!["--since", "2d"], vec![0, 1, 2, 3]),
        (vec!["--since", "29h"], vec![2, 3]),
        (vec!["--since", "1h"], vec![]),
        (vec!["--until", "29h"], vec![0, 1]),
        // The latest two hours' rows, in the usual order.
        (vec!["--limit", "2"], vec![2, 3]),
        (
            vec![
                "--device",
                "dev-a",
                "--sensor",
                "temperature",
                "--since",
                "29h",
            ],
            vec![2],
        ),
    ];
    for (filters, expected) in cases {
        let mut args = vec!["readings_hourly", "--format", "csv"];
        args.extend(filters.iter().copied());
        let csv = report_ok(storage, &args).await;
        assert_eq!(csv, pick(&expected), "ingest report {args:?}");
    }

    // Every report takes the device filter, and the time range on its own
    // time column.
    let alerts = report_ok(
        storage,
        &[
            "alert_history",
            "--format",
            "csv",
            "--device",
            "dev-a",
            "--since",
            "1h",
        ],
    )
    .await;
    assert_eq!(alerts.lines().count(), 1, "header only: {alerts}");
    let status = report_ok(
        storage,
        &[
            "device-status",
            "--format",
            "json",
            "--device",
            "dev-b",
            "--since",
            "1h",
        ],
    )
    .await;
    assert_eq!(status.lines().count(), 1, "{status}");
    assert!(status.starts_with("{\"device_id\":\"dev-b\","), "{status}");
}

async fn refused_queries_exit_non_zero_with_a_message(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let storage = &server.storage;

    let unknown = report_err(storage, &["readings_weekly"]).await;
    assert!(
        unknown.contains("invalid value 'readings_weekly'"),
        "{unknown}"
    );
    assert!(
        unknown.contains("readings_hourly"),
        "names the reports: {unknown}"
    );

    let sensor = report_err(storage, &["device_status", "--sensor", "temperature"]).await;
    assert!(
        sensor.contains("--sensor does not apply to device_status"),
        "{sensor}"
    );
    let sensor = report_err(storage, &["command_log", "--sensor", "temperature"]).await;
    assert!(
        sensor.contains("--sensor does not apply to command_log"),
        "{sensor}"
    );

    let empty = report_err(
        storage,
        &["alert_history", "--since", "1h", "--until", "2h"],
    )
    .await;
    assert!(
        empty.contains("--since") && empty.contains("must be before --until"),
        "{empty}"
    );
    let same = report_err(
        storage,
        &[
            "readings_hourly",
            "--since",
            "2025-01-31T12:00:00Z",
            "--until",
            "2025-01-31T12:00:00Z",
        ],
    )
    .await;
    assert!(
        same.contains(
            "--since (2025-01-31T12:00:00Z) must be before --until (2025-01-31T12:00:00Z)"
        ),
        "{same}"
    );

    let bad_time = report_err(storage, &["readings_hourly", "--since", "yesterday"]).await;
    assert!(bad_time.contains("RFC 3339"), "{bad_time}");
}

/// No SQLite file: an error naming it, and no file is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_sqlite_database_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let run = report(vec![
        "device_status".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
    ])
    .await;
    assert!(!run.success);
    let path = data_dir.join("telemetry.db").display().to_string();
    assert!(run.stderr.contains(&path), "names the file: {}", run.stderr);
    assert!(
        run.stderr.contains("ingest serve") && run.stderr.contains("ingest migrate"),
        "{}",
        run.stderr
    );
    assert!(
        !data_dir.exists(),
        "the report created {}",
        data_dir.display()
    );

    // Also through --database-url sqlite://.
    let file = dir.path().join("elsewhere.db");
    let run = report(vec![
        "alert_history".into(),
        "--database-url".into(),
        format!("sqlite://{}", file.display()),
    ])
    .await;
    assert!(!run.success);
    assert!(
        run.stderr.contains(&file.display().to_string()),
        "{}",
        run.stderr
    );
    assert!(!file.exists());
}

/// A database older than the reporting views: "run `ingest migrate`", and
/// the report changes nothing.
async fn a_schema_without_the_views_asks_for_migrate(backend: Backend) {
    let Some(storage) = TestStorage::new(backend).await else {
        return;
    };
    match &storage.database {
        Database::Sqlite { path } => {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true);
            let mut conn: sqlx::SqliteConnection =
                sqlx::ConnectOptions::connect(&options).await.unwrap();
            sqlx::query("CREATE TABLE devices (pk INTEGER PRIMARY KEY)")
                .execute(&mut conn)
                .await
                .unwrap();
            sqlx::Connection::close(conn).await.unwrap();
        }
        // A fresh database, never migrated.
        Database::Postgres { .. } => {}
    }
    for name in ReportName::ALL {
        let message = report_err(&storage, &[name.view()]).await;
        assert!(
            message.contains(&format!("no {} view", name.view()))
                && message.contains("run `ingest migrate`"),
            "{message}"
        );
    }
    let tables = match &storage.database {
        Database::Sqlite { .. } => "SELECT COUNT(*) FROM sqlite_master",
        Database::Postgres { .. } => {
            "SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema()"
        }
    };
    let expected = match backend {
        Backend::Sqlite => 1,
        Backend::Postgres => 0,
    };
    assert_eq!(storage.scalar(tables).await, expected, "nothing created");
}

// ---- both backends give the same rows -----------------------------------------

/// Three devices, four sensors over two hours, an alert that fires and
/// resolves and one that stays open and is acknowledged, a command
/// acknowledged and one left queued. Returns the device that stays
/// connected (so `online` does not change while the reports run).
async fn scripted_session(server: &TestServer, a: u64, b: u64) -> ControlDevice {
    let mut ops = server.ops().await;
    put(&mut ops, too_hot()).await;
    let token_a = server.register("dev-a").await;
    let mut dev_a = server.ingest(&token_a).await;
    let mut dev_b = server.ingest(&server.register("dev-b").await).await;
    let mut dev_c = server.ingest(&server.register("dev-c").await).await;
    let temperatures: Vec<(u64, f64)> = [30.0, 41.0, 45.0, 38.0, 34.0]
        .iter()
        .enumerate()
        .map(|(i, &v)| (a + i as u64 * SEC, v))
        .collect();
    upload(
        &mut dev_a,
        vec![
            batch(
                1,
                vec![
                    series("temperature", "Cel", &temperatures),
                    series("humidity", "%", &[(a + 10 * SEC, 50.5)]),
                ],
            ),
            batch(
                2,
                vec![
                    series("temperature", "Cel", &[(b, 20.25), (b + MIN, 21.75)]),
                    series("humidity", "%", &[(b + 10 * SEC, 49.5)]),
                ],
            ),
        ],
    )
    .await
    .unwrap();
    upload(
        &mut dev_b,
        vec![batch(
            1,
            vec![
                series("temperature", "Cel", &[(a + 30 * SEC, 50.0)]),
                series(
                    "pressure",
                    "hPa",
                    &[(a + 30 * SEC, 1013.25), (b + 30 * SEC, 1012.75)],
                ),
            ],
        )],
    )
    .await
    .unwrap();
    upload(
        &mut dev_c,
        vec![batch(
            1,
            vec![series("humidity", "%", &[(b + 5 * SEC, 60.0)])],
        )],
    )
    .await
    .unwrap();

    let open: Vec<_> = ops
        .list_alerts(pb::ListAlertsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(open.len(), 1, "dev-b's alert is open: {open:?}");
    ops.ack_alert(pb::AckAlertRequest {
        alert_id: open[0].alert_id,
    })
    .await
    .unwrap();

    let mut device = ControlDevice::connect(server, &token_a).await;
    let mut sender = server.ops().await;
    let sending = tokio::spawn(async move {
        send_command(&mut sender, "dev-a", ping(), 0, 5000)
            .await
            .unwrap()
    });
    let ping = device.command().await;
    device
        .ack(ping.command_id, pb::CommandAckState::Done, "pong")
        .await;
    assert_eq!(sending.await.unwrap().state(), pb::CommandState::Acked);
    let interval = pb::Command {
        kind: Some(pb::command::Kind::SetSamplingInterval(
            pb::SetSamplingInterval { interval_ms: 500 },
        )),
        ..Default::default()
    };
    let queued = send_command(&mut ops, "dev-b", interval, 0, 0)
        .await
        .unwrap();
    assert_eq!(queued.state(), pb::CommandState::Queued);
    device
}

/// Columns that hold the wall clock, not the data: masked before comparing
/// (a NULL stays NULL).
fn wall_clock_columns(name: ReportName) -> &'static [&'static str] {
    match name {
        ReportName::DeviceStatus => &[
            "last_seen_unix_nano",
            "last_seen_utc",
            "last_upload_unix_nano",
            "last_upload_utc",
            "seconds_since_last_upload",
        ],
        ReportName::AlertHistory => &["acked_unix_nano", "acked_utc", "seconds_to_ack"],
        ReportName::CommandLog => &[
            "created_unix_nano",
            "created_utc",
            "sent_unix_nano",
            "sent_utc",
            "finished_unix_nano",
            "finished_utc",
            "expires_unix_nano",
            "expires_utc",
            "seconds_to_delivery",
            "seconds_to_ack",
        ],
        ReportName::ReadingsHourly | ReportName::ReadingsDaily | ReportName::LatestReadings => &[],
    }
}

/// Every report through the library, as JSON lines: (columns, masked rows).
async fn all_reports(
    database: &Database,
) -> Vec<(ReportName, Vec<String>, Vec<serde_json::Value>)> {
    let mut db = ReportDb::open(database).await.unwrap();
    let mut reports = Vec::new();
    for name in ReportName::ALL {
        let query = ReportQuery::new(name);
        let columns = db.prepare(&query).await.unwrap().columns().to_vec();
        let mut json = Vec::new();
        let count = db
            .run(&query, &mut *Format::Json.writer(&mut json))
            .await
            .unwrap();
        let rows: Vec<serde_json::Value> = String::from_utf8(json)
            .unwrap()
            .lines()
            .map(|line| {
                let mut row: serde_json::Value = serde_json::from_str(line).unwrap();
                for column in wall_clock_columns(name) {
                    let value = row.get_mut(*column).unwrap();
                    if !value.is_null() {
                        *value = "<wall clock>".into();
                    }
                }
                row
            })
            .collect();
        assert_eq!(rows.len() as u64, count);
        reports.push((name, columns, rows));
    }
    db.close().await.unwrap();
    reports
}

fn json_values<T: Into<serde_json::Value>>(
    values: impl IntoIterator<Item = T>,
) -> Vec<serde_json::Value> {
    values.into_iter().map(Into::into).collect()
}

fn column_of<'a>(rows: &'a [serde_json::Value], column: &str) -> Vec<&'a serde_json::Value> {
    rows.iter().map(|r| &r[column]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_postgres_give_the_same_reports() {
    // Hours in the last day, so readings_24h does not depend on the minute.
    let (a, b) = (hour_start(5), hour_start(3));
    let sqlite = TestServer::start(Backend::Sqlite).await.unwrap();
    let _online_a = scripted_session(&sqlite, a, b).await;
    let on_sqlite = all_reports(&sqlite.storage.database).await;

    // What the session did, as the reports show it.
    let rows = |name: ReportName| &on_sqlite.iter().find(|r| r.0 == name).unwrap().2;
    assert_eq!(rows(ReportName::ReadingsHourly).len(), 8);
    let hourly = rows(ReportName::ReadingsHourly);
    assert_eq!(
        hourly[0],
        serde_json::json!({
            "device_id": "dev-a", "sensor": "humidity", "unit": "%",
            "hour_unix_nano": a, "hour_utc": utc(a),
            "reading_count": 1, "min_value": 50.5, "max_value": 50.5, "avg_value": 50.5,
        })
    );
    assert_eq!(
        hourly[2],
        serde_json::json!({
            "device_id": "dev-a", "sensor": "temperature", "unit": "Cel",
            "hour_unix_nano": a, "hour_utc": utc(a),
            "reading_count": 5, "min_value": 30.0, "max_value": 45.0, "avg_value": 37.6,
        })
    );
    let latest = rows(ReportName::LatestReadings);
    assert_eq!(latest.len(), 5);
    assert_eq!(
        column_of(latest, "value"),
        json_values([49.5, 21.75, 1012.75, 50.0, 60.0])
            .iter()
            .collect::<Vec<_>>()
    );
    let status = rows(ReportName::DeviceStatus);
    assert_eq!(
        column_of(status, "online"),
        json_values([1, 0, 0]).iter().collect::<Vec<_>>()
    );
    assert_eq!(
        column_of(status, "readings_24h"),
        json_values([9, 3, 1]).iter().collect::<Vec<_>>()
    );
    assert_eq!(
        column_of(status, "open_alerts"),
        json_values([0, 1, 0]).iter().collect::<Vec<_>>()
    );
    let alerts = rows(ReportName::AlertHistory);
    assert_eq!(
        column_of(alerts, "state"),
        json_values(["resolved", "acked"])
            .iter()
            .collect::<Vec<_>>()
    );
    assert_eq!(alerts[0]["fired_unix_nano"], serde_json::json!(a + SEC));
    assert_eq!(alerts[0]["seconds_to_resolve"], serde_json::json!(3.0));
    let commands = rows(ReportName::CommandLog);
    assert_eq!(
        column_of(commands, "state"),
        json_values(["acked", "queued"]).iter().collect::<Vec<_>>()
    );
    assert_eq!(commands[0]["result"], "pong");
    assert!(commands[1]["seconds_to_ack"].is_null());

    let Some(pg) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let _online_a = scripted_session(&pg, a, b).await;
    let on_postgres = all_reports(&pg.storage.database).await;
    for (sqlite, postgres) in on_sqlite.iter().zip(&on_postgres) {
        assert_eq!(sqlite.1, postgres.1, "columns of {}", sqlite.0);
        assert_eq!(sqlite.2, postgres.2, "rows of {}", sqlite.0);
    }
}

/// The table names its columns as the view does (issue 25: command_log's
/// table showed sent_utc, finished_utc and expires_utc, which the view did
/// not have): every header of `--format table` is a column of the view,
/// which `--format csv` names as they are.
async fn every_table_column_is_a_view_column(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let _online_a = scripted_session(&server, hour_start(5), hour_start(3)).await;
    for name in ReportName::ALL {
        let name = name.view();
        let csv = report_ok(&server.storage, &[name, "--format", "csv"]).await;
        let view: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let table = report_ok(&server.storage, &[name]).await;
        let header = table.lines().next().unwrap();
        for column in header.split_whitespace() {
            assert!(
                view.contains(&column),
                "{name}: the table shows {column}, the view has {view:?}"
            );
        }
    }
}
