//! What the tasks of one device share: the sampling settings the control
//! channel may change, the power state a reboot cycles, and the battery
//! charge the status reports read from the sampler's battery model.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use telemetry_proto::v1::DeviceConfig;
use tokio::sync::watch;

use crate::config::Config;

/// How a device samples and batches; the sampler applies changes as soon as
/// they are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSettings {
    /// Time between two samples of each sensor.
    pub interval: Duration,
    /// Samples per sensor in one batch.
    pub batch_size: usize,
    /// Sensors that send nothing until enabled again.
    pub disabled: BTreeSet<String>,
}

impl DeviceSettings {
    /// The settings every device starts with, from the flags.
    pub fn initial(config: &Config) -> Self {
        Self {
            // At least a nanosecond: a zero interval would stamp every
            // sample of a batch alike.
            interval: Duration::from_secs_f64(1.0 / config.sample_rate)
                .max(Duration::from_nanos(1)),
            batch_size: config.batch_size,
            disabled: BTreeSet::new(),
        }
    }

    /// As sent in `DeviceHello`. The interval is rounded to whole
    /// milliseconds, but never to 0, which would read as "not set".
    pub fn to_proto(&self) -> DeviceConfig {
        let millis = (self.interval.as_secs_f64() * 1000.0).round().max(1.0);
        DeviceConfig {
            sampling_interval_ms: if millis >= f64::from(u32::MAX) {
                u32::MAX
            } else {
                millis as u32
            },
            batch_size: u32::try_from(self.batch_size).unwrap_or(u32::MAX),
            disabled_sensors: self.disabled.iter().cloned().collect(),
        }
    }
}

/// Time between two batches: one sample interval per sample, and at least
/// a millisecond.
pub fn batch_period(interval: Duration, batch_size: usize) -> Duration {
    interval
        .saturating_mul(u32::try_from(batch_size).unwrap_or(u32::MAX))
        .max(Duration::from_millis(1))
}

/// A device's power state. A reboot increments `boot` and clears `up`; when
/// the device has come back, `up` is set again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Power {
    pub boot: u64,
    pub up: bool,
}

/// Shared by the sampler, the uploader and the control channel of one
/// device.
#[derive(Debug)]
pub struct DeviceShared {
    pub settings: watch::Sender<DeviceSettings>,
    pub power: watch::Sender<Power>,
    /// The battery model's charge as `f64` bits; NaN when the device has no
    /// battery sensor.
    battery: AtomicU64,
}

impl DeviceShared {
    pub fn new(settings: DeviceSettings) -> Self {
        Self {
            settings: watch::Sender::new(settings),
            power: watch::Sender::new(Power { boot: 0, up: true }),
            battery: AtomicU64::new(f64::NAN.to_bits()),
        }
    }

    pub fn set_battery(&self, percent: Option<f64>) {
        let bits = percent.unwrap_or(f64::NAN).to_bits();
        self.battery.store(bits, Ordering::Relaxed);
    }

    pub fn battery(&self) -> Option<f64> {
        let value = f64::from_bits(self.battery.load(Ordering::Relaxed));
        (!value.is_nan()).then(|| value.clamp(0.0, 100.0))
    }
}

/// Completes when the device has rebooted (or begun to) since boot number
/// `boot`. Never completes if the device state is gone.
pub async fn power_cycled(power: &mut watch::Receiver<Power>, boot: u64) {
    if power.wait_for(|p| p.boot != boot).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Completes once the device is up, with its boot number.
pub async fn powered_up(power: &mut watch::Receiver<Power>) -> u64 {
    let boot = power.wait_for(|p| p.up).await.map(|p| p.boot);
    match boot {
        Ok(boot) => boot,
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reports_whole_milliseconds_never_zero() {
        let mut settings = DeviceSettings {
            interval: Duration::from_micros(250),
            batch_size: 10,
            disabled: ["humidity".to_owned()].into(),
        };
        let proto = settings.to_proto();
        assert_eq!(proto.sampling_interval_ms, 1);
        assert_eq!(proto.batch_size, 10);
        assert_eq!(proto.disabled_sensors, ["humidity"]);
        settings.interval = Duration::from_millis(500);
        assert_eq!(settings.to_proto().sampling_interval_ms, 500);
        assert_eq!(
            batch_period(settings.interval, settings.batch_size),
            Duration::from_secs(5)
        );
        assert_eq!(
            batch_period(Duration::from_nanos(1), 1),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn battery_is_optional() {
        let shared = DeviceShared::new(DeviceSettings {
            interval: Duration::from_millis(100),
            batch_size: 10,
            disabled: BTreeSet::new(),
        });
        assert_eq!(shared.battery(), None);
        shared.set_battery(Some(87.5));
        assert_eq!(shared.battery(), Some(87.5));
        shared.set_battery(None);
        assert_eq!(shared.battery(), None);
    }
}
