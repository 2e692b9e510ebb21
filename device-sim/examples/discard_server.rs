//! A server that takes uploads and throws them away: for measuring the
//! simulator alone. It registers any device (the token is the device id),
//! reads every batch of every upload stream, answers each stream with a
//! summary that commits all of it, and counts readings. Control is
//! UNIMPLEMENTED, which device-sim accepts (devices run without it), and so
//! is the rest of Ops.
//!
//! ```sh
//! cargo run --release -p device-sim --example discard_server -- --listen 127.0.0.1:50070 &
//! device-sim --server http://127.0.0.1:50070 --ops-token x --data-dir /tmp/d \
//!     --devices 1000 --sample-rate 200 --batch-size 250 --connections 4 --duration 20s
//! ```
//!
//! It prints the readings it received per second, every second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ingest_server::{Ingest, IngestServer};
use telemetry_proto::v1::ops_server::{Ops, OpsServer};
use tonic::{Request, Response, Status, Streaming};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:50070")]
    listen: std::net::SocketAddr,
}

#[derive(Clone, Default)]
struct Discard {
    readings: Arc<AtomicU64>,
}

type Stream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for Discard {
    async fn upload_readings(
        &self,
        request: Request<Streaming<pb::ReadingBatch>>,
    ) -> Result<Response<pb::UploadSummary>, Status> {
        let mut stream = request.into_inner();
        let mut summary = pb::UploadSummary::default();
        while let Some(batch) = stream.message().await? {
            let n: usize = batch.series.iter().map(|s| s.value.len()).sum();
            self.readings.fetch_add(n as u64, Ordering::Relaxed);
            summary.batches_received += 1;
            summary.batches_committed += 1;
            summary.readings_accepted += n as u64;
            summary.committed_sequence = batch.sequence;
        }
        Ok(Response::new(summary))
    }

    type ControlStream = Stream<pb::ServerMessage>;

    async fn control(
        &self,
        _: Request<Streaming<pb::DeviceMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        Err(Status::unimplemented("discard server"))
    }

    async fn get_upload_cursor(
        &self,
        _: Request<pb::GetUploadCursorRequest>,
    ) -> Result<Response<pb::UploadCursor>, Status> {
        Ok(Response::new(pb::UploadCursor::default()))
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("discard server"))
}

