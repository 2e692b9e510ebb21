//! The command center: queues commands, wakes the device's session, waits
//! for final states, expires what outlived its time to live.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::auth::CredentialEnded;
use crate::cluster::Replica;
use crate::cluster::leader::Leadership;
use crate::domain::command::{CommandKind, CommandState};
use crate::domain::device_message::InvalidDeviceMessage;
use crate::domain::time::{UnixNanos, now_unix_nanos};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::storage::cluster::{SessionOpen, SessionTicket};
use crate::storage::commands::{CommandRecord, EnqueueError};
use crate::storage::{DeviceRecord, StorageError, Store};

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Commands queued or sent but not acknowledged, per device.
    pub max_pending_per_device: u64,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// How often expired commands are swept.
    pub expiry_interval: Duration,
    /// How long a new Control stream may take to send its DeviceHello.
    pub hello_timeout: Duration,
    /// A Control stream ends (UNAVAILABLE, "rebalance") after this, ±10%,
    /// and the device reconnects: long-lived streams would otherwise stay
    /// on the processes that were up when they opened. `None`: never.
    pub max_lifetime: Option<Duration>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            max_pending_per_device: 100,
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            expiry_interval: Duration::from_millis(200),
            hello_timeout: Duration::from_secs(30),
            max_lifetime: Some(Duration::from_secs(45 * 60)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(
        "the device's command queue is full ({0} commands waiting); wait for them or let them expire"
    )]
    QueueFull(u64),
    #[error("ttl is longer than the server's maximum of {0:?}")]
    TtlTooLong(Duration),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a device's Control stream ends, sent to its session.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEnd {
    /// The device opened a newer Control stream (on any server process).
    Superseded,
    /// The stream reached its lifetime (`--control-max-lifetime`), or this
    /// process is handing its streams over: the device reconnects, perhaps
    /// to another process, so streams spread after the fleet scales out.
    Rebalance,
    ShuttingDown,
    /// The device sent a message past the limits; nothing of it was stored.
    Refused(InvalidDeviceMessage),
    /// An operator revoked or disabled what the stream authenticated with.
    CredentialEnded(CredentialEnded),
}

/// One device's current session, so commands can wake it and a newer
/// stream can supersede it.
pub(crate) struct SessionSlot {
    /// Issued by the database: comparable with other processes' streams.
    pub generation: u64,
    pub wake: Arc<Notify>,
    /// Set to end the stream from outside (superseded, rebalanced).
    pub end: watch::Sender<Option<SessionEnd>>,
    /// When the device's last message arrived. The database is refreshed
    /// only every few seconds; the RPCs read the live value from here.
    pub last_seen: Arc<AtomicI64>,
    /// The `last_seen` the database has.
    pub last_seen_stored: UnixNanos,
}

/// How often the `last_seen` of connected devices is written, all devices
/// in one transaction: one write per device per status message would be
/// hundreds of small transactions a second, each waiting its turn at
/// SQLite's one writer with the readings.
pub const LAST_SEEN_WRITE_INTERVAL: Duration = Duration::from_secs(5);

pub struct CommandCenter {
    pub(crate) store: Store,
    pub(crate) config: ControlConfig,
    pub(crate) sessions: Mutex<HashMap<i64, SessionSlot>>,
    /// The newest generation heard of per device from session
    /// notifications: a stream whose open committed just before a newer
    /// one elsewhere may hear of the newer before it is in `sessions`.
    /// One entry per device ever opened (16 bytes each).
    heard: Mutex<HashMap<i64, u64>>,
    /// Opens streams in batches: one notifying commit for many devices
    /// when a fleet reconnects at once.
    opener: mpsc::Sender<Queued<SessionOpen, SessionTicket>>,
    /// Closes streams in batches, as the opener opens them: a fleet that
    /// loses its network closes thousands at once.
    closer: mpsc::Sender<Queued<SessionClose, bool>>,
    /// Only the leader expires commands.
    leadership: Leadership,
    /// Every state change, for `SendCommand` with wait.
    changes: broadcast::Sender<(u64, CommandState)>,
    pub(crate) metrics: Arc<Metrics>,
}

/// Streams opened per transaction; each adds about 16 bytes to the one
/// notification, which stays under PostgreSQL's 8000.
const OPENS_PER_TRANSACTION: usize = 400;

