//! Retention: a background task that, every `interval`, removes raw readings
//! older than the readings retention and rollup rows older than the (longer)
//! rollup retention, and on PostgreSQL creates the coming days' partitions.
//!
//! It works in small steps, each its own short transaction, so ingest never
//! waits for more than one step (see `Store::expire_readings`).

use std::time::Duration;

use tokio::sync::watch;

use crate::domain::time::{UnixNanos, now_unix_nanos};
use crate::storage::partitions::day_of;
use crate::storage::rollup::hour_of;
use crate::storage::{Expired, StorageError, Store};

/// How long data is kept. The raw readings' retention is
/// `ReadingLimits::retention`, one setting for refusing old readings on
/// arrival and for removing them later.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Hourly rollups are kept this long, so reports reach further back
    /// than the raw data.
    pub rollups: Duration,
    /// How often a pass runs.
    pub interval: Duration,
    /// Rows one delete step removes at most.
    pub step_rows: usize,
    /// PostgreSQL: days of readings partitions kept ready beyond today.
    pub partitions_ahead_days: u32,
    /// Batches stay in the readings feed this long after they committed
    /// (`--feed-retention`); a cursor before that is refused, naming the
    /// earliest valid one.
    pub feed: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            rollups: Duration::from_secs(730 * 86_400),
            interval: Duration::from_secs(60),
            step_rows: 5_000,
            partitions_ahead_days: 3,
            feed: Duration::from_secs(7 * 86_400),
        }
    }
}

/// What a pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPass {
    pub partitions_created: usize,
    pub readings: Expired,
    pub rollups: Expired,
    pub feed: Expired,
}

impl RetentionPass {
    pub fn changed_anything(&self) -> bool {
        self.partitions_created > 0
            || self.readings.rows > 0
            || self.readings.partitions > 0
            || self.rollups.rows > 0
            || self.feed.rows > 0
    }
}

/// One pass at time `now`: readings older than `readings_retention` go.
pub async fn run_once(
    store: &Store,
    config: &RetentionConfig,
    readings_retention: Duration,
    now: UnixNanos,
) -> Result<RetentionPass, StorageError> {
    let today = day_of(now);
    let ahead: Vec<i64> = (today..=today + i64::from(config.partitions_ahead_days)).collect();
    let partitions_created = store.ensure_partitions(&ahead).await?;
    let readings = store
        .expire_readings(
            now.saturating_sub(nanos(readings_retention)),
            config.step_rows,
        )
        .await?;
    // Only whole hours: a bucket is removed once all of it is past.
    let rollup_cutoff = hour_of(now.saturating_sub(nanos(config.rollups)));
    let rollups = store
        .expire_rollups(rollup_cutoff, config.step_rows)
        .await?;
    let feed = store
        .expire_feed(now.saturating_sub(nanos(config.feed)), config.step_rows)
        .await?;
    Ok(RetentionPass {
        partitions_created,
        readings,
        rollups,
        feed,
    })
}

/// Runs a pass now and every `config.interval` until `stopping` is set.
pub async fn run(
    store: Store,
    config: RetentionConfig,
    readings_retention: Duration,
    mut stopping: watch::Receiver<bool>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    let mut tick = tokio::time::interval(config.interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        let pass = run_once(&store, &config, readings_retention, now_unix_nanos()).await;
        if let Ok(pass) = &pass {
            metrics
                .retention_deleted
                .inc_by(pass.readings.rows + pass.rollups.rows + pass.feed.rows);
            metrics
                .partitions_created
                .inc_by(pass.partitions_created as u64);
        }
        match pass {
            Ok(pass) if pass.changed_anything() => tracing::info!(
                partitions_created = pass.partitions_created,
                readings_deleted = pass.readings.rows,
                partitions_dropped = pass.readings.partitions,
                rollups_deleted = pass.rollups.rows,
                feed_batches_deleted = pass.feed.rows,
                steps = pass.readings.steps + pass.rollups.steps + pass.feed.steps,
                "retention pass"
            ),
            Ok(_) => {}
            // The next pass tries again; nothing is half done.
            Err(error) => tracing::error!(%error, "retention pass failed"),
        }
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}
