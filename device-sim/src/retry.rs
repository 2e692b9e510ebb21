//! When and how long to wait before trying a call again.
//!
//! Backoff is exponential with full jitter: the wait after the n-th
//! consecutive failure is uniform in `0..=min(cap, base * 2^n)`. Jitter
//! spreads out a fleet that lost the server at the same moment, so the
//! reconnects do not arrive as one thundering herd.

use std::time::Duration;

use rand::Rng;
use tonic::{Code, Status};

/// Codes that say "not now" rather than "never": the server or the network
/// is down, overloaded or restarting. Transport failures (refused
/// connection, reset stream) surface as UNAVAILABLE or UNKNOWN.
pub fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

/// A short one-line description; `Status`'s own Display includes metadata
/// and details that only clutter a terminal.
pub fn describe(status: &Status) -> String {
    let message = status.message();
    if message.is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {message}", status.code())
    }
}

pub const DEFAULT_BASE: Duration = Duration::from_millis(100);
pub const DEFAULT_CAP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(DEFAULT_BASE, DEFAULT_CAP)
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: 0,
        }
    }

    /// Upper bound of the next wait.
    pub fn ceiling(&self) -> Duration {
        // Past 2^20 the product overflows long before it matters: the cap
        // has been reached anyway.
        let factor = 1u32 << self.failures.min(20);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before the next attempt; each call counts one more failure.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        ceiling.mul_f64(rng.random_range(0.0..=1.0))
    }

    /// Call after a success, so the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut backoff = Backoff::default();
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..40 {
            ceilings.push(backoff.ceiling());
            backoff.next_delay(&mut rng);
        }
        assert_eq!(ceilings[0], Duration::from_millis(100));
        assert_eq!(ceilings[1], Duration::from_millis(200));
        assert_eq!(ceilings[2], Duration::from_millis(400));
        assert!(ceilings.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*ceilings.last().expect("non-empty"), DEFAULT_CAP);
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        let mut backoff = Backoff::default();
        let mut rng = StdRng::seed_from_u64(2);
        let delays: Vec<_> = (0..1000)
            .map(|_| {
                let ceiling = backoff.ceiling();
                let delay = backoff.next_delay(&mut rng);
                assert!(delay <= ceiling);
                delay
            })
            .collect();
        // Full jitter: capped delays are spread over the whole range.
        let capped = &delays[100..];
        assert!(capped.iter().any(|d| *d < DEFAULT_CAP / 4));
        assert!(capped.iter().any(|d| *d > DEFAULT_CAP * 3 / 4));
    }

    #[test]
    fn only_temporary_codes_are_transient() {
        assert!(is_transient(Code::Unavailable));
        assert!(is_transient(Code::Unknown));
        assert!(!is_transient(Code::Unauthenticated));
        assert!(!is_transient(Code::InvalidArgument));
        assert!(!is_transient(Code::ResourceExhausted));
        assert!(!is_transient(Code::AlreadyExists));
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::default();
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..10 {
            backoff.next_delay(&mut rng);
        }
        backoff.reset();
        assert_eq!(backoff.ceiling(), DEFAULT_BASE);
    }
}
