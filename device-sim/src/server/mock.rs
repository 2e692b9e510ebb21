//! An in-process server for tests. Ingest keeps one device's committed
//! sequence the way the real server is specified to, and can be told to
//! break streams so the device's recovery path gets exercised; its Control
//! call is UNIMPLEMENTED (like an older server) unless the test scripts it
//! with a [`MockControl`]. Ops only registers devices.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use telemetry_proto::v1::ingest_server::{Ingest, IngestServer};
use telemetry_proto::v1::ops_server::{Ops, OpsServer};
use telemetry_proto::v1::{
    AlertEvent, AlertRule, Command, CommandAck, DeleteAlertRuleRequest, DeleteAlertRuleResponse,
    Device, DeviceMessage, GetCommandRequest, GetDeviceRequest, GetUploadCursorRequest,
    ListAlertRulesRequest, ListAlertRulesResponse, ListCommandsRequest, ListCommandsResponse,
    ListDevicesRequest, ListDevicesResponse, PutAlertRuleRequest, ReadingBatch,
    RegisterDeviceRequest, RegisterDeviceResponse, RegisterDevicesRequest, RegisterDevicesResponse,
    RegisteredDevice, ResetUploadCursorRequest, ResetUploadCursorResponse, SendCommandRequest,
    ServerMessage, UploadCursor, UploadSummary, WatchAlertsRequest,
};
use telemetry_proto::v1::{device_message, server_message};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// The one device token Ingest accepts, and the token Ops hands out.
pub const GOOD_TOKEN: &str = "good-token";
pub const OPS_TOKEN: &str = "ops-token";

#[derive(Debug, Default)]
pub struct Ledger {
    pub committed: u64,
    /// Every committed batch sequence, in commit order.
    pub stored: Vec<u64>,
    pub streams: u64,
    /// The most batches any one stream carried.
    pub largest_stream: u64,
    pub duplicates: u64,
}

#[derive(Clone, Default)]
pub struct MockIngest {
    pub ledger: Arc<Mutex<Ledger>>,
    /// Break every n-th stream with UNAVAILABLE when its third batch
    /// arrives, after committing the first two, like a storage failure
    /// mid-stream.
    pub break_every: Option<u64>,
    /// Serves Control when set.
    pub control: Option<MockControl>,
}

type ControlSender = mpsc::UnboundedSender<Result<ServerMessage, Status>>;

/// A scripted Control endpoint: the test reads what the device sends and
/// writes to the device's latest stream.
#[derive(Clone)]
pub struct MockControl {
    /// The latest stream, by number (counted from 1), while it is open.
    current: Arc<Mutex<Option<(u64, ControlSender)>>>,
    streams: Arc<Mutex<u64>>,
    from_device_tx: mpsc::UnboundedSender<DeviceMessage>,
    from_device: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<DeviceMessage>>>,
}

/// How long a test waits for the device before failing.
const WAIT: Duration = Duration::from_secs(5);

impl Default for MockControl {
    fn default() -> Self {
        let (from_device_tx, from_device) = mpsc::unbounded_channel();
        Self {
            current: Arc::default(),
            streams: Arc::default(),
            from_device_tx,
            from_device: Arc::new(tokio::sync::Mutex::new(from_device)),
        }
    }
}

impl MockControl {
    /// Control streams opened so far.
    pub fn streams(&self) -> u64 {
        *self.streams.lock().expect("streams")
    }

    /// Sends `command` on the device's open stream.
    pub fn command(&self, command_id: u64, kind: telemetry_proto::v1::command::Kind) {
        self.send(Ok(ServerMessage {
            msg: Some(server_message::Msg::Command(Command {
                command_id,
                kind: Some(kind),
                ..Command::default()
            })),
        }));
    }

    /// Sends a message, or ends the stream with an error status.
    pub fn send(&self, message: Result<ServerMessage, Status>) {
        let current = self.current.lock().expect("current");
        let (_, tx) = current
            .as_ref()
            .expect("the device has a Control stream open");
        tx.send(message).expect("the stream is open");
    }

