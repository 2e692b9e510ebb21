//! What a trial sends, decided by its seed before it starts: the devices,
//! every batch's readings (a pure function of seed, device and sequence, so
//! a resent batch carries exactly what the first attempt carried) and the
//! alert rules.

use telemetry_proto::v1 as pb;

use super::oracle::Threshold;

pub const SENSOR: &str = "temp";
pub const UNIT: &str = "C";
pub const READINGS_PER_BATCH: u64 = 5;
/// Readings of a device are 1 ms apart, so the 2 ms hold of `hot-held`
/// needs three readings in a row above the threshold.
pub const STEP_NANOS: i64 = 1_000_000;

/// The rules, as the oracle sees them. Readings fall in three bands, below
/// the clear value, inside the hysteresis band and above the fire value,
/// so alerts fire and resolve often.
pub const RULES: [(&str, Threshold); 2] = [
    (
        "hot",
        Threshold {
            fire: 100.0,
            clear: 50.0,
            hold_millis: 0,
        },
    ),
    (
        "hot-held",
        Threshold {
            fire: 100.0,
            clear: 50.0,
            hold_millis: 2,
        },
    ),
];

pub fn rule_protos() -> Vec<pb::AlertRule> {
    RULES
        .iter()
        .map(|(id, t)| pb::AlertRule {
            rule_id: (*id).into(),
            devices: Some(pb::DeviceSelector {
                selector: Some(pb::device_selector::Selector::All(true)),
            }),
            sensor: SENSOR.into(),
            severity: pb::Severity::Warning as i32,
            condition: Some(pb::alert_rule::Condition::Threshold(
                pb::ThresholdCondition {
                    direction: pb::threshold_condition::Direction::Above as i32,
                    fire_value: t.fire,
                    clear_value: t.clear,
                    for_millis: t.hold_millis,
                },
            )),
            warnings: Vec::new(),
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub devices: u32,
    pub batches: u64,
    /// The first reading's time: fixed for the trial, recent enough that
    /// retention never touches it, and whole milliseconds.
    pub base_time: i64,
}

impl Plan {
    pub fn device_id(&self, device: u32) -> String {
        format!("fault-{}-{device:03}", self.seed)
    }

    /// The readings (time, value) of batch `sequence` (1-based) of `device`.
    pub fn batch(&self, device: u32, sequence: u64) -> Vec<(i64, f64)> {
        (0..READINGS_PER_BATCH)
            .map(|i| {
                let n = (sequence - 1) * READINGS_PER_BATCH + i;
                let time = self.base_time + n as i64 * STEP_NANOS;
                (time, self.value(device, n))
            })
            .collect()
    }

    /// Every reading of batches 1..=committed, in time order.
    pub fn readings_through(&self, device: u32, committed: u64) -> Vec<(i64, f64)> {
        (1..=committed.min(self.batches))
            .flat_map(|s| self.batch(device, s))
            .collect()
    }

    pub fn batch_proto(&self, device: u32, sequence: u64) -> pb::ReadingBatch {
        let (times, values): (Vec<i64>, Vec<f64>) =
            self.batch(device, sequence).into_iter().unzip();
        pb::ReadingBatch {
            sequence,
            series: vec![pb::SensorSeries {
                sensor: SENSOR.into(),
                unit: UNIT.into(),
                time_unix_nano: times.into_iter().map(|t| t as u64).collect(),
                value: values,
            }],
        }
    }

    /// Reading `n` of a device. The band is drawn per pair of readings so
    /// that runs of three or more above the fire value (what `hot-held`
    /// needs) are common; the value within the band per reading.
    fn value(&self, device: u32, n: u64) -> f64 {
        let band = mix(self.seed, u64::from(device), n / 2) % 3;
        let within = (mix(self.seed ^ 0x5eed, u64::from(device), n) % 300) as f64 / 10.0;
        match band {
            0 => 10.0 + within,  // normal: below clear
            1 => 60.0 + within,  // inside the hysteresis band
            _ => 120.0 + within, // spike: above fire
        }
    }
}

/// splitmix64 over the three inputs: stable across versions and platforms,
/// unlike a library RNG, so a seed replays the same data forever.
fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(b.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(c.wrapping_mul(0x94d0_49bb_1331_11eb))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
