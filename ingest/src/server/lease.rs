//! A replica's lease: renewed every few seconds on the database's clock. At
//! each renewal the replica also sweeps the dead: replicas whose lease has
//! lapsed lose their sessions, and their devices go offline. So a process
//! that dies without a goodbye has its devices shown offline within a lease,
//! and starting a process never touches another's devices.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::{ClusterConfig, Replica};
use crate::control::CommandCenter;
use crate::storage::{StorageError, Store};

/// Announces the replica before it serves anything. On SQLite, the only
/// process: no stream survived the previous one.
pub async fn register(
    store: &Store,
    replica: &Replica,
    addr: &str,
    config: &ClusterConfig,
) -> Result<(), StorageError> {
    store
        .register_replica(&replica.id, addr, config.lease)
        .await?;
    let swept = store.sweep_dead_replicas().await?;
    if !swept.is_empty() {
        tracing::info!(
            devices = swept.len(),
            "devices of stopped server processes marked offline"
        );
    }
    // On SQLite this process is the only one: a "replica" would mislead.
    if store.is_shared() {
        tracing::info!(replica = replica.short(), lease = ?config.lease, "replica registered");
    }
    Ok(())
}

/// Renews and sweeps until `stopping` (PostgreSQL).
pub fn keep(
    store: Store,
    replica: Replica,
    addr: String,
    config: ClusterConfig,
    control: Arc<CommandCenter>,
    mut stopping: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(config.renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopping.wait_for(|s| *s) => break,
            }
            match store.renew_replica(&replica.id, config.lease).await {
                Ok(true) => {}
                Ok(false) => {
                    // Another replica took this one for dead and took its
                    // devices offline: its streams no longer count. Ending
                    // them makes the devices reconnect and be counted again.
                    tracing::error!(
                        replica = replica.short(),
                        "this process's lease lapsed and its sessions were swept; ending its Control streams"
                    );
                    if let Err(error) = store
                        .register_replica(&replica.id, &addr, config.lease)
                        .await
                    {
                        tracing::error!(%error, "registering again failed");
                    }
                    control.end_all_sessions();
                }
                Err(error) => tracing::warn!(%error, "renewing the replica's lease failed"),
            }
            match store.sweep_dead_replicas().await {
                Ok(swept) if !swept.is_empty() => {
                    tracing::info!(
                        devices = swept.len(),
                        "a server process stopped renewing its lease; its devices are offline"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "sweeping dead replicas failed"),
            }
        }
    })
}
