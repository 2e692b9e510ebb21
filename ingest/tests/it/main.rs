//! The end-to-end tests, one binary with a module per area: the real
//! server on 127.0.0.1:0, real HTTP/2 clients, both databases. One binary
//! links once, where a binary per file linked the server 24 times.
//!
//! `cargo test -p ingest --test it` runs them all; `... --test it
//! scale_out::` one area. Two tests keep binaries of their own, since they
//! change the whole process: `decode_fuzz` (a counting global allocator)
//! and `otel` (OTEL_* variables and the global tracing subscriber; needs
//! `--features otel`).

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod alerts;
mod alerts_durable;
mod api_surface;
mod auth;
mod backends_agree;
mod backup;
mod balance;
mod buffer_budget;
mod codec_buffers;
mod compression;
mod control;
mod credentials;
mod credentials_cli;
mod devices;
mod hostile;
mod inactivity_since;
mod lifecycle;
mod log_format;
mod metrics;
mod mqtt;
mod mtls;
mod operator_cli;
mod operator_messages;
mod readings_query;
mod readings_watch;
mod report_cli;
mod reporting;
mod reset_cursor;
mod scale_out;
mod serve_startup;
mod tls;
mod upload;
