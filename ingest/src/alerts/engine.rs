//! The alert engine: the rules, the fleet as rules see it, and the feed of
//! recorded events.
//!
//! Judging is not done here: each group-commit writer judges its own
//! devices' batches inside the transaction that stores them
//! ([`super::judge`]), so an event exists exactly when its reading does.
//! What is left here is what all writers share, and the operator's actions
//! (rule changes, acks), which record their events in their own
//! transactions through the same storage function.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock as SyncRwLock};
use std::time::Instant;

use tokio::sync::{Notify, OwnedRwLockReadGuard, RwLock, broadcast, watch};
use tokio::task::JoinHandle;

use super::feed;
use crate::cluster::leader::Leadership;
use crate::domain::alert::{DeviceSelector, Rule, RuleId};
use crate::domain::time::{UnixNanos, now_unix_nanos};
use crate::domain::{DeviceId, Labels};
use crate::metrics::Metrics;
use crate::storage::alerts::{
    AlertEventRecord, AlertRecord, EventKind, EventOutcome, NewAlertEvent,
};
use crate::storage::cluster::channel;
use crate::storage::{StorageError, Store};

/// Why an engine request failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no alert rule `{0}`")]
    NoRule(RuleId),
    #[error("no alert {0}")]
    NoAlert(u64),
    #[error("the alert is already resolved")]
    Resolved,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the alert engine has stopped")]
    Stopped,
}

/// The rules in force. Writers hold it for reading from judging a group to
/// its commit; a rule change takes it for writing, so a group is judged
/// wholly under the old rules or wholly under the new.
#[derive(Debug, Default)]
pub struct RuleBook {
    /// Bumped by every change: judged state of an older epoch is reloaded.
    pub epoch: u64,
    pub rules: BTreeMap<RuleId, RuleEntry>,
}

#[derive(Debug)]
pub struct RuleEntry {
    pub rule: Rule,
    /// When the rule started watching in this process: a silence counts
    /// from here at the earliest.
    pub since: Instant,
    /// What `since` was: the rule's creation, or this server's start for a
    /// rule it found stored.
    pub since_what: SilenceStart,
}

/// What a silence is measured from: the latest of these, named in the
/// alert's message so an operator can tell a device that went quiet from
/// one that never spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SilenceStart {
    ServerStarted,
    RuleCreated,
    DeviceRegistered,
    LastReading,
}

impl std::fmt::Display for SilenceStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ServerStarted => "since the server started",
            Self::RuleCreated => "since the rule was created",
            Self::DeviceRegistered => "since the device registered",
            Self::LastReading => "since its last reading",
        })
    }
}

/// What a rule needs to know of a device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub id: DeviceId,
    pub labels: Labels,
    /// When the device was registered, on this process's clock; `None` if
    /// before the clock's origin (long before this server started).
    pub registered: Option<Instant>,
}

impl DeviceInfo {
    fn new(id: DeviceId, labels: Labels, created: UnixNanos) -> Self {
        // The stored time is the wall clock; silences are judged on the
        // monotonic one, so translate by the age of the registration.
        let age = now_unix_nanos().saturating_sub(created).max(0) as u64;
        Self {
            id,
            labels,
            registered: Instant::now().checked_sub(std::time::Duration::from_nanos(age)),
        }
    }
}

/// The way to the engine, cloned wherever needed.
#[derive(Clone)]
pub struct AlertEngine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    rules: Arc<RwLock<RuleBook>>,
    /// Never held across an await: registrations must not wait for a commit.
    devices: SyncRwLock<HashMap<i64, DeviceInfo>>,
    events: broadcast::Sender<Arc<AlertEventRecord>>,
    /// Rung after every commit that recorded events; wakes the feed.
    recorded: Arc<Notify>,
    /// Only the leader judges silences (see `cluster::leader`).
    leadership: Leadership,
    metrics: Arc<Metrics>,
}

impl AlertEngine {
    /// Loads rules and devices, then starts the feed that publishes
    /// recorded events until `stopping` turns true.
    pub async fn start(
        store: Store,
        live_buffer: usize,
        stopping: watch::Receiver<bool>,
        leadership: Leadership,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, JoinHandle<()>), StorageError> {
        let now = Instant::now();
        let rules = store
            .list_rules()
            .await?
            .into_iter()
            .map(|rule| {
                let entry = RuleEntry {
                    rule,
                    since: now,
                    since_what: SilenceStart::ServerStarted,
                };
                (entry.rule.id.clone(), entry)
            })
            .collect();
        let devices = load_devices(&store).await?;
        let (events, _) = broadcast::channel(live_buffer.max(1));
        let recorded = Arc::new(Notify::new());
        let task = tokio::spawn(feed::run(
            store.clone(),
            events.clone(),
            recorded.clone(),
            store.last_event_id().await?,
            stopping,
            metrics.clone(),
        ));
        let inner = Inner {
            store,
            rules: Arc::new(RwLock::new(RuleBook { epoch: 1, rules })),
            devices: SyncRwLock::new(devices),
            events,
            recorded,
            leadership,
            metrics,
        };
        Ok((
            Self {
                inner: Arc::new(inner),
            },
            task,
        ))
    }

