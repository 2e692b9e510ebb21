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

use super::settings::{DeviceSettings, DeviceShared, batch_period, power_cycled, powered_up};
use crate::report::Stats;
use crate::sensors::Sensor;
use crate::shutdown::Shutdown;

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
    /// Parallel to `sensors`: whether each one is sampled.
    enabled: Vec<bool>,
    rng: StdRng,
    batch_size: usize,
    interval: Duration,
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
        anomaly_rate: Option<f64>,
        settings: &DeviceSettings,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(device_seed(device_id));
        let sensors: Vec<Sensor> = (0..sensors)
            .map(|i| Sensor::nth(i, anomaly_rate, &mut rng))
            .collect();
        let mut sampler = Self {
            enabled: vec![true; sensors.len()],
            sensors,
            rng,
            batch_size: 1,
            interval: Duration::from_secs(1),
            sample_interval_nanos: 1,
            sample_interval_secs: 1.0,
        };
        sampler.apply(settings);
        sampler
    }

    /// Takes on new settings; the next batch follows them.
    pub fn apply(&mut self, settings: &DeviceSettings) {
        self.batch_size = settings.batch_size.max(1);
        self.interval = settings.interval.max(Duration::from_nanos(1));
        self.sample_interval_nanos = u64::try_from(self.interval.as_nanos()).unwrap_or(u64::MAX);
        self.sample_interval_secs = self.interval.as_secs_f64();
        for (sensor, enabled) in self.sensors.iter().zip(&mut self.enabled) {
            *enabled = !settings.disabled.contains(sensor.name());
        }
    }

    /// Whether `settings` would change the time between batches.
    fn pace_differs(&self, settings: &DeviceSettings) -> bool {
        settings.interval != self.interval || settings.batch_size != self.batch_size
    }

    /// Time between two batches.
    pub fn period(&self) -> Duration {
        batch_period(self.interval, self.batch_size)
    }

    /// The battery sensor's charge, if the device has one.
    pub fn battery_level(&self) -> Option<f64> {
        self.sensors.iter().find_map(Sensor::battery_level)
    }

    /// One batch whose last sample is taken at `end_unix_nanos` and whose
    /// earlier samples sit at the preceding sampling instants, so no reading
    /// is ever stamped in the future.
    pub fn batch_ending_at(&mut self, end_unix_nanos: u64) -> Produced {
        self.samples_ending_at(end_unix_nanos, self.batch_size)
    }

    /// Like [`Self::batch_ending_at`], with `samples` samples per sensor.
    fn samples_ending_at(&mut self, end_unix_nanos: u64, samples: usize) -> Produced {
        let span = self
            .sample_interval_nanos
            .saturating_mul(samples.saturating_sub(1) as u64);
        let start = end_unix_nanos.saturating_sub(span);
        let mut anomalies_started = 0;
        let mut series = Vec::with_capacity(self.sensors.len());
        for (sensor, _) in self
            .sensors
            .iter_mut()
            .zip(&self.enabled)
            .filter(|(_, enabled)| **enabled)
        {
            let mut times = Vec::with_capacity(samples);
            let mut values = Vec::with_capacity(samples);
            for j in 0..samples as u64 {
                let t = start.saturating_add(j.saturating_mul(self.sample_interval_nanos));
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

/// Produces one batch per batch period until shutdown, then closes `out`.
/// The first batch comes after `first_delay`, which staggers devices so a
/// big fleet does not upload in lockstep.
///
/// New settings take effect at once: when they change the pace, the
/// samples already due are sent as a short batch and the batch timer starts
/// over, so a device told to sample faster does not first finish a long
/// period at the old pace. While the device is rebooting it takes no
/// samples.
pub async fn run_sampler(
    mut sampler: Sampler,
    shared: Arc<DeviceShared>,
    first_delay: Duration,
    out: mpsc::Sender<Produced>,
    stats: Arc<Stats>,
    mut shutdown: Shutdown,
) {
    let mut settings = shared.settings.subscribe();
    let mut power = shared.power.subscribe();
    sampler.apply(&settings.borrow_and_update());
    let mut boot = power.borrow_and_update().boot;
    let mut ticker = batch_ticker(Instant::now() + first_delay, sampler.period());
    // When the last sample sent was taken; `None` before the first batch.
    let mut last_sample: Option<Instant> = None;

    loop {
        let produced = tokio::select! {
            () = shutdown.requested() => return,
            _ = ticker.tick() => {
                last_sample = Some(Instant::now());
                Some(sampler.batch_ending_at(now_unix_nanos()))
            }
            changed = settings.changed() => {
                if changed.is_err() {
                    // The device is gone; so is this task.
                    return;
                }
                let new = settings.borrow_and_update().clone();
                if !sampler.pace_differs(&new) {
                    sampler.apply(&new);
                    continue;
                }
                let now = Instant::now();
                let due = last_sample.map(|last| samples_due(now - last, &sampler));
                let produced = due.filter(|(n, _)| *n > 0).map(|(n, early)| {
                    last_sample = Some(now - early);
                    let end = now_unix_nanos()
                        .saturating_sub(u64::try_from(early.as_nanos()).unwrap_or(u64::MAX));
                    sampler.samples_ending_at(end, n)
                });
                sampler.apply(&new);
                ticker = batch_ticker(now + sampler.period(), sampler.period());
                produced
            }
            () = power_cycled(&mut power, boot) => {
                tokio::select! {
                    () = shutdown.requested() => return,
                    up = powered_up(&mut power) => boot = up,
                }
                // Nothing was measured while the device was down.
                let now = Instant::now();
                last_sample = Some(now);
                ticker = batch_ticker(now + sampler.period(), sampler.period());
                None
            }
        };
        let Some(produced) = produced else { continue };
        shared.set_battery(sampler.battery_level());
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

fn batch_ticker(start: Instant, period: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(start, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// How many samples fell due in `elapsed` since the last one sent (at most
/// a batch), and how long ago the latest of them was taken.
fn samples_due(elapsed: Duration, sampler: &Sampler) -> (usize, Duration) {
    let interval = sampler.interval.as_nanos().max(1);
    let n = (elapsed.as_nanos() / interval).min(sampler.batch_size as u128);
    let taken = Duration::from_nanos(u64::try_from(n * interval).unwrap_or(u64::MAX));
    (n as usize, elapsed.saturating_sub(taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rate: f64, batch_size: usize) -> DeviceSettings {
        DeviceSettings {
            interval: Duration::from_secs_f64(1.0 / rate),
            batch_size,
            disabled: Default::default(),
        }
    }

    #[test]
    fn seed_is_stable_and_distinct() {
        // FNV-1a of the empty string is the offset basis.
        assert_eq!(device_seed(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(device_seed("sim-00001"), device_seed("sim-00001"));
        assert_ne!(device_seed("sim-00001"), device_seed("sim-00002"));
    }

    #[test]
    fn batch_has_one_series_per_sensor_with_paced_timestamps() {
        let mut sampler = Sampler::new("sim-00001", 5, None, &settings(10.0, 50));
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
    fn disabled_sensors_send_nothing_and_the_pace_follows_settings() {
        let mut sampler = Sampler::new("sim-00001", 4, None, &settings(10.0, 50));
        assert!(sampler.battery_level().is_some());
        let mut changed = settings(2.0, 4);
        changed.disabled.insert("humidity".into());
        sampler.apply(&changed);
        assert_eq!(sampler.period(), Duration::from_secs(2));
        let end = 1_750_000_000_000_000_000;
        let produced = sampler.batch_ending_at(end);
        let names: Vec<_> = produced.series.iter().map(|s| s.sensor.as_str()).collect();
        assert_eq!(names, ["temperature", "pressure", "battery"]);
        for s in &produced.series {
            assert_eq!(
                s.time_unix_nano,
                [
                    end - 1_500_000_000,
                    end - 1_000_000_000,
                    end - 500_000_000,
                    end
                ]
            );
        }
        sampler.apply(&settings(2.0, 4));
        assert_eq!(sampler.batch_ending_at(end).series.len(), 4);

        let no_battery = Sampler::new("sim-00001", 3, None, &settings(10.0, 50));
        assert_eq!(no_battery.battery_level(), None);
    }

    #[tokio::test]
    async fn sampler_follows_new_settings_and_rests_while_rebooting() {
        let shared = Arc::new(DeviceShared::new(settings(1000.0, 10)));
        let sampler = Sampler::new("sim-00001", 2, None, &shared.settings.borrow());
        let (tx, mut rx) = mpsc::channel(64);
        let (trigger, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(run_sampler(
            sampler,
            Arc::clone(&shared),
            Duration::ZERO,
            tx,
            Arc::new(Stats::new()),
            shutdown,
        ));
        async fn next(rx: &mut mpsc::Receiver<Produced>) -> Produced {
            tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .expect("a batch within 2 s")
                .expect("sampler running")
        }
        fn step(p: &Produced) -> Option<u64> {
            let t = &p.series[0].time_unix_nano;
            (t.len() >= 2).then(|| t[1] - t[0])
        }

        let first = next(&mut rx).await;
        assert_eq!(first.series.len(), 2);
        assert_eq!(first.series[0].time_unix_nano.len(), 10);
        assert_eq!(step(&first), Some(1_000_000));

        shared.settings.send_modify(|s| {
            s.interval = Duration::from_millis(20);
            s.batch_size = 5;
            s.disabled.insert("humidity".into());
        });
        // Possibly a short batch of what was due at the old pace first.
        let mut paced = next(&mut rx).await;
        for _ in 0..20 {
            if step(&paced) == Some(20_000_000) {
                break;
            }
            paced = next(&mut rx).await;
        }
        assert_eq!(step(&paced), Some(20_000_000));
        assert_eq!(paced.series.len(), 1, "humidity is disabled");
        assert_eq!(paced.series[0].sensor, "temperature");
        assert_eq!(paced.series[0].time_unix_nano.len(), 5);
        let started = Instant::now();
        next(&mut rx).await;
        assert!(
            started.elapsed() >= Duration::from_millis(80),
            "a batch every 100 ms now, not every 10 ms"
        );

        shared.power.send_modify(|p| {
            p.boot += 1;
            p.up = false;
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        while rx.try_recv().is_ok() {}
        assert!(
            tokio::time::timeout(Duration::from_millis(250), rx.recv())
                .await
                .is_err(),
            "no samples while the device is down"
        );
        shared.power.send_modify(|p| p.up = true);
        assert_eq!(step(&next(&mut rx).await), Some(20_000_000));

        trigger.trigger();
        task.await.expect("sampler stops");
    }

    #[test]
    fn same_device_same_readings() {
        let end = 1_750_000_000_000_000_000;
        let a = Sampler::new("sim-00009", 4, Some(0.05), &settings(10.0, 20)).batch_ending_at(end);
        let b = Sampler::new("sim-00009", 4, Some(0.05), &settings(10.0, 20)).batch_ending_at(end);
        assert_eq!(a, b);
    }

    #[test]
    fn series_columns_match_under_anomalies() {
        let mut sampler = Sampler::new("sim-00002", 4, Some(0.2), &settings(10.0, 50));
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
