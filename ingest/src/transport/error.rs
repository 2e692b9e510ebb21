//! Why a certificate, key or CA file cannot be served: each message names
//! the file and what to change. Underlying errors are part of the message,
//! not a source, so a log line or `{:#}` shows them once.

use std::path::PathBuf;

use super::client_auth::ClientAuth;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {error}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} is not valid PEM ({error}); expected {expected}", path.display())]
    Pem {
        path: PathBuf,
        expected: &'static str,
        error: rustls::pki_types::pem::Error,
    },
    #[error(
        "{} holds no PEM CERTIFICATE block; expected {expected}",
        path.display()
    )]
    NoCertificate {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("certificate #{index} in {} does not parse as X.509: {reason}", path.display())]
    BadCertificate {
        path: PathBuf,
        /// 1-based position in the file.
        index: usize,
        reason: String,
    },
    #[error(
        "the certificate in {} expired at {not_after}; renew it, or check this machine's clock",
        path.display()
    )]
    Expired { path: PathBuf, not_after: String },
    #[error(
        "{} holds no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error("the private key in {} is not usable: {error}", path.display())]
    UnusableKey { path: PathBuf, error: rustls::Error },
    #[error(
        "the private key in {} does not belong to the certificate in {}; give the pair that was issued together",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate #{index} in {} is not a usable CA: {reason}", path.display())]
    BadClientCa {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error(
        "--tls-client-auth {0} needs --tls-client-ca: the CAs client certificates are checked against"
    )]
    ClientAuthWithoutCa(ClientAuth),
    #[error("building the TLS configuration: {0}")]
    Config(String),
    #[error("the server has not started TLS (no --tls-cert/--tls-key, or not running yet)")]
    NotRunning,
}
