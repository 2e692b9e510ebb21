//! The fleet against the real ingest server in this process: everything it
//! sends is stored once, whatever the compression, over mutual TLS, with a
//! server that comes up late; commands reach its devices.

use std::path::Path;

use clap::Parser;
use ingest::auth::{OpsTokenSource, resolve_ops_token};
use ingest::storage::Database;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1::ops_client::OpsClient;
use telemetry_proto::v1::{Device, GetDeviceRequest};
use tokio::sync::oneshot;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::config::{Args, Config};
use crate::server::local::LocalServer;

/// A real server on an ephemeral port, its data in a new temporary
/// directory (kept while the test holds it).
async fn start_server() -> (tempfile::TempDir, LocalServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = LocalServer::start(dir.path(), "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("server starts");
    (dir, server)
}

async fn run_fleet(server: &LocalServer, dir: &Path, report: &Path) -> serde_json::Value {
    run_fleet_for(server, dir, report, "1s").await
}

async fn run_fleet_for(
    server: &LocalServer,
    dir: &Path,
    report: &Path,
    duration: &str,
) -> serde_json::Value {
    run_fleet_with(&server.url, &server.ops_token, dir, report, duration, &[]).await
}

async fn run_fleet_with(
    url: &str,
    ops_token: &str,
    dir: &Path,
    report: &Path,
    duration: &str,
    extra: &[&str],
) -> serde_json::Value {
    let token_file = dir.join("ops-token-for-the-fleet");
    std::fs::write(&token_file, ops_token).expect("token file");
    let mut argv = vec![
        "device-sim",
        "--server",
        url,
        "--ops-token-file",
        token_file.to_str().expect("utf-8 path"),
        "--data-dir",
        dir.to_str().expect("utf-8 path"),
        "--devices",
        "3",
        "--sample-rate",
        "200",
        "--batch-size",
        "10",
        "--batches-per-stream",
        "3",
        "--duration",
        duration,
        "--quiet",
        "--report-json",
        report.to_str().expect("utf-8 path"),
    ];
    argv.extend_from_slice(extra);
    let config = Config::from_args(Args::try_parse_from(argv).expect("args")).expect("config");
    let code = super::run(config).await.expect("fleet runs");
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    serde_json::from_slice(&std::fs::read(report).expect("report")).expect("JSON")
}

/// Runs the fleet for `duration` while `operator` acts on the server with
/// an ops client of its own; the fleet's report.
async fn run_fleet_while(
    server: &LocalServer,
    dir: &Path,
    duration: &str,
    operator: impl AsyncFnOnce(Ops),
) -> serde_json::Value {
    let report_path = dir.join("r.json");
    let (report, ()) = tokio::join!(
        run_fleet_for(server, dir, &report_path, duration),
        operator(ops_client(server)),
    );
    report
}

type Ops = OpsClient<InterceptedService<Channel, Bearer>>;

fn ops_client(server: &LocalServer) -> Ops {
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .expect("endpoint")
        .connect_lazy();
    OpsClient::with_interceptor(channel, Bearer::new(&server.ops_token).expect("token"))
}

/// Polls the server's view of `device_id` until `condition` holds; fails
/// after 20 s.
async fn wait_for_device(
    ops: &mut Ops,
    device_id: &str,
    what: &str,
    condition: impl Fn(&Device) -> bool,
) -> Device {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let device = ops
            .get_device(GetDeviceRequest {
                device_id: device_id.into(),
            })
            .await
            .map(tonic::Response::into_inner);
        match device {
            Ok(device) if condition(&device) => return device,
            other => assert!(
                std::time::Instant::now() < deadline,
                "{device_id}: not {what} within 20 s: {other:?}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Calls refused because the device is disabled, by the server's count.
async fn refused_as_disabled(server: &LocalServer) -> f64 {
    let (status, text) = ingest::server::admin::get(server.admin, "/metrics")
        .await
        .expect("scrape");
    assert_eq!(status, 200);
    ingest::server::admin::sum(
        &text,
        "auth_failures_total",
        &[("reason", "device_disabled")],
    )
}

/// Waits until the server has refused `at_least` calls as disabled; fails
/// after 20 s.
async fn wait_for_refusals(server: &LocalServer, at_least: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while refused_as_disabled(server).await < at_least {
        assert!(
            std::time::Instant::now() < deadline,
            "the disabled device stopped retrying"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn stored_readings(database: &Path) -> u64 {
    let url = format!("sqlite://{}", database.display());
    let mut conn: sqlx::SqliteConnection = sqlx::Connection::connect(&url)
        .await
        .expect("open database");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM readings")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    n as u64
}

/// The fleet against the real server: every reading sent is stored
/// once, and a second run of the same devices resumes without
/// duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_against_the_real_server_stores_everything_once() {
    let (dir, server) = start_server().await;
    let first = run_fleet(&server, dir.path(), &dir.path().join("r1.json")).await;
    let second = run_fleet(&server, dir.path(), &dir.path().join("r2.json")).await;
    let database = server.database.clone();
    server.stop().await.expect("server stops cleanly");

    for report in [&first, &second] {
        assert!(report["readings_sent"].as_u64().expect("number") > 0);
        assert_eq!(report["readings_accepted"], report["readings_sent"]);
        assert_eq!(report["duplicate_batches"], 0);
        assert_eq!(report["readings_rejected"], 0);
    }
    let accepted = first["readings_accepted"].as_u64().expect("number")
        + second["readings_accepted"].as_u64().expect("number");
    assert_eq!(stored_readings(&database).await, accepted);
}

/// The server's metrics agree with the fleet's report: every reading
/// sent is counted once, under its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_reading_counts_add_up_to_what_the_fleet_sent() {
    let (dir, server) = start_server().await;
    let report = run_fleet(&server, dir.path(), &dir.path().join("r.json")).await;
    let (status, text) = ingest::server::admin::get(server.admin, "/metrics")
        .await
        .expect("scrape");
    server.stop().await.expect("server stops cleanly");
    assert_eq!(status, 200);
    let sent = report["readings_sent"].as_u64().expect("number") as f64;
    assert!(sent > 0.0);
    let sum = |labels: &[(&str, &str)]| {
        ingest::server::admin::sum(&text, "ingest_readings_total", labels)
    };
    assert_eq!(sum(&[]), sent, "{text}");
    assert_eq!(
        sum(&[("outcome", "committed")]),
        report["readings_accepted"].as_u64().expect("number") as f64
    );
}

/// Each compression against the real server, same workload, own
/// devices: everything sent is stored, and the bytes written to the
/// network are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_fleets_store_everything_and_count_their_bytes() {
    let (dir, server) = start_server().await;
    let mut per_reading = Vec::new();
    for compression in ["none", "gzip", "zstd"] {
        let prefix = format!("{compression}-");
        let report = run_fleet_with(
            &server.url,
            &server.ops_token,
            dir.path(),
            &dir.path().join(format!("{compression}.json")),
            "2s",
            &["--compression", compression, "--device-prefix", &prefix],
        )
        .await;
        assert_eq!(report["settings"]["compression"], compression);
        let accepted = report["readings_accepted"].as_u64().expect("number");
        assert!(accepted > 0, "{compression}: {report}");
        assert_eq!(
            report["readings_accepted"], report["readings_sent"],
            "{compression}"
        );
        assert_eq!(report["readings_rejected"], 0, "{compression}");
        let wire = report["wire_bytes_sent"].as_u64().expect("number");
        assert!(wire > 0, "{compression}: {report}");
        let bytes = report["wire_bytes_per_reading"].as_f64().expect("number");
        assert!(
            (bytes - wire as f64 / accepted as f64).abs() < 1e-6,
            "{report}"
        );
        per_reading.push((compression, bytes));
    }
    let database = server.database.clone();
    server.stop().await.expect("server stops cleanly");
    // Readings are 16 bytes of timestamp and value before framing; the
    // timestamps' common high bytes alone make a compressed reading
    // clearly smaller (about 13 bytes against 20 when this was written).
    let plain = per_reading[0].1;
    for &(compression, bytes) in &per_reading[1..] {
        assert!(
            bytes < 0.9 * plain,
            "{compression} is not smaller on the wire: {per_reading:?}"
        );
    }
    let total: u64 = ["none", "gzip", "zstd"]
        .iter()
        .map(|c| {
            let path = dir.path().join(format!("{c}.json"));
            let report: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).expect("report")).expect("JSON");
            report["readings_accepted"].as_u64().expect("number")
        })
        .sum();
    assert_eq!(stored_readings(&database).await, total);
}

/// The fleet starts before its server: channels connect lazily, through
/// the counting connector, and registration and uploads wait it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_started_before_its_server_gets_everything_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A free port, released for the server to take later.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let token = resolve_ops_token(&OpsTokenSource::Generated {
        data_dir: dir.path().to_owned(),
    })
    .expect("token");
    let url = format!("http://{addr}");
    let report_path = dir.path().join("late.json");
    let fleet = run_fleet_with(
        &url,
        token.expose(),
        dir.path(),
        &report_path,
        "3s",
        &["--compression", "gzip"],
    );
    let (report, server) = tokio::join!(fleet, async {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        LocalServer::start(dir.path(), addr)
            .await
            .expect("server starts")
    });
    let database = server.database.clone();
    server.stop().await.expect("server stops cleanly");
    assert!(
        report["readings_accepted"].as_u64().expect("number") > 0,
        "{report}"
    );
    assert_eq!(report["readings_accepted"], report["readings_sent"]);
    assert!(report["wire_bytes_sent"].as_u64().expect("number") > 0);
    assert_eq!(
        stored_readings(&database).await,
        report["readings_accepted"].as_u64().expect("number")
    );
}

