//! The group-commit writer: every upload stream hands its validated batches
//! to one task, which commits the batches of many streams in one transaction
//! (with the alert events they cause, see [`crate::alerts::judge`]) and
//! answers each stream once its batch is durable.
//!
//! The queue in front of it is bounded. When the database is slow the queue
//! fills, `submit` waits, the upload handler stops reading its stream, and
//! HTTP/2 flow control slows the devices down: memory stays flat.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::Admitted;
use crate::alerts::AlertEngine;
use crate::alerts::judge::{Judge, JudgedBatch};
use crate::domain::reading::SeriesRows;
use crate::domain::time::now_unix_nanos;
use crate::domain::{SensorName, Unit};
use crate::metrics::Metrics;
use crate::storage::alerts::EventOutcome;
use crate::storage::feed::{FeedAppend, SeriesRef};
use crate::storage::rollup::RollupRows;
use crate::storage::{GroupBackend, GroupTx, ReadingColumns, StorageError, Store};

/// How the writer batches work.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Batches waiting for the writer before `submit` blocks.
    pub queue_batches: usize,
    /// A group stops taking more batches once it holds this many readings.
    pub max_group_readings: usize,
    /// ... or once committing it would take longer than this, judged by
    /// how fast recent groups committed: a group's size follows the
    /// database's speed, so a batch waits for at most about two budgets
    /// when the database keeps up. Zero: no bound but the readings.
    pub group_budget: Duration,
    /// Writer tasks on PostgreSQL, each committing its own groups on its own
    /// connection. Devices are split among them by key, so one device's
    /// batches always meet one writer, in order. SQLite has one writer
    /// whatever this says: it allows one writing transaction at a time.
    pub postgres_writers: usize,
    /// Keep `readings_hourly_rollup` up to date in each group's transaction.
    /// Off only to measure what the rollup costs: the reporting views over
    /// it then miss the readings written meanwhile.
    pub rollups: bool,
    /// Sensors (name and unit) a device may have; readings of a new sensor
    /// past it are refused, the rest of their batch is kept.
    pub max_sensors_per_device: usize,
    /// Append each committed batch to the readings feed (WatchReadings).
    /// Off only to measure what the feed costs: watchers then see nothing.
    pub feed: bool,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            queue_batches: 1024,
            max_group_readings: 50_000,
            // Off: see `--group-commit-budget`.
            group_budget: Duration::ZERO,
            postgres_writers: 2,
            rollups: true,
            max_sensors_per_device: 256,
            feed: true,
        }
    }
}

/// What became of a submitted batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Stored; the device's high-water mark is now at least `committed_sequence`.
    /// `refused_series` (indices into the batch's series) were not: they
    /// would have been new sensors past `max_sensors_per_device`.
    Committed {
        committed_sequence: u64,
        refused_series: Vec<u32>,
    },
    /// Its sequence was already committed; nothing was stored.
    Duplicate { committed_sequence: u64 },
}

/// The sequence a batch is submitted with when it has none of its own: it
/// takes the one after the device's mark when its group commits. Such a
/// batch is stored at least once: sent again, it is stored again.
pub const NEXT_SEQUENCE: u64 = 0;

/// The group holding the batch failed to commit; nothing of it was stored.
/// The cause is logged by the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the batch could not be committed")]
pub struct CommitFailed;

pub type CommitResult = Result<BatchOutcome, CommitFailed>;

struct PendingBatch {
    device_pk: i64,
    sequence: u64,
    series: Vec<SeriesRows>,
    reply: oneshot::Sender<CommitResult>,
    /// Its share of the server's budget for buffered readings, given back
    /// when the batch is dropped: after its group's commit is answered.
    _admitted: Admitted,
    /// Set when an earlier batch of the same stream failed to commit.
    stream_failed: Arc<AtomicBool>,
    /// The batch's span, for the group commit's span to link to. Only
    /// built with the `otel` feature: nothing else reads it.
    #[cfg(feature = "otel")]
    span: tracing::Span,
}

impl PendingBatch {
    fn readings(&self) -> usize {
        self.series.iter().map(|s| s.times.len()).sum()
    }
}

/// The way to the writers. They stop once every handle is dropped and their
/// queues are drained.
#[derive(Clone)]
pub struct WriterHandle {
    /// One queue per writer task.
    queues: Arc<[mpsc::Sender<PendingBatch>]>,
    metrics: Arc<Metrics>,
}

