//! When a client tries a failed call again: the one backoff of device-sim
//! and of the CLI's alert watcher. Whether to try again at all is
//! [`crate::status`]'s answer.
//!
//! Waits grow exponentially up to a cap and are jittered, so a fleet that
//! lost its server at the same instant does not come back as one herd; a
//! success resets them. A server that says how long to wait
//! (`google.rpc.RetryInfo`, sent with RESOURCE_EXHAUSTED when a device
//! opens streams too fast) is obeyed: retrying sooner would only be refused
//! again.

use std::time::Duration;

use rand::Rng;
use tonic::Status;

use crate::status::retry_delay;

pub const DEFAULT_BASE: Duration = Duration::from_millis(100);
pub const DEFAULT_CAP: Duration = Duration::from_secs(10);
/// The longest server-provided delay honoured: a bogus hour-long hint
/// must not park a client for an hour.
pub const MAX_SERVER_DELAY: Duration = Duration::from_secs(300);

/// How a wait is drawn below its exponential ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `0..=min(cap, base * 2^failures)`: the widest spread,
    /// best when many clients fail together.
    Full,
    /// Uniform in `base..=min(cap, previous * 3)` (AWS's "decorrelated
    /// jitter"): never shorter than `base`, and each wait depends on the
    /// last one rather than on a failure count.
    Decorrelated,
}

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: Jitter,
    /// Consecutive failures since the last reset (full jitter).
    failures: u32,
    /// The previous wait (decorrelated jitter); `base` after a reset.
    previous: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(DEFAULT_BASE, DEFAULT_CAP)
    }
}

