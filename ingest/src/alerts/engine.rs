//! The alert engine: one task that owns the rules and every (rule, device)
//! state, so judging needs no locks, and that is the only writer of alert
//! events, so event ids are committed in the order they are published.
//!
//! Upload streams hand it each committed batch and wait for its answer
//! before sending their summary: an alert caused by a batch is recorded
//! before the device learns the batch is stored. Inactivity is judged on a
//! timer, on the server's clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::domain::alert::{Condition, Memory, Rule, RuleId, Verdict};
use crate::domain::reading::SeriesRows;
use crate::domain::time::now_unix_nanos;
use crate::domain::{DeviceId, Labels};
use crate::storage::alerts::{AlertEventRecord, AlertRecord, EventKind, NewAlertEvent};
use crate::storage::{StorageError, Store};

/// Why an engine request failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no such rule")]
    NoRule,
    #[error("no such alert")]
    NoAlert,
    #[error("the alert is already resolved")]
    Resolved,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the alert engine has stopped")]
    Stopped,
}

/// How often silences are checked: the lateness of an inactivity alert.
const INACTIVITY_TICK: Duration = Duration::from_millis(100);

enum Request {
    Readings {
        device_pk: i64,
        series: Vec<SeriesRows>,
        done: oneshot::Sender<()>,
    },
    PutRule {
        rule: Rule,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    DeleteRule {
        id: RuleId,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Ack {
        alert_id: u64,
        reply: oneshot::Sender<Result<AlertRecord, EngineError>>,
    },
    DeviceRegistered {
        pk: i64,
        id: DeviceId,
        labels: Labels,
    },
}

/// The way to the engine, cloned wherever needed.
#[derive(Clone)]
pub struct AlertEngine {
    tx: mpsc::Sender<Request>,
    events: broadcast::Sender<Arc<AlertEventRecord>>,
    /// Lets ingest skip the engine entirely while there are no rules.
    has_rules: Arc<AtomicBool>,
}

impl AlertEngine {
    /// Loads rules, devices and open alerts, then starts the engine.
    pub async fn start(
        store: Store,
        queue: usize,
        live_buffer: usize,
    ) -> Result<(Self, JoinHandle<()>), StorageError> {
        let rules = store.list_rules().await?;
        let devices = store
            .all_devices()
            .await?
            .into_iter()
            .map(|d| (d.pk, (d.id, d.labels)))
            .collect();
        let mut open = HashMap::new();
        for alert in store.list_alerts(false, &[], u32::MAX).await? {
            let Ok(rule) = RuleId::parse(&alert.rule_id) else {
                continue;
            };
            open.insert((rule, alert.device_pk), alert.alert_id);
        }
        let (tx, rx) = mpsc::channel(queue.max(1));
        let (events, _) = broadcast::channel(live_buffer.max(1));
        let now = Instant::now();
        let has_rules = Arc::new(AtomicBool::new(!rules.is_empty()));
        let state = State {
            has_rules: has_rules.clone(),
            store,
            rules: rules
                .into_iter()
                .map(|r| (r.id.clone(), RuleEntry::new(r, now)))
                .collect(),
            devices,
            open,
            events: events.clone(),
        };
        let task = tokio::spawn(state.run(rx));
        Ok((
            Self {
                tx,
                events,
                has_rules,
            },
            task,
        ))
    }

    pub fn has_rules(&self) -> bool {
        self.has_rules.load(Ordering::Acquire)
    }

    /// Judges a committed batch; resolves once its events are recorded.
    pub async fn readings(
        &self,
        device_pk: i64,
        series: Vec<SeriesRows>,
    ) -> Result<oneshot::Receiver<()>, EngineError> {
        let (done, rx) = oneshot::channel();
        self.send(Request::Readings {
            device_pk,
            series,
            done,
        })
        .await?;
        Ok(rx)
    }

    pub async fn put_rule(&self, rule: Rule) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::PutRule { rule, reply }).await?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    pub async fn delete_rule(&self, id: RuleId) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::DeleteRule { id, reply }).await?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    pub async fn ack(&self, alert_id: u64) -> Result<AlertRecord, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Ack { alert_id, reply }).await?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    pub async fn device_registered(&self, pk: i64, id: DeviceId, labels: Labels) {
        let _ = self
            .send(Request::DeviceRegistered { pk, id, labels })
            .await;
    }

    /// Live events, from now on. Subscribe before reading stored events, so
    /// that nothing falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AlertEventRecord>> {
        self.events.subscribe()
    }

    async fn send(&self, request: Request) -> Result<(), EngineError> {
        self.tx
            .send(request)
            .await
            .map_err(|_| EngineError::Stopped)
    }
}

