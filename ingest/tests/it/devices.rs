//! The device registry: RegisterDevice, GetDevice, ListDevices.

use std::collections::HashMap;

use crate::common::*;
use telemetry_proto::v1 as pb;
use tonic::Code;

backend_tests!(
    register_then_get,
    invalid_and_duplicate_registrations_are_refused,
    list_devices_pages_through_all,
);

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
