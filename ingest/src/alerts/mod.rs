//! Alerts: rules judged against committed readings inside the transaction
//! that stores them ([`judge`], driven by the group-commit writer), the
//! rules and operator actions ([`engine`]), the feed of recorded FIRED /
//! ACKED / RESOLVED events (`feed`), and the watch streams that deliver
//! them to operators ([`watch`]).

pub mod engine;
mod feed;
pub mod judge;
pub mod watch;

pub use engine::{AlertEngine, EngineError};
pub use watch::{WatchConfig, WatchFilter};
