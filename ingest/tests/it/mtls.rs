//! Devices identified by their certificates over mutual TLS: a bound
//! certificate stands for its device, cannot write as another, can be
//! required, and its revocation ends the streams that used it.

use std::time::{Duration, Instant};

use crate::common::pki::{TestCert, TestPki};
use crate::common::*;
use ingest::transport::ClientAuth;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ingest_client::IngestClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

backend_tests!(
    a_bound_certificate_identifies_its_device_without_a_token,
    a_certificate_cannot_write_as_another_device,
    require_mtls_refuses_a_token_alone,
    revoking_a_certificate_ends_the_streams_it_opened,
);

async fn mtls_server(backend: Backend, pki: &TestPki) -> Option<TestServer> {
    let (settings, _) = pki.server_settings();
    let settings = settings.with_client_auth(pki.ca_path(), ClientAuth::Optional);
    TestServer::start_tls(backend, pki, settings).await
}

/// Registers `id` with `cert` bound (and `require_mtls`); returns its token.
async fn register_bound(
    server: &TestServer,
    id: &str,
    cert: &TestCert,
    require_mtls: bool,
) -> String {
    let reply = server
        .tls_ops()
        .await
        .register_device(pb::RegisterDeviceRequest {
            device_id: id.into(),
            certificate_pem: cert.cert_pem.clone(),
            require_mtls,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let listed = server
        .tls_ops()
        .await
        .list_device_credentials(pb::ListDeviceCredentialsRequest {
            device_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.certificate_sha256, cert.fingerprint().to_string());
    assert_eq!(listed.require_mtls, require_mtls);
    reply.token
}

/// An Ingest client on its own connection, presenting `cert` and, if
/// given, a bearer token.
async fn client(server: &TestServer, cert: Option<&TestCert>, token: Option<&str>) -> Ingest {
    let channel = server.tls_channel(cert).await.unwrap();
    let bearer = token.map_or_else(Bearer::none, |token| Bearer::new(token).unwrap());
    IngestClient::with_interceptor(channel, bearer)
}

async fn cursor_of(client: &mut Ingest) -> Result<pb::UploadCursor, tonic::Status> {
    client
        .get_upload_cursor(pb::GetUploadCursorRequest {})
        .await
        .map(tonic::Response::into_inner)
}

async fn a_bound_certificate_identifies_its_device_without_a_token(backend: Backend) {
    let pki = TestPki::new("devices");
    let Some(server) = mtls_server(backend, &pki).await else {
        return;
    };
    let cert = pki.client_cert("dev-a");
    register_bound(&server, "dev-a", &cert, false).await;
    let mut device = client(&server, Some(&cert), None).await;
    assert_eq!(cursor_of(&mut device).await.unwrap().device_id, "dev-a");
    let summary = upload(&mut device, vec![simple_batch(1, 4)]).await.unwrap();
    assert_eq!(summary.committed_sequence, 1);
    let stored = server
        .storage
        .scalar(
            "SELECT COUNT(*) FROM readings r JOIN sensors s ON s.pk = r.sensor_pk \
             JOIN devices d ON d.pk = s.device_pk WHERE d.device_id = 'dev-a'",
        )
        .await;
    assert_eq!(stored, 4);
    // A URI SAN names the device too.
    let by_uri = pki.client_cert_with_sans("gateway-7", &["urn:device:dev-u"]);
    register_bound(&server, "dev-u", &by_uri, false).await;
    let mut device = client(&server, Some(&by_uri), None).await;
    assert_eq!(cursor_of(&mut device).await.unwrap().device_id, "dev-u");
    // Without a certificate or a token: nothing to go on.
    let refused = cursor_of(&mut client(&server, None, None).await)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
}

async fn a_certificate_cannot_write_as_another_device(backend: Backend) {
    let pki = TestPki::new("devices");
    let Some(server) = mtls_server(backend, &pki).await else {
        return;
    };
    let cert_a = pki.client_cert("dev-a");
    register_bound(&server, "dev-a", &cert_a, false).await;
    let token_b = server.register("dev-b").await;

    // A's bound certificate with B's token.
    let mut mixed = client(&server, Some(&cert_a), Some(&token_b)).await;
    let refused = upload(&mut mixed, vec![simple_batch(1, 2)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("different devices"),
        "{}",
        refused.message()
    );

    // A's bound certificate with an unknown token is refused too.
    let mut mixed = client(&server, Some(&cert_a), Some("dev_not_a_token")).await;
    let refused = cursor_of(&mut mixed).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // A certificate bound to no device identifies no one: a fleet
    // certificate, with B's token, acts as B.
    let fleet = pki.client_cert("fleet-gateway");
    let mut b_via_fleet = client(&server, Some(&fleet), Some(&token_b)).await;
    assert_eq!(
        cursor_of(&mut b_via_fleet).await.unwrap().device_id,
        "dev-b"
    );

    // A certificate bound to dev-c that names someone else.
    let misnamed = pki.client_cert("dev-x");
    register_bound(&server, "dev-c", &misnamed, false).await;
    let refused = cursor_of(&mut client(&server, Some(&misnamed), None).await)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("does not name it"),
        "{}",
        refused.message()
    );

    // B's own token works, and nothing was written for B.
    let mut b = client(&server, None, Some(&token_b)).await;
    assert_eq!(cursor_of(&mut b).await.unwrap().committed_sequence, 0);
    assert_eq!(server.storage.count_readings().await, 0);
}

async fn require_mtls_refuses_a_token_alone(backend: Backend) {
    let pki = TestPki::new("devices");
    let Some(server) = mtls_server(backend, &pki).await else {
        return;
    };
    let cert = pki.client_cert("dev-a");
    let token = register_bound(&server, "dev-a", &cert, true).await;
    let refused = cursor_of(&mut client(&server, None, Some(&token)).await)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("requires mutual TLS"),
        "{}",
        refused.message()
    );
    // With its certificate, with or without the token.
    cursor_of(&mut client(&server, Some(&cert), Some(&token)).await)
        .await
        .unwrap();
    cursor_of(&mut client(&server, Some(&cert), None).await)
        .await
        .unwrap();
    // Another certificate naming it is not the bound one.
    let other = pki.client_cert("dev-a");
    let refused = cursor_of(&mut client(&server, Some(&other), Some(&token)).await)
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("bound to another certificate"),
        "{}",
        refused.message()
    );

    // Lifted without rebinding: the token alone works again.
    let listed = server
        .tls_ops()
        .await
        .bind_device_certificate(pb::BindDeviceCertificateRequest {
            device_id: "dev-a".into(),
            certificate_pem: String::new(),
            require_mtls: Some(false),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!listed.require_mtls);
    assert_eq!(listed.certificate_sha256, cert.fingerprint().to_string());
    cursor_of(&mut client(&server, None, Some(&token)).await)
        .await
        .unwrap();
}

async fn revoking_a_certificate_ends_the_streams_it_opened(backend: Backend) {
    let pki = TestPki::new("devices");
    let Some(server) = mtls_server(backend, &pki).await else {
        return;
    };
    let cert = pki.client_cert("dev-a");
    let token = register_bound(&server, "dev-a", &cert, false).await;
    let (tx, rx) = mpsc::channel(4);
    let mut by_cert = client(&server, Some(&cert), None).await;
    let upload_stream =
        tokio::spawn(async move { by_cert.upload_readings(ReceiverStream::new(rx)).await });
    // A stream of the same device on its token is not affected.
    let (token_tx, token_rx) = mpsc::channel(4);
    let mut by_token = client(&server, None, Some(&token)).await;
    let token_stream = tokio::spawn(async move {
        by_token
            .upload_readings(ReceiverStream::new(token_rx))
            .await
    });
    tx.send(simple_batch(1, 3)).await.unwrap();
    let mut probe = client(&server, Some(&cert), None).await;
    eventually("the batch committed", Duration::from_secs(10), async || {
        cursor_of(&mut probe).await.unwrap().committed_sequence >= 1
    })
    .await;

    let revoked_at = Instant::now();
    server
        .tls_ops()
        .await
        .revoke_device_credential(pb::RevokeDeviceCredentialRequest {
            device_id: "dev-a".into(),
            credential: Some(pb::revoke_device_credential_request::Credential::Certificate(true)),
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), upload_stream)
        .await
        .expect("the certificate's stream outlived its revocation")
        .unwrap()
        .unwrap_err();
    assert!(
        revoked_at.elapsed() < Duration::from_secs(1),
        "{:?}",
        revoked_at.elapsed()
    );
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert!(
        ended.message().contains("certificate"),
        "{}",
        ended.message()
    );
    assert!(
        ended.message().contains("up to sequence 1"),
        "{}",
        ended.message()
    );
    drop(tx);
    // New calls on the certificate alone are refused; the token goes on.
    let refused = cursor_of(&mut client(&server, Some(&cert), None).await)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    token_tx.send(simple_batch(2, 3)).await.unwrap();
    drop(token_tx);
    let summary = token_stream.await.unwrap().unwrap().into_inner();
    assert_eq!(summary.committed_sequence, 2);
}
