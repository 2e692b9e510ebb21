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

/// Label sets of one label, each a type of its own so that a family
/// cannot be given the wrong one.
macro_rules! one_label {
    ($($set:ident { $label:ident }),* $(,)?) => {$(
        #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
        pub struct $set {
            pub $label: &'static str,
        }
    )*};
}

one_label!(
    OutcomeLabel { outcome },
    KindLabel { kind },
    ReasonLabel { reason },
    SeverityLabel { severity },
);

/// A named consumer of the readings feed: bounded, since consumers are
/// named by operators and removed with `ingest readings consumers delete`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabel {
    pub consumer: String,
}

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
    pub buffered_readings: Gauge,
    pub buffered_readings_limit: Gauge,
    pub upload_budget_wait_seconds: Counter<f64, AtomicU64>,

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
    /// MQTT connections and publications refused, by reason.
    pub mqtt_refusals: Family<ReasonLabel, Counter>,
    pub tls_handshake_failures: Counter,

    pub db_pool_acquire_seconds: Histogram,
    pub retention_deleted: Counter,
    pub partitions_created: Counter,

    /// QueryReadings: streams open, what they sent, how long each lasted.
    pub read_streams_open: Gauge,
    pub read_rows_sent: Counter,
    pub read_bytes_sent: Counter,
    pub read_query_seconds: Histogram,

    /// WatchReadings: streams open, the feed's newest position, what the
    /// streams sent, how often one fell behind, each consumer's lag.
    pub watch_streams_open: Gauge,
    pub watch_streams_lagged: Counter,
    pub watch_rows_sent: Counter,
    pub feed_last_position: Gauge,
    pub feed_consumer_lag: Family<ConsumerLabel, Gauge>,

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
            buffered_readings: Gauge::default(),
            buffered_readings_limit: Gauge::default(),
            upload_budget_wait_seconds: Counter::default(),
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
            mqtt_refusals: Family::default(),
            tls_handshake_failures: Counter::default(),
            db_pool_acquire_seconds: seconds_buckets(),
            retention_deleted: Counter::default(),
            partitions_created: Counter::default(),
            read_streams_open: Gauge::default(),
            read_rows_sent: Counter::default(),
            read_bytes_sent: Counter::default(),
            read_query_seconds: seconds_buckets(),
            watch_streams_open: Gauge::default(),
            watch_streams_lagged: Counter::default(),
            watch_rows_sent: Counter::default(),
            feed_last_position: Gauge::default(),
            feed_consumer_lag: Family::default(),
            writer_progress: WriterProgress::default(),
        };
        let r = registry;
        // One line a metric: its field, exported name and help.
        macro_rules! register {
            ($($field:ident => $name:literal, $help:literal;)*) => {
                $(r.register($name, $help, m.$field.clone());)*
            };
        }
        register! {
            grpc_started => "grpc_server_started",
                "RPCs started on the server";
            grpc_handled => "grpc_server_handled",
                "RPCs completed on the server, by status code; counted when the call ends";
            grpc_msg_received => "grpc_server_msg_received",
                "Stream messages received on the server";
            grpc_msg_sent => "grpc_server_msg_sent",
                "Stream messages sent by the server";
            grpc_handling_seconds => "grpc_server_handling_seconds",
                "Time from an RPC's start to its end (trailers or reset)";
            readings => "ingest_readings",
                "Readings received, by outcome: committed, duplicate (batch already committed) or rejected (with reason)";
            batches => "ingest_batches",
                "Batches received, by outcome";
            group_commit_seconds => "ingest_group_commit_seconds",
                "Duration of a group commit (one transaction for many streams' batches)";
            group_commit_readings => "ingest_group_commit_readings",
                "Readings in one group commit";
            batch_ack_seconds => "ingest_batch_ack_seconds",
                "Time from a batch's arrival to its commit being known";
            writer_queue_batches => "ingest_writer_queue_batches",
                "Batches queued for the group-commit writer";
            writer_queue_capacity => "ingest_writer_queue_capacity",
                "Batches the writer queue holds before uploads wait (--writer-queue-batches)";
            upload_throttled_seconds => "ingest_upload_throttled_seconds",
                "Time upload streams were held back by the per-device rate limit";
            buffered_readings => "ingest_buffered_readings",
                "Readings decoded and not yet committed, all streams together";
            buffered_readings_limit => "ingest_buffered_readings_limit",
                "The budget for buffered readings (--max-buffered-readings)";
            upload_budget_wait_seconds => "ingest_upload_budget_wait_seconds",
                "Time upload streams waited, unread, for room in the buffered readings budget";
            streams => "ingest_streams",
                "Open streams, by kind";
            devices_online => "devices_online",
                "Devices holding a Control stream on this server";
            cluster_leader => "ingest_cluster_leader",
                "1 on the server process that judges inactivity rules and expires commands, else 0";
            cluster_listener_resyncs => "ingest_cluster_listener_resyncs",
                "Times the notification listener reconnected and re-read what it may have missed";
            alerts_open => "alerts_open",
                "Open alerts, by severity";
            alert_events => "alert_events",
                "Alert events recorded, by kind";
            alert_watchers_lagged => "alert_watchers_lagged",
                "Times an alert watcher fell behind the live feed and caught up from the database";
            commands => "commands",
                "Commands, by outcome";
            commands_pending => "commands_pending",
                "Commands queued or sent and not yet acknowledged";
            auth_failures => "auth_failures",
                "Calls refused by authentication, by reason";
            mqtt_refusals => "ingest_mqtt_refusals",
                "MQTT connections, packets and publications refused, by reason";
            tls_handshake_failures => "tls_handshake_failures",
                "TLS handshakes that failed";
            db_pool_acquire_seconds => "db_pool_acquire_seconds",
                "Time to get a pooled database connection, sampled every few seconds and at each readiness probe";
            retention_deleted => "retention_deleted",
                "Raw readings and rollup rows removed by retention";
            partitions_created => "partitions_created",
                "PostgreSQL day partitions of readings created";
            read_streams_open => "read_streams_open",
                "QueryReadings streams open";
            read_rows_sent => "read_rows_sent",
                "Readings and buckets sent by QueryReadings";
            read_bytes_sent => "read_bytes_sent",
                "Bytes of QueryReadings chunks sent (encoded, before compression)";
            read_query_seconds => "read_query_seconds",
                "Duration of a QueryReadings stream, from its start to its last chunk or its cancel";
            watch_streams_open => "watch_streams_open",
                "WatchReadings streams open";
            watch_streams_lagged => "watch_streams_lagged",
                "Times a WatchReadings stream fell behind the live feed and read from the database";
            watch_rows_sent => "watch_rows_sent",
                "Readings sent by WatchReadings";
            feed_last_position => "readings_feed_last_position",
                "The readings feed's newest committed position";
            feed_consumer_lag => "readings_feed_consumer_lag_positions",
                "Batches committed after a named consumer's cursor";
        }
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
