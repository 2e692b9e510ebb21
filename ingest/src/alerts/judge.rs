//! Judging inside the group commit: each writer owns the alert state of its
//! devices and judges their batches in the transaction that stores them.
//!
//! The state a rule keeps per device (open alert, hold start, previous
//! reading) can always be rebuilt from the database: open alerts are rows
//! of `alerts`, hold starts rows of `alert_pending` (both written in the
//! same transaction as the readings), the previous reading is the newest
//! stored one. What a writer keeps in memory is a cache of it, valid for
//! one committed sequence of the device and one rules epoch. The device's
//! row is locked by the group before judging, so if anything else committed
//! for it meanwhile (a lost commit outcome, a restart, another process) the
//! sequence read differs and the state is rebuilt first.
//!
//! Judging works on copies; they replace the cache only once the group has
//! committed. A group that fails leaves the cache as it was, true for the
//! unchanged database, and the device's resent batches are judged the same
//! way again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::AlertEngine;
use super::engine::{DeviceInfo, RuleBook, RuleEntry, SilenceStart};
use crate::domain::alert::{Condition, Memory, Rule, RuleId, Verdict};
use crate::domain::reading::SeriesRows;
use crate::storage::GroupTx;
use crate::storage::alerts::{
    EventKind, EventOutcome, FIRED_EARLIER, NewAlertEvent, PendingChange,
};

/// One writer's judge.
pub struct Judge {
    engine: AlertEngine,
    owns: fn(i64, usize, usize) -> bool,
    shard: usize,
    shards: usize,
    devices: HashMap<i64, DeviceAlerts>,
}

#[derive(Debug, Clone, Default)]
struct DeviceAlerts {
    /// The rules epoch `rules` was built for.
    epoch: u64,
    /// The device's committed sequence the state is true for; `None` while
    /// only what silences needed is known.
    judged_at: Option<u64>,
    /// The rules selecting the device (all of them once judged).
    rules: BTreeMap<RuleId, RuleState>,
    /// When matching readings of each rule were last committed, on the
    /// server's clock (inactivity). Not stored: a restart starts silences
    /// afresh, as a new rule does.
    seen: HashMap<RuleId, Instant>,
}

#[derive(Debug, Clone, Default)]
struct RuleState {
    memory: Memory,
    open: Option<u64>,
}

/// What judging a group concluded, to be written in its transaction and
/// applied once it commits.
#[derive(Debug, Default)]
pub struct Verdicts {
    pub events: Vec<NewAlertEvent>,
    pub holds: Vec<PendingChange>,
    states: HashMap<i64, DeviceAlerts>,
}

/// One committed batch of a group, in group order.
pub struct JudgedBatch<'a> {
    pub device_pk: i64,
    pub series: &'a [SeriesRows],
}

impl Judge {
    /// The judge of one writer, for the devices that writer owns.
    pub fn new(
        engine: AlertEngine,
        owns: fn(i64, usize, usize) -> bool,
        shard: usize,
        shards: usize,
    ) -> Self {
        Self {
            engine,
            owns,
            shard,
            shards,
            devices: HashMap::new(),
        }
    }

    pub fn engine(&self) -> &AlertEngine {
        &self.engine
    }

