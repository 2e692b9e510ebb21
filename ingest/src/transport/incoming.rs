//! The stream of connections tonic serves. Plaintext: accepted sockets as
//! they come. TLS: each accepted socket's handshake runs in its own task,
//! so a slow or stalled client holds up no one else; finished handshakes
//! join the stream through a bounded channel. One deadline, set at accept
//! (`--handshake-timeout`), covers the TLS handshake and the HTTP/2
//! preface after it.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;

use super::acceptor::TlsAcceptor;
use super::connection::Connection;
use super::error::TlsError;
use super::reload;
use super::settings::TlsSettings;
use crate::transport::handshake::PrefaceDeadline;
use prometheus_client::metrics::counter::Counter;

/// What `serve_with_incoming_shutdown` takes.
pub type Incoming = BoxStream<'static, io::Result<PrefaceDeadline<Connection>>>;

/// Handshakes finished but not yet taken by the server: tonic takes them at
/// once, so this only smooths bursts.
const READY_CONNECTIONS: usize = 64;

/// The TLS side of a running server: its acceptor (for reloads and the
/// certificate's expiry) and the task that reloads it.
#[derive(Default)]
pub struct Transport {
    pub acceptor: Option<TlsAcceptor>,
    reloader: Option<JoinHandle<()>>,
}

impl Transport {
    /// Waits for the reloader, which stops with the shutdown signal.
    pub async fn stopped(self) {
        if let Some(reloader) = self.reloader {
            let _ = reloader.await;
        }
    }
}

/// Serves `listener` with TLS when `tls` is given, plaintext otherwise.
/// Loads and checks the certificate files first: an error here should stop
/// the server. The reloader runs until `stopping` turns true.
pub fn listen(
    listener: TcpListener,
    tls: Option<&TlsSettings>,
    handshake_timeout: Duration,
    stopping: watch::Receiver<bool>,
    handshake_failures: Counter,
) -> Result<(Incoming, Transport), TlsError> {
    let local = listener.local_addr().ok();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let Some(settings) = tls else {
        if let Some(addr) = local.filter(|addr| !addr.ip().is_loopback()) {
            tracing::warn!(
                %addr,
                "serving plaintext on a non-loopback address: device and ops tokens cross the network \
                 readable by anyone on the path; give --tls-cert and --tls-key"
            );
        }
        let plain = incoming.map(move |accepted| {
            accepted.map(|tcp| PrefaceDeadline::new(Connection::plain(tcp), handshake_timeout))
        });
        return Ok((plain.boxed(), Transport::default()));
    };
    let acceptor = TlsAcceptor::load(settings)?;
    settings.handle.attach(Arc::new(acceptor.clone()));
    let reloader = reload::spawn(acceptor.clone(), stopping);
    let (ready, connections) = mpsc::channel(READY_CONNECTIONS);
    tokio::spawn(accept_loop(
        incoming,
        acceptor.clone(),
        handshake_timeout,
        Arc::new(Semaphore::new(settings.max_concurrent_handshakes.max(1))),
        ready,
        handshake_failures,
    ));
    Ok((
        ReceiverStream::new(connections).boxed(),
        Transport {
            acceptor: Some(acceptor),
            reloader: Some(reloader),
        },
    ))
}

/// Accepts until the server drops its end of the channel (it stops
/// accepting at shutdown); the listening socket closes with this task.
async fn accept_loop(
    mut incoming: TcpIncoming,
    acceptor: TlsAcceptor,
    timeout: Duration,
    handshakes: Arc<Semaphore>,
    ready: mpsc::Sender<io::Result<PrefaceDeadline<Connection>>>,
    failures: Counter,
) {
    loop {
        let permit = tokio::select! {
            () = ready.closed() => return,
            permit = handshakes.clone().acquire_owned() => permit.expect("never closed"),
        };
        let tcp = tokio::select! {
            () = ready.closed() => return,
            accepted = incoming.next() => match accepted {
                Some(Ok(tcp)) => tcp,
                Some(Err(error)) => {
                    // Out of file descriptors, typically: accepting again at
                    // once would spin until a connection closes.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                None => return,
            },
        };
        let deadline = Instant::now() + timeout;
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        let failures = failures.clone();
        tokio::spawn(async move {
            let remote = tcp.peer_addr().ok();
            let connection = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(error)) => {
                    failures.inc();
                    tracing::debug!(?remote, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    failures.inc();
                    tracing::debug!(
                        ?remote,
                        ?timeout,
                        "closing a connection whose TLS handshake did not finish in time (--handshake-timeout)"
                    );
                    return;
                }
            };
            drop(permit);
            // The server stopped accepting meanwhile: the connection closes.
            let _ = ready
                .send(Ok(PrefaceDeadline::until(connection, deadline, timeout)))
                .await;
        });
    }
}
