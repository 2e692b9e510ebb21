//! `ingest devices register | get | list | reset-cursor`, and the
//! credential subcommands of `credentials.rs`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use telemetry_proto::v1 as pb;

use super::client::ServerArgs;
use super::credentials::{CredentialsCommand, read_certificate};
use super::output::{Answer, Column, Table, reply, time, yes_no};

#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Register a device and print its token (shown once).
    Register(RegisterArgs),
    /// Show one device.
    Get {
        #[command(flatten)]
        server: ServerArgs,
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
    device_id: String,
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
}

pub async fn run(cmd: DevicesCommand) -> anyhow::Result<()> {
    match cmd {
        DevicesCommand::Register(args) => {
            let certificate = args.cert.as_deref().map(read_certificate).transpose()?;
            let mut ops = args.server.ops().await?;
            let response = reply(
                ops.register_device(pb::RegisterDeviceRequest {
                    certificate_pem: certificate
                        .as_ref()
                        .map(|(pem, _)| pem.clone())
                        .unwrap_or_default(),
                    require_mtls: args.require_mtls,
                    device_id: args.device_id,
                    display_name: args.name,
                    labels: args.labels.into_iter().collect::<HashMap<_, _>>(),
                })
                .await,
            )?;
            let device = response.device.context("server returned no device")?;
            let fingerprint = certificate.map(|(_, fingerprint)| fingerprint);
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
            let device = reply(ops.get_device(pb::GetDeviceRequest { device_id }).await)?;
            Answer::stdout(json).one(&device, device_json, |d| table(std::slice::from_ref(d)))?;
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
            let mut ops = server.ops().await?;
            let response = reply(
                ops.reset_upload_cursor(pb::ResetUploadCursorRequest {
                    device_id,
                    committed_sequence: to,
                })
                .await,
            )?;
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
    })
}

fn table(devices: &[pb::Device]) -> Table {
    let mut table = Table::new([
        Column::left("DEVICE").min_width(24),
        Column::left("NAME").min_width(24).gap(1),
        Column::left("ONLINE").min_width(6).gap(1),
        Column::right("SEQUENCE").min_width(10).gap(1),
        Column::left("LAST UPLOAD (UTC)").min_width(19),
        Column::left("LAST SEEN (UTC)").min_width(19),
        Column::left("LABELS"),
    ]);
    for d in devices {
        let mut labels: Vec<_> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        table.row([
            d.device_id.clone(),
            d.display_name.clone(),
            yes_no(d.online).to_owned(),
            d.committed_sequence.to_string(),
            time(d.last_upload_time_unix_nano),
            time(d.last_seen_time_unix_nano),
            labels.join(","),
        ]);
    }
    table
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
        }
    }

    #[test]
    fn table_has_online_and_last_seen() {
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
        let text = table(&[device(), never]).to_string();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("DEVICE ")
                && lines[0].contains(" NAME ")
                && lines[0].contains(" ONLINE ")
                && lines[0].contains(" SEQUENCE  LAST UPLOAD (UTC)    LAST SEEN (UTC)      LABELS"),
            "{text}"
        );
        assert!(
            lines[1].ends_with(
                "yes            17  2026-11-23 22:51:20  2026-11-23 22:51:21  floor=2,site=plant-3"
            ),
            "{text}"
        );
        assert!(
            lines[2].ends_with("no              0  -                    -                    "),
            "{text}"
        );
        let online = lines[0].find("ONLINE").expect("header");
        assert_eq!(lines[1].find("yes"), Some(online));
        assert_eq!(lines[2].find("no "), Some(online));
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
