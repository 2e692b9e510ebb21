//! Several server processes on one database.
//!
//! On PostgreSQL any number of `ingest serve` processes share the database:
//! each is a *replica* with a fresh id and a lease it renews ([`lease`]);
//! one LISTEN connection per process hears what the others committed
//! ([`listener`]); one process at a time leads ([`leader`]) and does what
//! must happen once: judging inactivity rules and expiring commands. Every
//! fast path (a notification) has a database read behind it, so a lost
//! notification costs latency, never an event or a command.
//!
//! SQLite is served by one process: [`single::ProcessLock`] refuses a second.

pub mod leader;
pub mod single;

use std::time::Duration;

use rand::Rng;

/// How replicas keep their leases.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// A replica unheard of for this long is dead: its devices go offline.
    pub lease: Duration,
    /// How often a replica renews its lease and sweeps dead ones.
    pub renew: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
            renew: Duration::from_secs(2),
        }
    }
}

/// This process, as the others know it.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Fresh at every start: a restarted process is a new replica, so
    /// nothing of its previous life is mistaken for its own.
    pub id: String,
}

impl Replica {
    pub fn new() -> Self {
        let bits: u128 = rand::rng().random();
        Self {
            id: format!("{bits:032x}"),
        }
    }

    /// The first 8 hex digits, for connection names and logs.
    pub fn short(&self) -> &str {
        &self.id[..8]
    }

    /// `application_name` of this process's connections with `role`.
    pub fn connection_name(&self, role: Option<&str>) -> String {
        match role {
            Some(role) => format!("ingest-{}-{role}", self.short()),
            None => format!("ingest-{}", self.short()),
        }
    }
}

impl Default for Replica {
    fn default() -> Self {
        Self::new()
    }
}

/// `base` ±10%, so that what started together does not end together.
pub fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.9..=1.1))
}