/// How often a sender waiting for a command's outcome reads it from the
/// database, whatever it heard: the outcome may have been committed by a
/// process whose notification was lost.
const WAIT_POLL: Duration = Duration::from_secs(1);

/// How often each process looks for queued commands of the devices it holds,
/// in case a wake-up was lost.
const QUEUED_POLL: Duration = Duration::from_secs(2);

impl CommandCenter {
    /// Starts the expiry sweeper and the session opener, which stop when
    /// `shutdown` turns true. The replica is registered already (see
    /// `cluster::lease::register`).
    pub async fn start(
        store: Store,
        config: ControlConfig,
        replica: Replica,
        leadership: Leadership,
        mut shutdown: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Self>, JoinHandle<()>), StorageError> {
        let (changes, _) = broadcast::channel(4096);
        let (opener, opens) = mpsc::channel(4 * OPENS_PER_TRANSACTION);
        let (closer, closes) = mpsc::channel(4 * OPENS_PER_TRANSACTION);
        let (opening, replica_id) = (store.clone(), replica.id.clone());
        tokio::spawn(in_batches("new", opens, async move |opens| {
            opening.open_sessions(&opens, &replica_id).await
        }));
        let (closing, replica_id) = (store.clone(), replica.id.clone());
        tokio::spawn(in_batches("closed", closes, async move |closes| {
            closing.close_sessions(&closes, &replica_id).await
        }));
        let center = Arc::new(Self {
            store,
            config,
            sessions: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
            opener,
            closer,
            leadership,
            changes,
            metrics,
        });
        let sweeper = {
            let center = center.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(center.config.expiry_interval);
                let mut seen = tokio::time::interval(LAST_SEEN_WRITE_INTERVAL);
                seen.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut queued = tokio::time::interval(QUEUED_POLL);
                queued.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => if center.leadership.is_leader() {
                            center.expire().await;
                        },
                        _ = seen.tick() => {
                            center.write_last_seen().await;
                            center.count_pending().await;
                        }
                        _ = queued.tick(), if center.store.is_shared() => center.wake_queued().await,
                        () = until_set(&mut shutdown) => break,
                    }
                }
            })
        };
        Ok((center, sweeper))
    }

    async fn expire(&self) {
        match self.store.expire_commands(now_unix_nanos()).await {
            Ok(ids) => {
                for id in ids {
                    tracing::info!(command_id = id, "command expired before delivery");
                    self.changed(id, CommandState::Expired);
                }
            }
            Err(error) => tracing::error!(%error, "expiring commands failed"),
        }
    }

    /// Writes the `last_seen` of every session heard from since the last
    /// write. A failure is retried at the next interval.
    async fn write_last_seen(&self) {
        let due: Vec<(i64, UnixNanos)> = self
            .sessions
            .lock()
            .expect("lock poisoned")
            .iter()
            .filter_map(|(&pk, slot)| {
                let seen = slot.last_seen.load(Ordering::Relaxed);
                (seen > slot.last_seen_stored).then_some((pk, seen))
            })
            .collect();
        if due.is_empty() {
            return;
        }
        match self.store.record_last_seen(&due).await {
            Ok(()) => {
                let mut sessions = self.sessions.lock().expect("lock poisoned");
                for (pk, seen) in due {
                    if let Some(slot) = sessions.get_mut(&pk) {
                        slot.last_seen_stored = slot.last_seen_stored.max(seen);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, devices = due.len(), "recording last seen failed; retrying")
            }
        }
    }

    /// Records that a command reached its device at `at`, off the
    /// caller's path: the device need not wait for a commit to hear it.
    /// Should the server stop before this lands, the command is still
    /// queued and is delivered again with the same id, which a device
    /// answers without applying it twice.
    pub fn mark_sent(self: &Arc<Self>, command_id: u64, at: UnixNanos) {
        let center = self.clone();
        tokio::spawn(async move {
            match center.store.mark_command_sent(command_id, at).await {
                Ok(_) => center.changed(command_id, CommandState::Sent),
                Err(error) => {
                    tracing::error!(%error, command_id, "marking a command sent failed")
                }
            }
        });
    }

    pub(crate) fn changed(&self, command_id: u64, state: CommandState) {
        self.metrics
            .commands
            .get_or_create(&OutcomeLabel {
                outcome: state.as_str(),
            })
            .inc();
        let _ = self.changes.send((command_id, state));
    }

    /// `commands_pending`, refreshed with the last-seen writes: a count
    /// across devices the database answers from an index.
    async fn count_pending(&self) {
        // The pool's acquire latency, sampled at the same pace.
        if let Ok(acquired) = self.store.ping().await {
            self.metrics
                .db_pool_acquire_seconds
                .observe(acquired.as_secs_f64());
        }
        match self.store.pending_commands().await {
            Ok(n) => {
                self.metrics.commands_pending.set(n);
            }
            Err(error) => tracing::debug!(%error, "counting pending commands failed"),
        }
    }

    /// `devices_online`: the sessions this server holds.
    pub(crate) fn sessions_changed(&self, sessions: usize) {
        self.metrics.devices_online.set(sessions as i64);
    }

    /// Records a new stream of the device: the database issues its
    /// generation, marks it online and tells the other processes.
    pub(crate) async fn open_session(&self, open: SessionOpen) -> Result<SessionTicket, String> {
        let (reply, ticket) = oneshot::channel();
        self.opener
            .send((open, reply))
            .await
            .map_err(|_| "the server is stopping".to_owned())?;
        ticket
            .await
            .map_err(|_| "the server is stopping".to_owned())?
    }

    /// Records the end of a stream; the device goes offline if it was its
    /// newest (returned).
    pub(crate) async fn close_session(&self, close: SessionClose) -> Result<bool, String> {
        let (reply, closed) = oneshot::channel();
        self.closer
            .send((close, reply))
            .await
            .map_err(|_| "the server is stopping".to_owned())?;
        closed
            .await
            .map_err(|_| "the server is stopping".to_owned())?
    }

    /// Another process (or this one) opened a stream of a device: an older
    /// stream held here ends.
    pub fn opened_elsewhere(&self, ticket: SessionTicket) {
        let sessions = self.sessions.lock().expect("lock poisoned");
        if let Some(slot) = sessions.get(&ticket.device_pk)
            && slot.generation < ticket.generation
        {
            slot.end.send_replace(Some(SessionEnd::Superseded));
        }
        // Also for a stream recorded here but not yet in `sessions`: the
        // news can overtake it (see `newest_heard`). Under the sessions
        // lock, so a stream is either in `sessions` or sees this.
        self.heard
            .lock()
            .expect("lock poisoned")
            .entry(ticket.device_pk)
            .and_modify(|g| *g = (*g).max(ticket.generation))
            .or_insert(ticket.generation);
        drop(sessions);
    }

    /// The newest generation heard of for a device; call with the sessions
    /// lock held. A stream older than it was superseded before it started.
    pub(crate) fn newest_heard(&self, device_pk: i64) -> u64 {
        self.heard
            .lock()
            .expect("lock poisoned")
            .get(&device_pk)
            .copied()
            .unwrap_or(0)
    }

    /// Another process changed a command's state.
    pub fn changed_elsewhere(&self, command_id: u64, state: CommandState) {
        let _ = self.changes.send((command_id, state));
    }

    /// Every stream held here reads its deliverable commands again.
    pub fn wake_all(&self) {
        for slot in self.sessions.lock().expect("lock poisoned").values() {
            slot.wake.notify_one();
        }
    }

    /// Wakes the streams held here whose device has commands queued: a
    /// wake-up from another process may have been lost.
    async fn wake_queued(&self) {
        let held: Vec<i64> = self
            .sessions
            .lock()
            .expect("lock poisoned")
            .keys()
            .copied()
            .collect();
        if held.is_empty() {
            return;
        }
        match self.store.devices_with_queued(&held).await {
            Ok(waiting) => {
                for pk in waiting {
                    self.wake(pk);
                }
            }
            Err(error) => tracing::debug!(%error, "looking for queued commands failed"),
        }
    }

    /// Ends every stream held here; the devices reconnect (to any process).
    pub fn end_all_sessions(&self) {
        for slot in self.sessions.lock().expect("lock poisoned").values() {
            slot.end.send_replace(Some(SessionEnd::Rebalance));
        }
    }

    /// Stores a command and wakes the device's session, if any. With
    /// `wait`, returns once the command is final or the wait runs out.
    pub async fn send(
        &self,
        device_pk: i64,
        kind: CommandKind,
        ttl: Option<Duration>,
        wait: Option<Duration>,
    ) -> Result<CommandRecord, SendError> {
        let ttl = ttl.unwrap_or(self.config.default_ttl);
        if ttl > self.config.max_ttl {
            return Err(SendError::TtlTooLong(self.config.max_ttl));
        }
        // Subscribed before the command exists: no change can slip past.
        let mut changes = self.changes.subscribe();
        let now = now_unix_nanos();
        let expires = now.saturating_add(ttl.as_nanos().min(i64::MAX as u128) as i64);
        let command = self
            .store
            .enqueue_command(
                device_pk,
                &kind,
                now,
                expires,
                self.config.max_pending_per_device,
            )
            .await
            .map_err(|e| match e {
                EnqueueError::QueueFull(n) => SendError::QueueFull(n),
                EnqueueError::Storage(e) => SendError::Storage(e),
            })?;
        self.metrics
            .commands
            .get_or_create(&OutcomeLabel { outcome: "queued" })
            .inc();
        tracing::info!(
            command_id = command.command_id,
            kind = kind.name(),
            "command queued"
        );
        self.wake(device_pk);
        let Some(wait) = wait else { return Ok(command) };
        let id = command.command_id;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let poll = deadline.min(now + WAIT_POLL);
            match tokio::time::timeout_at(poll, changes.recv()).await {
                Ok(Ok((changed, state))) if changed == id && state.is_final() => break,
                Ok(Ok(_)) => {}
                // Missed some changes, or heard nothing for a while (the
                // outcome may come from a process whose notification was
                // lost): the database knows.
                Err(_) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    if self.store.get_command(id).await?.state.is_final() {
                        break;
                    }
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => break,
            }
        }
        Ok(self.store.get_command(id).await?)
    }

    pub(crate) fn wake(&self, device_pk: i64) {
        if let Some(slot) = self.sessions.lock().expect("lock poisoned").get(&device_pk) {
            slot.wake.notify_one();
        }
    }

    /// When a device connected here last sent a message, if it is connected.
    pub fn live_last_seen(&self, device_pk: i64) -> Option<UnixNanos> {
        self.sessions
            .lock()
            .expect("lock poisoned")
            .get(&device_pk)
            .map(|s| s.last_seen.load(Ordering::Relaxed))
    }

    /// A stored device as it is now: online and last seen from its
    /// session, which the database lags by up to the presence interval.
    pub fn with_live_presence(&self, mut device: DeviceRecord) -> DeviceRecord {
        if let Some(seen) = self.live_last_seen(device.pk) {
            device.online = true;
            device.last_seen = Some(device.last_seen.map_or(seen, |stored| stored.max(seen)));
        }
        device
    }

    pub fn is_online(&self, device_pk: i64) -> bool {
        self.sessions
            .lock()
            .expect("lock poisoned")
            .contains_key(&device_pk)
    }
}

/// A request to the opener or the closer, and where its answer goes.
type Queued<T, R> = (T, oneshot::Sender<Result<R, String>>);

/// Records queued stream opens or closes, as many per transaction as are
/// waiting: `record` answers each of a batch, in order.
async fn in_batches<T, R>(
    what: &'static str,
    mut queue: mpsc::Receiver<Queued<T, R>>,
    record: impl AsyncFn(Vec<T>) -> Result<Vec<R>, StorageError>,
) {
    let mut batch = Vec::with_capacity(OPENS_PER_TRANSACTION);
    while queue.recv_many(&mut batch, OPENS_PER_TRANSACTION).await > 0 {
        let (asked, replies): (Vec<T>, Vec<_>) = batch.drain(..).unzip();
        let streams = asked.len();
        match record(asked).await {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(error) => {
                tracing::error!(%error, streams, "recording {what} Control streams failed");
                for reply in replies {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
        }
    }
}

/// A stream that ended, and when.
pub(crate) type SessionClose = (SessionTicket, UnixNanos);

/// Resolves once the flag turns true: the server is shutting down, or a
/// session is superseded. (The guard `wait_for` returns must not live
/// across an await, so it is dropped here.)
pub(crate) async fn until_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}
