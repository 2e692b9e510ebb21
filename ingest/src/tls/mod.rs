//! TLS: the server's certificates, which reload without a restart, and the
//! connections it accepts (plaintext or TLS, one type). The client side
//! lives in the telemetry-client crate (`telemetry_client::tls`).
//!
//! tonic's own `ServerTlsConfig` is fixed at start, so the server accepts
//! TLS itself, in front of tonic:
//!
//! - [`settings`]: what `ingest serve` was asked for ([`TlsSettings`]).
//! - [`load`]: PEM files -> a validated rustls `ServerConfig` (key matches
//!   the certificate, chain parses, leaf not expired, client CAs usable).
//! - [`acceptor`]: the current `ServerConfig`, swapped on reload for new
//!   connections; open connections keep the one they started with.
//! - [`reload`]: SIGHUP and a poll of the files' metadata call
//!   [`TlsAcceptor::reload`].
//! - [`incoming`]: accepted sockets -> TLS handshakes, concurrent and
//!   bounded, under `--handshake-timeout` -> the stream tonic serves.
//! - [`connection`]: [`Connection`] and the [`ConnectionInfo`] tonic puts
//!   into every request's extensions (remote address, verified client
//!   certificate) for the auth layer.
//! - [`certificate`]: what is read from X.509 (expiry, serial, names).

pub mod acceptor;
pub mod certificate;
pub mod connection;
pub mod error;
pub mod incoming;
pub mod load;
pub mod reload;
pub mod settings;

pub use acceptor::{CertificateSummary, TlsAcceptor};
pub use connection::{Connection, ConnectionInfo};
pub use error::TlsError;
pub use incoming::{Incoming, Transport, listen};
pub use settings::{ClientAuth, TlsHandle, TlsSettings};
