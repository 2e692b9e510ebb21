//! How many QueryReadings streams may be open: in all, and per ops token,
//! so a dashboard gone wild cannot take every read connection from the
//! other operators, and reads together cannot starve ingest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ReadError;

/// When a refused caller is told to retry: streams are long, so not at once.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct StreamLimits {
    max: usize,
    max_per_token: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_token: HashMap<String, usize>,
}

/// One open stream; dropping it (when the stream's task ends) frees it.
pub struct StreamPermit {
    limits: Arc<StreamLimits>,
    token: String,
}

impl StreamLimits {
    pub fn new(max: usize, max_per_token: usize) -> Self {
        Self {
            max: max.max(1),
            max_per_token: max_per_token.max(1),
            open: Mutex::default(),
        }
    }

    pub fn acquire(self: &Arc<Self>, token: &str) -> Result<StreamPermit, ReadError> {
        let mut open = self.open.lock().expect("no panics while held");
        if open.total >= self.max {
            return Err(ReadError::Busy {
                what: "the server's limit, --max-read-streams",
                open: open.total,
                retry_after: RETRY_AFTER,
            });
        }
        let mine = open.by_token.get(token).copied().unwrap_or(0);
        if mine >= self.max_per_token {
            return Err(ReadError::Busy {
                what: "this ops token's limit, --max-read-streams-per-token",
                open: mine,
                retry_after: RETRY_AFTER,
            });
        }
        open.total += 1;
        *open.by_token.entry(token.to_owned()).or_default() += 1;
        Ok(StreamPermit {
            limits: self.clone(),
            token: token.to_owned(),
        })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().expect("no panics while held");
        open.total -= 1;
        if let Some(n) = open.by_token.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                open.by_token.remove(&self.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_globally_and_per_token_and_free_on_drop() {
        let limits = Arc::new(StreamLimits::new(3, 2));
        let a1 = limits.acquire("a").unwrap();
        let _a2 = limits.acquire("a").unwrap();
        assert!(matches!(limits.acquire("a"), Err(ReadError::Busy { .. })));
        let _b1 = limits.acquire("b").unwrap();
        assert!(matches!(limits.acquire("c"), Err(ReadError::Busy { .. })));
        drop(a1);
        let _c1 = limits.acquire("c").unwrap();
    }
}
