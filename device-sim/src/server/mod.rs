//! Servers the fleet can run against inside this process: the real ingest
//! server (`--local-server`) and, for tests, a mock that can be told to
//! misbehave.

#[cfg(feature = "local-server")]
pub mod local;
#[cfg(test)]
pub mod mock;