    /// The next message the device sent, on any stream.
    pub async fn next(&self) -> device_message::Msg {
        let mut from_device = self.from_device.lock().await;
        let message = tokio::time::timeout(WAIT, from_device.recv())
            .await
            .expect("the device sends within 5 s")
            .expect("the mock keeps the channel");
        message.msg.expect("a message has content")
    }

    /// The next acknowledgement, skipping status reports.
    pub async fn next_ack(&self) -> CommandAck {
        loop {
            match self.next().await {
                device_message::Msg::Ack(ack) => return ack,
                device_message::Msg::Status(_) => {}
                device_message::Msg::Hello(hello) => panic!("hello instead of an ack: {hello:?}"),
            }
        }
    }

    /// The next hello, skipping status reports.
    pub async fn next_hello(&self) -> telemetry_proto::v1::DeviceHello {
        loop {
            match self.next().await {
                device_message::Msg::Hello(hello) => return hello,
                device_message::Msg::Status(_) => {}
                device_message::Msg::Ack(ack) => panic!("ack instead of a hello: {ack:?}"),
            }
        }
    }

    fn open(
        &self,
        mut inbound: Streaming<DeviceMessage>,
    ) -> UnboundedReceiverStream<Result<ServerMessage, Status>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let number = {
            let mut streams = self.streams.lock().expect("streams");
            *streams += 1;
            *streams
        };
        *self.current.lock().expect("current") = Some((number, tx));
        let from_device = self.from_device_tx.clone();
        let current = Arc::clone(&self.current);
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let _ = from_device.send(message);
            }
            // Like the real server: the call ends when the device closes
            // its side.
            let mut current = current.lock().expect("current");
            if current.as_ref().is_some_and(|(n, _)| *n == number) {
                *current = None;
            }
        });
        UnboundedReceiverStream::new(rx)
    }
}

fn check_auth<T>(request: &Request<T>) -> Result<(), Status> {
    check_token(request, GOOD_TOKEN)
}

fn check_token<T>(request: &Request<T>, token: &str) -> Result<(), Status> {
    let expected = format!("Bearer {token}");
    match request.metadata().get("authorization") {
        Some(value) if value.to_str().ok() == Some(expected.as_str()) => Ok(()),
        _ => Err(Status::unauthenticated("unknown device token")),
    }
}

#[tonic::async_trait]
impl Ingest for MockIngest {
    async fn upload_readings(
        &self,
        request: Request<Streaming<ReadingBatch>>,
    ) -> Result<Response<UploadSummary>, Status> {
        check_auth(&request)?;
        let stream_no = {
            let mut ledger = self.ledger.lock().expect("ledger");
            ledger.streams += 1;
            ledger.streams
        };
        let breaks = self.break_every.is_some_and(|n| stream_no % n == 0);
        let mut stream = request.into_inner();
        let mut summary = UploadSummary::default();
        let mut last_in_stream = 0;
        while let Some(batch) = stream.message().await? {
            if batch.sequence == 0 || batch.sequence <= last_in_stream {
                return Err(Status::invalid_argument("sequence not increasing"));
            }
            last_in_stream = batch.sequence;
            summary.batches_received += 1;
            {
                let mut ledger = self.ledger.lock().expect("ledger");
                ledger.largest_stream = ledger.largest_stream.max(summary.batches_received);
            }
            if breaks && summary.batches_received == 3 {
                // The third batch arrived but its commit "failed".
                return Err(Status::unavailable("injected storage failure"));
            }
            let mut ledger = self.ledger.lock().expect("ledger");
            if batch.sequence <= ledger.committed {
                ledger.duplicates += 1;
                summary.duplicate_batches += 1;
            } else {
                ledger.committed = batch.sequence;
                ledger.stored.push(batch.sequence);
                summary.batches_committed += 1;
                summary.readings_accepted += batch
                    .series
                    .iter()
                    .map(|s| s.value.len() as u64)
                    .sum::<u64>();
            }
            summary.committed_sequence = ledger.committed;
        }
        summary.committed_sequence = self.ledger.lock().expect("ledger").committed;
        Ok(Response::new(summary))
    }

