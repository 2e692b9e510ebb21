//! What a failed upload call means for the device: back off and resume, or
//! stop and say why.

use telemetry_client::status::is_retryable;
use tonic::{Code, Status};

use super::client::describe;

/// What a failed call means for the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure {
    /// The server or the network is down for now: back off and resume.
    Retryable(String),
    /// An operator disabled the device (`ingest devices disable`): back off
    /// (longer) and resume once it is enabled again.
    Disabled,
    /// Retrying cannot help; the device stops and the report says why.
    Fatal(String),
}

pub fn classify(status: &Status, device_id: &str) -> CallFailure {
    let detail = describe(status);
    match status.code() {
        Code::Unauthenticated if is_disabled(status) => CallFailure::Disabled,
        // Transient codes, and RESOURCE_EXHAUSTED with a retry delay (too
        // many stream opens): the delay is honoured by the backoff.
        _ if is_retryable(status) => CallFailure::Retryable(detail),
        // The connection itself failed (a GOAWAY, say ENHANCE_YOUR_CALM,
        // which tonic reports as RESOURCE_EXHAUSTED): another connection, or
        // the same one reopened, can take the call.
        _ if is_connection_error(status) => CallFailure::Retryable(detail),
        Code::Unauthenticated => CallFailure::Fatal(token_refused(device_id, &detail)),
        Code::InvalidArgument => CallFailure::Fatal(format!(
            "the server refused the upload as invalid ({detail}); this is a device-sim bug or a \
             client/server version mismatch"
        )),
        Code::ResourceExhausted => CallFailure::Fatal(format!(
            "the upload exceeds a server limit ({detail}); lower --batch-size or --sensors, or \
             raise the server's limit"
        )),
        _ => CallFailure::Fatal(format!("unexpected answer from the server ({detail})")),
    }
}

/// Whether the server refused the call because an operator disabled the
/// device. The server says so in the message only: "device ID is disabled"
/// when a call is refused, "the device was disabled" when it ends an open
/// stream.
pub fn is_disabled(status: &Status) -> bool {
    status.code() == Code::Unauthenticated
        && (status.message().contains(" is disabled") || status.message().contains("was disabled"))
}

/// A device token the server does not take. Its current token is the fix;
/// deleting the credentials file or the server's data would lose every
/// other device's token or readings.
pub fn token_refused(device_id: &str, detail: &str) -> String {
    format!(
        "the server rejected this device's token ({detail}); the credentials file does not hold \
         its current token: put it there, or issue a new one with `ingest devices rotate-token \
         {device_id}` (or use another --device-prefix)"
    )
}

/// Whether `status` comes from the HTTP/2 connection rather than from the
/// server's handler (tonic puts the h2 error in the message).
fn is_connection_error(status: &Status) -> bool {
    status.message().starts_with("h2 protocol error")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;

    #[test]
    fn transient_codes_retry_and_contract_violations_stop() {
        let failure = |code| classify(&Status::new(code, "x"), "sim-00001");
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            assert!(matches!(failure(code), CallFailure::Retryable(_)));
        }
        for code in [
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::PermissionDenied,
            Code::Unimplemented,
        ] {
            assert!(matches!(failure(code), CallFailure::Fatal(_)));
        }
    }

    #[test]
    fn a_refusal_that_says_when_to_retry_is_retried() {
        // The server's answer to too many stream opens per minute
        // (ingest::grpc::status::stream_rate_exceeded).
        let status = Status::with_error_details(
            Code::ResourceExhausted,
            "this device opens streams faster than the server allows",
            ErrorDetails::with_retry_info(Some(Duration::from_secs(2))),
        );
        assert!(matches!(
            classify(&status, "sim-00001"),
            CallFailure::Retryable(_)
        ));
    }

    #[test]
    fn unauthenticated_tells_the_user_what_to_do() {
        let CallFailure::Fatal(msg) =
            classify(&Status::unauthenticated("unknown token"), "sim-00001")
        else {
            panic!("must be fatal");
        };
        assert!(msg.contains("credentials file"), "{msg}");
        assert!(
            msg.contains("`ingest devices rotate-token sim-00001`"),
            "{msg}"
        );
        assert!(!msg.contains("delete"), "{msg}");
    }

    #[test]
    fn a_disabled_device_retries() {
        // As the server refuses a call, and as it ends an open stream.
        for message in [
            "device sim-00001 is disabled",
            "credential revoked: the device was disabled; no batch of this device is committed yet",
        ] {
            let status = Status::unauthenticated(message);
            assert!(is_disabled(&status), "{message}");
            assert_eq!(classify(&status, "sim-00001"), CallFailure::Disabled);
        }
        assert!(!is_disabled(&Status::unauthenticated(
            "device token not recognised"
        )));
        assert!(!is_disabled(&Status::invalid_argument(
            "sensor x is disabled"
        )));
    }
}
