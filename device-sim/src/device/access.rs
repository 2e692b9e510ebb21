//! Whether an operator has disabled this device (`ingest devices disable`).
//! Its uploader and its control channel both see the refusal; the device
//! says so once when it is disabled and once when it is let in again, not
//! on every retry, and keeps retrying meanwhile so that
//! `ingest devices enable` brings it back without a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use telemetry_client::backoff::{Backoff, DEFAULT_BASE};
use tracing::warn;

use crate::report::Stats;

/// The longest wait between two attempts of a disabled device: an operator
/// who enables it sees it back within this.
pub const DISABLED_RETRY_CAP: Duration = Duration::from_secs(30);

/// What a disabled device's uploader and control channel each wait with.
pub fn disabled_backoff() -> Backoff {
    Backoff::new(DEFAULT_BASE, DISABLED_RETRY_CAP)
}

/// Shared by the uploader and the control channel of one device.
pub struct Access {
    device_id: String,
    disabled: AtomicBool,
    stats: Arc<Stats>,
}

impl Access {
    pub fn new(device_id: String, stats: Arc<Stats>) -> Self {
        Self {
            device_id,
            disabled: AtomicBool::new(false),
            stats,
        }
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Relaxed)
    }

    /// A call was refused because the device is disabled.
    pub fn refused(&self) {
        if !self.disabled.swap(true, Ordering::Relaxed) {
            self.stats.devices_disabled.inc();
            self.stats.disabled_by_operator.inc();
            warn!(device = %self.device_id, "{}", disabled_message(&self.device_id));
        }
    }

    /// A call got through: if the device was disabled, it is enabled again.
    pub fn admitted(&self) {
        if self.disabled.swap(false, Ordering::Relaxed) {
            self.stats.devices_disabled.dec();
            warn!(device = %self.device_id,
                  "device {} is enabled again; uploading resumes", self.device_id);
        }
    }
}

pub fn disabled_message(device_id: &str) -> String {
    format!(
        "device {device_id} is disabled by an operator: `ingest devices enable {device_id}` lets \
         it upload again; retrying with backoff"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_change_is_counted_once_whoever_sees_it() {
        let stats = Arc::new(Stats::new());
        let access = Access::new("pump-7".into(), Arc::clone(&stats));
        access.admitted();
        assert_eq!(stats.devices_disabled.get(), 0);
        // The uploader and the control channel are both refused, and each
        // retries several times: one transition.
        for _ in 0..5 {
            access.refused();
        }
        assert!(access.is_disabled());
        assert_eq!(stats.devices_disabled.get(), 1);
        assert_eq!(stats.disabled_by_operator.get(), 1);
        access.admitted();
        access.admitted();
        assert_eq!(stats.devices_disabled.get(), 0);
        access.refused();
        assert_eq!(
            stats.disabled_by_operator.get(),
            2,
            "disabled a second time"
        );
        assert_eq!(
            disabled_message("pump-7"),
            "device pump-7 is disabled by an operator: `ingest devices enable pump-7` lets it \
             upload again; retrying with backoff"
        );
    }

    #[test]
    fn a_disabled_device_waits_at_most_30_s() {
        let mut backoff = disabled_backoff();
        let mut rng = rand::rng();
        for _ in 0..100 {
            assert!(backoff.next_delay(&mut rng) <= DISABLED_RETRY_CAP);
        }
        assert_eq!(backoff.ceiling(), DISABLED_RETRY_CAP);
    }
}
