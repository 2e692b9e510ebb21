//! The whole run: the connections, registration, one task per device
//! until the run ends, and the report.

mod alerts;
mod channels;
mod credentials;
mod reach;
mod registration;
mod signals;
#[cfg(all(test, feature = "local-server"))]
mod with_real_server;

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use telemetry_client::balance::Transport;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1::ingest_client::IngestClient;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::device::{DeviceOutcome, run_device};
use crate::report::{Counter, DeviceFailure, LoadSettings, Report, Stats, progress};
use crate::shutdown::{self, Shutdown};

/// Runs the fleet until `--duration` is over or a signal ends it, then
/// prints the report; the exit code fails when any device did.
pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let config = Arc::new(config);
    let (trigger, shutdown) = shutdown::channel();
    signals::spawn_listener(trigger.clone(), config.quiet);

    let wire_bytes = Arc::new(Counter::default());
    let channels = channels::open_channels(&config, &wire_bytes)?;
    // Said first and plainly, even with --quiet: otherwise all the run
    // shows is retries and then a report of zeros.
    for message in reach::unreachable(&config.servers).await {
        eprintln!("device-sim: {message}");
    }
    let (credentials, mut failures) =
        registration::ensure_credentials(&config, &channels[0], &shutdown).await?;

    let alerts = match config.anomaly_rate {
        Some(_) => install_alert_rules(&config, &channels[0]).await,
        None => None,
    };

    let stats = Arc::new(Stats::with_latency_warmup(config.latency_warmup));
    let devices = spawn_devices(
        &config,
        &credentials,
        &channels,
        &stats,
        &shutdown,
        &mut failures,
    );

    let started = Instant::now();
    if let Some(duration) = config.duration {
        let trigger = trigger.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            trigger.trigger();
        });
    }
    let progress = (!config.quiet).then(|| progress::spawn(Arc::clone(&stats), config.devices));

    let unacked_batches = wait_for_devices(devices, &mut failures).await;
    let elapsed = started.elapsed();
    if let Some((stop, task)) = progress {
        let _ = stop.send(());
        let _ = task.await;
    }

    failures.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    let report = Report::new(
        &stats,
        u64::from(config.devices),
        failures,
        unacked_batches,
        elapsed,
        wire_bytes.get(),
        LoadSettings::from_config(&config),
    );
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{report}")
        .and_then(|()| stdout.flush())
        .context("writing the report to stdout")?;
    if let Some((counts, task)) = alerts {
        task.abort();
        println!(
            "  alerts            {} fired, {} resolved (rules: ingest rules list; events: ingest alerts watch)",
            counts.fired.load(Ordering::Relaxed),
            counts.resolved.load(Ordering::Relaxed)
        );
    }
    if let Some(path) = &config.report_json {
        report.write_json(path)?;
    }
    Ok(if report.devices_failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `--anomalies`: the alert rules they trip, on any server the ops token is
/// good for. Without a token, or refused, the run goes on: the readings
/// still carry anomalies, only no alert fires for them.
async fn install_alert_rules(
    config: &Config,
    channel: &Transport,
) -> Option<(Arc<alerts::AlertCounts>, tokio::task::JoinHandle<()>)> {
    let installed = match registration::read_ops_token(config) {
        Ok(token) => alerts::start(channel, &token).await,
        Err(e) => Err(e),
    };
    installed
        .inspect_err(|e| {
            eprintln!(
                "device-sim: --anomalies: alert rules not installed ({e:#}); the readings still \
                 carry anomalies, but no alert fires for them"
            );
        })
        .ok()
}

/// Devices still running, with their ids by task so a panic can be
/// attributed.
struct RunningDevices {
    tasks: JoinSet<DeviceOutcome>,
    ids: HashMap<tokio::task::Id, String>,
}

fn spawn_devices(
    config: &Arc<Config>,
    credentials: &credentials::Credentials,
    channels: &[Transport],
    stats: &Arc<Stats>,
    shutdown: &Shutdown,
    failures: &mut Vec<DeviceFailure>,
) -> RunningDevices {
    let mut running = RunningDevices {
        tasks: JoinSet::new(),
        ids: HashMap::new(),
    };
    let admission = Arc::new(Semaphore::new(config.connect_concurrency.max(1)));
    for (index, n) in (1..=config.devices).enumerate() {
        let device_id = config.device_id(n);
        let Some(token) = credentials.get(&device_id) else {
            continue; // Its registration failure is already recorded.
        };
        let auth = match Bearer::new(token) {
            Ok(auth) => auth,
            Err(e) => {
                failures.push(DeviceFailure {
                    device_id,
                    reason: format!("unusable token in the credentials file: {e}"),
                });
                continue;
            }
        };
        // Device i uses connection i % N, spreading devices evenly.
        let channel = channels[index % channels.len()].clone();
        // The one client of the device: uploads and Control share its
        // compression.
        let mut client = IngestClient::with_interceptor(channel, auth);
        if let Some(encoding) = config.compression.encoding() {
            client = client.send_compressed(encoding).accept_compressed(encoding);
        }
        let handle = running.tasks.spawn(run_device(
            device_id.clone(),
            client,
            Arc::clone(config),
            Arc::clone(stats),
            Arc::clone(&admission),
            shutdown.clone(),
        ));
        running.ids.insert(handle.id(), device_id);
    }
    running
}

/// Waits for every device to stop; returns the batches left unacknowledged.
async fn wait_for_devices(mut running: RunningDevices, failures: &mut Vec<DeviceFailure>) -> u64 {
    let mut unacked_batches = 0u64;
    while let Some(joined) = running.tasks.join_next().await {
        match joined {
            Ok(outcome) => {
                unacked_batches += outcome.unacked_batches as u64;
                if let Some(reason) = outcome.failure {
                    failures.push(DeviceFailure {
                        device_id: outcome.device_id,
                        reason,
                    });
                }
            }
            Err(e) => failures.push(DeviceFailure {
                device_id: running
                    .ids
                    .remove(&e.id())
                    .unwrap_or_else(|| "(unknown)".into()),
                reason: format!("device task failed: {e}"),
            }),
        }
    }
    unacked_batches
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::Args;
    use crate::server::mock::{GOOD_TOKEN, MockIngest, MockOps, OPS_TOKEN, serve_both};

    /// A quiet fleet against the mock servers at `addr`: it presents
    /// `ops_token` (from a file in `dir`) and keeps device tokens in
    /// `credentials`; `flags` say the rest.
    fn quiet_fleet(
        addr: std::net::SocketAddr,
        dir: &std::path::Path,
        ops_token: &str,
        credentials: &std::path::Path,
        flags: &[&str],
    ) -> Config {
        let server = format!("http://{addr}");
        let token_file = dir.join("ops.token");
        std::fs::write(&token_file, ops_token).expect("token file");
        let argv = [
            "device-sim",
            "--server",
            &server,
            "--ops-token-file",
            token_file.to_str().expect("utf-8 path"),
            "--quiet",
            "--credentials-file",
            credentials.to_str().expect("utf-8 path"),
        ];
        let argv = argv.iter().chain(flags).copied();
        Config::from_args(Args::try_parse_from(argv).expect("args")).expect("config")
    }

    #[tokio::test]
    async fn registers_runs_and_reports_failures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let creds_path = dir.path().join("creds.json");
        let report_path = dir.path().join("report.json");
        // sim-00002 has a stale token; sim-00003 exists on the server but
        // its token was lost; sim-00001 is new.
        let mut stale = credentials::Credentials::new();
        stale.insert("sim-00002".into(), "stale-token".into());
        credentials::save(&creds_path, &stale).expect("seed credentials");
        let ops = MockOps::default();
        ops.registered
            .lock()
            .expect("registered")
            .insert("sim-00003".into());
        let addr = serve_both(MockIngest::default(), ops).await;

        let mut flags = vec![
            "--devices",
            "3",
            "--connections",
            "2",
            "--duration",
            "1s",
            "--report-json",
            report_path.to_str().expect("utf-8 path"),
        ];
        flags.extend(crate::config::FAST_UPLOADS);
        let config = quiet_fleet(addr, dir.path(), OPS_TOKEN, &creds_path, &flags);
        let code = run(config).await.expect("run completes");
        assert_eq!(
            code,
            ExitCode::FAILURE,
            "failed devices make the exit code non-zero"
        );

        let saved = credentials::load(&creds_path).expect("credentials");
        assert_eq!(saved.get("sim-00001").map(String::as_str), Some(GOOD_TOKEN));
        assert_eq!(
            saved.get("sim-00002").map(String::as_str),
            Some("stale-token")
        );
        assert!(!saved.contains_key("sim-00003"));

        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report_path).expect("report written"))
                .expect("report is JSON");
        assert_eq!(report["devices"], 3);
        assert_eq!(report["devices_failed"], 2);
        assert_eq!(report["failures"][0]["device_id"], "sim-00002");
        assert_eq!(report["failures"][1]["device_id"], "sim-00003");
        let lost = report["failures"][1]["reason"].as_str().expect("reason");
        assert!(
            lost.contains("`ingest devices rotate-token sim-00003`")
                && lost.contains(creds_path.to_str().expect("utf-8 path")),
            "{lost}"
        );
        assert!(report["readings_accepted"].as_u64().expect("number") > 0);
        assert_eq!(report["readings_accepted"], report["readings_sent"]);
        assert!(report["wire_bytes_sent"].as_u64().expect("number") > 0);
    }

    #[tokio::test]
    async fn wrong_ops_token_is_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = serve_both(MockIngest::default(), MockOps::default()).await;
        let creds = dir.path().join("creds.json");
        let config = quiet_fleet(addr, dir.path(), "nope", &creds, &["--devices", "2"]);
        let err = run(config).await.expect_err("ops token rejected");
        assert!(err.to_string().contains("ops token"), "{err:#}");
    }
}
