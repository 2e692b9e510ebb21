//! The task behind one QueryReadings stream: series by series, pages of
//! rows from storage into chunks, each chunk into the bounded channel.
//!
//! It holds at most one page and one chunk being filled, whatever the
//! range. Every wait (a page from the database, room in the channel) also
//! watches the channel: when the client cancels or its deadline passes,
//! tonic drops the receiver and the task stops at once, also in the middle
//! of a database statement.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::buckets::{Agg, Aggregate, BucketColumns};
use super::query::{Downsample, ReadQuery};
use super::token::{Position, TokenKey};
use super::{Chunk, ChunkData, ChunkResult, ReadError, StreamPermit};
use crate::metrics::Metrics;
use crate::storage::rollup::HOUR_NANOS;
use crate::storage::{PageFrom, ReadPool, SeriesInfo};

/// Series (sensors) looked up at a time.
const SERIES_PAGE: usize = 256;
/// Rows of one page when computing buckets from raw readings.
const BUCKET_PAGE_ROWS: usize = 4096;
/// Rollup rows (hours) of one page.
const ROLLUP_PAGE_ROWS: usize = 2048;
/// Bytes of a chunk besides its columns: field tags, lengths and the
/// resume token (about 180 bytes of hex); the names come on top.
const CHUNK_OVERHEAD: usize = 256;

pub(super) struct QueryTask {
    pub pool: ReadPool,
    pub key: TokenKey,
    pub arguments: [u8; 16],
    pub chunk_bytes: usize,
    /// Raw readings before this are past retention: not read.
    pub raw_floor: i64,
    pub metrics: Arc<Metrics>,
    /// Held until the task ends: the stream counts as open until then.
    pub permit: StreamPermit,
}

/// Why streaming stopped before the end.
enum Stop {
    /// The client went away: nothing more to say.
    Closed,
    Failed(ReadError),
}

impl From<crate::storage::StorageError> for Stop {
    fn from(e: crate::storage::StorageError) -> Self {
        Self::Failed(e.into())
    }
}

type Sender = mpsc::Sender<ChunkResult>;

impl QueryTask {
    pub async fn run(
        self,
        query: ReadQuery,
        device_pks: Vec<i64>,
        from: Option<Position>,
        tx: Sender,
    ) {
        let started = Instant::now();
        self.metrics.read_streams_open.inc();
        match self.stream(&query, &device_pks, from, &tx).await {
            Ok(()) | Err(Stop::Closed) => {}
            Err(Stop::Failed(e)) => {
                tracing::warn!(error = %e, "QueryReadings stopped early");
                let _ = tx.send(Err(e)).await;
            }
        }
        self.metrics.read_streams_open.dec();
        self.metrics
            .read_query_seconds
            .observe(started.elapsed().as_secs_f64());
        drop(self.permit);
    }

    async fn stream(
        &self,
        query: &ReadQuery,
        device_pks: &[i64],
        from: Option<Position>,
        tx: &Sender,
    ) -> Result<(), Stop> {
        // Series before the token's are done; its own resumes inside.
        let mut after = from.map_or(i64::MIN, |p| p.sensor_pk.saturating_sub(1));
        loop {
            let page = self
                .unless_closed(
                    tx,
                    self.pool
                        .series(device_pks, &query.sensors, after, SERIES_PAGE),
                )
                .await?;
            for s in &page {
                let start = match from {
                    Some(p) if s.sensor_pk == p.sensor_pk => Position {
                        time: p.time.max(query.start),
                        ..p
                    },
                    _ => Position {
                        sensor_pk: s.sensor_pk,
                        time: query.start,
                        value: f64::MIN,
                        skip: 0,
                    },
                };
                match &query.downsample {
                    None => self.raw_series(query, s, start, tx).await?,
                    Some(d) => self.bucket_series(query, d, s, start, tx).await?,
                }
            }
            match page.last() {
                Some(s) if page.len() == SERIES_PAGE => after = s.sensor_pk,
                _ => return Ok(()),
            }
        }
    }

    /// Waits for `work` unless the client goes away first.
    async fn unless_closed<T>(
        &self,
        tx: &Sender,
        work: impl Future<Output = Result<T, crate::storage::StorageError>>,
    ) -> Result<T, Stop> {
        tokio::select! {
            result = work => Ok(result?),
            () = tx.closed() => Err(Stop::Closed),
        }
    }

