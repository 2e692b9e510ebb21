//! The `ingest` command line: the server (`serve`, `migrate`) and the
//! operator subcommands, one file each.

mod alerts;
mod backup;
mod client;
mod command;
mod credentials;
mod devices;
mod migrate;
pub mod output;
mod readings;
mod report;
mod rules;
mod serve;
pub mod tls_args;

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
    Serve(Box<serve::ServeArgs>),
    /// Bring the database schema up to date, then exit.
    Migrate(migrate::MigrateArgs),
    /// Register, show and list devices; rotate and revoke their credentials.
    #[command(subcommand)]
    Devices(devices::DevicesCommand),
    /// Create, list and delete alert rules.
    #[command(subcommand)]
    Rules(rules::RulesCommand),
    /// List, acknowledge and watch alerts.
    #[command(subcommand)]
    Alerts(alerts::AlertsCommand),
    /// Send commands to devices and follow them.
    #[command(subcommand)]
    #[allow(clippy::enum_variant_names)]
    Command(command::CommandCommand),
    /// Print a reporting view (read-only): a table, CSV or JSON lines.
    Report(report::ReportArgs),
    /// Read readings back: raw or in buckets, as a table, CSV or JSON lines.
    #[command(subcommand)]
    Readings(readings::ReadingsCommand),
    /// Copy the SQLite database while the server runs, and verify the copy
    /// (PostgreSQL: print the pg_dump command).
    Backup(backup::BackupArgs),
}

/// A `--label KEY=VALUE` argument.
fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Parses `args` (without the program's name) as one subcommand of a
/// group: what the unit tests of each group's file run.
#[cfg(test)]
fn parse_subcommand<C: clap::Subcommand>(args: &[&str]) -> Result<C, clap::Error> {
    #[derive(Parser)]
    struct Cli<C: clap::Subcommand> {
        #[command(subcommand)]
        cmd: C,
    }
    Cli::<C>::try_parse_from(std::iter::once("ingest").chain(args.iter().copied()))
        .map(|cli| cli.cmd)
}

/// What clap says to `args` after the subcommand `name` of a group, when
/// it refuses them.
#[cfg(test)]
fn refusal<C: clap::Subcommand + std::fmt::Debug>(
    name: &str,
    args: &[&str],
) -> clap::error::ErrorKind {
    parse_subcommand::<C>(&[&[name], args].concat())
        .expect_err("invalid arguments")
        .kind()
}

impl Cli {
    /// How to log: only `serve` has a choice, the operator commands log text.
    pub fn log_format(&self) -> crate::observability::LogFormat {
        match &self.command {
            Command::Serve(args) => args.log_format,
            _ => crate::observability::LogFormat::Text,
        }
    }

    /// Whether this runs the server (which exports traces, with `otel`).
    pub fn serves(&self) -> bool {
        matches!(self.command, Command::Serve(_))
    }

    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Migrate(args) => migrate::run(args).await,
            Command::Devices(cmd) => devices::run(cmd).await,
            Command::Rules(cmd) => rules::run(cmd).await,
            Command::Alerts(cmd) => alerts::run(cmd).await,
            Command::Command(cmd) => command::run(cmd).await,
            Command::Report(args) => report::run(args).await,
            Command::Readings(cmd) => readings::run(cmd).await,
            Command::Backup(args) => backup::run(args).await,
        }
    }
}