impl Backoff {
    /// Full jitter from `base` up to `cap`. A `cap` below `base` is raised
    /// to it.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self::with_jitter(base, cap, Jitter::Full)
    }

    pub fn with_jitter(base: Duration, cap: Duration, jitter: Jitter) -> Self {
        Self {
            base,
            cap: cap.max(base),
            jitter,
            failures: 0,
            previous: base,
        }
    }

    /// Upper bound of the next wait.
    pub fn ceiling(&self) -> Duration {
        match self.jitter {
            Jitter::Full => {
                // Past 2^20 the cap was reached long ago; the shift must
                // not overflow.
                let factor = 1u32 << self.failures.min(20);
                self.base.saturating_mul(factor).min(self.cap)
            }
            Jitter::Decorrelated => self.previous.saturating_mul(3).min(self.cap),
        }
    }

    /// The wait before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let delay = match self.jitter {
            Jitter::Full => ceiling.mul_f64(rng.random_range(0.0..=1.0)),
            Jitter::Decorrelated => {
                let spread = ceiling.saturating_sub(self.base);
                self.base + spread.mul_f64(rng.random_range(0.0..=1.0))
            }
        };
        self.previous = delay;
        delay
    }

    /// The wait after a call failed with `status`: the backoff's, or longer
    /// when the server asked for longer ([`retry_delay`]). The server's
    /// delay gets up to a fifth more, so clients it refused together do not
    /// all return at the same instant.
    pub fn next_delay_after(&mut self, status: &Status, rng: &mut impl Rng) -> Duration {
        self.next_delay_with(retry_delay(status), rng)
    }

    /// [`Backoff::next_delay_after`] with the server's delay already read.
    pub fn next_delay_with(&mut self, server: Option<Duration>, rng: &mut impl Rng) -> Duration {
        let own = self.next_delay(rng);
        match server {
            Some(asked) => {
                let asked = asked.min(MAX_SERVER_DELAY);
                own.max(asked + asked.mul_f64(rng.random_range(0.0..=0.2)))
            }
            None => own,
        }
    }

    /// Call after a success, so the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.previous = self.base;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use tonic::Code;
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;
    use crate::status::is_retryable;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn full_jitter_ceiling_doubles_then_caps_and_resets() {
        let mut backoff = Backoff::default();
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..100 {
            ceilings.push(backoff.ceiling());
            let delay = backoff.next_delay(&mut rng);
            assert!(delay <= *ceilings.last().expect("pushed"));
        }
        assert_eq!(ceilings[..4], [ms(100), ms(200), ms(400), ms(800)]);
        assert_eq!(ceilings[7], DEFAULT_CAP, "12.8 s capped");
        assert_eq!(ceilings[99], DEFAULT_CAP);
        backoff.reset();
        assert_eq!(backoff.ceiling(), DEFAULT_BASE);
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_range() {
        let mut backoff = Backoff::default();
        let mut rng = StdRng::seed_from_u64(2);
        let capped: Vec<_> = (0..1000)
            .map(|_| backoff.next_delay(&mut rng))
            .skip(100)
            .collect();
        assert!(capped.iter().any(|d| *d < DEFAULT_CAP / 4));
        assert!(capped.iter().any(|d| *d > DEFAULT_CAP * 3 / 4));
    }

    #[test]
    fn decorrelated_jitter_grows_from_base_and_resets() {
        let mut backoff = Backoff::with_jitter(ms(100), ms(10_000), Jitter::Decorrelated);
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(backoff.ceiling(), ms(300));
        let delays: Vec<_> = (0..50).map(|_| backoff.next_delay(&mut rng)).collect();
        assert!(delays.iter().all(|d| (ms(100)..=ms(10_000)).contains(d)));
        assert!(
            delays.iter().any(|d| *d > ms(3_000)),
            "grows toward the cap: {delays:?}"
        );
        backoff.reset();
        assert_eq!(backoff.ceiling(), ms(300));
    }

    #[test]
    fn a_server_delay_is_a_floor_with_a_little_jitter() {
        let status = Status::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            ErrorDetails::with_retry_info(Some(ms(2_000))),
        );
        assert_eq!(retry_delay(&status), Some(ms(2_000)));
        assert!(is_retryable(&status));
        let mut backoff = Backoff::default();
        let mut rng = StdRng::seed_from_u64(4);
        let delays: Vec<_> = (0..3)
            .map(|_| backoff.next_delay_after(&status, &mut rng))
            .collect();
        assert!(
            delays.iter().all(|d| (ms(2_000)..=ms(2_400)).contains(d)),
            "{delays:?}"
        );
        // Without a hint, the backoff's own delay (first ceiling 100 ms).
        let mut backoff = Backoff::default();
        assert!(backoff.next_delay_after(&Status::unavailable("down"), &mut rng) <= ms(100));
    }

    fn jitter() -> impl Strategy<Value = Jitter> {
        prop_oneof![Just(Jitter::Full), Just(Jitter::Decorrelated)]
    }

    proptest! {
        /// Whatever the settings, the history and the random draws: no wait
        /// exceeds the cap, decorrelated waits never go below the base,
        /// and a reset brings the ceiling back to where it started.
        #[test]
        fn waits_stay_within_base_and_cap(
            base_ms in 1u64..5_000,
            cap_ms in 0u64..120_000,
            jitter in jitter(),
            seed: u64,
            failures in 1usize..200,
        ) {
            let mut backoff = Backoff::with_jitter(ms(base_ms), ms(cap_ms), jitter);
            let first_ceiling = backoff.ceiling();
            let cap = ms(cap_ms.max(base_ms));
            let mut rng = StdRng::seed_from_u64(seed);
            for _ in 0..failures {
                let ceiling = backoff.ceiling();
                let delay = backoff.next_delay(&mut rng);
                prop_assert!(delay <= ceiling && ceiling <= cap);
                if jitter == Jitter::Decorrelated {
                    prop_assert!(delay >= ms(base_ms));
                }
            }
            backoff.reset();
            prop_assert_eq!(backoff.ceiling(), first_ceiling);
        }

        /// A server's delay is never cut short (up to the honoured
        /// maximum), and never stretched by more than a fifth beyond what
        /// the backoff itself would wait.
        #[test]
        fn a_server_delay_is_honoured(asked_ms in 0u64..600_000, seed: u64, failures in 0usize..30) {
            let mut backoff = Backoff::default();
            let mut rng = StdRng::seed_from_u64(seed);
            for _ in 0..failures {
                backoff.next_delay(&mut rng);
            }
            let delay = backoff.next_delay_with(Some(ms(asked_ms)), &mut rng);
            let floor = ms(asked_ms).min(MAX_SERVER_DELAY);
            prop_assert!(delay >= floor);
            prop_assert!(delay <= DEFAULT_CAP.max(floor.mul_f64(1.2)));
        }
    }
}