#[tonic::async_trait]
impl Ops for Discard {
    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        let id = request.into_inner().device_id;
        Ok(Response::new(pb::RegisterDeviceResponse {
            token: id.clone(),
            device: Some(pb::Device {
                device_id: id,
                ..Default::default()
            }),
        }))
    }
    async fn register_devices(
        &self,
        request: Request<pb::RegisterDevicesRequest>,
    ) -> Result<Response<pb::RegisterDevicesResponse>, Status> {
        let devices = request
            .into_inner()
            .devices
            .into_iter()
            .map(|d| pb::RegisteredDevice {
                token: d.device_id.clone(),
                device_id: d.device_id,
                created_time_unix_nano: 0,
            })
            .collect();
        Ok(Response::new(pb::RegisterDevicesResponse { devices }))
    }
    async fn get_device(
        &self,
        _: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        unimplemented()
    }
    async fn list_devices(
        &self,
        _: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        unimplemented()
    }
    async fn reset_upload_cursor(
        &self,
        _: Request<pb::ResetUploadCursorRequest>,
    ) -> Result<Response<pb::ResetUploadCursorResponse>, Status> {
        unimplemented()
    }
    type WatchAlertsStream = Stream<pb::AlertEvent>;
    type QueryReadingsStream = Stream<pb::ReadingsChunk>;
    async fn query_readings(
        &self,
        _: Request<pb::QueryReadingsRequest>,
    ) -> Result<Response<Self::QueryReadingsStream>, Status> {
        unimplemented()
    }
    type WatchReadingsStream = Stream<pb::ReadingsChunk>;
    async fn watch_readings(
        &self,
        _: Request<pb::WatchReadingsRequest>,
    ) -> Result<Response<Self::WatchReadingsStream>, Status> {
        unimplemented()
    }
    async fn commit_readings_cursor(
        &self,
        _: Request<pb::CommitReadingsCursorRequest>,
    ) -> Result<Response<pb::ReadingsConsumer>, Status> {
        unimplemented()
    }
    async fn list_readings_consumers(
        &self,
        _: Request<pb::ListReadingsConsumersRequest>,
    ) -> Result<Response<pb::ListReadingsConsumersResponse>, Status> {
        unimplemented()
    }
    async fn delete_readings_consumer(
        &self,
        _: Request<pb::DeleteReadingsConsumerRequest>,
    ) -> Result<Response<pb::DeleteReadingsConsumerResponse>, Status> {
        unimplemented()
    }
    async fn watch_alerts(
        &self,
        _: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        unimplemented()
    }
    async fn put_alert_rule(
        &self,
        _: Request<pb::PutAlertRuleRequest>,
    ) -> Result<Response<pb::AlertRule>, Status> {
        unimplemented()
    }
    async fn list_alert_rules(
        &self,
        _: Request<pb::ListAlertRulesRequest>,
    ) -> Result<Response<pb::ListAlertRulesResponse>, Status> {
        unimplemented()
    }
    async fn delete_alert_rule(
        &self,
        _: Request<pb::DeleteAlertRuleRequest>,
    ) -> Result<Response<pb::DeleteAlertRuleResponse>, Status> {
        unimplemented()
    }
    async fn list_alerts(
        &self,
        _: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        unimplemented()
    }
    async fn ack_alert(
        &self,
        _: Request<pb::AckAlertRequest>,
    ) -> Result<Response<pb::Alert>, Status> {
        unimplemented()
    }
    async fn send_command(
        &self,
        _: Request<pb::SendCommandRequest>,
    ) -> Result<Response<pb::Command>, Status> {
        unimplemented()
    }
    async fn get_command(
        &self,
        _: Request<pb::GetCommandRequest>,
    ) -> Result<Response<pb::Command>, Status> {
        unimplemented()
    }
    async fn list_commands(
        &self,
        _: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        unimplemented()
    }

    async fn rotate_device_token(
        &self,
        _: Request<telemetry_proto::v1::RotateDeviceTokenRequest>,
    ) -> Result<Response<telemetry_proto::v1::RotateDeviceTokenResponse>, Status> {
        unimplemented()
    }

    async fn list_device_credentials(
        &self,
        _: Request<telemetry_proto::v1::ListDeviceCredentialsRequest>,
    ) -> Result<Response<telemetry_proto::v1::DeviceCredentials>, Status> {
        unimplemented()
    }

    async fn revoke_device_credential(
        &self,
        _: Request<telemetry_proto::v1::RevokeDeviceCredentialRequest>,
    ) -> Result<Response<telemetry_proto::v1::DeviceCredentials>, Status> {
        unimplemented()
    }

    async fn bind_device_certificate(
        &self,
        _: Request<telemetry_proto::v1::BindDeviceCertificateRequest>,
    ) -> Result<Response<telemetry_proto::v1::DeviceCredentials>, Status> {
        unimplemented()
    }

    async fn disable_device(
        &self,
        _: Request<telemetry_proto::v1::DisableDeviceRequest>,
    ) -> Result<Response<telemetry_proto::v1::DeviceCredentials>, Status> {
        unimplemented()
    }

    async fn enable_device(
        &self,
        _: Request<telemetry_proto::v1::EnableDeviceRequest>,
    ) -> Result<Response<telemetry_proto::v1::DeviceCredentials>, Status> {
        unimplemented()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let discard = Discard::default();
    let counter = discard.readings.clone();
    tokio::spawn(async move {
        let mut last = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = counter.load(Ordering::Relaxed);
            if now != last {
                println!("{} readings/s (total {now})", now - last);
            }
            last = now;
        }
    });
    println!("discarding on {}", args.listen);
    tonic::transport::Server::builder()
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_concurrent_streams(4096)
        .add_service(IngestServer::new(discard.clone()).max_decoding_message_size(64 * 1024 * 1024))
        .add_service(OpsServer::new(discard))
        .serve(args.listen)
        .await?;
    Ok(())
}
