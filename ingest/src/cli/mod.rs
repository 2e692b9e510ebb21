//! The `ingest` command line: the server (`serve`, `migrate`) and the
//! operator subcommands, one file each.

mod alerts;
mod backup;
mod client;
mod command;
mod credentials;
mod device_file;
mod devices;
mod migrate;
pub mod output;
mod readings;
mod readings_tail;
mod report;
mod rules;
mod serve;
pub mod tls_args;

use clap::{Parser, Subcommand};

#[cfg(test)]
mod tests {
    #[test]
    fn durations_are_parsed_one_way_with_examples() {
        assert_eq!(
            super::duration("1h30m"),
            Ok(std::time::Duration::from_secs(5400))
        );
        assert_eq!(
            super::duration(" 500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        for bad in ["5", "forever", "5 minutes later"] {
            let error = super::duration(bad).unwrap_err();
            assert!(
                error.starts_with(&format!("`{bad}` is not a duration")),
                "{error}"
            );
            assert!(error.contains("e.g. 500ms, 30s, 5m, 1h30m"), "{error}");
        }
        assert!(super::whole_millis("1500us").is_err());
        assert!(super::whole_millis("1500ms").is_ok());
    }

    /// Every command that prints an answer can print it as JSON, for
    /// scripts: `--json` (`serve` and `migrate` print only logs).
    #[test]
    fn every_command_that_prints_has_json() {
        use clap::CommandFactory;
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let leaf = command.get_subcommands().next().is_none();
            let kind_of_send = path.starts_with("ingest command send ");
            let prints =
                leaf && !kind_of_send && !["ingest serve", "ingest migrate"].contains(&path);
            if prints
                && !command
                    .get_arguments()
                    .any(|a| a.get_long() == Some("json"))
            {
                missing.push(path.to_owned());
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "ingest", &mut missing);
        assert!(missing.is_empty(), "commands without --json: {missing:#?}");
    }

    /// `--help` tells what each positional argument is, in every command.
    #[test]
    fn every_positional_argument_is_described() {
        use clap::CommandFactory;
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_positionals() {
                if arg.get_help().is_none() && !arg.is_hide_set() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "ingest", &mut missing);
        assert!(
            missing.is_empty(),
            "positional arguments without help: {missing:#?}"
        );
    }
}

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

/// Every duration flag's parser: humantime's syntax (`500ms`, `30s`,
/// `1h30m`, `2d`), and one message with examples when it is not that.
fn duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!(
            "`{s}` is not a duration ({e}): write a number with its unit, \
             e.g. 500ms, 30s, 5m, 1h30m (units: ms, s, m, h, d)"
        )
    })
}

/// A duration the server takes in whole milliseconds: anything finer would
/// be silently cut, so it is refused instead.
fn whole_millis(s: &str) -> Result<std::time::Duration, String> {
    let d = duration(s)?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{s} is not a whole number of milliseconds"));
    }
    Ok(d)
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
