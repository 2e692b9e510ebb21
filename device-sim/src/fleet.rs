//! The whole run: credentials and registration, one task per device, the
//! progress line, and the final report.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use telemetry_proto::v1::RegisterDeviceRequest;
use telemetry_proto::v1::ingest_client::IngestClient;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;
use tracing::{debug, warn};

use telemetry_client::backoff::Backoff;
use telemetry_client::balance::{Transport, balanced, single};
use telemetry_client::status::is_transient;

use crate::client::describe;
use crate::config::Config;
use crate::credentials;
use crate::device::{DeviceOutcome, run_device};
use crate::report::{DeviceFailure, LoadSettings, Progress, Report};
use crate::sampling::device_seed;
use crate::shutdown::{self, Shutdown, ShutdownTrigger};
use crate::stats::{Counter, Stats};
use crate::wire::CountingConnector;
use telemetry_client::bearer::Bearer;

type OpsApi = OpsClient<InterceptedService<Transport, Bearer>>;

/// Registrations in flight at once: enough to register a large fleet
/// quickly without queueing thousands of calls on one connection.
const REGISTER_CONCURRENCY: usize = 32;
/// Attempts per registration while the server is unreachable; with the
/// default backoff this waits out roughly half a minute of server start-up.
const REGISTER_ATTEMPTS: u32 = 12;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Sites a simulated device is spread over, for label-based alert rules.
const SITES: [&str; 4] = ["plant-1", "plant-2", "warehouse-north", "lab"];

pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let config = Arc::new(config);
    let (trigger, shutdown) = shutdown::channel();
    spawn_signal_listener(trigger.clone(), config.quiet);

    let wire_bytes = Arc::new(Counter::default());
    let channels = open_channels(&config, &wire_bytes)?;
    let (credentials, mut failures) = ensure_credentials(&config, &channels[0], &shutdown).await?;

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
    let progress = (!config.quiet).then(|| spawn_progress(Arc::clone(&stats), config.devices));

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
    if let Some(path) = &config.report_json {
        report.write_json(path)?;
    }
    Ok(if report.devices_failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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

/// One lazily connected transport per --connections: start-up succeeds
/// even while the server is still coming up, and each device retries on its
/// own. Every byte the channels write is added to `wire_bytes`.
///
/// Several servers: each transport has a connection to every one of them
/// and balances over them ([`balanced`]): every call (every upload and
/// Control stream) goes to one picked at random, from the first call on,
/// so the fleet's streams spread over the servers, and a device whose
/// server went away lands on another when it retries.
fn open_channels(config: &Config, wire_bytes: &Arc<Counter>) -> anyhow::Result<Vec<Transport>> {
    let endpoints: Vec<Endpoint> = config
        .tls
        .endpoints(&config.servers)
        .context("--server")?
        .into_iter()
        .map(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(5))
                // Streams stay open for a long time; pings notice a dead peer
                // that would otherwise leave a device waiting for its summary.
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
        })
        .collect();
    // TLS, for an https:// server, runs over the counting connector: the
    // bytes counted are the encrypted records on the wire.
    let connect = |endpoint: &Endpoint| {
        endpoint.connect_with_connector_lazy(CountingConnector::new(Arc::clone(wire_bytes)))
    };
    Ok((0..config.connections.max(1))
        .map(|_| match &endpoints[..] {
            [endpoint] => single(connect(endpoint)),
            several => balanced(several.iter().map(connect).collect()),
        })
        .collect())
}

