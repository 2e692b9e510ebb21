//! The alert oracle: threshold with hysteresis and hold, written here from
//! the rule's definition rather than taken from the server, so a server bug
//! cannot hide in both. Same semantics as the server's threshold rule:
//!
//! * open: resolves when the value is below `clear`; any pending hold ends;
//! * closed: a value above `fire` starts (or continues) a pending hold at
//!   the first such reading's time, and fires once the reading's time is at
//!   least `hold` past it; any other value ends the pending hold.

#[derive(Debug, Clone, Copy)]
pub struct Threshold {
    pub fire: f64,
    pub clear: f64,
    pub hold_millis: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Fired,
    Resolved,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fired" => Some(Self::Fired),
            "resolved" => Some(Self::Resolved),
            _ => None,
        }
    }
}

/// One alert event as the oracle expects it, or as it was stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    pub kind: Kind,
    pub time: i64,
    pub value: f64,
}

impl Event {
    pub fn same(&self, other: &Event) -> bool {
        self.kind == other.kind
            && self.time == other.time
            && self.value.to_bits() == other.value.to_bits()
    }
}

/// The events a rule yields for one device's readings, in time order,
/// starting with no alert open and nothing pending.
pub fn replay(rule: &Threshold, readings: &[(i64, f64)]) -> Vec<Event> {
    let hold = rule.hold_millis as i64 * 1_000_000;
    let mut open = false;
    let mut pending: Option<i64> = None;
    let mut events = Vec::new();
    for &(time, value) in readings {
        if open {
            pending = None;
            if value < rule.clear {
                open = false;
                events.push(Event {
                    kind: Kind::Resolved,
                    time,
                    value,
                });
            }
            continue;
        }
        if value <= rule.fire {
            pending = None;
            continue;
        }
        let since = *pending.get_or_insert(time);
        if time - since >= hold {
            pending = None;
            open = true;
            events.push(Event {
                kind: Kind::Fired,
                time,
                value,
            });
        }
    }
    events
}

#[cfg(test)]
mod tests {
    // `cargo test` builds examples without running their tests; run these
    // with `cargo test -p ingest --example fault_trials`.
    use super::*;

    #[test]
    fn hold_needs_three_readings_a_millisecond_apart() {
        let held = Threshold {
            fire: 100.0,
            clear: 50.0,
            hold_millis: 2,
        };
        let ms = 1_000_000;
        let r = [
            (0, 150.0),
            (ms, 150.0),
            (2 * ms, 150.0),
            (3 * ms, 70.0),
            (4 * ms, 10.0),
        ];
        let kinds: Vec<_> = replay(&held, &r).iter().map(|e| (e.kind, e.time)).collect();
        assert_eq!(kinds, vec![(Kind::Fired, 2 * ms), (Kind::Resolved, 4 * ms)]);
        let broken = [(0, 150.0), (ms, 150.0), (2 * ms, 70.0), (3 * ms, 150.0)];
        assert!(replay(&held, &broken).is_empty());
    }
}
