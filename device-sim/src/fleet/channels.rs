//! The fleet's connections to its servers, and a count of the bytes they
//! write, so the report can say what a reading costs on the wire (HTTP/2
//! framing, headers and compression included) rather than what its message
//! weighs.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use telemetry_client::balance::{Transport, balanced, single};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::{Endpoint, Uri};

use crate::config::Config;
use crate::report::Counter;

/// One lazily connected transport per --connections: start-up succeeds
/// even while the server is still coming up, and each device retries on its
/// own. Every byte the channels write is added to `wire_bytes`.
///
/// Several servers: each transport has a connection to every one of them
/// and balances over them ([`balanced`]): every call (every upload and
/// Control stream) goes to one picked at random, from the first call on,
/// so the fleet's streams spread over the servers, and a device whose
/// server went away lands on another when it retries.
pub fn open_channels(config: &Config, wire_bytes: &Arc<Counter>) -> anyhow::Result<Vec<Transport>> {
    let endpoints: Vec<Endpoint> = config
        .tls
        .endpoints(&config.servers)
        .context("--server")?
        .into_iter()
        .map(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(5))
                // Streams stay open for a long time; pings notice a dead peer
                // that would otherwise leave a device waiting for its summary.
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
        })
        .collect();
    // TLS, for an https:// server, runs over the counting connector: the
    // bytes counted are the encrypted records on the wire.
    let connect = |endpoint: &Endpoint| {
        endpoint.connect_with_connector_lazy(CountingConnector::new(Arc::clone(wire_bytes)))
    };
    Ok((0..config.connections.max(1))
        .map(|_| match &endpoints[..] {
            [endpoint] => single(connect(endpoint)),
            several => balanced(several.iter().map(connect).collect()),
        })
        .collect())
}

/// Opens plain TCP connections, like tonic's own connector, whose writes
/// are counted into `sent`. Given to `Endpoint::connect_with_connector_lazy`,
/// so channels still connect on first use (and reconnect) by themselves;
/// for an https:// endpoint tonic runs TLS over the connection this opens.
#[derive(Clone)]
pub struct CountingConnector {
    sent: Arc<Counter>,
}

impl CountingConnector {
    pub fn new(sent: Arc<Counter>) -> Self {
        Self { sent }
    }
}

impl tower::Service<Uri> for CountingConnector {
    type Response = TokioIo<CountingStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let sent = Arc::clone(&self.sent);
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}"))
            })?;
            // An IPv6 literal keeps its brackets in a URI, not in a lookup.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let default_port = if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            };
            let port = uri.port_u16().unwrap_or(default_port);
            let stream = TcpStream::connect((host, port)).await?;
            // Batches and acknowledgements are small and latency-bound.
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(CountingStream {
                inner: stream,
                sent,
            }))
        })
    }
}

/// A TCP stream that adds every byte it writes to a shared counter.
pub struct CountingStream {
    inner: TcpStream,
    sent: Arc<Counter>,
}

impl AsyncRead for CountingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            self.sent.add(n as u64);
        }
        written
    }

    // hyper writes HTTP/2 frames vectored when the stream can: count those
    // too, or most of the traffic would go unseen.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            self.sent.add(n as u64);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::Service;

    use super::*;

    /// Every byte written, plain or vectored, is counted once; bytes read
    /// are not.
    #[tokio::test]
    async fn counts_the_bytes_written() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let peer = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            socket.write_all(b"hello back").await.expect("write");
            let mut received = Vec::new();
            socket.read_to_end(&mut received).await.expect("read");
            received.len()
        });
        let sent = Arc::new(Counter::default());
        let mut connector = CountingConnector::new(Arc::clone(&sent));
        let uri: Uri = format!("http://{addr}").parse().expect("uri");
        let mut stream = connector.call(uri).await.expect("connect").into_inner();
        stream.write_all(&[7; 1000]).await.expect("write");
        let vectored = stream
            .write_vectored(&[io::IoSlice::new(&[1; 10]), io::IoSlice::new(&[2; 20])])
            .await
            .expect("write vectored");
        assert!(vectored > 0);
        let mut back = [0; 10];
        stream.read_exact(&mut back).await.expect("read");
        let counted = sent.get();
        stream.shutdown().await.expect("shutdown");
        drop(stream);
        let received = peer.await.expect("peer") as u64;
        assert_eq!(counted, received, "every byte the peer got, and only those");
        assert_eq!(counted, 1000 + vectored as u64);
    }
}
