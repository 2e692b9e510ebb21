//! Whether the writer is making progress, for `/readyz`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::domain::time::now_unix_nanos;

/// Batches queued and no commit for this long: the writer is stuck.
const WRITER_STALL: Duration = Duration::from_secs(30);

/// What the writer last did, for readiness.
#[derive(Debug)]
pub struct WriterProgress {
    /// When a group last committed (or the writer last found its queue
    /// empty), unix nanoseconds.
    last_progress: AtomicI64,
}

impl Default for WriterProgress {
    fn default() -> Self {
        Self {
            last_progress: AtomicI64::new(now_unix_nanos()),
        }
    }
}

impl WriterProgress {
    pub fn progressed(&self) {
        self.last_progress
            .store(now_unix_nanos(), Ordering::Relaxed);
    }

    /// How long the writer has made no progress with `queued` batches
    /// waiting, past the stall limit.
    pub fn stalled_for(&self, queued: i64) -> Option<Duration> {
        if queued <= 0 {
            return None;
        }
        let idle = now_unix_nanos() - self.last_progress.load(Ordering::Relaxed);
        let idle = Duration::from_nanos(idle.max(0) as u64);
        (idle > WRITER_STALL).then_some(idle)
    }
}
