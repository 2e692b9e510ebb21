//! The simulator's own memory, for the report: a benchmark that measures
//! the server with a large fleet must know what holding the fleet cost the
//! machine on the simulator's side.

use serde::Serialize;

/// Resident memory of this process, in KiB; `None` where the kernel does
/// not say (not Linux).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OwnMemory {
    /// VmRSS: resident now (when the report is made).
    pub rss_kib: Option<u64>,
    /// VmHWM: the most ever resident, typically with the whole fleet online.
    pub peak_rss_kib: Option<u64>,
}

impl OwnMemory {
    pub fn now() -> Self {
        std::fs::read_to_string("/proc/self/status")
            .map(|status| Self::parse(&status))
            .unwrap_or_default()
    }

    fn parse(status: &str) -> Self {
        let field = |name: &str| {
            status.lines().find_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix(':')?;
                rest.trim().strip_suffix("kB")?.trim().parse().ok()
            })
        };
        Self {
            rss_kib: field("VmRSS"),
            peak_rss_kib: field("VmHWM"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_peak_from_proc_status() {
        let status = "Name:\tdevice-sim\nVmPeak:\t 9999 kB\nVmHWM:\t  524288 kB\nVmRSS:\t  262144 kB\nThreads:\t3\n";
        assert_eq!(
            OwnMemory::parse(status),
            OwnMemory {
                rss_kib: Some(262_144),
                peak_rss_kib: Some(524_288)
            }
        );
        assert_eq!(OwnMemory::parse("Name:\tx\n"), OwnMemory::default());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_some() {
        let own = OwnMemory::now();
        assert!(own.rss_kib.unwrap() > 0);
        assert!(own.peak_rss_kib.unwrap() >= own.rss_kib.unwrap());
    }
}
