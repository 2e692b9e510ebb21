//! The running tally of one upload stream, which becomes its summary.

use std::collections::BTreeMap;

#[cfg(test)]
use super::reading::SeriesReport;
use super::reading::{BatchReport, RejectReason, Rejection, SensorName, ValueStats};
use super::time::UnixNanos;

/// A batch whose sequence did not increase within one stream. Devices number
/// batches in the order they produce them, so this is a client bug: storing
/// anyway could hide the loss of the batches in between.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "batch sequence went backwards within the stream: {got} after {previous}; sequence numbers must increase strictly"
)]
pub struct SequenceNotIncreasing {
    pub previous: u64,
    pub got: u64,
}

/// Sensors an upload summary lists at most: with names of up to 255 bytes
/// the list stays far below a default client's 4 MiB receive limit, however
/// many sensors a stream wrote.
pub const MAX_SUMMARY_SENSORS: usize = 1024;

/// Everything an upload stream reports back, accumulated as its batches are
/// received and committed.
#[derive(Debug, Clone, Default)]
pub struct UploadTally {
    pub batches_received: u64,
    pub batches_committed: u64,
    pub duplicate_batches: u64,
    pub readings_accepted: u64,
    pub rejected_by_reason: BTreeMap<RejectReason, u64>,
    pub first_rejected: Vec<Rejection>,
    /// The device's high-water mark as last seen by the writer.
    pub committed_sequence: u64,
    pub time_range: Option<(UnixNanos, UnixNanos)>,
    /// Per sensor, at most [`MAX_SUMMARY_SENSORS`].
    pub sensors: BTreeMap<SensorName, ValueStats>,
    /// Some sensors were left out of `sensors` for its cap.
    pub sensors_truncated: bool,
    /// Time the stream was held back by the device's rate limit.
    pub throttled: std::time::Duration,
    max_listed_rejections: usize,
    last_sequence: Option<u64>,
}

impl UploadTally {
    pub fn new(max_listed_rejections: usize, committed_sequence: u64) -> Self {
        Self {
            max_listed_rejections,
            committed_sequence,
            ..Self::default()
        }
    }

    /// Records that a batch arrived, refusing sequences that do not increase.
    pub fn receive(&mut self, sequence: u64) -> Result<(), SequenceNotIncreasing> {
        if let Some(previous) = self.last_sequence
            && sequence <= previous
        {
            return Err(SequenceNotIncreasing {
                previous,
                got: sequence,
            });
        }
        self.last_sequence = Some(sequence);
        self.batches_received += 1;
        Ok(())
    }

    /// Adds a batch that is now durably stored.
    pub fn committed(&mut self, report: BatchReport, committed_sequence: u64) {
        self.batches_committed += 1;
        // Outcomes arrive in stream order, and an operator may have reset
        // the mark meanwhile (ResetUploadCursor): the latest is the truth.
        self.committed_sequence = committed_sequence;
        self.readings_accepted += report.accepted;
        for reason in RejectReason::ALL {
            let n = report.rejected_for(reason);
            if n > 0 {
                *self.rejected_by_reason.entry(reason).or_default() += n;
            }
        }
        let time_range = report.time_range();
        let room = self
            .max_listed_rejections
            .saturating_sub(self.first_rejected.len());
        self.first_rejected
            .extend(report.first_rejected.into_iter().take(room));
        if let Some((lo, hi)) = time_range {
            self.time_range = Some(match self.time_range {
                Some((a, b)) => (a.min(lo), b.max(hi)),
                None => (lo, hi),
            });
        }
        for series in report.series {
            if let Some(s) = self.sensors.get_mut(&series.sensor) {
                s.merge(&series.stats);
            } else if self.sensors.len() < MAX_SUMMARY_SENSORS {
                self.sensors.insert(series.sensor, series.stats);
            } else {
                self.sensors_truncated = true;
            }
        }
    }

    /// Adds a batch that was already stored before this stream sent it.
    pub fn duplicate(&mut self, committed_sequence: u64) {
        self.duplicate_batches += 1;
        // Outcomes arrive in stream order, and an operator may have reset
        // the mark meanwhile (ResetUploadCursor): the latest is the truth.
        self.committed_sequence = committed_sequence;
    }

    pub fn readings_rejected(&self) -> u64 {
        self.rejected_by_reason.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(sensor: &str, values: &[f64], t: (i64, i64)) -> BatchReport {
        BatchReport {
            accepted: values.len() as u64,
            series: vec![SeriesReport {
                series_index: 0,
                sensor: SensorName::parse(sensor, 64).unwrap(),
                stats: ValueStats::of(values).unwrap(),
                range: t,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn sequences_must_increase() {
        let mut tally = UploadTally::new(10, 0);
        tally.receive(3).unwrap();
        tally.receive(9).unwrap();
        assert_eq!(
            tally.receive(9),
            Err(SequenceNotIncreasing {
                previous: 9,
                got: 9
            })
        );
        assert_eq!(
            tally.receive(2),
            Err(SequenceNotIncreasing {
                previous: 9,
                got: 2
            })
        );
        assert_eq!(tally.batches_received, 2);
    }

    #[test]
    fn merges_committed_batches() {
        let mut tally = UploadTally::new(10, 4);
        tally.committed(report("t", &[1.0, 3.0], (10, 20)), 5);
        tally.committed(report("t", &[5.0], (5, 15)), 6);
        tally.duplicate(6);
        assert_eq!(tally.batches_committed, 2);
        assert_eq!(tally.duplicate_batches, 1);
        assert_eq!(tally.committed_sequence, 6);
        assert_eq!(tally.readings_accepted, 3);
        assert_eq!(tally.time_range, Some((5, 20)));
        let t = &tally.sensors[&SensorName::parse("t", 64).unwrap()];
        assert_eq!((t.count, t.min, t.max, t.mean()), (3, 1.0, 5.0, 3.0));
        assert!(!tally.sensors_truncated);
    }

    #[test]
    fn caps_the_sensor_list() {
        let mut tally = UploadTally::new(10, 0);
        for i in 0..MAX_SUMMARY_SENSORS + 5 {
            tally.committed(report(&format!("s{i}"), &[1.0], (1, 1)), i as u64 + 1);
        }
        assert_eq!(tally.sensors.len(), MAX_SUMMARY_SENSORS);
        assert!(tally.sensors_truncated);
        assert_eq!(tally.readings_accepted, MAX_SUMMARY_SENSORS as u64 + 5);
    }
}
