//! The `telemetry.v1` API shared by the `ingest` server and its clients
//! (`device-sim`, the operator CLI, tests).
//!
//! The source of truth is `telemetry/v1/telemetry.proto`; everything here is
//! generated from it at build time.

/// Generated messages, clients and servers of package `telemetry.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("telemetry.v1");
}

pub mod codec;
pub mod raw;

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/telemetry_descriptor.bin"));
