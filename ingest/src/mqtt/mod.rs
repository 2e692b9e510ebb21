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
//! - [`session`]: one connection: CONNECT and authentication, PUBLISHes
//!   into the pipeline, PUBACKs in order once committed; commands from the
//!   device's Control session out, their PUBACKs and results in.
//!
//! Why a codec and our own sessions rather than an MQTT framework is in
//! `docs/architecture.md` ("The MQTT listener").

pub mod commands;
pub mod payload;
mod session;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::auth::Credentials;
use crate::control::CommandCenter;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;

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

/// Serves MQTT on `listener` until the pipeline's shutdown signal; returns
/// once every session has ended.
pub async fn serve(
    listener: TcpListener,
    pipeline: Pipeline,
    credentials: Arc<Credentials>,
    control: Arc<CommandCenter>,
    settings: MqttSettings,
    metrics: Arc<Metrics>,
) {
    let mut shutdown = pipeline.shutdown.clone();
    let shared = Arc::new(session::Shared {
        pipeline,
        credentials,
        control,
        settings,
        metrics,
    });
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            // Reap finished sessions as they end, so the set stays small.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    let _ = socket.set_nodelay(true);
                    sessions.spawn(session::run(socket, peer, shared.clone()));
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