/// Commands through the real server: delivered on the Control stream,
/// carried out, acknowledged, and counted in the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_obey_commands_sent_through_the_real_server() {
    use telemetry_proto::v1::command::Kind;
    use telemetry_proto::v1::{
        Command, CommandState, Ping, SendCommandRequest, SetSamplingInterval,
    };

    let (dir, server) = start_server().await;
    let report = run_fleet_while(&server, dir.path(), "3s", async |mut ops| {
        // Wait until the device holds its Control stream.
        wait_for_device(&mut ops, "sim-00001", "online", |d| d.online).await;
        let mut send = async |kind: Kind| {
            ops.send_command(SendCommandRequest {
                device_id: "sim-00001".into(),
                command: Some(Command {
                    kind: Some(kind),
                    ..Command::default()
                }),
                ttl_millis: 0,
                wait_millis: 2000,
            })
            .await
            .expect("command stored")
            .into_inner()
        };
        let pong = send(Kind::Ping(Ping {})).await;
        assert_eq!(pong.state(), CommandState::Acked, "{pong:?}");
        assert_eq!(pong.result, "pong");
        let slower = send(Kind::SetSamplingInterval(SetSamplingInterval {
            interval_ms: 100,
        }))
        .await;
        assert_eq!(slower.state(), CommandState::Acked, "{slower:?}");
        assert_eq!(slower.result, "interval 100 ms");
    })
    .await;
    server.stop().await.expect("server stops cleanly");
    assert_eq!(report["commands_received"], 2);
    assert_eq!(report["commands_done"], 2);
    assert_eq!(report["control_unsupported_devices"], 0);
    assert_eq!(report["readings_accepted"], report["readings_sent"]);
}

