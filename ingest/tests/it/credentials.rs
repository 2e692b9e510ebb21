//! Device credentials: rotation with an overlap, revocation and disabling
//! that end open streams within a second, after what they already sent is
//! committed and answered; several named ops tokens.

use std::time::{Duration, Instant};

use crate::common::control::{ping, send_command};
use crate::common::*;
use telemetry_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

backend_tests!(
    a_rotation_overlaps_then_the_old_token_expires,
    a_device_holds_at_most_three_active_tokens,
    a_revocation_ends_an_open_upload_after_answering_its_batches,
    a_revocation_ends_an_open_control_stream,
    a_disabled_device_is_refused_until_enabled,
    credentials_are_listed_without_secrets_with_last_use,
    several_named_ops_tokens_work,
);

/// PostgreSQL, where a trigger can hold a batch in flight and show it: a
/// batch the server holds when the revocation lands is committed, and the
/// stream's answer names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_batch_is_committed_and_answered_before_the_revocation_ends_its_stream() {
    let Some(server) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut ops = server.ops().await;
    let token_id = credentials(&mut ops, "dev-1").await.tokens[0].credential_id;
    let (tx, upload) = open_upload(&server, &token).await;
    tx.send(simple_batch(1, 10)).await.unwrap();
    eventually("the first batch's commit", PATIENCE, || async {
        cursor_with(&server, &token).await.unwrap() == 1
    })
    .await;
    server
        .storage
        .execute(
            "CREATE FUNCTION hold_readings() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(0.4); RETURN NULL; END $$; \
             CREATE TRIGGER hold_readings AFTER INSERT ON readings \
             FOR EACH STATEMENT EXECUTE FUNCTION hold_readings();",
        )
        .await;
    tx.send(simple_batch(2, 10)).await.unwrap();
    eventually("the second batch inside its commit", PATIENCE, || async {
        server
            .storage
            .scalar(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event = 'PgSleep'",
            )
            .await
            == 1
    })
    .await;
    let revoked_at = Instant::now();
    revoke_token(&mut ops, "dev-1", token_id).await;
    let ended = ended_within_bound(
        upload,
        revoked_at,
        "the upload stream outlived its revoked token",
    )
    .await;
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert!(
        ended
            .message()
            .contains("batches up to sequence 2 are committed"),
        "{}",
        ended.message()
    );
    assert_eq!(server.storage.count_readings().await, 20);
    drop(tx);
}

/// A revocation must reach open streams within this.
const REVOCATION_BOUND: Duration = Duration::from_secs(1);

type OpenUpload =
    tokio::task::JoinHandle<Result<tonic::Response<pb::UploadSummary>, tonic::Status>>;

/// An upload stream left open; batches go in through the sender.
async fn open_upload(
    server: &TestServer,
    token: &str,
) -> (mpsc::Sender<pb::ReadingBatch>, OpenUpload) {
    let (tx, rx) = mpsc::channel(4);
    let mut client = server.ingest(token).await;
    let upload = tokio::spawn(async move { client.upload_readings(ReceiverStream::new(rx)).await });
    (tx, upload)
}

/// How an open upload stream ended, after a change at `since` that must
/// end it within [`REVOCATION_BOUND`].
async fn ended_within_bound(upload: OpenUpload, since: Instant, outlived: &str) -> tonic::Status {
    let ended = tokio::time::timeout(Duration::from_secs(10), upload)
        .await
        .expect(outlived)
        .unwrap()
        .unwrap_err();
    let took = since.elapsed();
    assert!(
        took < REVOCATION_BOUND,
        "the stream ended {took:?} after the change"
    );
    ended
}

