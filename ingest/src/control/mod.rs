//! Device control: the durable command queue, the sessions of devices that
//! hold a Control stream, and presence.
//!
//! "Delivered" means acknowledged by the device. A command is written to a
//! stream only by that stream's own session task, which takes the device's
//! deliverable commands from the database in id order; a newer stream
//! supersedes an older one, whose task stops before writing anything more.
//! Commands sent but not acknowledged are delivered again on the next
//! stream, with the same id.

pub mod center;
pub mod session;

pub use center::{CommandCenter, ControlConfig, SendError};
