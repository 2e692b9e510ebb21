//! One trial, start to verdict: a fresh database and server (or several
//! servers on one PostgreSQL database), the rules, the fleet, the watchers
//! and the commanded devices, the faults on a schedule drawn from the seed
//! (by upload progress, so they strike while batches are in flight), then
//! the checks on what is stored.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::check::{self, Commands, Report};
use super::db::{self, Db};
use super::fleet::{self, Progress};
use super::plan::{self, Plan};
use super::server::{self, Server};
use super::{commander, feed_watcher, mqtt_device, watcher};
use crate::{Backend, Protocol};

pub struct TrialConfig {
    pub seed: u64,
    pub backend: Backend,
    pub protocol: Protocol,
    pub devices: u32,
    pub batches_per_device: u64,
    pub kills: u32,
    /// Servers on the one database; each kill strikes one of them, drawn
    /// from the seed.
    pub processes: usize,
    /// Flags added to every `ingest serve`.
    pub server_args: Vec<String>,
    pub graceful: bool,
    pub restart_postgres: Option<String>,
    pub postgres_url: String,
    pub ingest_bin: PathBuf,
    pub deadline: Duration,
}

/// How long the watcher may take to catch up once the fleet is done.
const CATCH_UP: Duration = Duration::from_secs(10);

/// Devices that also hold a Control stream: few, so each gets many
/// commands around every kill.
const COMMANDED_DEVICES: u32 = 3;

/// How long the commanded devices may take, once the fleet is done, to
/// receive and acknowledge every command the operator was answered.
const DRAIN: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Kill,
    RestartPostgres,
}

#[derive(Default)]
pub struct Outcome {
    seed: u64,
    backend: &'static str,
    /// " over MQTT", or nothing for gRPC.
    protocol: &'static str,
    processes: usize,
    /// Device moves to another server after a failure, all devices.
    failovers: u64,
    kills: u32,
    pg_restarts: u32,
    unexpected_exits: Vec<String>,
    watcher_ids: usize,
    /// SendCommand calls that failed: no promise made.
    command_sends_failed: u64,
    /// Control streams the commanded devices opened, all together.
    control_streams: u64,
    elapsed: Duration,
    report: Option<Report>,
    /// Why the trial could not run to its checks.
    error: Option<String>,
    /// What a failed trial leaves behind for inspection.
    kept: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.report.as_ref().is_some_and(|r| r.problems.is_empty())
    }

    pub fn line(&self) -> String {
        let mut s = format!(
            "seed {} {}{}: kills {}, pg restarts {}",
            self.seed, self.backend, self.protocol, self.kills, self.pg_restarts
        );
        if self.processes > 1 {
            s = format!(
                "{s}, {} processes, device failovers {}",
                self.processes, self.failovers
            );
        }
        if !self.unexpected_exits.is_empty() {
            s += &format!(
                ", server exited by itself {}x ({})",
                self.unexpected_exits.len(),
                self.unexpected_exits.join(", ")
            );
        }
        if let Some(r) = &self.report {
            s += &format!(
                ", batches acked {}, readings stored {}, events expected {} stored {}",
                r.acked_batches, r.readings_stored, r.events_expected, r.events_stored
            );
            let rules: Vec<_> = r
                .per_rule
                .iter()
                .map(|(id, (e, st, m, x))| format!("{id} {e}/{st}, {m} missing, {x} extra"))
                .collect();
            s += &format!(" ({}), watcher {} ids", rules.join("; "), self.watcher_ids);
            let feeds: Vec<_> = r
                .feeds
                .iter()
                .map(|(label, rows, repeats, reconnects)| {
                    format!("{label}: {rows} readings, {repeats} repeats, {reconnects} reconnects")
                })
                .collect();
            s += &format!(", feed watchers ({})", feeds.join("; "));
            s += &format!(
                ", commands answered {} ({} redelivered, {} sends failed, {} control streams)",
                r.commands_answered,
                r.commands_redelivered,
                self.command_sends_failed,
                self.control_streams
            );
        }
        s += &format!(
            ", {:.1} s: {}",
            self.elapsed.as_secs_f64(),
            if self.passed() { "PASS" } else { "FAIL" }
        );
        if let Some(e) = &self.error {
            s += &format!("\n  error: {e}");
        }
        if let Some(r) = &self.report {
            for p in r.problems.iter().take(8) {
                s += &format!("\n  - {p}");
            }
            if r.problems.len() > 8 {
                s += &format!("\n  ... and {} more problems", r.problems.len() - 8);
            }
        }
        for k in &self.kept {
            s += &format!("\n  kept: {k}");
        }
        s
    }
}

