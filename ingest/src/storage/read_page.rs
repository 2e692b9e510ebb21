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
}
