//! telemetry-ingest: devices stream sensor readings over gRPC; the server
//! validates them, commits them to SQLite or PostgreSQL, judges them against
//! alert rules, steers devices with commands and gives operators the data
//! back.
//!
//! The folders, top to bottom (a module imports only those below it; see
//! `docs/architecture.md`, and `scripts/import-graph` checks it):
//!
//! - [`cli`]: the `ingest` command line: `serve` and the operator
//!   subcommands.
//! - [`server`]: the wiring: [`server::run`] assembles the services, the
//!   admin HTTP listener (`/metrics`, `/healthz`, `/readyz`), the cluster
//!   lease and the LISTEN connection that hears the other processes, and
//!   the [`Config`] it all runs from.
//! - [`grpc`]: one file per service; thin handlers (proto -> domain ->
//!   pipeline, control, alerts or storage), one status mapping.
//! - [`pipeline`]: the write path: an upload stream, the per-device rate
//!   limits, and the group commit that judges each group's readings and
//!   commits them with their alert events. Its entry,
//!   [`pipeline::Pipeline`], takes validated batches from any protocol.
//! - [`mqtt`]: the MQTT listener: devices speaking MQTT 3.1.1 or 5
//!   publish readings into the same pipeline; a PUBACK means committed.
//! - [`read`]: the read path: QueryReadings streams a fleet's history,
//!   raw or in buckets, page by page from storage in bounded memory, with
//!   resume tokens.
//! - [`feed`]: the readings feed: WatchReadings replays committed batches
//!   in commit order from a cursor, then follows new commits live; named
//!   consumers keep their cursors on the server.
//! - [`control`]: the durable command queue, device sessions and presence.
//! - [`alerts`]: rules, judging ([`alerts::judge`]), the feed of alert
//!   events and the WatchAlerts streams.
//! - [`auth`]: a tower layer that authenticates every call (device token,
//!   certificate or ops token), and the credentials' revocation watch.
//! - [`cluster`]: several processes on one database: replicas, who leads.
//! - [`retention`]: removes old readings, rollups and feed batches in small
//!   steps.
//! - [`reports`]: the public reporting views read back (`ingest report`).
//! - [`transport`]: TCP and TLS connections in front of tonic: certificates
//!   that reload without a restart, the HTTP/2 preface deadline, each
//!   connection's peer for the auth layer.
//! - [`metrics`]: the Prometheus registry and the handle that records.
//! - [`observability`]: logs (text or JSON) and, with the `otel` feature,
//!   OTLP trace export.
//! - [`storage`]: a leaf: one interface ([`storage::Store`]), a module per
//!   backend, the group transaction, the SQL, backups; migrations in
//!   `migrations/{sqlite,postgres}`.
//! - [`domain`]: values that passed validation, with no I/O.

pub mod alerts;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod control;
pub mod domain;
pub mod feed;
pub mod grpc;
pub mod metrics;
pub mod mqtt;
pub mod observability;
pub mod pipeline;
pub mod read;
pub mod reports;
pub mod retention;
pub mod server;
pub mod storage;
pub mod transport;

pub use server::config::{AlertsConfig, Config, Limits};
pub use server::run;
