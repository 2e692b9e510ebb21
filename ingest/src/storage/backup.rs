//! Online backup of a SQLite database while the server keeps ingesting.
//!
//! `VACUUM INTO` copies one read transaction's snapshot: every batch
//! committed before it started is in the copy, and the server's writer is
//! never blocked (WAL readers do not block the writer). The copy is written
//! beside the destination, checked (`PRAGMA integrity_check`, counts),
//! synced, and only then renamed into place, so a crash never leaves a
//! half-written file under the name an operator will restore from.
//!
//! PostgreSQL has `pg_dump` for this, which takes the same kind of
//! snapshot; we print the command rather than reimplement it.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

/// What a verified backup holds.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub devices: i64,
    pub readings: i64,
    pub alert_events: i64,
    pub commands: i64,
    /// The highest committed batch sequence of each device, summed: a
    /// quick way to compare two backups.
    pub committed_sequences: i64,
    pub took: Duration,
}

/// Copies the SQLite database at `source` to `dest` (which must not exist)
/// and verifies the copy.
pub async fn sqlite(source: &Path, dest: &Path) -> anyhow::Result<BackupReport> {
    let started = Instant::now();
    anyhow::ensure!(
        source.exists(),
        "no database at {}: give the server's --data-dir or --database-url",
        source.display()
    );
    anyhow::ensure!(
        !dest.exists(),
        "{} exists; a backup never overwrites a file",
        dest.display()
    );
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        anyhow::ensure!(
            dir.is_dir(),
            "the directory {} does not exist: create it (mkdir -p {}) or back up elsewhere",
            dir.display(),
            dir.display()
        );
    }
    let partial = partial_path(dest);
    // A leftover from a crashed backup is ours to remove.
    let _ = std::fs::remove_file(&partial);

    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(source)
        .read_only(true)
        .busy_timeout(Duration::from_secs(30));
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .with_context(|| format!("opening {}", source.display()))?;
    let partial_text = partial
        .to_str()
        .context("the backup path is not valid UTF-8")?;
    sqlx::query("VACUUM INTO ?")
        .bind(partial_text)
        .execute(&mut conn)
        .await
        .with_context(|| format!("copying {} to {}", source.display(), partial.display()))?;
    conn.close().await?;

    let report = verify(&partial, dest, started).await;
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    std::fs::File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, dest)
        .with_context(|| format!("renaming {} to {}", partial.display(), dest.display()))?;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(BackupReport {
        took: started.elapsed(),
        ..report
    })
}

fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    dest.with_file_name(name)
}

/// Checks the copy at `path`; the report names `dest`, where it will be.
async fn verify(path: &Path, dest: &Path, started: Instant) -> anyhow::Result<BackupReport> {
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .read_only(true);
    let mut conn = SqliteConnection::connect_with(&options).await?;
    let integrity: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await?;
    anyhow::ensure!(
        integrity == ["ok"],
        "the copy failed its integrity check: {}",
        integrity.join("; ")
    );
    // What the copy holds, for the report: a count per table, and the sum
    // of the devices' marks (what a restore must not go behind).
    let mut figures = [0i64; 5];
    for (figure, sql) in figures.iter_mut().zip([
        "SELECT COUNT(*) FROM devices",
        "SELECT COUNT(*) FROM readings",
        "SELECT COUNT(*) FROM alert_events",
        "SELECT COUNT(*) FROM commands",
        "SELECT COALESCE(SUM(committed_sequence), 0) FROM devices",
    ]) {
        *figure = sqlx::query_scalar(sql).fetch_one(&mut conn).await?;
    }
    let [
        devices,
        readings,
        alert_events,
        commands,
        committed_sequences,
    ] = figures;
    conn.close().await?;
    Ok(BackupReport {
        path: dest.to_owned(),
        bytes: std::fs::metadata(path)?.len(),
        devices,
        readings,
        alert_events,
        commands,
        committed_sequences,
        took: started.elapsed(),
    })
}

/// The command that backs up a PostgreSQL database consistently, with the
/// password (if the URL holds one) left to `PGPASSWORD` or `~/.pgpass`.
pub fn pg_dump_command(url: &str, dest: &Path) -> String {
    format!(
        "pg_dump --format=custom --no-owner --file {} '{}'",
        shell_quote(&dest.display().to_string()),
        redact_password(url)
    )
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `postgres://user:secret@host/db` → `postgres://user@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or(user);
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pg_dump_command_never_carries_a_password() {
        let cmd = pg_dump_command(
            "postgres://ingest:hunter2@db:5432/telemetry",
            Path::new("/backups/t 1.dump"),
        );
        assert!(!cmd.contains("hunter2"), "{cmd}");
        assert!(
            cmd.contains("'postgres://ingest@db:5432/telemetry'"),
            "{cmd}"
        );
        assert!(cmd.contains("--file '/backups/t 1.dump'"), "{cmd}");
    }

    #[tokio::test]
    async fn a_backup_never_overwrites_and_leaves_no_partial_file_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("exists.db");
        std::fs::write(&dest, b"keep me").unwrap();
        let err = sqlite(&dir.path().join("missing.db"), &dir.path().join("b.db"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no database"), "{err}");
        let source = dir.path().join("s.db");
        let options = SqliteConnectOptions::from_str("sqlite://")
            .unwrap()
            .filename(&source)
            .create_if_missing(true);
        SqliteConnection::connect_with(&options).await.unwrap();
        let err = sqlite(&source, &dest).await.unwrap_err();
        assert!(err.to_string().contains("never overwrites"), "{err}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"keep me");
        // An empty database has no tables: the verification refuses it and
        // the partial copy is removed.
        let other = dir.path().join("other.db");
        assert!(sqlite(&source, &other).await.is_err());
        assert!(!other.exists() && !partial_path(&other).exists());
    }
}
