//! A client's calls over several server processes in front of one
//! database (`--server a,b,c`), and the one type the generated clients are
//! given whether there is one server or several ([`Transport`]).
//!
//! tower's power-of-two-choices balancer (what tonic's
//! `Channel::balance_list` runs) over channels the caller built, so they
//! keep its connector, TLS and timeouts. It picks two servers at random and
//! calls the less loaded one; the load here is whether a server failed a
//! call at the transport level (refused or broken connection) in the last
//! [`AVOID_AFTER_FAILURE`]. So calls spread at random over the servers that
//! work, from the very first call (a lazy channel is always ready, where
//! `balance_list` picks only among connections already up: a fleet opening
//! its long-lived Control streams in its first milliseconds would put them
//! all on whichever server connected first), and a server that went away
//! stops getting calls once one of them failed there, instead of taking
//! its share of every retry. It is tried again after a while; with every
//! server failing, calls go to any.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::body::Body;
use tonic::transport::Channel;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::Load;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceExt};

/// The calls of a client, to one server or balanced over several.
pub type Transport = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, TransportError>;

/// How long a server that failed a call is passed over while another works.
pub const AVOID_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// Requests a balanced transport may queue for its balancer, as tonic's
/// own channels do.
const BALANCER_QUEUE: usize = 1024;

/// Why a [`Transport`] call failed: the connection's error (or the
/// balancer's), as its source, so tonic still finds the cause and maps it
/// to a status code (UNAVAILABLE for a refused connection). A named type
/// rather than a bare `BoxError`: with a trait object as the error, the
/// compiler cannot prove the clients' futures `Send` when they are
/// spawned.
#[derive(Debug)]
pub struct TransportError(BoxError);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// One server's channel as a [`Transport`].
pub fn single(channel: Channel) -> Transport {
    BoxCloneSyncService::new(channel.map_err(|e| TransportError(e.into())))
}

/// One transport over several servers' channels (see the module's doc).
pub fn balanced(channels: Vec<Channel>) -> Transport {
    let servers: Vec<Server> = channels.into_iter().map(Server::new).collect();
    let balance: Balance<_, http::Request<Body>> = Balance::new(ServiceList::new(servers));
    BoxCloneSyncService::new(Buffer::new(balance, BALANCER_QUEUE).map_err(TransportError))
}

/// One server of a balanced transport: its channel, and when a call last
/// failed on it.
struct Server {
    channel: Channel,
    failed_at: Arc<Mutex<Option<Instant>>>,
}

impl Server {
    fn new(channel: Channel) -> Self {
        Self {
            channel,
            failed_at: Arc::default(),
        }
    }
}

/// 1 while the server is avoided, 0 otherwise: the balancer prefers 0.
impl Load for Server {
    type Metric = u8;

    fn load(&self) -> u8 {
        let failed_at = *self.failed_at.lock().unwrap_or_else(|e| e.into_inner());
        u8::from(failed_at.is_some_and(|at| at.elapsed() < AVOID_AFTER_FAILURE))
    }
}

impl Service<http::Request<Body>> for Server {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.channel.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let call = self.channel.call(request);
        let failed_at = Arc::clone(&self.failed_at);
        Box::pin(async move {
            let result = call.await;
            // Only transport failures: a gRPC error status is an answer,
            // and comes back as a response.
            let mut failed_at = failed_at.lock().unwrap_or_else(|e| e.into_inner());
            *failed_at = match &result {
                Err(_) => Some(Instant::now()),
                Ok(_) => None,
            };
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_failed_is_avoided_for_a_while() {
        // Nothing listens there: the call fails at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy();
        let mut server = Server::new(channel);
        assert_eq!(server.load(), 0);
        let request = http::Request::builder()
            .uri(format!("http://{addr}/telemetry.v1.Ingest/GetUploadCursor"))
            .body(Body::empty())
            .expect("request");
        let failed = server
            .ready()
            .await
            .expect("a lazy channel is ready")
            .call(request)
            .await;
        assert!(failed.is_err());
        assert_eq!(server.load(), 1, "avoided after a failure");
        *server.failed_at.lock().expect("lock") = Some(Instant::now() - AVOID_AFTER_FAILURE);
        assert_eq!(server.load(), 0, "tried again after a while");
    }
}
