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
use crate::storage::{RawRows, ReadPool, RowsFrom, RowsPage, SeriesInfo};

/// Series (sensors) looked up at a time.
const SERIES_PAGE: usize = 256;
/// How many times what its previous page took a stream waits before the
/// next while ingest is pressed (see [`QueryTask::next_rows`]).
const GIVE_WAY: u32 = 9;
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
    /// Raw readings read per statement.
    pub page_rows: usize,
    /// Raw readings before this are past retention: not read.
    pub raw_floor: i64,
    pub metrics: Arc<Metrics>,
    /// Held until the task ends: the stream counts as open until then.
    pub permit: StreamPermit,
    /// Shared by every stream: whose turn it is to read while ingest is
    /// pressed (see [`Self::next_rows`]).
    pub turn: Arc<tokio::sync::Mutex<()>>,
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
            match &query.downsample {
                None => self.raw_series(query, &page, from, tx).await?,
                Some(d) => {
                    for s in &page {
                        let start = match from {
                            Some(p) if s.sensor_pk == p.sensor_pk => Position {
                                time: p.time.max(query.start),
                                ..p
                            },
                            _ => series_start(s, query),
                        };
                        self.bucket_series(query, d, s, start, tx).await?;
                    }
                }
            }
            match page.last() {
                Some(s) if page.len() == SERIES_PAGE => after = s.sensor_pk,
                _ => return Ok(()),
            }
        }
    }

    /// Whether ingest is pressing on the database: the writer's queue is
    /// more than a quarter full.
    fn ingest_pressed(&self) -> bool {
        let queued = self.metrics.writer_queue_batches.get();
        let capacity = self.metrics.writer_queue_capacity.get();
        capacity > 0 && queued * 4 > capacity
    }

    /// The next page of `cursor`, unless the client goes away first.
    ///
    /// Reads give way to ingest. While ingest presses on the database,
    /// streams take turns: one reads a page, then keeps the turn for
    /// `GIVE_WAY` times what the read took. All readers together then
    /// take about a tenth of one connection's time, however many there
    /// are (a wait per stream let ten streams take a whole connection),
    /// and batches are not held behind them. When ingest has room, reads
    /// run at full speed, side by side.
    async fn next_rows(
        &self,
        tx: &Sender,
        cursor: &mut RowsCursor,
        sensor_pks: &[i64],
        limit: usize,
    ) -> Result<Option<RawRows>, Stop> {
        if !self.ingest_pressed() {
            return self
                .unless_closed(tx, cursor.next_page(&self.pool, sensor_pks, limit))
                .await;
        }
        let _turn = tokio::select! {
            turn = self.turn.lock() => turn,
            () = tx.closed() => return Err(Stop::Closed),
        };
        let started = Instant::now();
        let page = self
            .unless_closed(tx, cursor.next_page(&self.pool, sensor_pks, limit))
            .await?;
        tokio::select! {
            () = tokio::time::sleep(started.elapsed() * GIVE_WAY) => Ok(page),
            () = tx.closed() => Err(Stop::Closed),
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

    /// The raw readings of `series` (a page of the selection, by key),
    /// from the token's position if it lies among them. Pages of rows span
    /// many series (see [`ReadPool::raw_rows`]) and are cut into chunks of
    /// one series each.
    async fn raw_series(
        &self,
        query: &ReadQuery,
        series: &[SeriesInfo],
        from: Option<Position>,
        tx: &Sender,
    ) -> Result<(), Stop> {
        let Some(first) = series.first() else {
            return Ok(());
        };
        let start = match from {
            Some(p) if series.iter().any(|s| s.sensor_pk == p.sensor_pk) => p,
            _ => series_start(first, query),
        };
        let pks: Vec<i64> = series.iter().map(|s| s.sensor_pk).collect();
        let floor = query.start.max(self.raw_floor);
        let mut cursor = RowsCursor::new(start, floor, query.end);
        let at = series
            .iter()
            .position(|s| s.sensor_pk == start.sensor_pk)
            .unwrap_or(0);
        let mut out = RawChunks {
            task: self,
            tx,
            series,
            at,
            per_chunk: self.raw_per_chunk(&series[at]),
            time: Vec::new(),
            value: Vec::new(),
            last: (start.time, start.value, start.skip),
        };
        while let Some(rows) = self
            .next_rows(tx, &mut cursor, &pks, self.page_rows)
            .await?
        {
            for i in 0..rows.len() {
                out.push(rows.sensor_pk[i], rows.time[i], rows.value[i], query)
                    .await?;
            }
        }
        out.flush(query).await
    }

    /// Raw readings in a chunk of `s`: a packed fixed64 and a packed
    /// double each.
    fn raw_per_chunk(&self, s: &SeriesInfo) -> usize {
        self.rows_per_chunk(s, 16)
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
            let floor = query.start.max(self.raw_floor);
            let mut cursor = RowsCursor::new(start, floor, query.end);
            let pks = [s.sensor_pk];
            while let Some(rows) = self
                .next_rows(tx, &mut cursor, &pks, BUCKET_PAGE_ROWS)
                .await?
            {
                for (&t, &v) in rows.time.iter().zip(&rows.value) {
                    buckets.add(t, &Agg::of_reading(t, v)).await?;
                }
            }
        }
        buckets.finish(query).await
    }
}

