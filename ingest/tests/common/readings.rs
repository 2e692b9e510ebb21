//! Readings as a device sends them, and the clock they are stamped by.

use telemetry_proto::v1 as pb;

use super::{Ingest, TestServer};

pub const SEC: u64 = 1_000_000_000;
pub const MIN: u64 = 60 * SEC;
pub const HOUR: u64 = 3600 * SEC;

pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Start of the UTC hour `hours_ago` hours before the current one.
pub fn hour_start(hours_ago: u64) -> u64 {
    let now = now_nanos();
    now - now % HOUR - hours_ago * HOUR
}

pub fn series(sensor: &str, unit: &str, points: &[(u64, f64)]) -> pb::SensorSeries {
    pb::SensorSeries {
        sensor: sensor.into(),
        unit: unit.into(),
        time_unix_nano: points.iter().map(|p| p.0).collect(),
        value: points.iter().map(|p| p.1).collect(),
    }
}

pub fn batch(sequence: u64, series: Vec<pb::SensorSeries>) -> pb::ReadingBatch {
    pb::ReadingBatch { sequence, series }
}

/// A batch of `n` good temperature readings.
pub fn simple_batch(sequence: u64, n: usize) -> pb::ReadingBatch {
    let t = now_nanos();
    let points: Vec<_> = (0..n)
        .map(|i| (t - i as u64 * 1000, 20.0 + i as f64))
        .collect();
    batch(sequence, vec![series("temperature", "Cel", &points)])
}

pub async fn upload(
    client: &mut Ingest,
    batches: Vec<pb::ReadingBatch>,
) -> Result<pb::UploadSummary, tonic::Status> {
    client
        .upload_readings(tokio_stream::iter(batches))
        .await
        .map(tonic::Response::into_inner)
}

pub async fn cursor(client: &mut Ingest) -> u64 {
    client
        .get_upload_cursor(pb::GetUploadCursorRequest {})
        .await
        .unwrap()
        .into_inner()
        .committed_sequence
}

/// GetUploadCursor on a client of its own with `token`: what the device
/// would get.
pub async fn cursor_with(server: &TestServer, token: &str) -> Result<u64, tonic::Status> {
    server
        .ingest(token)
        .await
        .get_upload_cursor(pb::GetUploadCursorRequest {})
        .await
        .map(|r| r.into_inner().committed_sequence)
}
