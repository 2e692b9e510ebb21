//! `ingest command send | get | list`: commands for devices.
//!
//! As with rules, only what the command line can express is checked here (a
//! duration that is a whole number of milliseconds, a custom payload that is
//! JSON at all); the server owns the limits and explains a refusal with
//! INVALID_ARGUMENT.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::command::Kind;

use super::client::ServerArgs;
use super::output::{Answer, Column, Table, duration_text, or_dash, reply, time};

#[derive(Debug, Subcommand)]
pub enum CommandCommand {
    /// Send a command to a device and print it (with --wait: once the device
    /// answered).
    Send(Box<SendArgs>),
    /// Show one command.
    Get {
        #[command(flatten)]
        server: ServerArgs,
        /// The command's id, as `command send` printed it.
        command_id: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List commands, optionally of one device or in one state.
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// Only commands of this device.
        #[arg(long = "device", value_name = "ID")]
        device: Option<String>,
        /// Only commands in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// At most this many commands; 0 for all.
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

// The options are global so they can follow KIND and its argument
// (`send sim-00001 set-interval 500ms --wait 5s`) as well as precede it.
#[derive(Debug, Args)]
#[command(
    mut_arg("server", |a| a.global(true)),
    mut_arg("ops_token_file", |a| a.global(true)),
    disable_help_subcommand = true,
    after_help = "\
Examples:
  ingest command send sim-00001 set-interval 500ms --wait 5s
  ingest command send sim-00001 disable-sensor humidity --ttl 10m
  ingest command send sim-00001 custom '{\"led\": \"blink\"}' --json

Exit status: 0 when the command was ACKED (without --wait, also when it is
still QUEUED or SENT); 1 when it FAILED or EXPIRED, or on any error; 2 when
--wait ran out before the command reached a final state (its state is
printed; follow it with `ingest command get ID`)."
)]
pub struct SendArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The device's id.
    #[arg(value_name = "DEVICE")]
    device_id: String,
    #[command(subcommand)]
    kind: KindArgs,
    /// Wait up to this long (e.g. 5s) for the device's answer: ACKED, FAILED
    /// or EXPIRED. Default: return once the command is stored.
    #[arg(long, global = true, value_name = "DURATION", value_parser = super::duration)]
    wait: Option<Duration>,
    /// Expire the command if it is not delivered within this long (e.g.
    /// 10m). Default: the server's.
    #[arg(long, global = true, value_name = "DURATION", value_parser = super::duration)]
    ttl: Option<Duration>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

/// What the device is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
#[command(subcommand_value_name = "KIND", subcommand_help_heading = "Kinds")]
enum KindArgs {
    /// Set the time between two samples of each sensor.
    SetInterval {
        /// E.g. 500ms, 2s, 1m: a whole number of milliseconds.
        #[arg(value_name = "DURATION", value_parser = parse_interval_ms)]
        interval_ms: u32,
    },
    /// Set the number of samples per sensor in one batch.
    SetBatchSize {
        /// Samples per sensor in one batch.
        batch_size: u32,
    },
    /// Turn a sensor on.
    EnableSensor {
        /// The sensor's name, as the device reports it.
        sensor: String,
    },
    /// Turn a sensor off.
    DisableSensor {
        /// The sensor's name, as the device reports it.
        sensor: String,
    },
    /// Restart the device.
    Reboot,
    /// Ask the device to answer, to check that it listens.
    Ping,
    /// A JSON document the device interprets.
    Custom {
        /// The document, e.g. '{"led": "blink"}' (quoted for the shell).
        // Not `json`: that is the --json option's id.
        #[arg(value_name = "JSON", value_parser = parse_json, allow_hyphen_values = true)]
        payload: String,
    },
    /// Any other word: refused with the list of kinds (clap's own error
    /// would only say the word is unexpected).
    #[command(external_subcommand)]
    Unknown(Vec<String>),
}

/// The kinds as typed, for the error about an unknown one.
const KINDS: &str = "set-interval DURATION, set-batch-size N, enable-sensor SENSOR, \
     disable-sensor SENSOR, reboot, ping, custom JSON";

