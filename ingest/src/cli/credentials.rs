//! `ingest devices rotate-token | credentials | revoke | disable | enable |
//! bind-cert`: a device's tokens, certificate binding and access.
//!
//! Every change answers with the device's credentials as they now stand, so
//! each command can say what the change left behind (tokens still active,
//! require_mtls with no certificate) without a second call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use telemetry_proto::v1 as pb;

use super::client::{Ops, ServerArgs};
use super::output::{Answer, Column, Table, reply, yes_no};
use crate::domain::CertFingerprint;

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Issue a new token for a device and print it (shown once). With
    /// --overlap, its other tokens stop working that long from now.
    RotateToken {
        #[command(flatten)]
        server: ServerArgs,
        /// The device's id, as registered.
        device_id: String,
        /// How long the device's other active tokens keep working, e.g. 24h,
        /// so the device can move to the new one; 0s ends them at once.
        /// Without it they keep working until revoked.
        #[arg(long, value_name = "DURATION", value_parser = parse_overlap)]
        overlap: Option<Duration>,
        /// Print JSON (token, credential_id, credentials) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show a device's tokens (never their secrets), its certificate
    /// binding, and whether it is disabled or requires mutual TLS.
    Credentials {
        #[command(flatten)]
        server: ServerArgs,
        /// The device's id, as registered.
        device_id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revoke one of a device's tokens, or its certificate binding.
    Revoke(RevokeArgs),
    /// Refuse every call from a device until it is enabled again; its
    /// credentials are kept.
    Disable {
        #[command(flatten)]
        server: ServerArgs,
        /// The device's id, as registered.
        device_id: String,
        /// Print the device's credentials as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Let a disabled device in again.
    Enable {
        #[command(flatten)]
        server: ServerArgs,
        /// The device's id, as registered.
        device_id: String,
        /// Print the device's credentials as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Bind a certificate to a device (replacing any earlier one): over
    /// mutual TLS the device is then identified by it.
    BindCert(BindCertArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["token", "certificate"])))]
pub struct RevokeArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The device's id, as registered.
    device_id: String,
    /// The token's credential id, from `ingest devices credentials`.
    #[arg(long, value_name = "ID")]
    token: Option<i64>,
    /// The certificate binding: the certificate no longer identifies the
    /// device.
    #[arg(long)]
    certificate: bool,
    /// Print the device's credentials as JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct BindCertArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The device's id, as registered.
    device_id: String,
    /// The device's certificate, PEM (the server keeps only its SHA-256
    /// fingerprint). Over mutual TLS it must name the device: its CN, a DNS
    /// SAN, or a URI SAN urn:device:DEVICE_ID. Without it, only
    /// --require-mtls or --no-require-mtls changes, and the binding stays.
    #[arg(
        long = "cert",
        value_name = "PEM_FILE",
        required_unless_present_any = ["require_mtls", "no_require_mtls"]
    )]
    cert: Option<PathBuf>,
    #[command(flatten)]
    require_mtls: RequireMtlsArgs,
    /// Print the device's credentials as JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Both flags absent leaves the device's setting as it is.
#[derive(Debug, Args)]
pub struct RequireMtlsArgs {
    /// Refuse the device's token unless it comes with this certificate.
    #[arg(long, conflicts_with = "no_require_mtls")]
    require_mtls: bool,
    /// Accept the device's token alone again.
    #[arg(long)]
    no_require_mtls: bool,
}

impl RequireMtlsArgs {
    fn change(&self) -> Option<bool> {
        match (self.require_mtls, self.no_require_mtls) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

/// The server takes whole milliseconds; anything finer would be silently
/// cut, so say so instead.
fn parse_overlap(s: &str) -> Result<Duration, String> {
    let d = super::whole_millis(s)?;
    u64::try_from(d.as_millis()).map_err(|_| format!("{s} is too long"))?;
    Ok(d)
}

/// A certificate file, checked here so that a key or a typo is reported
/// with the file's name rather than as the server's INVALID_ARGUMENT.
pub(super) fn read_certificate(path: &Path) -> anyhow::Result<(String, CertFingerprint)> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading the certificate {}", path.display()))?;
    let fingerprint = CertFingerprint::of_pem(&pem).map_err(|_| {
        anyhow::anyhow!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----): give the device's certificate, not its key",
            path.display()
        )
    })?;
    Ok((pem, fingerprint))
}