pub async fn run(config: &TrialConfig) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome {
        seed: config.seed,
        backend: match config.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        },
        protocol: match config.protocol {
            Protocol::Grpc => "",
            Protocol::Mqtt => " over MQTT",
        },
        processes: config.processes,
        ..Outcome::default()
    };
    let dir =
        std::env::temp_dir().join(format!("fault_trials-{}-{}", outcome.backend, config.seed));
    let database = format!("fault_{}", config.seed);
    // Past the deadline the trial is dropped, and with it the server child.
    let result = tokio::time::timeout(
        config.deadline,
        run_inner(config, &dir, &database, &mut outcome),
    )
    .await;
    match result {
        Ok(Ok(report)) => outcome.report = Some(report),
        Ok(Err(e)) => outcome.error = Some(format!("{e:#}")),
        Err(_) => {
            outcome.error = Some(format!(
                "the trial did not finish within {:?}",
                config.deadline
            ))
        }
    }
    outcome.elapsed = started.elapsed();
    if outcome.passed() {
        let _ = std::fs::remove_dir_all(&dir);
        if config.backend == Backend::Postgres {
            let drop = format!("DROP DATABASE IF EXISTS {database}");
            if let Err(e) = db::postgres_admin(&config.postgres_url, &[&drop]).await {
                eprintln!("could not drop {database}: {e:#}");
            }
        }
    } else {
        // The line shows the first problems; the file has all of them.
        if let Some(r) = &outcome.report {
            let path = dir.join("problems.txt");
            if std::fs::write(&path, r.problems.join("\n") + "\n").is_ok() {
                outcome
                    .kept
                    .push(format!("every problem: {}", path.display()));
            }
        }
        let logs: Vec<String> = server_dirs(&dir, config.processes)
            .iter()
            .map(|d| d.join("server.log").display().to_string())
            .collect();
        outcome.kept.push(format!(
            "{} (server log: {})",
            dir.display(),
            logs.join(", ")
        ));
        if config.backend == Backend::Postgres {
            outcome
                .kept
                .push(format!("database {}/{database}", config.postgres_url));
        }
    }
    outcome
}

async fn run_inner(
    config: &TrialConfig,
    dir: &std::path::Path,
    database: &str,
    outcome: &mut Outcome,
) -> anyhow::Result<Report> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let database_url = match config.backend {
        Backend::Sqlite => format!("sqlite://{}/telemetry.db", dir.display()),
        Backend::Postgres => {
            let drop = format!("DROP DATABASE IF EXISTS {database}");
            let create = format!("CREATE DATABASE {database}");
            db::postgres_admin(&config.postgres_url, &[&drop, &create]).await?;
            format!("{}/{database}", config.postgres_url)
        }
    };
    let mut servers = Vec::new();
    // One token for all: the fleet's operator calls and the watcher may go
    // to any of them.
    let ops_token_file = dir.join("ops.token");
    if config.processes > 1 {
        let token: String = format!("ops_fault_{:016x}", rand::random::<u64>());
        std::fs::write(&ops_token_file, format!("{token}\n")).context("writing the ops token")?;
    }
    for server_dir in server_dirs(dir, config.processes) {
        std::fs::create_dir_all(&server_dir)?;
        let mut server = Server::new(&config.ingest_bin, &server_dir, database_url.clone())?
            .with_args(&config.server_args);
        if config.processes > 1 {
            server = server.with_ops_token_file(&ops_token_file);
        }
        servers.push(server);
    }
    let result = drive(config, &mut servers, &database_url, outcome).await;
    let many = servers.len() > 1;
    outcome.unexpected_exits = servers
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.unexpected_exits.iter().map(move |e| match many {
                true => format!("process {i}: {e}"),
                false => e.clone(),
            })
        })
        .collect();
    result
}

/// The trial directory itself for one server (as always); `p0`, `p1`, ...
/// inside it for several.
fn server_dirs(dir: &std::path::Path, processes: usize) -> Vec<PathBuf> {
    if processes <= 1 {
        vec![dir.to_owned()]
    } else {
        (0..processes).map(|i| dir.join(format!("p{i}"))).collect()
    }
}

