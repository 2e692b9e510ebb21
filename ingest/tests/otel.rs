//! OTLP trace export (cargo feature `otel`): an in-process OTLP receiver
//! gets the spans of an upload, the stream's span continues the device's
//! trace, and the group commit's span links to the batch's span.
//!
//! `cargo test -p ingest --features otel --test otel` (the target requires
//! the feature). A binary of its own: it sets OTEL_* variables and installs
//! the process's global tracing subscriber.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::control::hello;
use common::{Backend, TestServer, simple_batch};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::watch;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Collects every span it is sent; `changed` ticks on each export.
#[derive(Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    changed: watch::Sender<usize>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        self.changed.send_replace(spans.len());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Waits until `found` picks something out of the spans received,
    /// flushing the exporter's batch each time round.
    async fn wait_for<T>(
        &self,
        provider: &opentelemetry_sdk::trace::SdkTracerProvider,
        what: &str,
        found: impl Fn(&[Span]) -> Option<T>,
    ) -> T {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(t) = found(&self.spans.lock().unwrap()) {
                return t;
            }
            // The SDK's flush blocks until the export is answered.
            let flushing = provider.clone();
            tokio::task::spawn_blocking(move || flushing.force_flush())
                .await
                .unwrap()
                .unwrap();
            if let Some(t) = found(&self.spans.lock().unwrap()) {
                return t;
            }
            let received = self.spans.lock().unwrap().len();
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                panic!("no {what} within 30 s; {received} spans received");
            }
        }
    }
}

/// The receiver, and the process's subscriber exporting to it.
async fn receiver_and_exporter() -> (Receiver, opentelemetry_sdk::trace::SdkTracerProvider) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver {
        spans: Arc::default(),
        changed: watch::channel(0).0,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // SAFETY: set before anything else of this test binary reads the
    // environment: this file has one test, and the server starts later.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"));
        std::env::set_var("OTEL_SERVICE_NAME", "ingest-under-test");
    }
    let provider = ingest::observability::otel::from_env()
        .unwrap()
        .expect("an endpoint is configured");
    // The same layers `ingest serve` installs, the log layer included, so
    // the two are seen to work together.
    tracing_subscriber::registry()
        .with(ingest::observability::log_layer(
            ingest::observability::LogFormat::Text,
        ))
        .with(ingest::observability::otel::layer(&provider))
        .init();
    (receiver, provider)
}

fn named<'a>(spans: &'a [Span], name: &str) -> impl Iterator<Item = &'a Span> {
    spans.iter().filter(move |s| s.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_links_to_the_batch_and_streams_follow_traceparent() {
    let (receiver, provider) = receiver_and_exporter().await;
    let mut server = TestServer::start(Backend::Sqlite).await.unwrap();
    let token = server.register("otel-1").await;
    let mut client = server.ingest(&token).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(tokio_stream::iter(vec![simple_batch(1, 5)]));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let summary = client.upload_readings(request).await.unwrap().into_inner();
    assert_eq!(summary.committed_sequence, 1);

    let stream = receiver
        .wait_for(&provider, "upload_readings span", |spans| {
            named(spans, "upload_readings").next().cloned()
        })
        .await;
    assert_eq!(hex(&stream.trace_id), trace_id, "the device's trace");
    assert_eq!(hex(&stream.parent_span_id), "00f067aa0ba902b7");

    let batch = receiver
        .wait_for(&provider, "batch span", |spans| {
            named(spans, "batch").next().cloned()
        })
        .await;
    assert_eq!(hex(&batch.trace_id), trace_id);
    assert_eq!(
        batch.parent_span_id, stream.span_id,
        "a child of the stream"
    );
    let stages = receiver
        .wait_for(&provider, "the batch's stages", |spans| {
            let stages: Vec<String> = spans
                .iter()
                .filter(|s| s.parent_span_id == batch.span_id)
                .map(|s| s.name.clone())
                .collect();
            ["validate", "queue", "durable"]
                .iter()
                .all(|n| stages.iter().any(|s| s == n))
                .then_some(stages)
        })
        .await;
    assert!(!stages.is_empty());

    let commit = receiver
        .wait_for(&provider, "group_commit span linking the batch", |spans| {
            named(spans, "group_commit")
                .find(|s| {
                    s.links
                        .iter()
                        .any(|l| l.span_id == batch.span_id && l.trace_id == batch.trace_id)
                })
                .cloned()
        })
        .await;
    assert_ne!(
        commit.trace_id, batch.trace_id,
        "a group commit is a trace of its own"
    );
    assert!(commit.parent_span_id.is_empty(), "a root span");

    // A Control stream continues its caller's trace too, for as long as
    // the session lasts: its span arrives once the device hangs up.
    let control_trace = "0af7651916cd43dd8448eb211c80319c";
    let (hello_tx, hello_rx) = tokio::sync::mpsc::channel(1);
    hello_tx.send(hello("otel-1")).await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(hello_rx));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{control_trace}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    let mut commands = client.control(request).await.unwrap().into_inner();
    drop(hello_tx);
    while let Ok(Some(_)) = commands.message().await {}
    let control = receiver
        .wait_for(&provider, "control span", |spans| {
            named(spans, "control").next().cloned()
        })
        .await;
    assert_eq!(hex(&control.trace_id), control_trace);
    assert_eq!(hex(&control.parent_span_id), "b7ad6b7169203331");

    server.stop().await;
    ingest::observability::otel::shutdown(provider).await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
