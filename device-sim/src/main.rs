//! `device-sim`: a fleet of simulated IoT devices for telemetry-ingest, and
//! its load generator.
//!
//! Each device registers once through `Ops.RegisterDevice` (its token is kept
//! in a credentials file, since the server shows it only once), learns where
//! to resume from `Ingest.GetUploadCursor`, then samples realistic sensor
//! signals and uploads them in batches over `Ingest.UploadReadings` streams.
//! A batch counts as delivered only when a stream summary reports it
//! committed; anything else is kept and resent after a failure, so a server
//! restart loses nothing (the server skips duplicates). Each device also
//! holds an `Ingest.Control` stream and obeys the commands it receives:
//! sampling interval, batch size, sensors on and off, reboot, ping.
//!
//! Run `device-sim --help` for the flags; every flag can also be set through
//! a `DEVICE_SIM_*` environment variable. Logs go to stderr and follow
//! `RUST_LOG` (default `warn`, so the progress line stays readable).

mod anomaly;
mod buffer;
mod client;
mod config;
mod control;
mod credentials;
#[cfg(feature = "local-server")]
mod demo_alerts;
#[cfg(feature = "local-server")]
mod demo_command;
mod device;
mod fleet;
#[cfg(feature = "local-server")]
mod local_server;
mod memory;
#[cfg(test)]
mod mock_server;
mod report;
mod sampling;
mod sensors;
mod settings;
mod shutdown;
mod stats;
mod wire;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes would litter log files and CI output.
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let args = config::Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("device-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: config::Args) -> anyhow::Result<ExitCode> {
    let local = args
        .local_server
        .then(|| (args.data_dir.clone(), args.listen));
    let config = config::Config::from_args(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))?;
    runtime.block_on(async move {
        match local {
            None => fleet::run(config).await,
            #[cfg(feature = "local-server")]
            Some((data_dir, listen)) => run_local(config, &data_dir, listen).await,
            #[cfg(not(feature = "local-server"))]
            Some(_) => anyhow::bail!(
                "--local-server needs the `local-server` cargo feature, which this device-sim \
                 was built without (--no-default-features): rebuild it with default features, \
                 or point --server at a running ingest server"
            ),
        }
    })
}

/// `--local-server`: the real server in this process, the fleet against it,
/// and the demo's alerts and command.
#[cfg(feature = "local-server")]
async fn run_local(
    mut config: config::Config,
    data_dir: &std::path::Path,
    listen: std::net::SocketAddr,
) -> anyhow::Result<ExitCode> {
    let server = local_server::LocalServer::start(data_dir, listen).await?;
    config.servers = vec![server.url.clone()];
    config.ops_token = Some(server.ops_token.clone());
    let alerts = match config.anomaly_rate {
        Some(_) => Some(demo_alerts::start(&server.url, &server.ops_token).await?),
        None => None,
    };
    let devices = (1..=config.devices).map(|n| config.device_id(n)).collect();
    let halfway = config
        .duration
        .map_or(std::time::Duration::from_secs(15), |d| d / 2);
    let command = demo_command::start(
        server.url.clone(),
        server.ops_token.clone(),
        devices,
        config.sample_rate,
        halfway,
    );
    let code = fleet::run(config).await;
    command.abort();
    if let Some((counts, task)) = alerts {
        task.abort();
        println!(
            "  alerts            {} fired, {} resolved (rules: ingest rules list; events: ingest alerts watch)",
            counts.fired.load(std::sync::atomic::Ordering::Relaxed),
            counts.resolved.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    let database = server.database.clone();
    server.stop().await?;
    println!(
        "  stored in         {} (SQLite; try: sqlite3 {} 'SELECT COUNT(*) FROM readings')",
        database.display(),
        database.display()
    );
    code
}