impl KindArgs {
    fn to_proto(&self) -> anyhow::Result<Kind> {
        Ok(match self {
            Self::SetInterval { interval_ms } => {
                Kind::SetSamplingInterval(pb::SetSamplingInterval {
                    interval_ms: *interval_ms,
                })
            }
            Self::SetBatchSize { batch_size } => Kind::SetBatchSize(pb::SetBatchSize {
                batch_size: *batch_size,
            }),
            Self::EnableSensor { sensor } => Kind::SetSensorEnabled(pb::SetSensorEnabled {
                sensor: sensor.clone(),
                enabled: true,
            }),
            Self::DisableSensor { sensor } => Kind::SetSensorEnabled(pb::SetSensorEnabled {
                sensor: sensor.clone(),
                enabled: false,
            }),
            Self::Reboot => Kind::Reboot(pb::Reboot {}),
            Self::Ping => Kind::Ping(pb::Ping {}),
            Self::Custom { payload } => Kind::Custom(pb::CustomCommand {
                json: payload.clone(),
            }),
            Self::Unknown(words) => anyhow::bail!(
                "unknown command kind `{}`: the kinds are {KINDS} (see `ingest command send --help`)",
                words.first().map_or("", String::as_str)
            ),
        })
    }
}

/// A duration on the command line as whole milliseconds.
fn parse_interval_ms(s: &str) -> Result<u32, String> {
    let d = super::whole_millis(s)?;
    u32::try_from(d.as_millis()).map_err(|_| format!("{s} is too long"))
}

/// The payload as typed (the device may care about key order), once it is
/// known to be JSON.
fn parse_json(s: &str) -> Result<String, String> {
    serde_json::from_str::<serde_json::Value>(s).map_err(|e| format!("not JSON: {e}"))?;
    Ok(s.to_owned())
}

/// A command state on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    Queued,
    Sent,
    Acked,
    Failed,
    Expired,
}

impl From<StateArg> for pb::CommandState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Queued => pb::CommandState::Queued,
            StateArg::Sent => pb::CommandState::Sent,
            StateArg::Acked => pb::CommandState::Acked,
            StateArg::Failed => pb::CommandState::Failed,
            StateArg::Expired => pb::CommandState::Expired,
        }
    }
}

const PAGE_SIZE: usize = 500;

pub async fn run(cmd: CommandCommand) -> anyhow::Result<()> {
    match cmd {
        CommandCommand::Send(args) => {
            let wait_millis = args.wait.map_or(0, millis);
            let request = pb::SendCommandRequest {
                device_id: args.device_id.clone(),
                command: Some(pb::Command {
                    kind: Some(args.kind.to_proto()?),
                    ..Default::default()
                }),
                ttl_millis: args.ttl.map_or(0, millis),
                wait_millis,
            };
            let mut ops = args.server.ops().await?;
            let command = reply(ops.send_command(request).await)?;
            Answer::stdout(args.json).one(&command, command_json, command_line)?;
            let code = exit_code(command.state, wait_millis > 0);
            if code == 2 && command.state == pb::CommandState::Queued as i32 {
                let device = reply(
                    ops.get_device(pb::GetDeviceRequest {
                        device_id: args.device_id.clone(),
                    })
                    .await,
                )?;
                if !device.online {
                    eprintln!(
                        "device {} is offline: command {} stays queued until it connects \
                         (or expires at {}); follow it with `ingest command get {}`",
                        args.device_id,
                        command.command_id,
                        time(command.expires_time_unix_nano),
                        command.command_id
                    );
                }
            }
            if code != 0 {
                // main knows only success and failure; the status tells a
                // script why.
                std::process::exit(code);
            }
        }
        CommandCommand::Get {
            server,
            command_id,
            json,
        } => {
            let command = server
                .call(async |ops| ops.get_command(pb::GetCommandRequest { command_id }).await)
                .await?;
            Answer::stdout(json).one(&command, command_json, |c| table(std::slice::from_ref(c)))?;
        }
        CommandCommand::List {
            server,
            device,
            state,
            limit,
            json,
        } => {
            let mut ops = server.ops().await?;
            let mut commands = Vec::new();
            let mut page_token = String::new();
            while let Some(page_size) = next_page_size(limit, commands.len()) {
                let page = reply(
                    ops.list_commands(pb::ListCommandsRequest {
                        device_id: device.clone().unwrap_or_default(),
                        state: state.map_or(pb::CommandState::Unspecified, Into::into) as i32,
                        page_size,
                        page_token,
                    })
                    .await,
                )?;
                let empty = page.commands.is_empty();
                commands.extend(page.commands);
                if page.next_page_token.is_empty() || empty {
                    break;
                }
                page_token = page.next_page_token;
            }
            if limit > 0 {
                commands.truncate(limit);
            }
            // Clipped, so that a long custom payload or result does not
            // push the table past a terminal's width.
            Answer::stdout(json).list(&commands, command_json, |c| table(c).clip(40))?;
        }
    }
    Ok(())
}

