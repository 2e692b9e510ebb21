//! Every error the API can return, mapped to a gRPC status in one place.
//! The matches are exhaustive on purpose: a new error variant must be given
//! a status here before the code compiles. Internal detail is logged, never
//! sent to clients.

use tonic::Status;

use crate::alerts::EngineError;
use crate::auth::AuthFailure;
use crate::control::SendError;
use crate::control::center::SessionEnd;
use crate::control::session::OpenError;
use crate::domain::alert::InvalidRule;
use crate::domain::command::InvalidCommand;
use crate::domain::consumer::InvalidConsumerName;
use crate::domain::{BatchError, DeviceId, InvalidDevice};
use crate::feed::FeedError;
use crate::pipeline::upload::{UploadError, UploadFailure};
use crate::read::{InvalidQuery, ReadError};
use crate::storage::credentials::CredentialError;
use crate::storage::{BulkRegistrationError, Clash, StorageError};

impl From<UploadFailure> for Status {
    fn from(failure: UploadFailure) -> Self {
        let resume = match failure.committed_sequence {
            0 => "no batch of this device is committed yet".to_owned(),
            n => format!("batches up to sequence {n} are committed; resume after it"),
        };
        match failure.error {
            UploadError::Batch(e) => match e {
                BatchError::TooManyReadings { .. } => {
                    Status::resource_exhausted(format!("{e}; {resume}"))
                }
                BatchError::ZeroSequence
                | BatchError::SequenceTooLarge(_)
                | BatchError::ColumnMismatch { .. } => {
                    Status::invalid_argument(format!("{e}; {resume}"))
                }
            },
            UploadError::Sequence(e) => Status::invalid_argument(format!("{e}; {resume}")),
            // The client's stream broke, or a message could not be taken
            // (too large, undecodable: made precise for every method in
            // `transport_status`).
            UploadError::Transport(status) => with_context(status, &resume),
            e @ (UploadError::FirstMessageTimeout(_) | UploadError::IdleTimeout(_)) => {
                Status::deadline_exceeded(format!("{e}; {resume}"))
            }
            UploadError::Storage(e) => with_context(storage(e), &resume),
            UploadError::CommitFailed => {
                Status::unavailable(format!("storage could not commit a batch; retry: {resume}"))
            }
            UploadError::ShuttingDown => Status::unavailable(format!(
                "the server is shutting down; reconnect and retry: {resume}"
            )),
            e @ UploadError::CredentialEnded(_) => {
                Status::unauthenticated(format!("{e}; {resume}"))
            }
        }
    }
}

fn with_context(status: Status, context: &str) -> Status {
    Status::new(status.code(), format!("{}; {context}", status.message()))
}

/// Maps a storage error. `NotFound` and `AlreadyExists` have better messages
/// where the caller knows what was looked for; see [`not_found`].
pub fn storage(e: StorageError) -> Status {
    match e {
        StorageError::NotFound => Status::not_found("not found"),
        StorageError::AlreadyExists(clash) => already_exists(clash, None),
        StorageError::WriterStopped => Status::unavailable("the server is shutting down; retry"),
        StorageError::Database(_)
        | StorageError::Migrate(_)
        | StorageError::Corrupt(_)
        | StorageError::Unreachable { .. }
        | StorageError::NoDatabase { .. } => {
            tracing::error!(error = %e, "storage failure");
            Status::unavailable("storage is unavailable; retry later")
        }
    }
}

/// Like [`storage`], naming what was not found or already existed.
pub fn storage_about(e: StorageError, what: &str) -> Status {
    match e {
        StorageError::NotFound => Status::not_found(format!("{what} does not exist")),
        StorageError::AlreadyExists(Clash::Other(name)) => {
            tracing::debug!(constraint = %name, "unique violation");
            Status::already_exists(format!("{what} already exists"))
        }
        other => storage(other),
    }
}

/// RegisterDevice refused by a value another device holds: which one, and
/// what to do about it.
pub fn registration(e: StorageError, id: &DeviceId) -> Status {
    match e {
        StorageError::AlreadyExists(clash) => already_exists(clash, Some(id)),
        other => storage(other),
    }
}

