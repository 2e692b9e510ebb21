//! `ingest rules add | list | rm`: alert rules.
//!
//! Only what clap can check is checked here (exactly one condition, `--clear`
//! with a threshold, ids xor labels); the server owns the rule's semantics and
//! explains anything else with INVALID_ARGUMENT, so the two cannot disagree.

use std::collections::HashMap;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::alert_rule::Condition;
use telemetry_proto::v1::device_selector::Selector;
use telemetry_proto::v1::threshold_condition::Direction;

use super::client::ServerArgs;
use super::output::{Answer, Column, Table, duration_text};

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Create or replace an alert rule.
    Add(Box<AddArgs>),
    /// List the alert rules.
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete an alert rule; its open alerts are resolved.
    Rm {
        #[command(flatten)]
        server: ServerArgs,
        /// The rule's id (see `ingest rules list`).
        rule_id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  ingest rules add temp-high --sensor temperature --severity critical --above 40 --clear 35 --for 30s
  ingest rules add cold --sensor temperature --severity warning --below=-5 --clear=-2 --label site=plant-3
  ingest rules add spike --sensor pressure --severity info --rate-per-minute 5 --device sim-00001
  ingest rules add silent --severity warning --silence 60s")]
pub struct AddArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The rule's id; an existing rule with this id is replaced.
    rule_id: String,
    /// The sensor whose readings are judged (optional for --silence: any
    /// sensor).
    #[arg(long, required_unless_present = "silence")]
    sensor: Option<String>,
    /// How serious the rule's alerts are.
    #[arg(long, value_enum)]
    severity: SeverityArg,
    #[command(flatten)]
    condition: ConditionArgs,
    /// With --above/--below: the value at which the alert resolves again
    /// (on the non-firing side, for hysteresis).
    #[arg(long, allow_negative_numbers = true, conflicts_with_all = ["rate_per_minute", "silence"])]
    clear: Option<f64>,
    /// With --above/--below: how long the condition must hold before firing
    /// (e.g. 30s; default: fire at once).
    #[arg(long = "for", value_name = "DURATION", value_parser = super::duration,
          conflicts_with_all = ["rate_per_minute", "silence"])]
    for_: Option<Duration>,
    #[command(flatten)]
    selector: SelectorArgs,
    /// Print the stored rule as JSON.
    #[arg(long)]
    json: bool,
}

/// The rule's condition: exactly one.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct ConditionArgs {
    /// Fire when the value rises above this (needs --clear).
    #[arg(long, allow_negative_numbers = true, requires = "clear")]
    above: Option<f64>,
    /// Fire when the value falls below this (needs --clear).
    #[arg(long, allow_negative_numbers = true, requires = "clear")]
    below: Option<f64>,
    /// Fire when the value changes by more than this per minute, either way.
    #[arg(long, value_name = "X")]
    rate_per_minute: Option<f64>,
    /// Fire when a device sent no reading (of --sensor, or of any sensor)
    /// for this long, e.g. 60s.
    #[arg(long, value_name = "DURATION", value_parser = super::duration)]
    silence: Option<Duration>,
}

/// Which devices the rule judges; default: all.
#[derive(Debug, Args)]
struct SelectorArgs {
    /// Only this device; repeat for more.
    #[arg(long = "device", value_name = "ID", conflicts_with = "labels")]
    devices: Vec<String>,
    /// Only devices carrying this label, KEY=VALUE; repeat to require more.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = super::parse_label)]
    labels: Vec<(String, String)>,
}

/// A severity on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SeverityArg {
    Info,
    Warning,
    Critical,
}

impl From<SeverityArg> for pb::Severity {
    fn from(s: SeverityArg) -> Self {
        match s {
            SeverityArg::Info => pb::Severity::Info,
            SeverityArg::Warning => pb::Severity::Warning,
            SeverityArg::Critical => pb::Severity::Critical,
        }
    }
}

