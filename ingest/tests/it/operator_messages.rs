//! The answers an operator meets in the first hour (issue 25): each names
//! the cause and the next step. Exact messages, on both backends where
//! storage answers.

use crate::common::alert_helpers::*;
use crate::common::pki::TestPki;
use crate::common::*;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::revoke_device_credential_request::Credential;
use tonic::Code;

backend_tests!(
    registering_an_existing_id_points_to_get_and_rotate_token,
    registering_or_binding_a_bound_certificate_names_its_device,
    unknown_rules_and_alerts_name_the_id_and_the_list_command,
    a_bad_sensor_name_in_a_rule_gives_the_allowed_characters,
    revoking_nothing_is_refused_with_the_reason,
    a_rule_for_an_unregistered_device_is_stored_with_a_warning,
    binding_a_certificate_naming_another_device_warns,
);

fn register_request(device_id: &str, certificate_pem: &str) -> pb::RegisterDeviceRequest {
    pb::RegisterDeviceRequest {
        device_id: device_id.into(),
        certificate_pem: certificate_pem.into(),
        ..Default::default()
    }
}

fn assert_status(status: &tonic::Status, code: Code, message: &str) {
    assert_eq!(
        (status.code(), status.message()),
        (code, message),
        "{status:?}"
    );
}

async fn registering_an_existing_id_points_to_get_and_rotate_token(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    server.register("pump-9").await;
    let status = server
        .ops()
        .await
        .register_device(register_request("pump-9", ""))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::AlreadyExists,
        "device pump-9 already exists: see it with `ingest devices get pump-9`; \
         to issue it a new token, `ingest devices rotate-token pump-9`",
    );
}