/// RegisterDevices refused: the id taken, or the value another device
/// holds.
pub fn bulk_registration(e: BulkRegistrationError) -> Status {
    match e {
        BulkRegistrationError::Taken(id) => already_exists(Clash::DeviceId, Some(&id)),
        BulkRegistrationError::Storage(StorageError::AlreadyExists(clash)) => {
            already_exists(clash, None)
        }
        BulkRegistrationError::Storage(other) => storage(other),
    }
}

/// ALREADY_EXISTS naming the clashing value; `device` is the id written,
/// when it was a registration.
fn already_exists(clash: Clash, device: Option<&DeviceId>) -> Status {
    let message = match (clash, device) {
        (Clash::DeviceId, Some(id)) => format!(
            "device {id} already exists: see it with `ingest devices get {id}`; \
             to issue it a new token, `ingest devices rotate-token {id}`"
        ),
        (Clash::DeviceId, None) => "that device id is already registered".to_owned(),
        (Clash::Certificate { holder }, _) => CredentialError::CertificateInUse(holder).to_string(),
        (Clash::Token, _) => {
            "the token generated clashed with an existing one; retry (each try generates a new one)"
                .to_owned()
        }
        (Clash::Other(name), _) => {
            tracing::debug!(constraint = %name, "unique violation");
            "already exists".to_owned()
        }
    };
    Status::already_exists(message)
}

impl From<InvalidDevice> for Status {
    fn from(e: InvalidDevice) -> Self {
        match e {
            InvalidDevice::Id(_)
            | InvalidDevice::Text(_)
            | InvalidDevice::LabelKey(_)
            | InvalidDevice::TooManyLabels(_) => Status::invalid_argument(e.to_string()),
        }
    }
}

/// Input that breaks a rule of its type: INVALID_ARGUMENT naming the type,
/// then the rule.
macro_rules! invalid_argument {
    ($($error:ty => $what:literal),* $(,)?) => {$(
        impl From<$error> for Status {
            fn from(e: $error) -> Self {
                Status::invalid_argument(format!(concat!("invalid ", $what, ": {}"), e))
            }
        }
    )*};
}

invalid_argument!(
    InvalidRule => "alert rule",
    InvalidCommand => "command",
    InvalidQuery => "QueryReadings request",
    InvalidConsumerName => "readings consumer",
);

impl From<FeedError> for Status {
    fn from(e: FeedError) -> Self {
        match e {
            FeedError::Cursor(_)
            | FeedError::CursorAhead { .. }
            | FeedError::TooManyDevices { .. } => Status::invalid_argument(e.to_string()),
            FeedError::NoSuchConsumer(_) => {
                Status::not_found(format!("{e}: see `ingest readings consumers`"))
            }
            FeedError::NoSuchDevice(_) => Status::not_found(e.to_string()),
            FeedError::Expired { .. } => Status::failed_precondition(e.to_string()),
            FeedError::Busy { retry_after, .. } => busy(&e, retry_after),
            FeedError::ShuttingDown => Status::unavailable(
                "the server is shutting down; resume from the cursor of the last message received",
            ),
            FeedError::Storage(e) => with_context(
                storage(e),
                "resume from the cursor of the last message received",
            ),
        }
    }
}

impl From<ReadError> for Status {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Token(_) | ReadError::TooManyDevices { .. } => {
                Status::invalid_argument(e.to_string())
            }
            ReadError::NoSuchDevice(_) => Status::not_found(e.to_string()),
            ReadError::Busy { retry_after, .. } => busy(&e, retry_after),
            ReadError::Storage(e) => with_context(
                storage(e),
                "resume with the resume_token of the last chunk received",
            ),
        }
    }
}

