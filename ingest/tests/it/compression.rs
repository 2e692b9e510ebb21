//! What other gRPC clients meet: gzip and zstd on every service, with the
//! decompressed size bounded by --max-message-bytes, and server reflection
//! in both versions (v1 and v1alpha).

use std::time::Duration;

use crate::common::control::{ack, hello, ping, send_command};
use crate::common::*;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ingest_client::IngestClient;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codec::CompressionEncoding;

backend_tests!(
    a_gzip_client_is_served_on_every_call_kind,
    a_zstd_client_is_served_on_every_call_kind,
    a_compressed_message_is_bounded_after_decompression,
    reflection_answers_in_v1_and_v1alpha,
);

async fn a_gzip_client_is_served_on_every_call_kind(backend: Backend) {
    served_on_every_call_kind(backend, CompressionEncoding::Gzip, "gzip").await;
}

async fn a_zstd_client_is_served_on_every_call_kind(backend: Backend) {
    served_on_every_call_kind(backend, CompressionEncoding::Zstd, "zstd").await;
}

/// The `grpc-encoding` the server chose for a response, if any.
fn encoding_of(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get("grpc-encoding")
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Ops, then Ingest (upload and Control), with requests compressed by
/// `encoding` and compressed responses accepted; each answer must be
/// compressed too, and must equal what a plain client gets.
async fn served_on_every_call_kind(backend: Backend, encoding: CompressionEncoding, name: &str) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let compressed_ops =
        OpsClient::with_interceptor(server.channel().await, Bearer::new(OPS_TOKEN).unwrap())
            .send_compressed(encoding)
            .accept_compressed(encoding);

    // Unary Ops call, compressed both ways.
    let registered = compressed_ops
        .clone()
        .register_device(pb::RegisterDeviceRequest {
            device_id: "squeezed".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(encoding_of(registered.metadata()).as_deref(), Some(name));
    let token = registered.into_inner().token;
    let plain_token = server.register("plain").await;

    // Control: the Hello goes up compressed, a command comes down
    // compressed, the acknowledgement goes up compressed.
    let channel = server.channel().await;
    let compressed_ingest = |token: &str| {
        IngestClient::with_interceptor(channel.clone(), Bearer::new(token).unwrap())
            .send_compressed(encoding)
            .accept_compressed(encoding)
    };
    let mut ingest = compressed_ingest(&token);
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello(&format!("fw-{name}"))).await.unwrap();
    let control = ingest.control(ReceiverStream::new(rx)).await.unwrap();
    assert_eq!(encoding_of(control.metadata()).as_deref(), Some(name));
    let mut commands = control.into_inner();
    let mut ops = compressed_ops.clone();
    let sending = tokio::spawn(async move {
        send_command(&mut ops, "squeezed", ping(), 0, 10_000)
            .await
            .unwrap()
    });
    let command = tokio::time::timeout(Duration::from_secs(10), commands.message())
        .await
        .expect("no command arrived")
        .unwrap()
        .expect("the stream ended");
    let Some(pb::server_message::Msg::Command(command)) = command.msg else {
        panic!("expected a command, got {command:?}");
    };
    tx.send(ack(command.command_id, pb::CommandAckState::Done, "pong"))
        .await
        .unwrap();
    let acked = sending.await.unwrap();
    assert_eq!(acked.state(), pb::CommandState::Acked);
    assert_eq!(acked.result, "pong");

    // The same uploads from a compressing and from a plain device: the
    // summaries must be equal, field for field.
    let batches: Vec<_> = (1..=3).map(|s| simple_batch(s, 200)).collect();
    let summary = ingest
        .upload_readings(tokio_stream::iter(batches.clone()))
        .await
        .unwrap();
    assert_eq!(encoding_of(summary.metadata()).as_deref(), Some(name));
    let summary = summary.into_inner();
    let mut plain = server.ingest(&plain_token).await;
    let plain_summary = upload(&mut plain, batches).await.unwrap();
    assert_eq!(summary.readings_accepted, 600, "{summary:?}");
    assert_eq!(summary.committed_sequence, 3);
    assert_eq!(summary, plain_summary);
    assert_eq!(server.storage.count_readings().await, 1200);
    assert_eq!(cursor(&mut compressed_ingest(&token)).await, 3);

    // Listing: compressed for the client that accepts it, plain for the
    // one that does not, and the same devices either way.
    let listed = compressed_ops
        .clone()
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap();
    assert_eq!(encoding_of(listed.metadata()).as_deref(), Some(name));
    let plain_listed = server
        .ops()
        .await
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap();
    assert_eq!(encoding_of(plain_listed.metadata()), None);
    let listed = listed.into_inner();
    let squeezed = listed
        .devices
        .iter()
        .find(|d| d.device_id == "squeezed")
        .expect("listed");
    assert_eq!(squeezed.committed_sequence, 3);
    assert_eq!(squeezed.firmware_version, format!("fw-{name}"));
    assert!(squeezed.online, "its compressed Control stream is open");
    let plain_ids: Vec<_> = plain_listed
        .into_inner()
        .devices
        .into_iter()
        .map(|d| d.device_id)
        .collect();
    let ids: Vec<_> = listed.devices.into_iter().map(|d| d.device_id).collect();
    assert_eq!(ids, plain_ids);
    drop(tx);
}

/// A ReadingBatch with an unknown field: other clients' newer schemas carry
/// fields this server does not know, which it must skip, so padding there
/// makes a batch that is valid apart from its size.
#[derive(Clone, PartialEq, prost::Message)]
struct PaddedBatch {
    #[prost(uint64, tag = "1")]
    sequence: u64,
    #[prost(message, repeated, tag = "2")]
    series: Vec<pb::SensorSeries>,
    #[prost(bytes = "vec", tag = "1000")]
    padding: Vec<u8>,
}

const MAX_MESSAGE: usize = 64 * 1024;

/// Uploads one padded batch gzip-compressed, through tonic's generic
/// client: the generated one only sends the known fields.
async fn upload_padded(
    server: &TestServer,
    token: &str,
    sequence: u64,
    padding: usize,
) -> Result<pb::UploadSummary, tonic::Status> {
    let good = simple_batch(sequence, 10);
    let batch = PaddedBatch {
        sequence,
        series: good.series,
        padding: vec![b'x'; padding],
    };
    let mut grpc = tonic::client::Grpc::new(server.channel().await)
        .send_compressed(CompressionEncoding::Gzip)
        // A client's own limit on what it sends is not under test.
        .max_encoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter([batch]));
    Bearer::new(token).unwrap().authorize(&mut request);
    grpc.client_streaming(
        request,
        http::uri::PathAndQuery::from_static("/telemetry.v1.Ingest/UploadReadings"),
        tonic_prost::ProstCodec::<PaddedBatch, pb::UploadSummary>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

async fn a_compressed_message_is_bounded_after_decompression(backend: Backend) {
    let limits = ingest::Limits {
        max_message_bytes: MAX_MESSAGE,
        ..Default::default()
    };
    let Some(server) = TestServer::start_with(backend, limits).await else {
        return;
    };
    let token = server.register("bomber").await;

    // 1 MiB of one byte gzips to about 1 KiB: small on the wire, sixteen
    // times the limit once inflated.
    let bomb = upload_padded(&server, &token, 1, 1024 * 1024)
        .await
        .expect_err("the inflated message is over the limit");
    assert_eq!(bomb.code(), Code::ResourceExhausted, "{bomb:?}");
    assert!(
        bomb.message().contains("Error decompressing: size limit"),
        "the limit applies while inflating: {bomb:?}"
    );
    assert_eq!(server.storage.count_readings().await, 0);

    // The same batch inflating to under the limit is stored: the padding
    // itself is fine, only the size was refused. The server still answers.
    let summary = upload_padded(&server, &token, 2, MAX_MESSAGE / 2)
        .await
        .unwrap();
    assert_eq!(summary.readings_accepted, 10, "{summary:?}");
    assert_eq!(summary.committed_sequence, 2);
    assert_eq!(server.storage.count_readings().await, 10);
    assert_eq!(cursor(&mut server.ingest(&token).await).await, 2);
}

async fn reflection_answers_in_v1_and_v1alpha(backend: Backend) {
    use tonic_reflection::pb::{v1, v1alpha};

    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let expected = [
        "telemetry.v1.Ingest",
        "telemetry.v1.Ops",
        "grpc.health.v1.Health",
    ];

    // v1, plain, as grpcurl asks.
    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let reply = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("expected a service list: {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for service in expected {
        assert!(
            names.iter().any(|n| n == service),
            "v1: {service} in {names:?}"
        );
    }

    // v1alpha, as Python's grpcio-reflection asks; gzip both ways, since
    // reflection takes compression like every other service.
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await)
            .send_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Gzip);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let reply = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap();
    assert_eq!(encoding_of(reply.metadata()).as_deref(), Some("gzip"));
    let reply = reply.into_inner().message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("expected a service list: {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for service in expected {
        assert!(
            names.iter().any(|n| n == service),
            "v1alpha: {service} in {names:?}"
        );
    }
}
