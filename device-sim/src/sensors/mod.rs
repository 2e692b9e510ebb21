//! What a simulated device measures: sensor models with plausible physical
//! signals, and the faults real sensors show. Pure computation, driven by
//! the device's seeded generator; the device decides when to sample.

mod anomaly;
mod models;

pub use models::{Sensor, sensor_name};
