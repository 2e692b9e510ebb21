//! What a failed call's `tonic::Status` means to a client: worth trying
//! again or not, and how long the server asked it to wait.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// The delay the server asked for in `google.rpc.RetryInfo`, if any.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info()?.retry_delay
}

/// Codes that say "not now" rather than "never": the server or the network
/// is down, overloaded or restarting. Transport failures (refused
/// connection, reset stream) surface as UNAVAILABLE or UNKNOWN.
pub fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

/// Whether trying `status`'s call again can succeed: a transient code, or
/// any status that says when to retry (RESOURCE_EXHAUSTED from a rate
/// limit carries a RetryInfo; one from a size limit does not).
pub fn is_retryable(status: &Status) -> bool {
    is_transient(status.code()) || retry_delay(status).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_temporary_codes_are_transient() {
        for code in [Code::Unavailable, Code::Unknown, Code::Aborted] {
            assert!(is_transient(code), "{code:?}");
        }
        for code in [
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::AlreadyExists,
        ] {
            assert!(!is_transient(code), "{code:?}");
            assert!(!is_retryable(&Status::new(code, "no")), "{code:?}");
        }
    }
}
