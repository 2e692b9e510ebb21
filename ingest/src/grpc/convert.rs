//! Domain and storage values to protobuf messages.

use telemetry_proto::v1 as pb;

use crate::domain::reading::{RawBatch, RawSeries};
use crate::domain::{RejectReason, UploadTally};
use crate::storage::DeviceRecord;
use crate::storage::SensorRecord;
use crate::storage::credentials::DeviceCredentials;

pub fn device(d: DeviceRecord) -> pb::Device {
    pb::Device {
        device_id: d.id.as_str().to_owned(),
        display_name: d.display_name.as_str().to_owned(),
        labels: d
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        created_time_unix_nano: d.created.max(0) as u64,
        committed_sequence: d.committed_sequence,
        last_upload_time_unix_nano: d.last_upload.unwrap_or(0).max(0) as u64,
        online: d.online,
        last_seen_time_unix_nano: d.last_seen.unwrap_or(0).max(0) as u64,
        firmware_version: d.firmware_version.unwrap_or_default(),
        disabled_time_unix_nano: d.disabled.unwrap_or(0).max(0) as u64,
        sensors: Vec::new(),
    }
}

pub fn sensor(s: SensorRecord) -> pb::DeviceSensor {
    let (time, value) = s.last.unwrap_or((0, 0.0));
    pb::DeviceSensor {
        sensor: s.sensor,
        unit: s.unit,
        last_time_unix_nano: time.max(0) as u64,
        last_value: value,
    }
}

pub fn credentials(c: DeviceCredentials) -> pb::DeviceCredentials {
    let now = crate::domain::time::now_unix_nanos();
    let time = |t: Option<i64>| t.unwrap_or(0).max(0) as u64;
    pb::DeviceCredentials {
        device_id: c.device.id.as_str().to_owned(),
        tokens: c
            .tokens
            .iter()
            .map(|t| pb::DeviceToken {
                credential_id: t.id,
                created_time_unix_nano: t.created.max(0) as u64,
                last_used_time_unix_nano: time(t.last_used),
                expires_time_unix_nano: time(t.expires),
                revoked_time_unix_nano: time(t.revoked),
                active: t.active_at(now),
            })
            .collect(),
        certificate_sha256: c
            .certificate
            .map(|b| b.fingerprint.to_string())
            .unwrap_or_default(),
        certificate_bound_time_unix_nano: time(c.certificate.map(|b| b.bound)),
        require_mtls: c.require_mtls,
        disabled_time_unix_nano: time(c.disabled),
        warnings: Vec::new(),
    }
}

pub fn reject_reason(r: RejectReason) -> pb::RejectReason {
    match r {
        RejectReason::NonFiniteValue => pb::RejectReason::NonFiniteValue,
        RejectReason::TimestampInFuture => pb::RejectReason::TimestampInFuture,
        RejectReason::TimestampTooOld => pb::RejectReason::TimestampTooOld,
        RejectReason::SensorNameEmpty => pb::RejectReason::SensorNameEmpty,
        RejectReason::SensorNameTooLong => pb::RejectReason::SensorNameTooLong,
        RejectReason::SensorNameMalformed => pb::RejectReason::SensorNameMalformed,
        RejectReason::UnitMalformed => pb::RejectReason::UnitMalformed,
        RejectReason::TooManySensors => pb::RejectReason::TooManySensors,
    }
}

pub fn summary(t: UploadTally) -> pb::UploadSummary {
    let readings_rejected = t.readings_rejected();
    let (first, last) = t.time_range.unwrap_or((0, 0));
    pb::UploadSummary {
        batches_received: t.batches_received,
        batches_committed: t.batches_committed,
        duplicate_batches: t.duplicate_batches,
        readings_accepted: t.readings_accepted,
        readings_rejected,
        rejections: t
            .rejected_by_reason
            .into_iter()
            .map(|(reason, count)| pb::RejectionCount {
                reason: reject_reason(reason) as i32,
                count,
            })
            .collect(),
        first_rejected: t
            .first_rejected
            .into_iter()
            .map(|r| pb::RejectedReading {
                sequence: r.sequence,
                series_index: r.series_index,
                reading_index: r.reading_index,
                reason: reject_reason(r.reason) as i32,
            })
            .collect(),
        committed_sequence: t.committed_sequence,
        first_reading_time_unix_nano: first.max(0) as u64,
        last_reading_time_unix_nano: last.max(0) as u64,
        sensors: t
            .sensors
            .into_iter()
            .map(|(sensor, s)| pb::SensorStats {
                sensor: sensor.as_str().to_owned(),
                count: s.count,
                min: s.min,
                max: s.max,
                mean: s.mean(),
            })
            .collect(),
        sensors_truncated: t.sensors_truncated,
        throttled_millis: t.throttled.as_millis() as u64,
    }
}

/// A batch off the wire, as validation takes it; the columns move, not copy.
pub fn raw_batch(batch: pb::ReadingBatch) -> RawBatch {
    RawBatch {
        sequence: batch.sequence,
        series: raw_series(batch.series),
    }
}

/// A batch's series as validation takes them; the columns move, not copy.
pub fn raw_series(series: Vec<pb::SensorSeries>) -> Vec<RawSeries> {
    series
        .into_iter()
        .map(|s| RawSeries {
            sensor: s.sensor,
            unit: s.unit,
            times: s.time_unix_nano,
            values: s.value,
        })
        .collect()
}
