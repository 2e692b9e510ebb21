//! Logs and traces: the tracing subscriber (the process's one global) and,
//! with the `otel` cargo feature, OTLP trace export.
//!
//! Logs go to stderr as text or JSON lines, filtered by `RUST_LOG`. The
//! upload pipeline's finer spans (batch, its stages, group commit) are at
//! DEBUG: under the default `info` filter they are disabled, and cost a
//! callsite check, unless the `otel` layer asks for them.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one line per event with its spans' fields.
    #[default]
    Text,
    /// For log shippers: one JSON object per line, with `fields` and the
    /// current `span` and `spans`.
    Json,
}

/// Owns what must be flushed before the process exits.
#[must_use = "call shutdown() before exiting, or traces still buffered are lost"]
pub struct Telemetry {
    #[cfg(feature = "otel")]
    provider: Option<otel::SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (with the `otel` feature).
    pub async fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider {
            otel::shutdown(provider).await;
        }
    }
}

/// The log layer alone, filtered by `RUST_LOG` (default `info`). A
/// per-layer filter, so that another layer may enable spans it hides.
pub fn log_layer<S>(format: LogFormat) -> impl Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = match format {
        // Colour only for a person at a terminal: the journal and log
        // files would keep the escape codes as text.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    layer.with_filter(filter)
}

/// Installs the subscriber: logs in `format` and, if `traces` (the server
/// asks, the operator commands do not), with the `otel` feature and an OTLP
/// endpoint configured, trace export.
pub fn init(format: LogFormat, traces: bool) -> Telemetry {
    let registry = tracing_subscriber::registry().with(log_layer(format));
    #[cfg(feature = "otel")]
    {
        let configured = if traces { otel::from_env() } else { Ok(None) };
        let (layer, provider, problem) = match configured {
            Ok(Some(provider)) => (Some(otel::layer(&provider)), Some(provider), None),
            Ok(None) => (None, None, None),
            Err(error) => (None, None, Some(error)),
        };
        registry.with(layer).init();
        match (&provider, problem) {
            (_, Some(error)) => {
                tracing::error!(error = format!("{error:#}"), "OTLP trace export is off")
            }
            (Some(_), None) => tracing::info!("exporting traces over OTLP"),
            (None, None) => {}
        }
        Telemetry { provider }
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = traces;
        registry.init();
        Telemetry {}
    }
}

/// Makes a span's trace continue the caller's: with the `otel` feature,
/// the W3C `traceparent` and `tracestate` of the request become the span's
/// remote parent, so the device's sampling decision holds. Call it before
/// the span is first entered; later it does nothing.
#[cfg(feature = "otel")]
pub fn follow_caller(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    otel::follow_caller(span, metadata);
}

/// Without the `otel` feature there is no trace to continue.
#[cfg(not(feature = "otel"))]
#[inline(always)]
pub fn follow_caller(_span: &tracing::Span, _metadata: &tonic::metadata::MetadataMap) {}

#[cfg(feature = "otel")]
pub mod otel {
    //! OTLP/gRPC export of the spans, configured by the standard variables:
    //! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) turns it on;
    //! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`
    //! (default `parentbased_always_on`), `OTEL_TRACES_SAMPLER_ARG`,
    //! `OTEL_BSP_*` and `OTEL_EXPORTER_OTLP_TIMEOUT`/`_HEADERS` are read by
    //! the SDK and exporter themselves.
    //!
    //! No OpenTelemetry globals are set: the provider lives in
    //! [`super::Telemetry`], the propagator is made where it is used.

    use anyhow::Context as _;
    use opentelemetry::propagation::{Extractor, TextMapPropagator};
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    pub use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::Targets;

    /// The spans exported: this crate's, down to DEBUG (batches, their
    /// stages, group commits). Not the libraries': the exporter's own
    /// gRPC calls would otherwise trace themselves.
    fn exported() -> Targets {
        Targets::new().with_target("ingest", tracing::Level::DEBUG)
    }

    /// A provider exporting to the configured endpoint; `None` when no
    /// endpoint is configured. Must run inside the Tokio runtime (the gRPC
    /// channel's worker is spawned on it).
    pub fn from_env() -> anyhow::Result<Option<SdkTracerProvider>> {
        let configured = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        if !configured {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(opentelemetry_otlp::Protocol::Grpc)
            .build()
            .context("building the OTLP span exporter")?;
        let mut resource = Resource::builder();
        // The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES;
        // without either, "unknown_service" would name us.
        let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
        if !named {
            resource = resource.with_service_name("telemetry-ingest");
        }
        // The default sampler, ParentBased(AlwaysOn) unless
        // OTEL_TRACES_SAMPLER says otherwise, is kept: it lets a
        // device's traceparent decide.
        Ok(Some(
            SdkTracerProvider::builder()
                .with_resource(resource.build())
                .with_batch_exporter(exporter)
                .build(),
        ))
    }

    /// The layer turning this crate's spans into OpenTelemetry spans.
    pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("ingest"))
            .with_filter(exported())
    }

    /// Exports what is buffered and stops the exporter. The SDK blocks
    /// while it flushes, and the flush needs the runtime's other threads:
    /// done off the runtime's worker threads.
    pub async fn shutdown(provider: SdkTracerProvider) {
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "flushing traces at shutdown failed"),
            Err(error) => tracing::warn!(%error, "flushing traces at shutdown failed"),
        }
    }

    pub(super) fn follow_caller(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
        let parent = TraceContextPropagator::new().extract(&Metadata(metadata));
        if parent.span().span_context().is_valid() {
            // Fails only if the span is disabled or already started: then
            // it keeps its own trace, which is all that can be done.
            let _ = span.set_parent(parent);
        }
    }

    /// The span's OpenTelemetry identity, for a link to it.
    pub fn span_context(span: &tracing::Span) -> opentelemetry::trace::SpanContext {
        span.context().span().span_context().clone()
    }

    /// Links `span` to `to` (when both are exported).
    pub fn link(span: &tracing::Span, to: &opentelemetry::trace::SpanContext) {
        span.add_link(to.clone());
    }

    /// gRPC metadata as the propagator reads it.
    struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

    impl Extractor for Metadata<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0
                .keys()
                .filter_map(|k| match k {
                    tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                    tonic::metadata::KeyRef::Binary(_) => None,
                })
                .collect()
        }
    }
}