    /// Judges a group's committed batches. `stored` holds each device's
    /// committed sequence as read (and locked) by the group before its
    /// batches.
    pub(crate) async fn judge_group<T: GroupTx>(
        &mut self,
        book: &RuleBook,
        tx: &mut T,
        batches: &[JudgedBatch<'_>],
        stored: &HashMap<i64, u64>,
    ) -> Result<Verdicts, sqlx::Error> {
        let mut verdicts = Verdicts::default();
        if book.rules.is_empty() || batches.is_empty() {
            return Ok(verdicts);
        }
        let mut pks: Vec<i64> = batches.iter().map(|b| b.device_pk).collect();
        pks.sort_unstable();
        pks.dedup();
        let (mut current, stale): (Vec<i64>, Vec<i64>) = pks.into_iter().partition(|pk| {
            self.devices.get(pk).is_some_and(|d| {
                d.epoch == book.epoch
                    && d.judged_at.is_some()
                    && d.judged_at == stored.get(pk).copied()
            })
        });
        let mut states: HashMap<i64, DeviceAlerts> = current
            .drain(..)
            .filter_map(|pk| self.devices.get(&pk).map(|d| (pk, d.clone())))
            .collect();
        if !stale.is_empty() {
            states.extend(self.reload(book, tx, &stale).await?);
        }
        let before: HashMap<(i64, RuleId), Option<i64>> = states
            .iter()
            .flat_map(|(pk, d)| {
                d.rules
                    .iter()
                    .map(move |(id, r)| ((*pk, id.clone()), r.memory.pending_since()))
            })
            .collect();

        let now = Instant::now();
        let mut infos: HashMap<i64, Option<DeviceInfo>> = HashMap::new();
        for batch in batches {
            let pk = batch.device_pk;
            if let std::collections::hash_map::Entry::Vacant(e) = infos.entry(pk) {
                e.insert(self.engine.device(pk).await);
            }
            let (Some(Some(info)), Some(state)) = (infos.get(&pk), states.get_mut(&pk)) else {
                continue;
            };
            // Each series' range, once for all rules.
            let bounds: Vec<(f64, f64)> = batch
                .series
                .iter()
                .map(|s| {
                    s.values
                        .iter()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                            (lo.min(v), hi.max(v))
                        })
                })
                .collect();
            for (rule_id, rule_state) in state.rules.iter_mut() {
                let Some(entry) = book.rules.get(rule_id) else {
                    continue;
                };
                let rule = &entry.rule;
                for (s, &range) in batch.series.iter().zip(&bounds) {
                    if rule.sensor.as_ref().is_some_and(|want| *want != s.sensor) {
                        continue;
                    }
                    if matches!(rule.condition, Condition::Inactivity { .. }) {
                        match state.seen.get_mut(rule_id) {
                            Some(seen) => *seen = now,
                            None => {
                                state.seen.insert(rule_id.clone(), now);
                            }
                        }
                    }
                    judge_series(rule, rule_state, pk, info, s, range, &mut verdicts.events);
                }
            }
        }

