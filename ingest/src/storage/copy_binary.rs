//! PostgreSQL's binary COPY format, for the readings of a group commit.
//!
//! A header, then per row the field count and each field as a length and
//! its bytes in network order, then a trailer
//! (<https://www.postgresql.org/docs/current/sql-copy.html>, "Binary Format").

use super::ReadingColumns;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Per row: field count, then (length, value) for int8, int8 and float8.
const ROW_BYTES: usize = 2 + 3 * (4 + 8);

/// The COPY data for `(sensor_pk, time_unix_nano, value)` rows.
pub(super) fn readings(rows: &ReadingColumns) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNATURE.len() + 8 + rows.len() * ROW_BYTES + 2);
    out.extend_from_slice(SIGNATURE);
    // Flags (no OIDs), then the length of the header extension: none.
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    for ((&sensor_pk, &time), &value) in rows.sensor_pk.iter().zip(&rows.time).zip(&rows.value) {
        out.extend_from_slice(&3i16.to_be_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&sensor_pk.to_be_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&time.to_be_bytes());
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&value.to_bits().to_be_bytes());
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reads the format back as PostgreSQL would, independently of how it
    /// was written.
    fn parse(data: &[u8]) -> Vec<(i64, i64, f64)> {
        assert_eq!(&data[..11], SIGNATURE);
        assert_eq!(&data[11..19], &[0u8; 8]);
        let mut at = 19;
        let mut rows = Vec::new();
        loop {
            let fields = i16::from_be_bytes(data[at..at + 2].try_into().unwrap());
            at += 2;
            if fields == -1 {
                assert_eq!(at, data.len(), "bytes after the trailer");
                return rows;
            }
            assert_eq!(fields, 3);
            let mut values = [[0u8; 8]; 3];
            for v in &mut values {
                assert_eq!(i32::from_be_bytes(data[at..at + 4].try_into().unwrap()), 8);
                v.copy_from_slice(&data[at + 4..at + 12]);
                at += 12;
            }
            rows.push((
                i64::from_be_bytes(values[0]),
                i64::from_be_bytes(values[1]),
                f64::from_be_bytes(values[2]),
            ));
        }
    }

    proptest! {
        #[test]
        fn rows_read_back_exactly(rows in proptest::collection::vec(
            (any::<i64>(), any::<i64>(), any::<f64>().prop_filter("finite", |v| v.is_finite())),
            0..200,
        )) {
            let columns = ReadingColumns {
                sensor_pk: rows.iter().map(|r| r.0).collect(),
                time: rows.iter().map(|r| r.1).collect(),
                value: rows.iter().map(|r| r.2).collect(),
            };
            let data = readings(&columns);
            prop_assert_eq!(data.len(), 19 + rows.len() * ROW_BYTES + 2);
            let back = parse(&data);
            prop_assert_eq!(back.len(), rows.len());
            for (b, r) in back.iter().zip(&rows) {
                prop_assert_eq!(b.0, r.0);
                prop_assert_eq!(b.1, r.1);
                prop_assert_eq!(b.2.to_bits(), r.2.to_bits());
            }
        }
    }
}
