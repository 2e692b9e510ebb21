//! Per-device rate limits, shared by all of a device's streams: readings per
//! second (a stream over it is held back, not refused) and stream opens per
//! minute (an open over it is refused with a retry delay).
//!
//! Each limit is a generic cell rate algorithm: one "theoretical arrival
//! time" per device, so the state is one instant, whatever the rate, and a
//! burst of one second's (or one minute's) worth passes at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A rate and the burst it allows.
#[derive(Debug, Clone, Copy)]
struct Rate {
    /// Time one unit costs.
    interval: Duration,
    /// How far ahead of now the schedule may run before a caller waits.
    burst: Duration,
}

impl Rate {
    fn new(per_period: u64, period: Duration) -> Option<Self> {
        (per_period > 0).then(|| Self {
            interval: period / u32::try_from(per_period).unwrap_or(u32::MAX),
            burst: period,
        })
    }

    fn cost(&self, units: u64) -> Duration {
        self.interval
            .checked_mul(u32::try_from(units).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX / 4)
    }
}

/// One limit for every device.
#[derive(Debug)]
struct Schedule {
    rate: Rate,
    /// Per device: when its schedule next has room.
    next: Mutex<Bookings>,
}

/// Devices whose schedule runs ahead of now. A device whose time has come
/// (`at <= now`) is the same as one never seen, so it can be dropped at any
/// moment: the map holds only devices active within the last burst, however
/// many devices a server has seen since it started.
#[derive(Debug)]
struct Bookings {
    at: HashMap<i64, Instant>,
    /// Sweep the map of past entries when it grows to this size.
    sweep_at: usize,
}

/// The smallest map worth sweeping.
const MIN_SWEEP: usize = 1024;

impl Bookings {
    fn new() -> Self {
        Self {
            at: HashMap::new(),
            sweep_at: MIN_SWEEP,
        }
    }

    /// The device's next room, created at `now` if it has none.
    fn slot(&mut self, device_pk: i64, now: Instant) -> &mut Instant {
        if self.at.len() >= self.sweep_at {
            self.at.retain(|_, at| *at > now);
            self.at.shrink_to_fit();
            // Twice what survived: sweeps cost O(1) per booking amortised.
            self.sweep_at = (self.at.len() * 2).max(MIN_SWEEP);
        }
        self.at.entry(device_pk).or_insert(now)
    }
}

impl Schedule {
    fn new(rate: Rate) -> Self {
        Self {
            rate,
            next: Mutex::new(Bookings::new()),
        }
    }

    /// Books `units` and says how long the caller must wait before using
    /// them (zero within the burst).
    fn book(&self, device_pk: i64, units: u64, now: Instant) -> Duration {
        let mut next = self.next.lock().expect("lock poisoned");
        let at = next.slot(device_pk, now);
        let start = (*at).max(now);
        *at = start + self.rate.cost(units);
        (*at).saturating_duration_since(now + self.rate.burst)
    }

    /// Books one unit if that needs no wait; otherwise says how long until
    /// it would not, and books nothing.
    fn try_book(&self, device_pk: i64, now: Instant) -> Result<(), Duration> {
        let mut next = self.next.lock().expect("lock poisoned");
        let at = next.slot(device_pk, now);
        let after = (*at).max(now) + self.rate.cost(1);
        let wait = after.saturating_duration_since(now + self.rate.burst);
        if wait.is_zero() {
            *at = after;
            Ok(())
        } else {
            Err(wait)
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.next.lock().expect("lock poisoned").at.len()
    }
}

/// The limits configured for the server; each is off when `None`/0.
#[derive(Debug, Default)]
pub struct DeviceRateLimits {
    readings: Option<Schedule>,
    stream_opens: Option<Schedule>,
}

impl DeviceRateLimits {
    pub fn new(readings_per_second: u64, stream_opens_per_minute: u64) -> Self {
        Self {
            readings: Rate::new(readings_per_second, Duration::from_secs(1)).map(Schedule::new),
            stream_opens: Rate::new(stream_opens_per_minute, Duration::from_secs(60))
                .map(Schedule::new),
        }
    }

    /// How long to stop reading a stream that just received `readings`.
    pub fn readings(&self, device_pk: i64, readings: u64) -> Duration {
        match &self.readings {
            Some(s) => s.book(device_pk, readings, Instant::now()),
            None => Duration::ZERO,
        }
    }

    /// Whether a device may open another stream now; if not, when to retry.
    pub fn open_stream(&self, device_pk: i64) -> Result<(), Duration> {
        match &self.stream_opens {
            Some(s) => s.try_book(device_pk, Instant::now()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_within_the_burst_pass_then_wait_in_proportion() {
        let s = Schedule::new(Rate::new(1000, Duration::from_secs(1)).unwrap());
        let now = Instant::now();
        assert_eq!(s.book(1, 1000, now), Duration::ZERO);
        // The next 500 readings are half a second early.
        assert_eq!(s.book(1, 500, now), Duration::from_millis(500));
        // Another device has its own schedule.
        assert_eq!(s.book(2, 1000, now), Duration::ZERO);
        // Time passing makes room again.
        assert_eq!(s.book(1, 500, now + Duration::from_secs(3)), Duration::ZERO);
    }

    #[test]
    fn sustained_rate_is_the_limit() {
        let s = Schedule::new(Rate::new(100, Duration::from_secs(1)).unwrap());
        let mut now = Instant::now();
        let mut waited = Duration::ZERO;
        for _ in 0..100 {
            let wait = s.book(7, 50, now);
            waited += wait;
            now += wait;
        }
        // 5000 readings at 100/s with a 1 s burst: 49 s of waiting.
        assert_eq!(waited, Duration::from_secs(49));
    }

    #[test]
    fn opens_past_the_rate_are_refused_with_a_delay() {
        let s = Schedule::new(Rate::new(6, Duration::from_secs(60)).unwrap());
        let now = Instant::now();
        for _ in 0..6 {
            assert_eq!(s.try_book(1, now), Ok(()));
        }
        assert_eq!(s.try_book(1, now), Err(Duration::from_secs(10)));
        // A refusal books nothing.
        assert_eq!(s.try_book(1, now), Err(Duration::from_secs(10)));
        assert_eq!(s.try_book(1, now + Duration::from_secs(10)), Ok(()));
    }

    #[test]
    fn devices_whose_time_has_come_are_forgotten() {
        let s = Schedule::new(Rate::new(10, Duration::from_secs(1)).unwrap());
        let now = Instant::now();
        for device in 0..100_000 {
            s.book(device, 1, now);
        }
        // A million devices seen over time, each idle a second later.
        let later = now + Duration::from_secs(2);
        for device in 100_000..1_000_000 {
            s.book(device, 1, later + Duration::from_micros(device as u64));
        }
        // Without forgetting, a million; with it, those of the last 100 ms
        // (100,000) and at most as many again before a sweep.
        assert!(s.tracked() <= 200_000, "{} tracked", s.tracked());
        // Forgetting changes nothing: a device still over its rate waits.
        let busy = later + Duration::from_secs(100);
        assert_eq!(s.book(1, 20, busy), Duration::from_secs(1));
        assert_eq!(s.book(1, 10, busy), Duration::from_secs(2));
    }

    #[test]
    fn off_by_default() {
        let limits = DeviceRateLimits::new(0, 0);
        assert_eq!(limits.readings(1, u64::MAX), Duration::ZERO);
        assert_eq!(limits.open_stream(1), Ok(()));
    }
}
