//! The one LISTEN connection of a server process: what the other processes
//! committed, told at their commit.
//!
//! Each notification only says where to look; the database holds the
//! truth. So a notification lost (the connection dropped, a process died
//! between its commit and its NOTIFY) costs latency, never an event or a
//! command: on reconnecting the listener has everyone re-read ("resync"),
//! and each consumer also reads on its own timer (the alert feed every
//! second, held devices' queued commands every two seconds, waiting senders
//! every second).

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPoolOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::alerts::AlertEngine;
use crate::auth::{CredentialEvent, Credentials};
use crate::control::CommandCenter;
use crate::domain::command::CommandState;
use crate::metrics::Metrics;
use crate::storage::cluster::{channel, parse_sessions_payload};

/// What hears the notifications.
#[derive(Clone)]
pub struct Subscribers {
    pub alerts: AlertEngine,
    pub control: Arc<CommandCenter>,
    pub credentials: Arc<Credentials>,
}

/// Pause before reconnecting after a failure.
const RETRY: Duration = Duration::from_millis(250);

/// Listens until `stopping`, on a connection made with `options` (its own
/// one-connection pool: `PgListener` takes a connection for its life and
/// makes a new one from the pool after losing it).
pub fn start(
    options: PgConnectOptions,
    subscribers: Subscribers,
    stopping: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    tokio::spawn(run(options, subscribers, stopping, metrics))
}

async fn run(
    options: PgConnectOptions,
    subscribers: Subscribers,
    mut stopping: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    let mut listener: Option<PgListener> = None;
    loop {
        let Some(l) = listener.as_mut() else {
            match listen(&pool).await {
                Ok(l) => {
                    listener = Some(l);
                    // Whatever was committed before LISTEN took effect.
                    resync(&subscribers, &metrics).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for other server processes' changes; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(RETRY) => {}
                        _ = stopping.wait_for(|s| *s) => break,
                    }
                }
            }
            continue;
        };
        let received = tokio::select! {
            received = l.try_recv() => received,
            _ = stopping.wait_for(|s| *s) => break,
        };
        match received {
            Ok(Some(notification)) => dispatch(&subscribers, &notification).await,
            // The connection was lost; the next call reconnects, and
            // anything committed meanwhile was not heard.
            Ok(None) => {
                tracing::warn!("the notification connection was lost; reconnecting");
                listener = None;
            }
            Err(error) => {
                tracing::warn!(%error, "the notification connection failed; reconnecting");
                listener = None;
                tokio::select! {
                    () = tokio::time::sleep(RETRY) => {}
                    _ = stopping.wait_for(|s| *s) => break,
                }
            }
        }
    }
    // Closing waits for the listener's connection to come back.
    drop(listener);
    pool.close().await;
}

async fn listen(pool: &sqlx::PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all(channel::ALL).await?;
    Ok(listener)
}

/// Everyone reads what they may have missed.
async fn resync(subscribers: &Subscribers, metrics: &Metrics) {
    metrics.cluster_listener_resyncs.inc();
    subscribers.alerts.recorded();
    subscribers.control.wake_all();
    subscribers.credentials.forget_all();
    if let Err(error) = subscribers.alerts.reload_rules().await {
        tracing::warn!(%error, "re-reading the rules failed");
    }
}

async fn dispatch(subscribers: &Subscribers, n: &PgNotification) {
    let payload = n.payload();
    match n.channel() {
        channel::ALERTS => subscribers.alerts.recorded(),
        channel::CONTROL => match payload.parse() {
            Ok(device_pk) => subscribers.control.wake(device_pk),
            Err(_) => subscribers.control.wake_all(),
        },
        channel::SESSIONS => {
            for ticket in parse_sessions_payload(payload) {
                subscribers.control.opened_elsewhere(ticket);
            }
        }
        channel::COMMANDS => {
            let parsed = payload.split_once(':').and_then(|(id, state)| {
                Some((id.parse::<u64>().ok()?, CommandState::parse(state)?))
            });
            match parsed {
                Some((id, state)) => subscribers.control.changed_elsewhere(id, state),
                // Waiting senders read the database every second anyway.
                None => tracing::debug!(payload, "unreadable command notification"),
            }
        }
        channel::CREDENTIALS => match CredentialEvent::from_payload(payload) {
            Some(event) => subscribers.credentials.apply(event),
            None => {
                tracing::warn!(
                    payload,
                    "unreadable credential notification; forgetting all cached credentials"
                );
                subscribers.credentials.forget_all();
            }
        },
        channel::RULES => {
            if let Err(error) = subscribers.alerts.reload_rules().await {
                tracing::warn!(%error, "re-reading the rules failed");
            }
        }
        other => tracing::debug!(channel = other, "notification on an unknown channel"),
    }
}
