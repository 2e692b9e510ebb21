//! What the server reads from X.509 certificates: a served certificate's
//! expiry and serial (for logs and a metric), and the names a client
//! certificate carries (for device identity).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::domain::{CertFingerprint, ClientCertificate};

/// The certificate being served, as logs and metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    pub subject: String,
    pub serial: String,
    pub not_after: SystemTime,
    pub fingerprint: CertFingerprint,
}

/// The facts about one certificate worth logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub subject: String,
    /// Hex bytes separated by ':', as `openssl x509 -serial` shows them
    /// (with colons).
    pub serial: String,
    pub not_after: SystemTime,
}

impl Facts {
    pub fn of(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let not_after = cert.validity().not_after.timestamp();
        Ok(Self {
            subject: cert.subject().to_string(),
            serial: cert.raw_serial_as_string(),
            not_after: unix_time(not_after),
        })
    }
}

/// A client certificate the handshake verified, as the auth layer sees it:
/// its fingerprint and its names, subject CN first, then DNS SANs, then
/// URI SANs. A certificate x509-parser cannot read (webpki accepted it, so
/// this is unlikely) keeps its fingerprint and has no names.
pub fn client_certificate(der: &CertificateDer<'_>) -> ClientCertificate {
    let names = match X509Certificate::from_der(der) {
        Ok((_, cert)) => names(&cert),
        Err(error) => {
            tracing::warn!(%error, "a verified client certificate does not parse; it names nothing");
            Vec::new()
        }
    };
    ClientCertificate {
        fingerprint: CertFingerprint::of_der(der),
        names,
    }
}

fn names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let general = &san.value.general_names;
        names.extend(general.iter().filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        }));
        names.extend(general.iter().filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        }));
    }
    names
}

fn unix_time(seconds: i64) -> SystemTime {
    if seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(seconds.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    }
}

/// RFC 3339, for messages.
pub fn display_time(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
