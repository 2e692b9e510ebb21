//! The client side of TLS and balancing, shared by device-sim, the CLI and
//! the examples (moving to the client crate).

pub mod balance;
pub mod client;