/// Which writer a device's batches go to. The writer owns the device's
/// alert state too, so this also decides who judges the device's silences.
fn shard_of(device_pk: i64, shards: usize) -> usize {
    device_pk.unsigned_abs() as usize % shards
}

fn owns(device_pk: i64, shard: usize, shards: usize) -> bool {
    shard_of(device_pk, shards) == shard
}

impl WriterHandle {
    /// A submitter for one upload stream of one device.
    pub fn stream(&self, device_pk: i64) -> StreamWriter {
        StreamWriter {
            tx: self.queues[shard_of(device_pk, self.queues.len())].clone(),
            device_pk,
            failed: Arc::new(AtomicBool::new(false)),
            metrics: self.metrics.clone(),
        }
    }
}

/// Submits one stream's batches, in order.
///
/// Once a batch of the stream fails to commit, its later batches (already
/// queued behind it) fail too, without touching the database: committing
/// them would move the device's high-water mark past the failed batch, and
/// the device, resuming from that mark, would never resend it.
pub struct StreamWriter {
    tx: mpsc::Sender<PendingBatch>,
    device_pk: i64,
    failed: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl StreamWriter {
    /// Queues a batch, waiting while the queue is full. The receiver
    /// resolves once the batch's group has committed (or failed); the
    /// group's span links to `span`.
    pub async fn submit(
        &self,
        sequence: u64,
        series: Vec<SeriesRows>,
        admitted: Admitted,
        span: &tracing::Span,
    ) -> Result<oneshot::Receiver<CommitResult>, StorageError> {
        #[cfg(not(feature = "otel"))]
        let _ = span;
        let (reply, rx) = oneshot::channel();
        let permit = self
            .tx
            .reserve()
            .await
            .map_err(|_| StorageError::WriterStopped)?;
        // Counted once it is in the queue; the writer uncounts it on taking it.
        self.metrics.writer_queue_batches.inc();
        permit.send(PendingBatch {
            device_pk: self.device_pk,
            sequence,
            series,
            reply,
            _admitted: admitted,
            stream_failed: self.failed.clone(),
            #[cfg(feature = "otel")]
            span: span.clone(),
        });
        Ok(rx)
    }
}

/// Starts the writers for `store`, each judging its devices' batches for
/// `alerts` and notifying `committed` after each commit (the readings
/// feed's follower); the task ends when all have stopped.
pub fn spawn(
    store: &Store,
    config: &WriterConfig,
    alerts: &AlertEngine,
    metrics: &Arc<Metrics>,
    committed: &Arc<Notify>,
) -> (WriterHandle, JoinHandle<()>) {
    let writers = match store {
        Store::Sqlite(_) => 1,
        Store::Postgres(_) => config.postgres_writers.max(1),
    };
    // The queue bound is for all writers together.
    let depth = (config.queue_batches / writers).max(1);
    metrics.writer_queue_capacity.set((depth * writers) as i64);
    let sizing = GroupSizing::new(config.max_group_readings.max(1), config.group_budget);
    let mut queues = Vec::with_capacity(writers);
    let mut tasks = Vec::with_capacity(writers);
    for shard in 0..writers {
        let (tx, rx) = mpsc::channel(depth);
        queues.push(tx);
        let judge = Judge::new(alerts.clone(), owns, shard, writers);
        let writer = Writer {
            rx,
            judge,
            sizing,
            config: config.clone(),
            metrics: metrics.clone(),
            wake_feed: committed.clone(),
        };
        tasks.push(match store {
            Store::Sqlite(s) => tokio::spawn(run(s.clone(), writer)),
            Store::Postgres(s) => tokio::spawn(run(s.clone(), writer)),
        });
    }
    let all = tokio::spawn(async move {
        for task in tasks {
            let _ = task.await;
        }
    });
    (
        WriterHandle {
            queues: queues.into(),
            metrics: metrics.clone(),
        },
        all,
    )
}

type SensorKey = (i64, SensorName, Unit);

/// Sensor pks already in the database, so a steady stream of readings
/// costs no lookups. Devices times sensors is small; the cap only guards
/// against a pathological fleet.
const MAX_CACHED_SENSORS: usize = 1_000_000;

/// How often silences are checked: the lateness of an inactivity alert.
const INACTIVITY_TICK: Duration = Duration::from_millis(100);

/// One writer task's own state, whichever backend it writes to.
struct Writer {
    rx: mpsc::Receiver<PendingBatch>,
    judge: Judge,
    sizing: GroupSizing,
    config: WriterConfig,
    metrics: Arc<Metrics>,
    /// Notified after each commit: the readings feed's follower.
    wake_feed: Arc<Notify>,
}

async fn run<B: GroupBackend>(backend: B, writer: Writer) {
    let Writer {
        mut rx,
        mut judge,
        mut sizing,
        config,
        metrics,
        wake_feed,
    } = writer;
    let mut sensors: HashMap<SensorKey, i64> = HashMap::new();
    let mut columns = ReadingColumns::default();
    let mut group = Vec::new();
    let mut tick = tokio::time::interval(INACTIVITY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The tick first: under load the queue is never empty, and silences
        // must still be judged.
        let first = tokio::select! {
            biased;
            _ = tick.tick() => {
                judge_silences(&backend, &mut judge).await;
                if rx.is_empty() {
                    metrics.writer_progress.progressed();
                }
                continue;
            }
            next = rx.recv() => match next {
                Some(first) => first,
                None => break,
            },
        };
        // Whatever queued while the previous group committed joins this one:
        // under load groups grow by themselves, when idle a batch commits
        // alone without waiting.
        metrics.writer_queue_batches.dec();
        let mut readings = first.readings();
        group.push(first);
        let limit = sizing.limit();
        while readings < limit {
            match rx.try_recv() {
                Ok(next) => {
                    metrics.writer_queue_batches.dec();
                    readings += next.readings();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let (doomed, live): (Vec<_>, Vec<_>) = group
            .drain(..)
            .partition(|b| b.stream_failed.load(Ordering::Acquire));
        for batch in doomed {
            let _ = batch.reply.send(Err(CommitFailed));
        }
        group = live;
        if group.is_empty() {
            continue;
        }
        // A root span: a group serves many streams, so it belongs to no
        // batch's trace and links to each of them instead.
        let span =
            tracing::debug_span!(parent: None, "group_commit", batches = group.len(), readings);
        #[cfg(feature = "otel")]
        for batch in &group {
            crate::observability::otel::link(
                &span,
                &crate::observability::otel::span_context(&batch.span),
            );
        }
        let started = std::time::Instant::now();
        let days = backend.days_to_prepare(
            group
                .iter()
                .flat_map(|b| b.series.iter())
                .flat_map(|s| s.times.iter().copied()),
        );
        let committed = async {
            match backend.prepare(&days).await {
                Ok(()) => commit_group(
                    &backend,
                    &group,
                    &mut sensors,
                    &mut columns,
                    &config,
                    &mut judge,
                )
                .await
                .map_err(StorageError::from),
                Err(e) => Err(e),
            }
        }
        .instrument(span.clone())
        .await;
        let _in_span = span.enter();
        match committed {
            Ok(outcomes) => {
                wake_feed.notify_one();
                sizing.observe(readings, started.elapsed());
                metrics
                    .group_commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.group_commit_readings.observe(readings as f64);
                metrics.writer_progress.progressed();
                tracing::debug!(
                    batches = group.len(),
                    readings,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "group committed"
                );
                for (batch, outcome) in group.drain(..).zip(outcomes) {
                    // A stream that went away no longer needs the answer.
                    let _ = batch.reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                tracing::error!(%error, batches = group.len(), readings, "group commit failed");
                for batch in group.drain(..) {
                    batch.stream_failed.store(true, Ordering::Release);
                    let _ = batch.reply.send(Err(CommitFailed));
                }
            }
        }
        if sensors.len() > MAX_CACHED_SENSORS {
            sensors.clear();
        }
        if columns.sensor_pk.capacity() > 4 * sizing.max_readings {
            columns = ReadingColumns::default();
        }
    }
    tracing::debug!("writer stopped: queue closed and drained");
}

/// How many readings the next group may take.
#[derive(Debug, Clone, Copy)]
struct GroupSizing {
    max_readings: usize,
    budget_nanos: f64,
    /// Recent commit time per reading, fixed costs included: small groups
    /// look dearer per reading, which makes the size settle where a group
    /// takes about the budget, whatever the fixed part.
    nanos_per_reading: f64,
}

impl GroupSizing {
    fn new(max_readings: usize, budget: Duration) -> Self {
        Self {
            max_readings,
            budget_nanos: budget.as_nanos() as f64,
            // A guess until the first commit says better: about what
            // SQLite on a small machine does.
            nanos_per_reading: 1_500.0,
        }
    }

    fn limit(&self) -> usize {
        if self.budget_nanos == 0.0 {
            return self.max_readings;
        }
        let fits = (self.budget_nanos / self.nanos_per_reading) as usize;
        fits.clamp(1, self.max_readings)
    }

    fn observe(&mut self, readings: usize, took: Duration) {
        if readings == 0 {
            return;
        }
        let per = took.as_nanos() as f64 / readings as f64;
        // Quick to follow a slowdown, steadier on the way back.
        let weight = if per > self.nanos_per_reading {
            0.5
        } else {
            0.2
        };
        self.nanos_per_reading += weight * (per - self.nanos_per_reading);
    }
}

/// Records inactivity alerts of this writer's devices in a transaction of
/// their own. A failure changes nothing: the next tick finds the same
/// silences and tries again.
async fn judge_silences<B: GroupBackend>(backend: &B, judge: &mut Judge) {
    if !judge.engine().judges_silences() {
        return;
    }
    let book = judge.engine().rules().await;
    let events = judge.silences(&book).await;
    if events.is_empty() {
        return;
    }
    let recorded = async {
        let mut tx = backend.begin().await?;
        let outcomes = tx.record_alert_events(&events, now_unix_nanos()).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(outcomes)
    }
    .await;
    match recorded {
        Ok(outcomes) => {
            judge.apply_silences(&events, &outcomes);
            judge.engine().recorded();
        }
        Err(error) => {
            tracing::warn!(%error, events = events.len(), "recording inactivity alerts failed; retrying on the next tick");
        }
    }
}

/// Commits one group: decides duplicates against the stored high-water
/// marks, judges the new batches against the alert rules, inserts their
/// readings with one bulk statement, records the alert events they caused
/// and advances the marks, all in one transaction.
async fn commit_group<B: GroupBackend>(
    backend: &B,
    group: &[PendingBatch],
    sensors: &mut HashMap<SensorKey, i64>,
    columns: &mut ReadingColumns,
    config: &WriterConfig,
    judge: &mut Judge,
) -> Result<Vec<BatchOutcome>, sqlx::Error> {
    // Held to the end: no rule changes between judging and commit.
    let book = judge.engine().rules().await;
    let mut tx = backend.begin().await?;
    let mut device_pks: Vec<i64> = group.iter().map(|b| b.device_pk).collect();
    device_pks.sort_unstable();
    device_pks.dedup();
    let stored = tx.committed_sequences(&device_pks).await?;
    let mut marks = stored.clone();

    let mut outcomes = Vec::with_capacity(group.len());
    let mut new_sensors: HashMap<SensorKey, i64> = HashMap::new();
    let mut feed = Vec::new();
    columns.clear();
    for batch in group {
        let Some(mark) = marks.get_mut(&batch.device_pk) else {
            // Authentication found the device, so its row exists.
            return Err(sqlx::Error::RowNotFound);
        };
        // A batch without a sequence of its own (MQTT without `seq`) takes
        // the next one: stored at least once, never judged a duplicate.
        let sequence = match batch.sequence {
            NEXT_SEQUENCE => *mark + 1,
            s if s <= *mark => {
                outcomes.push(BatchOutcome::Duplicate {
                    committed_sequence: *mark,
                });
                continue;
            }
            s => s,
        };
        *mark = sequence;
        let mut refused_series = Vec::new();
        let mut feed_series = Vec::new();
        // The place in the batch of each series' first reading.
        let mut first_index = 0i32;
        for (index, series) in batch.series.iter().enumerate() {
            let series_first = first_index;
            first_index += series.times.len() as i32;
            let key = (batch.device_pk, series.sensor.clone(), series.unit.clone());
            let pk = match sensors.get(&key).or_else(|| new_sensors.get(&key)) {
                Some(&pk) => pk,
                None => match tx
                    .sensor_pk(
                        batch.device_pk,
                        &series.sensor,
                        &series.unit,
                        config.max_sensors_per_device,
                    )
                    .await?
                {
                    Some(pk) => {
                        new_sensors.insert(key, pk);
                        pk
                    }
                    None => {
                        refused_series.push(index as u32);
                        continue;
                    }
                },
            };
            feed_series.push(SeriesRef {
                sensor: series.sensor.as_str(),
                unit: series.unit.as_str(),
                first_index: series_first as u32,
                times: &series.times,
                values: &series.values,
            });
            columns
                .sensor_pk
                .extend(std::iter::repeat_n(pk, series.times.len()));
            columns.time.extend_from_slice(&series.times);
            columns.value.extend_from_slice(&series.values);
            columns
                .batch_sequence
                .extend(std::iter::repeat_n(sequence as i64, series.times.len()));
            columns
                .batch_index
                .extend(series_first..series_first + series.times.len() as i32);
        }
        if config.feed {
            feed.push(FeedAppend::new(batch.device_pk, sequence, feed_series));
        }
        outcomes.push(BatchOutcome::Committed {
            committed_sequence: sequence,
            refused_series,
        });
    }

    // Refused series are judged no more than they are stored (rare: a copy
    // of the rest of such a batch).
    let kept: Vec<Option<Vec<SeriesRows>>> = group
        .iter()
        .zip(&outcomes)
        .map(|(b, o)| match o {
            BatchOutcome::Committed { refused_series, .. } if !refused_series.is_empty() => Some(
                b.series
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !refused_series.contains(&(*i as u32)))
                    .map(|(_, s)| s.clone())
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    // Before the readings go in: a rebuilt rate-of-change state starts at
    // the newest reading stored before this group.
    let judged: Vec<JudgedBatch> = group
        .iter()
        .zip(&outcomes)
        .zip(&kept)
        .filter(|((_, o), _)| matches!(o, BatchOutcome::Committed { .. }))
        .map(|((b, _), kept)| JudgedBatch {
            device_pk: b.device_pk,
            series: kept.as_deref().unwrap_or(&b.series),
        })
        .collect();
    let verdicts = judge.judge_group(&book, &mut tx, &judged, &stored).await?;

    if !columns.is_empty() {
        tx.insert_readings(columns).await?;
        if config.rollups {
            tx.add_rollups(&RollupRows::from_readings(columns)).await?;
        }
    }
    if !verdicts.holds.is_empty() {
        tx.set_pending_holds(&verdicts.holds).await?;
    }
    let recorded = if verdicts.events.is_empty() {
        Vec::new()
    } else {
        tx.record_alert_events(&verdicts.events, now_unix_nanos())
            .await?
    };
    let advanced: Vec<(i64, u64)> = marks
        .iter()
        .filter(|(pk, mark)| stored.get(pk) != Some(mark))
        .map(|(&pk, &mark)| (pk, mark))
        .collect();
    if !advanced.is_empty() {
        tx.set_committed_sequences(&advanced, now_unix_nanos())
            .await?;
    }
    // Last: the feed's counter row is locked from here to the commit.
    if !feed.is_empty() {
        tx.append_feed(&feed, now_unix_nanos()).await?;
    }
    tx.commit().await?;
    // Only now: a rolled-back group's new sensor rows do not exist, and its
    // judgments never happened.
    sensors.extend(new_sensors);
    let any_event = recorded
        .iter()
        .any(|o| matches!(o, EventOutcome::Recorded(_)));
    judge.apply(&book, verdicts, &recorded, &marks);
    if any_event {
        judge.engine().recorded();
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Groups settle where a commit takes about the budget, whatever the
    /// fixed part of a commit's cost.
    #[test]
    fn group_size_settles_at_the_budget() {
        for (fixed_us, per_reading_ns) in [(200.0, 1_000.0), (2_000.0, 1_000.0), (500.0, 5_000.0)] {
            let mut sizing = GroupSizing::new(1_000_000, Duration::from_millis(10));
            for _ in 0..100 {
                let n = sizing.limit();
                let took = fixed_us * 1e3 + per_reading_ns * n as f64;
                sizing.observe(n, Duration::from_nanos(took as u64));
            }
            let n = sizing.limit() as f64;
            let took_ms = (fixed_us * 1e3 + per_reading_ns * n) / 1e6;
            assert!(
                (9.0..=11.0).contains(&took_ms),
                "{fixed_us} µs fixed, {per_reading_ns} ns/reading: {took_ms} ms"
            );
        }
    }

    #[test]
    fn no_budget_means_the_readings_cap() {
        let sizing = GroupSizing::new(50_000, Duration::ZERO);
        assert_eq!(sizing.limit(), 50_000);
    }
}
