//! The device registry: RegisterDevice, RegisterDevices (and the CLI's
//! --from-file), GetDevice, ListDevices.

use std::collections::HashMap;

use crate::common::*;
use ingest::Limits;
use telemetry_proto::v1 as pb;
use tonic::Code;

backend_tests!(
    register_then_get,
    invalid_and_duplicate_registrations_are_refused,
    list_devices_pages_through_all,
    bulk_registration_returns_working_tokens_in_order,
    bulk_registration_is_all_or_nothing,
    bulk_registration_is_limited_per_call,
    cli_registers_a_csv_file_and_names_a_bad_line,
);

fn asked(id: &str) -> pb::RegisterDeviceRequest {
    pb::RegisterDeviceRequest {
        device_id: id.into(),
        labels: HashMap::from([("site".to_owned(), "lab".to_owned())]),
        ..Default::default()
    }
}

async fn bulk_registration_returns_working_tokens_in_order(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    // More than one statement's worth (500 rows), so chunking is covered.
    let ids: Vec<String> = (0..1203).map(|n| format!("bulk-{n:05}")).collect();
    let answer = ops
        .register_devices(pb::RegisterDevicesRequest {
            devices: ids.iter().map(|id| asked(id)).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let answered: Vec<&str> = answer
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    assert_eq!(answered, ids.iter().map(String::as_str).collect::<Vec<_>>());
    let tokens: std::collections::HashSet<&str> =
        answer.devices.iter().map(|d| d.token.as_str()).collect();
    assert_eq!(tokens.len(), ids.len(), "every token is new");
    assert!(answer.devices.iter().all(|d| d.created_time_unix_nano > 0));

    // Each token acts as its own device, and only as it.
    for n in [0, 600, 1202] {
        let registered = &answer.devices[n];
        let mut ingest = server.ingest(&registered.token).await;
        upload(&mut ingest, vec![simple_batch(1, 3)]).await.unwrap();
        let device = server.device(&registered.device_id).await;
        assert_eq!(device.committed_sequence, 1, "{}", registered.device_id);
        assert_eq!(device.labels["site"], "lab");
    }
    assert_eq!(server.device("bulk-00001").await.committed_sequence, 0);
    let stored = server
        .storage
        .scalar("SELECT COUNT(*) FROM device_tokens")
        .await;
    assert_eq!(stored, 1203, "one token row per device");
}

async fn bulk_registration_is_all_or_nothing(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    server.register("taken-1").await;
    let refused = |devices: Vec<pb::RegisterDeviceRequest>| {
        let mut ops = ops.clone();
        async move {
            ops.register_devices(pb::RegisterDevicesRequest { devices })
                .await
                .unwrap_err()
        }
    };

    let taken = refused(vec![asked("new-1"), asked("taken-1"), asked("new-2")]).await;
    assert_eq!(taken.code(), Code::AlreadyExists);
    assert!(taken.message().contains("taken-1"), "{}", taken.message());

    let invalid = refused(vec![asked("new-1"), asked("has space")]).await;
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid.message().starts_with("devices[1]: "),
        "{}",
        invalid.message()
    );

    let twice = refused(vec![asked("new-1"), asked("new-2"), asked("new-1")]).await;
    assert_eq!(twice.code(), Code::InvalidArgument);
    assert!(twice.message().contains("devices[2]") && twice.message().contains("new-1"));

    let empty = refused(Vec::new()).await;
    assert_eq!(empty.code(), Code::InvalidArgument);

    for id in ["new-1", "new-2"] {
        let missing = ops
            .get_device(pb::GetDeviceRequest {
                device_id: id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound, "{id} was not registered");
    }
    // A refused call leaves nothing behind that a retry would trip on.
    let answer = ops
        .register_devices(pb::RegisterDevicesRequest {
            devices: vec![asked("new-1"), asked("new-2")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.devices.len(), 2);
}

async fn bulk_registration_is_limited_per_call(backend: Backend) {
    let limits = Limits {
        max_register_devices: 3,
        ..Limits::default()
    };
    let Some(server) = TestServer::start_with(backend, limits).await else {
        return;
    };
    let mut ops = server.ops().await;
    let four = (0..4).map(|n| asked(&format!("d-{n}"))).collect();
    let over = ops
        .register_devices(pb::RegisterDevicesRequest { devices: four })
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::InvalidArgument);
    assert!(over.message().contains("at most 3"), "{}", over.message());
    let three = (0..3).map(|n| asked(&format!("d-{n}"))).collect();
    ops.register_devices(pb::RegisterDevicesRequest { devices: three })
        .await
        .unwrap();
}

async fn register_file(server: &TestServer, file: &std::path::Path, more: &[&str]) -> CliRun {
    let mut args = vec!["devices", "register", "--from-file", file.to_str().unwrap()];
    args.extend(more);
    server.operator_cli(&args).await
}

async fn cli_registers_a_csv_file_and_names_a_bad_line(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fleet.csv");
    let mut csv = String::from("device_id,display_name,site\n");
    for n in 0..7 {
        csv.push_str(&format!("csv-{n},Pump {n},plant-{}\n", n % 2));
    }
    std::fs::write(&file, csv).unwrap();
    let run = register_file(&server, &file, &["--chunk", "3"]).await;
    assert!(run.success, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[0], "device_id,token");
    assert_eq!(lines.len(), 8, "{}", run.stdout);
    let (id, token) = lines[7].split_once(',').unwrap();
    assert_eq!(id, "csv-6");
    let mut ingest = server.ingest(token).await;
    upload(&mut ingest, vec![simple_batch(1, 1)]).await.unwrap();
    let device = server.device("csv-6").await;
    assert_eq!(device.display_name, "Pump 6");
    assert_eq!(device.labels["site"], "plant-0");
    assert!(
        run.stderr.contains("registered 7 devices"),
        "{}",
        run.stderr
    );

    // JSON lines; the third line's id is not valid: the first chunk lands,
    // the error names the line.
    let file = dir.path().join("more.jsonl");
    std::fs::write(
        &file,
        "{\"device_id\":\"j-1\"}\n{\"device_id\":\"j-2\"}\n{\"device_id\":\"bad id\"}\n",
    )
    .unwrap();
    let run = register_file(&server, &file, &["--chunk", "2", "--json"]).await;
    assert!(!run.success);
    assert_eq!(
        run.stdout.lines().count(),
        2,
        "the first chunk's tokens: {}",
        run.stdout
    );
    assert!(run.stderr.contains("more.jsonl line 3"), "{}", run.stderr);
    assert!(
        run.stderr.contains("2 of 3 devices registered"),
        "{}",
        run.stderr
    );
    let first: serde_json::Value =
        serde_json::from_str(run.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["device_id"], "j-1");
}

async fn register_then_get(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    let labels = HashMap::from([("site".to_owned(), "plant-3".to_owned())]);
    let reply = ops
        .register_device(pb::RegisterDeviceRequest {
            device_id: "pump-7".into(),
            display_name: "Pump 7".into(),
            labels: labels.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let registered = reply.device.unwrap();
    let got = ops
        .get_device(pb::GetDeviceRequest {
            device_id: "pump-7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, registered);
    assert_eq!(got.display_name, "Pump 7");
    assert_eq!(got.labels, labels);
    assert_eq!(got.committed_sequence, 0);
    assert_eq!(got.last_upload_time_unix_nano, 0);
    let age = now_nanos() - got.created_time_unix_nano;
    assert!(age < 60_000_000_000, "created just now");

    let missing = ops
        .get_device(pb::GetDeviceRequest {
            device_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("nope"));
}

async fn invalid_and_duplicate_registrations_are_refused(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    server.register("dev-1").await;
    let dup = ops
        .register_device(pb::RegisterDeviceRequest {
            device_id: "dev-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert!(dup.message().contains("dev-1"));

    let bad_requests = [
        pb::RegisterDeviceRequest {
            device_id: "".into(),
            ..Default::default()
        },
        pb::RegisterDeviceRequest {
            device_id: "has space".into(),
            ..Default::default()
        },
        pb::RegisterDeviceRequest {
            device_id: "ok".into(),
            labels: HashMap::from([("Bad Key".to_owned(), "v".to_owned())]),
            ..Default::default()
        },
    ];
    for request in bad_requests {
        let status = ops.register_device(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let status = ops
        .get_device(pb::GetDeviceRequest {
            device_id: "a b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

async fn list_devices_pages_through_all(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    // Upper and lower case sort byte-wise on both backends.
    let ids = ["B-2", "a-1", "c-3", "A-0", "b-1"];
    for id in ids {
        server.register(id).await;
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = ops
            .list_devices(pb::ListDevicesRequest {
                page_size: 2,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.devices.len() <= 2);
        seen.extend(page.devices.into_iter().map(|d| d.device_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, vec!["A-0", "B-2", "a-1", "b-1", "c-3"]);

    let bad = ops
        .list_devices(pb::ListDevicesRequest {
            page_size: 2,
            page_token: "zz".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}
