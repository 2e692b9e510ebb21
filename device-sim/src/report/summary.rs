//! The final report: what the run did, as text for a person and as JSON
//! for a benchmark's records.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::memory::OwnMemory;
use super::stats::{LatencySummary, Stats};
use crate::config::{Compression, Config};

/// Failures listed in the text report before the rest are summarised.
const FAILURES_SHOWN: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct DeviceFailure {
    pub device_id: String,
    pub reason: String,
}

/// The settings that shape the load, echoed so benchmark results stay
/// interpretable on their own.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSettings {
    /// `--server`: several addresses are separated by commas.
    pub server: String,
    pub sensors: usize,
    pub sample_rate: f64,
    pub batch_size: usize,
    pub batches_per_stream: usize,
    pub connections: usize,
    pub max_buffered_batches: usize,
    pub anomaly_rate: Option<f64>,
    pub compression: Compression,
}

impl LoadSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            server: config.servers.join(","),
            sensors: config.sensors,
            sample_rate: config.sample_rate,
            batch_size: config.batch_size,
            batches_per_stream: config.batches_per_stream,
            connections: config.connections,
            max_buffered_batches: config.max_buffered_batches,
            anomaly_rate: config.anomaly_rate,
            compression: config.compression,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub devices: u64,
    pub devices_failed: u64,
    pub failures: Vec<DeviceFailure>,
    pub duration_secs: f64,
    pub batches_sent: u64,
    pub readings_sent: u64,
    pub batches_resent: u64,
    pub readings_resent: u64,
    pub batches_committed: u64,
    pub readings_accepted: u64,
    pub readings_rejected: u64,
    pub duplicate_batches: u64,
    pub batches_recovered: u64,
    pub dropped_batches: u64,
    pub dropped_readings: u64,
    pub unacked_batches: u64,
    pub retries: u64,
    pub anomalies_injected: u64,
    pub commands_received: u64,
    pub commands_done: u64,
    pub commands_failed: u64,
    pub commands_repeated: u64,
    pub control_reconnects: u64,
    /// Control streams the server ended for rebalancing; not failures.
    pub control_rebalances: u64,
    pub reboots: u64,
    /// Devices that ran without a control channel because the server does
    /// not implement Ingest.Control.
    pub control_unsupported_devices: u64,
    /// Times a device was disabled by an operator during the run (it
    /// waited, retrying, until enabled again).
    pub disabled_by_operator: u64,
    pub accepted_per_sec: f64,
    /// Bytes the fleet wrote to the network over the whole run
    /// (registration included): HTTP/2 frames as sent, after compression.
    pub wire_bytes_sent: u64,
    /// `wire_bytes_sent` / `readings_accepted`; null when none was accepted.
    pub wire_bytes_per_reading: Option<f64>,
    pub batch_ack_latency: LatencySummary,
    /// The simulator's own resident memory when the report was made, and
    /// its peak over the run.
    pub memory: OwnMemory,
    pub settings: LoadSettings,
}

