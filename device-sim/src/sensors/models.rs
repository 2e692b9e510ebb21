//! Sensor models that produce plausible physical signals. Every parameter is
//! drawn from the device's seeded generator, so a device reports the same
//! kind of climate on every run.

use std::f64::consts::TAU;

use rand::Rng;

use super::anomaly::{AnomalyInjector, Injected};

const SECONDS_PER_DAY: f64 = 86_400.0;
const NANOS_PER_SECOND: f64 = 1e9;

/// Standard normal sample (Box–Muller); rand_distr is not worth a dependency
/// for one distribution.
pub fn gaussian(rng: &mut impl Rng) -> f64 {
    // 1 - [0, 1) is (0, 1], keeping ln away from zero.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// A mean-reverting random walk (Ornstein–Uhlenbeck): wanders like real
/// weather but cannot run off forever, and is clamped to physical limits.
#[derive(Debug, Clone)]
pub struct Walk {
    value: f64,
    mean: f64,
    /// Pull back towards the mean, per second.
    reversion: f64,
    /// Noise per square-root second.
    volatility: f64,
    min: f64,
    max: f64,
}

impl Walk {
    /// A walk around `mean` whose long-run standard deviation is `std_dev`
    /// and whose memory is about `timescale_secs`.
    fn new(mean: f64, std_dev: f64, timescale_secs: f64, min: f64, max: f64) -> Self {
        let reversion = 1.0 / timescale_secs;
        Self {
            value: mean.clamp(min, max),
            mean,
            reversion,
            volatility: std_dev * (2.0 * reversion).sqrt(),
            min,
            max,
        }
    }

    fn step(&mut self, dt_secs: f64, rng: &mut impl Rng) -> f64 {
        let pull = self.reversion * (self.mean - self.value) * dt_secs;
        let noise = self.volatility * dt_secs.sqrt() * gaussian(rng);
        self.value = (self.value + pull + noise).clamp(self.min, self.max);
        self.value
    }
}

#[derive(Debug, Clone)]
enum Model {
    /// Daily sine around 20 °C plus a per-device offset and noise.
    Temperature {
        offset: f64,
        noise: f64,
    },
    Humidity(Walk),
    Pressure(Walk),
    /// Drains linearly from its starting charge.
    Battery {
        level: f64,
        drain_per_sec: f64,
    },
    Aux(Walk),
}

/// One sensor of a device: its name, unit, signal model and fault injector.
#[derive(Debug, Clone)]
pub struct Sensor {
    name: String,
    unit: &'static str,
    model: Model,
    anomaly: Option<AnomalyInjector>,
}

/// The name of a device's `index`-th sensor (0-based): temperature,
/// humidity, pressure, battery, then `aux_1`, `aux_2`, ...
pub fn sensor_name(index: usize) -> String {
    match index {
        0 => "temperature".to_owned(),
        1 => "humidity".to_owned(),
        2 => "pressure".to_owned(),
        3 => "battery".to_owned(),
        n => format!("aux_{}", n - 3),
    }
}

impl Sensor {
    /// The `index`-th sensor of a device (0-based), named by
    /// [`sensor_name`].
    pub fn nth(index: usize, anomaly_rate: Option<f64>, rng: &mut impl Rng) -> Self {
        let name = sensor_name(index);
        let (unit, model) = match index {
            0 => (
                "Cel",
                Model::Temperature {
                    offset: rng.random_range(-3.0..=3.0),
                    noise: 0.2,
                },
            ),
            1 => (
                "%",
                Model::Humidity(Walk::new(
                    rng.random_range(40.0..=70.0),
                    5.0,
                    3_600.0,
                    0.0,
                    100.0,
                )),
            ),
            2 => (
                "hPa",
                // The clamp is the range of sea-level pressure ever recorded.
                Model::Pressure(Walk::new(
                    1013.25 + rng.random_range(-5.0..=5.0),
                    4.0,
                    6.0 * 3_600.0,
                    870.0,
                    1085.0,
                )),
            ),
            3 => (
                "%",
                Model::Battery {
                    level: rng.random_range(60.0..=100.0),
                    // 0.5 to 2 percent per hour: a full charge lasts days.
                    drain_per_sec: rng.random_range(0.5..=2.0) / 3_600.0,
                },
            ),
            _ => (
                "",
                Model::Aux(Walk::new(
                    rng.random_range(0.0..=100.0),
                    10.0,
                    600.0,
                    f64::NEG_INFINITY,
                    f64::INFINITY,
                )),
            ),
        };
        Self {
            name,
            unit,
            model,
            anomaly: anomaly_rate.map(AnomalyInjector::new),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn unit(&self) -> &'static str {
        self.unit
    }

    /// The charge of a battery sensor's model (its true value, not what an
    /// anomaly may make it report); `None` for other sensors.
    pub fn battery_level(&self) -> Option<f64> {
        match self.model {
            Model::Battery { level, .. } => Some(level),
            _ => None,
        }
    }

    /// Width of the sensor's normal range; anomalies are scaled by it.
    fn span(&self) -> f64 {
        match self.model {
            Model::Temperature { .. } => 10.0,
            Model::Humidity(_) | Model::Pressure(_) | Model::Battery { .. } | Model::Aux(_) => 20.0,
        }
    }

    /// The true physical value at `time_unix_nano`, `dt_secs` after the
    /// previous sample.
    pub fn true_value(&mut self, time_unix_nano: u64, dt_secs: f64, rng: &mut impl Rng) -> f64 {
        match &mut self.model {
            Model::Temperature { offset, noise } => {
                let time_of_day = (time_unix_nano as f64 / NANOS_PER_SECOND) % SECONDS_PER_DAY;
                20.0 + 5.0 * (TAU * time_of_day / SECONDS_PER_DAY).sin()
                    + *offset
                    + *noise * gaussian(rng)
            }
            Model::Humidity(walk) | Model::Pressure(walk) | Model::Aux(walk) => {
                walk.step(dt_secs, rng)
            }
            Model::Battery {
                level,
                drain_per_sec,
            } => {
                *level = (*level - *drain_per_sec * dt_secs).max(0.0);
                *level
            }
        }
    }

    /// The next reading as sent: the true value, possibly disturbed by an
    /// anomaly (or absent during a dropout).
    pub fn sample(&mut self, time_unix_nano: u64, dt_secs: f64, rng: &mut impl Rng) -> Injected {
        let value = self.true_value(time_unix_nano, dt_secs, rng);
        let span = self.span();
        match &mut self.anomaly {
            Some(injector) => injector.apply(value, span, rng),
            None => Injected {
                value: Some(value),
                started: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const START_NANOS: u64 = 1_750_000_000_000_000_000;
    /// Two simulated days at one sample per ten seconds.
    const STEPS: u64 = 2 * 24 * 360;
    const DT: f64 = 10.0;

    fn series_with(index: usize, seed: u64, steps: u64, dt: f64) -> (String, Vec<f64>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut sensor = Sensor::nth(index, None, &mut rng);
        let values = (0..steps)
            .map(|i| {
                let t = START_NANOS + i * (dt * NANOS_PER_SECOND) as u64;
                sensor
                    .sample(t, dt, &mut rng)
                    .value
                    .expect("no dropouts without anomalies")
            })
            .collect();
        (sensor.name().to_owned(), values)
    }

    fn series(index: usize, seed: u64) -> (String, Vec<f64>) {
        series_with(index, seed, STEPS, DT)
    }

    fn assert_within(values: &[f64], lo: f64, hi: f64, what: &str) {
        for v in values {
            assert!(
                v.is_finite() && (lo..=hi).contains(v),
                "{what}: {v} outside {lo}..={hi}"
            );
        }
    }

    #[test]
    fn models_stay_within_physical_ranges() {
        for seed in 0..8 {
            let (name, t) = series(0, seed);
            assert_eq!(name, "temperature");
            assert_within(&t, 5.0, 35.0, "temperature");

            let (name, h) = series(1, seed);
            assert_eq!(name, "humidity");
            assert_within(&h, 0.0, 100.0, "humidity");

            let (name, p) = series(2, seed);
            assert_eq!(name, "pressure");
            assert_within(&p, 870.0, 1085.0, "pressure");

            let (name, b) = series(3, seed);
            assert_eq!(name, "battery");
            assert_within(&b, 0.0, 100.0, "battery");
            assert!(b.windows(2).all(|w| w[1] <= w[0]), "battery never charges");
        }
    }

    #[test]
    fn battery_drains_to_zero_and_stays_there() {
        // 300 hours at 0.5..2 %/h drains at least 150 %, so it hits zero.
        let (_, b) = series_with(3, 1, 300, 3_600.0);
        assert_eq!(*b.last().expect("non-empty"), 0.0);
    }

    #[test]
    fn temperature_follows_the_day() {
        let (_, t) = series(0, 2);
        let min = t.iter().copied().fold(f64::INFINITY, f64::min);
        let max = t.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert!(max - min > 8.0, "daily swing missing: {min}..{max}");
    }

    #[test]
    fn extra_sensors_are_aux_with_valid_names() {
        let mut rng = StdRng::seed_from_u64(0);
        let names: Vec<_> = (0..7)
            .map(|i| Sensor::nth(i, None, &mut rng).name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "temperature",
                "humidity",
                "pressure",
                "battery",
                "aux_1",
                "aux_2",
                "aux_3"
            ]
        );
    }

    #[test]
    fn same_seed_same_signal() {
        assert_eq!(series(1, 42).1, series(1, 42).1);
        assert_ne!(series(1, 42).1, series(1, 43).1);
    }
}
