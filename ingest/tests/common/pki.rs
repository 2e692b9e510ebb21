//! A throwaway PKI for TLS tests, made fresh by each test with rcgen:
//! a CA, server certificates for 127.0.0.1 and localhost, and client
//! certificates named after devices. Nothing secret is committed.
//!
//! ```ignore
//! let pki = TestPki::new("main");
//! let (settings, _served) = pki.server_settings();   // writes server.pem / server.key
//! let server = TestServer::start_tls(backend, &pki, settings).await?;
//! let token = server.register("dev-1").await;           // over TLS
//! let device = pki.client_cert("dev-1");
//! let mut client = server.tls_ingest(&token, Some(&device)).await;
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ingest::Config;
use ingest::domain::CertFingerprint;
use ingest::transport::{ClientAuth, TlsSettings};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, ServerName};
use telemetry_proto::v1::ingest_client::IngestClient;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::net::TcpStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{Backend, Bearer, Ingest, OPS_TOKEN, Ops, TestServer};

/// A CA and a directory for the files a server reads.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM, with the DER the peer sees.
#[derive(Clone)]
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCert {
    /// For a tonic client: `ClientTlsConfig::identity`.
    pub fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// What the server records for it (SHA-256 of the DER).
    pub fn fingerprint(&self) -> CertFingerprint {
        CertFingerprint::of_der(&self.der)
    }

    /// Writes the certificate and key files.
    pub fn write(&self, cert: &Path, key: &Path) {
        std::fs::write(cert, &self.cert_pem).unwrap();
        std::fs::write(key, &self.key_pem).unwrap();
    }
}

