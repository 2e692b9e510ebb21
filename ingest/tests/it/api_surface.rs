//! What generic gRPC tools see: health and server reflection, open without
//! a token, exposing both services with the right call kinds.

use crate::common::*;
use prost::Message;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

backend_tests!(health_and_reflection_are_served);

async fn reflect(
    client: &mut ServerReflectionClient<tonic::transport::Channel>,
    request: MessageRequest,
) -> MessageResponse {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    responses
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
}

async fn health_and_reflection_are_served(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "telemetry.v1.Ingest", "telemetry.v1.Ops"] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            reply.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service}"
        );
    }

    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let MessageResponse::ListServicesResponse(list) =
        reflect(&mut reflection, MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"telemetry.v1.Ingest") && names.contains(&"telemetry.v1.Ops"),
        "{names:?}"
    );

    let MessageResponse::FileDescriptorResponse(files) = reflect(
        &mut reflection,
        MessageRequest::FileContainingSymbol("telemetry.v1.Ingest".into()),
    )
    .await
    else {
        panic!("expected file descriptors");
    };
    let file = prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice())
        .unwrap();
    let kinds = |service: &str| -> Vec<(String, bool, bool)> {
        file.service
            .iter()
            .find(|s| s.name() == service)
            .unwrap()
            .method
            .iter()
            .map(|m| {
                (
                    m.name().to_owned(),
                    m.client_streaming(),
                    m.server_streaming(),
                )
            })
            .collect()
    };
    let ingest = kinds("Ingest");
    assert!(ingest.contains(&("UploadReadings".into(), true, false)));
    assert!(ingest.contains(&("Control".into(), true, true)));
    assert!(ingest.contains(&("GetUploadCursor".into(), false, false)));
    let ops = kinds("Ops");
    assert!(ops.contains(&("WatchAlerts".into(), false, true)));
    assert!(ops.contains(&("RegisterDevice".into(), false, false)));
    assert!(ops.contains(&("ResetUploadCursor".into(), false, false)));
}
