//! Placeholder until the TLS acceptor lands (branch `tls`).

/// What tonic puts in each request's extensions about its connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The verified client certificate of an mTLS connection.
    pub client_certificate: Option<std::sync::Arc<crate::domain::ClientCertificate>>,
}
