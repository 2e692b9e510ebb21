//! PostgreSQL's readings table is partitioned by the reading's UTC day, one
//! partition per day named `readings_pYYYYMMDD`. Retention then drops whole
//! days, which costs nothing beside deleting rows one by one and leaves no
//! bloat behind. Partitions are created ahead of time by the retention task
//! and, for readings of a day not seen yet (late or backfilled data), by the
//! writer before the group that needs them.

use chrono::{DateTime, NaiveDate};

pub const DAY_NANOS: i64 = 86_400_000_000_000;

/// The day number (days since 1970-01-01, UTC) holding `time`.
pub fn day_of(time: i64) -> i64 {
    time.div_euclid(DAY_NANOS)
}

/// `readings_p20261124` for that day.
pub fn partition_name(day: i64) -> String {
    let date = DateTime::from_timestamp(day * 86_400, 0)
        .map(|t| t.date_naive())
        .unwrap_or(NaiveDate::MIN);
    format!("readings_p{}", date.format("%Y%m%d"))
}

/// The day a partition name stands for, if it is one of ours.
pub fn parse_partition_name(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("readings_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let date = NaiveDate::parse_from_str(digits, "%Y%m%d").ok()?;
    Some(
        date.and_hms_opt(0, 0, 0)?
            .and_utc()
            .timestamp()
            .div_euclid(86_400),
    )
}

/// The distinct days of `times`, sorted. Readings of a batch mostly share a
/// day, so this stays a tiny vector.
pub fn days_of(times: impl IntoIterator<Item = i64>) -> Vec<i64> {
    let mut days: Vec<i64> = Vec::new();
    let mut last = None;
    for t in times {
        let day = day_of(t);
        if last == Some(day) {
            continue;
        }
        last = Some(day);
        if let Err(at) = days.binary_search(&day) {
            days.insert(at, day);
        }
    }
    days
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_are_utc_dates() {
        // 2026-11-24T00:00:00Z
        let day = day_of(1_763_942_400 * 1_000_000_000 + 365 * DAY_NANOS);
        assert_eq!(partition_name(day), "readings_p20261124");
        assert_eq!(partition_name(0), "readings_p19700101");
        assert_eq!(day_of(-1), -1);
        assert_eq!(parse_partition_name("readings_p1970010"), None);
        assert_eq!(parse_partition_name("readings_hourly"), None);
        assert_eq!(parse_partition_name("readings_p20261301"), None);
    }

    #[test]
    fn distinct_days_sorted() {
        let d = DAY_NANOS;
        assert_eq!(
            days_of([5 * d, 5 * d + 1, 2 * d, 5 * d, 9 * d - 1]),
            vec![2, 5, 8]
        );
        assert!(days_of([]).is_empty());
    }

    proptest! {
        #[test]
        fn name_round_trips(day in 0i64..2_900_000) {
            prop_assert_eq!(parse_partition_name(&partition_name(day)), Some(day));
        }
    }
}