/// Loads stored tokens and registers every device that has none, saving the
/// new tokens before anything else can go wrong. Returns the credentials and
/// the devices that could not be registered.
async fn ensure_credentials(
    config: &Config,
    channel: &Transport,
    shutdown: &Shutdown,
) -> anyhow::Result<(credentials::Credentials, Vec<DeviceFailure>)> {
    let mut credentials = credentials::load(&config.credentials_file)?;
    let missing: Vec<String> = (1..=config.devices)
        .map(|n| config.device_id(n))
        .filter(|id| !credentials.contains_key(id))
        .collect();
    if missing.is_empty() {
        return Ok((credentials, Vec::new()));
    }

    // Only needed now: a fleet that is fully registered runs without it.
    let ops_token = read_ops_token(config)?;
    let mut client = OpsClient::with_interceptor(
        channel.clone(),
        Bearer::new(&ops_token).context("the ops token")?,
    );
    if let Some(encoding) = config.compression.encoding() {
        client = client.send_compressed(encoding).accept_compressed(encoding);
    }
    if !config.quiet {
        eprintln!("registering {} device(s)...", missing.len());
    }
    let results: Vec<(String, Registration)> = futures::stream::iter(missing)
        .map(|device_id| register_device(client.clone(), device_id, shutdown.clone()))
        .buffer_unordered(REGISTER_CONCURRENCY)
        .collect()
        .await;

    let mut failures = Vec::new();
    let mut registered = 0usize;
    let mut ops_rejected = None;
    for (device_id, registration) in results {
        match registration {
            Registration::Token(token) => {
                credentials.insert(device_id, token);
                registered += 1;
            }
            Registration::Failed(reason) => failures.push(DeviceFailure { device_id, reason }),
            Registration::Interrupted => failures.push(DeviceFailure {
                device_id,
                reason: "registration interrupted by shutdown".into(),
            }),
            Registration::OpsTokenRejected(reason) => {
                ops_rejected.get_or_insert(reason);
            }
        }
    }
    if registered > 0 {
        // Tokens cannot be fetched again, so they are saved before any other
        // error can end the run.
        credentials::save(&config.credentials_file, &credentials).with_context(|| {
            format!(
                "saving {registered} new device token(s); those devices are registered but \
                 their tokens are lost"
            )
        })?;
    }
    if let Some(reason) = ops_rejected {
        bail!(
            "the server rejected the ops token ({reason}); check --ops-token or --ops-token-file"
        );
    }
    Ok((credentials, failures))
}

fn read_ops_token(config: &Config) -> anyhow::Result<String> {
    let token = match &config.ops_token {
        Some(token) => token.trim().to_owned(),
        None => std::fs::read_to_string(&config.ops_token_file)
            .with_context(|| {
                format!(
                    "reading the ops token from {} (needed to register devices; or pass \
                     --ops-token / DEVICE_SIM_OPS_TOKEN)",
                    config.ops_token_file.display()
                )
            })?
            .trim()
            .to_owned(),
    };
    ensure!(!token.is_empty(), "the ops token is empty");
    Ok(token)
}

enum Registration {
    Token(String),
    Failed(String),
    /// Every other registration will fail the same way; the run stops.
    OpsTokenRejected(String),
    Interrupted,
}

fn site_of(device_id: &str) -> &'static str {
    SITES[(device_seed(device_id) % SITES.len() as u64) as usize]
}

async fn register_device(
    mut client: OpsApi,
    device_id: String,
    mut shutdown: Shutdown,
) -> (String, Registration) {
    let request = RegisterDeviceRequest {
        device_id: device_id.clone(),
        display_name: String::new(),
        labels: [("fleet", "sim"), ("site", site_of(&device_id))]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ..Default::default()
    };
    let mut backoff = Backoff::default();
    let mut attempt = 0;
    let registration = loop {
        if shutdown.is_requested() {
            break Registration::Interrupted;
        }
        attempt += 1;
        let reason =
            match tokio::time::timeout(CALL_TIMEOUT, client.register_device(request.clone())).await
            {
                Ok(Ok(response)) => {
                    let token = response.into_inner().token;
                    break if token.trim().is_empty() {
                        Registration::Failed("the server returned an empty token".into())
                    } else {
                        Registration::Token(token)
                    };
                }
                Ok(Err(status)) => match status.code() {
                    Code::AlreadyExists => {
                        break Registration::Failed(
                            "already registered on the server, but its token is not in the \
                         credentials file (a token is shown only once): delete the credentials \
                         file and the server's data, or use another --device-prefix"
                                .into(),
                        );
                    }
                    Code::Unauthenticated | Code::PermissionDenied => {
                        break Registration::OpsTokenRejected(describe(&status));
                    }
                    code if is_transient(code) => describe(&status),
                    _ => {
                        break Registration::Failed(format!(
                            "RegisterDevice failed ({})",
                            describe(&status)
                        ));
                    }
                },
                Err(_elapsed) => format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
            };
        if attempt >= REGISTER_ATTEMPTS {
            break Registration::Failed(format!(
                "RegisterDevice failed {attempt} times, last with {reason}"
            ));
        }
        debug!(device = %device_id, attempt, "RegisterDevice failed ({reason}); retrying");
        let delay = backoff.next_delay(&mut rand::rng());
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.requested() => break Registration::Interrupted,
        }
    };
    (device_id, registration)
}

