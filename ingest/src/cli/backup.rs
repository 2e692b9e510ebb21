//! `ingest backup DEST`: an online, verified copy of the SQLite database;
//! for PostgreSQL, the `pg_dump` command that does the same.

use std::path::PathBuf;

use clap::Args;

use super::serve::StorageArgs;
use crate::storage::Database;
use crate::storage::backup;

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Where to write the copy; it must not exist.
    dest: PathBuf,
    #[command(flatten)]
    storage: StorageArgs,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: BackupArgs) -> anyhow::Result<()> {
    match args.storage.database()? {
        Database::Sqlite { path } => {
            let report = backup::sqlite(&path, &args.dest).await?;
            if args.json {
                let json = serde_json::json!({
                    "path": report.path,
                    "bytes": report.bytes,
                    "devices": report.devices,
                    "readings": report.readings,
                    "alert_events": report.alert_events,
                    "commands": report.commands,
                    "committed_sequences": report.committed_sequences,
                    "seconds": report.took.as_secs_f64(),
                });
                println!("{json}");
            } else {
                println!(
                    "backed up {} to {} in {:.1?}: {} bytes, integrity ok; {} devices, {} readings, {} alert events, {} commands",
                    path.display(),
                    report.path.display(),
                    report.took,
                    report.bytes,
                    report.devices,
                    report.readings,
                    report.alert_events,
                    report.commands,
                );
                println!(
                    "to restore: stop the server, then copy it to <data-dir>/telemetry.db (remove telemetry.db-wal and -shm)"
                );
            }
        }
        Database::Postgres { url } if args.json => {
            let json = serde_json::json!({
                "backend": "postgres",
                "done": false,
                "backup_command": backup::pg_dump_command(&url, &args.dest),
                "restore_command": format!(
                    "pg_restore --no-owner --dbname <empty database URL> {}",
                    args.dest.display()
                ),
            });
            println!("{json}");
        }
        Database::Postgres { url } => {
            println!("PostgreSQL: take a consistent online backup with pg_dump:");
            println!("  {}", backup::pg_dump_command(&url, &args.dest));
            println!("and restore it into an empty database with:");
            println!(
                "  pg_restore --no-owner --dbname <empty database URL> {}",
                args.dest.display()
            );
        }
    }
    Ok(())
}
