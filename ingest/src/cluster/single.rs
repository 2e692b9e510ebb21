//! SQLite is served by one process. Two would each keep their own alert
//! state, sessions and command wake-ups with nothing to tell the other, and
//! take turns at SQLite's one write lock: the second is refused at start.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// Held for the life of the server; the lock goes with the process, however
/// it ends (the kernel releases it), so a crash leaves nothing to clean up.
#[derive(Debug)]
pub struct ProcessLock {
    _file: File,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the SQLite database {database} is already in use by another ingest server \
         (it holds {lock}); SQLite is served by one process: stop the other server, \
         or use PostgreSQL (--database-url postgres://...) to run several"
    )]
    InUse { database: PathBuf, lock: PathBuf },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ProcessLock {
    /// Takes the lock beside `database` (`<database>.lock`).
    pub fn acquire(database: &Path) -> Result<Self, LockError> {
        let mut path = database.as_os_str().to_owned();
        path.push(".lock");
        let path = PathBuf::from(path);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(TryLockError::WouldBlock) => Err(LockError::InUse {
                database: database.to_owned(),
                lock: path,
            }),
            Err(TryLockError::Error(e)) => Err(io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_database_is_refused_until_the_first_goes() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("telemetry.db");
        let first = ProcessLock::acquire(&db).unwrap();
        let second = ProcessLock::acquire(&db).unwrap_err();
        assert!(
            second
                .to_string()
                .contains("already in use by another ingest server"),
            "{second}"
        );
        drop(first);
        ProcessLock::acquire(&db).unwrap();
    }
}