async fn credentials(ops: &mut Ops, device: &str) -> pb::DeviceCredentials {
    ops.list_device_credentials(pb::ListDeviceCredentialsRequest {
        device_id: device.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn rotate(
    ops: &mut Ops,
    device: &str,
    overlap_millis: Option<u64>,
) -> Result<pb::RotateDeviceTokenResponse, tonic::Status> {
    ops.rotate_device_token(pb::RotateDeviceTokenRequest {
        device_id: device.into(),
        overlap_millis,
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn revoke_token(ops: &mut Ops, device: &str, id: i64) {
    ops.revoke_device_credential(pb::RevokeDeviceCredentialRequest {
        device_id: device.into(),
        credential: Some(pb::revoke_device_credential_request::Credential::TokenCredentialId(id)),
    })
    .await
    .unwrap();
}

/// How long a condition that changes with time (an expiry) or in the
/// background (a last-use write) may take.
const PATIENCE: Duration = Duration::from_secs(10);

async fn a_rotation_overlaps_then_the_old_token_expires(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let old = server.register("dev-1").await;
    let mut ops = server.ops().await;
    // An upload stream open on the old token when it expires ends with it.
    let (tx, on_old_token) = open_upload(&server, &old).await;
    tx.send(simple_batch(1, 5)).await.unwrap();

    let overlap = Duration::from_millis(1500);
    let rotated = rotate(&mut ops, "dev-1", Some(overlap.as_millis() as u64))
        .await
        .unwrap();
    let new = rotated.token;
    assert_ne!(new, old);
    let listed = rotated.credentials.unwrap();
    assert_eq!(listed.tokens.len(), 2);
    assert!(listed.tokens.iter().all(|t| t.active));
    let old_entry = &listed.tokens[0];
    assert_ne!(
        old_entry.expires_time_unix_nano, 0,
        "the old token got an expiry"
    );
    assert_eq!(listed.tokens[1].credential_id, rotated.credential_id);
    assert_eq!(listed.tokens[1].expires_time_unix_nano, 0);

    // During the overlap both work.
    cursor_with(&server, &old).await.unwrap();
    cursor_with(&server, &new).await.unwrap();

    // Then only the new one.
    eventually("the old token's expiry", PATIENCE, || async {
        cursor_with(&server, &old).await.is_err()
    })
    .await;
    let refused = cursor_with(&server, &old).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("expired"),
        "{}",
        refused.message()
    );
    assert_eq!(cursor_with(&server, &new).await.unwrap(), 1);

    let ended = tokio::time::timeout(Duration::from_secs(5), on_old_token)
        .await
        .expect("the old token's stream outlived its expiry")
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert!(ended.message().contains("expired"), "{}", ended.message());
    assert!(
        ended.message().contains("up to sequence 1"),
        "{}",
        ended.message()
    );
    drop(tx);
    let after = credentials(&mut ops, "dev-1").await;
    assert!(!after.tokens[0].active);
    assert!(after.tokens[1].active);
}

async fn a_device_holds_at_most_three_active_tokens(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let first = server.register("dev-1").await;
    let mut ops = server.ops().await;
    rotate(&mut ops, "dev-1", None).await.unwrap();
    rotate(&mut ops, "dev-1", Some(3_600_000)).await.unwrap();
    let refused = rotate(&mut ops, "dev-1", Some(3_600_000))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("3 active tokens"),
        "{}",
        refused.message()
    );
    assert_eq!(credentials(&mut ops, "dev-1").await.tokens.len(), 3);
    // A zero overlap retires the others at once, so it fits.
    let last = rotate(&mut ops, "dev-1", Some(0)).await.unwrap();
    let listed = last.credentials.unwrap();
    assert_eq!(listed.tokens.iter().filter(|t| t.active).count(), 1);
    assert_eq!(
        cursor_with(&server, &first).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(cursor_with(&server, &last.token).await.unwrap(), 0);

    let missing = rotate(&mut ops, "no-such-device", None).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

async fn a_revocation_ends_an_open_upload_after_answering_its_batches(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut ops = server.ops().await;
    let token_id = credentials(&mut ops, "dev-1").await.tokens[0].credential_id;
    let (tx, upload) = open_upload(&server, &token).await;
    tx.send(simple_batch(1, 10)).await.unwrap();
    eventually("the first batch's commit", PATIENCE, || async {
        cursor_with(&server, &token).await.unwrap() == 1
    })
    .await;
    // The second batch races the revocation: whichever wins, what the
    // answer calls committed is exactly what is stored.
    tx.send(simple_batch(2, 10)).await.unwrap();
    let revoked_at = Instant::now();
    revoke_token(&mut ops, "dev-1", token_id).await;
    let ended = ended_within_bound(
        upload,
        revoked_at,
        "the upload stream outlived its revoked token",
    )
    .await;
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert!(
        ended.message().contains("credential revoked"),
        "{}",
        ended.message()
    );
    let stored = server
        .storage
        .scalar("SELECT committed_sequence FROM devices WHERE device_id = 'dev-1'")
        .await;
    assert!(stored >= 1);
    assert!(
        ended
            .message()
            .contains(&format!("batches up to sequence {stored} are committed")),
        "answered {:?}, stored {stored}",
        ended.message()
    );
    assert_eq!(server.storage.count_readings().await, stored * 10);
    drop(tx);

    // New calls with it fail at once.
    let refused = cursor_with(&server, &token).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("revoked"),
        "{}",
        refused.message()
    );
}

async fn a_revocation_ends_an_open_control_stream(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut ops = server.ops().await;
    let token_id = credentials(&mut ops, "dev-1").await.tokens[0].credential_id;
    let mut device = ControlDevice::connect(&server, &token).await;
    // A command delivered and acknowledged: the session is live and its
    // acknowledgement recorded before the revocation.
    let sent = send_command(&mut ops, "dev-1", ping(), 60_000, 0)
        .await
        .unwrap();
    let command = device.command().await;
    assert_eq!(command.command_id, sent.command_id);
    device
        .ack(command.command_id, pb::CommandAckState::Done, "")
        .await;
    eventually("the acknowledgement", PATIENCE, || async {
        let c = server
            .ops()
            .await
            .get_command(pb::GetCommandRequest {
                command_id: sent.command_id,
            })
            .await
            .unwrap()
            .into_inner();
        c.state == pb::CommandState::Acked as i32
    })
    .await;

    let revoked_at = Instant::now();
    revoke_token(&mut ops, "dev-1", token_id).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), device.rx.message())
        .await
        .expect("the Control stream outlived its revoked token")
        .unwrap_err();
    let took = revoked_at.elapsed();
    assert!(
        took < REVOCATION_BOUND,
        "the stream ended {took:?} after the revocation"
    );
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert!(
        ended.message().contains("credential revoked"),
        "{}",
        ended.message()
    );
    drop(device);
}

async fn a_disabled_device_is_refused_until_enabled(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let other = server.register("dev-2").await;
    let mut ops = server.ops().await;
    let (tx, upload) = open_upload(&server, &token).await;
    tx.send(simple_batch(1, 3)).await.unwrap();
    eventually("the first batch's commit", PATIENCE, || async {
        cursor_with(&server, &token).await.unwrap() == 1
    })
    .await;

    let disabled_at = Instant::now();
    let listed = ops
        .disable_device(pb::DisableDeviceRequest {
            device_id: "dev-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(listed.disabled_time_unix_nano, 0);
    let ended = ended_within_bound(
        upload,
        disabled_at,
        "the upload stream outlived the device's disabling",
    )
    .await;
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert!(ended.message().contains("disabled"), "{}", ended.message());
    assert!(
        ended.message().contains("up to sequence 1"),
        "{}",
        ended.message()
    );
    drop(tx);

    let refused = cursor_with(&server, &token).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("dev-1 is disabled"),
        "{}",
        refused.message()
    );
    // Other devices are untouched.
    assert_eq!(cursor_with(&server, &other).await.unwrap(), 0);

    let listed = ops
        .enable_device(pb::EnableDeviceRequest {
            device_id: "dev-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.disabled_time_unix_nano, 0);
    assert_eq!(cursor_with(&server, &token).await.unwrap(), 1);
    let missing = ops
        .disable_device(pb::DisableDeviceRequest {
            device_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

async fn credentials_are_listed_without_secrets_with_last_use(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut ops = server.ops().await;
    let before = credentials(&mut ops, "dev-1").await;
    assert_eq!(before.tokens.len(), 1);
    assert_eq!(before.tokens[0].last_used_time_unix_nano, 0);
    assert!(before.certificate_sha256.is_empty());
    assert!(!before.require_mtls);
    let text = format!("{before:?}");
    assert!(!text.contains(&token[4..]), "a secret in the listing");

    cursor_with(&server, &token).await.unwrap();
    eventually("the token's last use", PATIENCE, || {
        let mut ops = ops.clone();
        async move { credentials(&mut ops, "dev-1").await.tokens[0].last_used_time_unix_nano != 0 }
    })
    .await;
    // At most once a minute: many calls write it once.
    let first = credentials(&mut ops, "dev-1").await.tokens[0].last_used_time_unix_nano;
    for _ in 0..5 {
        cursor_with(&server, &token).await.unwrap();
    }
    let uses = server
        .storage
        .scalar("SELECT COUNT(*) FROM device_tokens WHERE last_used_unix_nano IS NOT NULL")
        .await;
    assert_eq!(uses, 1);
    assert_eq!(
        credentials(&mut ops, "dev-1").await.tokens[0].last_used_time_unix_nano,
        first
    );
    let stored_hash = server
        .storage
        .scalar("SELECT COUNT(*) FROM device_tokens WHERE token_sha256 IS NOT NULL")
        .await;
    assert_eq!(stored_hash, 1);
}

async fn several_named_ops_tokens_work(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ops-tokens");
    std::fs::write(&file, "alice ops_alice_1\nci ops_ci_1\n").unwrap();
    let path = file.clone();
    let Some(server) = TestServer::start_configured(backend, move |c| {
        c.ops_token = ingest::auth::OpsTokenSource::File(path.clone());
    })
    .await
    else {
        return;
    };
    for token in ["ops_alice_1", "ops_ci_1"] {
        let mut ops = server.ops_with(Bearer::new(token).unwrap()).await;
        ops.register_device(pb::RegisterDeviceRequest {
            device_id: format!("dev-{token}"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let refused = server
        .ops_with(Bearer::new("ops_bob_1").unwrap())
        .await
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
}
