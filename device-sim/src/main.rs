//! `device-sim`: a fleet of simulated IoT devices for telemetry-ingest, and
//! its load generator.
//!
//! A new fleet registers through `Ops.RegisterDevices`, a thousand devices a
//! call (each token is kept in a credentials file, since the server shows it
//! only once). Each device learns where
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
//!
//! The code, from the top down (each folder imports only those below it):
//!
//! - `demo/`: `--local-server`, the whole system in one command (cargo
//!   feature `local-server`, on by default).
//! - `fleet/`: the run: connections, registration, a task per device, the
//!   signals that end it.
//! - `device/`: one device: its sampler, its uploader, its Control stream
//!   and what it does with each command.
//! - `sensors/`: the signals a device measures and the faults it injects.
//! - `report/`: the counters, the progress line and the final report.
//! - `server/`: servers run in this process: the real one, and the tests'
//!   mock.
//! - `config.rs` (the flags) and `shutdown.rs` (the switch that ends the
//!   run) are read by all of them.

mod config;
#[cfg(feature = "local-server")]
mod demo;
mod device;
mod fleet;
mod report;
mod sensors;
mod server;
mod shutdown;

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
            Some((data_dir, listen)) => demo::run(config, &data_dir, listen).await,
            #[cfg(not(feature = "local-server"))]
            Some(_) => anyhow::bail!(
                "--local-server needs the `local-server` cargo feature, which this device-sim \
                 was built without (--no-default-features): rebuild it with default features, \
                 or point --server at a running ingest server"
            ),
        }
    })
}
