//! The `ingest` command line: the server (`serve`, `migrate`) and the
//! operator subcommands, one file each.

mod client;
mod devices;
mod migrate;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ingest",
    version,
    about = "telemetry-ingest: IoT sensor telemetry over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the ingest server.
    Serve(serve::ServeArgs),
    /// Bring the database schema up to date, then exit.
    Migrate(migrate::MigrateArgs),
    /// Register, show and list devices.
    #[command(subcommand)]
    Devices(devices::DevicesCommand),
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Migrate(args) => migrate::run(args).await,
            Command::Devices(cmd) => devices::run(cmd).await,
        }
    }
}
