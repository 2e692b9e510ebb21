//! The client side, shared by device-sim, the `ingest` CLI and the
//! examples: an `https://` address is reached with TLS, trusting the CA
//! file given (no system roots: a device fleet's server certificate comes
//! from its own CA), and presenting a client certificate for mutual TLS.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The files a client's TLS needs; all optional, checked against the
/// address's scheme by [`ClientTls::endpoint`].
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM: the CA (or CAs) that signed the server's certificate.
    pub ca: Option<PathBuf>,
    /// PEM: this client's certificate, for mutual TLS.
    pub cert: Option<PathBuf>,
    /// PEM: the private key of `cert`.
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// An endpoint for `url`: plaintext for `http://`, TLS for `https://`.
    /// Fails, naming the flag to fix, when the files do not fit the scheme
    /// or cannot be read.
    pub fn endpoint(&self, url: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_owned()).with_context(|| {
            format!(
                "invalid server address {url:?}: expected http://HOST:PORT or https://HOST:PORT"
            )
        })?;
        match endpoint.uri().scheme_str() {
            Some("https") => endpoint
                .tls_config(self.config(url)?)
                .with_context(|| format!("setting up TLS for {url}")),
            Some("http") => {
                ensure!(
                    self.ca.is_none() && self.cert.is_none() && self.key.is_none(),
                    "--tls-ca, --tls-cert and --tls-key are for https:// addresses; {url} is plaintext"
                );
                Ok(endpoint)
            }
            _ => bail!("the server address {url:?} must start with http:// or https://"),
        }
    }

    /// tonic's TLS settings from the files.
    pub fn config(&self, url: &str) -> anyhow::Result<ClientTlsConfig> {
        let Some(ca) = &self.ca else {
            bail!(
                "{url} is https:// but no CA was given: pass --tls-ca with the CA certificate \
                 that signed the server's certificate"
            );
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_certificates(ca, "--tls-ca")?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read_certificates(cert, "--tls-cert")?,
                    read_key(key)?,
                ));
            }
            (None, None) => {}
            _ => bail!(
                "--tls-cert and --tls-key go together: the client certificate and its private key"
            ),
        }
        Ok(config)
    }
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
}

/// The file's bytes, once they are known to hold a certificate: tonic
/// would otherwise fail later with a less precise message.
fn read_certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let pem = read(path, flag)?;
    let mut certs = CertificateDer::pem_slice_iter(&pem);
    match certs.next() {
        Some(Ok(_)) => {}
        Some(Err(e)) => bail!("{flag} {} is not valid PEM: {e}", path.display()),
        None => bail!("{flag} {} holds no PEM CERTIFICATE block", path.display()),
    }
    Ok(pem)
}

fn read_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = read(path, "--tls-key")?;
    PrivateKeyDer::from_pem_slice(&pem).with_context(|| {
        format!(
            "--tls-key {} holds no usable PEM private key",
            path.display()
        )
    })?;
    Ok(pem)
}
