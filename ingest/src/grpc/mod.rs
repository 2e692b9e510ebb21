//! The gRPC API: one file per service. Handlers are thin: parse the request
//! into domain values, call the domain or storage layer, convert the answer;
//! every error becomes a `tonic::Status` in [`status`].

mod alert_messages;
pub mod batch_codec;
mod command_messages;
pub mod compression;
pub mod convert;
mod feed_messages;
pub mod ingest;
pub mod ops;
mod read_messages;
pub mod status;
pub mod transport_status;

pub use batch_codec::IngestRoutes;
pub use ingest::IngestService;
pub use ops::OpsService;