/// First Ctrl-C or SIGTERM: stop producing and settle the open streams.
/// Second: quit at once.
fn spawn_signal_listener(trigger: ShutdownTrigger, quiet: bool) {
    tokio::spawn(async move {
        wait_for_signal().await;
        if !quiet {
            eprintln!(
                "\nshutting down: waiting for the last acknowledgements (Ctrl-C again to quit now)"
            );
        }
        trigger.trigger();
        wait_for_signal().await;
        eprintln!("\ninterrupted twice: quitting without the report");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

fn spawn_progress(
    stats: Arc<Stats>,
    devices: u32,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut progress = Progress::new(u64::from(devices));
        let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
        ticker.tick().await; // The first tick is immediate: nothing to show yet.
        loop {
            tokio::select! {
                _ = ticker.tick() => progress.print(&stats),
                _ = &mut stop_rx => break,
            }
        }
        progress.finish(&stats);
    });
    (stop_tx, task)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::Args;
    use crate::mock_server::{GOOD_TOKEN, MockIngest, MockOps, OPS_TOKEN, serve_both};

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

        let server = format!("http://{addr}");
        let argv = [
            "device-sim",
            "--server",
            &server,
            "--ops-token",
            OPS_TOKEN,
            "--devices",
            "3",
            "--connections",
            "2",
            "--sample-rate",
            "1000",
            "--batch-size",
            "10",
            "--batches-per-stream",
            "5",
            "--duration",
            "1s",
            "--quiet",
            "--credentials-file",
            creds_path.to_str().expect("utf-8 path"),
            "--report-json",
            report_path.to_str().expect("utf-8 path"),
        ];
        let config = Config::from_args(Args::try_parse_from(argv).expect("args")).expect("config");
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
        assert!(report["readings_accepted"].as_u64().expect("number") > 0);
        assert_eq!(report["readings_accepted"], report["readings_sent"]);
        assert!(report["wire_bytes_sent"].as_u64().expect("number") > 0);
    }

    #[tokio::test]
    async fn wrong_ops_token_is_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = serve_both(MockIngest::default(), MockOps::default()).await;
        let server = format!("http://{addr}");
        let creds = dir.path().join("creds.json");
        let argv = [
            "device-sim",
            "--server",
            &server,
            "--ops-token",
            "nope",
            "--devices",
            "2",
            "--quiet",
            "--credentials-file",
            creds.to_str().expect("utf-8 path"),
        ];
        let config = Config::from_args(Args::try_parse_from(argv).expect("args")).expect("config");
        let err = run(config).await.expect_err("ops token rejected");
        assert!(err.to_string().contains("ops token"), "{err:#}");
    }

    #[test]
    fn sites_are_stable_per_device() {
        assert_eq!(site_of("sim-00001"), site_of("sim-00001"));
        let distinct: std::collections::HashSet<_> = (1..=100)
            .map(|n| site_of(&crate::config::device_id("sim-", n)))
            .collect();
        assert!(distinct.len() > 1);
    }
}
