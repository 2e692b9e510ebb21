//! Authentication: devices act only as themselves; Ops needs the ops token.

use crate::common::*;
use telemetry_proto::v1 as pb;
use tonic::Code;

backend_tests!(
    ingest_calls_without_a_valid_device_token_are_refused,
    a_device_can_only_write_as_itself,
    ops_calls_need_the_ops_token,
    tokens_are_stored_hashed,
);

async fn ingest_calls_without_a_valid_device_token_are_refused(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    server.register("dev-1").await;
    for bearer in [
        Bearer::none(),
        Bearer::new("dev_wrong").unwrap(),
        Bearer::new(OPS_TOKEN).unwrap(),
    ] {
        let mut client = server.ingest_with(bearer).await;
        let status = upload(&mut client, vec![simple_batch(1, 1)])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        let status = client
            .get_upload_cursor(pb::GetUploadCursorRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let status = upload(&mut server.ingest_with(Bearer::none()).await, vec![])
        .await
        .unwrap_err();
    assert!(
        status.message().contains("authorization: Bearer"),
        "{}",
        status.message()
    );
    assert_eq!(server.storage.count_readings().await, 0);
}

async fn a_device_can_only_write_as_itself(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let a = server.register("dev-a").await;
    server.register("dev-b").await;
    // There is no field to claim another identity: whatever A sends is A's.
    let mut client = server.ingest(&a).await;
    upload(&mut client, vec![simple_batch(1, 5)]).await.unwrap();
    let mut ops = server.ops().await;
    let get = |id: &str| pb::GetDeviceRequest {
        device_id: id.into(),
    };
    assert_eq!(
        ops.get_device(get("dev-a"))
            .await
            .unwrap()
            .into_inner()
            .committed_sequence,
        1
    );
    assert_eq!(
        ops.get_device(get("dev-b"))
            .await
            .unwrap()
            .into_inner()
            .committed_sequence,
        0
    );
    let owner = server
        .storage
        .scalar("SELECT MIN(s.device_pk) FROM readings r JOIN sensors s ON s.pk = r.sensor_pk")
        .await;
    let a_pk = server
        .storage
        .scalar("SELECT pk FROM devices WHERE device_id = 'dev-a'")
        .await;
    assert_eq!(owner, a_pk);
}

async fn ops_calls_need_the_ops_token(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let device_token = server.register("dev-1").await;
    for bearer in [
        Bearer::none(),
        Bearer::new("ops_wrong").unwrap(),
        Bearer::new(&device_token).unwrap(),
    ] {
        let mut ops = server.ops_with(bearer).await;
        let status = ops
            .list_devices(pb::ListDevicesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        let status = ops
            .register_device(pb::RegisterDeviceRequest {
                device_id: "x".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
}

async fn tokens_are_stored_hashed(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    assert!(token.starts_with("dev_") && token.len() == 68);
    let other = server.register("dev-2").await;
    assert_ne!(token, other);
    let stored_len = server
        .storage
        .scalar(
            "SELECT CAST(LENGTH(token_sha256) AS BIGINT) FROM devices WHERE device_id = 'dev-1'",
        )
        .await;
    assert_eq!(stored_len, 32, "a SHA-256, not the token");
}
