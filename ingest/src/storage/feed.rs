//! The readings feed's storage: a log of committed batches at gap-free
//! positions (`readings_feed`), its counter, and named consumers' cursors.
//!
//! Each group commit appends its batches last, after taking their
//! positions from the counter row (see migration 0013): the row's lock is
//! held until commit, so positions become visible in the order they were
//! handed out, on both backends and across server processes. A batch's
//! readings are stored again here, packed, so that a reader of the feed
//! pages through one table in position order.

use super::sql::{Conn, Row, bigint};
use super::{Expired, StorageError, Store};
use crate::domain::time::UnixNanos;

/// Version of the packed payload below.
const PAYLOAD_VERSION: u8 = 1;

/// One series of a batch, as the group commit hands it over.
#[derive(Debug, Clone, Copy)]
pub struct SeriesRef<'a> {
    pub sensor: &'a str,
    pub unit: &'a str,
    /// The index in its batch of the series' first reading; the others
    /// follow one by one.
    pub first_index: u32,
    pub times: &'a [i64],
    pub values: &'a [f64],
}

/// One series of a batch read back from the feed.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedSeries {
    pub sensor: String,
    pub unit: String,
    pub first_index: u32,
    pub times: Vec<i64>,
    pub values: Vec<f64>,
}

/// A committed batch at its feed position.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedBatch {
    pub position: u64,
    pub device_pk: i64,
    pub device_id: String,
    pub batch_sequence: u64,
    pub committed_unix_nano: UnixNanos,
    pub series: Vec<FeedSeries>,
}

impl FeedBatch {
    pub fn readings(&self) -> usize {
        self.series.iter().map(|s| s.times.len()).sum()
    }
}

/// A batch for [`append`]: its device, sequence and packed series.
#[derive(Debug, Clone)]
pub struct FeedAppend {
    pub device_pk: i64,
    pub batch_sequence: u64,
    pub readings: u32,
    pub payload: Vec<u8>,
}