/// A device's credentials as the server holds them (`devices get` shows
/// them too).
pub(super) async fn device_credentials(
    ops: &mut Ops,
    device_id: String,
) -> anyhow::Result<pb::DeviceCredentials> {
    reply(
        ops.list_device_credentials(pb::ListDeviceCredentialsRequest { device_id })
            .await,
    )
}

pub async fn run(cmd: CredentialsCommand) -> anyhow::Result<()> {
    match cmd {
        CredentialsCommand::RotateToken {
            server,
            device_id,
            overlap,
            json,
        } => {
            let response = server
                .call(async |ops| {
                    ops.rotate_device_token(pb::RotateDeviceTokenRequest {
                        device_id,
                        overlap_millis: overlap.map(|d| d.as_millis() as u64),
                    })
                    .await
                })
                .await?;
            let credentials = response
                .credentials
                .as_ref()
                .context("server returned no credentials")?;
            // As text, the token alone on stdout, so `TOKEN=$(ingest devices
            // rotate-token ...)` takes it; the rest is for the person.
            if !json {
                eprintln!(
                    "{}: new token {} (shown once, store it now):",
                    credentials.device_id, response.credential_id
                );
            }
            Answer::stdout(json).one(
                &response,
                |r| {
                    serde_json::json!({
                        "token": r.token,
                        "credential_id": r.credential_id,
                        "credentials": credentials_json(credentials),
                    })
                },
                |r| r.token.clone(),
            )?;
            if !json {
                for line in rotate_notes(response.credential_id, credentials) {
                    eprintln!("{line}");
                }
            }
        }
        CredentialsCommand::Credentials {
            server,
            device_id,
            json,
        } => {
            let mut ops = server.ops().await?;
            let credentials = device_credentials(&mut ops, device_id).await?;
            Answer::stdout(json).one(&credentials, credentials_json, credentials_text)?;
        }
        CredentialsCommand::Revoke(args) => {
            use pb::revoke_device_credential_request::Credential;
            let what = match args.token {
                Some(id) => Credential::TokenCredentialId(id),
                None => Credential::Certificate(true),
            };
            let credentials = args
                .server
                .call(async |ops| {
                    ops.revoke_device_credential(pb::RevokeDeviceCredentialRequest {
                        device_id: args.device_id,
                        credential: Some(what),
                    })
                    .await
                })
                .await?;
            Answer::stdout(args.json).one(&credentials, credentials_json, |c| {
                revoke_text(args.token, c)
            })?;
        }
        CredentialsCommand::Disable {
            server,
            device_id,
            json,
        } => set_access(&server, device_id, false, json).await?,
        CredentialsCommand::Enable {
            server,
            device_id,
            json,
        } => set_access(&server, device_id, true, json).await?,
        CredentialsCommand::BindCert(args) => {
            let certificate_pem = match &args.cert {
                Some(path) => read_certificate(path)?.0,
                None => String::new(),
            };
            let credentials = args
                .server
                .call(async |ops| {
                    ops.bind_device_certificate(pb::BindDeviceCertificateRequest {
                        device_id: args.device_id,
                        certificate_pem,
                        require_mtls: args.require_mtls.change(),
                    })
                    .await
                })
                .await?;
            Answer::stdout(args.json).one(&credentials, credentials_json, bind_text)?;
            super::output::warn(&credentials.warnings);
        }
    }
    Ok(())
}

