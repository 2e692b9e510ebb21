//! The hourly rollup of a group's readings, computed in memory before the
//! group commits and added to `readings_hourly_rollup` in the same
//! transaction. Reports then read one row per sensor and hour instead of
//! every raw reading, and the rollup can never disagree with what is stored.

use std::collections::HashMap;

use super::ReadingColumns;

pub const HOUR_NANOS: i64 = 3_600_000_000_000;

/// The start of the UTC hour holding `time` (floor, also before 1970).
pub fn hour_of(time: i64) -> i64 {
    time - time.rem_euclid(HOUR_NANOS)
}

/// One rollup row per (sensor, hour) in columns, sorted by key so that
/// concurrent writers lock rows in the same order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RollupRows {
    pub sensor_pk: Vec<i64>,
    pub hour: Vec<i64>,
    pub count: Vec<i64>,
    pub sum: Vec<f64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
    /// The oldest reading of the bucket: the smallest (time, value), so
    /// that ties of times are decided by what is stored, not by the order
    /// it arrived in, and the read path's raw scan agrees.
    pub first_time: Vec<i64>,
    pub first_value: Vec<f64>,
    /// The newest reading of the bucket: the largest (time, value).
    pub last_time: Vec<i64>,
    pub last_value: Vec<f64>,
}

/// Whether reading `(t, v)` comes before `(t0, v0)`: by time, then value.
pub fn before(t: i64, v: f64, t0: i64, v0: f64) -> bool {
    t < t0 || (t == t0 && v < v0)
}

impl RollupRows {
    pub fn len(&self) -> usize {
        self.sensor_pk.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sensor_pk.is_empty()
    }

    /// Sums `rows` by sensor and hour.
    pub fn from_readings(rows: &ReadingColumns) -> Self {
        #[derive(Clone, Copy)]
        struct Acc {
            count: i64,
            sum: f64,
            min: f64,
            max: f64,
            first_time: i64,
            first_value: f64,
            last_time: i64,
            last_value: f64,
        }
        // A batch's series is one sensor in time order, so consecutive rows
        // usually hit the same bucket: remember it instead of hashing each.
        let mut buckets: HashMap<(i64, i64), Acc> = HashMap::new();
        let mut current: Option<((i64, i64), Acc)> = None;
        for i in 0..rows.len() {
            let key = (rows.sensor_pk[i], hour_of(rows.time[i]));
            let (t, v) = (rows.time[i], rows.value[i]);
            match &mut current {
                Some((k, acc)) if *k == key => {
                    acc.count += 1;
                    acc.sum += v;
                    acc.min = acc.min.min(v);
                    acc.max = acc.max.max(v);
                    if before(t, v, acc.first_time, acc.first_value) {
                        acc.first_time = t;
                        acc.first_value = v;
                    }
                    if before(acc.last_time, acc.last_value, t, v) {
                        acc.last_time = t;
                        acc.last_value = v;
                    }
                }
                _ => {
                    if let Some((k, acc)) = current.take() {
                        merge(&mut buckets, k, acc);
                    }
                    let acc = Acc {
                        count: 1,
                        sum: v,
                        min: v,
                        max: v,
                        first_time: t,
                        first_value: v,
                        last_time: t,
                        last_value: v,
                    };
                    current = Some((key, acc));
                }
            }
        }
        if let Some((k, acc)) = current {
            merge(&mut buckets, k, acc);
        }

        fn merge(buckets: &mut HashMap<(i64, i64), Acc>, key: (i64, i64), new: Acc) {
            buckets
                .entry(key)
                .and_modify(|acc| {
                    acc.count += new.count;
                    acc.sum += new.sum;
                    acc.min = acc.min.min(new.min);
                    acc.max = acc.max.max(new.max);
                    if before(
                        new.first_time,
                        new.first_value,
                        acc.first_time,
                        acc.first_value,
                    ) {
                        acc.first_time = new.first_time;
                        acc.first_value = new.first_value;
                    }
                    if before(acc.last_time, acc.last_value, new.last_time, new.last_value) {
                        acc.last_time = new.last_time;
                        acc.last_value = new.last_value;
                    }
                })
                .or_insert(new);
        }

        let mut keys: Vec<_> = buckets.keys().copied().collect();
        keys.sort_unstable();
        let mut out = Self::default();
        for key in keys {
            let acc = buckets[&key];
            out.sensor_pk.push(key.0);
            out.hour.push(key.1);
            out.count.push(acc.count);
            out.sum.push(acc.sum);
            out.min.push(acc.min);
            out.max.push(acc.max);
            out.first_time.push(acc.first_time);
            out.first_value.push(acc.first_value);
            out.last_time.push(acc.last_time);
            out.last_value.push(acc.last_value);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hours_floor_also_before_the_epoch() {
        assert_eq!(hour_of(0), 0);
        assert_eq!(hour_of(HOUR_NANOS - 1), 0);
        assert_eq!(hour_of(HOUR_NANOS), HOUR_NANOS);
        assert_eq!(hour_of(-1), -HOUR_NANOS);
    }

    proptest! {
        /// The rollup equals the aggregates of a naive pass over the rows,
        /// whatever their order (late readings, interleaved sensors).
        #[test]
        fn rollup_matches_naive_aggregates(
            rows in proptest::collection::vec((1i64..4, 0i64..(5 * HOUR_NANOS), -100i32..100), 0..300)
        ) {
            let mut columns = ReadingColumns::default();
            for &(pk, t, v) in &rows {
                columns.sensor_pk.push(pk);
                columns.time.push(t);
                columns.value.push(f64::from(v));
            }
            let rollup = RollupRows::from_readings(&columns);
            // (count, sum, min, max, last time, last value) by (sensor, hour)
            type Aggregates = (i64, f64, f64, f64, i64, f64);
            let mut firsts: std::collections::BTreeMap<(i64, i64), (i64, f64)> = Default::default();
            let mut expected: std::collections::BTreeMap<(i64, i64), Aggregates> = Default::default();
            for &(pk, t, v) in &rows {
                let v = f64::from(v);
                let e = expected.entry((pk, hour_of(t))).or_insert((0, 0.0, v, v, t, v));
                e.0 += 1;
                e.1 += v;
                e.2 = e.2.min(v);
                e.3 = e.3.max(v);
                if (t, v) > (e.4, e.5) {
                    e.4 = t;
                    e.5 = v;
                }
                let f = firsts.entry((pk, hour_of(t))).or_insert((t, v));
                if (t, v) < *f {
                    *f = (t, v);
                }
            }
            prop_assert_eq!(rollup.len(), expected.len());
            for (i, (&(pk, hour), &(count, sum, min, max, lt, lv))) in expected.iter().enumerate() {
                prop_assert_eq!((rollup.sensor_pk[i], rollup.hour[i]), (pk, hour));
                prop_assert_eq!(rollup.count[i], count);
                // Integer values: the sums are exact in any order.
                prop_assert_eq!(rollup.sum[i], sum);
                prop_assert_eq!((rollup.min[i], rollup.max[i]), (min, max));
                prop_assert_eq!((rollup.last_time[i], rollup.last_value[i]), (lt, lv));
                prop_assert_eq!((rollup.first_time[i], rollup.first_value[i]), firsts[&(pk, hour)]);
            }
        }
    }
}
