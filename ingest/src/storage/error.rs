//! What can go wrong in storage, in terms the API layer can map to a status.

use crate::domain::DeviceId;

/// A storage failure. `NotFound` and `AlreadyExists` are answers about the
/// data; the rest are faults whose detail is logged, never sent to clients.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("not found")]
    NotFound,
    #[error("already exists: {0}")]
    AlreadyExists(Clash),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// Nothing answered at the address (at start-up).
    #[error("cannot reach PostgreSQL at {at}: {why}")]
    Unreachable { at: String, why: String },
    /// The server answered; the database named in the URL is not there.
    #[error(
        "database `{name}` does not exist on {host}:{port}: create it with `createdb -h {host} -p {port} {name}`"
    )]
    NoDatabase {
        name: String,
        host: String,
        port: u16,
    },
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
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                Self::AlreadyExists(Clash::of(db.as_ref()))
            }
            _ => Self::Database(e),
        }
    }
}

/// Which unique value a write clashed with, so the answer can name it: a
/// certificate bound elsewhere is not a device that already exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Clash {
    #[error("the device id")]
    DeviceId,
    /// `holder`: the device the certificate is bound to, when the writer
    /// looked it up (see `Store::certificate_holder`).
    #[error("the certificate")]
    Certificate { holder: Option<DeviceId> },
    #[error("the token")]
    Token,
    /// A constraint not named above, by its name (for the logs).
    #[error("constraint {0}")]
    Other(String),
}

impl Clash {
    /// PostgreSQL names the constraint; SQLite names the columns in its
    /// message ("UNIQUE constraint failed: devices.device_id"). Both
    /// spellings are matched here, beside the schema's names.
    fn of(db: &dyn sqlx::error::DatabaseError) -> Self {
        let name = match db.constraint() {
            Some(name) => name.to_owned(),
            None => db
                .message()
                .strip_prefix("UNIQUE constraint failed: ")
                .unwrap_or(db.message())
                .to_owned(),
        };
        match name.as_str() {
            "devices_device_id_key" | "devices.device_id" => Self::DeviceId,
            "devices_cert_sha256" | "devices.cert_sha256" => Self::Certificate { holder: None },
            "devices_token_sha256_key"
            | "devices.token_sha256"
            | "device_tokens_token_sha256_key"
            | "device_tokens.token_sha256" => Self::Token,
            _ => Self::Other(name),
        }
    }
}
