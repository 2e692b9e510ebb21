//! Alert rules and how a rule judges readings: pure logic, no I/O, so every
//! rule kind is tested without a server or a clock.
//!
//! Thresholds have hysteresis (fire past `fire`, resolve only once back past
//! `clear`) and an optional hold time, judged on the readings' own
//! timestamps. Inactivity is judged on the server's clock by the engine.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::device::{DeviceId, Labels};
use super::reading::SensorName;
use super::time::UnixNanos;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "info" => Some(Self::Info),
            "warning" => Some(Self::Warning),
            "critical" => Some(Self::Critical),
            _ => None,
        }
    }
}

/// Why a rule was refused; shown to the operator.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidRule {
    #[error(
        "rule id {0:?} is invalid: use 1 to 128 ASCII letters, digits, '_', '.', '-' or ':', starting with a letter or digit"
    )]
    Id(String),
    #[error("severity must be info, warning or critical")]
    Severity,
    #[error("a rule needs a condition: threshold, rate_of_change or inactivity")]
    NoCondition,
    #[error("a {0} rule needs a sensor")]
    NoSensor(&'static str),
    #[error("sensor name {0:?} is invalid: {rule}", rule = SensorName::RULE)]
    Sensor(String),
    #[error("threshold direction must be above or below")]
    Direction,
    #[error("{0} must be a finite number")]
    NotFinite(&'static str),
    #[error(
        "clear value {clear} is on the wrong side of fire value {fire}: a rule firing {direction} {fire} must clear at or {opposite} it"
    )]
    ClearOnWrongSide {
        direction: &'static str,
        opposite: &'static str,
        fire: f64,
        clear: f64,
    },
    #[error("max_change_per_minute must be greater than 0")]
    Rate,
    #[error("silence must be at least 100 ms; got {0} ms")]
    Silence(u64),
    #[error("device selector lists no device ids")]
    NoDevices,
    #[error("device selector: {0}")]
    Device(String),
    #[error("label selector lists no labels")]
    NoLabels,
}

/// A rule's id, chosen by the operator.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RuleId(String);

