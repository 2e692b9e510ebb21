//! telemetry-ingest: devices stream sensor readings over gRPC; the server
//! validates them, commits them to SQLite or PostgreSQL and answers each
//! upload with a summary.
//!
//! Where a reading goes:
//!
//! - [`tls`]: TLS accepted in front of tonic, with certificates that reload
//!   without a restart; every connection's address and verified client
//!   certificate ([`tls::ConnectionInfo`]) for the auth layer.
//! - [`handshake`]: a connection must send its HTTP/2 preface in time.
//! - [`auth`]: a tower layer authenticates every call (device or ops token)
//!   before any handler runs.
//! - [`grpc`]: one file per service; thin handlers, one status mapping;
//!   [`grpc::transport_status`] makes tonic's framing errors precise for
//!   every method, [`grpc::batch_codec`] decodes batches with a bound on
//!   what they allocate, [`grpc::compression`] lists gzip and zstd.
//! - [`domain`]: values that passed validation, free text included
//!   ([`domain::text`]: nothing either database or a terminal cannot take).
//! - [`rate_limit`]: per-device readings and stream-open rates.
//! - [`upload`]: an upload stream: validate each batch ([`domain::reading`]),
//!   hand it to the writer, tally the summary ([`domain::summary`]).
//! - [`storage::writer`]: group commit of many streams' batches; bounded, so
//!   a slow database slows devices through HTTP/2 flow control. Each group
//!   is judged against the alert rules ([`alerts::judge`]) and its alert
//!   events are written in the same transaction as its readings;
//!   [`alerts`] also holds the rules, the feed of committed events and the
//!   WatchAlerts streams.
//! - [`storage`]: one interface, a module per backend, migrations in
//!   `migrations/{sqlite,postgres}`; the writer also keeps the hourly
//!   rollup ([`storage::rollup`]) the reporting views read.
//! - [`retention`]: removes old readings and rollups in small steps.
//! - [`reports`]: the public reporting views read back, read-only
//!   (`ingest report`).
//!
//! - [`telemetry`]: logs (text or JSON) and, with the `otel` feature, OTLP
//!   trace export of streams, batches and group commits.
//!
//! [`server::run`] wires it together; [`cli`] is the `ingest` command line.

pub mod alerts;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod domain;
pub mod grpc;
pub mod handshake;
pub mod metrics;
pub mod rate_limit;
pub mod reports;
pub mod retention;
pub mod server;
pub mod shutdown;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod upload;

pub use config::{AlertsConfig, Config, Limits};
pub use server::run;
