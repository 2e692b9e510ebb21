//! PEM files -> a rustls `ServerConfig`, validated before it is served: the
//! chain parses, the leaf has not expired, the key belongs to the leaf, and
//! every client CA is usable. Anything wrong is an error naming the file;
//! on reload the caller keeps the config it had.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{Error as RustlsError, InconsistentKeys, RootCertStore, ServerConfig};

use super::certificate::{Facts, display_time};
use super::error::TlsError;
use super::settings::{ClientAuth, TlsSettings};
use crate::domain::CertFingerprint;

const CHAIN: &str = "the server certificate, then its intermediates";
const CA: &str = "the CA certificates that sign client certificates";

/// The metadata of the certificate, key and client CA files; `None` for a
/// file that cannot be read (missing for a moment during a swap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamps(Vec<Option<Stamp>>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    device: u64,
}

impl FileStamps {
    pub fn of(settings: &TlsSettings) -> Self {
        let paths = [Some(&settings.cert), Some(&settings.key)]
            .into_iter()
            .chain([settings.client_ca.as_ref()])
            .flatten();
        // Follows symlinks: what matters is the file the path leads to now.
        Self(
            paths
                .map(|path| {
                    std::fs::metadata(path).ok().map(|m| Stamp {
                        modified: m.modified().ok(),
                        len: m.len(),
                        inode: m.ino(),
                        device: m.dev(),
                    })
                })
                .collect(),
        )
    }
}

/// A validated configuration and what it serves.
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    pub leaf: Facts,
    pub fingerprint: CertFingerprint,
}

/// The crypto provider: ring, the one this build has.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load(settings: &TlsSettings) -> Result<Loaded, TlsError> {
    settings.check()?;
    let provider = provider();
    let chain = read_certificates(&settings.cert, "server certificate", CHAIN)?;
    let leaf = validate_chain(&settings.cert, &chain)?;
    let key = read_key(&settings.key)?;
    let fingerprint = CertFingerprint::of_der(&chain[0]);
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| TlsError::UnusableKey {
            path: settings.key.clone(),
            error,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Unknown: the key type cannot tell its public key; the handshake
        // would fail visibly, which is no worse than today.
        Ok(()) | Err(RustlsError::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::KeyMismatch {
                cert: settings.cert.clone(),
                key: settings.key.clone(),
            });
        }
    }

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (settings.client_auth, &settings.client_ca) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (mode, Some(ca)) => {
            let roots = read_client_roots(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match mode {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Config(format!("client CAs in {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        (mode, None) => return Err(TlsError::ClientAuthWithoutCa(mode)),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    // gRPC is HTTP/2 only; a client that offers ALPN must offer h2.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        leaf,
        fingerprint,
    })
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

fn read_certificates(
    path: &Path,
    what: &'static str,
    expected: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            path: path.to_owned(),
            expected,
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
            expected,
        });
    }
    Ok(certs)
}

/// Every certificate parses; the first, the leaf, is current.
fn validate_chain(path: &Path, chain: &[CertificateDer<'_>]) -> Result<Facts, TlsError> {
    let mut facts = chain.iter().enumerate().map(|(i, der)| {
        Facts::of(der).map_err(|reason| TlsError::BadCertificate {
            path: path.to_owned(),
            index: i + 1,
            reason,
        })
    });
    let leaf = facts.next().expect("a chain has a leaf")?;
    for other in facts {
        other?;
    }
    if leaf.not_after < SystemTime::now() {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_after: display_time(leaf.not_after),
        });
    }
    Ok(leaf)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| match error {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        error => TlsError::Pem {
            path: path.to_owned(),
            expected: "a private key",
            error,
        },
    })
}

fn read_client_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, der) in read_certificates(path, "client CA file", CA)?
        .into_iter()
        .enumerate()
    {
        roots.add(der).map_err(|e| TlsError::BadClientCa {
            path: path.to_owned(),
            index: i + 1,
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}
