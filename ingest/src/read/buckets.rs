//! Buckets and their aggregates, computed in Rust from the rows storage
//! streams (raw readings, or hourly rollup rows): the same code for both
//! backends, so their answers are the same by construction rather than by
//! two dialects of date arithmetic agreeing.

use chrono::{DateTime, Datelike, Days, LocalResult, Months, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

use crate::storage::rollup::{HOUR_NANOS, before};

pub const SECOND_NANOS: i64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CalendarUnit {
    Day,
    /// From Monday (ISO 8601).
    Week,
    Month,
}

/// How readings are grouped into buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucketing {
    /// Fixed width in nanoseconds, aligned to the unix epoch.
    Width(i64),
    /// Calendar units in a time zone, following its DST changes.
    Calendar { unit: CalendarUnit, tz: Tz },
}

impl Bucketing {
    /// `[start, end)` of the bucket holding `t`.
    pub fn bucket(&self, t: i64) -> (i64, i64) {
        match *self {
            Self::Width(w) => {
                let start = t - t.rem_euclid(w);
                (start, start.saturating_add(w))
            }
            Self::Calendar { unit, tz } => {
                let date = DateTime::<Utc>::from_timestamp_nanos(t)
                    .with_timezone(&tz)
                    .date_naive();
                let first = match unit {
                    CalendarUnit::Day => date,
                    CalendarUnit::Week => {
                        date - Days::new(u64::from(date.weekday().num_days_from_monday()))
                    }
                    CalendarUnit::Month => date.with_day(1).expect("every month has a day 1"),
                };
                let next = match unit {
                    CalendarUnit::Day => first.checked_add_days(Days::new(1)),
                    CalendarUnit::Week => first.checked_add_days(Days::new(7)),
                    CalendarUnit::Month => first.checked_add_months(Months::new(1)),
                };
                let end = next.map_or(i64::MAX, |d| local_midnight(tz, d));
                (local_midnight(tz, first), end)
            }
        }
    }

    /// Whether every bucket boundary strictly inside `[start, end)` falls
    /// on a whole UTC hour, so that hourly rollup rows each fall in one
    /// bucket. `start` and `end` are whole hours (the caller checks).
    pub fn hour_aligned(&self, start: i64, end: i64) -> bool {
        match *self {
            Self::Width(w) => w % HOUR_NANOS == 0,
            Self::Calendar { .. } => {
                // A zone whose offset is not whole hours shows at the
                // first boundary; checking every one also catches a zone
                // that changed its offset within the range. Bounded: past
                // this many buckets, read raw rather than keep checking.
                const MAX_CHECKED: usize = 100_000;
                let mut boundary = self.bucket(start).1;
                for _ in 0..MAX_CHECKED {
                    if boundary >= end {
                        return true;
                    }
                    if boundary.rem_euclid(HOUR_NANOS) != 0 {
                        return false;
                    }
                    boundary = self.bucket(boundary).1;
                }
                false
            }
        }
    }
}

/// The first instant of `date` in `tz`: its midnight, or, where a DST
/// change skips midnight, the first local time that exists. In unix nanos,
/// saturating past the year 2262.
fn local_midnight(tz: Tz, date: NaiveDate) -> i64 {
    let midnight = date.and_hms_opt(0, 0, 0).expect("midnight is a time");
    // Gaps last at most a few hours; step a quarter hour at a time.
    for quarter in 0..96 {
        let local = midnight + chrono::Duration::minutes(15 * quarter);
        match tz.from_local_datetime(&local) {
            LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => {
                return t.timestamp_nanos_opt().unwrap_or(if date.year() < 1970 {
                    i64::MIN
                } else {
                    i64::MAX
                });
            }
            LocalResult::None => {}
        }
    }
    unreachable!("no time zone skips a whole day")
}

/// The aggregates of one bucket so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// The smallest (time, value) and the largest: ties of times are
    /// decided by value, as everywhere readings are ordered.
    pub first: (i64, f64),
    pub last: (i64, f64),
}

impl Agg {
    pub fn of_reading(t: i64, v: f64) -> Self {
        Self {
            count: 1,
            sum: v,
            min: v,
            max: v,
            first: (t, v),
            last: (t, v),
        }
    }

