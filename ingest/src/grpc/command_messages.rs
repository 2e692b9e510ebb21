//! Commands between protobuf and domain values.

use telemetry_proto::v1 as pb;

use crate::domain::command::{CommandKind, CommandState, InvalidCommand};
use crate::storage::commands::CommandRecord;

pub fn kind_from_pb(kind: Option<pb::command::Kind>) -> Result<CommandKind, InvalidCommand> {
    use pb::command::Kind;
    match kind.ok_or(InvalidCommand::NoKind)? {
        Kind::SetSamplingInterval(k) => CommandKind::set_sampling_interval(k.interval_ms),
        Kind::SetBatchSize(k) => CommandKind::set_batch_size(k.batch_size),
        Kind::SetSensorEnabled(k) => CommandKind::set_sensor_enabled(&k.sensor, k.enabled),
        Kind::Reboot(_) => Ok(CommandKind::Reboot),
        Kind::Ping(_) => Ok(CommandKind::Ping),
        Kind::Custom(k) => CommandKind::custom(&k.json),
    }
}

fn kind_to_pb(kind: &CommandKind) -> pb::command::Kind {
    use pb::command::Kind;
    match kind {
        CommandKind::SetSamplingInterval { interval_ms } => {
            Kind::SetSamplingInterval(pb::SetSamplingInterval {
                interval_ms: *interval_ms,
            })
        }
        CommandKind::SetBatchSize { batch_size } => Kind::SetBatchSize(pb::SetBatchSize {
            batch_size: *batch_size,
        }),
        CommandKind::SetSensorEnabled { sensor, enabled } => {
            Kind::SetSensorEnabled(pb::SetSensorEnabled {
                sensor: sensor.clone(),
                enabled: *enabled,
            })
        }
        CommandKind::Reboot => Kind::Reboot(pb::Reboot {}),
        CommandKind::Ping => Kind::Ping(pb::Ping {}),
        CommandKind::Custom { json } => Kind::Custom(pb::CustomCommand {
            json: json.to_string(),
        }),
    }
}

pub fn state_to_pb(state: CommandState) -> pb::CommandState {
    match state {
        CommandState::Queued => pb::CommandState::Queued,
        CommandState::Sent => pb::CommandState::Sent,
        CommandState::Acked => pb::CommandState::Acked,
        CommandState::Failed => pb::CommandState::Failed,
        CommandState::Expired => pb::CommandState::Expired,
    }
}

/// `None` for UNSPECIFIED (no filter).
pub fn state_from_pb(state: i32) -> Option<CommandState> {
    match pb::CommandState::try_from(state).ok()? {
        pb::CommandState::Unspecified => None,
        pb::CommandState::Queued => Some(CommandState::Queued),
        pb::CommandState::Sent => Some(CommandState::Sent),
        pb::CommandState::Acked => Some(CommandState::Acked),
        pb::CommandState::Failed => Some(CommandState::Failed),
        pb::CommandState::Expired => Some(CommandState::Expired),
    }
}

pub fn command_to_pb(c: &CommandRecord) -> pb::Command {
    let nanos = |t: Option<i64>| t.unwrap_or(0).max(0) as u64;
    pb::Command {
        command_id: c.command_id,
        device_id: c.device_id.clone(),
        kind: Some(kind_to_pb(&c.kind)),
        state: state_to_pb(c.state) as i32,
        result: c.result.clone(),
        created_time_unix_nano: c.created.max(0) as u64,
        sent_time_unix_nano: nanos(c.sent),
        finished_time_unix_nano: nanos(c.finished),
        expires_time_unix_nano: c.expires.max(0) as u64,
    }
}