impl RuleId {
    pub fn parse(s: &str) -> Result<Self, InvalidRule> {
        // The same alphabet as device ids: both end up in URLs and file names.
        DeviceId::parse(s)
            .map(|id| Self(id.as_str().to_owned()))
            .map_err(|_| InvalidRule::Id(s.chars().take(160).collect()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which devices a rule watches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSelector {
    All,
    Ids(BTreeSet<String>),
    Labels(BTreeMap<String, String>),
}

impl DeviceSelector {
    pub fn matches(&self, id: &DeviceId, labels: &Labels) -> bool {
        match self {
            Self::All => true,
            Self::Ids(ids) => ids.contains(id.as_str()),
            Self::Labels(want) => want.iter().all(|(k, v)| labels.get(k) == Some(v.as_str())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Above,
    Below,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    Threshold {
        direction: Direction,
        fire: f64,
        clear: f64,
        /// How long the value must stay past `fire` before firing.
        #[serde(with = "millis")]
        hold: Duration,
    },
    RateOfChange {
        max_per_minute: f64,
    },
    Inactivity {
        #[serde(with = "millis")]
        silence: Duration,
    },
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// A valid rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub id: RuleId,
    pub devices: DeviceSelector,
    /// `None` only for inactivity of any sensor.
    pub sensor: Option<SensorName>,
    pub severity: Severity,
    pub condition: Condition,
}

impl Serialize for SensorName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SensorName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SensorName::parse(&s, SensorName::HARD_MAX_LEN)
            .map_err(|_| serde::de::Error::custom(format!("invalid sensor name {s:?}")))
    }
}

/// Checks a rule's parts; everything else about a rule follows from these.
pub fn validate_condition(
    condition: &Condition,
    sensor: Option<&SensorName>,
) -> Result<(), InvalidRule> {
    match condition {
        Condition::Threshold {
            direction,
            fire,
            clear,
            ..
        } => {
            if sensor.is_none() {
                return Err(InvalidRule::NoSensor("threshold"));
            }
            if !fire.is_finite() {
                return Err(InvalidRule::NotFinite("fire_value"));
            }
            if !clear.is_finite() {
                return Err(InvalidRule::NotFinite("clear_value"));
            }
            let (ok, name, opposite) = match direction {
                Direction::Above => (clear <= fire, "above", "below"),
                Direction::Below => (clear >= fire, "below", "above"),
            };
            if !ok {
                return Err(InvalidRule::ClearOnWrongSide {
                    direction: name,
                    opposite,
                    fire: *fire,
                    clear: *clear,
                });
            }
        }
        Condition::RateOfChange { max_per_minute } => {
            if sensor.is_none() {
                return Err(InvalidRule::NoSensor("rate of change"));
            }
            if !max_per_minute.is_finite() {
                return Err(InvalidRule::NotFinite("max_change_per_minute"));
            }
            if *max_per_minute <= 0.0 {
                return Err(InvalidRule::Rate);
            }
        }
        Condition::Inactivity { silence } => {
            if *silence < Duration::from_millis(100) {
                return Err(InvalidRule::Silence(silence.as_millis() as u64));
            }
        }
    }
    Ok(())
}

/// What a rule concluded from a reading (or from silence).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Fire {
        value: Option<f64>,
        time: UnixNanos,
        message: String,
    },
    Resolve {
        value: Option<f64>,
        time: UnixNanos,
        message: String,
    },
}

/// What a rule remembers about one device between readings.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// Since when the value has been past `fire` (threshold with hold).
    pending_since: Option<UnixNanos>,
    /// The previous reading (rate of change).
    last: Option<(UnixNanos, f64)>,
}

impl Memory {
    /// What a rule remembered, as kept in the database: the pending hold
    /// (stored on each change) and the device's newest reading of the
    /// sensor (its readings are stored in the same transaction).
    pub fn restored(pending_since: Option<UnixNanos>, last: Option<(UnixNanos, f64)>) -> Self {
        Self {
            pending_since,
            last,
        }
    }

    pub fn pending_since(&self) -> Option<UnixNanos> {
        self.pending_since
    }
}

impl Condition {
    /// Whether readings all within `[lo, hi]` can be judged at once: true
    /// when none of them would give a verdict, with `memory` left as
    /// judging them one by one would leave it. Most readings of most rules
    /// are like that, and judging a batch against a hundred rules reading
    /// by reading showed in the writer's profile.
    pub fn quiet_between(&self, memory: &mut Memory, open: bool, lo: f64, hi: f64) -> bool {
        match *self {
            Condition::Threshold {
                direction,
                fire,
                clear,
                ..
            } => {
                // Open: only a reading past `clear` resolves (and the hold
                // start is already cleared). Closed: no reading past `fire`
                // fires, and each one clears the hold start.
                let quiet = match (open, direction) {
                    (true, Direction::Above) => lo >= clear,
                    (true, Direction::Below) => hi <= clear,
                    (false, Direction::Above) => hi <= fire,
                    (false, Direction::Below) => lo >= fire,
                };
                if quiet && !open {
                    memory.pending_since = None;
                }
                quiet
            }
            // Every reading moves the previous one.
            Condition::RateOfChange { .. } => false,
            Condition::Inactivity { .. } => !open,
        }
    }

    /// Judges one reading, given whether the (rule, device) alert is open.
    pub fn judge(
        &self,
        memory: &mut Memory,
        open: bool,
        time: UnixNanos,
        value: f64,
    ) -> Option<Verdict> {
        match *self {
            Condition::Threshold {
                direction,
                fire,
                clear,
                hold,
            } => {
                let (past_fire, cleared) = match direction {
                    Direction::Above => (value > fire, value < clear),
                    Direction::Below => (value < fire, value > clear),
                };
                if open {
                    memory.pending_since = None;
                    return cleared.then(|| Verdict::Resolve {
                        value: Some(value),
                        time,
                        message: format!("{} is back past {clear}", short(value)),
                    });
                }
                if !past_fire {
                    memory.pending_since = None;
                    return None;
                }
                let since = *memory.pending_since.get_or_insert(time);
                let held = Duration::from_nanos(time.saturating_sub(since).max(0) as u64);
                if held < hold {
                    return None;
                }
                memory.pending_since = None;
                let word = if direction == Direction::Above {
                    "above"
                } else {
                    "below"
                };
                let during = if hold.is_zero() {
                    String::new()
                } else {
                    format!(" for {}", humantime::format_duration(held))
                };
                Some(Verdict::Fire {
                    value: Some(value),
                    time,
                    message: format!("{} {word} {fire}{during}", short(value)),
                })
            }
            Condition::RateOfChange { max_per_minute } => {
                let previous = memory.last;
                if previous.is_some_and(|(t0, _)| time <= t0) {
                    // Out of order or same instant: no rate to speak of.
                    return None;
                }
                memory.last = Some((time, value));
                let (t0, v0) = previous?;
                let minutes = (time - t0) as f64 / 60e9;
                let rate = (value - v0).abs() / minutes;
                match (open, rate > max_per_minute) {
                    (false, true) => Some(Verdict::Fire {
                        value: Some(value),
                        time,
                        message: format!("changing {rate:.3}/min, more than {max_per_minute}/min"),
                    }),
                    (true, false) => Some(Verdict::Resolve {
                        value: Some(value),
                        time,
                        message: format!("changing {rate:.3}/min, within {max_per_minute}/min"),
                    }),
                    _ => None,
                }
            }
            // A reading ends a silence; the engine's clock starts one.
            Condition::Inactivity { .. } => open.then(|| Verdict::Resolve {
                value: Some(value),
                time,
                message: "readings resumed".to_owned(),
            }),
        }
    }
}

/// A value as people read it in a message: at most four decimals.
fn short(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    fn threshold(direction: Direction, fire: f64, clear: f64, hold_secs: u64) -> Condition {
        Condition::Threshold {
            direction,
            fire,
            clear,
            hold: Duration::from_secs(hold_secs),
        }
    }

    /// Runs readings through a condition, tracking open/closed like the
    /// engine does, and returns the verdict kinds in order.
    fn run(c: &Condition, readings: &[(i64, f64)]) -> Vec<&'static str> {
        let mut memory = Memory::default();
        let mut open = false;
        let mut out = Vec::new();
        for &(t, v) in readings {
            match c.judge(&mut memory, open, t * S, v) {
                Some(Verdict::Fire { .. }) => {
                    open = true;
                    out.push("fire");
                }
                Some(Verdict::Resolve { .. }) => {
                    open = false;
                    out.push("resolve");
                }
                None => {}
            }
        }
        out
    }

    #[test]
    fn threshold_fires_and_resolves_with_hysteresis() {
        let c = threshold(Direction::Above, 40.0, 35.0, 0);
        assert_eq!(
            run(&c, &[(1, 30.0), (2, 41.0), (3, 45.0), (4, 38.0), (5, 34.9)]),
            vec!["fire", "resolve"]
        );
        // Oscillating inside the band never flaps.
        let band: Vec<_> = (0..50)
            .map(|i| (i, if i % 2 == 0 { 39.0 } else { 36.0 }))
            .collect();
        assert!(run(&c, &band).is_empty());
        let mut over_then_band = vec![(0, 41.0)];
        over_then_band.extend((1..50).map(|i| (i, if i % 2 == 0 { 41.0 } else { 36.0 })));
        assert_eq!(run(&c, &over_then_band), vec!["fire"]);
        let below = threshold(Direction::Below, 20.0, 25.0, 0);
        assert_eq!(
            run(&below, &[(1, 19.0), (2, 24.0), (3, 26.0)]),
            vec!["fire", "resolve"]
        );
    }

    #[test]
    fn threshold_hold_time_must_pass_without_interruption() {
        let c = threshold(Direction::Above, 40.0, 35.0, 10);
        assert!(run(&c, &[(0, 41.0), (5, 41.0), (9, 41.0)]).is_empty());
        assert_eq!(run(&c, &[(0, 41.0), (5, 41.0), (10, 41.0)]), vec!["fire"]);
        // A dip below fire restarts the clock.
        assert!(run(&c, &[(0, 41.0), (5, 39.0), (10, 41.0), (19, 41.0)]).is_empty());
        assert_eq!(
            run(&c, &[(0, 41.0), (5, 39.0), (10, 41.0), (20, 41.0)]),
            vec!["fire"]
        );
    }

    #[test]
    fn rate_of_change() {
        let c = Condition::RateOfChange {
            max_per_minute: 6.0,
        };
        // 1 per 10 s = 6/min: not more than the limit.
        assert!(run(&c, &[(0, 0.0), (10, 1.0), (20, 2.0)]).is_empty());
        assert_eq!(
            run(&c, &[(0, 0.0), (10, 1.0), (20, 5.0), (30, 5.5), (40, 5.6)]),
            vec!["fire", "resolve"]
        );
        // Same or earlier timestamps are ignored.
        assert!(run(&c, &[(10, 0.0), (10, 100.0), (5, -100.0)]).is_empty());
    }

    #[test]
    fn inactivity_resolves_on_any_reading() {
        let c = Condition::Inactivity {
            silence: Duration::from_secs(1),
        };
        let mut m = Memory::default();
        assert_eq!(c.judge(&mut m, false, 0, 1.0), None);
        assert!(matches!(
            c.judge(&mut m, true, 0, 1.0),
            Some(Verdict::Resolve { .. })
        ));
    }

    proptest::proptest! {
        /// Skipping a quiet series changes nothing judging it would have.
        #[test]
        fn a_quiet_series_is_judged_the_same_at_once(
            values in proptest::collection::vec(-10.0f64..60.0, 1..12),
            open in proptest::bool::ANY,
            pending in proptest::option::of(0i64..5),
            above in proptest::bool::ANY,
            hold in 0u64..3,
        ) {
            let c = if above {
                threshold(Direction::Above, 40.0, 35.0, hold)
            } else {
                threshold(Direction::Below, 10.0, 15.0, hold)
            };
            let start = Memory { pending_since: pending.filter(|_| !open).map(|p| p * S), last: None };
            let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut at_once = start.clone();
            if c.quiet_between(&mut at_once, open, lo, hi) {
                let mut one_by_one = start;
                for (i, &v) in values.iter().enumerate() {
                    proptest::prop_assert!(c.judge(&mut one_by_one, open, (10 + i as i64) * S, v).is_none());
                }
                proptest::prop_assert_eq!(at_once.pending_since, one_by_one.pending_since);
            }
        }
    }

    #[test]
    fn invalid_conditions_are_explained() {
        let s = SensorName::parse("t", 64).unwrap();
        let err =
            validate_condition(&threshold(Direction::Above, 40.0, 45.0, 0), Some(&s)).unwrap_err();
        assert!(err.to_string().contains("wrong side"), "{err}");
        assert!(validate_condition(&threshold(Direction::Below, 20.0, 15.0, 0), Some(&s)).is_err());
        assert!(validate_condition(&threshold(Direction::Above, 40.0, 40.0, 0), Some(&s)).is_ok());
        assert!(
            validate_condition(&threshold(Direction::Above, f64::NAN, 40.0, 0), Some(&s)).is_err()
        );
        assert_eq!(
            validate_condition(&threshold(Direction::Above, 1.0, 0.0, 0), None),
            Err(InvalidRule::NoSensor("threshold"))
        );
        assert_eq!(
            validate_condition(
                &Condition::RateOfChange {
                    max_per_minute: 0.0
                },
                Some(&s)
            ),
            Err(InvalidRule::Rate)
        );
        let quick = Condition::Inactivity {
            silence: Duration::from_millis(10),
        };
        assert_eq!(
            validate_condition(&quick, None),
            Err(InvalidRule::Silence(10))
        );
    }

    #[test]
    fn selectors() {
        let id = DeviceId::parse("d1").unwrap();
        let labels = Labels::parse([("site".to_owned(), "a".to_owned())].into()).unwrap();
        assert!(DeviceSelector::All.matches(&id, &labels));
        assert!(DeviceSelector::Ids(["d1".to_owned()].into()).matches(&id, &labels));
        assert!(!DeviceSelector::Ids(["d2".to_owned()].into()).matches(&id, &labels));
        assert!(
            DeviceSelector::Labels([("site".to_owned(), "a".to_owned())].into())
                .matches(&id, &labels)
        );
        assert!(
            !DeviceSelector::Labels([("site".to_owned(), "b".to_owned())].into())
                .matches(&id, &labels)
        );
    }

    #[test]
    fn rules_round_trip_through_json() {
        let rule = Rule {
            id: RuleId::parse("hot").unwrap(),
            devices: DeviceSelector::Labels([("site".to_owned(), "a".to_owned())].into()),
            sensor: Some(SensorName::parse("temperature", 64).unwrap()),
            severity: Severity::Critical,
            condition: threshold(Direction::Above, 40.0, 35.0, 30),
        };
        let json = serde_json::to_string(&rule).unwrap();
        assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), rule);
    }
}