/// RESOURCE_EXHAUSTED with `RetryInfo`: a stream limit is reached.
fn busy(e: &dyn std::fmt::Display, retry_after: std::time::Duration) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!("{e}; retry in {} ms", retry_after.as_millis()),
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NoRule(_) => Status::not_found(format!("{e}: see `ingest rules list`")),
            EngineError::NoAlert(_) => Status::not_found(format!("{e}: see `ingest alerts list`")),
            EngineError::Resolved => Status::failed_precondition(
                "the alert is already resolved; only open alerts can be acknowledged",
            ),
            EngineError::Storage(e) => storage(e),
            EngineError::Stopped => Status::unavailable("the server is shutting down; retry"),
        }
    }
}

impl From<SendError> for Status {
    fn from(e: SendError) -> Self {
        match e {
            SendError::QueueFull(_) => Status::resource_exhausted(e.to_string()),
            SendError::TtlTooLong(_) => Status::invalid_argument(e.to_string()),
            SendError::Storage(e) => storage(e),
        }
    }
}

impl From<AuthFailure> for Status {
    fn from(e: AuthFailure) -> Self {
        match e {
            AuthFailure::Unavailable => Status::unavailable(e.to_string()),
            AuthFailure::Missing(_)
            | AuthFailure::MalformedAuthorization
            | AuthFailure::EmptyToken
            | AuthFailure::UnknownDeviceToken
            | AuthFailure::TokenRevoked
            | AuthFailure::TokenExpired(_)
            | AuthFailure::DeviceDisabled(_)
            | AuthFailure::MtlsRequired(_)
            | AuthFailure::CertificateNotBound
            | AuthFailure::CertificateDoesNotNameDevice(_)
            | AuthFailure::CertificateTokenMismatch
            | AuthFailure::NotTheBoundCertificate(_)
            | AuthFailure::UnknownOpsToken => Status::unauthenticated(e.to_string()),
        }
    }
}

impl From<CredentialError> for Status {
    fn from(e: CredentialError) -> Self {
        match e {
            CredentialError::NoSuchDevice(_) | CredentialError::NoSuchToken { .. } => {
                Status::not_found(e.to_string())
            }
            CredentialError::TooManyTokens { .. }
            | CredentialError::AlreadyRevoked { .. }
            | CredentialError::NoCertificate(_) => Status::failed_precondition(e.to_string()),
            CredentialError::CertificateInUse(_) => Status::already_exists(e.to_string()),
            CredentialError::Storage(e) => storage(e),
        }
    }
}

impl From<OpenError> for Status {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::NoHello | OpenError::InvalidHello(_) => {
                Status::invalid_argument(e.to_string())
            }
            OpenError::HelloTimeout(_) => Status::deadline_exceeded(e.to_string()),
            OpenError::Transport(status) => status,
            OpenError::NotRecorded => {
                Status::unavailable("the Control stream could not be recorded; retry")
            }
        }
    }
}

impl From<SessionEnd> for Status {
    fn from(end: SessionEnd) -> Self {
        match end {
            SessionEnd::Superseded => Status::aborted(
                "superseded: this device opened a newer Control stream; this one receives nothing more",
            ),
            SessionEnd::Rebalance => Status::unavailable(
                "rebalance: this Control stream reached its lifetime; reconnect (perhaps to another server)",
            ),
            SessionEnd::ShuttingDown => {
                Status::unavailable("the server is shutting down; reconnect")
            }
            SessionEnd::Refused(e) => Status::invalid_argument(format!(
                "{e}; the message was not recorded and the stream is closed"
            )),
            SessionEnd::CredentialEnded(e) => {
                Status::unauthenticated(format!("credential revoked: {e}"))
            }
        }
    }
}

/// A device opened streams faster than `--max-stream-opens-per-minute-per-device`:
/// RESOURCE_EXHAUSTED with `google.rpc.RetryInfo`, so clients that read it
/// wait exactly long enough.
pub fn stream_rate_exceeded(retry_after: std::time::Duration) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let millis = retry_after.as_millis().max(1);
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!(
            "this device opens streams faster than the server allows (--max-stream-opens-per-minute-per-device); retry in {millis} ms"
        ),
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}
