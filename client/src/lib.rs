//! What every client of telemetry-ingest shares: device-sim, the `ingest`
//! CLI, the examples and the tests reach the server the same way.
//!
//! - [`tls`]: `--server` lists and channels to them, `https://` with a CA
//!   file and a client identity ([`tls::ClientTls`]).
//! - [`balance`]: one [`balance::Transport`] for the generated clients,
//!   whether it calls one server or is balanced over several.
//! - [`bearer`]: the `authorization: Bearer <token>` header on every call
//!   ([`bearer::Bearer`]).
//! - [`ops_token`]: where an operator's token comes from, and the files
//!   that hold tokens.
//! - [`status`]: whether a failed call is worth trying again, and the delay
//!   the server asked for.
//! - [`backoff`]: how long to wait before trying again.

pub mod backoff;
pub mod balance;
pub mod bearer;
pub mod ops_token;
pub mod status;
pub mod tls;
