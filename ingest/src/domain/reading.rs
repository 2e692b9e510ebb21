//! Readings: what a valid sensor name, unit and reading are, and the
//! validation of a batch as it arrives from a device.
//!
//! A batch is checked in one pass. Problems with one reading reject only that
//! reading (counted by [`RejectReason`]); problems with the batch as a whole
//! ([`BatchError`]) end the upload stream, because they mean the client is
//! broken or misconfigured, and guessing what it meant could store wrong data.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::time::UnixNanos;

/// Why one reading was refused. Each maps to one `telemetry.v1.RejectReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    NonFiniteValue,
    TimestampInFuture,
    TimestampTooOld,
    SensorNameEmpty,
    SensorNameTooLong,
    SensorNameMalformed,
    UnitMalformed,
    /// The device already has `--max-sensors-per-device` sensors and this
    /// reading's sensor would be a new one.
    TooManySensors,
}

impl RejectReason {
    pub const ALL: [RejectReason; 8] = [
        Self::NonFiniteValue,
        Self::TimestampInFuture,
        Self::TimestampTooOld,
        Self::SensorNameEmpty,
        Self::SensorNameTooLong,
        Self::SensorNameMalformed,
        Self::UnitMalformed,
        Self::TooManySensors,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// A stable snake_case name, for metric labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::NonFiniteValue => "non_finite_value",
            Self::TimestampInFuture => "timestamp_in_future",
            Self::TimestampTooOld => "timestamp_too_old",
            Self::SensorNameEmpty => "sensor_name_empty",
            Self::SensorNameTooLong => "sensor_name_too_long",
            Self::SensorNameMalformed => "sensor_name_malformed",
            Self::UnitMalformed => "unit_malformed",
            Self::TooManySensors => "too_many_sensors",
        }
    }
}

/// A problem with a batch as a whole; ends the upload stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch sequence must start at 1; got 0")]
    ZeroSequence,
    #[error("batch sequence {0} is larger than the largest supported ({max})", max = i64::MAX)]
    SequenceTooLarge(u64),
    #[error(
        "batch {sequence} has {count} readings, more than the server's limit of {max} per batch (--max-batch-readings); split it into smaller batches"
    )]
    TooManyReadings {
        sequence: u64,
        count: usize,
        max: usize,
    },
    #[error(
        "batch {sequence}, series {series_index}: {times} timestamps but {values} values; time_unix_nano and value must have the same length"
    )]
    ColumnMismatch {
        sequence: u64,
        series_index: usize,
        times: usize,
        values: usize,
    },
}

/// Limits that decide whether a reading or batch is acceptable.
#[derive(Debug, Clone)]
pub struct ReadingLimits {
    pub max_batch_readings: usize,
    pub max_sensor_name_len: usize,
    /// How far ahead of the server's clock a timestamp may be (device clocks
    /// drift).
    pub max_future_skew: Duration,
    /// Readings older than this are refused: they would fall outside what
    /// the database keeps.
    pub retention: Duration,
    /// How many rejected readings an upload summary lists by position.
    pub max_listed_rejections: usize,
    /// Series one batch may hold; enforced while decoding, see
    /// `grpc::batch_codec`.
    pub max_batch_series: usize,
}

impl Default for ReadingLimits {
    fn default() -> Self {
        Self {
            max_batch_readings: 10_000,
            max_sensor_name_len: 64,
            max_future_skew: Duration::from_secs(5 * 60),
            retention: Duration::from_secs(30 * 24 * 3600),
            max_listed_rejections: 10,
            max_batch_series: 1024,
        }
    }
}

/// A sensor name: lowercase ASCII letters, digits, `_ . - /`, starting with a
/// letter. Cheap to clone: the writer and the summary share one allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SensorName(Arc<str>);

impl SensorName {
    /// What a valid name is, for messages refusing one (the limit is the
    /// hard one; a server may be configured lower).
    pub const RULE: &str = "use 1 to 255 lowercase ASCII letters, digits, '_', '.', '-' or '/', starting with a lowercase letter";

