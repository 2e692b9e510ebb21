//! The checks after a trial: the stored data against what the fleet was
//! told, the plan and the oracle. Each problem becomes one line of text.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::commander::{Received, Sent};
use super::db::{Snapshot, StoredCommand, StoredEvent};
use super::feed_watcher::FeedSeen;
use super::fleet::DeviceLog;
use super::oracle::{self, Event, Kind};
use super::plan::{Plan, READINGS_PER_BATCH, RULES, STEP_NANOS};
use super::watcher::Seen;

#[derive(Debug, Default)]
pub struct Report {
    pub acked_batches: u64,
    pub readings_stored: usize,
    pub events_expected: usize,
    pub events_stored: usize,
    /// Per rule: (expected, stored, missing, extra).
    pub per_rule: BTreeMap<&'static str, (usize, usize, usize, usize)>,
    /// Per readings-feed watcher: (what it follows, readings received,
    /// of them repeats, reconnects).
    pub feeds: Vec<(String, usize, usize, u64)>,
    /// Commands SendCommand answered, and of them those that reached their
    /// device more than once.
    pub commands_answered: usize,
    pub commands_redelivered: usize,
    pub problems: Vec<String>,
}

/// What the device side of the command checks needs.
pub struct Commands<'a> {
    pub sent: &'a Sent,
    pub received: &'a [Received],
}

pub fn check(
    plan: &Plan,
    snap: &Snapshot,
    logs: &[DeviceLog],
    seen: &Seen,
    feeds: &[FeedSeen],
    commands: &Commands<'_>,
) -> Report {
    let mut report = Report {
        readings_stored: snap.readings.len(),
        events_stored: snap.events.len(),
        ..Report::default()
    };
    let committed: HashMap<&str, i64> =
        snap.devices.iter().map(|(d, s)| (d.as_str(), *s)).collect();
    let mut readings: HashMap<&str, Vec<(i64, f64)>> = HashMap::new();
    for (d, t, v) in &snap.readings {
        readings.entry(d.as_str()).or_default().push((*t, *v));
    }
    for log in logs {
        report.acked_batches += log.acked;
        let id = plan.device_id(log.device);
        let Some(&stored_seq) = committed.get(id.as_str()) else {
            report.problems.push(format!("{id}: not stored at all"));
            continue;
        };
        let stored_seq = stored_seq.max(0) as u64;
        if stored_seq < log.acked || stored_seq < log.cursor {
            report.problems.push(format!(
                "{id}: committed_sequence {stored_seq} below what the device was told (acked {}, cursor {})",
                log.acked, log.cursor
            ));
        }
        if !log.finished {
            report.problems.push(format!(
                "{id}: did not finish uploading (acked {} of {})",
                log.acked, plan.batches
            ));
        }
        let stored = readings.get(id.as_str()).map_or(&[][..], |r| r.as_slice());
        check_readings(
            plan,
            log.device,
            &id,
            stored_seq,
            stored,
            &mut report.problems,
        );
        check_alerts(&id, stored, snap, &mut report);
    }
    check_event_ids(&snap.events, &mut report.problems);
    check_alert_rows(snap, &mut report.problems);
    check_watcher(&snap.events, seen, &mut report.problems);
    for feed in feeds {
        let repeats = check_feed(snap, feed, &mut report.problems);
        report.feeds.push((
            feed.label.clone(),
            feed.rows.len(),
            repeats,
            feed.reconnects,
        ));
    }
    check_commands(&snap.commands, commands, &mut report);
    report
}

/// Answered commands not yet ACKED in `stored`: the trial waits for none.
pub fn commands_not_acked(stored: &[StoredCommand], sent: &Sent) -> usize {
    let acked: HashSet<i64> = stored
        .iter()
        .filter(|c| c.2 == "acked")
        .map(|c| c.0)
        .collect();
    sent.answered
        .iter()
        .filter(|(_, id)| !acked.contains(&(*id as i64)))
        .count()
}

