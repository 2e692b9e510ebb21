//! Counters shared by every device task, read by the progress line and the
//! final report.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hdrhistogram::Histogram;

/// Latencies above this are clamped; an hour is far beyond any sane
/// acknowledgement and keeps the histogram small.
const LATENCY_MAX_MICROS: u64 = 3_600_000_000;
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// A monotonically increasing counter. Relaxed ordering suffices: readers
/// only want an eventually consistent figure, never to synchronise on it.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (devices connected right now).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct Stats {
    pub devices_connected: Gauge,
    /// Batches handed to a stream for the first time, and their readings.
    pub batches_sent: Counter,
    pub readings_sent: Counter,
    /// Batches handed to a stream again after a failure, and their readings.
    pub batches_resent: Counter,
    pub readings_resent: Counter,
    pub batches_committed: Counter,
    pub readings_accepted: Counter,
    pub readings_rejected: Counter,
    pub duplicate_batches: Counter,
    /// Batches found committed by the upload cursor after their stream broke,
    /// so no summary ever counted their readings.
    pub batches_recovered: Counter,
    /// Batches thrown away unacknowledged because a device's buffer was full.
    pub dropped_batches: Counter,
    pub dropped_readings: Counter,
    /// Backoff waits after a failed call.
    pub retries: Counter,
    pub anomalies_injected: Counter,
    /// Commands that arrived on Control streams, including repeats.
    pub commands_received: Counter,
    /// Commands carried out (acknowledged DONE).
    pub commands_done: Counter,
    /// Commands refused (acknowledged FAILED).
    pub commands_failed: Counter,
    /// Commands that arrived again after being handled: acknowledged again,
    /// not carried out again.
    pub commands_repeated: Counter,
    /// Control streams reopened after a failure (not counting reboots).
    pub control_reconnects: Counter,
    /// Control streams the server ended so the device reconnects, maybe to
    /// another server process (UNAVAILABLE "rebalance..."): reopened at
    /// once, and not failures.
    pub control_rebalances: Counter,
    pub reboots: Counter,
    /// Devices whose server does not implement Ingest.Control.
    pub control_unsupported: Counter,
    /// Devices an operator has disabled right now (`ingest devices
    /// disable`): they retry until enabled again.
    pub devices_disabled: Gauge,
    /// Times a device found itself disabled (each disable, not each retry).
    pub disabled_by_operator: Counter,
    transient_warned: AtomicBool,
    failure_warned: AtomicBool,
    unsupported_warned: AtomicBool,
    ack_latency_micros: Mutex<Histogram<u64>>,
    /// Latencies acknowledged before this are not recorded (the warm-up).
    record_latencies_from: std::time::Instant,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        let histogram =
            Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, LATENCY_SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid");
        Self {
            devices_connected: Gauge::default(),
            batches_sent: Counter::default(),
            readings_sent: Counter::default(),
            batches_resent: Counter::default(),
            readings_resent: Counter::default(),
            batches_committed: Counter::default(),
            readings_accepted: Counter::default(),
            readings_rejected: Counter::default(),
            duplicate_batches: Counter::default(),
            batches_recovered: Counter::default(),
            dropped_batches: Counter::default(),
            dropped_readings: Counter::default(),
            retries: Counter::default(),
            anomalies_injected: Counter::default(),
            commands_received: Counter::default(),
            commands_done: Counter::default(),
            commands_failed: Counter::default(),
            commands_repeated: Counter::default(),
            control_reconnects: Counter::default(),
            control_rebalances: Counter::default(),
            reboots: Counter::default(),
            control_unsupported: Counter::default(),
            devices_disabled: Gauge::default(),
            disabled_by_operator: Counter::default(),
            transient_warned: AtomicBool::new(false),
            failure_warned: AtomicBool::new(false),
            unsupported_warned: AtomicBool::new(false),
            ack_latency_micros: Mutex::new(histogram),
            record_latencies_from: std::time::Instant::now(),
        }
    }

    /// Stats that leave out the latencies of the first `warmup`.
    pub fn with_latency_warmup(warmup: std::time::Duration) -> Self {
        Self {
            record_latencies_from: std::time::Instant::now() + warmup,
            ..Self::new()
        }
    }

    /// True for exactly one caller per run: the one that gets to log the
    /// first connection problem at warn level.
    pub fn claim_transient_warning(&self) -> bool {
        !self.transient_warned.swap(true, Ordering::Relaxed)
    }

    /// Likewise for the first device that gives up: a stale credentials file
    /// fails every device the same way, and the report lists them all.
    pub fn claim_failure_warning(&self) -> bool {
        !self.failure_warned.swap(true, Ordering::Relaxed)
    }

    /// Likewise for the first device that finds the server has no Control
    /// call: every device of the run finds the same.
    pub fn claim_unsupported_warning(&self) -> bool {
        !self.unsupported_warned.swap(true, Ordering::Relaxed)
    }

    /// Records the acknowledgement latencies of one stream under a single
    /// lock, so thousands of devices do not contend once per batch.
    pub fn record_ack_latencies(&self, micros: &[u64]) {
        if micros.is_empty() || std::time::Instant::now() < self.record_latencies_from {
            return;
        }
        // A poisoned lock only means another task panicked mid-record; the
        // counts are still usable.
        let mut histogram = self
            .ack_latency_micros
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for &value in micros {
            histogram.saturating_record(value.max(1));
        }
    }

    pub fn latency_summary(&self) -> LatencySummary {
        let histogram = self
            .ack_latency_micros
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        LatencySummary::from_histogram(&histogram)
    }
}

/// Percentiles of the batch acknowledgement latency, in milliseconds: from
/// when the gRPC body takes a batch to write it to its HTTP/2 stream to when
/// that stream's summary arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    fn from_histogram(h: &Histogram<u64>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn latencies_of_the_warm_up_are_left_out() {
        let stats = Stats::with_latency_warmup(std::time::Duration::from_secs(3600));
        stats.record_ack_latencies(&[1_000, 2_000]);
        assert_eq!(stats.latency_summary().count, 0);
        let stats = Stats::with_latency_warmup(std::time::Duration::ZERO);
        stats.record_ack_latencies(&[1_000, 2_000]);
        assert_eq!(stats.latency_summary().count, 2);
    }

    use super::*;

    #[test]
    fn latency_summary_reflects_recorded_values() {
        let stats = Stats::new();
        assert_eq!(stats.latency_summary().count, 0);
        let values: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        stats.record_ack_latencies(&values);
        let summary = stats.latency_summary();
        assert_eq!(summary.count, 1000);
        assert!((summary.p50_ms - 500.0).abs() < 1.0, "{summary:?}");
        assert!((summary.max_ms - 1000.0).abs() < 1.0, "{summary:?}");
    }

    #[test]
    fn huge_latencies_are_clamped_not_lost() {
        let stats = Stats::new();
        stats.record_ack_latencies(&[u64::MAX, 0]);
        assert_eq!(stats.latency_summary().count, 2);
    }
}
