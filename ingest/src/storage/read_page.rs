//! A page of raw readings as the read path asks for it and gets it back:
//! what both backends' readers ([`super::ReadPool::raw_rows`] and SQLite's
//! C API reader) share.

/// Where a page over several series starts: in series `sensor_pk`,
/// readings at or after `(time, value)` in (time, value) order; in the
/// later series, every reading of the range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowsFrom {
    pub sensor_pk: i64,
    pub time: i64,
    pub value: f64,
}

/// A page of raw readings to read: at most `limit` readings of the series
/// `sensor_pks` (sorted, each at most once) with times in `[start, end)`,
/// from `from` on.
#[derive(Debug, Clone, Copy)]
pub struct RowsPage<'a> {
    pub sensor_pks: &'a [i64],
    pub from: RowsFrom,
    pub start: i64,
    pub end: i64,
    pub limit: usize,
}

/// Raw readings of several series, by (series, time, value).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RawRows {
    pub sensor_pk: Vec<i64>,
    pub time: Vec<i64>,
    pub value: Vec<f64>,
}

impl RawRows {
    /// Room for `rows` exactly: a page is held while it is sent, so it
    /// should not hold twice its size.
    pub fn with_capacity(rows: usize) -> Self {
        Self {
            sensor_pk: Vec::with_capacity(rows),
            time: Vec::with_capacity(rows),
            value: Vec::with_capacity(rows),
        }
    }

    pub fn len(&self) -> usize {
        self.time.len()
    }

    pub fn is_empty(&self) -> bool {
        self.time.is_empty()
    }

    pub(super) fn push(&mut self, sensor_pk: i64, time: i64, value: f64) {
        self.sensor_pk.push(sensor_pk);
        self.time.push(time);
        self.value.push(value);
    }

    /// Readings of one series, `time` and `value` of equal length, put in
    /// (time, value) order if they are not.
    pub(super) fn extend_series(
        &mut self,
        sensor_pk: i64,
        mut time: Vec<i64>,
        mut value: Vec<f64>,
    ) {
        debug_assert_eq!(time.len(), value.len());
        let key = |i: usize| (time[i], value[i]);
        if !(1..time.len()).all(|i| key(i - 1) <= key(i)) {
            let mut pairs: Vec<(i64, f64)> = time.into_iter().zip(value).collect();
            pairs.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
            (time, value) = pairs.into_iter().unzip();
        }
        self.sensor_pk
            .extend(std::iter::repeat_n(sensor_pk, time.len()));
        self.time.extend_from_slice(&time);
        self.value.extend_from_slice(&value);
    }
}

#[cfg(test)]
mod tests {
    use super::RawRows;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_series_comes_out_in_time_then_value_order(
            readings in prop::collection::vec((-5i64..5, -3i8..3), 0..40),
        ) {
            let time: Vec<i64> = readings.iter().map(|r| r.0).collect();
            let value: Vec<f64> = readings.iter().map(|r| f64::from(r.1)).collect();
            let mut rows = RawRows::default();
            rows.extend_series(7, time, value);
            let mut expected: Vec<(i64, f64)> =
                readings.iter().map(|r| (r.0, f64::from(r.1))).collect();
            expected.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let got: Vec<(i64, f64)> =
                rows.time.iter().copied().zip(rows.value.iter().copied()).collect();
            prop_assert_eq!(got, expected);
            prop_assert!(rows.sensor_pk.iter().all(|&pk| pk == 7));
        }
    }
}
