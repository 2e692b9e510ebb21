//! The admin listener: plaintext HTTP beside the gRPC port, so probes and
//! scrapes work when gRPC requires client certificates.
//!
//! - `/metrics`: the registry in the Prometheus text format;
//! - `/healthz`: the process is alive (it answers);
//! - `/readyz`: the database answers within a second, the writer is not
//!   stuck, and the server is not shutting down; 503 with the reason if not.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::storage::Store;

/// The database must answer a readiness query within this.
const DATABASE_DEADLINE: Duration = Duration::from_secs(1);
/// What the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub stopping: watch::Receiver<bool>,
}

impl Admin {
    /// Serves on `listener` until the server stops.
    pub async fn serve(self, listener: TcpListener) {
        let mut stopping = self.stopping.clone();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stopping.wait_for(|s| *s) => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "admin listener: accept failed");
                    continue;
                }
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(request).await) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%error, %peer, "admin connection ended");
                }
            });
        }
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match request.uri().path() {
            "/metrics" => {
                // Prometheus asks for OpenMetrics; anything else (curl,
                // promtool) gets the classic text format.
                let openmetrics = request
                    .headers()
                    .get(http::header::ACCEPT)
                    .and_then(|a| a.to_str().ok())
                    .is_some_and(|a| a.contains("application/openmetrics-text"));
                let text = crate::metrics::encode(&self.registry);
                let (body, content_type) = if openmetrics {
                    (
                        text,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                } else {
                    (
                        crate::metrics::to_prometheus_text(&text),
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                };
                Response::builder()
                    .header(http::header::CONTENT_TYPE, content_type)
                    .body(Full::new(Bytes::from(body)))
                    .expect("a valid response")
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => match self.ready().await {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{reason}\n")),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: /metrics, /healthz and /readyz are served here\n",
            ),
        }
    }

    async fn ready(&self) -> Result<(), String> {
        if *self.stopping.borrow() {
            return Err("shutting down".into());
        }
        let queued = self.metrics.writer_queue_batches.get();
        if let Some(idle) = self.metrics.writer_progress.stalled_for(queued) {
            return Err(format!(
                "writer stuck: batches queued and no commit for {idle:.0?}"
            ));
        }
        match tokio::time::timeout(DATABASE_DEADLINE, self.store.ping()).await {
            Ok(Ok(acquired)) => {
                self.metrics
                    .db_pool_acquire_seconds
                    .observe(acquired.as_secs_f64());
                Ok(())
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "readiness: database query failed");
                Err("database unavailable".into())
            }
            Err(_) => Err(format!(
                "database did not answer within {DATABASE_DEADLINE:?}"
            )),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("a valid response")
}

/// Binds the admin address; `None` for an empty one (admin turned off).
pub async fn bind(addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(addr) => Ok(Some(TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {addr} for the admin HTTP endpoint (/metrics, /healthz, /readyz): {e}; \
                 choose another address with `--admin-listen ADDR`, or turn it off with `--admin-listen ''`"
            )
        })?)),
    }
}

/// GETs `path` from an admin listener: (status code, body). For probes
/// written in Rust (tests, tools) without an HTTP client dependency.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
    Ok((status, body.to_owned()))
}

/// The sum of a metric's samples whose name and labels match: e.g.
/// `sum(text, "ingest_readings_total", &[("outcome", "committed")])`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
