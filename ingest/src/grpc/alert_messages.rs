//! Alert rules, alerts and events between protobuf and domain values.

use std::collections::BTreeSet;
use std::time::Duration;

use telemetry_proto::v1 as pb;

use crate::domain::SensorName;
use crate::domain::alert::{
    Condition, DeviceSelector, Direction, InvalidRule, Rule, RuleId, Severity, validate_condition,
};
use crate::domain::device::{DeviceId, Labels};
use crate::storage::alerts::{AlertEventRecord, AlertRecord, EventKind};

pub fn severity_from_pb(v: i32) -> Option<Severity> {
    match pb::Severity::try_from(v).ok()? {
        pb::Severity::Info => Some(Severity::Info),
        pb::Severity::Warning => Some(Severity::Warning),
        pb::Severity::Critical => Some(Severity::Critical),
        pb::Severity::Unspecified => None,
    }
}

pub fn severity_to_pb(s: Severity) -> pb::Severity {
    match s {
        Severity::Info => pb::Severity::Info,
        Severity::Warning => pb::Severity::Warning,
        Severity::Critical => pb::Severity::Critical,
    }
}

/// Parses and validates a rule from the API.
pub fn rule_from_pb(rule: pb::AlertRule) -> Result<Rule, InvalidRule> {
    let id = RuleId::parse(&rule.rule_id)?;
    let severity = severity_from_pb(rule.severity).ok_or(InvalidRule::Severity)?;
    let sensor = if rule.sensor.is_empty() {
        None
    } else {
        Some(
            SensorName::parse(&rule.sensor, SensorName::HARD_MAX_LEN)
                .map_err(|_| InvalidRule::Sensor(rule.sensor.clone()))?,
        )
    };
    let devices = match rule.devices.and_then(|d| d.selector) {
        None | Some(pb::device_selector::Selector::All(_)) => DeviceSelector::All,
        Some(pb::device_selector::Selector::Ids(list)) => {
            if list.device_ids.is_empty() {
                return Err(InvalidRule::NoDevices);
            }
            let mut ids = BTreeSet::new();
            for id in list.device_ids {
                DeviceId::parse(&id).map_err(|e| InvalidRule::Device(e.to_string()))?;
                ids.insert(id);
            }
            DeviceSelector::Ids(ids)
        }
        Some(pb::device_selector::Selector::Labels(m)) => {
            if m.labels.is_empty() {
                return Err(InvalidRule::NoLabels);
            }
            let labels = Labels::parse(m.labels).map_err(|e| InvalidRule::Device(e.to_string()))?;
            DeviceSelector::Labels(labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        }
    };
    let condition = match rule.condition.ok_or(InvalidRule::NoCondition)? {
        pb::alert_rule::Condition::Threshold(t) => Condition::Threshold {
            direction: match t.direction() {
                pb::threshold_condition::Direction::Above => Direction::Above,
                pb::threshold_condition::Direction::Below => Direction::Below,
                pb::threshold_condition::Direction::Unspecified => {
                    return Err(InvalidRule::Direction);
                }
            },
            fire: t.fire_value,
            clear: t.clear_value,
            hold: Duration::from_millis(t.for_millis),
        },
        pb::alert_rule::Condition::RateOfChange(r) => Condition::RateOfChange {
            max_per_minute: r.max_change_per_minute,
        },
        pb::alert_rule::Condition::Inactivity(i) => Condition::Inactivity {
            silence: Duration::from_millis(i.silence_millis),
        },
    };
    validate_condition(&condition, sensor.as_ref())?;
    Ok(Rule {
        id,
        devices,
        sensor,
        severity,
        condition,
    })
}

pub fn rule_to_pb(rule: &Rule) -> pb::AlertRule {
    use pb::device_selector::Selector;
    let selector = match &rule.devices {
        DeviceSelector::All => Selector::All(true),
        DeviceSelector::Ids(ids) => Selector::Ids(pb::DeviceIdList {
            device_ids: ids.iter().cloned().collect(),
        }),
        DeviceSelector::Labels(labels) => Selector::Labels(pb::LabelMatch {
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }),
    };
    let condition = match &rule.condition {
        Condition::Threshold {
            direction,
            fire,
            clear,
            hold,
        } => {
            let mut t = pb::ThresholdCondition {
                fire_value: *fire,
                clear_value: *clear,
                for_millis: hold.as_millis() as u64,
                ..Default::default()
            };
            t.set_direction(match direction {
                Direction::Above => pb::threshold_condition::Direction::Above,
                Direction::Below => pb::threshold_condition::Direction::Below,
            });
            pb::alert_rule::Condition::Threshold(t)
        }
        Condition::RateOfChange { max_per_minute } => {
            pb::alert_rule::Condition::RateOfChange(pb::RateOfChangeCondition {
                max_change_per_minute: *max_per_minute,
            })
        }
        Condition::Inactivity { silence } => {
            pb::alert_rule::Condition::Inactivity(pb::InactivityCondition {
                silence_millis: silence.as_millis() as u64,
            })
        }
    };
    pb::AlertRule {
        rule_id: rule.id.as_str().to_owned(),
        devices: Some(pb::DeviceSelector {
            selector: Some(selector),
        }),
        sensor: rule
            .sensor
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        severity: severity_to_pb(rule.severity) as i32,
        condition: Some(condition),
        warnings: Vec::new(),
    }
}

pub fn event_to_pb(e: &AlertEventRecord) -> pb::AlertEvent {
    pb::AlertEvent {
        event_id: e.event_id,
        kind: match e.kind {
            EventKind::Fired => pb::AlertEventKind::Fired,
            EventKind::Acked => pb::AlertEventKind::Acked,
            EventKind::Resolved => pb::AlertEventKind::Resolved,
        } as i32,
        alert_id: e.alert_id,
        rule_id: e.rule_id.clone(),
        device_id: e.device_id.clone(),
        sensor: e.sensor.clone(),
        severity: severity_to_pb(e.severity) as i32,
        value: e.value,
        time_unix_nano: e.time.max(0) as u64,
        message: e.message.clone(),
    }
}

pub fn alert_to_pb(a: AlertRecord) -> pb::Alert {
    let open = a.is_open();
    pb::Alert {
        alert_id: a.alert_id,
        rule_id: a.rule_id,
        device_id: a.device_id,
        sensor: a.sensor,
        severity: severity_to_pb(a.severity) as i32,
        open,
        acked: a.acked_time.is_some(),
        fired_value: a.fired_value,
        fired_time_unix_nano: a.fired_time.max(0) as u64,
        acked_time_unix_nano: a.acked_time.unwrap_or(0).max(0) as u64,
        resolved_time_unix_nano: a.resolved_time.unwrap_or(0).max(0) as u64,
        message: a.message,
    }
}
