//! The MQTT listener: devices that speak MQTT 3.1.1 or 5 publish readings
//! into the same write pipeline as a gRPC upload, and a QoS 1 PUBACK means
//! what an upload's summary means: committed.
//!
//! - [`wire`]: packets in and out, for both protocol versions (rumqttc's
//!   codec underneath);
//! - [`payload`]: the topics a device may publish to, and its JSON or
//!   protobuf payload as a batch;
//! - [`commands`]: commands over MQTT: topics, the command as JSON, the
//!   device's result;
//! - [`thingsboard`]: ThingsBoard's telemetry topic and payloads;
//! - [`session`]: one connection: CONNECT and authentication, PUBLISHes
//!   into the pipeline, PUBACKs in order once committed; commands from the
//!   device's Control session out, their PUBACKs and results in.
//!
//! Why a codec and our own sessions rather than an MQTT framework is in
//! `docs/architecture.md` ("The MQTT listener").

pub mod commands;
pub mod payload;
mod session;
pub mod thingsboard;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::auth::Credentials;
use crate::control::CommandCenter;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::transport::{Connection, TlsAcceptor};

/// The listener's limits.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// QoS 1 PUBLISHes a connection may have unanswered (v5's Receive
    /// Maximum, advertised in CONNACK; 3.1.1 clients are held to it by not
    /// reading their socket).
    pub receive_maximum: u16,
    /// Largest packet accepted, in bytes; a larger one ends the session
    /// as soon as its header says so.
    pub max_packet_bytes: usize,
    /// A connection must send CONNECT within this.
    pub connect_timeout: Duration,
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            receive_maximum: 32,
            max_packet_bytes: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// What every MQTT session shares.
pub struct MqttContext {
    pub pipeline: Pipeline,
    pub credentials: Arc<Credentials>,
    /// Commands and presence: each session is the device's Control session.
    pub control: Arc<CommandCenter>,
    pub settings: MqttSettings,
    pub metrics: Arc<Metrics>,
}

/// Serves MQTT on `listener` (over TLS with `tls`, the gRPC port's
/// acceptor: the same certificates, reloaded together) until the
/// pipeline's shutdown signal; returns once every session has ended.
pub async fn serve(listener: TcpListener, context: MqttContext, tls: Option<TlsAcceptor>) {
    if let Ok(addr) = listener.local_addr()
        && tls.is_none()
        && !addr.ip().is_loopback()
    {
        tracing::warn!(
            %addr,
            "serving MQTT in plaintext on a non-loopback address: device tokens cross the network \
             readable by anyone on the path; give --tls-cert and --tls-key"
        );
    }
    let mut shutdown = context.pipeline.shutdown.clone();
    let shared = Arc::new(context);
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            // Reap finished sessions as they end, so the set stays small.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    let _ = socket.set_nodelay(true);
                    let shared = shared.clone();
                    let tls = tls.clone();
                    sessions.spawn(async move {
                        let connection = match tls {
                            None => Connection::plain(socket),
                            Some(tls) => {
                                let handshake = tls.accept(socket);
                                match tokio::time::timeout(shared.settings.connect_timeout, handshake).await {
                                    Ok(Ok(connection)) => connection,
                                    Ok(Err(error)) => {
                                        shared.metrics.tls_handshake_failures.inc();
                                        tracing::debug!(%error, "MQTT TLS handshake failed");
                                        return;
                                    }
                                    Err(_) => {
                                        shared.metrics.tls_handshake_failures.inc();
                                        return;
                                    }
                                }
                            }
                        };
                        session::run(connection, shared).await;
                    });
                }
                Err(error) => {
                    // Out of file descriptors, typically: wait rather than spin.
                    tracing::warn!(%error, "accepting an MQTT connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    // Each session answers what it has in flight, says goodbye and ends.
    while sessions.join_next().await.is_some() {}
}
