//! Statuses that tonic's framing produces before or around a handler, made
//! precise in one place for every service and method:
//!
//! - a message over `--max-message-bytes` is OUT_OF_RANGE in tonic, and
//!   RESOURCE_EXHAUSTED in gRPC's convention, which clients act on;
//! - an undecodable message stays INTERNAL (the convention), but says which
//!   method it was sent to, so a person can find the broken client.
//!
//! The status can be in the response headers (a call that failed before it
//! answered) or in the trailers (a stream that failed midway); both are
//! rewritten.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::HeaderMap;
use http_body::Frame;
use tonic::{Code, Status};
use tower::{Layer, Service};

const TOO_LARGE: &str = "Error, decoded message length too large";
const UNDECODABLE: &str = "failed to decode Protobuf message";

/// What a status becomes, if anything.
fn rewritten(status: &Status, method: &str, max_message_bytes: usize) -> Option<Status> {
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.starts_with(TOO_LARGE) => {
            Some(Status::resource_exhausted(format!(
                "{method}: message larger than the server's limit of {max_message_bytes} bytes (--max-message-bytes): {message}; send smaller messages"
            )))
        }
        Code::Internal if message.starts_with(UNDECODABLE) => Some(Status::internal(format!(
            "{method}: the message is not a valid {method} request: {message}"
        ))),
        _ => None,
    }
}

fn rewrite(headers: &mut HeaderMap, method: &str, max_message_bytes: usize) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if let Some(new) = rewritten(&status, method, max_message_bytes) {
        headers.remove("grpc-status-details-bin");
        if let Err(error) = new.add_header(headers) {
            tracing::warn!(%error, "could not rewrite a status");
        }
    }
}

/// Installs [`TransportStatus`] in front of every service.
#[derive(Debug, Clone, Copy)]
pub struct TransportStatusLayer {
    pub max_message_bytes: usize,
}

impl<S> Layer<S> for TransportStatusLayer {
    type Service = TransportStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TransportStatus {
            inner,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TransportStatus<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S, B> Service<http::Request<B>> for TransportStatus<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // "/pkg.Service/Method" -> "pkg.Service/Method"
        let method: Box<str> = request.uri().path().trim_start_matches('/').into();
        let max = self.max_message_bytes;
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            rewrite(response.headers_mut(), &method, max);
            Ok(response.map(|body| {
                tonic::body::Body::new(Trailers {
                    inner: body,
                    method,
                    max_message_bytes: max,
                })
            }))
        })
    }
}

/// A response body whose trailers are rewritten on the way out.
struct Trailers {
    inner: tonic::body::Body,
    method: Box<str>,
    max_message_bytes: usize,
}

impl http_body::Body for Trailers {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(match frame.into_trailers() {
                Ok(mut trailers) => {
                    rewrite(&mut trailers, &this.method, this.max_message_bytes);
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            }))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_large_becomes_resource_exhausted() {
        let status = Status::out_of_range(
            "Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes",
        );
        let new = rewritten(&status, "telemetry.v1.Ops/RegisterDevice", 4096).unwrap();
        assert_eq!(new.code(), Code::ResourceExhausted);
        assert!(new.message().starts_with("telemetry.v1.Ops/RegisterDevice: message larger than the server's limit of 4096 bytes (--max-message-bytes)"), "{}", new.message());
    }

    #[test]
    fn undecodable_names_the_method() {
        let status = Status::internal("failed to decode Protobuf message: invalid wire type");
        let new = rewritten(&status, "telemetry.v1.Ingest/Control", 1).unwrap();
        assert_eq!(new.code(), Code::Internal);
        assert!(new.message().starts_with("telemetry.v1.Ingest/Control: "));
    }

    #[test]
    fn other_statuses_pass() {
        for status in [
            Status::out_of_range("page out of range"),
            Status::internal("something else"),
            Status::invalid_argument(TOO_LARGE),
        ] {
            assert!(rewritten(&status, "m", 1).is_none());
        }
    }

    #[test]
    fn rewrites_headers_in_place() {
        let mut headers = HeaderMap::new();
        Status::out_of_range(format!("{TOO_LARGE}: found 9 bytes"))
            .add_header(&mut headers)
            .unwrap();
        rewrite(&mut headers, "a/B", 8);
        let status = Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
    }
}
