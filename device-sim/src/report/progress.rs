//! The live progress line on stderr, once a second while the fleet runs.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::stats::Stats;

const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// The once-a-second status line on stderr.
pub struct Progress {
    started: Instant,
    devices: u64,
    last_sent: u64,
    last_at: Instant,
    /// On a terminal the line is redrawn in place; elsewhere (a log file)
    /// each update is its own line.
    redraw: bool,
}

impl Progress {
    pub fn new(devices: u64) -> Self {
        let now = Instant::now();
        Self {
            started: now,
            devices,
            last_sent: 0,
            last_at: now,
            redraw: std::io::stderr().is_terminal(),
        }
    }

    pub fn render(&mut self, stats: &Stats) -> String {
        let now = Instant::now();
        let sent = stats.readings_sent.get();
        let window = now.duration_since(self.last_at).as_secs_f64();
        let rate = if window > 0.0 {
            sent.saturating_sub(self.last_sent) as f64 / window
        } else {
            0.0
        };
        self.last_sent = sent;
        self.last_at = now;
        let commands = match stats.commands_received.get() {
            0 => String::new(),
            n => format!(" | commands {n}"),
        };
        format!(
            "[{:>6.0}s] devices {}/{} connected | sent {} ({:.0}/s) | accepted {} | rejected {} | \
             duplicate batches {} | retries {}{commands}",
            now.duration_since(self.started).as_secs_f64(),
            stats.devices_connected.get(),
            self.devices,
            sent,
            rate,
            stats.readings_accepted.get(),
            stats.readings_rejected.get(),
            stats.duplicate_batches.get(),
            stats.retries.get(),
        )
    }

    pub fn print(&mut self, stats: &Stats) {
        let line = self.render(stats);
        let mut stderr = std::io::stderr().lock();
        // Progress output is best effort: a closed stderr must not stop the
        // simulation.
        let _ = if self.redraw {
            write!(stderr, "\r\x1b[2K{line}")
        } else {
            writeln!(stderr, "{line}")
        };
        let _ = stderr.flush();
    }

    /// Shows the final figures and ends the redrawn line so the report
    /// starts on a fresh one. Line-per-update output already has the last
    /// update and needs nothing.
    pub fn finish(&mut self, stats: &Stats) {
        if self.redraw {
            self.print(stats);
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Prints the progress line every [`PROGRESS_INTERVAL`] until told to stop
/// through the sender, then its final figures.
pub fn spawn(
    stats: Arc<Stats>,
    devices: u32,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut progress = Progress::new(u64::from(devices));
        let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
        ticker.tick().await; // The first tick is immediate: nothing to show yet.
        loop {
            tokio::select! {
                _ = ticker.tick() => progress.print(&stats),
                _ = &mut stop_rx => break,
            }
        }
        progress.finish(&stats);
    });
    (stop_tx, task)
}
