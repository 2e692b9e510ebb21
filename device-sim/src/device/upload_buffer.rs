//! A device's batches that the server has not acknowledged yet, oldest
//! first, kept so they can be resent after a failure.

use std::collections::VecDeque;
use telemetry_proto::v1::ReadingBatch;

use super::sampling::readings_in;

#[derive(Debug, Clone)]
pub struct Pending {
    pub batch: ReadingBatch,
    pub readings: u64,
    /// Whether any stream has carried it before, to tell sends from resends.
    pub sent_before: bool,
}

impl Pending {
    pub fn sequence(&self) -> u64 {
        self.batch.sequence
    }
}

/// Unacknowledged batches in increasing sequence order, bounded in length.
#[derive(Debug)]
pub struct UploadBuffer {
    batches: VecDeque<Pending>,
    capacity: usize,
}

impl UploadBuffer {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            // Grows on demand: most devices never hold more than a stream's
            // worth, and a large fleet times a large capacity adds up.
            batches: VecDeque::new(),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.batches.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Appends a batch; its sequence must exceed every buffered one. When the
    /// buffer is full the oldest batch is evicted and returned, as a device
    /// with bounded memory loses its oldest data first.
    pub fn push(&mut self, batch: ReadingBatch) -> Option<Pending> {
        debug_assert!(self.last_sequence() < batch.sequence);
        let evicted = if self.batches.len() >= self.capacity {
            self.batches.pop_front()
        } else {
            None
        };
        self.batches.push_back(Pending {
            readings: readings_in(&batch.series),
            batch,
            sent_before: false,
        });
        evicted
    }

    /// Removes and returns every batch with a sequence at or below
    /// `committed`: the server has them durably.
    pub fn ack_through(&mut self, committed: u64) -> impl Iterator<Item = Pending> + '_ {
        let n = self.batches.partition_point(|p| p.sequence() <= committed);
        self.batches.drain(..n)
    }

    /// The oldest batch above `sequence`, i.e. the next one a stream that has
    /// carried everything up to `sequence` should send.
    pub fn next_after(&mut self, sequence: u64) -> Option<&mut Pending> {
        let i = self.batches.partition_point(|p| p.sequence() <= sequence);
        self.batches.get_mut(i)
    }

    pub fn has_after(&self, sequence: u64) -> bool {
        self.last_sequence() > sequence
    }

    /// The newest buffered sequence, 0 when empty.
    pub fn last_sequence(&self) -> u64 {
        self.batches.back().map_or(0, Pending::sequence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry_proto::v1::SensorSeries;

    fn batch(sequence: u64) -> ReadingBatch {
        ReadingBatch {
            sequence,
            series: vec![SensorSeries {
                sensor: "temperature".into(),
                unit: "Cel".into(),
                time_unix_nano: vec![1, 2, 3],
                value: vec![20.0, 20.1, 20.2],
            }],
        }
    }

    fn sequences(buffer: &UploadBuffer) -> Vec<u64> {
        buffer.batches.iter().map(Pending::sequence).collect()
    }

    #[test]
    fn trims_by_cursor() {
        let mut buffer = UploadBuffer::new(10);
        for seq in 1..=5 {
            assert!(buffer.push(batch(seq)).is_none());
        }
        let acked: Vec<_> = buffer.ack_through(3).map(|p| p.sequence()).collect();
        assert_eq!(acked, [1, 2, 3]);
        assert_eq!(sequences(&buffer), [4, 5]);

        // A cursor below everything buffered removes nothing.
        assert_eq!(buffer.ack_through(2).count(), 0);
        assert_eq!(buffer.len(), 2);

        // A cursor beyond everything buffered empties it.
        assert_eq!(buffer.ack_through(100).count(), 2);
        assert!(buffer.is_empty());
        assert_eq!(buffer.last_sequence(), 0);
    }

    #[test]
    fn trims_with_gaps_in_sequences() {
        let mut buffer = UploadBuffer::new(10);
        for seq in [2, 4, 9, 10] {
            buffer.push(batch(seq));
        }
        assert_eq!(buffer.ack_through(5).count(), 2);
        assert_eq!(sequences(&buffer), [9, 10]);
    }

    #[test]
    fn full_buffer_evicts_oldest() {
        let mut buffer = UploadBuffer::new(3);
        for seq in 1..=3 {
            assert!(buffer.push(batch(seq)).is_none());
        }
        let evicted = buffer.push(batch(4)).expect("full");
        assert_eq!(evicted.sequence(), 1);
        assert_eq!(evicted.readings, 3);
        assert_eq!(sequences(&buffer), [2, 3, 4]);
    }

    #[test]
    fn next_after_walks_in_order() {
        let mut buffer = UploadBuffer::new(10);
        for seq in [3, 5, 8] {
            buffer.push(batch(seq));
        }
        assert_eq!(buffer.next_after(0).map(|p| p.sequence()), Some(3));
        assert_eq!(buffer.next_after(3).map(|p| p.sequence()), Some(5));
        assert_eq!(buffer.next_after(6).map(|p| p.sequence()), Some(8));
        assert!(buffer.next_after(8).is_none());
        assert!(buffer.has_after(7));
        assert!(!buffer.has_after(8));
    }
}
