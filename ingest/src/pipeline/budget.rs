//! The server-wide budget for buffered readings: decoded, not yet
//! committed.
//!
//! Each stream's cap on batches in flight and the writer's bounded queue
//! bound what one stream, and what the queue, holds; neither bounds a fleet
//! of thousands of streams each holding its few batches while the database
//! falls behind. Here every decoded batch is admitted against one budget
//! before it is validated and queued, and gives its share back when its
//! group has committed (or failed). A stream waiting for the budget reads
//! nothing more, so HTTP/2 flow control holds the device back: the batch
//! waits in the device, not in the server.
//!
//! What stays outside: per stream, the one decoded batch waiting to be
//! admitted, and the bytes in the HTTP/2 windows (`--http2-stream-window`,
//! `--http2-connection-window`).

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicU64;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Readings admitted and not yet committed, all streams together.
#[derive(Clone)]
pub struct ReadingBudget {
    permits: Arc<Semaphore>,
    total: u32,
    buffered: Gauge,
    waited: Counter<f64, AtomicU64>,
}

/// A batch's share of the budget, given back when dropped (by the writer,
/// once the batch's group has committed or failed).
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    readings: u32,
    buffered: Gauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.buffered.dec_by(i64::from(self.readings));
    }
}

impl ReadingBudget {
    /// `buffered` and `waited` are the metrics it keeps: readings admitted,
    /// and seconds streams waited for room.
    pub fn new(total: u32, buffered: Gauge, waited: Counter<f64, AtomicU64>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(total as usize)),
            total: total.max(1),
            buffered,
            waited,
        }
    }

    /// Waits until `readings` fit, oldest waiter first. A batch larger than
    /// the whole budget waits for all of it, so it can never wait forever.
    pub async fn admit(&self, readings: u64) -> Admitted {
        let n = u32::try_from(readings)
            .unwrap_or(u32::MAX)
            .clamp(1, self.total);
        let permit = match self.permits.clone().try_acquire_many_owned(n) {
            Ok(permit) => permit,
            Err(_) => {
                let started = Instant::now();
                let permit = self
                    .permits
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .expect("the budget's semaphore is never closed");
                self.waited.inc_by(started.elapsed().as_secs_f64());
                permit
            }
        };
        self.buffered.inc_by(i64::from(n));
        Admitted {
            _permit: permit,
            readings: n,
            buffered: self.buffered.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(total: u32) -> ReadingBudget {
        ReadingBudget::new(total, Gauge::default(), Counter::default())
    }

    #[tokio::test]
    async fn admissions_wait_until_earlier_ones_are_given_back() {
        let budget = budget(100);
        let first = budget.admit(60).await;
        assert_eq!(budget.buffered.get(), 60);
        let mut second = Box::pin(budget.admit(50));
        assert!(
            futures::poll!(second.as_mut()).is_pending(),
            "50 more do not fit in 100"
        );
        drop(first);
        let second = second.await;
        assert_eq!(budget.buffered.get(), 50);
        drop(second);
        assert_eq!(budget.buffered.get(), 0);
        assert!(budget.waited.get() > 0.0);
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_budget_takes_all_of_it() {
        let budget = budget(10);
        let big = budget.admit(1_000).await;
        assert_eq!(budget.buffered.get(), 10);
        assert!(futures::poll!(Box::pin(budget.admit(1))).is_pending());
        drop(big);
        let _small = budget.admit(0).await;
        assert_eq!(
            budget.buffered.get(),
            1,
            "an empty batch still counts as one"
        );
    }
}