/// Disables or enables the device, then prints what it may do now.
async fn set_access(
    server: &ServerArgs,
    device_id: String,
    enabled: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut ops = server.ops().await?;
    let answer = if enabled {
        ops.enable_device(pb::EnableDeviceRequest { device_id })
            .await
    } else {
        ops.disable_device(pb::DisableDeviceRequest { device_id })
            .await
    };
    let credentials = reply(answer)?;
    Answer::stdout(json).one(&credentials, credentials_json, access_text)?;
    Ok(())
}

/// RFC 3339 in UTC to the second, or `zero` for an unset time.
fn utc(nanos: u64, zero: &'static str) -> String {
    if nanos == 0 {
        return zero.into();
    }
    super::output::utc(nanos as i64)
}

/// What became of the device's other tokens: the operator rotating wants
/// to know how long the fleet has to move to the new one.
fn rotate_notes(new_id: i64, c: &pb::DeviceCredentials) -> Vec<String> {
    // The server stamps the new token and the others' expiry with one
    // clock reading, so "expires at the new token's creation" means at once.
    let now = c
        .tokens
        .iter()
        .find(|t| t.credential_id == new_id)
        .map_or(0, |t| t.created_time_unix_nano);
    let mut notes: Vec<String> = c
        .tokens
        .iter()
        .filter(|t| t.credential_id != new_id && t.revoked_time_unix_nano == 0)
        .filter(|t| t.active || t.expires_time_unix_nano >= now)
        .map(|t| {
            let id = t.credential_id;
            match t.expires_time_unix_nano {
                0 => format!(
                    "token {id}: still works, no expiry (end it with `ingest devices revoke {} --token {id}`, or rotate with --overlap)",
                    c.device_id
                ),
                e if e <= now => format!("token {id}: expired now"),
                e => format!(
                    "token {id}: expires {} (in {})",
                    utc(e, "never"),
                    humantime::format_duration(Duration::from_secs((e - now).div_ceil(1_000_000_000)))
                ),
            }
        })
        .collect();
    if notes.is_empty() {
        notes.push("no other token was active".into());
    }
    notes
}

fn active_tokens(c: &pb::DeviceCredentials) -> usize {
    c.tokens.iter().filter(|t| t.active).count()
}

/// `pump-7: token 1 revoked; 1 active token left`
fn revoke_text(token: Option<i64>, c: &pb::DeviceCredentials) -> String {
    let device = &c.device_id;
    match token {
        Some(id) => match active_tokens(c) {
            0 => format!(
                "{device}: token {id} revoked; no active token left (issue one with `ingest devices rotate-token {device}`)"
            ),
            1 => format!("{device}: token {id} revoked; 1 active token left"),
            n => format!("{device}: token {id} revoked; {n} active tokens left"),
        },
        None if c.require_mtls => format!(
            "{device}: certificate binding revoked; require_mtls is still on, so the device is refused until a certificate is bound again (`ingest devices bind-cert {device} --cert PEM_FILE`)"
        ),
        None => format!("{device}: certificate binding revoked"),
    }
}

/// `pump-7: disabled ...` or `pump-7: enabled`
fn access_text(c: &pb::DeviceCredentials) -> String {
    let device = &c.device_id;
    if c.disabled_time_unix_nano == 0 {
        format!("{device}: enabled")
    } else {
        format!(
            "{device}: disabled since {}; every call it makes is refused until `ingest devices enable {device}` (its credentials are kept)",
            utc(c.disabled_time_unix_nano, "-")
        )
    }
}

/// `pump-7: certificate sha256 <hex> bound; require_mtls yes`
fn bind_text(c: &pb::DeviceCredentials) -> String {
    format!(
        "{}: certificate sha256 {} bound; require_mtls {}",
        c.device_id,
        c.certificate_sha256,
        yes_no(c.require_mtls)
    )
}