    type ControlStream = UnboundedReceiverStream<Result<ServerMessage, Status>>;

    async fn control(
        &self,
        request: Request<Streaming<DeviceMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        check_auth(&request)?;
        match &self.control {
            Some(control) => Ok(Response::new(control.open(request.into_inner()))),
            None => Err(Status::unimplemented("not in the mock")),
        }
    }

    async fn get_upload_cursor(
        &self,
        request: Request<GetUploadCursorRequest>,
    ) -> Result<Response<UploadCursor>, Status> {
        check_auth(&request)?;
        Ok(Response::new(UploadCursor {
            device_id: "sim-00001".into(),
            committed_sequence: self.ledger.lock().expect("ledger").committed,
        }))
    }
}

#[derive(Clone, Default)]
pub struct MockOps {
    pub registered: Arc<Mutex<HashSet<String>>>,
}

#[tonic::async_trait]
impl Ops for MockOps {
    async fn register_device(
        &self,
        request: Request<RegisterDeviceRequest>,
    ) -> Result<Response<RegisterDeviceResponse>, Status> {
        check_token(&request, OPS_TOKEN)?;
        let request = request.into_inner();
        assert_eq!(request.labels.get("fleet").map(String::as_str), Some("sim"));
        if !self
            .registered
            .lock()
            .expect("registered")
            .insert(request.device_id.clone())
        {
            return Err(Status::already_exists("device id taken"));
        }
        Ok(Response::new(RegisterDeviceResponse {
            device: Some(Device {
                device_id: request.device_id,
                labels: request.labels,
                ..Device::default()
            }),
            token: GOOD_TOKEN.into(),
        }))
    }

    async fn register_devices(
        &self,
        request: Request<RegisterDevicesRequest>,
    ) -> Result<Response<RegisterDevicesResponse>, Status> {
        check_token(&request, OPS_TOKEN)?;
        let asked = request.into_inner().devices;
        let mut registered = self.registered.lock().expect("registered");
        // All or nothing, as the real server's one transaction.
        if let Some(taken) = asked.iter().find(|d| registered.contains(&d.device_id)) {
            return Err(Status::already_exists(format!(
                "device {} already exists",
                taken.device_id
            )));
        }
        let mut devices = Vec::with_capacity(asked.len());
        for request in asked {
            assert_eq!(request.labels.get("fleet").map(String::as_str), Some("sim"));
            registered.insert(request.device_id.clone());
            devices.push(RegisteredDevice {
                device_id: request.device_id,
                token: GOOD_TOKEN.into(),
                created_time_unix_nano: 0,
            });
        }
        Ok(Response::new(RegisterDevicesResponse { devices }))
    }

