//! Authentication: bearer tokens and client certificates for devices, named
//! bearer tokens for operators, checked once for every call by
//! [`AuthLayer`] before any handler runs; and the credential changes that
//! end open streams ([`Credentials::apply`]).
//!
//! Tokens are 256 random bits, so a plain SHA-256 is enough to store them:
//! a slow password hash only matters for guessable secrets.

mod cert_names;
mod credentials;
mod layer;
mod ops_token;
mod revocation;

pub use cert_names::naming_warning;
pub use credentials::{AuthFailure, AuthenticatedDevice, Credentials};
pub use layer::{AuthLayer, Authenticator, Operator};
pub use ops_token::{OpsTokenSource, OpsTokens, resolve_ops_token};
pub use revocation::{Credential, CredentialEnded, CredentialEvent, CredentialWatch, until_ended};

/// The authenticated device of an `Ingest` call.
pub fn device<T>(request: &tonic::Request<T>) -> Result<&AuthenticatedDevice, tonic::Status> {
    request
        .extensions()
        .get::<AuthenticatedDevice>()
        // Only reachable if the layer is not installed: refuse, never guess.
        .ok_or_else(|| tonic::Status::unauthenticated("no device credential"))
}
