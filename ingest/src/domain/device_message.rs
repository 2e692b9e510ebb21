//! What a device may say on its Control stream: the limits on its Hello,
//! status and acknowledgements. A message past them ends the stream with
//! INVALID_ARGUMENT naming the field, before anything of it is stored.

use super::reading::SensorName;
use super::text::{InvalidText, Layout, Text, check};

/// Why a device's Control message was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidDeviceMessage {
    #[error(transparent)]
    Text(#[from] InvalidText),
    #[error("{field} has {count} entries, at most {max}")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error(
        "DeviceHello.config.disabled_sensors has {0:?}, which is not a sensor name (lowercase letters, digits, '_', '.', '-', '/', starting with a letter)"
    )]
    DisabledSensor(String),
    #[error("DeviceStatus.battery_percent is {0}; it must be between 0 and 100")]
    Battery(f64),
    #[error("DeviceStatus.signal_dbm is {0}; it must be between {min} and {max}", min = SIGNAL_DBM.0, max = SIGNAL_DBM.1)]
    Signal(i32),
}

pub const FIRMWARE_MAX_CHARS: usize = 128;
pub const MAX_CAPABILITIES: usize = 64;
pub const CAPABILITY_MAX_CHARS: usize = 64;
pub const MAX_DISABLED_SENSORS: usize = 1024;
pub const ACK_DETAIL_MAX_CHARS: usize = 4096;
/// Received signal strength a radio can report, in dBm.
const SIGNAL_DBM: (i32, i32) = (-200, 50);

/// A DeviceHello's firmware version, checked; `None` when empty.
pub fn firmware_version(s: &str) -> Result<Option<Text>, InvalidDeviceMessage> {
    let text = Text::parse(
        || "DeviceHello.firmware_version".into(),
        s,
        FIRMWARE_MAX_CHARS,
        Layout::SingleLine,
    )?;
    Ok(Some(text).filter(|t| !t.as_str().is_empty()))
}

/// Checks a DeviceHello's lists: capabilities and disabled sensors.
pub fn hello_lists(
    capabilities: &[String],
    disabled_sensors: &[String],
) -> Result<(), InvalidDeviceMessage> {
    if capabilities.len() > MAX_CAPABILITIES {
        return Err(InvalidDeviceMessage::TooMany {
            field: "DeviceHello.capabilities",
            count: capabilities.len(),
            max: MAX_CAPABILITIES,
        });
    }
    for (i, c) in capabilities.iter().enumerate() {
        check(
            || format!("DeviceHello.capabilities[{i}]"),
            c,
            CAPABILITY_MAX_CHARS,
            Layout::SingleLine,
        )?;
    }
    if disabled_sensors.len() > MAX_DISABLED_SENSORS {
        return Err(InvalidDeviceMessage::TooMany {
            field: "DeviceHello.config.disabled_sensors",
            count: disabled_sensors.len(),
            max: MAX_DISABLED_SENSORS,
        });
    }
    for s in disabled_sensors {
        if SensorName::parse(s, SensorName::HARD_MAX_LEN).is_err() {
            return Err(InvalidDeviceMessage::DisabledSensor(
                s.chars().take(80).collect(),
            ));
        }
    }
    Ok(())
}

/// Checks a DeviceStatus's values.
pub fn status(
    battery_percent: Option<f64>,
    signal_dbm: Option<i32>,
) -> Result<(), InvalidDeviceMessage> {
    if let Some(b) = battery_percent
        && !(0.0..=100.0).contains(&b)
    {
        return Err(InvalidDeviceMessage::Battery(b));
    }
    if let Some(s) = signal_dbm
        && !(SIGNAL_DBM.0..=SIGNAL_DBM.1).contains(&s)
    {
        return Err(InvalidDeviceMessage::Signal(s));
    }
    Ok(())
}

/// A CommandAck's detail, which becomes the command's result.
pub fn ack_detail(command_id: u64, s: &str) -> Result<Text, InvalidDeviceMessage> {
    Ok(Text::parse(
        || format!("CommandAck.detail (command {command_id})"),
        s,
        ACK_DETAIL_MAX_CHARS,
        Layout::MultiLine,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware() {
        assert_eq!(firmware_version("").unwrap(), None);
        assert_eq!(
            firmware_version("sim-1.0").unwrap().unwrap().as_str(),
            "sim-1.0"
        );
        let err = firmware_version("v1\0").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("DeviceHello.firmware_version contains NUL"),
            "{err}"
        );
        assert!(firmware_version(&"1".repeat(129)).is_err());
    }

    #[test]
    fn lists() {
        let caps = vec!["ping".to_owned(); 3];
        assert!(hello_lists(&caps, &["humidity".into()]).is_ok());
        assert!(hello_lists(&vec!["x".to_owned(); 65], &[]).is_err());
        assert!(hello_lists(&["\x1b]0;x".into()], &[]).is_err());
        assert!(hello_lists(&[], &["Bad Name".into()]).is_err());
    }

    #[test]
    fn status_values() {
        assert!(status(Some(55.5), Some(-70)).is_ok());
        assert!(status(None, None).is_ok());
        for b in [f64::NAN, f64::INFINITY, -1.0, 100.5] {
            assert!(status(Some(b), None).is_err(), "{b}");
        }
        assert!(status(None, Some(i32::MAX)).is_err());
    }

    #[test]
    fn ack_details_may_span_lines() {
        assert!(ack_detail(1, "failed:\n  sensor offline").is_ok());
        let err = ack_detail(7, "ok\0").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("CommandAck.detail (command 7) contains NUL"),
            "{err}"
        );
        assert!(ack_detail(1, &"x".repeat(4097)).is_err());
    }
}
