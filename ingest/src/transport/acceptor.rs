//! The TLS configuration new connections get, replaced as a whole on a
//! successful reload. A connection takes the current `Arc<ServerConfig>`
//! when its handshake starts and keeps it, so open connections and their
//! streams are untouched by a reload.

use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::ServerConfig;
use tokio::net::TcpStream;

use super::certificate::{CertificateSummary, display_time};
use super::connection::Connection;
use super::error::TlsError;
use super::load::{FileStamps, Loaded, load};
use super::settings::{Reloadable, TlsSettings};

#[derive(Clone)]
pub struct TlsAcceptor {
    inner: Arc<Inner>,
}

struct Inner {
    settings: TlsSettings,
    current: RwLock<Current>,
    /// The files' metadata when they were last read, successfully or not:
    /// the poller reloads when it differs, and does not retry a bad file
    /// until it changes again.
    read_stamps: Mutex<FileStamps>,
}

#[derive(Clone)]
struct Current {
    config: Arc<ServerConfig>,
    summary: CertificateSummary,
}

impl TlsAcceptor {
    /// Loads the files at start: an error here stops the server.
    pub fn load(settings: &TlsSettings) -> Result<Self, TlsError> {
        let stamps = FileStamps::of(settings);
        let loaded = load(settings)?;
        let current = Current::from(loaded);
        tracing::info!(
            cert = %settings.cert.display(),
            subject = %current.summary.subject,
            serial = %current.summary.serial,
            not_after = %display_time(current.summary.not_after),
            client_auth = %settings.client_auth,
            "TLS: serving certificate"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                current: RwLock::new(current),
                read_stamps: Mutex::new(stamps),
            }),
        })
    }

    /// Reads the files again and, if they are valid, serves them to new
    /// connections. If not, the old certificate stays and the error says
    /// why. `cause` is for the log (SIGHUP, files changed, ...).
    pub fn reload(&self, cause: &str) -> Result<CertificateSummary, TlsError> {
        let settings = &self.inner.settings;
        // Taken before reading: a change while reading is seen next poll.
        let stamps = FileStamps::of(settings);
        let result = load(settings);
        *self.inner.read_stamps.lock().expect("lock poisoned") = stamps;
        match result {
            Ok(loaded) => {
                let current = Current::from(loaded);
                let summary = current.summary.clone();
                *self.inner.current.write().expect("lock poisoned") = current;
                tracing::info!(
                    cause,
                    subject = %summary.subject,
                    serial = %summary.serial,
                    not_after = %display_time(summary.not_after),
                    "TLS: reloaded; new connections get this certificate"
                );
                Ok(summary)
            }
            Err(error) => {
                let old = self.certificate();
                tracing::error!(
                    cause,
                    %error,
                    kept_serial = %old.serial,
                    kept_not_after = %display_time(old.not_after),
                    "TLS: reload failed; still serving the previous certificate"
                );
                Err(error)
            }
        }
    }

    /// The certificate new connections are served.
    pub fn certificate(&self) -> CertificateSummary {
        self.inner
            .current
            .read()
            .expect("lock poisoned")
            .summary
            .clone()
    }

    /// When the served certificate expires: a metric, an alert before it
    /// does.
    pub fn certificate_not_after(&self) -> SystemTime {
        self.certificate().not_after
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.inner.settings
    }

    /// Whether the files differ from when they were last read.
    pub(crate) fn files_changed(&self, now: &FileStamps) -> bool {
        *self.inner.read_stamps.lock().expect("lock poisoned") != *now
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.inner
            .current
            .read()
            .expect("lock poisoned")
            .config
            .clone()
    }

    /// The TLS handshake on an accepted socket, with the current
    /// configuration. No deadline here: the caller sets one.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<Connection> {
        let remote_addr = tcp.peer_addr().ok();
        let stream = tokio_rustls::TlsAcceptor::from(self.config())
            .accept(tcp)
            .await?;
        Ok(Connection::tls(stream, remote_addr))
    }
}

impl From<Loaded> for Current {
    fn from(loaded: Loaded) -> Self {
        Self {
            config: loaded.config,
            summary: CertificateSummary {
                subject: loaded.leaf.subject,
                serial: loaded.leaf.serial,
                not_after: loaded.leaf.not_after,
                fingerprint: loaded.fingerprint,
            },
        }
    }
}

impl Reloadable for TlsAcceptor {
    fn reload(&self, cause: &str) -> Result<CertificateSummary, TlsError> {
        TlsAcceptor::reload(self, cause)
    }

    fn certificate(&self) -> CertificateSummary {
        TlsAcceptor::certificate(self)
    }
}
