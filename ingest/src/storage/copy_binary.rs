//! PostgreSQL's binary COPY format, for the readings of a group commit.
//!
//! A header, then per row the field count and each field as a length and
//! its bytes in network order, then a trailer
//! (<https://www.postgresql.org/docs/current/sql-copy.html>, "Binary Format").

use super::ReadingColumns;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Per row: field count, then (length, value) for int8, int8, float8, int8
/// and int4.
const ROW_BYTES: usize = 2 + 4 * (4 + 8) + (4 + 4);

/// The COPY data for `(sensor_pk, time_unix_nano, value, batch_sequence,
/// batch_index)` rows.
pub(super) fn readings(rows: &ReadingColumns) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNATURE.len() + 8 + rows.len() * ROW_BYTES + 2);
    out.extend_from_slice(SIGNATURE);
    // Flags (no OIDs), then the length of the header extension: none.
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    for i in 0..rows.len() {
        out.extend_from_slice(&5i16.to_be_bytes());
        for eight in [
            rows.sensor_pk[i].to_be_bytes(),
            rows.time[i].to_be_bytes(),
            rows.value[i].to_bits().to_be_bytes(),
            rows.batch_sequence[i].to_be_bytes(),
        ] {
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&eight);
        }
        out.extend_from_slice(&4i32.to_be_bytes());
        out.extend_from_slice(&rows.batch_index[i].to_be_bytes());
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Row = (i64, i64, f64, i64, i32);

    /// Reads the format back as PostgreSQL would, independently of how it
    /// was written.
    fn parse(data: &[u8]) -> Vec<Row> {
        assert_eq!(&data[..11], SIGNATURE);
        assert_eq!(&data[11..19], &[0u8; 8]);
        let mut at = 19;
        let mut rows = Vec::new();
        let field = |at: &mut usize, len: usize| {
            assert_eq!(
                i32::from_be_bytes(data[*at..*at + 4].try_into().unwrap()),
                len as i32
            );
            let bytes = &data[*at + 4..*at + 4 + len];
            *at += 4 + len;
            bytes
        };
        loop {
            let fields = i16::from_be_bytes(data[at..at + 2].try_into().unwrap());
            at += 2;
            if fields == -1 {
                assert_eq!(at, data.len(), "bytes after the trailer");
                return rows;
            }
            assert_eq!(fields, 5);
            let sensor_pk = i64::from_be_bytes(field(&mut at, 8).try_into().unwrap());
            let time = i64::from_be_bytes(field(&mut at, 8).try_into().unwrap());
            let value = f64::from_be_bytes(field(&mut at, 8).try_into().unwrap());
            let sequence = i64::from_be_bytes(field(&mut at, 8).try_into().unwrap());
            let index = i32::from_be_bytes(field(&mut at, 4).try_into().unwrap());
            rows.push((sensor_pk, time, value, sequence, index));
        }
    }

    proptest! {
        #[test]
        fn rows_read_back_exactly(rows in proptest::collection::vec(
            (
                any::<i64>(),
                any::<i64>(),
                any::<f64>().prop_filter("finite", |v| v.is_finite()),
                any::<i64>(),
                any::<i32>(),
            ),
            0..200,
        )) {
            let columns = ReadingColumns {
                sensor_pk: rows.iter().map(|r| r.0).collect(),
                time: rows.iter().map(|r| r.1).collect(),
                value: rows.iter().map(|r| r.2).collect(),
                batch_sequence: rows.iter().map(|r| r.3).collect(),
                batch_index: rows.iter().map(|r| r.4).collect(),
            };
            let data = readings(&columns);
            prop_assert_eq!(data.len(), 19 + rows.len() * ROW_BYTES + 2);
            let back = parse(&data);
            prop_assert_eq!(back.len(), rows.len());
            for (b, r) in back.iter().zip(&rows) {
                prop_assert_eq!((b.0, b.1, b.3, b.4), (r.0, r.1, r.3, r.4));
                prop_assert_eq!(b.2.to_bits(), r.2.to_bits());
            }
        }
    }
}
