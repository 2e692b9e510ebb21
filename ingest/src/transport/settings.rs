//! What the server was asked for: certificate files, client authentication,
//! and a handle to reload from outside the server.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use super::certificate::CertificateSummary;
pub use super::client_auth::ClientAuth;
use super::error::TlsError;

/// How often the files' metadata is checked, by default.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM: the server's certificate, then its intermediates.
    pub cert: PathBuf,
    /// PEM: the private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CAs (one or several) that sign client certificates.
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// How often the files' metadata is checked for a change to reload.
    pub poll_interval: Duration,
    /// TLS handshakes in progress at once. Past it the server stops
    /// accepting until one ends: a flood of slow handshakes costs bounded
    /// CPU and memory, and the kernel's backlog holds the rest.
    pub max_concurrent_handshakes: usize,
    /// Reloads on request and reads the current certificate, from outside
    /// the server (tests; later an admin call or a metric).
    pub handle: TlsHandle,
}

impl TlsSettings {
    /// Server authentication only, with the default poll and bound.
    pub fn new(cert: PathBuf, key: PathBuf) -> Self {
        Self {
            cert,
            key,
            client_ca: None,
            client_auth: ClientAuth::None,
            poll_interval: DEFAULT_POLL,
            max_concurrent_handshakes: 1024,
            handle: TlsHandle::default(),
        }
    }

    /// With client certificates checked against the CAs in `ca`.
    pub fn with_client_auth(mut self, ca: PathBuf, mode: ClientAuth) -> Self {
        self.client_ca = Some(ca);
        self.client_auth = mode;
        self
    }

    /// The flags' combination, checked before any file is read.
    pub fn check(&self) -> Result<(), TlsError> {
        if self.client_auth != ClientAuth::None && self.client_ca.is_none() {
            return Err(TlsError::ClientAuthWithoutCa(self.client_auth));
        }
        Ok(())
    }
}

/// What a [`TlsHandle`] reaches of the running acceptor (a trait, so that
/// the settings need not know the acceptor that is built from them).
pub(crate) trait Reloadable: Send + Sync {
    fn reload(&self, cause: &str) -> Result<CertificateSummary, TlsError>;
    fn certificate(&self) -> CertificateSummary;
}

/// The running server's TLS, reachable from whoever holds the settings. A
/// server attaches its acceptor at start (a restart attaches the new one).
#[derive(Clone, Default)]
pub struct TlsHandle(Arc<RwLock<Option<Arc<dyn Reloadable>>>>);

impl TlsHandle {
    pub(crate) fn attach(&self, acceptor: Arc<dyn Reloadable>) {
        *self.0.write().expect("lock poisoned") = Some(acceptor);
    }

    fn acceptor(&self) -> Result<Arc<dyn Reloadable>, TlsError> {
        self.0
            .read()
            .expect("lock poisoned")
            .clone()
            .ok_or(TlsError::NotRunning)
    }

    /// Reloads the files now, as SIGHUP does; the error says why the old
    /// certificate was kept.
    pub fn reload(&self) -> Result<CertificateSummary, TlsError> {
        self.acceptor()?.reload("reload requested")
    }

    /// The certificate new connections are served.
    pub fn certificate(&self) -> Option<CertificateSummary> {
        self.acceptor().ok().map(|a| a.certificate())
    }

    /// When the served certificate expires.
    pub fn certificate_not_after(&self) -> Option<SystemTime> {
        self.certificate().map(|c| c.not_after)
    }
}

impl std::fmt::Debug for TlsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsHandle")
    }
}
