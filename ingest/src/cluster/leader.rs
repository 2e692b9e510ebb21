//! One process leads: it judges inactivity rules (silence is judged on one
//! clock, and only one process should fire it) and expires commands.
//!
//! Leadership is a PostgreSQL session advisory lock held on a connection of
//! its own. It goes with that session, so a leader that dies (even by
//! SIGKILL: the kernel closes its socket, the server ends the session) frees
//! it at once, and the next process to try takes it within a second. A
//! leader that loses its connection steps down before anyone else can have
//! the lock. Two leaders for a moment would be harmless anyway: a second
//! FIRED of an open alert inserts nothing (`alerts_one_open`), and expiring
//! a command is one conditional UPDATE.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// The advisory lock's key: "ingest" in ASCII.
const LOCK_KEY: i64 = 0x696e_6765_7374;

/// How often a follower tries to take the lock, and a leader checks that its
/// connection still holds it.
const CHECK: Duration = Duration::from_secs(1);

/// Whether this process leads now.
#[derive(Debug, Clone)]
pub struct Leadership {
    leading: watch::Receiver<bool>,
}

impl Leadership {
    /// The only process there is (SQLite) always leads.
    pub fn sole(metrics: &Metrics) -> Self {
        metrics.cluster_leader.set(1);
        let (_, leading) = watch::channel(true);
        Self { leading }
    }

    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Starts contending for the lock on connections made with `options`.
    pub fn contend(
        options: PgConnectOptions,
        stopping: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, leading) = watch::channel(false);
        let task = tokio::spawn(run(options, tx, stopping, metrics));
        (Self { leading }, task)
    }
}

async fn run(
    options: PgConnectOptions,
    leading: watch::Sender<bool>,
    mut stopping: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let mut conn: Option<PgConnection> = None;
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopping.wait_for(|s| *s) => break,
        }
        let checked = tokio::time::timeout(CHECK * 2, step(&options, &mut conn, *leading.borrow()));
        let held = match checked.await.unwrap_or(Err(sqlx::Error::PoolTimedOut)) {
            Ok(held) => held,
            // A check that hangs is as good as a lost connection.
            Err(error) => {
                if *leading.borrow() {
                    tracing::warn!(%error, "lost the leader's connection; stepping down");
                } else {
                    tracing::debug!(%error, "cannot contend for leadership");
                }
                conn = None;
                false
            }
        };
        if held != *leading.borrow() {
            tracing::info!(leading = held, "leadership changed");
            metrics.cluster_leader.set(i64::from(held));
            leading.send_replace(held);
        }
    }
    if *leading.borrow() {
        leading.send_replace(false);
        metrics.cluster_leader.set(0);
    }
    // Closing the session frees the lock for the next leader at once.
    if let Some(conn) = conn {
        let _ = conn.close().await;
    }
}

/// Takes the lock if free, or checks that the session holding it is alive.
async fn step(
    options: &PgConnectOptions,
    conn: &mut Option<PgConnection>,
    leading: bool,
) -> Result<bool, sqlx::Error> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(PgConnection::connect_with(options).await?),
    };
    if leading {
        sqlx::query("SELECT 1").execute(&mut *c).await?;
        return Ok(true);
    }
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut *c)
        .await
}