impl TestPki {
    /// A new CA; `name` goes into its subject, to tell CAs apart in errors.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ingest test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(next_serial());
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            ca,
        };
        std::fs::write(pki.ca_path(), pki.ca_pem()).unwrap();
        pki
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// The CA certificate, written at creation: what `--tls-ca` and
    /// `--tls-client-ca` take.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new server certificate for 127.0.0.1 and localhost, with its own
    /// serial and key.
    pub fn server_cert(&self) -> TestCert {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "ingest test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// The same, expired in 2001.
    pub fn expired_server_cert(&self) -> TestCert {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        self.issue(params)
    }

    /// A client certificate with CN = `device_id` (and the same DNS SAN
    /// name, as device CAs often add).
    pub fn client_cert(&self, device_id: &str) -> TestCert {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, device_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    /// A client certificate with the given CN and SANs (DNS names, and
    /// URIs for entries with a scheme).
    pub fn client_cert_with_sans(&self, common_name: &str, sans: &[&str]) -> TestCert {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names = sans
            .iter()
            .map(|san| {
                if san.contains(':') {
                    rcgen::SanType::URI(san.to_string().try_into().unwrap())
                } else {
                    rcgen::SanType::DnsName(san.to_string().try_into().unwrap())
                }
            })
            .collect();
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> TestCert {
        params.serial_number = Some(next_serial());
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        TestCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// Server settings over `server.pem` and `server.key` in the PKI's
    /// directory, written with a new certificate; files polled every 50 ms.
    pub fn server_settings(&self) -> (TlsSettings, TestCert) {
        let cert = self.server_cert();
        cert.write(&self.path("server.pem"), &self.path("server.key"));
        let mut settings = TlsSettings::new(self.path("server.pem"), self.path("server.key"));
        settings.poll_interval = std::time::Duration::from_millis(50);
        (settings, cert)
    }

    /// Replaces the server's files the way certbot or `mv` does: write
    /// elsewhere, then rename over, so a reader never sees half a file.
    pub fn replace_server_files(&self, cert: &TestCert) {
        let (tmp_cert, tmp_key) = (self.path("server.pem.tmp"), self.path("server.key.tmp"));
        cert.write(&tmp_cert, &tmp_key);
        std::fs::rename(&tmp_key, self.path("server.key")).unwrap();
        std::fs::rename(&tmp_cert, self.path("server.pem")).unwrap();
    }

    /// tonic client TLS trusting this CA, with an optional client identity.
    pub fn client_config(&self, identity: Option<&TestCert>) -> ClientTlsConfig {
        ClientSide {
            ca_pem: self.ca_pem(),
            identity: None,
        }
        .config(identity)
    }

    /// rustls client configuration trusting this CA: for raw connections
    /// that look at the server's certificate.
    pub fn rustls_client(&self, identity: Option<&TestCert>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match identity {
            Some(cert) => {
                use rustls::pki_types::pem::PemObject;
                builder
                    .with_client_auth_cert(
                        vec![cert.der.clone()],
                        rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
                            .unwrap(),
                    )
                    .unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// The certificate a new TLS connection to `addr` is served, or the
    /// handshake's error.
    pub async fn served_certificate(
        &self,
        addr: std::net::SocketAddr,
    ) -> Result<CertificateDer<'static>, std::io::Error> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(self.rustls_client(None));
        let tls = connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await?;
        let (_, session) = tls.get_ref();
        Ok(session.peer_certificates().unwrap()[0].clone())
    }
}

fn next_serial() -> SerialNumber {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    // A leading byte below 0x80 keeps the DER integer positive and minimal.
    let mut bytes = vec![0x40];
    bytes.extend_from_slice(&(std::process::id() as u64).to_be_bytes()[4..]);
    bytes.extend_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    SerialNumber::from_slice(&bytes)
}

/// How a test server's own clients reach it over TLS.
#[derive(Clone)]
pub struct ClientSide {
    pub ca_pem: String,
    /// Presented by [`TestServer::channel`] and so by `ops()`, `ingest()`
    /// and `register()`: an "operator" certificate when the server asks for
    /// client certificates.
    pub identity: Option<TestCert>,
}

impl ClientSide {
    pub fn config(&self, identity: Option<&TestCert>) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        match identity {
            Some(cert) => config.identity(cert.identity()),
            None => config,
        }
    }
}

impl TestServer {
    /// Serves TLS with `settings` (from [`TestPki::server_settings`],
    /// changed as the test needs). Its own calls ([`TestServer::ops`],
    /// [`TestServer::register`], ...) go over TLS, trusting `pki`'s CA,
    /// with an "operator" client certificate when the server asks for one.
    pub async fn start_tls(backend: Backend, pki: &TestPki, settings: TlsSettings) -> Option<Self> {
        Self::start_tls_configured(backend, pki, settings, |_| {}).await
    }

    pub async fn start_tls_configured(
        backend: Backend,
        pki: &TestPki,
        settings: TlsSettings,
        configure: impl Fn(&mut Config) + Send + Sync + 'static,
    ) -> Option<Self> {
        let identity =
            (settings.client_auth != ClientAuth::None).then(|| pki.client_cert("operator"));
        let mut server = Self::start_configured(backend, move |config| {
            config.tls = Some(settings.clone());
            configure(config);
        })
        .await?;
        server.tls = Some(ClientSide {
            ca_pem: pki.ca_pem(),
            identity,
        });
        Some(server)
    }

    /// A new TLS connection trusting the server's CA, presenting
    /// `identity` (none: no client certificate).
    pub async fn tls_channel(
        &self,
        identity: Option<&TestCert>,
    ) -> Result<Channel, tonic::transport::Error> {
        let side = self.tls.as_ref().expect("a server started with start_tls");
        Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(side.config(identity))?
            .connect()
            .await
    }

    /// An Ingest client on a new TLS connection presenting `identity`.
    pub async fn tls_ingest(&self, token: &str, identity: Option<&TestCert>) -> Ingest {
        let channel = self.tls_channel(identity).await.unwrap();
        IngestClient::with_interceptor(channel, Bearer::new(token).unwrap())
    }

    /// An Ops client on a new TLS connection, presenting the operator
    /// certificate when the server asks for one.
    pub async fn tls_ops(&self) -> Ops {
        let identity = self.tls.as_ref().and_then(|side| side.identity.clone());
        let channel = self.tls_channel(identity.as_ref()).await.unwrap();
        OpsClient::with_interceptor(channel, Bearer::new(OPS_TOKEN).unwrap())
    }
}
