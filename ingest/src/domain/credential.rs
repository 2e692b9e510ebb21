//! Credentials and the identities they prove, below both `auth` (which
//! checks them) and `storage` (which keeps them), so neither imports the
//! other's types.

use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A secret bearer token. `Debug` hides it so that it cannot reach a log by
/// accident; only [`Token::expose`] reveals it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A new random token: `prefix` + 64 hex digits (256 bits).
    pub fn generate(prefix: &str) -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(format!("{prefix}{}", hex::encode(bytes)))
    }

    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// SHA-256 of a token: what the database stores and lookups use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Compares without an early exit, so the time taken does not tell an
    /// attacker how much of a guess was right.
    pub fn constant_time_eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Active (neither revoked nor expired) tokens one device may hold: enough
/// for a rotation's overlap with one spare, few enough to keep track of.
pub const MAX_ACTIVE_TOKENS: usize = 3;

/// The identity behind a credential: a registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKey {
    pub pk: i64,
    pub id: crate::domain::DeviceId,
}

/// SHA-256 of a certificate's DER encoding: how a device's certificate is
/// bound to it (what `openssl x509 -fingerprint -sha256` prints).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertFingerprint([u8; 32]);

impl CertFingerprint {
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads 64 hex digits, with or without `:` between bytes, any case.
    pub fn parse_hex(text: &str) -> Result<Self, InvalidFingerprint> {
        let digits: String = text.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&digits).map_err(|_| InvalidFingerprint)?;
        bytes.try_into().map(Self).map_err(|_| InvalidFingerprint)
    }
}

impl CertFingerprint {
    /// The fingerprint of the first (leaf) certificate in PEM text.
    pub fn of_pem(pem: &str) -> Result<Self, InvalidCertificate> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let first = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .ok_or(InvalidCertificate)?
            .map_err(|_| InvalidCertificate)?;
        Ok(Self::of_der(&first))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("certificate_pem holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
pub struct InvalidCertificate;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "a certificate fingerprint is the SHA-256 of its DER encoding: 64 hex digits, optionally separated by ':'"
)]
pub struct InvalidFingerprint;

impl fmt::Display for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertFingerprint({self})")
    }
}

/// A client certificate the TLS handshake verified against the client CA:
/// its fingerprint, and the names it carries (subject CN, then DNS and URI
/// SANs) that a device id must be among.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub fingerprint: CertFingerprint,
    pub names: Vec<String>,
}

impl ClientCertificate {
    /// Whether the certificate names `device`: as its CN, a DNS SAN, or a
    /// URI SAN `urn:device:<id>`.
    pub fn names_device(&self, device: &str) -> bool {
        self.names
            .iter()
            .any(|name| name == device || name.strip_prefix("urn:device:") == Some(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_redacted() {
        let a = Token::generate("dev_");
        let b = Token::generate("dev_");
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 4 + 64);
        assert!(!format!("{a:?}").contains(&a.expose()[4..]));
        assert!(a.hash().constant_time_eq(&TokenHash::of(a.expose())));
        assert!(!a.hash().constant_time_eq(&b.hash()));
    }

    #[test]
    fn fingerprints_read_back_as_written() {
        let f = CertFingerprint::of_der(b"not really DER");
        assert_eq!(CertFingerprint::parse_hex(&f.to_string()), Ok(f));
        let colons = f
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(CertFingerprint::parse_hex(&colons), Ok(f));
        assert_eq!(CertFingerprint::parse_hex("abcd"), Err(InvalidFingerprint));
    }

    #[test]
    fn a_certificate_names_a_device_by_cn_san_or_urn() {
        let cert = ClientCertificate {
            fingerprint: CertFingerprint::of_der(b"x"),
            names: vec!["dev-1".into(), "urn:device:dev-2".into()],
        };
        assert!(cert.names_device("dev-1"));
        assert!(cert.names_device("dev-2"));
        assert!(!cert.names_device("dev-3"));
        assert!(!cert.names_device("dev"));
    }
}