/// Every command SendCommand answered is stored for its device, ACKED, and
/// was received by that device (again after a kill is allowed: same id);
/// and a device received only its own commands.
fn check_commands(stored: &[StoredCommand], commands: &Commands<'_>, report: &mut Report) {
    let by_id: HashMap<u64, (&str, &str)> = stored
        .iter()
        .map(|(id, device, state)| (*id as u64, (device.as_str(), state.as_str())))
        .collect();
    let received: HashMap<&str, &Received> = commands
        .received
        .iter()
        .map(|r| (r.device.as_str(), r))
        .collect();
    let problems = &mut report.problems;
    let mut answered = HashSet::new();
    for (device, id) in &commands.sent.answered {
        let times = received
            .get(device.as_str())
            .and_then(|r| r.ids.get(id))
            .copied()
            .unwrap_or(0);
        if times > 1 {
            report.commands_redelivered += 1;
        }
        let said = format!("command {id} to {device}, answered by SendCommand,");
        if !answered.insert(*id) {
            problems.push(format!("{said} was answered before, to another send"));
        }
        match by_id.get(id) {
            None => problems.push(format!("{said} is not stored")),
            Some((owner, _)) if owner != device => {
                problems.push(format!("{said} is stored for {owner}"))
            }
            Some((_, state)) if *state != "acked" => {
                problems.push(format!("{said} is {state}, not acked (received {times}x)"))
            }
            Some(_) => {}
        }
        if times == 0 {
            problems.push(format!("{said} never reached its device"));
        }
    }
    report.commands_answered = commands.sent.answered.len();
    for r in commands.received {
        for id in r.ids.keys() {
            match by_id.get(id) {
                Some((owner, _)) if *owner == r.device => {}
                other => problems.push(format!(
                    "{} received command {id}, stored for {}",
                    r.device,
                    other.map_or("no device", |(owner, _)| owner)
                )),
            }
        }
    }
}

type Key<'a> = (&'a str, i64, i32);

/// A readings-feed watcher against the stored readings of its selection:
/// after dropping repeats by key, exactly those readings, each with its
/// stored time and value and at its batch's feed position, positions never
/// going back. Returns the repeats (allowed: a consumer drops them by key).
fn check_feed(snap: &Snapshot, seen: &FeedSeen, problems: &mut Vec<String>) -> usize {
    let wanted = |d: &str| {
        seen.devices
            .as_ref()
            .is_none_or(|ids| ids.iter().any(|i| i == d))
    };
    let stored: HashMap<Key<'_>, (i64, u64)> = snap
        .keyed_readings
        .iter()
        .filter(|r| wanted(&r.0))
        .map(|(d, s, i, t, v)| ((d.as_str(), *s, *i), (*t, v.to_bits())))
        .collect();
    let positions: HashMap<(&str, i64), i64> = snap
        .feed
        .iter()
        .map(|(p, d, s)| ((d.as_str(), *s), *p))
        .collect();
    let mut got: HashMap<Key<'_>, (i64, u64)> = HashMap::new();
    let (mut repeats, mut extra, mut other_value, mut other_position) = (0, 0, 0, 0);
    for r in &seen.rows {
        let key = (r.device.as_str(), r.sequence as i64, r.index as i32);
        if got.insert(key, (r.time, r.value.to_bits())).is_some() {
            repeats += 1;
            continue;
        }
        match stored.get(&key) {
            None => extra += 1,
            Some(v) if *v != (r.time, r.value.to_bits()) => other_value += 1,
            Some(_) => {}
        }
        if positions.get(&(key.0, key.1)) != Some(&(r.position as i64)) {
            other_position += 1;
        }
    }
    let missing = stored.keys().filter(|k| !got.contains_key(*k)).count();
    if missing + extra + other_value + other_position > 0 || !seen.backwards.is_empty() {
        problems.push(format!(
            "feed watcher {}: {} readings received ({repeats} repeats), {} stored for it: {missing} missing, {extra} not stored, {other_value} with another time or value, {other_position} at another position, position went back {}x (first {:?}), {} reconnects",
            seen.label,
            seen.rows.len(),
            stored.len(),
            seen.backwards.len(),
            seen.backwards.first(),
            seen.reconnects
        ));
    }
    repeats
}

