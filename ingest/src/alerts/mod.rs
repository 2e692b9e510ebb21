//! Alerts: the engine that judges committed readings against the rules and
//! records FIRED / ACKED / RESOLVED events, and the watch streams that
//! deliver those events to operators.

pub mod engine;
pub mod watch;

pub use engine::{AlertEngine, EngineError};
pub use watch::{WatchConfig, WatchFilter};
