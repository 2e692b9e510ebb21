//! Prometheus metrics: one [`Registry`] built by `server::run` and the
//! [`Metrics`] handle passed to whatever records them. No globals, and no
//! per-device labels: a fleet has tens of thousands of devices, and
//! per-device figures are what the SQL views are for.
//!
//! Counters are registered without their `_total` suffix: the encoder adds
//! it, as OpenMetrics wants.

pub mod grpc;
mod process;
mod progress;

pub use progress::WriterProgress;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Seconds from 100 µs to about 100 s.
fn seconds_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub grpc_type: &'static str,
    pub grpc_service: Arc<str>,
    pub grpc_method: Arc<str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcHandledLabels {
    pub grpc_type: &'static str,
    pub grpc_service: Arc<str>,
    pub grpc_method: Arc<str>,
    pub grpc_code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadingLabels {
    pub outcome: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SeverityLabel {
    pub severity: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the server records. Cheap to clone pieces of: each is an
/// `Arc` inside.
pub struct Metrics {
    pub grpc_started: Family<GrpcLabels, Counter>,
    pub grpc_handled: Family<GrpcHandledLabels, Counter>,
    pub grpc_msg_received: Family<GrpcLabels, Counter>,
    pub grpc_msg_sent: Family<GrpcLabels, Counter>,
    pub grpc_handling_seconds: HistogramFamily<GrpcLabels>,

    /// Every reading received ends under one outcome: committed, duplicate
    /// (its batch was committed before) or rejected (with the reason).
    pub readings: Family<ReadingLabels, Counter>,
    pub batches: Family<OutcomeLabel, Counter>,
    pub group_commit_seconds: Histogram,
    pub group_commit_readings: Histogram,
    /// From a batch's arrival to its commit answer.
    pub batch_ack_seconds: Histogram,
    pub writer_queue_batches: Gauge,
    pub writer_queue_capacity: Gauge,
    pub upload_throttled_seconds: Counter<f64, AtomicU64>,

    pub streams: Family<KindLabel, Gauge>,
    pub devices_online: Gauge,
    /// 1 on the process that judges inactivity and expires commands.
    pub cluster_leader: Gauge,
    /// Times the notification listener lost its connection and re-read
    /// what it may have missed.
    pub cluster_listener_resyncs: Counter,
    pub alerts_open: Family<SeverityLabel, Gauge>,
    pub alert_events: Family<KindLabel, Counter>,
    pub alert_watchers_lagged: Counter,
    pub commands: Family<OutcomeLabel, Counter>,
    pub commands_pending: Gauge,

    pub auth_failures: Family<ReasonLabel, Counter>,
    pub tls_handshake_failures: Counter,

    pub db_pool_acquire_seconds: Histogram,
    pub retention_deleted: Counter,
    pub partitions_created: Counter,

    /// Not exported: what readiness asks of the writer.
    pub writer_progress: WriterProgress,
}

impl Metrics {
    /// Creates the metrics and registers them, with the process collector.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            grpc_started: Family::default(),
            grpc_handled: Family::default(),
            grpc_msg_received: Family::default(),
            grpc_msg_sent: Family::default(),
            grpc_handling_seconds: Family::new_with_constructor(seconds_buckets),
            readings: Family::default(),
            batches: Family::default(),
            group_commit_seconds: seconds_buckets(),
            group_commit_readings: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            batch_ack_seconds: seconds_buckets(),
            writer_queue_batches: Gauge::default(),
            writer_queue_capacity: Gauge::default(),
            upload_throttled_seconds: Counter::default(),
            streams: Family::default(),
            devices_online: Gauge::default(),
            cluster_leader: Gauge::default(),
            cluster_listener_resyncs: Counter::default(),
            alerts_open: Family::default(),
            alert_events: Family::default(),
            alert_watchers_lagged: Counter::default(),
            commands: Family::default(),
            commands_pending: Gauge::default(),
            auth_failures: Family::default(),
            tls_handshake_failures: Counter::default(),
            db_pool_acquire_seconds: seconds_buckets(),
            retention_deleted: Counter::default(),
            partitions_created: Counter::default(),
            writer_progress: WriterProgress::default(),
        };
        let r = registry;
        r.register(
            "grpc_server_started",
            "RPCs started on the server",
            m.grpc_started.clone(),
        );
        r.register(
            "grpc_server_handled",
            "RPCs completed on the server, by status code; counted when the call ends",
            m.grpc_handled.clone(),
        );
        r.register(
            "grpc_server_msg_received",
            "Stream messages received on the server",
            m.grpc_msg_received.clone(),
        );
        r.register(
            "grpc_server_msg_sent",
            "Stream messages sent by the server",
            m.grpc_msg_sent.clone(),
        );
        r.register(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its end (trailers or reset)",
            m.grpc_handling_seconds.clone(),
        );
        r.register(
            "ingest_readings",
            "Readings received, by outcome: committed, duplicate (batch already committed) or rejected (with reason)",
            m.readings.clone(),
        );
        r.register(
            "ingest_batches",
            "Batches received, by outcome",
            m.batches.clone(),
        );
        r.register(
            "ingest_group_commit_seconds",
            "Duration of a group commit (one transaction for many streams' batches)",
            m.group_commit_seconds.clone(),
        );
        r.register(
            "ingest_group_commit_readings",
            "Readings in one group commit",
            m.group_commit_readings.clone(),
        );
        r.register(
            "ingest_batch_ack_seconds",
            "Time from a batch's arrival to its commit being known",
            m.batch_ack_seconds.clone(),
        );
        r.register(
            "ingest_writer_queue_batches",
            "Batches queued for the group-commit writer",
            m.writer_queue_batches.clone(),
        );
        r.register(
            "ingest_writer_queue_capacity",
            "Batches the writer queue holds before uploads wait (--writer-queue-batches)",
            m.writer_queue_capacity.clone(),
        );
        r.register(
            "ingest_upload_throttled_seconds",
            "Time upload streams were held back by the per-device rate limit",
            m.upload_throttled_seconds.clone(),
        );
        r.register("ingest_streams", "Open streams, by kind", m.streams.clone());
        r.register(
            "devices_online",
            "Devices holding a Control stream on this server",
            m.devices_online.clone(),
        );
        r.register(
            "ingest_cluster_leader",
            "1 on the server process that judges inactivity rules and expires commands, else 0",
            m.cluster_leader.clone(),
        );
        r.register(
            "ingest_cluster_listener_resyncs",
            "Times the notification listener reconnected and re-read what it may have missed",
            m.cluster_listener_resyncs.clone(),
        );
        r.register(
            "alerts_open",
            "Open alerts, by severity",
            m.alerts_open.clone(),
        );
        r.register(
            "alert_events",
            "Alert events recorded, by kind",
            m.alert_events.clone(),
        );
        r.register(
            "alert_watchers_lagged",
            "Times an alert watcher fell behind the live feed and caught up from the database",
            m.alert_watchers_lagged.clone(),
        );
        r.register("commands", "Commands, by outcome", m.commands.clone());
        r.register(
            "commands_pending",
            "Commands queued or sent and not yet acknowledged",
            m.commands_pending.clone(),
        );
        r.register(
            "auth_failures",
            "Calls refused by authentication, by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "db_pool_acquire_seconds",
            "Time to get a pooled database connection, sampled every few seconds and at each readiness probe",
            m.db_pool_acquire_seconds.clone(),
        );
        r.register(
            "retention_deleted",
            "Raw readings and rollup rows removed by retention",
            m.retention_deleted.clone(),
        );
        r.register(
            "partitions_created",
            "PostgreSQL day partitions of readings created",
            m.partitions_created.clone(),
        );
        r.register_collector(Box::new(process::ProcessCollector::new()));
        Arc::new(m)
    }

    /// Metrics registered nowhere: for code run outside a server (tools,
    /// tests of one module).
    pub fn unregistered() -> Arc<Self> {
        Self::register(&mut Registry::default())
    }

    pub fn reading(&self, outcome: &'static str, reason: &'static str, n: u64) {
        if n > 0 {
            self.readings
                .get_or_create(&ReadingLabels { outcome, reason })
                .inc_by(n);
        }
    }

    pub fn batch(&self, outcome: &'static str) {
        self.batches.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts an open stream of `kind` until the guard drops.
    pub fn stream(self: &Arc<Self>, kind: &'static str) -> StreamGuard {
        self.streams.get_or_create(&KindLabel { kind }).inc();
        StreamGuard {
            metrics: self.clone(),
            kind,
        }
    }
}

/// Decrements `ingest_streams{kind}` when the stream ends, however it ends.
pub struct StreamGuard {
    metrics: Arc<Metrics>,
    kind: &'static str,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics
            .streams
            .get_or_create(&KindLabel { kind: self.kind })
            .dec();
    }
}

/// The registry in the OpenMetrics text format (what Prometheus asks for).
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)
        .expect("writing to a String cannot fail");
    text
}

/// The same in the classic Prometheus text format (0.0.4), for clients
/// that do not ask for OpenMetrics (curl, `promtool check metrics`): a
/// counter's HELP and TYPE name its `_total` samples, and there is no
/// `# UNIT` or `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let om = "# HELP a_thing Things.\n# TYPE a_thing counter\na_thing_total 3\n\
                  # HELP g A gauge.\n# TYPE g gauge\n# UNIT g seconds\ng 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_thing_total Things.\n# TYPE a_thing_total counter\na_thing_total 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
