//! Commands over MQTT: the topics, the command as JSON, the device's
//! result.
//!
//! A device subscribes to `devices/{id}/commands/+`; each command arrives
//! at QoS 1 on `devices/{id}/commands/{command_id}` as the proto3 JSON
//! mapping of `Command` (64-bit numbers as strings, enums by name, the
//! kind as its oneof field). Its PUBACK marks the command SENT; its result,
//! published to `devices/{id}/commands/{command_id}/result` as
//! `{"success": true, "detail": "…"}`, marks it ACKED or FAILED.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::domain::DeviceId;
use crate::domain::command::{CommandKind, CommandState};
use crate::domain::device_message::{self, InvalidDeviceMessage};
use crate::storage::commands::CommandRecord;

/// Whether `filter` is the device's command filter: `devices/{id}/commands/+`
/// (or `/#`).
pub fn is_command_filter(filter: &str, device: &DeviceId) -> bool {
    filter
        .strip_prefix("devices/")
        .and_then(|f| f.strip_prefix(device.as_str()))
        .is_some_and(|f| f == "/commands/+" || f == "/commands/#")
}

pub fn command_topic(device: &DeviceId, command_id: u64) -> String {
    format!("devices/{device}/commands/{command_id}")
}

/// The command id of a result topic's tail (`commands/{id}/result`, after
/// `devices/{id}/`).
pub fn result_topic(rest: &str) -> Option<u64> {
    rest.strip_prefix("commands/")?
        .strip_suffix("/result")?
        .parse()
        .ok()
}

/// The command as the proto3 JSON mapping of `telemetry.v1.Command`.
pub fn command_json(command: &CommandRecord) -> Bytes {
    let (field, arguments) = match &command.kind {
        CommandKind::SetSamplingInterval { interval_ms } => {
            ("setSamplingInterval", json!({ "intervalMs": interval_ms }))
        }
        CommandKind::SetBatchSize { batch_size } => {
            ("setBatchSize", json!({ "batchSize": batch_size }))
        }
        CommandKind::SetSensorEnabled { sensor, enabled } => (
            "setSensorEnabled",
            json!({ "sensor": sensor, "enabled": enabled }),
        ),
        CommandKind::Reboot => ("reboot", json!({})),
        CommandKind::Ping => ("ping", json!({})),
        CommandKind::Custom { json } => ("custom", json!({ "json": json.to_string() })),
    };
    let mut out = json!({
        "commandId": command.command_id.to_string(),
        "deviceId": command.device_id,
        "state": state_name(command.state),
        "createdTimeUnixNano": command.created.to_string(),
        "expiresTimeUnixNano": command.expires.to_string(),
    });
    if let Value::Object(map) = &mut out {
        map.insert(field.to_owned(), arguments);
        if let Some(sent) = command.sent {
            map.insert("sentTimeUnixNano".into(), Value::String(sent.to_string()));
        }
    }
    Bytes::from(out.to_string())
}

fn state_name(state: CommandState) -> &'static str {
    match state {
        CommandState::Queued => "COMMAND_STATE_QUEUED",
        CommandState::Sent => "COMMAND_STATE_SENT",
        CommandState::Acked => "COMMAND_STATE_ACKED",
        CommandState::Failed => "COMMAND_STATE_FAILED",
        CommandState::Expired => "COMMAND_STATE_EXPIRED",
    }
}

/// Why a result payload is refused.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error(r#"the result is not {{"success": true|false, "detail": "…"}}: {0}"#)]
    Json(String),
    #[error(transparent)]
    Detail(#[from] InvalidDeviceMessage),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonResult {
    success: bool,
    #[serde(default)]
    detail: String,
}

/// The state and detail a device's result reports.
pub fn decode_result(
    command_id: u64,
    payload: &[u8],
) -> Result<(CommandState, String), ResultError> {
    let result: JsonResult =
        serde_json::from_slice(payload).map_err(|e| ResultError::Json(e.to_string()))?;
    let detail = device_message::ack_detail(command_id, &result.detail)?;
    let state = if result.success {
        CommandState::Acked
    } else {
        CommandState::Failed
    };
    Ok((state, detail.as_str().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_devices_own_command_filter_is_one() {
        let d = DeviceId::parse("dev-1").unwrap();
        assert!(is_command_filter("devices/dev-1/commands/+", &d));
        assert!(is_command_filter("devices/dev-1/commands/#", &d));
        for other in [
            "devices/dev-2/commands/+",
            "devices/dev-1/commands/7",
            "devices/+/commands/+",
            "#",
            "devices/dev-10/commands/+",
        ] {
            assert!(!is_command_filter(other, &d), "{other}");
        }
    }

    #[test]
    fn result_topics_name_their_command() {
        assert_eq!(result_topic("commands/42/result"), Some(42));
        assert_eq!(result_topic("commands/x/result"), None);
        assert_eq!(result_topic("commands/42"), None);
    }

    #[test]
    fn a_command_is_its_proto3_json() {
        let command = CommandRecord {
            command_id: 12,
            device_pk: 1,
            device_id: "dev-1".into(),
            kind: CommandKind::SetSamplingInterval { interval_ms: 500 },
            state: CommandState::Sent,
            result: String::new(),
            created: 5,
            sent: Some(6),
            finished: None,
            expires: 9,
        };
        let value: Value = serde_json::from_slice(&command_json(&command)).unwrap();
        assert_eq!(value["commandId"], "12");
        assert_eq!(value["setSamplingInterval"]["intervalMs"], 500);
        assert_eq!(value["state"], "COMMAND_STATE_SENT");
        assert_eq!(value["expiresTimeUnixNano"], "9");
    }

    #[test]
    fn a_result_says_success_or_failure() {
        assert_eq!(
            decode_result(1, br#"{"success":true,"detail":"done"}"#).unwrap(),
            (CommandState::Acked, "done".into())
        );
        assert_eq!(
            decode_result(1, br#"{"success":false}"#).unwrap().0,
            CommandState::Failed
        );
        assert!(decode_result(1, br#"{"ok":true}"#).is_err());
    }
}
