//! The client a device calls the server with, shared by its uploader
//! (`uploader.rs`) and its control channel (`control.rs`), so that neither
//! has to import the other; and how a failed call reads in a log line.

use telemetry_client::balance::Transport;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1::ingest_client::IngestClient;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;

/// `Ingest` with the device's token on every call. Uploads and Control
/// share it, and with it the compression and the transport (one server, or
/// several balanced per call).
pub type DeviceClient = IngestClient<InterceptedService<Transport, Bearer>>;

/// A short one-line description; `Status`'s own Display includes metadata
/// and details that only clutter a terminal.
pub fn describe(status: &Status) -> String {
    let message = status.message();
    if message.is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {message}", status.code())
    }
}

/// A client of `server` presenting `token`, connecting on its first call.
#[cfg(test)]
pub fn test_client(server: String, token: &str) -> DeviceClient {
    let channel = tonic::transport::Endpoint::from_shared(server)
        .expect("endpoint")
        .connect_lazy();
    IngestClient::with_interceptor(
        telemetry_client::balance::single(channel),
        Bearer::new(token).expect("token"),
    )
}
