//! Turns a device's sensors into `ReadingBatch`es at the configured pace.
//! Sampling runs in its own task so a device keeps measuring while its
//! uploads are stalled, as a real device would.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand::rngs::StdRng;
use telemetry_proto::v1::{ReadingBatch, SensorSeries};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::sensors::Sensor;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// A stable 64-bit hash (FNV-1a) of a device id. std's hasher may change
/// between Rust releases, which would change every device's climate.
pub fn device_seed(device_id: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    device_id.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// The sensors of one device and the generator that drives them.
#[derive(Debug)]
pub struct Sampler {
    sensors: Vec<Sensor>,
    rng: StdRng,
    batch_size: usize,
    sample_interval_nanos: u64,
    sample_interval_secs: f64,
}

/// A batch without its sequence number: the uploader assigns sequences, as it
/// alone knows where the server's cursor stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Produced {
    pub series: Vec<SensorSeries>,
    pub anomalies_started: u64,
}

impl Produced {
    pub fn into_batch(self, sequence: u64) -> ReadingBatch {
        ReadingBatch {
            sequence,
            series: self.series,
        }
    }
}

impl Sampler {
    pub fn new(
        device_id: &str,
        sensors: usize,
        sample_rate: f64,
        batch_size: usize,
        anomaly_rate: Option<f64>,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(device_seed(device_id));
        let sensors = (0..sensors)
            .map(|i| Sensor::nth(i, anomaly_rate, &mut rng))
            .collect();
        let sample_interval_secs = 1.0 / sample_rate;
        Self {
            sensors,
            rng,
            batch_size,
            sample_interval_nanos: (sample_interval_secs * 1e9).round().max(1.0) as u64,
            sample_interval_secs,
        }
    }

    /// One batch whose last sample is taken at `end_unix_nanos` and whose
    /// earlier samples sit at the preceding sampling instants, so no reading
    /// is ever stamped in the future.
    pub fn batch_ending_at(&mut self, end_unix_nanos: u64) -> Produced {
        let span = self.sample_interval_nanos * (self.batch_size as u64 - 1);
        let start = end_unix_nanos.saturating_sub(span);
        let mut anomalies_started = 0;
        let mut series = Vec::with_capacity(self.sensors.len());
        for sensor in &mut self.sensors {
            let mut times = Vec::with_capacity(self.batch_size);
            let mut values = Vec::with_capacity(self.batch_size);
            for j in 0..self.batch_size as u64 {
                let t = start + j * self.sample_interval_nanos;
                let sample = sensor.sample(t, self.sample_interval_secs, &mut self.rng);
                anomalies_started += u64::from(sample.started.is_some());
                if let Some(value) = sample.value {
                    times.push(t);
                    values.push(value);
                }
            }
            // A sensor in dropout sends nothing, not an empty series.
            if !times.is_empty() {
                series.push(SensorSeries {
                    sensor: sensor.name().to_owned(),
                    unit: sensor.unit().to_owned(),
                    time_unix_nano: times,
                    value: values,
                });
            }
        }
        Produced {
            series,
            anomalies_started,
        }
    }
}

pub fn readings_in(series: &[SensorSeries]) -> u64 {
    series.iter().map(|s| s.value.len() as u64).sum()
}

fn now_unix_nanos() -> u64 {
    // A clock before 1970 is a broken host; stamping 0 makes the server
    // reject the readings loudly instead of us panicking.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Produces one batch per `period` until shutdown, then closes `out`. The
/// first batch comes after `first_delay`, which staggers devices so a big
/// fleet does not upload in lockstep.
pub async fn run_sampler(
    mut sampler: Sampler,
    period: Duration,
    first_delay: Duration,
    out: mpsc::Sender<Produced>,
    stats: Arc<Stats>,
    mut shutdown: Shutdown,
) {
    let mut ticker = tokio::time::interval_at(Instant::now() + first_delay, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.requested() => return,
            _ = ticker.tick() => {}
        }
        let produced = sampler.batch_ending_at(now_unix_nanos());
        stats.anomalies_injected.add(produced.anomalies_started);
        if produced.series.is_empty() {
            continue;
        }
        // The uploader always drains this channel; a full channel only means
        // it has not learned its cursor yet, and waiting here is what a
        // device does before it knows where to resume.
        tokio::select! {
            _ = shutdown.requested() => return,
            sent = out.send(produced) => if sent.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_is_stable_and_distinct() {
        // FNV-1a of the empty string is the offset basis.
        assert_eq!(device_seed(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(device_seed("sim-00001"), device_seed("sim-00001"));
        assert_ne!(device_seed("sim-00001"), device_seed("sim-00002"));
    }

    #[test]
    fn batch_has_one_series_per_sensor_with_paced_timestamps() {
        let mut sampler = Sampler::new("sim-00001", 5, 10.0, 50, None);
        let end = 1_750_000_000_000_000_000;
        let produced = sampler.batch_ending_at(end);
        let names: Vec<_> = produced.series.iter().map(|s| s.sensor.as_str()).collect();
        assert_eq!(
            names,
            ["temperature", "humidity", "pressure", "battery", "aux_1"]
        );
        for s in &produced.series {
            assert_eq!(s.time_unix_nano.len(), 50);
            assert_eq!(s.value.len(), 50);
            assert_eq!(*s.time_unix_nano.last().expect("non-empty"), end);
            assert!(
                s.time_unix_nano
                    .windows(2)
                    .all(|w| w[1] - w[0] == 100_000_000)
            );
        }
        assert_eq!(readings_in(&produced.series), 250);
        assert_eq!(produced.into_batch(7).sequence, 7);
    }

    #[test]
    fn same_device_same_readings() {
        let end = 1_750_000_000_000_000_000;
        let a = Sampler::new("sim-00009", 4, 10.0, 20, Some(0.05)).batch_ending_at(end);
        let b = Sampler::new("sim-00009", 4, 10.0, 20, Some(0.05)).batch_ending_at(end);
        assert_eq!(a, b);
    }

    #[test]
    fn series_columns_match_under_anomalies() {
        let mut sampler = Sampler::new("sim-00002", 4, 10.0, 50, Some(0.2));
        let mut end = 1_750_000_000_000_000_000;
        for _ in 0..100 {
            for s in sampler.batch_ending_at(end).series {
                assert_eq!(s.time_unix_nano.len(), s.value.len());
                assert!(!s.value.is_empty());
            }
            end += 5_000_000_000;
        }
    }
}
