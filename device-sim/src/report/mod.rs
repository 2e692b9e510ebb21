//! What the run tells: the counters every device task updates, the live
//! progress line, the final report (text and JSON) and the simulator's own
//! memory.

mod memory;
pub mod progress;
mod stats;
mod summary;

pub use stats::{Counter, Stats};
pub use summary::{DeviceFailure, LoadSettings, Report};