async fn registering_or_binding_a_bound_certificate_names_its_device(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let pki = TestPki::new("clash");
    let cert = pki.client_cert("pump-7");
    let mut ops = server.ops().await;
    ops.register_device(register_request("pump-7", &cert.cert_pem))
        .await
        .unwrap();
    let held = "that certificate is already bound to device pump-7";

    let status = ops
        .register_device(register_request("pump-9", &cert.cert_pem))
        .await
        .unwrap_err();
    assert_status(&status, Code::AlreadyExists, held);
    // pump-9 was not created by the refused registration.
    let status = ops
        .get_device(pb::GetDeviceRequest {
            device_id: "pump-9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    server.register("pump-8").await;
    let status = ops
        .bind_device_certificate(pb::BindDeviceCertificateRequest {
            device_id: "pump-8".into(),
            certificate_pem: cert.cert_pem.clone(),
            require_mtls: None,
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::AlreadyExists, held);
}

async fn unknown_rules_and_alerts_name_the_id_and_the_list_command(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    let status = ops
        .delete_alert_rule(pb::DeleteAlertRuleRequest {
            rule_id: "temp-high".into(),
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::NotFound,
        "no alert rule `temp-high`: see `ingest rules list`",
    );
    let status = ops
        .ack_alert(pb::AckAlertRequest { alert_id: 42 })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::NotFound,
        "no alert 42: see `ingest alerts list`",
    );
}

async fn a_bad_sensor_name_in_a_rule_gives_the_allowed_characters(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let status = server
        .ops()
        .await
        .put_alert_rule(pb::PutAlertRuleRequest {
            rule: Some(rule(
                "hot",
                "Temp C",
                pb::Severity::Warning,
                above(40.0, 35.0, 0),
            )),
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        "invalid alert rule: sensor name \"Temp C\" is invalid: use 1 to 255 lowercase ASCII \
         letters, digits, '_', '.', '-' or '/', starting with a lowercase letter",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_bearer_token_says_so_and_where_tokens_come_from() {
    let Some(server) = TestServer::start(Backend::Sqlite).await else {
        return;
    };
    let expected = "the bearer token is empty: an operator's token comes from \
                    --ops-token-file or INGEST_OPS_TOKEN, a device's from its credentials file";
    // `Bearer ` with nothing after, as a client with an empty token file
    // sends it; and `Bearer` alone.
    for header in ["Bearer ", "Bearer"] {
        let status = list_devices_with(&server, header).await;
        assert_status(&status, Code::Unauthenticated, expected);
    }
    // Anything else that is not a bearer token keeps its own message.
    assert_status(
        &list_devices_with(&server, "Basic abc").await,
        Code::Unauthenticated,
        "the authorization metadata must be `Bearer <token>`",
    );
}

/// ListDevices with `authorization: <header>` as given, refused.
async fn list_devices_with(server: &TestServer, header: &str) -> tonic::Status {
    let mut request = tonic::Request::new(pb::ListDevicesRequest::default());
    request
        .metadata_mut()
        .insert("authorization", header.parse().unwrap());
    server
        .ops_with(Bearer::none())
        .await
        .list_devices(request)
        .await
        .unwrap_err()
}

fn revoke(device: &str, credential: Credential) -> pb::RevokeDeviceCredentialRequest {
    pb::RevokeDeviceCredentialRequest {
        device_id: device.into(),
        credential: Some(credential),
    }
}

async fn revoking_nothing_is_refused_with_the_reason(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    server.register("pump-8").await;
    let mut ops = server.ops().await;
    let status = ops
        .revoke_device_credential(revoke("pump-8", Credential::Certificate(true)))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::FailedPrecondition,
        "device pump-8 has no certificate bound: nothing was revoked",
    );

    let credentials = ops
        .rotate_device_token(pb::RotateDeviceTokenRequest {
            device_id: "pump-8".into(),
            overlap_millis: None,
        })
        .await
        .unwrap()
        .into_inner()
        .credentials
        .unwrap();
    let first = credentials.tokens[0].credential_id;
    let revoked = ops
        .revoke_device_credential(revoke("pump-8", Credential::TokenCredentialId(first)))
        .await
        .unwrap()
        .into_inner();
    let at = revoked.tokens[0].revoked_time_unix_nano as i64;
    assert_ne!(at, 0);
    let status = ops
        .revoke_device_credential(revoke("pump-8", Credential::TokenCredentialId(first)))
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::FailedPrecondition,
        &format!(
            "token {first} of device pump-8 was already revoked at {}: nothing was revoked",
            ingest::domain::time::rfc3339(at)
        ),
    );
}

async fn a_rule_for_an_unregistered_device_is_stored_with_a_warning(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    server.register("pump-1").await;
    let mut ops = server.ops().await;
    let mut hot = too_hot();
    hot.devices = Some(pb::DeviceSelector {
        selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
            device_ids: vec!["pump-1".into(), "pmup-2".into(), "pump-3".into()],
        })),
    });
    let stored = ops
        .put_alert_rule(pb::PutAlertRuleRequest {
            rule: Some(hot.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stored.warnings,
        vec![
            "rule `too-hot` lists devices that are not registered: pmup-2, pump-3; it is stored \
             and applies to them once they register (see `ingest devices list`)"
        ]
    );
    let listed = ops
        .list_alert_rules(pb::ListAlertRulesRequest {})
        .await
        .unwrap()
        .into_inner()
        .rules;
    assert_eq!(listed.len(), 1, "the rule is stored");
    assert!(listed[0].warnings.is_empty(), "warnings are not stored");

    // Registered (here, or by another process: the database decides), no
    // warning.
    server.register("pmup-2").await;
    server.register("pump-3").await;
    let stored = ops
        .put_alert_rule(pb::PutAlertRuleRequest { rule: Some(hot) })
        .await
        .unwrap()
        .into_inner();
    assert!(stored.warnings.is_empty(), "{:?}", stored.warnings);
}

async fn binding_a_certificate_naming_another_device_warns(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    server.register("pump-8").await;
    let pki = TestPki::new("names");
    let mut ops = server.ops().await;
    let bind = |pem: &str| pb::BindDeviceCertificateRequest {
        device_id: "pump-8".into(),
        certificate_pem: pem.into(),
        require_mtls: None,
    };
    let bound = ops
        .bind_device_certificate(bind(&pki.client_cert("pump-7").cert_pem))
        .await
        .unwrap()
        .into_inner();
    assert!(!bound.certificate_sha256.is_empty(), "bound all the same");
    assert_eq!(
        bound.warnings,
        vec![
            "the certificate names pump-7, not pump-8 (subject CN, DNS SAN or URI SAN \
             urn:device:pump-8): it is bound, but over mutual TLS pump-8 will be refused with it"
        ]
    );
    let bound = ops
        .bind_device_certificate(bind(&pki.client_cert("pump-8").cert_pem))
        .await
        .unwrap()
        .into_inner();
    assert!(bound.warnings.is_empty(), "{:?}", bound.warnings);
}