/// The proto's fields, names and nanoseconds as they are, like the other
/// commands' JSON.
fn credentials_json(c: &pb::DeviceCredentials) -> serde_json::Value {
    let tokens: Vec<_> = c
        .tokens
        .iter()
        .map(|t| {
            serde_json::json!({
                "credential_id": t.credential_id,
                "created_time_unix_nano": t.created_time_unix_nano,
                "last_used_time_unix_nano": t.last_used_time_unix_nano,
                "expires_time_unix_nano": t.expires_time_unix_nano,
                "revoked_time_unix_nano": t.revoked_time_unix_nano,
                "active": t.active,
            })
        })
        .collect();
    serde_json::json!({
        "device_id": c.device_id,
        "tokens": tokens,
        "certificate_sha256": c.certificate_sha256,
        "certificate_bound_time_unix_nano": c.certificate_bound_time_unix_nano,
        "require_mtls": c.require_mtls,
        "disabled_time_unix_nano": c.disabled_time_unix_nano,
    })
}

/// The device's access and certificate, a blank line, its tokens.
fn credentials_text(c: &pb::DeviceCredentials) -> String {
    let disabled = match c.disabled_time_unix_nano {
        0 => "no".to_owned(),
        t => format!("since {}", utc(t, "-")),
    };
    let certificate = if c.certificate_sha256.is_empty() {
        "none".to_owned()
    } else {
        format!(
            "sha256 {} (bound {})",
            c.certificate_sha256,
            utc(c.certificate_bound_time_unix_nano, "-")
        )
    };
    let mut fields = Table::new([Column::left(""), Column::left("")])
        .headless()
        // Values of one line each, whole: a cut hash would be wrong.
        .fit(usize::MAX);
    fields
        .row(["device", c.device_id.as_str()])
        .row(["disabled", disabled.as_str()])
        .row(["require_mtls", yes_no(c.require_mtls)])
        .row(["certificate", certificate.as_str()]);
    if c.tokens.is_empty() {
        return format!("{fields}\n\nno tokens");
    }
    // Four times do not fit 80 columns: a revoked token shows when in its
    // state's column instead of its expiry (which no longer matters).
    let tokens = Table::new([
        Column::right("TOKEN"),
        Column::time("CREATED (UTC)"),
        Column::time("LAST USED (UTC)"),
        Column::left("STATE"),
        Column::time("SINCE / UNTIL (UTC)"),
    ])
    .rows(&c.tokens, |t| {
        let (state, when) = if t.revoked_time_unix_nano != 0 {
            ("revoked", utc(t.revoked_time_unix_nano, "-"))
        } else if !t.active {
            ("expired", utc(t.expires_time_unix_nano, "-"))
        } else {
            ("active", utc(t.expires_time_unix_nano, "no expiry"))
        };
        [
            t.credential_id.to_string(),
            utc(t.created_time_unix_nano, "-"),
            utc(t.last_used_time_unix_nano, "never"),
            state.to_owned(),
            when,
        ]
    });
    format!("{fields}\n\n{tokens}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    // 2026-11-23T22:51:20Z
    const T: u64 = 1_795_474_280 * SEC;

    fn token(id: i64, created: u64) -> pb::DeviceToken {
        pb::DeviceToken {
            credential_id: id,
            created_time_unix_nano: created,
            last_used_time_unix_nano: 0,
            expires_time_unix_nano: 0,
            revoked_time_unix_nano: 0,
            active: true,
        }
    }

    /// Token 1 used and expiring in a day, token 2 revoked, token 3 new.
    fn credentials() -> pb::DeviceCredentials {
        pb::DeviceCredentials {
            device_id: "pump-7".into(),
            tokens: vec![
                pb::DeviceToken {
                    last_used_time_unix_nano: T - 60 * SEC + 123,
                    expires_time_unix_nano: T + 86_400 * SEC,
                    ..token(1, T - 3600 * SEC)
                },
                pb::DeviceToken {
                    revoked_time_unix_nano: T - 30 * SEC,
                    active: false,
                    ..token(2, T - 1800 * SEC)
                },
                token(3, T),
            ],
            certificate_sha256: "ab".repeat(32),
            certificate_bound_time_unix_nano: T - 10 * SEC,
            require_mtls: true,
            disabled_time_unix_nano: 0,
            warnings: Vec::new(),
        }
    }

    fn table(c: &pb::DeviceCredentials) -> String {
        credentials_text(c) + "\n"
    }

    #[test]
    fn table_shows_tokens_certificate_and_access_in_utc() {
        let text = table(&credentials());
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(
            lines[..5],
            [
                "device        pump-7",
                "disabled      no",
                "require_mtls  yes",
                &format!(
                    "certificate   sha256 {} (bound 2026-11-23T22:51:10Z)",
                    "ab".repeat(32)
                ),
                "",
            ],
            "{text}"
        );
        assert_eq!(
            lines[5],
            "TOKEN  CREATED (UTC)         LAST USED (UTC)       STATE    SINCE / UNTIL (UTC)"
        );
        assert_eq!(
            lines[6],
            "    1  2026-11-23T21:51:20Z  2026-11-23T22:50:20Z  active   2026-11-24T22:51:20Z"
        );
        for line in &lines[5..] {
            assert!(line.chars().count() <= 80, "{line:?}");
        }
        assert_eq!(
            lines[7],
            "    2  2026-11-23T22:21:20Z  never                 revoked  2026-11-23T22:50:50Z"
        );
        assert_eq!(
            lines[8],
            "    3  2026-11-23T22:51:20Z  never                 active   no expiry"
        );
        assert_eq!(lines.len(), 9, "{text}");
        // Every column starts where its header does.
        for header in ["CREATED", "LAST USED", "STATE", "SINCE"] {
            let at = lines[5].find(header).expect("header");
            assert!(lines[6..].iter().all(|l| l[at - 2..at] == *"  "), "{text}");
        }
    }

    #[test]
    fn table_says_disabled_and_no_certificate_and_no_tokens() {
        let c = pb::DeviceCredentials {
            tokens: vec![],
            certificate_sha256: String::new(),
            certificate_bound_time_unix_nano: 0,
            require_mtls: false,
            disabled_time_unix_nano: T,
            ..credentials()
        };
        assert_eq!(
            table(&c),
            "device        pump-7\n\
             disabled      since 2026-11-23T22:51:20Z\n\
             require_mtls  no\n\
             certificate   none\n\
             \n\
             no tokens\n"
        );
    }

    #[test]
    fn json_keeps_the_proto_fields_and_nanoseconds() {
        let json = credentials_json(&credentials());
        assert_eq!(json["device_id"], "pump-7");
        assert_eq!(json["certificate_sha256"], "ab".repeat(32));
        assert_eq!(json["certificate_bound_time_unix_nano"], T - 10 * SEC);
        assert_eq!(json["require_mtls"], true);
        assert_eq!(json["disabled_time_unix_nano"], 0);
        let tokens = json["tokens"].as_array().expect("tokens");
        assert_eq!(tokens.len(), 3);
        assert_eq!(tokens[0]["credential_id"], 1);
        assert_eq!(tokens[0]["last_used_time_unix_nano"], T - 60 * SEC + 123);
        assert_eq!(tokens[0]["expires_time_unix_nano"], T + 86_400 * SEC);
        assert_eq!(tokens[1]["revoked_time_unix_nano"], T - 30 * SEC);
        assert_eq!(tokens[1]["active"], false);
        assert!(!json.to_string().contains("token\""), "no secret field");
    }

    #[test]
    fn rotation_says_when_the_other_tokens_end() {
        // Token 1 expires in a day; revoked token 2 is not mentioned.
        assert_eq!(
            rotate_notes(3, &credentials()),
            ["token 1: expires 2026-11-24T22:51:20Z (in 1day)"]
        );
        let mut c = credentials();
        c.tokens[0].expires_time_unix_nano = T;
        c.tokens[0].active = false;
        assert_eq!(rotate_notes(3, &c), ["token 1: expired now"]);
        c.tokens[0].expires_time_unix_nano = 0;
        c.tokens[0].active = true;
        assert_eq!(
            rotate_notes(3, &c),
            [
                "token 1: still works, no expiry (end it with `ingest devices revoke pump-7 --token 1`, or rotate with --overlap)"
            ]
        );
        // A token that expired long before the rotation is not news.
        c.tokens[0].expires_time_unix_nano = T - 3000 * SEC;
        c.tokens[0].active = false;
        assert_eq!(rotate_notes(3, &c), ["no other token was active"]);
    }

    #[test]
    fn results_name_the_device_and_what_is_left() {
        let mut c = credentials();
        assert_eq!(
            revoke_text(Some(2), &c),
            "pump-7: token 2 revoked; 2 active tokens left"
        );
        c.tokens[0].active = false;
        assert_eq!(
            revoke_text(Some(2), &c),
            "pump-7: token 2 revoked; 1 active token left"
        );
        c.tokens[2].active = false;
        assert!(revoke_text(Some(3), &c).ends_with(
            "no active token left (issue one with `ingest devices rotate-token pump-7`)"
        ));
        assert!(
            revoke_text(None, &c).contains("require_mtls is still on"),
            "{}",
            revoke_text(None, &c)
        );
        c.require_mtls = false;
        assert_eq!(revoke_text(None, &c), "pump-7: certificate binding revoked");

        assert_eq!(access_text(&c), "pump-7: enabled");
        c.disabled_time_unix_nano = T;
        assert!(
            access_text(&c).starts_with(
                "pump-7: disabled since 2026-11-23T22:51:20Z; every call it makes is refused until `ingest devices enable pump-7`"
            )
        );
        assert_eq!(
            bind_text(&c),
            format!(
                "pump-7: certificate sha256 {} bound; require_mtls no",
                "ab".repeat(32)
            )
        );
    }

    fn parse(args: &[&str]) -> Result<CredentialsCommand, clap::Error> {
        crate::cli::parse_subcommand(args)
    }

    #[test]
    fn revoke_takes_exactly_one_of_token_and_certificate() {
        assert!(matches!(
            parse(&["revoke", "pump-7", "--token", "4"]),
            Ok(CredentialsCommand::Revoke(RevokeArgs {
                token: Some(4),
                certificate: false,
                ..
            }))
        ));
        assert!(matches!(
            parse(&["revoke", "pump-7", "--certificate"]),
            Ok(CredentialsCommand::Revoke(RevokeArgs {
                token: None,
                certificate: true,
                ..
            }))
        ));
        for wrong in [
            &["revoke", "pump-7"][..],
            &["revoke", "pump-7", "--token", "4", "--certificate"],
        ] {
            assert!(parse(wrong).is_err(), "{wrong:?}");
        }
    }

    #[test]
    fn bind_cert_changes_require_mtls_only_when_asked() {
        let change = |args: &[&str]| match parse(args) {
            Ok(CredentialsCommand::BindCert(b)) => b.require_mtls.change(),
            other => panic!("{other:?}"),
        };
        let base = ["bind-cert", "pump-7", "--cert", "c.pem"];
        assert_eq!(change(&base), None);
        assert_eq!(
            change(&[&base[..], &["--require-mtls"]].concat()),
            Some(true)
        );
        assert_eq!(
            change(&[&base[..], &["--no-require-mtls"]].concat()),
            Some(false)
        );
        assert!(parse(&[&base[..], &["--require-mtls", "--no-require-mtls"]].concat()).is_err());
    }

    #[test]
    fn overlap_is_a_duration_in_whole_milliseconds() {
        assert_eq!(parse_overlap("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_overlap("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_overlap("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(
            parse_overlap("1us")
                .unwrap_err()
                .contains("whole number of milliseconds")
        );
        assert!(
            parse_overlap("soon")
                .unwrap_err()
                .contains("e.g. 500ms, 30s")
        );
    }

    #[test]
    fn a_key_is_not_a_certificate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = dir.path().join("device.key");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        let err = read_certificate(&key).unwrap_err().to_string();
        assert!(
            err.contains("device.key") && err.contains("no PEM certificate"),
            "{err}"
        );
        let err = read_certificate(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }
}