struct RuleEntry {
    rule: Rule,
    /// Per device: what the condition remembers, and when the device last
    /// sent a matching reading (inactivity), on the server's clock.
    devices: HashMap<i64, DeviceState>,
    /// When the rule started watching: the silence of a device that never
    /// sent anything counts from here.
    since: Instant,
}

struct DeviceState {
    memory: Memory,
    last_seen: Instant,
}

impl RuleEntry {
    fn new(rule: Rule, since: Instant) -> Self {
        Self {
            rule,
            devices: HashMap::new(),
            since,
        }
    }
}

type AlertKey = (RuleId, i64);

struct State {
    has_rules: Arc<AtomicBool>,
    store: Store,
    rules: HashMap<RuleId, RuleEntry>,
    devices: HashMap<i64, (DeviceId, Labels)>,
    /// Open alerts by (rule, device).
    open: HashMap<AlertKey, u64>,
    events: broadcast::Sender<Arc<AlertEventRecord>>,
}

impl State {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut tick = tokio::time::interval(INACTIVITY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                request = rx.recv() => match request {
                    Some(request) => self.handle(request).await,
                    None => break,
                },
                _ = tick.tick() => {
                    let events = self.silences(Instant::now());
                    self.record(events).await;
                }
            }
        }
        tracing::debug!("alert engine stopped");
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Readings {
                device_pk,
                series,
                done,
            } => {
                let events = self.judge(device_pk, &series).await;
                self.record(events).await;
                let _ = done.send(());
            }
            Request::PutRule { rule, reply } => {
                let _ = reply.send(self.put_rule(rule).await);
            }
            Request::DeleteRule { id, reply } => {
                let _ = reply.send(self.delete_rule(&id).await);
            }
            Request::Ack { alert_id, reply } => {
                let _ = reply.send(self.ack(alert_id).await);
            }
            Request::DeviceRegistered { pk, id, labels } => {
                self.devices.insert(pk, (id, labels));
            }
        }
    }

    async fn device(&mut self, pk: i64) -> Option<(DeviceId, Labels)> {
        if let Some(d) = self.devices.get(&pk) {
            return Some(d.clone());
        }
        // Registered by another server process sharing the database.
        match self.store.all_devices().await {
            Ok(all) => {
                for d in all {
                    self.devices.insert(d.pk, (d.id, d.labels));
                }
            }
            Err(error) => tracing::error!(%error, "alert engine cannot load devices"),
        }
        self.devices.get(&pk).cloned()
    }

    /// Judges a batch against every rule that selects its device.
    async fn judge(&mut self, device_pk: i64, series: &[SeriesRows]) -> Vec<NewAlertEvent> {
        if self.rules.is_empty() {
            return Vec::new();
        }
        let Some((device_id, labels)) = self.device(device_pk).await else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut events = Vec::new();
        // Open/closed as of this batch's earlier readings, ahead of `open`.
        let mut judged: HashMap<AlertKey, Option<u64>> = HashMap::new();
        for entry in self.rules.values_mut() {
            let rule = &entry.rule;
            if !rule.devices.matches(&device_id, &labels) {
                continue;
            }
            for s in series {
                if rule.sensor.as_ref().is_some_and(|want| *want != s.sensor) {
                    continue;
                }
                let key = (rule.id.clone(), device_pk);
                let state = entry
                    .devices
                    .entry(device_pk)
                    .or_insert_with(|| DeviceState {
                        memory: Memory::default(),
                        last_seen: now,
                    });
                state.last_seen = now;
                let mut open = match judged.get(&key) {
                    Some(&open) => open,
                    None => self.open.get(&key).copied(),
                };
                for (&time, &value) in s.times.iter().zip(&s.values) {
                    let Some(verdict) =
                        rule.condition
                            .judge(&mut state.memory, open.is_some(), time, value)
                    else {
                        continue;
                    };
                    let (kind, value, time, message) = match verdict {
                        Verdict::Fire {
                            value,
                            time,
                            message,
                        } => (EventKind::Fired, value, time, message),
                        Verdict::Resolve {
                            value,
                            time,
                            message,
                        } => (EventKind::Resolved, value, time, message),
                    };
                    events.push(NewAlertEvent {
                        kind,
                        alert_id: open,
                        rule_id: rule.id.clone(),
                        device_pk,
                        device_id: device_id.clone(),
                        sensor: s.sensor.as_str().to_owned(),
                        severity: rule.severity,
                        value,
                        time,
                        message,
                    });
                    // The alert id of a FIRED event is known once recorded;
                    // meanwhile a marker keeps the judging consistent.
                    open = match kind {
                        EventKind::Fired => Some(PENDING),
                        _ => None,
                    };
                }
                judged.insert(key, open);
            }
        }
        events
    }

    /// Inactivity rules whose devices have been silent too long.
    fn silences(&mut self, now: Instant) -> Vec<NewAlertEvent> {
        let mut events = Vec::new();
        for entry in self.rules.values() {
            let Condition::Inactivity { silence } = entry.rule.condition else {
                continue;
            };
            for (&pk, (device_id, labels)) in &self.devices {
                if !entry.rule.devices.matches(device_id, labels) {
                    continue;
                }
                let key = (entry.rule.id.clone(), pk);
                if self.open.contains_key(&key) {
                    continue;
                }
                let last = entry.devices.get(&pk).map_or(entry.since, |d| d.last_seen);
                let quiet = now.saturating_duration_since(last);
                if quiet < silence {
                    continue;
                }
                let what = entry
                    .rule
                    .sensor
                    .as_ref()
                    .map_or("any sensor".to_owned(), |s| s.to_string());
                events.push(NewAlertEvent {
                    kind: EventKind::Fired,
                    alert_id: None,
                    rule_id: entry.rule.id.clone(),
                    device_pk: pk,
                    device_id: device_id.clone(),
                    sensor: entry
                        .rule
                        .sensor
                        .as_ref()
                        .map_or(String::new(), |s| s.as_str().to_owned()),
                    severity: entry.rule.severity,
                    value: None,
                    time: now_unix_nanos(),
                    message: format!(
                        "no reading of {what} for {}",
                        humantime::format_duration(round_ms(quiet))
                    ),
                });
            }
        }
        events
    }

    /// Records events, then publishes them, then updates the open alerts.
    /// If recording fails nothing changes, so the next reading (or tick)
    /// judges again.
    async fn record(&mut self, mut events: Vec<NewAlertEvent>) {
        if events.is_empty() {
            return;
        }
        // A FIRED followed by RESOLVED in the same batch: the RESOLVED needs
        // the id the FIRED creates, so record one event at a time there.
        let chained = events.iter().any(|e| e.alert_id == Some(PENDING));
        let recorded = if chained {
            let mut all = Vec::with_capacity(events.len());
            let mut fired: HashMap<AlertKey, u64> = HashMap::new();
            for mut e in events.drain(..) {
                if e.alert_id == Some(PENDING) {
                    e.alert_id = fired.get(&(e.rule_id.clone(), e.device_pk)).copied();
                }
                match self
                    .store
                    .record_alert_events(std::slice::from_ref(&e), now_unix_nanos())
                    .await
                {
                    Ok(mut r) => {
                        let r = r.remove(0);
                        if e.kind == EventKind::Fired {
                            fired.insert((e.rule_id.clone(), e.device_pk), r.alert_id);
                        }
                        self.apply(&e, &r);
                        all.push(r);
                    }
                    Err(error) => {
                        tracing::error!(%error, "recording alert events failed");
                        break;
                    }
                }
            }
            all
        } else {
            match self
                .store
                .record_alert_events(&events, now_unix_nanos())
                .await
            {
                Ok(r) => {
                    for (e, r) in events.iter().zip(&r) {
                        self.apply(e, r);
                    }
                    r
                }
                Err(error) => {
                    tracing::error!(%error, "recording alert events failed");
                    return;
                }
            }
        };
        for event in recorded {
            tracing::info!(
                event_id = event.event_id,
                kind = event.kind.as_str(),
                alert_id = event.alert_id,
                rule = %event.rule_id,
                device = %event.device_id,
                "alert event"
            );
            // No receiver is fine: watchers catch up from the database.
            let _ = self.events.send(Arc::new(event));
        }
    }

    fn apply(&mut self, e: &NewAlertEvent, r: &AlertEventRecord) {
        let key = (e.rule_id.clone(), e.device_pk);
        match e.kind {
            EventKind::Fired => {
                self.open.insert(key, r.alert_id);
            }
            EventKind::Resolved => {
                self.open.remove(&key);
            }
            EventKind::Acked => {}
        }
    }

    async fn put_rule(&mut self, rule: Rule) -> Result<(), EngineError> {
        self.store.put_rule(&rule, now_unix_nanos()).await?;
        // Alerts of devices the new version no longer selects are over.
        let mut events = Vec::new();
        for ((rule_id, pk), &alert_id) in &self.open {
            if *rule_id != rule.id {
                continue;
            }
            let still = self
                .devices
                .get(pk)
                .is_some_and(|(id, labels)| rule.devices.matches(id, labels));
            if !still {
                events.push(self.closing_event(
                    rule_id,
                    *pk,
                    alert_id,
                    &rule,
                    "the rule no longer selects this device",
                ));
            }
        }
        let now = Instant::now();
        let entry = self
            .rules
            .entry(rule.id.clone())
            .or_insert_with(|| RuleEntry::new(rule.clone(), now));
        entry.rule = rule;
        for state in entry.devices.values_mut() {
            state.memory = Memory::default();
        }
        self.has_rules.store(true, Ordering::Release);
        self.record(events.into_iter().flatten().collect()).await;
        Ok(())
    }

    async fn delete_rule(&mut self, id: &RuleId) -> Result<(), EngineError> {
        if !self.store.delete_rule(id).await? {
            return Err(EngineError::NoRule);
        }
        let removed = self.rules.remove(id);
        self.has_rules
            .store(!self.rules.is_empty(), Ordering::Release);
        let Some(entry) = removed else { return Ok(()) };
        let events = self
            .open
            .iter()
            .filter(|((rule_id, _), _)| rule_id == id)
            .filter_map(|((rule_id, pk), &alert_id)| {
                self.closing_event(rule_id, *pk, alert_id, &entry.rule, "the rule was deleted")
            })
            .collect();
        self.record(events).await;
        Ok(())
    }

    fn closing_event(
        &self,
        rule_id: &RuleId,
        pk: i64,
        alert_id: u64,
        rule: &Rule,
        why: &str,
    ) -> Option<NewAlertEvent> {
        let (device_id, _) = self.devices.get(&pk)?;
        Some(NewAlertEvent {
            kind: EventKind::Resolved,
            alert_id: Some(alert_id),
            rule_id: rule_id.clone(),
            device_pk: pk,
            device_id: device_id.clone(),
            sensor: rule
                .sensor
                .as_ref()
                .map_or(String::new(), |s| s.as_str().to_owned()),
            severity: rule.severity,
            value: None,
            time: now_unix_nanos(),
            message: why.to_owned(),
        })
    }

    async fn ack(&mut self, alert_id: u64) -> Result<AlertRecord, EngineError> {
        let alert = self.store.get_alert(alert_id).await.map_err(|e| match e {
            StorageError::NotFound => EngineError::NoAlert,
            other => other.into(),
        })?;
        if !alert.is_open() {
            return Err(EngineError::Resolved);
        }
        if alert.acked_time.is_some() {
            return Ok(alert);
        }
        let Ok(rule_id) = RuleId::parse(&alert.rule_id) else {
            return Err(StorageError::Corrupt(format!("rule id {:?}", alert.rule_id)).into());
        };
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
        let recorded = self
            .store
            .record_alert_events(std::slice::from_ref(&event), now_unix_nanos())
            .await?;
        for r in recorded {
            let _ = self.events.send(Arc::new(r));
        }
        Ok(self.store.get_alert(alert_id).await?)
    }
}

/// Marks "fired earlier in this batch, id not known yet".
const PENDING: u64 = u64::MAX;

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