        for (pk, state) in &states {
            for (rule_id, r) in &state.rules {
                let was = before.get(&(*pk, rule_id.clone())).copied().flatten();
                let now = r.memory.pending_since();
                if was != now {
                    verdicts.holds.push(PendingChange {
                        rule_id: rule_id.clone(),
                        device_pk: *pk,
                        since: now,
                    });
                }
            }
        }
        verdicts.states = states;
        Ok(verdicts)
    }

    /// Rebuilds the state of devices from the database, inside the group's
    /// transaction (before its readings are inserted).
    async fn reload<T: GroupTx>(
        &mut self,
        book: &RuleBook,
        tx: &mut T,
        pks: &[i64],
    ) -> Result<HashMap<i64, DeviceAlerts>, sqlx::Error> {
        let mut open: HashMap<(i64, String), u64> = HashMap::new();
        for (pk, rule, alert) in tx.open_alerts(pks).await? {
            open.insert((pk, rule), alert.max(0) as u64);
        }
        let mut holds: HashMap<(i64, String), i64> = HashMap::new();
        for (pk, rule, since) in tx.pending_holds(pks).await? {
            holds.insert((pk, rule), since);
        }
        let mut out = HashMap::with_capacity(pks.len());
        for &pk in pks {
            let seen = self.devices.remove(&pk).map(|d| d.seen).unwrap_or_default();
            let mut state = DeviceAlerts {
                epoch: book.epoch,
                judged_at: None,
                rules: BTreeMap::new(),
                seen,
            };
            if let Some(info) = self.engine.device(pk).await {
                let mut last_of: HashMap<&str, Option<(i64, f64)>> = HashMap::new();
                for (id, entry) in &book.rules {
                    let rule = &entry.rule;
                    if !rule.devices.matches(&info.id, &info.labels) {
                        continue;
                    }
                    let key = (pk, id.as_str().to_owned());
                    let last = match (&rule.condition, &rule.sensor) {
                        (Condition::RateOfChange { .. }, Some(sensor)) => {
                            match last_of.get(sensor.as_str()) {
                                Some(last) => *last,
                                None => {
                                    let last = tx.last_reading(pk, sensor).await?;
                                    last_of.insert(sensor.as_str(), last);
                                    last
                                }
                            }
                        }
                        _ => None,
                    };
                    state.rules.insert(
                        id.clone(),
                        RuleState {
                            memory: Memory::restored(holds.get(&key).copied(), last),
                            open: open.get(&key).copied(),
                        },
                    );
                }
            }
            out.insert(pk, state);
        }
        Ok(out)
    }

    /// Once the group has committed: its states become the cache, true for
    /// the devices' new committed sequences.
    pub fn apply(
        &mut self,
        book: &RuleBook,
        verdicts: Verdicts,
        outcomes: &[EventOutcome],
        committed: &HashMap<i64, u64>,
    ) {
        let mut states = verdicts.states;
        settle_open(&mut states, &verdicts.events, outcomes);
        for (pk, mut state) in states {
            state.epoch = book.epoch;
            state.judged_at = committed.get(&pk).copied();
            self.devices.insert(pk, state);
        }
    }

    /// FIRED events for this writer's devices that have been silent too
    /// long under an inactivity rule. Nothing changes until
    /// [`Judge::apply_silences`]: if recording fails, the next call finds
    /// the same silences again.
    pub async fn silences(&mut self, book: &RuleBook) -> Vec<NewAlertEvent> {
        let watching: Vec<_> = book
            .rules
            .values()
            .filter_map(|e| match e.rule.condition {
                Condition::Inactivity { silence } => Some((e, silence)),
                _ => None,
            })
            .collect();
        if watching.is_empty() {
            return Vec::new();
        }
        let (owns, shard, shards) = (self.owns, self.shard, self.shards);
        let devices = self.engine.devices_where(|pk| owns(pk, shard, shards));
        let now = Instant::now();
        let mut events = Vec::new();
        for (pk, info) in devices {
            let state = self.devices.entry(pk).or_default();
            if state.epoch != book.epoch {
                // Rules changed: nothing known is certain any more.
                state.epoch = book.epoch;
                state.judged_at = None;
                state.rules.clear();
            }
            for (entry, silence) in &watching {
                let rule = &entry.rule;
                if !rule.devices.matches(&info.id, &info.labels) {
                    continue;
                }
                // An unknown state tries to fire: `alerts_one_open` answers
                // with the open alert if there is one.
                if state.rules.get(&rule.id).is_some_and(|r| r.open.is_some()) {
                    continue;
                }
                let (last, what) = silence_start(entry, &info, state.seen.get(&rule.id));
                let quiet = now.saturating_duration_since(last);
                if quiet < *silence {
                    continue;
                }
                events.push(silence_event(rule, pk, &info, quiet, what));
            }
        }
        if self.engine.store().is_shared() && !events.is_empty() {
            self.heard_elsewhere(&book_silences(book), &mut events)
                .await;
        }
        events
    }

    /// Drops the silences the database disproves: with several server
    /// processes, a device's batches may all be committed by others, and
    /// what this writer saw is not all there was. A device found active is
    /// remembered as seen when it was, so it is asked about once per
    /// silence, not once per tick. Checked only for the few that look
    /// silent here; a failed check keeps the silence out (it is asked
    /// again on the next tick).
    async fn heard_elsewhere(
        &mut self,
        silences: &HashMap<RuleId, (Option<crate::domain::SensorName>, Duration)>,
        events: &mut Vec<NewAlertEvent>,
    ) {
        let wall = crate::domain::time::now_unix_nanos();
        let now = Instant::now();
        let mut keep = Vec::with_capacity(events.len());
        for e in events.drain(..) {
            let Some((sensor, silence)) = silences.get(&e.rule_id) else {
                continue;
            };
            let after = wall.saturating_sub(silence.as_nanos().min(i64::MAX as u128) as i64);
            match self
                .engine
                .store()
                .last_activity(e.device_pk, sensor.as_ref(), after)
                .await
            {
                Ok(Some(at)) if at > after => {
                    let ago = Duration::from_nanos(wall.saturating_sub(at).max(0) as u64);
                    let seen = now.checked_sub(ago).unwrap_or(now);
                    self.devices
                        .entry(e.device_pk)
                        .or_default()
                        .seen
                        .insert(e.rule_id.clone(), seen);
                }
                Ok(_) => keep.push(e),
                Err(error) => {
                    tracing::warn!(%error, device_pk = e.device_pk, "checking a silence failed; asking again")
                }
            }
        }
        *events = keep;
    }

    /// Once silences' events have committed.
    pub fn apply_silences(&mut self, events: &[NewAlertEvent], outcomes: &[EventOutcome]) {
        let pks: HashSet<i64> = events.iter().map(|e| e.device_pk).collect();
        let mut states: HashMap<i64, DeviceAlerts> = pks
            .into_iter()
            .filter_map(|pk| self.devices.remove(&pk).map(|d| (pk, d)))
            .collect();
        for e in events {
            if let Some(d) = states.get_mut(&e.device_pk) {
                d.rules.entry(e.rule_id.clone()).or_default();
            }
        }
        settle_open(&mut states, events, outcomes);
        self.devices.extend(states);
    }
}

