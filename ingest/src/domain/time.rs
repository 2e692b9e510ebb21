//! Time as the API and the database carry it: unix epoch nanoseconds.

/// Nanoseconds since the unix epoch (UTC), the convention of the API and the
/// schema. `i64` holds dates up to the year 2262.
pub type UnixNanos = i64;

/// A time as people read it in messages: RFC 3339, UTC.
pub fn rfc3339(nanos: UnixNanos) -> String {
    chrono::DateTime::from_timestamp_nanos(nanos)
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// The server's clock now.
pub fn now_unix_nanos() -> UnixNanos {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}
