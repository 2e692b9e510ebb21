//! Domain types and rules, free of I/O: a value of these types has passed
//! validation, so code past the API boundary never re-checks it.

pub mod alert;
pub mod command;
pub mod consumer;
pub mod credential;
pub mod device;
pub mod device_message;
pub mod reading;
pub mod summary;
pub mod text;
pub mod time;

pub use credential::{CertFingerprint, ClientCertificate, DeviceKey, Token, TokenHash};
pub use device::{DeviceId, DisplayName, InvalidDevice, Labels};
pub use reading::{BatchError, ReadingLimits, RejectReason, SensorName, Unit, ValidatedBatch};
pub use summary::UploadTally;
