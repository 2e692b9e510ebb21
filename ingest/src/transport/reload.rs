//! When to reload: on SIGHUP, and when the files change. Changes are found
//! by polling metadata (modification time, length, inode) rather than by
//! file notifications: Kubernetes updates a mounted secret by swapping a
//! symlink, certbot and `mv` by renaming, and polling `stat` through the
//! path sees all of them the same way.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::acceptor::TlsAcceptor;
use super::load::FileStamps;

/// Reloads on SIGHUP and on file changes until `stopping` turns true.
pub fn spawn(acceptor: TlsAcceptor, mut stopping: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP; TLS files still reload when they change");
                None
            }
        };
        let mut poll = tokio::time::interval(acceptor.settings().poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<FileStamps> = None;
        loop {
            tokio::select! {
                _ = stopping.wait_for(|s| *s) => break,
                Some(()) = recv(&mut hangup) => {
                    let _ = acceptor.reload("SIGHUP");
                    pending = None;
                }
                _ = poll.tick() => {
                    let now = FileStamps::of(acceptor.settings());
                    if !acceptor.files_changed(&now) {
                        pending = None;
                    } else if pending.as_ref() == Some(&now) {
                        // Unchanged for a whole poll: a certificate and key
                        // copied one after the other are both in place.
                        let _ = acceptor.reload("files changed");
                        pending = None;
                    } else {
                        pending = Some(now);
                    }
                }
            }
        }
    })
}

async fn recv(hangup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hangup {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}