/// An operator disables a device in the middle of a run and enables it
/// again: the device stops (its Control stream too), keeps retrying while
/// refused, says so once, and resumes uploading and its Control stream
/// when enabled, with nothing lost or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_device_waits_and_resumes_when_enabled() {
    use telemetry_proto::v1::{DisableDeviceRequest, EnableDeviceRequest};

    let (dir, server) = start_server().await;
    let report = run_fleet_while(&server, dir.path(), "12s", async |mut ops| {
        let id = "sim-00001";
        wait_for_device(&mut ops, id, "uploading", |d| {
            d.online && d.committed_sequence > 0
        })
        .await;
        let refused_before = refused_as_disabled(&server).await;
        ops.disable_device(DisableDeviceRequest {
            device_id: id.into(),
        })
        .await
        .expect("disable");
        // The server ends its streams; the device is refused, and
        // tries again (more than once) rather than giving up.
        wait_for_device(&mut ops, id, "offline", |d| !d.online).await;
        wait_for_refusals(&server, refused_before + 1.0).await;
        let stopped = wait_for_device(&mut ops, id, "offline", |d| !d.online).await;
        wait_for_refusals(&server, refused_before + 3.0).await;
        let still = wait_for_device(&mut ops, id, "offline", |d| !d.online).await;
        assert_eq!(
            still.committed_sequence, stopped.committed_sequence,
            "nothing stored while disabled"
        );

        ops.enable_device(EnableDeviceRequest {
            device_id: id.into(),
        })
        .await
        .expect("enable");
        wait_for_device(&mut ops, id, "back online and uploading", |d| {
            d.online && d.committed_sequence > stopped.committed_sequence
        })
        .await;
    })
    .await;
    let database = server.database.clone();
    server.stop().await.expect("server stops cleanly");
    assert_eq!(report["devices_failed"], 0, "{report:#}");
    assert_eq!(report["disabled_by_operator"], 1, "said once: {report:#}");
    assert_eq!(report["dropped_batches"], 0, "{report:#}");
    assert_eq!(
        stored_readings(&database).await,
        report["readings_sent"].as_u64().expect("number"),
        "every reading sent stored once: {report:#}"
    );
}