impl Report {
    pub fn new(
        stats: &Stats,
        devices: u64,
        failures: Vec<DeviceFailure>,
        unacked_batches: u64,
        duration: Duration,
        wire_bytes_sent: u64,
        settings: LoadSettings,
    ) -> Self {
        let duration_secs = duration.as_secs_f64();
        let readings_accepted = stats.readings_accepted.get();
        Self {
            devices,
            devices_failed: failures.len() as u64,
            failures,
            duration_secs,
            batches_sent: stats.batches_sent.get(),
            readings_sent: stats.readings_sent.get(),
            batches_resent: stats.batches_resent.get(),
            readings_resent: stats.readings_resent.get(),
            batches_committed: stats.batches_committed.get(),
            readings_accepted,
            readings_rejected: stats.readings_rejected.get(),
            duplicate_batches: stats.duplicate_batches.get(),
            batches_recovered: stats.batches_recovered.get(),
            dropped_batches: stats.dropped_batches.get(),
            dropped_readings: stats.dropped_readings.get(),
            unacked_batches,
            retries: stats.retries.get(),
            anomalies_injected: stats.anomalies_injected.get(),
            commands_received: stats.commands_received.get(),
            commands_done: stats.commands_done.get(),
            commands_failed: stats.commands_failed.get(),
            commands_repeated: stats.commands_repeated.get(),
            control_reconnects: stats.control_reconnects.get(),
            control_rebalances: stats.control_rebalances.get(),
            reboots: stats.reboots.get(),
            control_unsupported_devices: stats.control_unsupported.get(),
            disabled_by_operator: stats.disabled_by_operator.get(),
            accepted_per_sec: if duration_secs > 0.0 {
                readings_accepted as f64 / duration_secs
            } else {
                0.0
            },
            wire_bytes_sent,
            wire_bytes_per_reading: (readings_accepted > 0)
                .then(|| wire_bytes_sent as f64 / readings_accepted as f64),
            batch_ack_latency: stats.latency_summary(),
            memory: OwnMemory::now(),
            settings,
        }
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let mut json = serde_json::to_vec_pretty(self).context("encoding the JSON report")?;
        json.push(b'\n');
        std::fs::write(path, json)
            .with_context(|| format!("writing JSON report {}", path.display()))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = |f: &mut fmt::Formatter<'_>, label: &str, value: &dyn fmt::Display| {
            writeln!(f, "  {label:<19}{value}")
        };
        // What happens only now and then has a row only when it happened.
        let if_any =
            |f: &mut fmt::Formatter<'_>, label: &str, count: u64, note: &str| -> fmt::Result {
                if count > 0 {
                    row(f, label, &format_args!("{count}{note}"))?;
                }
                Ok(())
            };
        writeln!(f, "device-sim report")?;
        row(
            f,
            "devices",
            &format_args!("{} ({} failed)", self.devices, self.devices_failed),
        )?;
        row(f, "duration", &format_args!("{:.1} s", self.duration_secs))?;
        row(f, "readings sent", &self.readings_sent)?;
        row(f, "readings resent", &self.readings_resent)?;
        row(f, "readings accepted", &self.readings_accepted)?;
        row(f, "readings rejected", &self.readings_rejected)?;
        row(f, "duplicate batches", &self.duplicate_batches)?;
        if_any(
            f,
            "recovered batches",
            self.batches_recovered,
            " (committed, but their summary was lost)",
        )?;
        row(f, "dropped batches", &self.dropped_batches)?;
        row(
            f,
            "unacked at exit",
            &format_args!("{} batches", self.unacked_batches),
        )?;
        row(f, "retries", &self.retries)?;
        if self.settings.anomaly_rate.is_some() {
            row(f, "anomalies", &self.anomalies_injected)?;
        }
        row(
            f,
            "commands",
            &format_args!(
                "{} received, {} done, {} failed, {} repeats",
                self.commands_received,
                self.commands_done,
                self.commands_failed,
                self.commands_repeated
            ),
        )?;
        if_any(f, "reboots", self.reboots, "")?;
        row(f, "control reconnects", &self.control_reconnects)?;
        if_any(
            f,
            "control rebalances",
            self.control_rebalances,
            " (ended by the server to spread devices; reconnected at once)",
        )?;
        if self.control_unsupported_devices > 0 {
            row(
                f,
                "control",
                &format_args!(
                    "not supported by the server ({} device(s) ran without a Control stream)",
                    self.control_unsupported_devices
                ),
            )?;
        }
        if_any(
            f,
            "disabled",
            self.disabled_by_operator,
            " time(s) by an operator (the devices waited until enabled again)",
        )?;
        row(
            f,
            "accepted/s",
            &format_args!("{:.0} (mean over run)", self.accepted_per_sec),
        )?;
        row(
            f,
            "wire bytes sent",
            &format_args!(
                "{} ({} per accepted reading; compression {})",
                self.wire_bytes_sent,
                self.wire_bytes_per_reading
                    .map_or_else(|| "n/a".to_owned(), |b| format!("{b:.1}")),
                self.settings.compression
            ),
        )?;
        let latency = &self.batch_ack_latency;
        if latency.count == 0 {
            row(f, "batch ack latency", &"n/a (no batch acknowledged)")?;
        } else {
            row(
                f,
                "batch ack latency",
                &format_args!(
                    "p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (n={})",
                    latency.p50_ms, latency.p99_ms, latency.max_ms, latency.count
                ),
            )?;
        }
        if let (Some(rss), Some(peak)) = (self.memory.rss_kib, self.memory.peak_rss_kib) {
            row(
                f,
                "simulator memory",
                &format_args!(
                    "RSS {} MiB now, peak {} MiB ({:.1} KiB per device)",
                    rss / 1024,
                    peak / 1024,
                    peak as f64 / self.devices.max(1) as f64
                ),
            )?;
        }
        if !self.failures.is_empty() {
            writeln!(f, "failed devices")?;
            for failure in self.failures.iter().take(FAILURES_SHOWN) {
                writeln!(f, "  {}: {}", failure.device_id, failure.reason)?;
            }
            if self.failures.len() > FAILURES_SHOWN {
                writeln!(f, "  ... and {} more", self.failures.len() - FAILURES_SHOWN)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LoadSettings {
        LoadSettings {
            server: "http://127.0.0.1:50051".into(),
            sensors: 4,
            sample_rate: 10.0,
            batch_size: 50,
            batches_per_stream: 20,
            connections: 1,
            max_buffered_batches: 1000,
            anomaly_rate: None,
            compression: Compression::Gzip,
        }
    }

    #[test]
    fn report_text_and_json() {
        let stats = Stats::new();
        stats.readings_sent.add(240_000);
        stats.readings_accepted.add(240_000);
        stats.record_ack_latencies(&[12_300, 40_100]);
        stats.commands_received.add(12);
        stats.commands_done.add(10);
        stats.commands_failed.add(1);
        stats.commands_repeated.add(1);
        stats.control_reconnects.add(3);
        let report = Report::new(
            &stats,
            20,
            vec![DeviceFailure {
                device_id: "sim-00003".into(),
                reason: "token rejected".into(),
            }],
            0,
            Duration::from_secs(30),
            3_000_000,
            settings(),
        );
        let text = report.to_string();
        for part in [
            "  devices            20 (1 failed)\n",
            "  accepted/s         8000 (mean over run)\n",
            "(n=2)",
            "sim-00003: token rejected",
            "  commands           12 received, 10 done, 1 failed, 1 repeats\n",
            "  control reconnects 3\n",
            "  wire bytes sent    3000000 (12.5 per accepted reading; compression gzip)\n",
        ] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
        assert!(!text.contains("reboots"), "{text}");

        let json: serde_json::Value = serde_json::to_value(&report).expect("report serialises");
        assert_eq!(json["readings_accepted"], 240_000);
        assert_eq!(json["batch_ack_latency"]["count"], 2);
        assert_eq!(json["settings"]["batch_size"], 50);
        assert_eq!(json["commands_received"], 12);
        assert_eq!(json["commands_repeated"], 1);
        assert_eq!(json["control_reconnects"], 3);
        assert_eq!(json["wire_bytes_sent"], 3_000_000);
        assert_eq!(json["wire_bytes_per_reading"], 12.5);
        assert_eq!(json["settings"]["compression"], "gzip");
    }
}