/// How many commands to ask for next, having `have` of at most `limit` (0:
/// no limit); `None` when there are enough.
fn next_page_size(limit: usize, have: usize) -> Option<u32> {
    let want = if limit == 0 {
        PAGE_SIZE
    } else {
        limit.saturating_sub(have).min(PAGE_SIZE)
    };
    (want > 0).then_some(want as u32)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The process's exit status for a sent command: 0 when it was ACKED (or,
/// without waiting, is on its way), 1 when it FAILED or EXPIRED, 2 when the
/// wait ran out before a final state.
fn exit_code(state: i32, waited: bool) -> i32 {
    match pb::CommandState::try_from(state) {
        Ok(pb::CommandState::Acked) => 0,
        Ok(pb::CommandState::Queued | pb::CommandState::Sent) => {
            if waited {
                2
            } else {
                0
            }
        }
        Ok(pb::CommandState::Failed | pb::CommandState::Expired) => 1,
        Ok(pb::CommandState::Unspecified) | Err(_) => 1,
    }
}

/// `queued`, `sent`, `acked`, `failed`, `expired`; `unknown` otherwise.
fn state_name(state: i32) -> &'static str {
    match pb::CommandState::try_from(state) {
        Ok(pb::CommandState::Queued) => "queued",
        Ok(pb::CommandState::Sent) => "sent",
        Ok(pb::CommandState::Acked) => "acked",
        Ok(pb::CommandState::Failed) => "failed",
        Ok(pb::CommandState::Expired) => "expired",
        Ok(pb::CommandState::Unspecified) | Err(_) => "unknown",
    }
}

fn state_json(state: i32) -> serde_json::Value {
    super::output::name_or_null(state_name(state), "unknown")
}

/// The command as it is typed: `set-interval 500ms`, `disable-sensor
/// humidity`, `custom {"led":"blink"}`.
fn kind_text(kind: Option<&Kind>) -> String {
    match kind {
        Some(Kind::SetSamplingInterval(k)) => {
            format!("set-interval {}", duration_text(k.interval_ms.into()))
        }
        Some(Kind::SetBatchSize(k)) => format!("set-batch-size {}", k.batch_size),
        Some(Kind::SetSensorEnabled(k)) if k.enabled => format!("enable-sensor {}", k.sensor),
        Some(Kind::SetSensorEnabled(k)) => format!("disable-sensor {}", k.sensor),
        Some(Kind::Reboot(_)) => "reboot".into(),
        Some(Kind::Ping(_)) => "ping".into(),
        Some(Kind::Custom(k)) => format!("custom {}", k.json),
        None => "unknown".into(),
    }
}

fn kind_json(kind: Option<&Kind>) -> serde_json::Value {
    match kind {
        Some(Kind::SetSamplingInterval(k)) => {
            serde_json::json!({ "set_sampling_interval": { "interval_ms": k.interval_ms } })
        }
        Some(Kind::SetBatchSize(k)) => {
            serde_json::json!({ "set_batch_size": { "batch_size": k.batch_size } })
        }
        Some(Kind::SetSensorEnabled(k)) => serde_json::json!({
            "set_sensor_enabled": { "sensor": k.sensor, "enabled": k.enabled }
        }),
        Some(Kind::Reboot(_)) => serde_json::json!({ "reboot": {} }),
        Some(Kind::Ping(_)) => serde_json::json!({ "ping": {} }),
        Some(Kind::Custom(k)) => serde_json::json!({ "custom": { "json": k.json } }),
        None => serde_json::Value::Null,
    }
}

/// How long after `from` `to` happened, for people: `+3 ms`, `+1.5 s`,
/// `+2m 5s`; `None` if `to` did not happen (0).
fn offset_text(from: u64, to: u64) -> Option<String> {
    if to == 0 {
        return None;
    }
    let nanos = to.saturating_sub(from);
    Some(if nanos < 1_000_000_000 {
        format!("+{} ms", nanos / 1_000_000)
    } else if nanos < 60_000_000_000 {
        format!("+{:.1} s", nanos as f64 / 1e9)
    } else {
        let d = Duration::from_secs(nanos / 1_000_000_000);
        format!("+{}", humantime::format_duration(d))
    })
}