    async fn get_device(&self, _: Request<GetDeviceRequest>) -> Result<Response<Device>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn list_devices(
        &self,
        _: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn reset_upload_cursor(
        &self,
        _: Request<ResetUploadCursorRequest>,
    ) -> Result<Response<ResetUploadCursorResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    type WatchAlertsStream = tokio_stream::Empty<Result<AlertEvent, Status>>;
    type QueryReadingsStream =
        tokio_stream::Empty<Result<telemetry_proto::v1::ReadingsChunk, Status>>;

    async fn query_readings(
        &self,
        _: Request<telemetry_proto::v1::QueryReadingsRequest>,
    ) -> Result<Response<Self::QueryReadingsStream>, Status> {
        Err(Status::unimplemented("mock"))
    }

    type WatchReadingsStream =
        tokio_stream::Empty<Result<telemetry_proto::v1::ReadingsChunk, Status>>;

    async fn watch_readings(
        &self,
        _: Request<telemetry_proto::v1::WatchReadingsRequest>,
    ) -> Result<Response<Self::WatchReadingsStream>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn commit_readings_cursor(
        &self,
        _: Request<telemetry_proto::v1::CommitReadingsCursorRequest>,
    ) -> Result<Response<telemetry_proto::v1::ReadingsConsumer>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn list_readings_consumers(
        &self,
        _: Request<telemetry_proto::v1::ListReadingsConsumersRequest>,
    ) -> Result<Response<telemetry_proto::v1::ListReadingsConsumersResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn delete_readings_consumer(
        &self,
        _: Request<telemetry_proto::v1::DeleteReadingsConsumerRequest>,
    ) -> Result<Response<telemetry_proto::v1::DeleteReadingsConsumerResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn watch_alerts(
        &self,
        _: Request<WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn put_alert_rule(
        &self,
        _: Request<PutAlertRuleRequest>,
    ) -> Result<Response<AlertRule>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn list_alert_rules(
        &self,
        _: Request<ListAlertRulesRequest>,
    ) -> Result<Response<ListAlertRulesResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn delete_alert_rule(
        &self,
        _: Request<DeleteAlertRuleRequest>,
    ) -> Result<Response<DeleteAlertRuleResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn list_alerts(
        &self,
        _: Request<telemetry_proto::v1::ListAlertsRequest>,
    ) -> Result<Response<telemetry_proto::v1::ListAlertsResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn ack_alert(
        &self,
        _: Request<telemetry_proto::v1::AckAlertRequest>,
    ) -> Result<Response<telemetry_proto::v1::Alert>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn send_command(
        &self,
        _: Request<SendCommandRequest>,
    ) -> Result<Response<Command>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn get_command(
        &self,
        _: Request<GetCommandRequest>,
    ) -> Result<Response<Command>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn list_commands(
        &self,
        _: Request<ListCommandsRequest>,
    ) -> Result<Response<ListCommandsResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn rotate_device_token(
        &self,
        _: Request<telemetry_proto::v1::RotateDeviceTokenRequest>,
    ) -> Result<Response<telemetry_proto::v1::RotateDeviceTokenResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn list_device_credentials(
        &self,
        _: Request<telemetry_proto::v1::ListDeviceCredentialsRequest>,
    ) -> Result<Response<telemetry_proto::v1::DeviceCredentials>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn revoke_device_credential(
        &self,
        _: Request<telemetry_proto::v1::RevokeDeviceCredentialRequest>,
    ) -> Result<Response<telemetry_proto::v1::DeviceCredentials>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn bind_device_certificate(
        &self,
        _: Request<telemetry_proto::v1::BindDeviceCertificateRequest>,
    ) -> Result<Response<telemetry_proto::v1::DeviceCredentials>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn disable_device(
        &self,
        _: Request<telemetry_proto::v1::DisableDeviceRequest>,
    ) -> Result<Response<telemetry_proto::v1::DeviceCredentials>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn enable_device(
        &self,
        _: Request<telemetry_proto::v1::EnableDeviceRequest>,
    ) -> Result<Response<telemetry_proto::v1::DeviceCredentials>, Status> {
        Err(Status::unimplemented("mock"))
    }
}

/// Serves `ingest` (and an Ops service that registers anything) on an
/// ephemeral local port until the test's runtime ends.
pub async fn serve(ingest: MockIngest) -> SocketAddr {
    serve_both(ingest, MockOps::default()).await
}

/// A listener on an ephemeral local port, and its address.
pub async fn local_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

pub async fn serve_both(ingest: MockIngest, ops: MockOps) -> SocketAddr {
    let (listener, addr) = local_listener().await;
    tokio::spawn(serve_on(listener, ingest, ops));
    addr
}

/// Serves on `listener`; for tests that start the server late.
pub async fn serve_on(listener: TcpListener, ingest: MockIngest, ops: MockOps) {
    let served = tonic::transport::Server::builder()
        .add_service(IngestServer::new(ingest))
        .add_service(OpsServer::new(ops))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await;
    served.expect("mock server runs");
}
