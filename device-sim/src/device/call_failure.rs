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
    /// Retrying cannot help; the device stops and the report says why.
    Fatal(String),
}

pub fn classify(status: &Status) -> CallFailure {
    let detail = describe(status);
    match status.code() {
        // Transient codes, and RESOURCE_EXHAUSTED with a retry delay (too
        // many stream opens): the delay is honoured by the backoff.
        _ if is_retryable(status) => CallFailure::Retryable(detail),
        // The connection itself failed (a GOAWAY, say ENHANCE_YOUR_CALM,
        // which tonic reports as RESOURCE_EXHAUSTED): another connection, or
        // the same one reopened, can take the call.
        _ if is_connection_error(status) => CallFailure::Retryable(detail),
        Code::Unauthenticated => CallFailure::Fatal(format!(
            "the server rejected this device's token ({detail}); the credentials file does not \
             match the server's devices: delete it (or the server's data) or use another \
             --device-prefix"
        )),
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
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            assert!(matches!(
                classify(&Status::new(code, "x")),
                CallFailure::Retryable(_)
            ));
        }
        for code in [
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::PermissionDenied,
            Code::Unimplemented,
        ] {
            assert!(matches!(
                classify(&Status::new(code, "x")),
                CallFailure::Fatal(_)
            ));
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
        assert!(matches!(classify(&status), CallFailure::Retryable(_)));
    }

    #[test]
    fn unauthenticated_tells_the_user_what_to_do() {
        let CallFailure::Fatal(msg) = classify(&Status::unauthenticated("unknown token")) else {
            panic!("must be fatal");
        };
        assert!(msg.contains("credentials file"), "{msg}");
    }
}