    async fn send(
        &self,
        tx: &Sender,
        s: &SeriesInfo,
        data: ChunkData,
        resume: Position,
    ) -> Result<(), Stop> {
        let chunk = Chunk {
            device_id: s.device_id.clone(),
            sensor: s.sensor.clone(),
            unit: s.unit.clone(),
            data,
            resume_token: self.key.issue(&self.arguments, resume, super::now_secs()),
        };
        tx.send(Ok(chunk)).await.map_err(|_| Stop::Closed)
    }

    /// Rows of one chunk given each row's bytes.
    fn rows_per_chunk(&self, s: &SeriesInfo, row_bytes: usize) -> usize {
        let names = s.device_id.len() + s.sensor.len() + s.unit.len();
        (self.chunk_bytes.saturating_sub(CHUNK_OVERHEAD + names) / row_bytes).max(1)
    }

    async fn raw_series(
        &self,
        query: &ReadQuery,
        s: &SeriesInfo,
        start: Position,
        tx: &Sender,
    ) -> Result<(), Stop> {
        // A packed fixed64 and a packed double per reading.
        let per_chunk = self.rows_per_chunk(s, 16);
        let mut cursor = RawCursor::new(start, self.raw_floor, query.end);
        // The last reading put in a chunk, and how many equal to it so far:
        // the position a token after it carries.
        let mut last = (start.time, start.value, start.skip);
        let (mut time, mut value) = (Vec::new(), Vec::new());
        while let Some((ts, vs)) = self
            .unless_closed(tx, cursor.next_page(&self.pool, s.sensor_pk, per_chunk))
            .await?
        {
            for (t, v) in ts.into_iter().zip(vs) {
                last = if (t, v) == (last.0, last.1) {
                    (t, v, last.2 + 1)
                } else {
                    (t, v, 1)
                };
                time.push(t);
                value.push(v);
                if time.len() == per_chunk {
                    let data = ChunkData::Raw {
                        time: std::mem::take(&mut time),
                        value: std::mem::take(&mut value),
                    };
                    let resume = Position {
                        sensor_pk: s.sensor_pk,
                        time: last.0,
                        value: last.1,
                        skip: last.2,
                    };
                    self.send(tx, s, data, resume).await?;
                }
            }
        }
        if !time.is_empty() {
            self.send(tx, s, ChunkData::Raw { time, value }, done(s, query))
                .await?;
        }
        Ok(())
    }

    async fn bucket_series(
        &self,
        query: &ReadQuery,
        d: &Downsample,
        s: &SeriesInfo,
        start: Position,
        tx: &Sender,
    ) -> Result<(), Stop> {
        let per_chunk = self.rows_per_chunk(s, 8 + 8 * d.aggregates.len());
        let mut buckets = Buckets {
            task: self,
            tx,
            series: s,
            downsample: d,
            per_chunk,
            current: None,
            columns: BucketColumns::default(),
        };
        let from = start.time;
        let from_rollup = query.rollup_eligible()
            && (!d.aggregates.contains(&Aggregate::First)
                || self
                    .unless_closed(tx, self.pool.rollup_has_first(s.sensor_pk, from, query.end))
                    .await?);
        if from_rollup {
            let mut hour = from;
            loop {
                let page = self
                    .unless_closed(
                        tx,
                        self.pool
                            .rollup_page(s.sensor_pk, hour, query.end, ROLLUP_PAGE_ROWS),
                    )
                    .await?;
                for i in 0..page.hour.len() {
                    let agg = Agg {
                        count: page.count[i] as u64,
                        sum: page.sum[i],
                        min: page.min[i],
                        max: page.max[i],
                        first: (page.first_time[i], page.first_value[i]),
                        last: (page.last_time[i], page.last_value[i]),
                    };
                    buckets.add(page.hour[i], &agg).await?;
                }
                match page.hour.last() {
                    Some(&h) if page.hour.len() == ROLLUP_PAGE_ROWS => hour = h + HOUR_NANOS,
                    _ => break,
                }
            }
        } else {
            let mut cursor = RawCursor::new(start, self.raw_floor, query.end);
            while let Some((ts, vs)) = self
                .unless_closed(
                    tx,
                    cursor.next_page(&self.pool, s.sensor_pk, BUCKET_PAGE_ROWS),
                )
                .await?
            {
                for (t, v) in ts.into_iter().zip(vs) {
                    buckets.add(t, &Agg::of_reading(t, v)).await?;
                }
            }
        }
        buckets.finish(query).await
    }
}

