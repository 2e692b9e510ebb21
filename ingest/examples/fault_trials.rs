//! Fault trials: the real server as a child process, a fleet uploading to it,
//! and the server killed with SIGKILL at random moments (and, on
//! PostgreSQL, PostgreSQL itself restarted) while batches are in flight.
//! After each trial the database is read directly and checked against what
//! the fleet was told and against an independent alert oracle:
//!
//! * every acknowledged batch is stored, nothing twice, nothing half;
//! * the alert events are exactly those the rules define for the stored
//!   readings, with event ids 1..=n and no gap;
//! * a watcher that held WatchAlerts through every kill saw each event
//!   once, in order;
//! * readings-feed watchers that held WatchReadings through every kill,
//!   resuming from their cursors (one following every device, two
//!   following some), saw, after dropping repeats by key, exactly the
//!   stored readings of their selection, each at its batch's position,
//!   positions never going back;
//! * every command the operator's SendCommand answered while the servers
//!   were killed ends ACKED, received by its device (held on a Control
//!   stream that reconnects through every kill), again only with the same
//!   id.
//!
//! With `--processes N` (PostgreSQL) N servers share the one database: the
//! fleet is spread over them, a device whose upload fails resumes against
//! the next server (as a balancing client would), the watcher too, and each
//! kill strikes one server drawn from the seed, which is then restarted.
//!
//! With `--protocol mqtt` the fleet speaks MQTT 5 instead: each device
//! publishes its batches at QoS 1 and counts one acknowledged only on its
//! PUBACK; after a kill it reconnects and publishes again from its last
//! PUBACK. The commanded devices (three of their own) subscribe to their
//! command topic and publish a result for each command. The checks are the
//! same.
//!
//! ```sh
//! cargo build --release -p ingest --bin ingest --example fault_trials
//! target/release/examples/fault_trials --backend sqlite --trials 3
//! target/release/examples/fault_trials --backend postgres --seed 1234 \
//!     --restart-postgres-cmd 'pg_ctlcluster --skip-systemctl-redirect 15 main restart'
//! target/release/examples/fault_trials --backend postgres --processes 3 --trials 2 \
//!     --server-arg=--replica-lease=6s --server-arg=--replica-renew=2s
//! ```
//!
//! Each trial prints its seed first; `--seed` replays one. The seed fixes
//! the data, the rules' firing readings and the fault schedule (by upload
//! progress); the exact instants still depend on the machine.

mod fault_trials {
    pub mod check;
    pub mod commander;
    pub mod db;
    pub mod feed_watcher;
    pub mod fleet;
    pub mod mqtt_device;
    pub mod oracle;
    pub mod plan;
    pub mod server;
    pub mod trial;
    pub mod watcher;
}

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use fault_trials::trial::{self, TrialConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// How the fleet and the commanded devices talk to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// UploadReadings streams and Control streams.
    Grpc,
    /// MQTT 5: QoS 1 PUBLISHes, acknowledged by PUBACK; commands on the
    /// device's command topic.
    Mqtt,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "grpc")]
    protocol: Protocol,
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// Trials to run, each with a fresh seed (printed).
    #[arg(long, default_value_t = 3)]
    trials: u32,
    /// Run one trial with this seed, to replay a failure.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 10)]
    devices: u32,
    #[arg(long, default_value_t = 300)]
    batches_per_device: u64,
    /// SIGKILLs of the server per trial.
    #[arg(long, default_value_t = 2)]
    kills: u32,
    /// Servers on the one database (PostgreSQL only); each kill strikes
    /// one of them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    processes: u16,
    /// A flag for every `ingest serve` (repeat for several), e.g.
    /// `--server-arg=--replica-lease=6s`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Stop the server at each "kill" with SIGTERM instead (it drains and
    /// exits): tells what a crash loses from what any restart forgets.
    #[arg(long)]
    graceful: bool,
    /// PostgreSQL only: a shell command restarting PostgreSQL, run once per
    /// trial while the fleet uploads.
    #[arg(long)]
    restart_postgres_cmd: Option<String>,
    /// Where databases may be created and dropped; a trial uses fault_<seed>.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres_url: String,
    /// The server binary (default: `ingest` beside this example's directory).
    #[arg(long)]
    ingest_bin: Option<PathBuf>,
    /// A trial that has not finished by then fails.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    trial_deadline: Duration,
}

fn default_ingest_bin() -> anyhow::Result<PathBuf> {
    // target/release/examples/fault_trials -> target/release/ingest
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("this executable has no grandparent directory")?;
    Ok(dir.join("ingest"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ingest_bin = match args.ingest_bin {
        Some(p) => p,
        None => default_ingest_bin()?,
    };
    anyhow::ensure!(
        ingest_bin.is_file(),
        "no server binary at {} (build it: cargo build --release -p ingest --bin ingest)",
        ingest_bin.display()
    );
    anyhow::ensure!(
        args.processes == 1 || args.backend == Backend::Postgres,
        "--processes {} needs --backend postgres: one SQLite database has one server",
        args.processes
    );
    let restart_postgres = match args.backend {
        Backend::Postgres => args.restart_postgres_cmd.clone(),
        Backend::Sqlite => None,
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        // Small enough to type back, and a valid database name suffix.
        None => (0..args.trials)
            .map(|_| rand::random::<u64>() % 1_000_000_000)
            .collect(),
    };
    let mut failed = 0;
    for (i, &seed) in seeds.iter().enumerate() {
        let mut processes = match args.processes {
            1 => String::new(),
            n => format!(" --processes {n}"),
        };
        if args.protocol == Protocol::Mqtt {
            processes.push_str(" --protocol mqtt");
        }
        println!(
            "trial {}/{}: seed {seed} (replay: --backend {}{processes} --seed {seed})",
            i + 1,
            seeds.len(),
            match args.backend {
                Backend::Sqlite => "sqlite",
                Backend::Postgres => "postgres",
            }
        );
        let config = TrialConfig {
            seed,
            backend: args.backend,
            protocol: args.protocol,
            devices: args.devices,
            batches_per_device: args.batches_per_device,
            kills: args.kills,
            processes: usize::from(args.processes),
            server_args: args.server_args.clone(),
            graceful: args.graceful,
            restart_postgres: restart_postgres.clone(),
            postgres_url: args.postgres_url.trim_end_matches('/').to_owned(),
            ingest_bin: ingest_bin.clone(),
            deadline: args.trial_deadline,
        };
        let outcome = trial::run(&config).await;
        println!("{}", outcome.line());
        if !outcome.passed() {
            failed += 1;
        }
    }
    println!(
        "fault trials: {} of {} passed",
        seeds.len() - failed,
        seeds.len()
    );
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
