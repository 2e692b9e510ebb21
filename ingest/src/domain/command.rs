//! Commands for devices: the typed kinds, their limits, and the states a
//! command moves through.

use serde::{Deserialize, Serialize};

use super::reading::SensorName;

/// Why a command was refused; shown to the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCommand {
    #[error("a command needs a kind")]
    NoKind,
    #[error("sampling interval must be between 10 ms and 1 h; got {0} ms")]
    Interval(u32),
    #[error("batch size must be between 1 and 100000; got {0}")]
    BatchSize(u32),
    #[error("sensor name {0:?} is invalid: {rule}", rule = super::SensorName::RULE)]
    Sensor(String),
    #[error("custom command: {0}")]
    Custom(String),
    #[error("ttl must be at most 7 days")]
    Ttl,
}

/// What a command asks of a device, with valid arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommandKind {
    SetSamplingInterval { interval_ms: u32 },
    SetBatchSize { batch_size: u32 },
    SetSensorEnabled { sensor: String, enabled: bool },
    Reboot,
    Ping,
    Custom { json: serde_json::Value },
}

impl CommandKind {
    pub const MAX_CUSTOM_BYTES: usize = 16 * 1024;

    pub fn set_sampling_interval(interval_ms: u32) -> Result<Self, InvalidCommand> {
        if (10..=3_600_000).contains(&interval_ms) {
            Ok(Self::SetSamplingInterval { interval_ms })
        } else {
            Err(InvalidCommand::Interval(interval_ms))
        }
    }

    pub fn set_batch_size(batch_size: u32) -> Result<Self, InvalidCommand> {
        if (1..=100_000).contains(&batch_size) {
            Ok(Self::SetBatchSize { batch_size })
        } else {
            Err(InvalidCommand::BatchSize(batch_size))
        }
    }

    pub fn set_sensor_enabled(sensor: &str, enabled: bool) -> Result<Self, InvalidCommand> {
        SensorName::parse(sensor, SensorName::HARD_MAX_LEN)
            .map_err(|_| InvalidCommand::Sensor(sensor.to_owned()))?;
        Ok(Self::SetSensorEnabled {
            sensor: sensor.to_owned(),
            enabled,
        })
    }

    pub fn custom(json: &str) -> Result<Self, InvalidCommand> {
        if json.len() > Self::MAX_CUSTOM_BYTES {
            return Err(InvalidCommand::Custom(format!(
                "payload is {} bytes, at most {}",
                json.len(),
                Self::MAX_CUSTOM_BYTES
            )));
        }
        let json = serde_json::from_str(json)
            .map_err(|e| InvalidCommand::Custom(format!("payload is not JSON: {e}")))?;
        Ok(Self::Custom { json })
    }

    /// The name stored in `commands.kind`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SetSamplingInterval { .. } => "set_sampling_interval",
            Self::SetBatchSize { .. } => "set_batch_size",
            Self::SetSensorEnabled { .. } => "set_sensor_enabled",
            Self::Reboot => "reboot",
            Self::Ping => "ping",
            Self::Custom { .. } => "custom",
        }
    }

    /// The arguments stored in `commands.arguments`, a JSON object.
    pub fn arguments(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("commands serialise");
        if let Some(map) = value.as_object_mut() {
            map.remove("kind");
        }
        value
    }

    /// Rebuilds a kind from its stored name and arguments.
    pub fn from_stored(name: &str, arguments: &str) -> Result<Self, String> {
        let mut value: serde_json::Value =
            serde_json::from_str(arguments).map_err(|e| e.to_string())?;
        let map = value.as_object_mut().ok_or("arguments are not an object")?;
        map.insert("kind".into(), serde_json::Value::String(name.to_owned()));
        serde_json::from_value(value).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandState {
    Queued,
    Sent,
    Acked,
    Failed,
    Expired,
}

impl CommandState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sent => "sent",
            Self::Acked => "acked",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(Self::Queued),
            "sent" => Some(Self::Sent),
            "acked" => Some(Self::Acked),
            "failed" => Some(Self::Failed),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }

    /// No further transition happens from here.
    pub fn is_final(self) -> bool {
        match self {
            Self::Acked | Self::Failed | Self::Expired => true,
            Self::Queued | Self::Sent => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_validate_and_round_trip_through_storage() {
        assert!(CommandKind::set_sampling_interval(5).is_err());
        assert!(CommandKind::set_batch_size(0).is_err());
        assert!(CommandKind::set_sensor_enabled("Bad Name", true).is_err());
        assert!(CommandKind::custom("{nope").is_err());
        for kind in [
            CommandKind::set_sampling_interval(500).unwrap(),
            CommandKind::set_batch_size(20).unwrap(),
            CommandKind::set_sensor_enabled("humidity", false).unwrap(),
            CommandKind::Reboot,
            CommandKind::Ping,
            CommandKind::custom(r#"{"led":"blink","times":3}"#).unwrap(),
        ] {
            let stored = kind.arguments().to_string();
            assert_eq!(
                CommandKind::from_stored(kind.name(), &stored).unwrap(),
                kind
            );
        }
    }

    #[test]
    fn final_states() {
        assert!(!CommandState::Queued.is_final() && !CommandState::Sent.is_final());
        assert!(
            CommandState::Acked.is_final()
                && CommandState::Failed.is_final()
                && CommandState::Expired.is_final()
        );
    }
}
