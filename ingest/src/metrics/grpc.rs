//! The conventional gRPC server metrics (go-grpc-prometheus names), for
//! every service and method.
//!
//! A call is counted as handled when it ends, not when its response headers
//! go out: at its trailers, or when its stream is dropped without them (a
//! reset, a cancelled client: CANCELED). So a stream that fails mid-way
//! counts under its real code, and a 10-minute stream observes 600 s.
//! Messages are counted from the gRPC framing (5-byte prefix per message)
//! in the HTTP/2 data, without decoding them.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes};
use futures::future::BoxFuture;
use http_body::{Body, Frame};
use prometheus_client::metrics::counter::Counter;
use tower::{Layer, Service};

use super::{GrpcHandledLabels, GrpcLabels, Metrics};

/// Methods that are not unary; every other method is.
const STREAMING: &[(&str, &str)] = &[
    ("/telemetry.v1.Ingest/UploadReadings", "client_stream"),
    ("/telemetry.v1.Ingest/Control", "bidi_stream"),
    ("/telemetry.v1.Ops/WatchAlerts", "server_stream"),
    ("/grpc.health.v1.Health/Watch", "server_stream"),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "bidi_stream",
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "bidi_stream",
    ),
];

#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = Call::start(&self.metrics, request.uri().path());
        let received = call.received.clone();
        let request = request.map(|body| {
            tonic::body::Body::new(Counted {
                inner: body,
                frames: FrameCounter::new(received),
            })
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            // A trailers-only response (an error before any message) has
            // its status in the headers.
            let mut call = Some(call);
            if let Some(code) = status_of(response.headers()) {
                call.take().expect("set above").end(code);
            }
            Ok(response.map(|body| {
                let sent = call.as_ref().map(|c| c.sent.clone());
                tonic::body::Body::new(Counted {
                    inner: body,
                    frames: FrameCounter::new_optional(sent),
                })
                .with_end(call)
            }))
        })
    }
}

/// One call's labels and clock; records `handled` once.
struct Call {
    metrics: Arc<Metrics>,
    labels: GrpcLabels,
    started: Instant,
    received: Counter,
    sent: Counter,
}

impl Call {
    fn start(metrics: &Arc<Metrics>, path: &str) -> Self {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", path));
        let grpc_type = STREAMING
            .iter()
            .find(|(p, _)| *p == path)
            .map_or("unary", |(_, kind)| *kind);
        let labels = GrpcLabels {
            grpc_type,
            grpc_service: service.into(),
            grpc_method: method.into(),
        };
        metrics.grpc_started.get_or_create(&labels).inc();
        Self {
            received: metrics.grpc_msg_received.get_or_create(&labels).clone(),
            sent: metrics.grpc_msg_sent.get_or_create(&labels).clone(),
            metrics: metrics.clone(),
            labels,
            started: Instant::now(),
        }
    }

    fn end(self, code: tonic::Code) {
        let labels = &self.labels;
        self.metrics
            .grpc_handled
            .get_or_create(&GrpcHandledLabels {
                grpc_type: labels.grpc_type,
                grpc_service: labels.grpc_service.clone(),
                grpc_method: labels.grpc_method.clone(),
                grpc_code: code_name(code),
            })
            .inc();
        self.metrics
            .grpc_handling_seconds
            .get_or_create(labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// The names go-grpc-prometheus uses, so existing dashboards work.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Counts gRPC messages in a stream of DATA frames: each message is a
/// 1-byte flag, a 4-byte big-endian length, then that many bytes, and
/// frames split them anywhere.
struct FrameCounter {
    messages: Option<Counter>,
    header: [u8; 5],
    header_len: usize,
    payload_left: u64,
}

impl FrameCounter {
    fn new(messages: Counter) -> Self {
        Self::new_optional(Some(messages))
    }

    fn new_optional(messages: Option<Counter>) -> Self {
        Self {
            messages,
            header: [0; 5],
            header_len: 0,
            payload_left: 0,
        }
    }

    fn count(&mut self, mut data: &[u8]) -> u64 {
        let mut started = 0;
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = (self.payload_left as usize).min(data.len());
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 5 {
                self.header_len = 0;
                self.payload_left = u64::from(u32::from_be_bytes(
                    self.header[1..5].try_into().expect("4 bytes"),
                ));
                started += 1;
            }
        }
        if let Some(counter) = self.messages.as_ref().filter(|_| started > 0) {
            counter.inc_by(started);
        }
        started
    }
}

/// A body whose messages are counted, and whose end (trailers, or a drop
/// before them) ends its call.
struct Counted<B> {
    inner: B,
    frames: FrameCounter,
}

trait WithEnd: Sized {
    fn with_end(self, call: Option<Call>) -> tonic::body::Body;
}

impl WithEnd for tonic::body::Body {
    fn with_end(self, call: Option<Call>) -> tonic::body::Body {
        match call {
            Some(call) => tonic::body::Body::new(Ending {
                inner: self,
                call: Some(call),
            }),
            None => self,
        }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.frames.count(data.chunk());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Ends a call at its trailers, or as CANCELED if dropped before them.
struct Ending {
    inner: tonic::body::Body,
    call: Option<Call>,
}

impl Body for Ending {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = this.call.take()
                {
                    call.end(status_of(trailers).unwrap_or(tonic::Code::Ok));
                }
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(call) = this.call.take() {
                    call.end(status.code());
                }
            }
            Poll::Ready(None) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.end(tonic::Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn counts_messages_however_frames_split_them() {
        let mut stream = Vec::new();
        for len in [0, 1, 300, 5, 70_000] {
            stream.extend(message(len));
        }
        for split in [1, 2, 3, 5, 7, 64, 4096, stream.len()] {
            let mut counter = FrameCounter::new_optional(None);
            let counted: u64 = stream.chunks(split).map(|c| counter.count(c)).sum();
            assert_eq!(counted, 5, "frames of {split} bytes");
        }
    }
}
