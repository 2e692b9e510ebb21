//! The process metrics every Prometheus client exports, read from /proc at
//! each scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug)]
pub struct ProcessCollector {
    ticks_per_second: f64,
    page_size: f64,
    /// Unix seconds; fixed for the process's life.
    start_time: Option<f64>,
}

impl ProcessCollector {
    pub fn new() -> Self {
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let ticks_per_second = if ticks > 0 { ticks as f64 } else { 100.0 };
        // /proc/stat (the boot time) is hidden under systemd's
        // ProcSubset=pid: then now, which is within the server's start.
        let start_time = stat_fields()
            .and_then(|f| {
                let started_ticks: f64 = f.get(19)?.parse().ok()?;
                Some(boot_time()? + started_ticks / ticks_per_second)
            })
            .or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs_f64())
            });
        Self {
            ticks_per_second,
            page_size: if page > 0 { page as f64 } else { 4096.0 },
            start_time,
        }
    }
}

/// The fields of /proc/self/stat after the command name (which may hold
/// spaces), so field 3 of proc(5) (`state`) is index 0.
fn stat_fields() -> Option<Vec<String>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    Some(after_name.split_whitespace().map(str::to_owned).collect())
}

fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(fields) = stat_fields() {
            // utime and stime: proc(5) fields 14 and 15.
            let ticks: f64 = [11, 12]
                .iter()
                .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
                .sum();
            let cpu = ConstCounter::new(ticks / self.ticks_per_second);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds.",
                None,
                cpu.metric_type(),
            )?)?;
        }
        if let Some(resident) = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        {
            let rss = ConstGauge::new(resident * self.page_size);
            rss.encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                None,
                rss.metric_type(),
            )?)?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let open = ConstGauge::new(fds.count() as i64);
            open.encode(encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors.",
                None,
                open.metric_type(),
            )?)?;
        }
        if let Some(start) = self.start_time {
            let start = ConstGauge::new(start);
            start.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the unix epoch, in seconds.",
                None,
                start.metric_type(),
            )?)?;
        }
        Ok(())
    }
}
