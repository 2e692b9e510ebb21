//! `ingest devices register | get | list | reset-cursor`, and the
//! credential subcommands of `credentials.rs`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use telemetry_proto::v1 as pb;

use super::client::ServerArgs;
use super::credentials::{CredentialsCommand, device_credentials, read_certificate};
use super::device_file;
use super::output::{Answer, Column, Table, number, or_dash, reply, time, yes_no};

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Register a device and print its token (shown once); with
    /// --from-file, many devices from a CSV or JSON-lines file.
    Register(RegisterArgs),
    /// Show one device.
    Get {
        #[command(flatten)]
        server: ServerArgs,
        /// The device's id, as registered.
        device_id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List all devices.
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set a device's committed sequence, e.g. back to 0 after its firmware
    /// sent a sequence so high that every later batch is a duplicate.
    /// Stored readings stay: batches resent above N are stored again.
    ResetCursor {
        #[command(flatten)]
        server: ServerArgs,
        /// The device's id, as registered.
        device_id: String,
        /// The new committed sequence: batches up to N are skipped as
        /// duplicates, later ones stored; 0 for none (the device resumes
        /// at 1).
        #[arg(long = "to", value_name = "N")]
        to: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Credentials(CredentialsCommand),
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The device's id, as registered.
    #[arg(required_unless_present = "from_file")]
    device_id: Option<String>,
    /// Register every device of this file instead, each call one
    /// transaction of --chunk devices: CSV with a header (a device_id
    /// column, an optional display_name, every other column a label), or
    /// JSON lines ({"device_id": .., "display_name": .., "labels": {..}}).
    /// Prints `device_id,token` lines (JSON lines with --json), each chunk
    /// as soon as it is committed.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["device_id", "name", "labels", "cert"])]
    from_file: Option<PathBuf>,
    /// Devices per call with --from-file: all of a call's devices are
    /// registered, or none. At most the server's --max-register-devices.
    #[arg(long, default_value_t = 5000, requires = "from_file",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    chunk: u32,
    /// Name shown to people (default: the id).
    #[arg(long, default_value = "")]
    name: String,
    /// A label, KEY=VALUE; repeat for more.
    #[arg(long = "label", value_parser = super::parse_label)]
    labels: Vec<(String, String)>,
    /// Bind this certificate (PEM) to the device at once; see bind-cert.
    #[arg(long = "cert", value_name = "PEM_FILE")]
    cert: Option<PathBuf>,
    /// Refuse the device's token unless it comes with its certificate.
    #[arg(long, requires = "cert")]
    require_mtls: bool,
    /// Print the device and its token as one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn run(cmd: DevicesCommand) -> anyhow::Result<()> {
    match cmd {
        DevicesCommand::Register(args) if args.from_file.is_some() => {
            return register_from_file(args).await;
        }
        DevicesCommand::Register(args) => {
            let certificate = args.cert.as_deref().map(read_certificate).transpose()?;
            let response = args
                .server
                .call(async |ops| {
                    ops.register_device(pb::RegisterDeviceRequest {
                        certificate_pem: certificate
                            .as_ref()
                            .map(|(pem, _)| pem.clone())
                            .unwrap_or_default(),
                        require_mtls: args.require_mtls,
                        device_id: args.device_id.unwrap_or_default(),
                        display_name: args.name,
                        labels: args.labels.into_iter().collect::<HashMap<_, _>>(),
                    })
                    .await
                })
                .await?;
            let device = response.device.context("server returned no device")?;
            let fingerprint = certificate.map(|(_, fingerprint)| fingerprint);
            if args.json {
                let mut json = device_json(&device);
                json["token"] = response.token.into();
                json["certificate_sha256"] = fingerprint
                    .map(|f| f.to_string())
                    .unwrap_or_default()
                    .into();
                json["require_mtls"] = args.require_mtls.into();
                println!("{json}");
                return Ok(());
            }
            eprintln!(
                "{}; its token (shown once, store it now):",
                registered_text(&device.device_id, fingerprint.as_ref(), args.require_mtls)
            );
            println!("{}", response.token);
        }
        DevicesCommand::Credentials(cmd) => return super::credentials::run(cmd).await,
        DevicesCommand::Get {
            server,
            device_id,
            json,
        } => {
            let mut ops = server.ops().await?;
            let device = reply(
                ops.get_device(pb::GetDeviceRequest {
                    device_id: device_id.clone(),
                })
                .await,
            )?;
            let credentials = device_credentials(&mut ops, device_id).await?;
            let whole = (device, credentials);
            Answer::stdout(json).one(
                &whole,
                |(d, c)| whole_json(d, c),
                |(d, c)| whole_text(d, c),
            )?;
        }
        DevicesCommand::List { server, json } => {
            let mut ops = server.ops().await?;
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = reply(
                    ops.list_devices(pb::ListDevicesRequest {
                        page_size: 1000,
                        page_token,
                    })
                    .await,
                )?;
                all.extend(page.devices);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            Answer::stdout(json).list(&all, device_json, table)?;
        }
        DevicesCommand::ResetCursor {
            server,
            device_id,
            to,
            json,
        } => {
            let response = server
                .call(async |ops| {
                    ops.reset_upload_cursor(pb::ResetUploadCursorRequest {
                        device_id,
                        committed_sequence: to,
                    })
                    .await
                })
                .await?;
            let device = response.device.context("server returned no device")?;
            let previous = response.previous_committed_sequence;
            Answer::stdout(json).one(
                &device,
                |d| {
                    serde_json::json!({
                        "previous_committed_sequence": previous,
                        "device": device_json(d),
                    })
                },
                |d| reset_text(previous, d),
            )?;
        }
    }
    Ok(())
}

/// `devices register --from-file`: the file's devices in chunks, each one
/// RegisterDevices call and one transaction. Each chunk's tokens are
/// printed as soon as it is committed, so a chunk refused later loses none.
async fn register_from_file(args: RegisterArgs) -> anyhow::Result<()> {
    use std::io::Write;

    let path = args.from_file.as_deref().context("--from-file")?;
    let devices = device_file::read(path)?;
    let mut ops = args.server.ops().await?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(out, "device_id,token")?;
    }
    let mut registered = 0usize;
    for chunk in devices.chunks(args.chunk as usize) {
        let request = pb::RegisterDevicesRequest {
            devices: chunk.iter().map(|d| d.request.clone()).collect(),
        };
        let answer = ops.register_devices(request).await.map_err(|status| {
            let status = name_the_line(status, chunk, path);
            super::output::status_error(status)
        });
        let answer = match answer {
            Ok(answer) => answer.into_inner(),
            Err(error) => {
                out.flush()?;
                return Err(error.context(format!(
                    "{registered} of {} devices registered before this (their tokens are above);                      none of the next {} was",
                    devices.len(),
                    chunk.len()
                )));
            }
        };
        for device in &answer.devices {
            if args.json {
                let line =
                    serde_json::json!({"device_id": device.device_id, "token": device.token});
                writeln!(out, "{line}")?;
            } else {
                // Ids and tokens hold no commas or quotes.
                writeln!(out, "{},{}", device.device_id, device.token)?;
            }
        }
        out.flush()?;
        registered += answer.devices.len();
    }
    eprintln!(
        "registered {registered} devices from {}; their tokens are shown once: store them now",
        path.display()
    );
    Ok(())
}