/// Raw readings of a page of series being cut into chunks: the series
/// being filled, its columns, and the last reading put in (with how many
/// equal to it so far: the position a token after it carries).
struct RawChunks<'a> {
    task: &'a QueryTask,
    tx: &'a Sender,
    series: &'a [SeriesInfo],
    /// The series being filled, by index into `series`.
    at: usize,
    /// Readings in a chunk of that series (its names count against the
    /// chunk's bytes).
    per_chunk: usize,
    time: Vec<i64>,
    value: Vec<f64>,
    last: (i64, f64, u64),
}

impl RawChunks<'_> {
    async fn push(
        &mut self,
        sensor_pk: i64,
        t: i64,
        v: f64,
        query: &ReadQuery,
    ) -> Result<(), Stop> {
        if self.series[self.at].sensor_pk != sensor_pk {
            self.flush(query).await?;
            // Rows come by key: the series is further on in the page.
            while self.series[self.at].sensor_pk != sensor_pk {
                self.at += 1;
            }
            self.per_chunk = self.task.raw_per_chunk(&self.series[self.at]);
            self.last = (t, v, 0);
        }
        let s = &self.series[self.at];
        self.last = if (t, v) == (self.last.0, self.last.1) {
            (t, v, self.last.2 + 1)
        } else {
            (t, v, 1)
        };
        self.time.push(t);
        self.value.push(v);
        if self.time.len() == self.per_chunk {
            let data = ChunkData::Raw {
                time: std::mem::take(&mut self.time),
                value: std::mem::take(&mut self.value),
            };
            let resume = Position {
                sensor_pk,
                time: self.last.0,
                value: self.last.1,
                skip: self.last.2,
            };
            self.task.send(self.tx, s, data, resume).await?;
        }
        Ok(())
    }

    /// Sends what is left of the series being filled: it is complete.
    async fn flush(&mut self, query: &ReadQuery) -> Result<(), Stop> {
        if self.time.is_empty() {
            return Ok(());
        }
        let s = &self.series[self.at];
        let data = ChunkData::Raw {
            time: std::mem::take(&mut self.time),
            value: std::mem::take(&mut self.value),
        };
        self.task.send(self.tx, s, data, done(s, query)).await
    }
}

/// Where a series starts when no token says otherwise.
fn series_start(s: &SeriesInfo, query: &ReadQuery) -> Position {
    series_at(s, query.start)
}

/// The position after a whole series: its end.
fn done(s: &SeriesInfo, query: &ReadQuery) -> Position {
    series_at(s, query.end)
}

/// A series from `time` on, nothing of that time sent yet.
fn series_at(s: &SeriesInfo, time: i64) -> Position {
    Position {
        sensor_pk: s.sensor_pk,
        time,
        value: f64::MIN,
        skip: 0,
    }
}

/// Keyset pages of raw readings across a page of series, by (series,
/// time, value). Readings equal in all three are alike in every column
/// the read path returns, so a page that ends inside a run of them is
/// continued by counting: the next page starts at that key and skips as
/// many as were already read.
struct RowsCursor {
    from: RowsFrom,
    skip: u64,
    /// Times before this are not read: the range's start or retention's.
    floor: i64,
    end: i64,
    done: bool,
}

impl RowsCursor {
    fn new(start: Position, floor: i64, end: i64) -> Self {
        let (time, value, skip) = if start.time < floor {
            (floor, f64::MIN, 0)
        } else {
            (start.time, start.value, start.skip)
        };
        Self {
            from: RowsFrom {
                sensor_pk: start.sensor_pk,
                time,
                value,
            },
            skip,
            floor,
            end,
            done: false,
        }
    }

    async fn next_page(
        &mut self,
        pool: &ReadPool,
        sensor_pks: &[i64],
        limit: usize,
    ) -> Result<Option<RawRows>, crate::storage::StorageError> {
        if self.done {
            return Ok(None);
        }
        let asked = limit + self.skip as usize;
        let page = pool
            .raw_rows(&RowsPage {
                sensor_pks,
                from: self.from,
                start: self.floor,
                end: self.end,
                limit: asked,
            })
            .await?;
        let fetched = page.len();
        let at = (self.from.sensor_pk, self.from.time, self.from.value);
        let equal = (0..fetched)
            .take(self.skip as usize)
            .take_while(|&i| (page.sensor_pk[i], page.time[i], page.value[i]) == at)
            .count();
        if fetched < asked {
            self.done = true;
        }
        if fetched > equal {
            let last = fetched - 1;
            let key = (page.sensor_pk[last], page.time[last], page.value[last]);
            let run = (equal..fetched)
                .rev()
                .take_while(|&i| (page.sensor_pk[i], page.time[i], page.value[i]) == key)
                .count() as u64;
            self.skip = if key == at { self.skip + run } else { run };
            self.from = RowsFrom {
                sensor_pk: key.0,
                time: key.1,
                value: key.2,
            };
        } else {
            self.done = true;
            return Ok(None);
        }
        let mut page = page;
        page.sensor_pk.drain(..equal);
        page.time.drain(..equal);
        page.value.drain(..equal);
        Ok(Some(page))
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
