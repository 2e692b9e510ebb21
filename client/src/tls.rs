//! Endpoints of the servers a client calls: an `https://` address is
//! reached with TLS, trusting the CA file given (no system roots: a device
//! fleet's server certificate comes from its own CA), and presenting a
//! client certificate for mutual TLS.
//!
//! `--server` may name several server processes (`a,b,c`): each gets an
//! endpoint here, and [`crate::balance`] spreads calls over them.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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

    /// One endpoint per address of `servers` (see [`server_list`]), each
    /// built and checked as [`ClientTls::endpoint`] does.
    pub fn endpoints(&self, servers: &[String]) -> anyhow::Result<Vec<Endpoint>> {
        servers.iter().map(|url| self.endpoint(url)).collect()
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

/// The addresses of a `--server` value: one, or several separated by
/// commas (blanks around them are ignored). Each must still be checked by
/// [`ClientTls::endpoint`].
pub fn server_list(servers: &str) -> anyhow::Result<Vec<String>> {
    let list: Vec<String> = servers
        .split(',')
        .map(|url| url.trim().to_owned())
        .collect();
    ensure!(
        list.iter().all(|url| !url.is_empty()),
        "the server list {servers:?} has an empty entry: give addresses separated by single commas"
    );
    Ok(list)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_list_is_split_on_commas() {
        assert_eq!(
            server_list("http://a:1").unwrap(),
            ["http://a:1"],
            "one address, as before"
        );
        assert_eq!(
            server_list(" http://a:1 , http://b:2,http://c:3").unwrap(),
            ["http://a:1", "http://b:2", "http://c:3"]
        );
        for bad in ["", "http://a:1,", "http://a:1,,http://b:2"] {
            let error = server_list(bad).unwrap_err().to_string();
            assert!(error.contains("empty entry"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn every_address_is_checked_with_the_same_tls() {
        let plain = ClientTls::default();
        let list = server_list("http://a:1,http://b:2").unwrap();
        assert_eq!(plain.endpoints(&list).unwrap().len(), 2);
        let error = plain
            .endpoints(&server_list("http://a:1,https://b:2").unwrap())
            .unwrap_err()
            .to_string();
        assert!(error.contains("no CA"), "{error}");
    }
}
