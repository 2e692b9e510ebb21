//! One connection type for plaintext and TLS, so tonic serves one stream
//! type either way, and what tonic puts into each request's extensions
//! about the connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use super::certificate::client_certificate;
use crate::domain::ClientCertificate;

/// What a request knows about its connection. tonic inserts it into every
/// request's extensions before the server's layers run:
/// `request.extensions().get::<ConnectionInfo>()`.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The verified client certificate of an mTLS connection.
    pub client_certificate: Option<Arc<ClientCertificate>>,
}

pub struct Connection {
    io: Io,
    /// Computed once, at accept: every request of the connection clones it.
    info: ConnectionInfo,
}

enum Io {
    Plain(TcpStream),
    // Boxed: a TLS stream is about 1 KiB, a TCP stream a few words.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection {
    pub fn plain(tcp: TcpStream) -> Self {
        let remote_addr = tcp.peer_addr().ok();
        Self {
            io: Io::Plain(tcp),
            info: ConnectionInfo {
                remote_addr,
                client_certificate: None,
            },
        }
    }

    /// After a completed handshake: the peer's certificate, if it sent
    /// one, was verified against the client CAs.
    pub fn tls(stream: TlsStream<TcpStream>, remote_addr: Option<SocketAddr>) -> Self {
        let (_, session) = stream.get_ref();
        let client_certificate = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| Arc::new(client_certificate(leaf)));
        Self {
            io: Io::Tls(Box::new(stream)),
            info: ConnectionInfo {
                remote_addr,
                client_certificate,
            },
        }
    }

    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