impl FeedAppend {
    /// Packs a batch's stored series: per series the sensor, unit, first
    /// index and count, then the times and values as little-endian words.
    pub fn new<'a>(
        device_pk: i64,
        batch_sequence: u64,
        series: impl IntoIterator<Item = SeriesRef<'a>>,
    ) -> Self {
        let series: Vec<SeriesRef<'a>> = series.into_iter().collect();
        let readings: usize = series.iter().map(|s| s.times.len()).sum();
        let names: usize = series.iter().map(|s| s.sensor.len() + s.unit.len()).sum();
        let mut payload = Vec::with_capacity(5 + series.len() * 12 + names + readings * 16);
        payload.push(PAYLOAD_VERSION);
        payload.extend_from_slice(&(series.len() as u32).to_le_bytes());
        for s in &series {
            debug_assert_eq!(s.times.len(), s.values.len());
            for text in [s.sensor, s.unit] {
                payload.extend_from_slice(&(text.len() as u16).to_le_bytes());
                payload.extend_from_slice(text.as_bytes());
            }
            payload.extend_from_slice(&s.first_index.to_le_bytes());
            payload.extend_from_slice(&(s.times.len() as u32).to_le_bytes());
            for t in s.times {
                payload.extend_from_slice(&t.to_le_bytes());
            }
            for v in s.values {
                payload.extend_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        Self {
            device_pk,
            batch_sequence,
            readings: readings as u32,
            payload,
        }
    }
}

/// The series packed by [`FeedAppend::new`].
pub fn unpack(payload: &[u8]) -> Result<Vec<FeedSeries>, StorageError> {
    let corrupt = |what: &str| StorageError::Corrupt(format!("readings feed payload: {what}"));
    let mut rest = payload;
    let mut take = |n: usize| -> Result<&[u8], StorageError> {
        if rest.len() < n {
            return Err(corrupt("cut short"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let version = take(1)?[0];
    if version != PAYLOAD_VERSION {
        return Err(corrupt(&format!("unknown version {version}")));
    }
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let count = u32_at(take(4)?) as usize;
    let mut series = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let mut text = || -> Result<String, StorageError> {
            let len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
            String::from_utf8(take(len)?.to_vec()).map_err(|_| corrupt("a name is not UTF-8"))
        };
        let sensor = text()?;
        let unit = text()?;
        let first_index = u32_at(take(4)?);
        let n = u32_at(take(4)?) as usize;
        let times = take(n * 8)?
            .chunks_exact(8)
            .map(|w| i64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect();
        let values = take(n * 8)?
            .chunks_exact(8)
            .map(|w| f64::from_bits(u64::from_le_bytes(w.try_into().expect("8 bytes"))))
            .collect();
        series.push(FeedSeries {
            sensor,
            unit,
            first_index,
            times,
            values,
        });
    }
    if !rest.is_empty() {
        return Err(corrupt("bytes after the last series"));
    }
    Ok(series)
}

/// Takes `n` positions, in a group commit's transaction, as the start of
/// its last statements: the counter row stays locked until the
/// transaction ends. Returns the first (the others follow). The backend
/// then inserts the batches: PostgreSQL by [`insert_pg`], SQLite through
/// the C API (`sqlite_bulk`).
pub(super) async fn take_positions(mut conn: Conn<'_>, n: usize) -> Result<i64, sqlx::Error> {
    let last: i64 = conn
        .query(
            "UPDATE readings_feed_counter SET last_position = last_position + $1 \
             RETURNING last_position",
        )
        .bind(n as i64)
        .fetch_scalar()
        .await?;
    Ok(last - n as i64 + 1)
}

/// The batches at positions `first..`, in one statement for the group,
/// whatever its batches.
pub(super) async fn insert_pg(
    pg: &mut sqlx::PgConnection,
    first: i64,
    batches: &[FeedAppend],
    now: UnixNanos,
) -> Result<(), sqlx::Error> {
    let positions: Vec<i64> = (first..first + batches.len() as i64).collect();
    let devices: Vec<i64> = batches.iter().map(|b| b.device_pk).collect();
    let sequences: Vec<i64> = batches.iter().map(|b| bigint(b.batch_sequence)).collect();
    let readings: Vec<i32> = batches.iter().map(|b| b.readings as i32).collect();
    let payloads: Vec<&[u8]> = batches.iter().map(|b| b.payload.as_slice()).collect();
    sqlx::query(
        "INSERT INTO readings_feed (position, device_pk, batch_sequence, readings, committed_unix_nano, payload) \
         SELECT p, d, s, r, $5, b FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::int[], $6::bytea[]) AS t(p, d, s, r, b)",
    )
    .bind(positions)
    .bind(devices)
    .bind(sequences)
    .bind(readings)
    .bind(now)
    .bind(payloads)
    .execute(pg)
    .await?;
    Ok(())
}

/// The positions the feed holds: `earliest ..= last` (empty when
/// `earliest > last`), and when the newest committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedBounds {
    pub earliest: u64,
    pub last: u64,
}

/// A named consumer's committed cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub name: String,
    pub position: u64,
    pub next_index: u32,
    pub updated_unix_nano: UnixNanos,
    /// When the batch at `position` committed; `None` once retention
    /// removed it (or for position 0).
    pub position_committed_unix_nano: Option<UnixNanos>,
}

fn position(v: i64) -> u64 {
    v.max(0) as u64
}

fn batch_from_row(row: &Row) -> Result<FeedBatch, StorageError> {
    let payload: Vec<u8> = row.get(5)?;
    Ok(FeedBatch {
        position: position(row.get(0)?),
        device_pk: row.get(1)?,
        device_id: row.get(2)?,
        batch_sequence: position(row.get(3)?),
        committed_unix_nano: row.get(4)?,
        series: unpack(&payload)?,
    })
}

fn consumer_from_row(row: &Row) -> Result<ConsumerRecord, StorageError> {
    Ok(ConsumerRecord {
        name: row.get(0)?,
        position: position(row.get(1)?),
        next_index: u32::try_from(row.get::<i64>(2)?).unwrap_or(u32::MAX),
        updated_unix_nano: row.get(3)?,
        position_committed_unix_nano: row.get(4)?,
    })
}

const CONSUMER_COLUMNS: &str = "SELECT c.name, c.position, c.next_index, c.updated_unix_nano, f.committed_unix_nano \
     FROM readings_feed_consumers c LEFT JOIN readings_feed f ON f.position = c.position";

impl Store {
    /// Batches after `after`, in position order: at most `batches`, and
    /// no more once they hold `readings` (the first always comes), so a
    /// page stays small whatever the batches' sizes.
    pub async fn feed_after(
        &self,
        after: u64,
        batches: u32,
        readings: u32,
    ) -> Result<Vec<FeedBatch>, StorageError> {
        let rows = self
            .query(
                "SELECT f.position, f.device_pk, d.device_id, f.batch_sequence, f.committed_unix_nano, f.payload \
                 FROM (SELECT position, readings, SUM(readings) OVER (ORDER BY position) AS upto \
                       FROM readings_feed WHERE position > $1 ORDER BY position LIMIT $2) p \
                 JOIN readings_feed f ON f.position = p.position \
                 JOIN devices d ON d.pk = f.device_pk \
                 WHERE p.upto - p.readings < $3 ORDER BY f.position",
            )
            .bind(bigint(after))
            .bind(i64::from(batches))
            .bind(i64::from(readings.max(1)))
            .fetch_all()
            .await?;
        rows.iter().map(batch_from_row).collect()
    }

    pub async fn feed_bounds(&self) -> Result<FeedBounds, StorageError> {
        let row = self
            .query("SELECT earliest_position, last_position FROM readings_feed_counter")
            .fetch_one()
            .await?;
        Ok(FeedBounds {
            earliest: position(row.get(0)?),
            last: position(row.get(1)?),
        })
    }

    /// When the batch at `position` committed, if the feed still holds it.
    pub async fn feed_committed_at(&self, at: u64) -> Result<Option<UnixNanos>, StorageError> {
        Ok(self
            .query("SELECT committed_unix_nano FROM readings_feed WHERE position = $1")
            .bind(bigint(at))
            .fetch_optional_scalar()
            .await?)
    }

    /// Removes the oldest batches committed before `cutoff`, `step_rows` at
    /// a time, each step a transaction of its own. Only a prefix goes: the
    /// feed stays `earliest ..= last` with no hole, and `earliest` moves
    /// with it, so a cursor before it is refused rather than skipping.
    pub async fn expire_feed(
        &self,
        cutoff: UnixNanos,
        step_rows: usize,
    ) -> Result<Expired, StorageError> {
        let step_rows = step_rows.max(1);
        let mut expired = Expired::default();
        loop {
            let mut tx = self.begin_write().await?;
            let oldest = tx
                .query(
                    "SELECT position, committed_unix_nano FROM readings_feed \
                     ORDER BY position LIMIT $1",
                )
                .bind(step_rows as i64)
                .fetch_all()
                .await?;
            let mut through = None;
            for row in &oldest {
                let committed: i64 = row.get(1)?;
                if committed >= cutoff {
                    break;
                }
                through = Some(row.get::<i64>(0)?);
            }
            let Some(through) = through else {
                return Ok(expired);
            };
            let deleted = tx
                .query("DELETE FROM readings_feed WHERE position <= $1")
                .bind(through)
                .execute()
                .await?;
            tx.query("UPDATE readings_feed_counter SET earliest_position = $1")
                .bind(through + 1)
                .execute()
                .await?;
            tx.commit().await?;
            expired.rows += deleted;
            expired.steps += 1;
            if (deleted as usize) < step_rows {
                return Ok(expired);
            }
        }
    }

    /// Sets a named consumer's cursor, creating the consumer.
    pub async fn commit_consumer(
        &self,
        name: &str,
        position: u64,
        next_index: u32,
        now: UnixNanos,
    ) -> Result<(), StorageError> {
        self.write_conn()
            .await?
            .query(
                "INSERT INTO readings_feed_consumers (name, position, next_index, updated_unix_nano) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO UPDATE SET position = excluded.position, \
                 next_index = excluded.next_index, updated_unix_nano = excluded.updated_unix_nano",
            )
            .bind(name)
            .bind(bigint(position))
            .bind(i64::from(next_index))
            .bind(now)
            .execute()
            .await?;
        Ok(())
    }

    pub async fn consumer(&self, name: &str) -> Result<Option<ConsumerRecord>, StorageError> {
        let sql = format!("{CONSUMER_COLUMNS} WHERE c.name = $1");
        let row = self.query(&sql).bind(name).fetch_optional().await?;
        row.as_ref().map(consumer_from_row).transpose()
    }

    /// Every named consumer, by name.
    pub async fn consumers(&self) -> Result<Vec<ConsumerRecord>, StorageError> {
        let sql = format!("{CONSUMER_COLUMNS} ORDER BY c.name{}", self.bytewise());
        self.query(&sql).fetch_all_as(consumer_from_row).await
    }

    /// Whether there was such a consumer.
    pub async fn delete_consumer(&self, name: &str) -> Result<bool, StorageError> {
        let deleted = self
            .write_conn()
            .await?
            .query("DELETE FROM readings_feed_consumers WHERE name = $1")
            .bind(name)
            .execute()
            .await?;
        Ok(deleted > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A drawn series: sensor, unit, first index, readings.
    type Drawn = (String, String, u32, Vec<(i64, f64)>);

    fn series_strategy() -> impl Strategy<Value = Vec<Drawn>> {
        prop::collection::vec(
            (
                "[a-z_]{1,12}",
                "[A-Za-z%]{0,4}",
                any::<u32>(),
                prop::collection::vec((any::<i64>(), any::<f64>()), 0..40),
            ),
            0..6,
        )
    }

    proptest! {
        #[test]
        fn a_payload_unpacks_to_what_was_packed(series in series_strategy()) {
            let columns: Vec<(Vec<i64>, Vec<f64>)> = series
                .iter()
                .map(|(_, _, _, rows)| rows.iter().copied().unzip())
                .collect();
            let packed = FeedAppend::new(
                1,
                2,
                series.iter().zip(&columns).map(|((sensor, unit, first, _), (t, v))| SeriesRef {
                    sensor,
                    unit,
                    first_index: *first,
                    times: t,
                    values: v,
                }),
            );
            let back = unpack(&packed.payload).unwrap();
            prop_assert_eq!(back.len(), series.len());
            prop_assert_eq!(packed.readings as usize, columns.iter().map(|(t, _)| t.len()).sum::<usize>());
            for (b, ((sensor, unit, first, _), (t, v))) in back.iter().zip(series.iter().zip(&columns)) {
                prop_assert_eq!(&b.sensor, sensor);
                prop_assert_eq!(&b.unit, unit);
                prop_assert_eq!(b.first_index, *first);
                prop_assert_eq!(&b.times, t);
                // Bit for bit, NaNs included.
                let bits = |x: &[f64]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&b.values), bits(v));
            }
        }

        #[test]
        fn a_cut_payload_is_refused_not_misread(series in series_strategy(), cut in any::<prop::sample::Index>()) {
            let columns: Vec<(Vec<i64>, Vec<f64>)> = series
                .iter()
                .map(|(_, _, _, rows)| rows.iter().copied().unzip())
                .collect();
            let packed = FeedAppend::new(1, 2, series.iter().zip(&columns).map(|((sensor, unit, first, _), (t, v))| SeriesRef {
                sensor, unit, first_index: *first, times: t, values: v,
            }));
            let at = cut.index(packed.payload.len());
            prop_assert!(unpack(&packed.payload[..at]).is_err());
        }
    }
}
