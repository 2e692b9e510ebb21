//! The write path: from a device's batches to committed rows, whatever
//! protocol carried them.
//!
//! - [`Pipeline`] is the entry. A protocol adapter authenticates the
//!   device, validates each batch into domain values
//!   ([`crate::domain::reading::validate_batch`]) and submits it through a
//!   [`DeviceStream`]; the answer is a [`CommitResult`]: committed (with
//!   the device's new high-water mark), a duplicate of what was already
//!   committed, or failed. Nothing is answered before it is committed.
//! - [`upload`]: one upload stream built on that entry: batches in flight,
//!   answered in order, tallied into the stream's summary.
//! - [`rate_limit`]: per-device readings and stream-open rates.
//! - [`budget`]: readings decoded and not yet committed, all streams
//!   together; past it, streams wait unread (flow control).
//! - [`commit`]: the group commit: many streams' batches in one
//!   transaction, judged against the alert rules ([`crate::alerts::judge`])
//!   so that their alert events commit with them.

pub mod budget;
pub mod commit;
pub mod rate_limit;
pub mod upload;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

pub use budget::{Admitted, ReadingBudget};
use commit::StreamWriter;
pub use commit::{BatchOutcome, CommitFailed, CommitResult, WriterHandle};
use rate_limit::DeviceRateLimits;
pub use upload::{UploadError, UploadFailure, UploadTimeouts};

use crate::domain::reading::SeriesRows;
use crate::domain::{DeviceKey, ReadingLimits};
use crate::metrics::Metrics;
use crate::storage::{StorageError, Store};

/// What every device stream shares, of any protocol.
#[derive(Clone)]
pub struct Pipeline {
    pub store: Store,
    /// Commits batches, and records the alerts they cause in the same
    /// transaction: an answer never runs ahead of an alert.
    pub writer: WriterHandle,
    pub limits: ReadingLimits,
    /// Batches of one stream submitted but not yet committed.
    pub max_inflight_batches: usize,
    /// Turns true when the server begins shutting down.
    pub shutdown: watch::Receiver<bool>,
    pub rate_limits: Arc<DeviceRateLimits>,
    pub timeouts: UploadTimeouts,
    pub metrics: Arc<Metrics>,
    /// Readings decoded and not yet committed, all streams together.
    pub budget: ReadingBudget,
}

impl Pipeline {
    /// The way in for one stream (or session) of `device`.
    pub fn stream(&self, device: &DeviceKey) -> DeviceStream {
        DeviceStream {
            writer: self.writer.stream(device.pk),
            device_pk: device.pk,
            rate_limits: self.rate_limits.clone(),
        }
    }
}

/// One stream's batches into the group commit. They commit in the order
/// submitted; once one fails, the stream's later batches fail too, so a
/// device's high-water mark never passes a batch that was not stored.
pub struct DeviceStream {
    writer: StreamWriter,
    device_pk: i64,
    rate_limits: Arc<DeviceRateLimits>,
}

/// Resolves once the batch's group has committed (or failed).
pub type Receipt = oneshot::Receiver<CommitResult>;

impl DeviceStream {
    /// Queues a validated batch for the group commit, waiting while the
    /// queue is full: a slow database slows the device through its
    /// protocol's flow control rather than filling memory. `admitted`, its
    /// share of the budget, is given back once its group has committed. The
    /// group's span links to `span`.
    pub async fn submit(
        &self,
        sequence: u64,
        series: Vec<SeriesRows>,
        admitted: Admitted,
        span: &tracing::Span,
    ) -> Result<Receipt, StorageError> {
        self.writer.submit(sequence, series, admitted, span).await
    }

    /// How long the device must now wait, having sent `readings`, to stay
    /// within its rate (zero when it is within it). The caller holds the
    /// device's stream unread for that long: nothing is refused or lost.
    pub fn hold_for(&self, readings: u64) -> Duration {
        self.rate_limits.readings(self.device_pk, readings)
    }
}