/// E.g. `command 42 to sim-00001: set-interval 500ms -> ACKED "interval 500
/// ms" (sent +3 ms, done +12 ms)`; times are relative to the command's
/// creation.
fn command_line(c: &pb::Command) -> String {
    let mut line = format!(
        "command {} to {}: {} -> {}",
        c.command_id,
        c.device_id,
        kind_text(c.kind.as_ref()),
        state_name(c.state).to_uppercase()
    );
    if !c.result.is_empty() {
        line.push_str(&format!(" {:?}", c.result));
    }
    let created = c.created_time_unix_nano;
    let mut times = Vec::new();
    if let Some(sent) = offset_text(created, c.sent_time_unix_nano) {
        times.push(format!("sent {sent}"));
    }
    if let Some(done) = offset_text(created, c.finished_time_unix_nano) {
        times.push(format!("done {done}"));
    } else if c.state == pb::CommandState::Queued as i32
        && let Some(expires) = offset_text(created, c.expires_time_unix_nano)
    {
        times.push(format!("expires {expires}"));
    }
    if !times.is_empty() {
        line.push_str(&format!(" ({})", times.join(", ")));
    }
    line
}

fn command_json(c: &pb::Command) -> serde_json::Value {
    serde_json::json!({
        "command_id": c.command_id,
        "device_id": c.device_id,
        "kind": kind_json(c.kind.as_ref()),
        "state": state_json(c.state),
        "result": c.result,
        "created_time_unix_nano": c.created_time_unix_nano,
        "sent_time_unix_nano": c.sent_time_unix_nano,
        "finished_time_unix_nano": c.finished_time_unix_nano,
        "expires_time_unix_nano": c.expires_time_unix_nano,
    })
}