/// The position after a whole series: its end.
fn done(s: &SeriesInfo, query: &ReadQuery) -> Position {
    Position {
        sensor_pk: s.sensor_pk,
        time: query.end,
        value: f64::MIN,
        skip: 0,
    }
}

/// Keyset pages of one series' raw readings, by (time, value). Readings
/// equal in both are alike in every stored column, so a page that ends
/// inside a run of them is continued by counting: the next page starts at
/// that (time, value) and skips as many as were already read.
struct RawCursor {
    from: PageFrom,
    skip: u64,
    end: i64,
    done: bool,
}

impl RawCursor {
    /// From `start`, but not before `floor`.
    fn new(start: Position, floor: i64, end: i64) -> Self {
        let (from, skip) = if start.time < floor {
            let from = PageFrom {
                time: floor,
                value: f64::MIN,
            };
            (from, 0)
        } else {
            let from = PageFrom {
                time: start.time,
                value: start.value,
            };
            (from, start.skip)
        };
        Self {
            from,
            skip,
            end,
            done: false,
        }
    }

    /// The next page of at most `limit` new readings; `None` past the end.
    async fn next_page(
        &mut self,
        pool: &ReadPool,
        sensor_pk: i64,
        limit: usize,
    ) -> Result<Option<(Vec<i64>, Vec<f64>)>, crate::storage::StorageError> {
        if self.done {
            return Ok(None);
        }
        let asked = limit + self.skip as usize;
        let mut page = pool.raw_page(sensor_pk, self.from, self.end, asked).await?;
        let fetched = page.time.len();
        // The readings equal to where the page starts come first; drop
        // those already sent (fewer if some expired meanwhile).
        let equal = page
            .time
            .iter()
            .zip(&page.value)
            .take(self.skip as usize)
            .take_while(|&(&t, &v)| (t, v) == (self.from.time, self.from.value))
            .count();
        page.time.drain(..equal);
        page.value.drain(..equal);
        if fetched < asked {
            self.done = true;
        }
        if let (Some(&t), Some(&v)) = (page.time.last(), page.value.last()) {
            let run = page
                .time
                .iter()
                .zip(&page.value)
                .rev()
                .take_while(|&(&t2, &v2)| (t2, v2) == (t, v))
                .count() as u64;
            self.skip = if (t, v) == (self.from.time, self.from.value) {
                self.skip + run
            } else {
                run
            };
            self.from = PageFrom { time: t, value: v };
        }
        if page.time.is_empty() {
            self.done = true;
            return Ok(None);
        }
        Ok(Some((page.time, page.value)))
    }
}

/// Buckets of one series being filled, and the chunk they go into.
struct Buckets<'a> {
    task: &'a QueryTask,
    tx: &'a Sender,
    series: &'a SeriesInfo,
    downsample: &'a Downsample,
    per_chunk: usize,
    /// The open bucket: `[start, end)` and its aggregates so far.
    current: Option<(i64, i64, Agg)>,
    columns: BucketColumns,
}

impl Buckets<'_> {
    /// Adds what is known of time `t` (a reading, or a whole hour's
    /// rollup, which lies in one bucket).
    async fn add(&mut self, t: i64, agg: &Agg) -> Result<(), Stop> {
        if let Some((start, end, acc)) = &mut self.current
            && *start <= t
            && t < *end
        {
            acc.merge(agg);
            return Ok(());
        }
        self.close_bucket().await?;
        let (start, end) = self.downsample.bucketing.bucket(t);
        self.current = Some((start, end, *agg));
        Ok(())
    }

    /// Closes the open bucket; a full chunk goes out, resuming at the
    /// bucket's end.
    async fn close_bucket(&mut self) -> Result<(), Stop> {
        let Some((start, end, acc)) = self.current.take() else {
            return Ok(());
        };
        self.columns.push(start, &acc, &self.downsample.aggregates);
        if self.columns.len() == self.per_chunk {
            let resume = Position {
                sensor_pk: self.series.sensor_pk,
                time: end,
                value: f64::MIN,
                skip: 0,
            };
            let data = ChunkData::Buckets(std::mem::take(&mut self.columns));
            self.task.send(self.tx, self.series, data, resume).await?;
        }
        Ok(())
    }

    async fn finish(mut self, query: &ReadQuery) -> Result<(), Stop> {
        self.close_bucket().await?;
        if !self.columns.is_empty() {
            let data = ChunkData::Buckets(std::mem::take(&mut self.columns));
            self.task
                .send(self.tx, self.series, data, done(self.series, query))
                .await?;
        }
        Ok(())
    }
}