    /// The rules, held until the guard drops (see [`RuleBook`]).
    pub async fn rules(&self) -> OwnedRwLockReadGuard<RuleBook> {
        self.inner.rules.clone().read_owned().await
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Whether this process judges silences now.
    pub fn judges_silences(&self) -> bool {
        self.inner.leadership.is_leader()
    }

    /// Reads the rules again after another server process changed them.
    /// A new epoch only if they differ, so hearing of this process's own
    /// change costs nothing.
    pub async fn reload_rules(&self) -> Result<(), StorageError> {
        // Read under the lock: a change of this process committing
        // meanwhile is then either in both or in neither.
        let mut book = self.inner.rules.write().await;
        let stored = self.inner.store.list_rules().await?;
        let same = stored.len() == book.rules.len()
            && stored
                .iter()
                .all(|r| book.rules.get(&r.id).is_some_and(|e| e.rule == *r));
        if same {
            return Ok(());
        }
        let now = Instant::now();
        let rules = stored
            .into_iter()
            .map(|rule| {
                let (since, since_what) = book
                    .rules
                    .get(&rule.id)
                    .map_or((now, SilenceStart::RuleCreated), |e| {
                        (e.since, e.since_what)
                    });
                let entry = RuleEntry {
                    rule,
                    since,
                    since_what,
                };
                (entry.rule.id.clone(), entry)
            })
            .collect();
        book.rules = rules;
        book.epoch += 1;
        tracing::info!(
            rules = book.rules.len(),
            "rules changed on another server process; reloaded"
        );
        Ok(())
    }

    /// Tells the other server processes that the rules changed.
    async fn rules_changed(&self) {
        if let Err(error) = self.inner.store.notify(channel::RULES, "").await {
            tracing::error!(%error, "could not tell the other server processes of a rule change");
        }
    }

    /// Tells the feed that a transaction recording events has committed.
    pub fn recorded(&self) {
        self.inner.recorded.notify_one();
    }

    /// A device as rules see it; looked up in the database if it was
    /// registered by another server process sharing it.
    pub async fn device(&self, pk: i64) -> Option<DeviceInfo> {
        if let Some(d) = self.known_device(pk) {
            return Some(d);
        }
        match load_devices(&self.inner.store).await {
            Ok(all) => *self.inner.devices.write().expect("not poisoned") = all,
            Err(error) => tracing::error!(%error, "alert engine cannot load devices"),
        }
        self.known_device(pk)
    }

    fn known_device(&self, pk: i64) -> Option<DeviceInfo> {
        self.inner
            .devices
            .read()
            .expect("not poisoned")
            .get(&pk)
            .cloned()
    }

    /// Every known device the filter keeps, for judging silences.
    pub fn devices_where(&self, keep: impl Fn(i64) -> bool) -> Vec<(i64, DeviceInfo)> {
        self.inner
            .devices
            .read()
            .expect("not poisoned")
            .iter()
            .filter(|(pk, _)| keep(**pk))
            .map(|(pk, d)| (*pk, d.clone()))
            .collect()
    }

    pub async fn device_registered(
        &self,
        pk: i64,
        id: DeviceId,
        labels: Labels,
        created: UnixNanos,
    ) {
        self.inner
            .devices
            .write()
            .expect("not poisoned")
            .insert(pk, DeviceInfo::new(id, labels, created));
    }

    /// RESOLVED events for the open alerts of `rule` whose device `closes`.
    async fn closing_events(
        &self,
        rule: &Rule,
        reason: &str,
        closes: impl Fn(&DeviceInfo) -> bool,
    ) -> Result<Vec<NewAlertEvent>, EngineError> {
        let mut closing = Vec::new();
        for (alert_id, pk) in self.inner.store.open_alerts_of_rule(&rule.id).await? {
            if let Some(device) = self.device(pk).await.filter(|d| closes(d)) {
                closing.push(closing_event(rule, pk, device.id, alert_id, reason));
            }
        }
        Ok(closing)
    }

    /// Creates or replaces a rule. Alerts of devices the new version no
    /// longer selects are resolved in the same transaction. Returns
    /// warnings about what was accepted but looks mistaken (see
    /// [`Self::rule_warnings`]).
    pub async fn put_rule(&self, rule: Rule) -> Result<Vec<String>, EngineError> {
        let warnings = self.rule_warnings(&rule).await?;
        let mut book = self.inner.rules.write().await;
        let closing = self
            .closing_events(&rule, "the rule no longer selects this device", |d| {
                !rule.devices.matches(&d.id, &d.labels)
            })
            .await?;
        let outcomes = self
            .inner
            .store
            .put_rule(&rule, &closing, now_unix_nanos())
            .await?;
        // A changed rule keeps watching from when it first did.
        let (since, since_what) = book.rules.get(&rule.id).map_or_else(
            || (Instant::now(), SilenceStart::RuleCreated),
            |e| (e.since, e.since_what),
        );
        book.epoch += 1;
        book.rules.insert(
            rule.id.clone(),
            RuleEntry {
                rule,
                since,
                since_what,
            },
        );
        drop(book);
        self.after(&outcomes);
        self.rules_changed().await;
        Ok(warnings)
    }

    /// A rule listing device ids that are not registered is kept (the
    /// devices may come later), but a typo would otherwise watch nothing in
    /// silence: say which ids are unknown, in the answer and the log.
    async fn rule_warnings(&self, rule: &Rule) -> Result<Vec<String>, StorageError> {
        let DeviceSelector::Ids(ids) = &rule.devices else {
            return Ok(Vec::new());
        };
        let known: HashSet<String> = self
            .inner
            .devices
            .read()
            .expect("not poisoned")
            .values()
            .map(|d| d.id.as_str().to_owned())
            .collect();
        let mut unknown = Vec::new();
        // Devices registered by another server process are not in memory
        // yet: the database decides.
        for id in ids.iter().filter(|id| !known.contains(*id)) {
            let registered = match DeviceId::parse(id) {
                Ok(id) => match self.inner.store.get_device(&id).await {
                    Ok(_) => true,
                    Err(StorageError::NotFound) => false,
                    Err(e) => return Err(e),
                },
                Err(_) => false,
            };
            if !registered {
                unknown.push(id.as_str());
            }
        }
        if unknown.is_empty() {
            return Ok(Vec::new());
        }
        let unknown = unknown.join(", ");
        tracing::warn!(rule = %rule.id, devices = %unknown, "alert rule lists devices that are not registered");
        Ok(vec![format!(
            "rule `{}` lists devices that are not registered: {unknown}; it is stored and applies to them once they register (see `ingest devices list`)",
            rule.id
        )])
    }

    /// Deletes a rule and resolves its open alerts, in one transaction.
    pub async fn delete_rule(&self, id: RuleId) -> Result<(), EngineError> {
        let mut book = self.inner.rules.write().await;
        let stored = self.inner.store.list_rules().await?;
        let Some(rule) = stored.into_iter().find(|r| r.id == id) else {
            return Err(EngineError::NoRule(id));
        };
        let closing = self
            .closing_events(&rule, "the rule was deleted", |_| true)
            .await?;
        let outcomes = self
            .inner
            .store
            .delete_rule(&id, &closing, now_unix_nanos())
            .await?
            .ok_or_else(|| EngineError::NoRule(id.clone()))?;
        book.epoch += 1;
        book.rules.remove(&id);
        drop(book);
        self.after(&outcomes);
        self.rules_changed().await;
        Ok(())
    }

    pub async fn ack(&self, alert_id: u64) -> Result<AlertRecord, EngineError> {
        let store = &self.inner.store;
        let alert = store.get_alert(alert_id).await.map_err(|e| match e {
            StorageError::NotFound => EngineError::NoAlert(alert_id),
            other => other.into(),
        })?;
        if !alert.is_open() {
            return Err(EngineError::Resolved);
        }
        if alert.acked_time.is_some() {
            return Ok(alert);
        }
        let rule_id = RuleId::parse(&alert.rule_id)
            .map_err(|_| StorageError::Corrupt(format!("rule id {:?}", alert.rule_id)))?;
        let device_id =
            DeviceId::parse(&alert.device_id).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let event = NewAlertEvent {
            kind: EventKind::Acked,
            alert_id: Some(alert_id),
            rule_id,
            device_pk: alert.device_pk,
            device_id,
            sensor: alert.sensor.clone(),
            severity: alert.severity,
            value: None,
            time: now_unix_nanos(),
            message: "acknowledged by an operator".to_owned(),
        };
        let outcomes = store
            .record_alert_events(std::slice::from_ref(&event), now_unix_nanos())
            .await?;
        self.after(&outcomes);
        let alert = store.get_alert(alert_id).await?;
        // Skipped: resolved (or acknowledged) between the read and the write.
        if !alert.is_open() && alert.acked_time.is_none() {
            return Err(EngineError::Resolved);
        }
        Ok(alert)
    }

    /// Live events, from now on, in id order with no gap. Subscribe before
    /// reading stored events, so that nothing falls between the two.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AlertEventRecord>> {
        self.inner.events.subscribe()
    }

    fn after(&self, outcomes: &[EventOutcome]) {
        if outcomes
            .iter()
            .any(|o| matches!(o, EventOutcome::Recorded(_)))
        {
            self.recorded();
        }
    }
}

fn closing_event(
    rule: &Rule,
    pk: i64,
    device_id: DeviceId,
    alert_id: u64,
    why: &str,
) -> NewAlertEvent {
    NewAlertEvent::of_rule(
        EventKind::Resolved,
        Some(alert_id),
        rule,
        pk,
        device_id,
        why.to_owned(),
    )
}

async fn load_devices(store: &Store) -> Result<HashMap<i64, DeviceInfo>, StorageError> {
    Ok(store
        .all_devices()
        .await?
        .into_iter()
        .map(|d| (d.pk, DeviceInfo::new(d.id, d.labels, d.created)))
        .collect())
}
