//! The live feed: one task per server that reads newly committed alert
//! events from the database, in id order, and broadcasts them to watchers.
//!
//! Events are written by several transactions (each writer's groups, acks,
//! rule changes), but ids are handed out by one counter row held until
//! commit, so the committed events are always a prefix 1..=n with no hole:
//! reading "after the last one seen" never skips one that commits later.
//! Reading back instead of forwarding what writers hand over keeps that
//! order without coordinating the writers, survives a commit whose outcome
//! was lost with the connection, and also carries events committed by
//! another server process sharing the database (within the poll interval).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, broadcast, watch};

use crate::domain::alert::Severity;
use crate::metrics::{KindLabel, Metrics, SeverityLabel};
use crate::storage::Store;
use crate::storage::alerts::{AlertEventRecord, EventKind};

/// How often the database is read without being told of new events.
const POLL: Duration = Duration::from_secs(1);

/// Events read per query.
const PAGE: u32 = 500;

pub(super) async fn run(
    store: Store,
    events: broadcast::Sender<Arc<AlertEventRecord>>,
    recorded: Arc<Notify>,
    mut last: u64,
    mut stopping: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    // Open alerts as of `last`; the events after it move the counts.
    match store.open_alerts_by_severity().await {
        Ok(counts) => {
            for (severity, n) in counts {
                if let Some(severity) = Severity::parse(&severity) {
                    open_alerts(&metrics, severity).set(n);
                }
            }
        }
        Err(error) => tracing::warn!(%error, "counting open alerts failed"),
    }
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = recorded.notified() => {}
            _ = poll.tick() => {}
            _ = stopping.wait_for(|s| *s) => break,
        }
        loop {
            let page = match store.alert_events_after(last, PAGE).await {
                Ok(page) => page,
                Err(error) => {
                    // Nothing is lost: the next wake-up reads from `last`.
                    tracing::warn!(%error, last, "alert feed cannot read events");
                    break;
                }
            };
            let full = page.len() == PAGE as usize;
            for event in page {
                last = event.event_id;
                tracing::info!(
                    event_id = event.event_id,
                    kind = event.kind.as_str(),
                    alert_id = event.alert_id,
                    rule = %event.rule_id,
                    device = %event.device_id,
                    "alert event"
                );
                metrics
                    .alert_events
                    .get_or_create(&KindLabel {
                        kind: event.kind.as_str(),
                    })
                    .inc();
                match event.kind {
                    EventKind::Fired => open_alerts(&metrics, event.severity).inc(),
                    EventKind::Resolved => open_alerts(&metrics, event.severity).dec(),
                    EventKind::Acked => 0,
                };
                // No receiver is fine: watchers catch up from the database.
                let _ = events.send(Arc::new(event));
            }
            if !full {
                break;
            }
        }
    }
    tracing::debug!("alert feed stopped");
}

fn open_alerts(metrics: &Metrics, severity: Severity) -> prometheus_client::metrics::gauge::Gauge {
    metrics
        .alerts_open
        .get_or_create(&SeverityLabel {
            severity: severity.as_str(),
        })
        .clone()
}
