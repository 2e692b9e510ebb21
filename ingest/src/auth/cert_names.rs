//! Whether a certificate about to be bound names its device. Binding one
//! that does not is allowed (a token may still be sent with it), but over
//! mutual TLS the device would be refused with it, so the operator is
//! warned when binding rather than at the device's first connection.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::domain::DeviceId;
use crate::transport::certificate::client_certificate;

/// A warning if the first certificate in `pem` does not name `device`
/// (subject CN, DNS SAN or URI SAN `urn:device:ID`), also logged. `None`
/// when it names it, or when there is no certificate to read.
pub fn naming_warning(device: &DeviceId, pem: &str) -> Option<String> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    let cert = client_certificate(&der);
    if cert.names_device(device.as_str()) {
        return None;
    }
    let names = match cert.names.as_slice() {
        [] => "no device".to_owned(),
        names => names.join(", "),
    };
    tracing::warn!(
        %device,
        names = %names,
        "bound a certificate that does not name its device"
    );
    Some(format!(
        "the certificate names {names}, not {device} (subject CN, DNS SAN or URI SAN urn:device:{device}): \
         it is bound, but over mutual TLS {device} will be refused with it"
    ))
}
