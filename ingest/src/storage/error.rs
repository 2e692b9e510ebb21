//! What can go wrong in storage, in terms the API layer can map to a status.

/// A storage failure. `NotFound` and `AlreadyExists` are answers about the
/// data; the rest are faults whose detail is logged, never sent to clients.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("row has an invalid value: {0}")]
    Corrupt(String),
    #[error("the batch writer has stopped")]
    WriterStopped,
}

impl From<sqlx::Error> for StorageError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => Self::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::AlreadyExists,
            _ => Self::Database(e),
        }
    }
}