async fn drive(
    config: &TrialConfig,
    servers: &mut [Server],
    database_url: &str,
    outcome: &mut Outcome,
) -> anyhow::Result<Report> {
    let trial_started = Instant::now();
    // One after the other: the first start migrates the database.
    for server in servers.iter_mut() {
        server.start().await?;
    }
    let ops_token = servers[0].ops_token()?;
    let urls: Vec<String> = servers.iter().map(Server::url).collect();
    let url = urls[0].clone();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let plan = Arc::new(Plan {
        seed: config.seed,
        devices: config.devices,
        batches: config.batches_per_device,
        // Ten minutes back: well inside retention and the future skew, and
        // the whole trial's readings span only seconds.
        base_time: (now_ms - 600_000) * 1_000_000,
    });

    let channel = Channel::from_shared(url.clone())?.connect().await?;
    let mut ops = OpsClient::with_interceptor(channel, Bearer::new(&ops_token)?);
    for rule in plan::rule_protos() {
        ops.put_alert_rule(pb::PutAlertRuleRequest { rule: Some(rule) })
            .await
            .context("installing a rule")?;
    }
    let mut tokens = Vec::new();
    for d in 0..plan.devices {
        let token = ops
            .register_device(pb::RegisterDeviceRequest {
                device_id: plan.device_id(d),
                ..Default::default()
            })
            .await
            .context("registering a device")?
            .into_inner()
            .token;
        tokens.push(token);
    }
    let mut commanded_tokens = Vec::new();
    if config.protocol == Protocol::Mqtt {
        for c in 0..COMMANDED_DEVICES {
            let id = format!("fault-{}-cmd{c}", plan.seed);
            let token = ops
                .register_device(pb::RegisterDeviceRequest {
                    device_id: id.clone(),
                    ..Default::default()
                })
                .await
                .context("registering a commanded device")?
                .into_inner()
                .token;
            commanded_tokens.push((id, token));
        }
    }
    drop(ops);

    let (last_tx, mut last_rx) = watch::channel(0u64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let watcher = tokio::spawn(watcher::run(
        urls.clone(),
        ops_token.clone(),
        last_tx,
        stop_rx.clone(),
    ));
    // The readings feed: the whole of it, one device, and two others.
    let selections = [
        ("every device".to_owned(), None),
        (plan.device_id(0), Some(vec![plan.device_id(0)])),
        (
            format!("{} and {}", plan.device_id(1), plan.device_id(2)),
            Some(vec![plan.device_id(1), plan.device_id(2)]),
        ),
    ];
    let mut feed_watchers = Vec::new();
    for (label, devices) in selections {
        let (through_tx, through_rx) = watch::channel(0u64);
        let task = tokio::spawn(feed_watcher::run(
            label,
            devices.filter(|_| plan.devices > 2),
            urls.clone(),
            ops_token.clone(),
            through_tx,
            stop_rx.clone(),
        ));
        feed_watchers.push((task, through_rx));
    }
    let mqtt_addrs: Vec<_> = servers.iter().map(Server::mqtt_addr).collect();
    let (commanded, via) = match config.protocol {
        Protocol::Grpc => (
            (0..plan.devices.min(COMMANDED_DEVICES))
                .map(|d| (plan.device_id(d), tokens[d as usize].clone()))
                .collect(),
            commander::Via::Control,
        ),
        // Devices of their own: an MQTT device has one connection, and the
        // fleet's uploads hold it.
        Protocol::Mqtt => (commanded_tokens, commander::Via::Mqtt(mqtt_addrs.clone())),
    };
    let commands = commander::spawn(commanded, via, &urls, &ops_token, config.seed, &stop_rx);

    // The fleet gets what is left of the trial, less time for the checks.
    let fleet_deadline = trial_started
        + config
            .deadline
            .saturating_sub(CATCH_UP + Duration::from_secs(5));
    let progress = Arc::new(Progress::default());
    let devices: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(d, token)| match config.protocol {
            Protocol::Grpc => tokio::spawn(fleet::run_device(
                plan.clone(),
                d as u32,
                token,
                urls.clone(),
                progress.clone(),
                fleet_deadline,
            )),
            Protocol::Mqtt => tokio::spawn(mqtt_device::run_fleet_device(
                plan.clone(),
                d as u32,
                token,
                mqtt_addrs.clone(),
                progress.clone(),
                fleet_deadline,
            )),
        })
        .collect();

    let mut rng = StdRng::seed_from_u64(config.seed);
    let total = plan.batches * u64::from(plan.devices);
    let mut faults: Vec<(u64, Fault)> = (0..config.kills)
        .map(|_| {
            (
                (rng.random_range(0.05..0.85) * total as f64) as u64,
                Fault::Kill,
            )
        })
        .collect();
    if config.restart_postgres.is_some() {
        faults.push((
            (rng.random_range(0.2..0.7) * total as f64) as u64,
            Fault::RestartPostgres,
        ));
    }
    faults.sort_by_key(|f| f.0);

    for (at, fault) in faults {
        // Wait for the moment; a fleet that finished early ends the schedule.
        while progress.acked_batches.load(Ordering::Relaxed) < at
            && !devices.iter().all(|h| h.is_finished())
        {
            supervise(servers).await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if devices.iter().all(|h| h.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
        match fault {
            Fault::Kill => {
                // Drawn only with several servers, so a one-server seed
                // replays as it always did.
                let victim = if servers.len() > 1 {
                    rng.random_range(0..servers.len())
                } else {
                    0
                };
                let server = &mut servers[victim];
                if config.graceful {
                    server.stop().await?;
                    server::mark(&server.log, &format!("SIGTERM at {at} batches acked"));
                } else {
                    server.kill().await?;
                    server::mark(&server.log, &format!("SIGKILL at {at} batches acked"));
                }
                outcome.kills += 1;
                // Down a moment: the fleet meets refused connections (and,
                // with several servers, moves to the others).
                let down = if servers.len() > 1 { 1000 } else { 100 };
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..down))).await;
                servers[victim].start().await?;
            }
            Fault::RestartPostgres => {
                let Some(cmd) = config.restart_postgres.clone() else {
                    continue;
                };
                for server in servers.iter() {
                    server::mark(
                        &server.log,
                        &format!("PostgreSQL restart at {at} batches acked"),
                    );
                }
                let status = tokio::task::spawn_blocking(move || {
                    std::process::Command::new("sh")
                        .arg("-c")
                        .arg(&cmd)
                        .status()
                })
                .await?
                .context("running the PostgreSQL restart command")?;
                anyhow::ensure!(
                    status.success(),
                    "the PostgreSQL restart command failed ({status})"
                );
                outcome.pg_restarts += 1;
                for server in servers.iter() {
                    server::mark(&server.log, "PostgreSQL is back");
                }
            }
        }
    }
    while !devices.iter().all(|h| h.is_finished()) {
        supervise(servers).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut logs = Vec::new();
    for h in devices {
        logs.push(h.await?);
    }
    outcome.failovers = logs.iter().map(|l| l.failovers).sum();
    commands.stop_sender.send_replace(true);
    let sent = commands.sender.await?;
    outcome.command_sends_failed = sent.failed;

    // Every batch is acknowledged, so every alert it caused is recorded:
    // wait for the watcher to have seen the newest.
    let db = Db::open(database_url).await?;
    let caught_up_by = Instant::now() + CATCH_UP;
    loop {
        let newest = db.max_event_id().await?.max(0) as u64;
        if *last_rx.borrow_and_update() >= newest || Instant::now() >= caught_up_by {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), last_rx.changed()).await;
    }
    // And for the feed's watchers to have passed its newest position.
    let newest = db.last_feed_position().await?.max(0) as u64;
    for (_, through) in &mut feed_watchers {
        while *through.borrow_and_update() < newest && Instant::now() < caught_up_by {
            let _ = tokio::time::timeout(Duration::from_millis(200), through.changed()).await;
        }
    }
    // Bounded by the trial's deadline too, so a stuck command is reported
    // as such rather than as a trial out of time.
    let drained_by = (Instant::now() + DRAIN)
        .min(trial_started + config.deadline.saturating_sub(Duration::from_secs(5)));
    drain_commands(&db, &sent, drained_by).await?;
    stop_tx.send_replace(true);
    let seen = watcher.await?;
    outcome.watcher_ids = seen.ids.len();
    let mut feeds = Vec::new();
    for (task, _) in feed_watchers {
        feeds.push(task.await?);
    }
    let mut received = Vec::new();
    for task in commands.devices {
        received.push(task.await?);
    }
    outcome.control_streams = received.iter().map(|r| r.streams).sum();
    // All at once: each may take its grace period. A stop that fails is a
    // problem of the trial, and the stored data is still checked.
    let stops = futures::future::join_all(servers.iter_mut().map(Server::stop)).await;
    let snapshot = db.snapshot().await?;
    db.close().await;
    let commands = Commands {
        sent: &sent,
        received: &received,
    };
    let mut report = check::check(&plan, &snapshot, &logs, &seen, &feeds, &commands);
    let many = stops.len() > 1;
    for (i, stop) in stops.into_iter().enumerate() {
        let which = match many {
            false => "the server's".to_owned(),
            true => format!("process {i}'s"),
        };
        match stop {
            Ok(Some(status)) if !status.success() => report
                .problems
                .push(format!("{which} SIGTERM stop ended {status}")),
            Ok(_) => {}
            Err(e) => report.problems.push(format!("{which} SIGTERM stop: {e:#}")),
        }
    }
    Ok(report)
}

/// Waits until every command the operator was answered is ACKED in the
/// database, or until `by`; the checks tell which were not.
async fn drain_commands(db: &Db, sent: &commander::Sent, by: Instant) -> anyhow::Result<()> {
    while check::commands_not_acked(&db.commands().await?, sent) > 0 && Instant::now() < by {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Starts again any server that exited by itself.
async fn supervise(servers: &mut [Server]) -> anyhow::Result<()> {
    for server in servers.iter_mut() {
        server.supervise().await?;
    }
    Ok(())
}
