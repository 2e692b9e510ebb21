//! Ctrl-C and SIGTERM: the first settles the run, the second ends it.

use tracing::warn;

use crate::shutdown::ShutdownTrigger;

/// First Ctrl-C or SIGTERM: stop producing and settle the open streams.
/// Second: quit at once.
pub fn spawn_listener(trigger: ShutdownTrigger, quiet: bool) {
    tokio::spawn(async move {
        wait_for_signal().await;
        if !quiet {
            eprintln!(
                "\nshutting down: waiting for the last acknowledgements (Ctrl-C again to quit now)"
            );
        }
        trigger.trigger();
        wait_for_signal().await;
        eprintln!("\ninterrupted twice: quitting without the report");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