/// The server names a device by its place in the call (`devices[3]: ..`);
/// the operator wants the file's line.
fn name_the_line(
    status: tonic::Status,
    chunk: &[device_file::FileDevice],
    path: &std::path::Path,
) -> tonic::Status {
    let message = status.message();
    let place = message
        .strip_prefix("devices[")
        .and_then(|rest| rest.split_once("]: "))
        .and_then(|(index, why)| Some((index.parse::<usize>().ok()?, why)));
    match place.and_then(|(index, why)| Some((chunk.get(index)?, why))) {
        Some((device, why)) => tonic::Status::new(
            status.code(),
            format!("{} line {}: {why}", path.display(), device.line),
        ),
        None => status,
    }
}

/// `registered pump-7 with certificate sha256 <hex> (require_mtls)`
fn registered_text(
    device_id: &str,
    certificate: Option<&crate::domain::CertFingerprint>,
    require_mtls: bool,
) -> String {
    match certificate {
        None => format!("registered {device_id}"),
        Some(fp) if require_mtls => {
            format!("registered {device_id} with certificate sha256 {fp} (require_mtls)")
        }
        Some(fp) => format!("registered {device_id} with certificate sha256 {fp}"),
    }
}

/// `sim-00001: committed sequence 9223372036854775807 -> 0`
fn reset_text(previous: u64, device: &pb::Device) -> String {
    format!(
        "{}: committed sequence {previous} -> {}",
        device.device_id, device.committed_sequence
    )
}

fn device_json(d: &pb::Device) -> serde_json::Value {
    serde_json::json!({
        "device_id": d.device_id,
        "display_name": d.display_name,
        "labels": d.labels,
        "created_time_unix_nano": d.created_time_unix_nano,
        "committed_sequence": d.committed_sequence,
        "last_upload_time_unix_nano": d.last_upload_time_unix_nano,
        "online": d.online,
        "last_seen_time_unix_nano": d.last_seen_time_unix_nano,
        "firmware_version": d.firmware_version,
        "disabled_time_unix_nano": d.disabled_time_unix_nano,
    })
}

