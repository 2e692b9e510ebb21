//! Authentication: bearer tokens for devices and operators, checked once for
//! every call by [`AuthLayer`] before any handler runs.
//!
//! Tokens are 256 random bits, so a plain SHA-256 is enough to store them:
//! a slow password hash only matters for guessable secrets.

mod layer;
mod ops_token;

use crate::domain::DeviceKey;
pub use layer::{AuthLayer, Authenticator, Operator};
pub use ops_token::{OpsTokenSource, resolve_ops_token};

/// The device a call was authenticated as, put in the request extensions by
/// [`AuthLayer`]. Handlers take the caller's identity from here only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedDevice(pub DeviceKey);

/// The authenticated device of an `Ingest` call.
pub fn device<T>(request: &tonic::Request<T>) -> Result<&DeviceKey, tonic::Status> {
    request
        .extensions()
        .get::<AuthenticatedDevice>()
        .map(|d| &d.0)
        // Only reachable if the layer is not installed: refuse, never guess.
        .ok_or_else(|| tonic::Status::unauthenticated("no device credential"))
}