pub async fn run(cmd: RulesCommand) -> anyhow::Result<()> {
    match cmd {
        RulesCommand::Add(args) => {
            let rule = rule_from_args(&args);
            let stored = args
                .server
                .call(async |ops| {
                    ops.put_alert_rule(pb::PutAlertRuleRequest { rule: Some(rule) })
                        .await
                })
                .await?;
            Answer::stdout(args.json).one(&stored, rule_json, |r| {
                format!("stored rule {}", rule_line(r))
            })?;
            super::output::warn(&stored.warnings);
        }
        RulesCommand::List { server, json } => {
            let mut rules = server
                .call(async |ops| ops.list_alert_rules(pb::ListAlertRulesRequest {}).await)
                .await?
                .rules;
            rules.sort_by(|a, b| a.rule_id.cmp(&b.rule_id));
            Answer::stdout(json).list(&rules, rule_json, table)?;
        }
        RulesCommand::Rm {
            server,
            rule_id,
            json,
        } => {
            server
                .call(async |ops| {
                    ops.delete_alert_rule(pb::DeleteAlertRuleRequest {
                        rule_id: rule_id.clone(),
                    })
                    .await
                })
                .await?;
            Answer::stdout(json).one(
                &rule_id,
                |id| serde_json::json!({ "rule_id": id, "deleted": true }),
                |id| format!("deleted rule {id}"),
            )?;
        }
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn rule_from_args(args: &AddArgs) -> pb::AlertRule {
    let c = &args.condition;
    // clap guarantees exactly one condition and --clear with a threshold; the
    // fallbacks below are unreachable from the command line.
    let threshold = |direction: Direction, fire_value: f64| {
        Condition::Threshold(pb::ThresholdCondition {
            direction: direction.into(),
            fire_value,
            clear_value: args.clear.unwrap_or(fire_value),
            for_millis: args.for_.map(millis).unwrap_or(0),
        })
    };
    let condition = if let Some(x) = c.above {
        Some(threshold(Direction::Above, x))
    } else if let Some(x) = c.below {
        Some(threshold(Direction::Below, x))
    } else if let Some(x) = c.rate_per_minute {
        Some(Condition::RateOfChange(pb::RateOfChangeCondition {
            max_change_per_minute: x,
        }))
    } else {
        c.silence.map(|d| {
            Condition::Inactivity(pb::InactivityCondition {
                silence_millis: millis(d),
            })
        })
    };
    let selector = if !args.selector.devices.is_empty() {
        Selector::Ids(pb::DeviceIdList {
            device_ids: args.selector.devices.clone(),
        })
    } else if !args.selector.labels.is_empty() {
        Selector::Labels(pb::LabelMatch {
            labels: args
                .selector
                .labels
                .iter()
                .cloned()
                .collect::<HashMap<_, _>>(),
        })
    } else {
        Selector::All(true)
    };
    pb::AlertRule {
        rule_id: args.rule_id.clone(),
        devices: Some(pb::DeviceSelector {
            selector: Some(selector),
        }),
        sensor: args.sensor.clone().unwrap_or_default(),
        severity: pb::Severity::from(args.severity).into(),
        condition,
        warnings: Vec::new(),
    }
}

/// `info`, `warning`, `critical`; `-` for unspecified (e.g. heartbeats).
pub(super) fn severity_name(severity: i32) -> &'static str {
    match pb::Severity::try_from(severity) {
        Ok(pb::Severity::Info) => "info",
        Ok(pb::Severity::Warning) => "warning",
        Ok(pb::Severity::Critical) => "critical",
        Ok(pb::Severity::Unspecified) | Err(_) => "-",
    }
}

pub(super) fn severity_json(severity: i32) -> serde_json::Value {
    super::output::name_or_null(severity_name(severity), "-")
}

/// E.g. `above 40 (clear 35, for 30s)`, `rate > 5/min`, `silent 1m`.
fn condition_text(condition: Option<&Condition>) -> String {
    match condition {
        Some(Condition::Threshold(t)) => {
            let direction = match Direction::try_from(t.direction) {
                Ok(Direction::Above) => "above",
                Ok(Direction::Below) => "below",
                Ok(Direction::Unspecified) | Err(_) => "threshold",
            };
            let mut text = format!("{direction} {} (clear {}", t.fire_value, t.clear_value);
            if t.for_millis > 0 {
                text.push_str(&format!(", for {}", duration_text(t.for_millis)));
            }
            text.push(')');
            text
        }
        Some(Condition::RateOfChange(r)) => format!("rate > {}/min", r.max_change_per_minute),
        Some(Condition::Inactivity(i)) => format!("silent {}", duration_text(i.silence_millis)),
        None => "-".into(),
    }
}

/// `all`, `dev-1,dev-2` or `site=plant-3,zone=a`: device ids cannot contain
/// `=`, so ids and labels are told apart without a prefix.
fn devices_text(devices: Option<&pb::DeviceSelector>) -> String {
    match devices.and_then(|d| d.selector.as_ref()) {
        None | Some(Selector::All(_)) => "all".into(),
        Some(Selector::Ids(ids)) if ids.device_ids.is_empty() => "-".into(),
        Some(Selector::Ids(ids)) => ids.device_ids.join(","),
        Some(Selector::Labels(m)) => {
            let mut labels: Vec<_> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            labels.join(",")
        }
    }
}

fn sensor_text(rule: &pb::AlertRule) -> &str {
    if rule.sensor.is_empty() {
        "*"
    } else {
        &rule.sensor
    }
}

/// One line for people, after `stored rule `.
fn rule_line(rule: &pb::AlertRule) -> String {
    format!(
        "{}: {} {} on {} devices: {}",
        rule.rule_id,
        severity_name(rule.severity),
        sensor_text(rule),
        devices_text(rule.devices.as_ref()),
        condition_text(rule.condition.as_ref())
    )
}

fn rule_json(rule: &pb::AlertRule) -> serde_json::Value {
    let devices = match rule.devices.as_ref().and_then(|d| d.selector.as_ref()) {
        None | Some(Selector::All(_)) => serde_json::json!({ "all": true }),
        Some(Selector::Ids(ids)) => serde_json::json!({ "device_ids": ids.device_ids }),
        Some(Selector::Labels(m)) => serde_json::json!({ "labels": m.labels }),
    };
    let condition = match &rule.condition {
        Some(Condition::Threshold(t)) => serde_json::json!({
            "threshold": {
                "direction": match Direction::try_from(t.direction) {
                    Ok(Direction::Above) => "above",
                    Ok(Direction::Below) => "below",
                    Ok(Direction::Unspecified) | Err(_) => "unspecified",
                },
                "fire_value": t.fire_value,
                "clear_value": t.clear_value,
                "for_millis": t.for_millis,
            }
        }),
        Some(Condition::RateOfChange(r)) => serde_json::json!({
            "rate_of_change": { "max_change_per_minute": r.max_change_per_minute }
        }),
        Some(Condition::Inactivity(i)) => serde_json::json!({
            "inactivity": { "silence_millis": i.silence_millis }
        }),
        None => serde_json::Value::Null,
    };
    serde_json::json!({
        "rule_id": rule.rule_id,
        "severity": severity_json(rule.severity),
        "sensor": rule.sensor,
        "devices": devices,
        "condition": condition,
    })
}

fn table(rules: &[pb::AlertRule]) -> Table {
    Table::new([
        Column::left("RULE"),
        Column::left("SEVERITY").keep(),
        Column::left("SENSOR"),
        Column::left("DEVICES"),
        Column::left("CONDITION"),
    ])
    .rows(rules, |rule| {
        [
            rule.rule_id.clone(),
            severity_name(rule.severity).to_owned(),
            sensor_text(rule).to_owned(),
            devices_text(rule.devices.as_ref()),
            condition_text(rule.condition.as_ref()),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RulesCommand, clap::Error> {
        crate::cli::parse_subcommand(args)
    }

    fn add(args: &[&str]) -> pb::AlertRule {
        match parse(&[&["add"], args].concat()).expect("valid arguments") {
            RulesCommand::Add(args) => rule_from_args(&args),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn add_error(args: &[&str]) -> clap::error::ErrorKind {
        crate::cli::refusal::<RulesCommand>("add", args)
    }

    #[test]
    fn threshold_above_with_clear_and_for() {
        let rule = add(&[
            "temp-high",
            "--sensor",
            "temperature",
            "--severity",
            "critical",
            "--above",
            "40",
            "--clear",
            "35",
            "--for",
            "30s",
        ]);
        assert_eq!(rule.rule_id, "temp-high");
        assert_eq!(rule.sensor, "temperature");
        assert_eq!(rule.severity, pb::Severity::Critical as i32);
        assert_eq!(
            rule.devices.and_then(|d| d.selector),
            Some(Selector::All(true))
        );
        assert_eq!(
            rule.condition,
            Some(Condition::Threshold(pb::ThresholdCondition {
                direction: Direction::Above as i32,
                fire_value: 40.0,
                clear_value: 35.0,
                for_millis: 30_000,
            }))
        );
    }

    #[test]
    fn threshold_below_accepts_negative_numbers_and_labels() {
        let rule = add(&[
            "cold",
            "--sensor",
            "temperature",
            "--severity",
            "warning",
            "--below",
            "-5",
            "--clear",
            "-2.5",
            "--label",
            "site=plant-3",
            "--label",
            "zone=a",
        ]);
        assert_eq!(
            rule.condition,
            Some(Condition::Threshold(pb::ThresholdCondition {
                direction: Direction::Below as i32,
                fire_value: -5.0,
                clear_value: -2.5,
                for_millis: 0,
            }))
        );
        let Some(Selector::Labels(m)) = rule.devices.and_then(|d| d.selector) else {
            panic!("expected labels");
        };
        assert_eq!(m.labels.len(), 2);
        assert_eq!(m.labels["site"], "plant-3");
        assert_eq!(m.labels["zone"], "a");
    }

    #[test]
    fn rate_with_devices() {
        let rule = add(&[
            "spike",
            "--sensor",
            "pressure",
            "--severity",
            "info",
            "--rate-per-minute",
            "5",
            "--device",
            "a",
            "--device",
            "b",
        ]);
        assert_eq!(
            rule.condition,
            Some(Condition::RateOfChange(pb::RateOfChangeCondition {
                max_change_per_minute: 5.0
            }))
        );
        assert_eq!(
            rule.devices.and_then(|d| d.selector),
            Some(Selector::Ids(pb::DeviceIdList {
                device_ids: vec!["a".into(), "b".into()]
            }))
        );
    }

    #[test]
    fn silence_without_sensor_means_any_sensor() {
        let rule = add(&["quiet", "--severity", "warning", "--silence", "1m 30s"]);
        assert_eq!(rule.sensor, "");
        assert_eq!(
            rule.condition,
            Some(Condition::Inactivity(pb::InactivityCondition {
                silence_millis: 90_000
            }))
        );
    }

    #[test]
    fn clap_rejects_what_it_can() {
        use clap::error::ErrorKind;
        let base = ["r", "--sensor", "s", "--severity", "info"];
        // No condition, two conditions, threshold without --clear.
        assert_eq!(add_error(&base), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            add_error(
                &[
                    &base[..],
                    &["--above", "1", "--clear", "0", "--rate-per-minute", "2"]
                ]
                .concat()
            ),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            add_error(&[&base[..], &["--above", "1"]].concat()),
            ErrorKind::MissingRequiredArgument
        );
        // --clear/--for only make sense with a threshold.
        assert_eq!(
            add_error(&[&base[..], &["--rate-per-minute", "2", "--clear", "1"]].concat()),
            ErrorKind::ArgumentConflict
        );
        // Ids and labels together.
        assert_eq!(
            add_error(
                &[
                    &base[..],
                    &["--silence", "1s", "--device", "a", "--label", "k=v"]
                ]
                .concat()
            ),
            ErrorKind::ArgumentConflict
        );
        // --sensor is required except for --silence.
        assert_eq!(
            add_error(&["r", "--severity", "info", "--rate-per-minute", "2"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            add_error(&[
                "r",
                "--sensor",
                "s",
                "--severity",
                "fatal",
                "--silence",
                "1s"
            ]),
            ErrorKind::InvalidValue
        );
    }

    fn threshold(direction: Direction, fire: f64, clear: f64, for_millis: u64) -> Condition {
        Condition::Threshold(pb::ThresholdCondition {
            direction: direction as i32,
            fire_value: fire,
            clear_value: clear,
            for_millis,
        })
    }

    #[test]
    fn conditions_read_like_the_flags() {
        let text = |c: Condition| condition_text(Some(&c));
        assert_eq!(
            text(threshold(Direction::Above, 40.0, 35.0, 30_000)),
            "above 40 (clear 35, for 30s)"
        );
        assert_eq!(
            text(threshold(Direction::Below, 20.0, 25.5, 0)),
            "below 20 (clear 25.5)"
        );
        assert_eq!(
            text(Condition::RateOfChange(pb::RateOfChangeCondition {
                max_change_per_minute: 5.0
            })),
            "rate > 5/min"
        );
        assert_eq!(
            text(Condition::Inactivity(pb::InactivityCondition {
                silence_millis: 45_000
            })),
            "silent 45s"
        );
        assert_eq!(condition_text(None), "-");
    }

    #[test]
    fn devices_text_shows_all_ids_or_sorted_labels() {
        let sel = |s: Selector| devices_text(Some(&pb::DeviceSelector { selector: Some(s) }));
        assert_eq!(devices_text(None), "all");
        assert_eq!(sel(Selector::All(true)), "all");
        assert_eq!(
            sel(Selector::Ids(pb::DeviceIdList {
                device_ids: vec!["a".into(), "b".into()]
            })),
            "a,b"
        );
        assert_eq!(
            sel(Selector::Labels(pb::LabelMatch {
                labels: [("z".into(), "1".into()), ("a".into(), "2".into())].into()
            })),
            "a=2,z=1"
        );
    }

    #[test]
    fn rule_line_and_json() {
        let rule = pb::AlertRule {
            rule_id: "quiet".into(),
            devices: None,
            sensor: String::new(),
            severity: pb::Severity::Warning as i32,
            condition: Some(Condition::Inactivity(pb::InactivityCondition {
                silence_millis: 60_000,
            })),
            warnings: Vec::new(),
        };
        assert_eq!(
            rule_line(&rule),
            "quiet: warning * on all devices: silent 1m"
        );
        assert_eq!(
            rule_json(&rule),
            serde_json::json!({
                "rule_id": "quiet",
                "severity": "warning",
                "sensor": "",
                "devices": { "all": true },
                "condition": { "inactivity": { "silence_millis": 60_000 } },
            })
        );
    }

    #[test]
    fn table_has_a_header_and_a_row_per_rule() {
        let rule = pb::AlertRule {
            rule_id: "temp-high".into(),
            devices: None,
            sensor: "temperature".into(),
            severity: pb::Severity::Critical as i32,
            condition: Some(threshold(Direction::Above, 40.0, 35.0, 0)),
            warnings: Vec::new(),
        };
        let text = table(&[rule]).to_string();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("RULE "));
        assert!(lines[1].starts_with("temp-high "));
        assert!(
            lines[1].ends_with("  all      above 40 (clear 35)"),
            "{text}"
        );
    }
}
