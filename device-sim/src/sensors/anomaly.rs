//! Faults that real sensors show, injected so alert rules have something to
//! catch: a wild single value, a slowly drifting calibration, a frozen
//! reading, and a sensor that goes silent.

use std::ops::RangeInclusive;

use rand::Rng;

/// How long (in samples) a lasting anomaly goes on.
const DRIFT_SAMPLES: RangeInclusive<u32> = 50..=500;
const STUCK_SAMPLES: RangeInclusive<u32> = 50..=500;
const DROPOUT_SAMPLES: RangeInclusive<u32> = 20..=200;
/// A spike lands this many sensor spans away from the true value: far
/// outside anything the sensor reports normally, yet finite (the server
/// rejects NaN and infinities as malformed, which is a different test).
const SPIKE_SPANS: RangeInclusive<f64> = 5.0..=10.0;
/// Drift grows by this fraction of the sensor span per sample.
const DRIFT_STEP_SPANS: RangeInclusive<f64> = 0.002..=0.01;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnomalyKind {
    Spike,
    Drift,
    Stuck,
    Dropout,
}

impl AnomalyKind {
    const ALL: [Self; 4] = [Self::Spike, Self::Drift, Self::Stuck, Self::Dropout];
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Normal,
    Drift {
        offset: f64,
        step: f64,
        remaining: u32,
    },
    Stuck {
        value: f64,
        remaining: u32,
    },
    Dropout {
        remaining: u32,
    },
}

/// What became of one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Injected {
    /// The value to send, or `None` when the sensor is silent.
    pub value: Option<f64>,
    /// Set when an anomaly began at this sample.
    pub started: Option<AnomalyKind>,
}

/// Per-sensor anomaly state: at most one anomaly is active at a time.
#[derive(Debug, Clone)]
pub struct AnomalyInjector {
    rate: f64,
    state: State,
    last_sent: Option<f64>,
}

impl AnomalyInjector {
    /// `rate` is the probability per sample that an anomaly starts; it must
    /// lie within `0..=1`.
    pub fn new(rate: f64) -> Self {
        debug_assert!((0.0..=1.0).contains(&rate));
        Self {
            rate: rate.clamp(0.0, 1.0),
            state: State::Normal,
            last_sent: None,
        }
    }

    /// Passes one true sample through the injector. `span` is the sensor's
    /// normal range width, so anomalies scale with the quantity measured.
    pub fn apply(&mut self, value: f64, span: f64, rng: &mut impl Rng) -> Injected {
        let mut started = None;
        if self.state == State::Normal && rng.random_bool(self.rate) {
            let kind = AnomalyKind::ALL[rng.random_range(0..AnomalyKind::ALL.len())];
            started = Some(kind);
            let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
            match kind {
                AnomalyKind::Spike => {
                    let spike = value + sign * span * rng.random_range(SPIKE_SPANS);
                    // A spike is a single reading: the next sample is normal
                    // again, and "stuck" must not freeze on the spike.
                    return Injected {
                        value: Some(spike),
                        started,
                    };
                }
                AnomalyKind::Drift => {
                    self.state = State::Drift {
                        offset: 0.0,
                        step: sign * span * rng.random_range(DRIFT_STEP_SPANS),
                        remaining: rng.random_range(DRIFT_SAMPLES),
                    };
                }
                AnomalyKind::Stuck => {
                    self.state = State::Stuck {
                        value: self.last_sent.unwrap_or(value),
                        remaining: rng.random_range(STUCK_SAMPLES),
                    };
                }
                AnomalyKind::Dropout => {
                    self.state = State::Dropout {
                        remaining: rng.random_range(DROPOUT_SAMPLES),
                    };
                }
            }
        }

        let (out, next) = match self.state {
            State::Normal => (Some(value), State::Normal),
            State::Drift {
                offset,
                step,
                remaining,
            } => {
                let offset = offset + step;
                let next = match remaining.saturating_sub(1) {
                    0 => State::Normal,
                    remaining => State::Drift {
                        offset,
                        step,
                        remaining,
                    },
                };
                (Some(value + offset), next)
            }
            State::Stuck {
                value: stuck,
                remaining,
            } => {
                let next = match remaining.saturating_sub(1) {
                    0 => State::Normal,
                    remaining => State::Stuck {
                        value: stuck,
                        remaining,
                    },
                };
                (Some(stuck), next)
            }
            State::Dropout { remaining } => {
                let next = match remaining.saturating_sub(1) {
                    0 => State::Normal,
                    remaining => State::Dropout { remaining },
                };
                (None, next)
            }
        };
        self.state = next;
        if out.is_some() {
            self.last_sent = out;
        }
        Injected {
            value: out,
            started,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// Feeds a constant signal and returns what came out.
    fn run(rate: f64, samples: usize, seed: u64) -> Vec<Injected> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut injector = AnomalyInjector::new(rate);
        (0..samples)
            .map(|_| injector.apply(10.0, 20.0, &mut rng))
            .collect()
    }

    #[test]
    fn rate_zero_leaves_values_alone() {
        assert!(
            run(0.0, 10_000, 1)
                .iter()
                .all(|i| i.value == Some(10.0) && i.started.is_none())
        );
    }

    #[test]
    fn every_kind_appears_and_changes_values() {
        let out = run(0.02, 200_000, 7);
        for kind in AnomalyKind::ALL {
            assert!(
                out.iter().any(|i| i.started == Some(kind)),
                "{kind:?} never started"
            );
        }
        // Spikes are far outside the span; drift moves off the true value;
        // dropouts send nothing.
        assert!(
            out.iter()
                .any(|i| i.value.is_some_and(|v| (v - 10.0).abs() >= 100.0))
        );
        assert!(out.iter().any(|i| i.value.is_some_and(|v| {
            let d = (v - 10.0).abs();
            d > 0.0 && d < 100.0
        })));
        assert!(out.iter().any(|i| i.value.is_none()));
        assert!(out.iter().all(|i| i.value.is_none_or(f64::is_finite)));
    }

    #[test]
    fn spike_lasts_one_sample() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut injector = AnomalyInjector::new(1.0);
        // Force a spike by retrying until one starts, then check the next
        // sample with anomalies off is the true value again.
        loop {
            let out = injector.apply(10.0, 20.0, &mut rng);
            if out.started == Some(AnomalyKind::Spike) {
                break;
            }
            injector.state = State::Normal;
        }
        injector.rate = 0.0;
        assert_eq!(injector.apply(10.0, 20.0, &mut rng).value, Some(10.0));
    }

    #[test]
    fn stuck_repeats_last_value_then_recovers() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut injector = AnomalyInjector::new(0.0);
        injector.apply(42.0, 20.0, &mut rng);
        injector.state = State::Stuck {
            value: 42.0,
            remaining: 3,
        };
        let outs: Vec<_> = (0..4)
            .map(|i| injector.apply(f64::from(i), 20.0, &mut rng).value)
            .collect();
        assert_eq!(outs, vec![Some(42.0), Some(42.0), Some(42.0), Some(3.0)]);
    }

    #[test]
    fn drift_grows() {
        let mut rng = StdRng::seed_from_u64(9);
        let mut injector = AnomalyInjector::new(0.0);
        injector.state = State::Drift {
            offset: 0.0,
            step: 0.5,
            remaining: 4,
        };
        let outs: Vec<_> = (0..5)
            .map(|_| injector.apply(0.0, 20.0, &mut rng).value)
            .collect();
        assert_eq!(
            outs,
            vec![Some(0.5), Some(1.0), Some(1.5), Some(2.0), Some(0.0)]
        );
    }
}