/// One row per command; the times after its creation are relative to it.
fn table(commands: &[pb::Command]) -> Table {
    Table::new([
        Column::right("ID"),
        Column::left("DEVICE"),
        Column::left("KIND"),
        Column::left("STATE").keep(),
        Column::left("RESULT"),
        Column::time("CREATED (UTC)"),
        Column::right("SENT"),
        Column::left("FINISHED"),
    ])
    .rows(commands, |c| {
        let offset = |t| offset_text(c.created_time_unix_nano, t).unwrap_or_else(|| "-".into());
        [
            c.command_id.to_string(),
            c.device_id.clone(),
            kind_text(c.kind.as_ref()),
            state_name(c.state).to_owned(),
            or_dash(&c.result).to_owned(),
            time(c.created_time_unix_nano),
            offset(c.sent_time_unix_nano),
            offset(c.finished_time_unix_nano),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<CommandCommand, clap::Error> {
        crate::cli::parse_subcommand(args)
    }

    fn send(args: &[&str]) -> SendArgs {
        match parse(&[&["send"], args].concat()).expect("valid arguments") {
            CommandCommand::Send(args) => *args,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn send_error(args: &[&str]) -> clap::error::ErrorKind {
        crate::cli::refusal::<CommandCommand>("send", args)
    }

    #[test]
    fn an_unknown_kind_lists_the_kinds() {
        let error = send(&["dev", "blink", "--fast"])
            .kind
            .to_proto()
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            format!(
                "unknown command kind `blink`: the kinds are {KINDS} (see `ingest command send --help`)"
            )
        );
    }

    #[test]
    fn options_after_the_kind() {
        let args = send(&["sim-00001", "set-interval", "500ms", "--wait", "5s"]);
        assert_eq!(args.device_id, "sim-00001");
        assert_eq!(args.kind, KindArgs::SetInterval { interval_ms: 500 });
        assert_eq!(args.wait, Some(Duration::from_secs(5)));
        assert_eq!(args.ttl, None);
        assert!(!args.json);

        let args = send(&[
            "sim-00001",
            "reboot",
            "--ttl",
            "10m",
            "--json",
            "--server",
            "http://h:1",
        ]);
        assert_eq!(args.kind, KindArgs::Reboot);
        assert_eq!(args.ttl, Some(Duration::from_secs(600)));
        assert!(args.json);
        assert!(format!("{:?}", args.server).contains("http://h:1"));
    }

    #[test]
    fn options_before_the_kind() {
        let args = send(&["--wait", "1s", "sim-00001", "--json", "ping"]);
        assert_eq!(args.kind, KindArgs::Ping);
        assert_eq!(args.wait, Some(Duration::from_secs(1)));
        assert!(args.json);
    }

    #[test]
    fn kinds_become_protos() {
        let kind = |args: &[&str]| {
            send(&[&["dev"], args].concat())
                .kind
                .to_proto()
                .expect("a known kind")
        };
        assert_eq!(
            kind(&["set-interval", "1.5s"]),
            Kind::SetSamplingInterval(pb::SetSamplingInterval { interval_ms: 1500 })
        );
        assert_eq!(
            kind(&["set-batch-size", "20"]),
            Kind::SetBatchSize(pb::SetBatchSize { batch_size: 20 })
        );
        assert_eq!(
            kind(&["enable-sensor", "temperature"]),
            Kind::SetSensorEnabled(pb::SetSensorEnabled {
                sensor: "temperature".into(),
                enabled: true
            })
        );
        assert_eq!(
            kind(&["disable-sensor", "humidity"]),
            Kind::SetSensorEnabled(pb::SetSensorEnabled {
                sensor: "humidity".into(),
                enabled: false
            })
        );
        assert_eq!(kind(&["reboot"]), Kind::Reboot(pb::Reboot {}));
        assert_eq!(kind(&["ping"]), Kind::Ping(pb::Ping {}));
        // Sent as typed, not re-serialized.
        assert_eq!(
            kind(&["custom", r#"{"z": 1, "a": [true]}"#]),
            Kind::Custom(pb::CustomCommand {
                json: r#"{"z": 1, "a": [true]}"#.into()
            })
        );
        assert_eq!(
            kind(&["custom", "-1"]),
            Kind::Custom(pb::CustomCommand { json: "-1".into() })
        );
    }

    #[test]
    fn bad_arguments_are_refused_locally() {
        use clap::error::ErrorKind;
        let cases: [(&[&str], ErrorKind); 7] = [
            (&["dev", "custom", "{not json"], ErrorKind::ValueValidation),
            (&["dev", "set-interval", "fast"], ErrorKind::ValueValidation),
            (&["dev", "set-batch-size", "-3"], ErrorKind::UnknownArgument),
            (
                &["dev", "set-batch-size", "many"],
                ErrorKind::ValueValidation,
            ),
            (
                &["dev", "enable-sensor"],
                ErrorKind::MissingRequiredArgument,
            ),
            (&["dev"], ErrorKind::MissingSubcommand),
            (
                &["dev", "ping", "--wait", "soon"],
                ErrorKind::ValueValidation,
            ),
        ];
        for (args, kind) in cases {
            assert_eq!(send_error(args), kind, "{args:?}");
        }
    }

    #[test]
    fn intervals_are_whole_milliseconds() {
        assert_eq!(parse_interval_ms("500ms"), Ok(500));
        assert_eq!(parse_interval_ms("2s"), Ok(2000));
        assert_eq!(parse_interval_ms("1m 30s"), Ok(90_000));
        assert_eq!(
            parse_interval_ms("0s"),
            Ok(0),
            "the server judges the range"
        );
        assert!(parse_interval_ms("1500us").is_err());
        assert!(parse_interval_ms("50d").is_err(), "more than u32 ms");
        assert!(parse_interval_ms("500").is_err(), "a unit is needed");
    }

    #[test]
    fn states() {
        let cmd = |args: &[&str]| parse(&[&["list"], args].concat());
        for (arg, state) in [
            ("queued", pb::CommandState::Queued),
            ("sent", pb::CommandState::Sent),
            ("acked", pb::CommandState::Acked),
            ("failed", pb::CommandState::Failed),
            ("expired", pb::CommandState::Expired),
        ] {
            let Ok(CommandCommand::List {
                state: Some(parsed),
                ..
            }) = cmd(&["--state", arg])
            else {
                panic!("{arg} not parsed");
            };
            assert_eq!(pb::CommandState::from(parsed), state);
            assert_eq!(state_name(state as i32), arg);
            assert_eq!(state_json(state as i32), arg);
        }
        assert!(cmd(&["--state", "done"]).is_err());
        assert_eq!(state_name(0), "unknown");
        assert_eq!(state_name(99), "unknown");
        assert_eq!(state_json(0), serde_json::Value::Null);

        let Ok(CommandCommand::List {
            device,
            state,
            limit,
            json,
            ..
        }) = cmd(&[])
        else {
            panic!("not list");
        };
        assert_eq!((device, state, limit, json), (None, None, 100, false));
    }

    #[test]
    fn exit_codes() {
        use pb::CommandState as S;
        for (state, without_wait, with_wait) in [
            (S::Acked, 0, 0),
            (S::Queued, 0, 2),
            (S::Sent, 0, 2),
            (S::Failed, 1, 1),
            (S::Expired, 1, 1),
            (S::Unspecified, 1, 1),
        ] {
            assert_eq!(exit_code(state as i32, false), without_wait, "{state:?}");
            assert_eq!(exit_code(state as i32, true), with_wait, "{state:?}");
        }
    }

    #[test]
    fn pages() {
        assert_eq!(next_page_size(100, 0), Some(100));
        assert_eq!(next_page_size(1200, 0), Some(500));
        assert_eq!(next_page_size(1200, 1000), Some(200));
        assert_eq!(next_page_size(100, 100), None);
        assert_eq!(next_page_size(0, 0), Some(500));
        assert_eq!(next_page_size(0, 10_000), Some(500));
    }

    #[test]
    fn kinds_for_people_and_scripts() {
        let text = |k: Kind| kind_text(Some(&k));
        assert_eq!(
            text(Kind::SetSamplingInterval(pb::SetSamplingInterval {
                interval_ms: 500
            })),
            "set-interval 500ms"
        );
        assert_eq!(
            text(Kind::SetSamplingInterval(pb::SetSamplingInterval {
                interval_ms: 90_000
            })),
            "set-interval 1m 30s"
        );
        assert_eq!(
            text(Kind::SetBatchSize(pb::SetBatchSize { batch_size: 20 })),
            "set-batch-size 20"
        );
        assert_eq!(
            text(Kind::SetSensorEnabled(pb::SetSensorEnabled {
                sensor: "temp".into(),
                enabled: true
            })),
            "enable-sensor temp"
        );
        assert_eq!(
            text(Kind::SetSensorEnabled(pb::SetSensorEnabled {
                sensor: "temp".into(),
                enabled: false
            })),
            "disable-sensor temp"
        );
        assert_eq!(text(Kind::Reboot(pb::Reboot {})), "reboot");
        assert_eq!(text(Kind::Ping(pb::Ping {})), "ping");
        assert_eq!(
            text(Kind::Custom(pb::CustomCommand {
                json: r#"{"a":1}"#.into()
            })),
            r#"custom {"a":1}"#
        );
        assert_eq!(kind_text(None), "unknown");

        assert_eq!(
            kind_json(Some(&Kind::SetSensorEnabled(pb::SetSensorEnabled {
                sensor: "temp".into(),
                enabled: false
            }))),
            serde_json::json!({ "set_sensor_enabled": { "sensor": "temp", "enabled": false } })
        );
        assert_eq!(
            kind_json(Some(&Kind::Reboot(pb::Reboot {}))),
            serde_json::json!({ "reboot": {} })
        );
        assert_eq!(kind_json(None), serde_json::Value::Null);
    }

    #[test]
    fn offsets() {
        let t0 = 1_795_474_280_000_000_000;
        assert_eq!(offset_text(t0, 0), None);
        assert_eq!(offset_text(t0, t0 + 3_400_000).as_deref(), Some("+3 ms"));
        assert_eq!(
            offset_text(t0, t0 + 999_999_999).as_deref(),
            Some("+999 ms")
        );
        assert_eq!(
            offset_text(t0, t0 + 1_520_000_000).as_deref(),
            Some("+1.5 s")
        );
        assert_eq!(
            offset_text(t0, t0 + 125_700_000_000).as_deref(),
            Some("+2m 5s")
        );
        // A clock that went backwards is not a negative delay.
        assert_eq!(offset_text(t0, t0 - 5).as_deref(), Some("+0 ms"));
    }

    fn acked() -> pb::Command {
        let t0 = 1_795_474_280_000_000_000;
        pb::Command {
            command_id: 42,
            device_id: "sim-00001".into(),
            kind: Some(Kind::SetSamplingInterval(pb::SetSamplingInterval {
                interval_ms: 500,
            })),
            state: pb::CommandState::Acked as i32,
            result: "interval 500 ms".into(),
            created_time_unix_nano: t0,
            sent_time_unix_nano: t0 + 3_000_000,
            finished_time_unix_nano: t0 + 12_000_000,
            expires_time_unix_nano: t0 + 600_000_000_000,
        }
    }

    #[test]
    fn command_line_for_people() {
        assert_eq!(
            command_line(&acked()),
            r#"command 42 to sim-00001: set-interval 500ms -> ACKED "interval 500 ms" (sent +3 ms, done +12 ms)"#
        );
        let queued = pb::Command {
            state: pb::CommandState::Queued as i32,
            result: String::new(),
            sent_time_unix_nano: 0,
            finished_time_unix_nano: 0,
            kind: Some(Kind::Reboot(pb::Reboot {})),
            ..acked()
        };
        assert_eq!(
            command_line(&queued),
            "command 42 to sim-00001: reboot -> QUEUED (expires +10m)"
        );
        let sent = pb::Command {
            state: pb::CommandState::Sent as i32,
            sent_time_unix_nano: acked().sent_time_unix_nano,
            ..queued.clone()
        };
        assert_eq!(
            command_line(&sent),
            "command 42 to sim-00001: reboot -> SENT (sent +3 ms)"
        );
        let failed = pb::Command {
            state: pb::CommandState::Failed as i32,
            result: "no sensor \"x\"".into(),
            ..acked()
        };
        assert_eq!(
            command_line(&failed),
            r#"command 42 to sim-00001: set-interval 500ms -> FAILED "no sensor \"x\"" (sent +3 ms, done +12 ms)"#
        );
    }

    #[test]
    fn command_json_for_scripts() {
        assert_eq!(
            command_json(&acked()),
            serde_json::json!({
                "command_id": 42,
                "device_id": "sim-00001",
                "kind": { "set_sampling_interval": { "interval_ms": 500 } },
                "state": "acked",
                "result": "interval 500 ms",
                "created_time_unix_nano": 1_795_474_280_000_000_000u64,
                "sent_time_unix_nano": 1_795_474_280_003_000_000u64,
                "finished_time_unix_nano": 1_795_474_280_012_000_000u64,
                "expires_time_unix_nano": 1_795_474_880_000_000_000u64,
            })
        );
    }

    #[test]
    fn table() {
        let queued = pb::Command {
            command_id: 7,
            device_id: "d".into(),
            kind: Some(Kind::Custom(pb::CustomCommand {
                json: format!(r#"{{"pad":"{}"}}"#, "x".repeat(50)),
            })),
            state: pb::CommandState::Queued as i32,
            result: String::new(),
            sent_time_unix_nano: 0,
            finished_time_unix_nano: 0,
            ..acked()
        };
        let text = super::table(&[acked(), queued]).clip(40).to_string();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("ID  DEVICE     KIND"), "{text}");
        assert!(lines[0].ends_with("  FINISHED"), "{text}");
        for line in &lines {
            assert!(line.chars().count() <= 80, "{line:?}");
        }
        // Text columns give way to fit 80 columns; states, times and
        // numbers stay whole.
        assert!(
            lines[1].contains(
                "42  sim-00001  set-int…  acked   interva…  2026-11-23T22:51:20Z  +3 ms  +12 ms"
            ),
            "{text}"
        );
        assert!(lines[2].contains(r#"custom …  queued "#), "{text}");
        assert!(lines[2].ends_with("-  -"), "{text}");
        // Columns in characters, not bytes: `…` is three bytes.
        let column = |line: &str, s| line[..line.find(s).expect(s)].chars().count();
        assert_eq!(column(lines[1], "set-int"), column(lines[0], "KIND"));
        assert_eq!(column(lines[2], "custom"), column(lines[0], "KIND"));
        assert_eq!(column(lines[1], "acked"), column(lines[0], "STATE"));
        assert_eq!(column(lines[2], "queued"), column(lines[0], "STATE"));
        assert_eq!(column(lines[2], "2026"), column(lines[0], "CREATED"));

        // Unclipped for a single command.
        let out = super::table(&[acked()]).to_string();
        assert_eq!(out.lines().count(), 2);
    }
}