    /// Adds one reading. Readings arrive in (time, value) order on the raw
    /// path, but nothing here relies on it.
    pub fn add(&mut self, t: i64, v: f64) {
        self.merge(&Self::of_reading(t, v));
    }

    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if before(other.first.0, other.first.1, self.first.0, self.first.1) {
            self.first = other.first;
        }
        if before(self.last.0, self.last.1, other.last.0, other.last.1) {
            self.last = other.last;
        }
    }

    pub fn avg(&self) -> f64 {
        self.sum / self.count as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Aggregate {
    Count,
    Min,
    Max,
    Sum,
    Avg,
    First,
    Last,
}

impl Aggregate {
    pub const ALL: [Self; 7] = [
        Self::Count,
        Self::Min,
        Self::Max,
        Self::Sum,
        Self::Avg,
        Self::First,
        Self::Last,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Min => "min",
            Self::Max => "max",
            Self::Sum => "sum",
            Self::Avg => "avg",
            Self::First => "first",
            Self::Last => "last",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// Finished buckets of one series in columns; only the asked aggregates'
/// columns are filled.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BucketColumns {
    pub start: Vec<i64>,
    pub count: Vec<u64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
    pub sum: Vec<f64>,
    pub avg: Vec<f64>,
    pub first: Vec<f64>,
    pub last: Vec<f64>,
}

impl BucketColumns {
    pub fn len(&self) -> usize {
        self.start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.start.is_empty()
    }

    pub fn push(&mut self, start: i64, agg: &Agg, asked: &[Aggregate]) {
        self.start.push(start);
        for a in asked {
            match a {
                Aggregate::Count => self.count.push(agg.count),
                Aggregate::Min => self.min.push(agg.min),
                Aggregate::Max => self.max.push(agg.max),
                Aggregate::Sum => self.sum.push(agg.sum),
                Aggregate::Avg => self.avg.push(agg.avg()),
                Aggregate::First => self.first.push(agg.first.1),
                Aggregate::Last => self.last.push(agg.last.1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H: i64 = HOUR_NANOS;

    fn calendar(unit: CalendarUnit, tz: chrono_tz::Tz) -> Bucketing {
        Bucketing::Calendar { unit, tz }
    }

    fn utc(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_nanos_opt()
            .unwrap()
    }

    #[test]
    fn widths_align_to_the_epoch_also_before_it() {
        let b = Bucketing::Width(10 * SECOND_NANOS);
        assert_eq!(b.bucket(0), (0, 10 * SECOND_NANOS));
        assert_eq!(b.bucket(-1), (-10 * SECOND_NANOS, 0));
        assert_eq!(
            b.bucket(25 * SECOND_NANOS),
            (20 * SECOND_NANOS, 30 * SECOND_NANOS)
        );
    }

    #[test]
    fn berlin_days_follow_dst() {
        let b = calendar(CalendarUnit::Day, chrono_tz::Europe::Berlin);
        // 2026-03-29: clocks go from 02:00 to 03:00, a 23 h day.
        let (s, e) = b.bucket(utc("2026-03-29T12:00:00Z"));
        assert_eq!(s, utc("2026-03-28T23:00:00Z"));
        assert_eq!(e, utc("2026-03-29T22:00:00Z"));
        assert_eq!(e - s, 23 * H);
        // 2026-10-25: back from 03:00 to 02:00, a 25 h day.
        let (s, e) = b.bucket(utc("2026-10-25T12:00:00Z"));
        assert_eq!(e - s, 25 * H);
        assert!(b.hour_aligned(utc("2026-03-01T00:00:00Z"), utc("2026-11-01T00:00:00Z")));
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        let week = calendar(CalendarUnit::Week, chrono_tz::UTC);
        // 2026-12-03 is a Thursday.
        assert_eq!(
            week.bucket(utc("2026-12-03T10:00:00Z")),
            (utc("2026-11-30T00:00:00Z"), utc("2026-12-07T00:00:00Z"))
        );
        let month = calendar(CalendarUnit::Month, chrono_tz::America::New_York);
        assert_eq!(
            month.bucket(utc("2026-03-15T00:00:00Z")),
            (utc("2026-03-01T05:00:00Z"), utc("2026-04-01T04:00:00Z"))
        );
    }

    #[test]
    fn a_skipped_midnight_starts_the_day_at_the_first_existing_time() {
        // Santiago moved its clocks at midnight on 2026-09-06 (00:00 -> 01:00).
        let b = calendar(CalendarUnit::Day, chrono_tz::America::Santiago);
        let (s, _) = b.bucket(utc("2026-09-06T12:00:00Z"));
        assert_eq!(s, utc("2026-09-06T04:00:00Z"));
    }

    #[test]
    fn half_hour_zones_are_not_hour_aligned() {
        let b = calendar(CalendarUnit::Day, chrono_tz::Asia::Kolkata);
        assert!(!b.hour_aligned(utc("2026-01-01T00:00:00Z"), utc("2026-01-10T00:00:00Z")));
    }

    proptest! {
        /// Every time lies in its bucket, and the next bucket starts where
        /// it ends.
        #[test]
        fn buckets_hold_their_times(t in -10_000_000_000_000_000i64..10_000_000_000_000_000, w in 1i64..100_000, unit in 0..4usize) {
            let b = match unit {
                0 => Bucketing::Width(w * SECOND_NANOS),
                1 => calendar(CalendarUnit::Day, chrono_tz::Europe::Berlin),
                2 => calendar(CalendarUnit::Week, chrono_tz::Australia::Lord_Howe),
                _ => calendar(CalendarUnit::Month, chrono_tz::America::Santiago),
            };
            let (s, e) = b.bucket(t);
            prop_assert!(s <= t && t < e, "{s} <= {t} < {e}");
            prop_assert_eq!(b.bucket(e).0, e);
        }
    }
}