    /// Longest name any configuration accepts; `--max-sensor-name-len` may
    /// only lower it.
    pub const HARD_MAX_LEN: usize = 255;

    pub fn parse(s: &str, max_len: usize) -> Result<Self, RejectReason> {
        let bytes = s.as_bytes();
        if bytes.is_empty() {
            return Err(RejectReason::SensorNameEmpty);
        }
        if bytes.len() > max_len.min(Self::HARD_MAX_LEN) {
            return Err(RejectReason::SensorNameTooLong);
        }
        let well_formed = bytes[0].is_ascii_lowercase()
            && bytes.iter().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'_' | b'.' | b'-' | b'/')
            });
        if !well_formed {
            return Err(RejectReason::SensorNameMalformed);
        }
        Ok(Self(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SensorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The unit of a sensor's values, e.g. `Cel`; empty when the device sent
/// none. At most 32 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Unit(Arc<str>);

impl Unit {
    pub const MAX_LEN: usize = 32;

    pub fn parse(s: &str) -> Result<Self, RejectReason> {
        let ok = s.len() <= Self::MAX_LEN && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        if ok {
            Ok(Self(Arc::from(s)))
        } else {
            Err(RejectReason::UnitMalformed)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The accepted readings of one sensor in one batch, as parallel columns.
#[derive(Debug, Clone)]
pub struct SeriesRows {
    pub sensor: SensorName,
    pub unit: Unit,
    pub times: Vec<UnixNanos>,
    pub values: Vec<f64>,
}

/// Where a refused reading was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub sequence: u64,
    pub series_index: u32,
    pub reading_index: u32,
    pub reason: RejectReason,
}

/// Count, minimum, maximum and sum of some values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueStats {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
}

impl ValueStats {
    pub fn of(values: &[f64]) -> Option<Self> {
        let (&first, rest) = values.split_first()?;
        let mut stats = Self {
            count: 1,
            min: first,
            max: first,
            sum: first,
        };
        for &v in rest {
            stats.count += 1;
            stats.min = stats.min.min(v);
            stats.max = stats.max.max(v);
            stats.sum += v;
        }
        Some(stats)
    }

    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// What one accepted series contributes to the summary.
#[derive(Debug, Clone)]
pub struct SeriesReport {
    /// Its index in the batch as sent.
    pub series_index: u32,
    pub sensor: SensorName,
    pub stats: ValueStats,
    /// Earliest and latest timestamps.
    pub range: (UnixNanos, UnixNanos),
}

/// What a batch contributes to the upload summary once it is committed.
#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    pub sequence: u64,
    pub accepted: u64,
    pub rejected_by_reason: [u64; RejectReason::ALL.len()],
    /// The first few rejections, at most `max_listed_rejections`.
    pub first_rejected: Vec<Rejection>,
    /// One per stored series, in the order of `ValidatedBatch::series`.
    pub series: Vec<SeriesReport>,
    pub max_listed: usize,
}

impl BatchReport {
    /// Earliest and latest accepted timestamps.
    pub fn time_range(&self) -> Option<(UnixNanos, UnixNanos)> {
        self.series
            .iter()
            .map(|s| s.range)
            .reduce(|(a, b), (lo, hi)| (a.min(lo), b.max(hi)))
    }

    /// Moves the readings of stored series `rows` (indices into
    /// `ValidatedBatch::series`) from accepted to rejected for `reason`: the
    /// writer refused them at commit time.
    pub fn refuse_series(&mut self, rows: &[u32], reason: RejectReason) {
        let mut index = 0u32;
        let max_listed = self.max_listed;
        let sequence = self.sequence;
        let mut refused = Vec::new();
        self.series.retain(|s| {
            let keep = !rows.contains(&index);
            index += 1;
            if !keep {
                refused.push((s.series_index, s.stats.count));
            }
            keep
        });
        for (series_index, count) in refused {
            self.accepted -= count;
            let at = Rejection {
                sequence,
                series_index,
                reading_index: 0,
                reason,
            };
            self.reject(at, count, max_listed);
        }
    }

    pub fn rejected(&self) -> u64 {
        self.rejected_by_reason.iter().sum()
    }

    pub fn rejected_for(&self, reason: RejectReason) -> u64 {
        self.rejected_by_reason[reason.index()]
    }

    fn reject(&mut self, at: Rejection, count: u64, max_listed: usize) {
        self.rejected_by_reason[at.reason.index()] += count;
        if self.first_rejected.len() < max_listed {
            self.first_rejected.push(at);
        }
    }
}

/// A batch that passed validation: the rows to store and the report to add
/// to the summary once they are committed.
#[derive(Debug, Clone)]
pub struct ValidatedBatch {
    pub sequence: u64,
    pub series: Vec<SeriesRows>,
    pub report: BatchReport,
}

impl ValidatedBatch {
    pub fn row_count(&self) -> usize {
        self.series.iter().map(|s| s.times.len()).sum()
    }
}

/// A batch as it arrives from the wire, whatever the protocol.
pub struct RawBatch {
    pub sequence: u64,
    pub series: Vec<RawSeries>,
}

impl RawBatch {
    /// The readings it claims to hold (a series' longer column counts).
    pub fn readings(&self) -> u64 {
        self.series
            .iter()
            .map(|s| s.times.len().max(s.values.len()) as u64)
            .sum()
    }
}

/// One sensor's columns as they arrive from the wire.
pub struct RawSeries {
    pub sensor: String,
    pub unit: String,
    pub times: Vec<u64>,
    pub values: Vec<f64>,
}

/// Validates a batch against `limits` with the server's clock at `now`.
pub fn validate_batch(
    sequence: u64,
    series: Vec<RawSeries>,
    limits: &ReadingLimits,
    now: UnixNanos,
) -> Result<ValidatedBatch, BatchError> {
    if sequence == 0 {
        return Err(BatchError::ZeroSequence);
    }
    if sequence > i64::MAX as u64 {
        return Err(BatchError::SequenceTooLarge(sequence));
    }
    let mut count = 0usize;
    for (series_index, s) in series.iter().enumerate() {
        if s.times.len() != s.values.len() {
            return Err(BatchError::ColumnMismatch {
                sequence,
                series_index,
                times: s.times.len(),
                values: s.values.len(),
            });
        }
        count += s.times.len();
    }
    if count > limits.max_batch_readings {
        return Err(BatchError::TooManyReadings {
            sequence,
            count,
            max: limits.max_batch_readings,
        });
    }

    let newest = now.saturating_add(nanos(limits.max_future_skew));
    let oldest = now.saturating_sub(nanos(limits.retention));
    let max_listed = limits.max_listed_rejections;
    let mut report = BatchReport {
        sequence,
        max_listed,
        ..BatchReport::default()
    };
    let mut rows = Vec::with_capacity(series.len());

    for (series_index, raw) in series.into_iter().enumerate() {
        let position = |reading_index: usize, reason| Rejection {
            sequence,
            series_index: series_index as u32,
            reading_index: reading_index as u32,
            reason,
        };
        if raw.times.is_empty() {
            continue;
        }
        // A bad name or unit condemns every reading of the series; count them
        // all but list the series once.
        let name = SensorName::parse(&raw.sensor, limits.max_sensor_name_len)
            .and_then(|name| Unit::parse(&raw.unit).map(|unit| (name, unit)));
        let (sensor, unit) = match name {
            Ok(pair) => pair,
            Err(reason) => {
                report.reject(position(0, reason), raw.times.len() as u64, max_listed);
                continue;
            }
        };

        let mut times: Vec<UnixNanos> = raw.times.into_iter().map(|t| t as i64).collect();
        let mut values = raw.values;
        let verdict = |t: i64, v: f64| {
            // A u64 beyond i64::MAX wrapped negative: it was far in the future.
            if t < 0 || t > newest {
                Some(RejectReason::TimestampInFuture)
            } else if t < oldest {
                Some(RejectReason::TimestampTooOld)
            } else if !v.is_finite() {
                Some(RejectReason::NonFiniteValue)
            } else {
                None
            }
        };
        let all_good = times
            .iter()
            .zip(&values)
            .all(|(&t, &v)| verdict(t, v).is_none());
        if !all_good {
            // Rare path: compact the columns in place, keeping order.
            let mut kept = 0;
            for i in 0..times.len() {
                match verdict(times[i], values[i]) {
                    None => {
                        times[kept] = times[i];
                        values[kept] = values[i];
                        kept += 1;
                    }
                    Some(reason) => report.reject(position(i, reason), 1, max_listed),
                }
            }
            times.truncate(kept);
            values.truncate(kept);
        }
        let Some(stats) = ValueStats::of(&values) else {
            continue;
        };
        let range = times
            .iter()
            .fold((i64::MAX, i64::MIN), |(lo, hi), &t| (lo.min(t), hi.max(t)));
        report.accepted += stats.count;
        report.series.push(SeriesReport {
            series_index: series_index as u32,
            sensor: sensor.clone(),
            stats,
            range,
        });
        rows.push(SeriesRows {
            sensor,
            unit,
            times,
            values,
        });
    }

    Ok(ValidatedBatch {
        sequence,
        series: rows,
        report,
    })
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000_000_000_000;

    fn raw(sensor: &str, points: &[(u64, f64)]) -> RawSeries {
        RawSeries {
            sensor: sensor.into(),
            unit: "Cel".into(),
            times: points.iter().map(|p| p.0).collect(),
            values: points.iter().map(|p| p.1).collect(),
        }
    }

    #[test]
    fn sensor_names() {
        for ok in ["t", "temperature", "engine.oil_pressure", "a/b-c_d.9"] {
            assert!(SensorName::parse(ok, 64).is_ok(), "{ok}");
        }
        assert_eq!(
            SensorName::parse("", 64),
            Err(RejectReason::SensorNameEmpty)
        );
        assert_eq!(
            SensorName::parse(&"a".repeat(65), 64),
            Err(RejectReason::SensorNameTooLong)
        );
        assert_eq!(
            SensorName::parse(&"a".repeat(300), 1000),
            Err(RejectReason::SensorNameTooLong)
        );
        for bad in ["Temp", "1temp", "_t", "te mp", "tëmp", "t\n"] {
            assert_eq!(
                SensorName::parse(bad, 64),
                Err(RejectReason::SensorNameMalformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn units() {
        assert!(Unit::parse("").is_ok());
        assert!(Unit::parse("m/s^2").is_ok());
        assert_eq!(Unit::parse("°C"), Err(RejectReason::UnitMalformed));
        assert_eq!(
            Unit::parse(&"u".repeat(33)),
            Err(RejectReason::UnitMalformed)
        );
    }

    #[test]
    fn keeps_good_readings_and_counts_bad_ones_by_reason() {
        let limits = ReadingLimits::default();
        let t = NOW as u64;
        let future = t + 3600 * 1_000_000_000;
        let old = t - 31 * 24 * 3600 * 1_000_000_000;
        let batch = validate_batch(
            7,
            vec![
                raw(
                    "temperature",
                    &[
                        (t, 20.0),
                        (t + 1, f64::NAN),
                        (future, 1.0),
                        (old, 2.0),
                        (t + 2, 22.0),
                    ],
                ),
                raw("Bad Name", &[(t, 1.0), (t, 2.0)]),
                raw("humidity", &[(u64::MAX, 1.0), (t, f64::INFINITY)]),
            ],
            &limits,
            NOW,
        )
        .unwrap();
        let r = &batch.report;
        assert_eq!(r.accepted, 2);
        assert_eq!(r.rejected(), 7);
        assert_eq!(r.rejected_for(RejectReason::NonFiniteValue), 2);
        assert_eq!(r.rejected_for(RejectReason::TimestampInFuture), 2);
        assert_eq!(r.rejected_for(RejectReason::TimestampTooOld), 1);
        assert_eq!(r.rejected_for(RejectReason::SensorNameMalformed), 2);
        assert_eq!(
            r.first_rejected[0],
            Rejection {
                sequence: 7,
                series_index: 0,
                reading_index: 1,
                reason: RejectReason::NonFiniteValue
            }
        );
        assert_eq!(batch.series.len(), 1);
        assert_eq!(batch.series[0].times, vec![NOW, NOW + 2]);
        assert_eq!(batch.series[0].values, vec![20.0, 22.0]);
        assert_eq!(r.time_range(), Some((NOW, NOW + 2)));
        assert_eq!(
            r.series[0].stats,
            ValueStats {
                count: 2,
                min: 20.0,
                max: 22.0,
                sum: 42.0
            }
        );
    }

    #[test]
    fn batch_level_errors() {
        let limits = ReadingLimits {
            max_batch_readings: 2,
            ..Default::default()
        };
        let t = NOW as u64;
        assert_eq!(
            validate_batch(0, vec![], &limits, NOW).unwrap_err(),
            BatchError::ZeroSequence
        );
        assert_eq!(
            validate_batch(u64::MAX, vec![], &limits, NOW).unwrap_err(),
            BatchError::SequenceTooLarge(u64::MAX)
        );
        let three = vec![raw("a", &[(t, 1.0), (t, 1.0)]), raw("b", &[(t, 1.0)])];
        assert_eq!(
            validate_batch(1, three, &limits, NOW).unwrap_err(),
            BatchError::TooManyReadings {
                sequence: 1,
                count: 3,
                max: 2
            }
        );
        let mut uneven = raw("a", &[(t, 1.0)]);
        uneven.values.push(2.0);
        assert!(matches!(
            validate_batch(1, vec![uneven], &limits, NOW),
            Err(BatchError::ColumnMismatch { .. })
        ));
    }

    #[test]
    fn series_refused_at_commit_become_rejections() {
        let limits = ReadingLimits::default();
        let t = NOW as u64;
        let mut batch = validate_batch(
            4,
            vec![
                raw("Bad", &[(t, 1.0)]),
                raw("a", &[(t, 1.0), (t + 5, 2.0)]),
                raw("b", &[(t + 1, 3.0)]),
            ],
            &limits,
            NOW,
        )
        .unwrap();
        // Stored row 1 is the sensor "b", sent as series 2.
        batch
            .report
            .refuse_series(&[1], RejectReason::TooManySensors);
        let r = &batch.report;
        assert_eq!(r.accepted, 2);
        assert_eq!(r.rejected_for(RejectReason::TooManySensors), 1);
        assert_eq!(r.series.len(), 1);
        assert_eq!(r.time_range(), Some((NOW, NOW + 5)));
        assert_eq!(
            r.first_rejected[1],
            Rejection {
                sequence: 4,
                series_index: 2,
                reading_index: 0,
                reason: RejectReason::TooManySensors
            }
        );
    }

    #[test]
    fn lists_only_the_first_few_rejections() {
        let limits = ReadingLimits {
            max_listed_rejections: 3,
            ..Default::default()
        };
        let points: Vec<_> = (0..100).map(|i| (NOW as u64 + i, f64::NAN)).collect();
        let batch = validate_batch(1, vec![raw("a", &points)], &limits, NOW).unwrap();
        assert_eq!(batch.report.rejected(), 100);
        assert_eq!(batch.report.first_rejected.len(), 3);
    }

    proptest! {
        #[test]
        fn parsed_sensor_names_are_well_formed(s in "\\PC{0,80}") {
            if let Ok(name) = SensorName::parse(&s, 64) {
                prop_assert!(!name.as_str().is_empty() && name.as_str().len() <= 64);
                prop_assert!(name.as_str().as_bytes()[0].is_ascii_lowercase());
            }
        }

        #[test]
        fn every_reading_is_accepted_or_rejected(
            points in proptest::collection::vec((0u64..u64::MAX, proptest::num::f64::ANY), 0..200)
        ) {
            let limits = ReadingLimits::default();
            let n = points.len() as u64;
            let batch = validate_batch(1, vec![raw("s", &points)], &limits, NOW).unwrap();
            prop_assert_eq!(batch.report.accepted + batch.report.rejected(), n);
            prop_assert_eq!(batch.row_count() as u64, batch.report.accepted);
            for s in &batch.series {
                prop_assert!(s.values.iter().all(|v| v.is_finite()));
            }
        }
    }
}
