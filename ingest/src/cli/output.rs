//! Formatting shared by the operator subcommands.

use std::time::Duration;

/// A gRPC error as the CLI prints it: `Code: message`.
pub(super) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// Seconds precision: a table is read by people, JSON has the nanoseconds.
pub(super) fn time(nanos: u64) -> String {
    if nanos == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp_nanos(nanos as i64)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// `500ms`, `2s`, `1m 30s`.
pub(super) fn duration_text(millis: u64) -> String {
    humantime::format_duration(Duration::from_millis(millis)).to_string()
}
