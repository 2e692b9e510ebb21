//! The process's shutdown signal.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal as listen};

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what service managers and
/// container runtimes send).
///
/// The handlers are installed when this is called, not when the future is
/// first polled: a SIGTERM that arrives while the server is still starting
/// (after it logged "serving", say) then shuts it down gracefully instead
/// of killing it by the default action.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    let interrupt = listen(SignalKind::interrupt());
    let terminate = listen(SignalKind::terminate());
    async move {
        let wait = |stream: std::io::Result<tokio::signal::unix::Signal>, name: &'static str| async move {
            match stream {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(error) => {
                    tracing::error!(%error, signal = name, "cannot listen for the signal");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = wait(interrupt, "SIGINT") => tracing::info!("SIGINT received"),
            () = wait(terminate, "SIGTERM") => tracing::info!("SIGTERM received"),
        }
    }
}