/// `--anomalies` against a server of its own (not `--local-server`): the
/// ops token installs the demo rules there, for the simulated devices only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_install_their_rules_on_any_server_the_ops_token_allows() {
    use telemetry_proto::v1::ListAlertRulesRequest;
    use telemetry_proto::v1::device_selector::Selector;

    let (dir, server) = start_server().await;
    let report = run_fleet_with(
        &server.url,
        &server.ops_token,
        dir.path(),
        &dir.path().join("r.json"),
        "1s",
        &["--anomalies"],
    )
    .await;
    let rules = ops_client(&server)
        .list_alert_rules(ListAlertRulesRequest::default())
        .await
        .expect("rules")
        .into_inner()
        .rules;
    server.stop().await.expect("server stops cleanly");
    assert_eq!(report["devices_failed"], 0, "{report:#}");
    let mut ids: Vec<&str> = rules.iter().map(|r| r.rule_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        ["demo-humidity-silent", "demo-pressure-jump", "demo-too-hot"]
    );
    for rule in &rules {
        let Some(Selector::Labels(labels)) = rule.devices.as_ref().and_then(|d| d.selector.clone())
        else {
            panic!("{} selects more than the simulated devices", rule.rule_id);
        };
        assert_eq!(labels.labels.get("fleet").map(String::as_str), Some("sim"));
    }
}

/// The fleet over mutual TLS to the real server: an https:// --server,
/// the CA and a client certificate, through the counting connector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_over_mutual_tls_stores_everything_and_counts_its_bytes() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).expect("write");
        path
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let issue = |names: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &ca)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    };
    let ca_path = write("ca.pem", ca.pem());
    let (server_cert, server_key) = issue(vec!["127.0.0.1".into()]);
    let (client_cert, client_key) = issue(vec!["sim-fleet".into()]);
    let mut tls = ingest::transport::TlsSettings::new(
        write("server.pem", server_cert),
        write("server.key", server_key),
    )
    .with_client_auth(ca_path.clone(), ingest::transport::ClientAuth::Require);
    tls.poll_interval = std::time::Duration::from_secs(60);

    let token = resolve_ops_token(&OpsTokenSource::Generated {
        data_dir: dir.path().to_owned(),
    })
    .expect("token");
    let database = dir.path().join("telemetry.db");
    let mut config = ingest::Config::new(
        dir.path().to_owned(),
        Database::Sqlite {
            path: database.clone(),
        },
        OpsTokenSource::Value(token.clone()),
    );
    config.tls = Some(tls);
    let (listener, addr) = crate::server::mock::local_listener().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(ingest::run(config, listener, async {
        let _ = stopped.await;
    }));

    let client_cert = write("client.pem", client_cert);
    let client_key = write("client.key", client_key);
    let report = run_fleet_with(
        &format!("https://{addr}"),
        token.expose(),
        dir.path(),
        &dir.path().join("tls.json"),
        "2s",
        &[
            "--tls-ca",
            ca_path.to_str().expect("utf-8"),
            "--tls-cert",
            client_cert.to_str().expect("utf-8"),
            "--tls-key",
            client_key.to_str().expect("utf-8"),
        ],
    )
    .await;
    let _ = stop.send(());
    server.await.expect("joins").expect("server stops cleanly");
    let accepted = report["readings_accepted"].as_u64().expect("number");
    assert!(accepted > 0, "{report}");
    assert_eq!(report["readings_accepted"], report["readings_sent"]);
    assert!(report["wire_bytes_sent"].as_u64().expect("number") > 0);
    assert_eq!(stored_readings(&database).await, accepted);
}
