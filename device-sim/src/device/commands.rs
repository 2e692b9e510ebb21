//! What a device does with a command: change how it samples, reboot,
//! answer a ping, take a custom payload; and the acknowledgement it sends.
//!
//! The server redelivers commands that were not acknowledged when a stream
//! broke, so the same command id may arrive more than once. The device
//! remembers the acknowledgements of its recent commands and answers a
//! repeat with the same acknowledgement, without carrying it out again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use telemetry_proto::v1::command::Kind;
use telemetry_proto::v1::{
    Command, CommandAck, CommandAckState, CustomCommand, SetBatchSize, SetSamplingInterval,
    SetSensorEnabled,
};
use tracing::{debug, info};

use super::settings::DeviceShared;
use crate::report::Stats;
use crate::sensors::sensor_name;

/// The commands a device says it understands, in its hello.
pub const CAPABILITIES: [&str; 6] = [
    "set_sampling_interval",
    "set_batch_size",
    "set_sensor_enabled",
    "reboot",
    "ping",
    "custom",
];

/// Acknowledgements remembered for answering redelivered commands.
const RECENT_COMMANDS: usize = 1024;
/// Accepted sampling intervals, in milliseconds (10 ms to 1 h).
const INTERVAL_MS: std::ops::RangeInclusive<u32> = 10..=3_600_000;
const MAX_BATCH_SIZE: u32 = 100_000;
/// Readings one batch may hold (batch size times sensors): the server's
/// default limit, beyond which it refuses the upload and the device would
/// stop.
const MAX_BATCH_READINGS: u64 = 10_000;

/// What carrying out a command led to.
pub struct Outcome {
    pub ack: CommandAck,
    pub reboot: bool,
}

/// Acknowledgements of the most recent commands, by id, oldest evicted
/// first.
#[derive(Debug, Default)]
struct RecentAcks {
    acks: HashMap<u64, CommandAck>,
    order: VecDeque<u64>,
}

impl RecentAcks {
    fn get(&self, id: u64) -> Option<&CommandAck> {
        self.acks.get(&id)
    }

    fn insert(&mut self, ack: CommandAck) {
        if self.order.len() >= RECENT_COMMANDS
            && let Some(oldest) = self.order.pop_front()
        {
            self.acks.remove(&oldest);
        }
        self.order.push_back(ack.command_id);
        self.acks.insert(ack.command_id, ack);
    }
}
/// Carries out the commands of one device.
pub struct Commands {
    device_id: String,
    shared: Arc<DeviceShared>,
    stats: Arc<Stats>,
    /// Every sensor of the device, enabled or not.
    sensors: Vec<String>,
    recent: RecentAcks,
}

impl Commands {
    pub fn new(
        device_id: String,
        shared: Arc<DeviceShared>,
        stats: Arc<Stats>,
        sensors: usize,
    ) -> Self {
        Self {
            device_id,
            shared,
            stats,
            sensors: (0..sensors).map(sensor_name).collect(),
            recent: RecentAcks::default(),
        }
    }

    /// Carries out `command` unless it was handled already, and says how to
    /// acknowledge it.
    pub fn handle(&mut self, command: Command) -> Outcome {
        self.stats.commands_received.inc();
        let id = command.command_id;
        if let Some(ack) = self.recent.get(id) {
            self.stats.commands_repeated.inc();
            debug!(device = %self.device_id, id, "command already handled; acknowledging again");
            return Outcome {
                ack: ack.clone(),
                reboot: false,
            };
        }
        let (state, detail, reboot) = match self.apply(command.kind) {
            Ok((detail, reboot)) => {
                self.stats.commands_done.inc();
                info!(device = %self.device_id, id, "command done: {detail}");
                (CommandAckState::Done, detail, reboot)
            }
            Err(reason) => {
                self.stats.commands_failed.inc();
                info!(device = %self.device_id, id, "command failed: {reason}");
                (CommandAckState::Failed, reason, false)
            }
        };
        let ack = CommandAck {
            command_id: id,
            state: state.into(),
            detail,
        };
        self.recent.insert(ack.clone());
        Outcome { ack, reboot }
    }

    /// Carries out one command: the detail for a DONE acknowledgement and
    /// whether to reboot, or the reason for FAILED.
    fn apply(&mut self, kind: Option<Kind>) -> Result<(String, bool), String> {
        let detail = match kind {
            None => {
                return Err("unknown command kind (the server is newer than this firmware)".into());
            }
            Some(Kind::SetSamplingInterval(SetSamplingInterval { interval_ms })) => {
                if !INTERVAL_MS.contains(&interval_ms) {
                    return Err(format!(
                        "interval {interval_ms} ms is out of range (10 ms to 1 h)"
                    ));
                }
                let interval = Duration::from_millis(u64::from(interval_ms));
                self.shared
                    .settings
                    .send_modify(|settings| settings.interval = interval);
                format!("interval {interval_ms} ms")
            }
            Some(Kind::SetBatchSize(SetBatchSize { batch_size })) => {
                if batch_size == 0 {
                    return Err("batch size must be at least 1".into());
                }
                if batch_size > MAX_BATCH_SIZE {
                    return Err(format!(
                        "batch size {batch_size} is above the limit of {MAX_BATCH_SIZE}"
                    ));
                }
                let readings = u64::from(batch_size) * self.sensors.len() as u64;
                if readings > MAX_BATCH_READINGS {
                    return Err(format!(
                        "batch size {batch_size} with {} sensors makes {readings} readings per \
                         batch, above the limit of {MAX_BATCH_READINGS}",
                        self.sensors.len()
                    ));
                }
                self.shared
                    .settings
                    .send_modify(|settings| settings.batch_size = batch_size as usize);
                format!("batch size {batch_size}")
            }
            Some(Kind::SetSensorEnabled(SetSensorEnabled { sensor, enabled })) => {
                if !self.sensors.contains(&sensor) {
                    return Err(format!(
                        "unknown sensor {sensor:?} (this device has {})",
                        self.sensors.join(", ")
                    ));
                }
                let detail = format!("{sensor} {}", if enabled { "enabled" } else { "disabled" });
                self.shared.settings.send_if_modified(|settings| {
                    if enabled {
                        settings.disabled.remove(&sensor)
                    } else {
                        settings.disabled.insert(sensor)
                    }
                });
                detail
            }
            Some(Kind::Reboot(_)) => return Ok(("rebooting".into(), true)),
            Some(Kind::Ping(_)) => "pong".into(),
            Some(Kind::Custom(CustomCommand { json })) => {
                serde_json::from_str::<serde_json::Value>(&json)
                    .map_err(|e| format!("not valid JSON: {e}"))?;
                format!("custom command received ({} bytes of JSON)", json.len())
            }
        };
        Ok((detail, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_acks_are_bounded() {
        let mut recent = RecentAcks::default();
        for id in 0..RECENT_COMMANDS as u64 + 10 {
            recent.insert(CommandAck {
                command_id: id,
                state: CommandAckState::Done.into(),
                detail: "pong".into(),
            });
        }
        assert!(recent.get(9).is_none());
        assert!(recent.get(10).is_some());
        assert_eq!(recent.acks.len(), RECENT_COMMANDS);
    }
}
