//! A deadline on a new connection's HTTP/2 preface. Without it, a TCP
//! connection that never speaks holds a socket and a task forever: hyper
//! waits for the preface with no timeout of its own. On a TLS connection
//! the same deadline covers the TLS handshake too (see `tls::incoming`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// The client's connection preface (RFC 9113, 3.4).
const PREFACE_LEN: usize = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".len();

/// A connection that fails with `TimedOut` unless its first
/// `PREFACE_LEN` bytes arrive within the deadline.
pub struct PrefaceDeadline<IO> {
    io: IO,
    /// Until the preface is in.
    deadline: Option<Pin<Box<Sleep>>>,
    still_to_read: usize,
    timeout: Duration,
}

impl<IO> PrefaceDeadline<IO> {
    pub fn new(io: IO, timeout: Duration) -> Self {
        Self::until(io, tokio::time::Instant::now() + timeout, timeout)
    }

    /// With a deadline that started earlier, when the connection was
    /// accepted: what is left of `timeout` after a TLS handshake.
    pub fn until(io: IO, deadline: tokio::time::Instant, timeout: Duration) -> Self {
        Self {
            io,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            still_to_read: PREFACE_LEN,
            timeout,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for PrefaceDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            tracing::debug!(timeout = ?this.timeout, "closing a connection that sent no HTTP/2 preface in time (--handshake-timeout)");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no HTTP/2 preface within {:?} (--handshake-timeout)",
                    this.timeout
                ),
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.deadline.is_some() {
            let read = buf.filled().len() - before;
            this.still_to_read = this.still_to_read.saturating_sub(read);
            if this.still_to_read == 0 {
                this.deadline = None;
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for PrefaceDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for PrefaceDeadline<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_times_out() {
        let (client, server) = tokio::io::duplex(64);
        let mut server = PrefaceDeadline::new(server, Duration::from_secs(10));
        let mut buf = [0u8; 8];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_with_the_preface() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = PrefaceDeadline::new(server, Duration::from_secs(10));
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 24];
        server.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 1);
    }
}