/// The inactivity rules' sensor and silence, by rule.
fn book_silences(
    book: &RuleBook,
) -> HashMap<RuleId, (Option<crate::domain::SensorName>, Duration)> {
    book.rules
        .values()
        .filter_map(|e| match e.rule.condition {
            Condition::Inactivity { silence } => {
                Some((e.rule.id.clone(), (e.rule.sensor.clone(), silence)))
            }
            _ => None,
        })
        .collect()
}

/// Judges one series' readings under one rule, appending events.
fn judge_series(
    rule: &Rule,
    state: &mut RuleState,
    pk: i64,
    info: &DeviceInfo,
    s: &SeriesRows,
    (lo, hi): (f64, f64),
    events: &mut Vec<NewAlertEvent>,
) {
    if rule
        .condition
        .quiet_between(&mut state.memory, state.open.is_some(), lo, hi)
    {
        return;
    }
    for (&time, &value) in s.times.iter().zip(&s.values) {
        let Some(verdict) =
            rule.condition
                .judge(&mut state.memory, state.open.is_some(), time, value)
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
            alert_id: state.open,
            rule_id: rule.id.clone(),
            device_pk: pk,
            device_id: info.id.clone(),
            sensor: s.sensor.as_str().to_owned(),
            severity: rule.severity,
            value,
            time,
            message,
        });
        // The alert id of a FIRED is known once recorded, in this same
        // transaction; meanwhile a marker keeps the judging consistent.
        state.open = match kind {
            EventKind::Fired => Some(FIRED_EARLIER),
            _ => None,
        };
    }
}

/// Sets each judged rule's open alert from what recording decided.
fn settle_open(
    states: &mut HashMap<i64, DeviceAlerts>,
    events: &[NewAlertEvent],
    outcomes: &[EventOutcome],
) {
    for (e, outcome) in events.iter().zip(outcomes) {
        let Some(r) = states
            .get_mut(&e.device_pk)
            .and_then(|d| d.rules.get_mut(&e.rule_id))
        else {
            continue;
        };
        match (e.kind, outcome) {
            (EventKind::Fired, EventOutcome::Recorded(rec)) => r.open = Some(rec.alert_id),
            (EventKind::Fired, EventOutcome::AlreadyOpen { alert_id }) => r.open = Some(*alert_id),
            (EventKind::Resolved, _) => r.open = None,
            (EventKind::Fired, EventOutcome::Skipped) | (EventKind::Acked, _) => {}
        }
    }
}

/// Where a device's silence under a rule starts: the latest of the rule's
/// start (its creation, or this server's), the device's registration and
/// its last matching reading. A device registered after the rule is not
/// silent before it existed.
fn silence_start(
    entry: &RuleEntry,
    info: &DeviceInfo,
    seen: Option<&Instant>,
) -> (Instant, SilenceStart) {
    [
        Some((entry.since, entry.since_what)),
        info.registered
            .map(|at| (at, SilenceStart::DeviceRegistered)),
        seen.map(|at| (*at, SilenceStart::LastReading)),
    ]
    .into_iter()
    .flatten()
    // On a tie the later in this list wins: the more specific reason.
    .max_by_key(|(at, _)| *at)
    .expect("the rule's start is always there")
}

fn silence_event(
    rule: &Rule,
    pk: i64,
    info: &DeviceInfo,
    quiet: Duration,
    since: SilenceStart,
) -> NewAlertEvent {
    let what = rule
        .sensor
        .as_ref()
        .map_or("any sensor".to_owned(), |s| s.to_string());
    let quiet = humantime::format_duration(Duration::from_millis(quiet.as_millis() as u64));
    NewAlertEvent::of_rule(
        EventKind::Fired,
        None,
        rule,
        pk,
        info.id.clone(),
        format!("no reading of {what} for {quiet} {since}"),
    )
}