fn check_readings(
    plan: &Plan,
    device: u32,
    id: &str,
    committed: u64,
    stored: &[(i64, f64)],
    problems: &mut Vec<String>,
) {
    let expected = plan.readings_through(device, committed);
    let mut times: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for &(t, v) in stored {
        times.entry(t).or_default().push(v);
    }
    let duplicated = stored.len() - times.len();
    if duplicated > 0 {
        problems.push(format!("{id}: {duplicated} readings stored twice"));
    }
    let mut per_batch: BTreeMap<i64, u64> = BTreeMap::new();
    for &t in times.keys() {
        let batch = (t - plan.base_time).div_euclid(STEP_NANOS * READINGS_PER_BATCH as i64) + 1;
        *per_batch.entry(batch).or_default() += 1;
    }
    let partial: Vec<_> = per_batch
        .iter()
        .filter(|(_, n)| **n != READINGS_PER_BATCH)
        .map(|(b, n)| format!("{b} ({n} of {READINGS_PER_BATCH})"))
        .collect();
    if !partial.is_empty() {
        problems.push(format!(
            "{id}: partly stored batches {}",
            partial.join(", ")
        ));
    }
    let want: BTreeMap<i64, f64> = expected.iter().copied().collect();
    let missing = want.keys().filter(|t| !times.contains_key(t)).count();
    let beyond: Vec<_> = per_batch
        .keys()
        .filter(|b| **b as u64 > committed)
        .collect();
    let wrong = times
        .iter()
        .filter(|(t, vs)| {
            want.get(t)
                .is_some_and(|w| vs.iter().any(|v| v.to_bits() != w.to_bits()))
        })
        .count();
    if missing > 0 {
        problems.push(format!(
            "{id}: {missing} readings of batches 1..={committed} missing"
        ));
    }
    if !beyond.is_empty() {
        problems.push(format!(
            "{id}: readings of batches beyond committed_sequence {committed}: {:?}",
            beyond.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if wrong > 0 {
        problems.push(format!("{id}: {wrong} readings with a value not sent"));
    }
}

fn check_alerts(id: &str, stored: &[(i64, f64)], snap: &Snapshot, report: &mut Report) {
    for (rule_id, rule) in RULES {
        let expected = oracle::replay(&rule, stored);
        let got: Vec<Event> = snap
            .events
            .iter()
            .filter(|e| e.rule_id == rule_id && e.device_id == id)
            .filter_map(as_event)
            .collect();
        let (missing, extra) = multiset_diff(&expected, &got);
        let entry = report.per_rule.entry(rule_id).or_default();
        entry.0 += expected.len();
        entry.1 += got.len();
        entry.2 += missing.len();
        entry.3 += extra.len();
        report.events_expected += expected.len();
        if let Some(i) =
            (0..expected.len().max(got.len())).find(|&i| match (expected.get(i), got.get(i)) {
                (Some(a), Some(b)) => !a.same(b),
                _ => true,
            })
        {
            report.problems.push(format!(
                "{id} {rule_id}: events differ from #{i}: expected {}, stored {} ({} missing, {} extra; first missing {}, first extra {})",
                show(expected.get(i)),
                show(got.get(i)),
                missing.len(),
                extra.len(),
                show(missing.first()),
                show(extra.first()),
            ));
        }
    }
}

fn as_event(e: &StoredEvent) -> Option<Event> {
    Some(Event {
        kind: Kind::parse(&e.kind)?,
        time: e.time,
        value: e.value.unwrap_or(f64::NAN),
    })
}

fn show(e: Option<&Event>) -> String {
    match e {
        Some(e) => format!("{:?}@{}={}", e.kind, e.time, e.value),
        None => "nothing".into(),
    }
}

/// Events in `a` not matched in `b`, and in `b` not matched in `a`.
fn multiset_diff(a: &[Event], b: &[Event]) -> (Vec<Event>, Vec<Event>) {
    let key = |e: &Event| (e.kind, e.time, e.value.to_bits());
    let mut count: HashMap<_, i64> = HashMap::new();
    for e in a {
        *count.entry(key(e)).or_default() += 1;
    }
    let mut extra = Vec::new();
    for e in b {
        match count.get_mut(&key(e)) {
            Some(n) if *n > 0 => *n -= 1,
            _ => extra.push(*e),
        }
    }
    let mut missing = Vec::new();
    for e in a {
        if let Some(n) = count.get_mut(&key(e))
            && *n > 0
        {
            *n -= 1;
            missing.push(*e);
        }
    }
    (missing, extra)
}

fn check_event_ids(events: &[StoredEvent], problems: &mut Vec<String>) {
    if let Some((i, e)) = events
        .iter()
        .enumerate()
        .find(|(i, e)| e.event_id != *i as i64 + 1)
    {
        problems.push(format!(
            "event ids are not 1..={}: position {} holds id {}",
            events.len(),
            i + 1,
            e.event_id
        ));
    }
    let acked = events.iter().filter(|e| e.kind == "acked").count();
    if acked > 0 {
        problems.push(format!("{acked} ACKED events, but nobody acknowledged"));
    }
}

fn check_alert_rows(snap: &Snapshot, problems: &mut Vec<String>) {
    let mut fired: HashMap<i64, Vec<&StoredEvent>> = HashMap::new();
    let mut resolved: HashMap<i64, Vec<&StoredEvent>> = HashMap::new();
    for e in &snap.events {
        match e.kind.as_str() {
            "fired" => fired.entry(e.alert_id).or_default().push(e),
            "resolved" => resolved.entry(e.alert_id).or_default().push(e),
            _ => {}
        }
    }
    let mut bad = Vec::new();
    for a in &snap.alerts {
        let f = fired.remove(&a.alert_id).unwrap_or_default();
        let r = resolved.remove(&a.alert_id).unwrap_or_default();
        let fired_ok = matches!(f.as_slice(), [e] if e.time == a.fired_time
            && e.value.map(f64::to_bits) == a.fired_value.map(f64::to_bits)
            && e.rule_id == a.rule_id && e.device_id == a.device_id);
        let resolved_ok = match (a.resolved_time, r.as_slice()) {
            (None, []) => true,
            (Some(t), [e]) => e.time == t,
            _ => false,
        };
        if !fired_ok || !resolved_ok {
            bad.push(format!(
                "alert {} ({} FIRED, {} RESOLVED events; resolved {:?})",
                a.alert_id,
                f.len(),
                r.len(),
                a.resolved_time
            ));
        }
    }
    for (id, _) in fired.iter().chain(resolved.iter()) {
        bad.push(format!("events of alert {id}, which has no row"));
    }
    if !bad.is_empty() {
        problems.push(format!(
            "{} alert rows disagree with their events: {}",
            bad.len(),
            bad.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
        ));
    }
}

fn check_watcher(events: &[StoredEvent], seen: &Seen, problems: &mut Vec<String>) {
    let stored: Vec<u64> = events.iter().map(|e| e.event_id as u64).collect();
    if seen.ids == stored {
        return;
    }
    let duplicates = seen.ids.windows(2).filter(|w| w[1] <= w[0]).count();
    let gaps = seen.ids.windows(2).filter(|w| w[1] > w[0] + 1).count();
    let first = (0..stored.len().max(seen.ids.len()))
        .find(|&i| stored.get(i) != seen.ids.get(i))
        .unwrap_or(0);
    problems.push(format!(
        "watcher saw {} events, table has {}: {duplicates} out of order or repeated, {gaps} gaps; first difference at #{first}: saw {:?}, stored {:?} ({} reconnects)",
        seen.ids.len(),
        stored.len(),
        seen.ids.get(first),
        stored.get(first),
        seen.reconnects
    ));
}