/// `devices get --json`: the device, its sensors and how it authenticates.
fn whole_json(d: &pb::Device, c: &pb::DeviceCredentials) -> serde_json::Value {
    let mut json = device_json(d);
    json["require_mtls"] = c.require_mtls.into();
    json["certificate_sha256"] = c.certificate_sha256.clone().into();
    json["sensors"] = d
        .sensors
        .iter()
        .map(|s| {
            serde_json::json!({
                "sensor": s.sensor,
                "unit": s.unit,
                "last_time_unix_nano": s.last_time_unix_nano,
                "last_value": (s.last_time_unix_nano != 0).then_some(s.last_value),
            })
        })
        .collect();
    json
}

/// `devices get`: everything about one device, a field a line, then its
/// sensors with their latest readings.
fn whole_text(d: &pb::Device, c: &pb::DeviceCredentials) -> String {
    let disabled = match d.disabled_time_unix_nano {
        0 => "no".to_owned(),
        t => format!("yes, since {}", time(t)),
    };
    let mut fields = Table::new([Column::left("FIELD"), Column::left("VALUE")])
        .headless()
        // Values of one line each, whole: a cut hash would be wrong.
        .fit(usize::MAX);
    fields
        .row(["device", &d.device_id])
        .row(["name", or_dash(&d.display_name)])
        .row(["labels", or_dash(&labels_text(d))])
        .row(["created", &time(d.created_time_unix_nano)])
        .row(["state", state(d)])
        .row(["disabled", &disabled])
        .row(["require_mtls", yes_no(c.require_mtls)])
        .row(["certificate", or_dash(&c.certificate_sha256)])
        .row(["firmware", or_dash(&d.firmware_version)])
        .row(["sequence", &d.committed_sequence.to_string()])
        .row(["last upload", &time(d.last_upload_time_unix_nano)])
        .row(["last seen", &time(d.last_seen_time_unix_nano)]);
    let mut text = fields.to_string();
    if d.sensors.is_empty() {
        text.push_str("\n\nno sensors yet");
        return text;
    }
    let sensors = Table::new([
        Column::left("SENSOR"),
        Column::left("UNIT"),
        Column::right("LATEST"),
        Column::time("AT (UTC)"),
    ])
    .rows(&d.sensors, |s| {
        let latest = if s.last_time_unix_nano == 0 {
            "-".to_owned()
        } else {
            number(s.last_value)
        };
        [
            s.sensor.clone(),
            or_dash(&s.unit).to_owned(),
            latest,
            time(s.last_time_unix_nano),
        ]
    });
    text.push_str("\n\n");
    text.push_str(&sensors.to_string());
    text
}

/// `floor=2,site=plant-3`: sorted, so that devices read alike.
fn labels_text(d: &pb::Device) -> String {
    let mut labels: Vec<_> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    labels.join(",")
}

/// `online`, `offline`, or `disabled` (which a device stays, online or not,
/// until an operator enables it).
fn state(d: &pb::Device) -> &'static str {
    if d.disabled_time_unix_nano != 0 {
        "disabled"
    } else if d.online {
        "online"
    } else {
        "offline"
    }
}

