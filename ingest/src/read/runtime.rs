//! Reads run on a runtime of their own, whose threads have a lower CPU
//! priority than the rest of the server (a higher `nice` value).
//!
//! Giving way on the writer's queue ([`super::stream`]) protects ingest
//! from reads that press on the database. It does not protect it from
//! reads that take the CPU: on SQLite an export steps millions of rows a
//! second on the reading thread itself, and with two cores ten exports
//! halved the committed ingest rate while the writer's queue stayed short.
//! The kernel's scheduler is the one place that sees every runnable
//! thread, so reads ask it to come second: they run at full speed on
//! CPU that ingest does not want, and yield it when ingest does. Only the
//! calling thread's priority changes (Linux applies `setpriority` per
//! thread); the handlers, the writer and the database's own connection
//! threads keep theirs.

use std::future::Future;

use tokio::runtime::{Builder, Handle, Runtime};

/// The read path's runtime. Dropping it stops its threads without waiting
/// for them, so it may be dropped from inside another runtime.
pub struct ReadRuntime {
    runtime: Option<Runtime>,
    handle: Handle,
}

impl ReadRuntime {
    /// `threads` workers at niceness `nice` (0 to 19; 0 is the server's
    /// own priority).
    pub fn start(threads: usize, nice: i32) -> std::io::Result<Self> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("ingest-read")
            .enable_all()
            .on_thread_start(move || lower_priority(nice))
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
        })
    }

    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handle.spawn(task);
    }
}

impl Drop for ReadRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    // SAFETY: setpriority takes plain integers; `who` 0 is the calling
    // thread on Linux.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if result != 0 {
        tracing::warn!(
            nice,
            error = %std::io::Error::last_os_error(),
            "could not lower the read threads' CPU priority; reads compete with ingest"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(nice: i32) {
    // Elsewhere setpriority would apply to the whole process.
    if nice > 0 {
        tracing::warn!(
            nice,
            "read threads keep the server's CPU priority on this platform"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn read_threads_run_at_the_asked_niceness_and_others_do_not() {
        let runtime = ReadRuntime::start(1, 7).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            // SAFETY: reads the calling thread's priority.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            tx.send(nice).unwrap();
        });
        assert_eq!(rx.recv().unwrap(), 7);
        // SAFETY: as above, on the test's own thread.
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_ne!(own, 7, "the test thread must keep its priority");
    }

    #[tokio::test]
    async fn it_can_be_dropped_inside_another_runtime() {
        let runtime = ReadRuntime::start(1, 0).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            let _ = tx.send(());
        });
        rx.await.unwrap();
        drop(runtime);
    }
}
