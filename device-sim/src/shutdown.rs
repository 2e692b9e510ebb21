//! One switch that tells every task to wind down: set by Ctrl-C, SIGTERM or
//! the end of --duration, observed by samplers, uploaders and registration.

use std::sync::Arc;

use tokio::sync::watch;

/// Flips the switch. Cloning shares the same switch.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    tx: Arc<watch::Sender<bool>>,
}

/// Observes the switch.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx: Arc::new(tx) }, Shutdown { rx })
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        // send_replace succeeds even when no one is listening any more.
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes once shutdown is requested. Cancel-safe, so it can sit in a
    /// `select!` loop.
    pub async fn requested(&mut self) {
        if self.rx.wait_for(|stop| *stop).await.is_err() {
            // The trigger is gone without firing: nobody can ask us to stop
            // any more, so never complete.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_reaches_every_clone() {
        let (trigger, shutdown) = channel();
        let mut a = shutdown.clone();
        let b = shutdown;
        assert!(!b.is_requested());
        trigger.trigger();
        a.requested().await;
        assert!(b.is_requested());
    }
}