fn table(devices: &[pb::Device]) -> Table {
    Table::new([
        Column::left("DEVICE"),
        Column::left("NAME"),
        Column::left("STATE").keep(),
        Column::right("SEQUENCE"),
        Column::time("LAST UPLOAD (UTC)"),
        Column::left("LABELS"),
    ])
    .rows(devices, |d| {
        [
            d.device_id.clone(),
            d.display_name.clone(),
            state(d).to_owned(),
            d.committed_sequence.to_string(),
            time(d.last_upload_time_unix_nano),
            labels_text(d),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> pb::Device {
        pb::Device {
            device_id: "sim-00001".into(),
            display_name: "Boiler room".into(),
            labels: HashMap::from([
                ("site".into(), "plant-3".into()),
                ("floor".into(), "2".into()),
            ]),
            created_time_unix_nano: 1_795_474_000_000_000_000,
            committed_sequence: 17,
            // 2026-11-23 22:51:20 UTC
            last_upload_time_unix_nano: 1_795_474_280_123_456_789,
            online: true,
            last_seen_time_unix_nano: 1_795_474_281_000_000_000,
            firmware_version: "1.4.2".into(),
            disabled_time_unix_nano: 0,
            sensors: vec![
                pb::DeviceSensor {
                    sensor: "temperature".into(),
                    unit: "Cel".into(),
                    last_time_unix_nano: 1_795_474_280_123_456_789,
                    last_value: 21.456_789,
                },
                pb::DeviceSensor {
                    sensor: "humidity".into(),
                    unit: String::new(),
                    last_time_unix_nano: 0,
                    last_value: 0.0,
                },
            ],
        }
    }

    #[test]
    fn table_has_state_and_fits_80_columns_with_long_ids() {
        let never = pb::Device {
            device_id: "sim-00002".into(),
            display_name: "sim-00002".into(),
            labels: HashMap::new(),
            committed_sequence: 0,
            last_upload_time_unix_nano: 0,
            online: false,
            last_seen_time_unix_nano: 0,
            firmware_version: String::new(),
            ..device()
        };
        let disabled = pb::Device {
            device_id: "x".repeat(32),
            display_name: "a name far longer than any column should be".into(),
            disabled_time_unix_nano: 1_795_474_290_000_000_000,
            ..device()
        };
        let text = table(&[device(), never, disabled]).fit(80).to_string();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        for line in &lines {
            assert!(
                line.chars().count() <= 80,
                "{line:?} is wider than 80:\n{text}"
            );
        }
        assert!(
            lines[0].starts_with("DEVICE ")
                && lines[0].contains(" NAME ")
                && lines[0].contains(" STATE ")
                && lines[0].contains(" SEQUENCE  LAST UPLOAD (UTC)     LABELS"),
            "{text}"
        );
        assert!(
            lines[1].contains("online          17  2026-11-23T22:51:20Z  floor=2,"),
            "{text}"
        );
        assert!(lines[2].contains("offline          0  -  "), "{text}");
        assert!(
            lines[3].contains("disabled        17  2026-11-23T22:51:20Z"),
            "{text}"
        );
        assert!(lines[3].starts_with("xxxxxx"), "{text}");
        assert!(lines[3].contains('…'), "{text}");
        // In characters: `…` is three bytes.
        let column = |line: &str, word| line.find(word).map(|b| line[..b].chars().count());
        let state = column(lines[0], "STATE");
        assert_eq!(column(lines[1], "online"), state, "{text}");
        assert_eq!(column(lines[3], "disabled"), state, "{text}");
    }

    #[test]
    fn get_shows_everything_about_one_device() {
        let credentials = pb::DeviceCredentials {
            device_id: "sim-00001".into(),
            require_mtls: true,
            certificate_sha256: "ab".repeat(32),
            ..Default::default()
        };
        let text = whole_text(&device(), &credentials);
        let expected = [
            "device        sim-00001",
            "name          Boiler room",
            "labels        floor=2,site=plant-3",
            "created       2026-11-23T22:46:40Z",
            "state         online",
            "disabled      no",
            "require_mtls  yes",
        ];
        for (line, want) in text.lines().zip(expected) {
            assert_eq!(line, want, "{text}");
        }
        for part in [
            "firmware      1.4.2",
            "last upload   2026-11-23T22:51:20Z",
            "SENSOR       UNIT   LATEST  AT (UTC)",
            "temperature  Cel   21.4568  2026-11-23T22:51:20Z",
            "humidity     -           -  -",
        ] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
        let json = whole_json(&device(), &credentials);
        assert_eq!(json["require_mtls"], true);
        assert_eq!(json["sensors"][0]["last_value"], 21.456_789);
        assert_eq!(json["sensors"][1]["last_value"], serde_json::Value::Null);
    }

    #[test]
    fn json_has_online_last_seen_and_firmware() {
        let json = device_json(&device());
        assert_eq!(json["online"], true);
        assert_eq!(
            json["last_seen_time_unix_nano"],
            1_795_474_281_000_000_000u64
        );
        assert_eq!(json["firmware_version"], "1.4.2");
        assert_eq!(json["committed_sequence"], 17);
        assert_eq!(json["labels"]["site"], "plant-3");
    }

    #[test]
    fn registration_names_a_bound_certificate() {
        let fp = crate::domain::CertFingerprint::from_bytes([0xab; 32]);
        assert_eq!(registered_text("pump-7", None, false), "registered pump-7");
        assert_eq!(
            registered_text("pump-7", Some(&fp), false),
            format!(
                "registered pump-7 with certificate sha256 {}",
                "ab".repeat(32)
            )
        );
        assert!(registered_text("pump-7", Some(&fp), true).ends_with(" (require_mtls)"));
    }

    #[test]
    fn reset_names_the_device_and_both_sequences() {
        assert_eq!(
            reset_text(9_223_372_036_854_775_807, &device()),
            "sim-00001: committed sequence 9223372036854775807 -> 17"
        );
    }
}
