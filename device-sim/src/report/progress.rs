//! The live progress line on stderr, once a second while the fleet runs.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::stats::Stats;

const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// The line is redrawn in place with `\r`: wider than the terminal, it
/// wraps and each redraw leaves a smear of the last one.
pub const MAX_WIDTH: usize = 80;

/// What the progress line shows.
#[derive(Debug, Default)]
struct Figures {
    connected: u64,
    devices: u64,
    sent: u64,
    /// Readings sent per second over the last interval.
    rate: f64,
    accepted: u64,
    /// Devices an operator has disabled right now.
    disabled: u64,
    rejected: u64,
    duplicate_batches: u64,
    retries: u64,
    commands: u64,
}

/// The progress line, at most [`MAX_WIDTH`] characters: figures rounded to
/// three digits with a unit, counters that are still zero left out, and the
/// least important ones dropped when the line is full (the final report
/// has them all, exactly).
fn line(elapsed: Duration, f: &Figures) -> String {
    let mut out = format!(
        "[{:>6}] {}/{} connected  sent {} {}/s  accepted {}",
        clock(elapsed),
        si(f.connected as f64),
        si(f.devices as f64),
        si(f.sent as f64),
        si(f.rate),
        si(f.accepted as f64),
    );
    // Most important first: a field that does not fit is left out, a later
    // shorter one may still fit.
    let optional = [
        ("disabled", f.disabled),
        ("rejected", f.rejected),
        ("retries", f.retries),
        ("dup batches", f.duplicate_batches),
        ("commands", f.commands),
    ];
    for (name, value) in optional {
        if value == 0 {
            continue;
        }
        let field = format!("  {name} {}", si(value as f64));
        if out.len() + field.len() <= MAX_WIDTH {
            out.push_str(&field);
        }
    }
    out
}

/// `42s`, `5m03s`, `2h07m`: the run's age in at most 7 characters for
/// runs under 10,000 hours.
fn clock(elapsed: Duration) -> String {
    let s = elapsed.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// A count rounded to three significant digits with an SI unit: `987`,
/// `12.3k`, `4.56M`, `1.20G`.
fn si(n: f64) -> String {
    const UNITS: [&str; 5] = ["", "k", "M", "G", "T"];
    let mut value = n.max(0.0);
    let mut unit = 0;
    // 999.5 would print as "1000": move to the next unit before that.
    while value >= 999.5 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    let digits = match (unit, value) {
        (0, _) => 0,
        (_, v) if v < 9.995 => 2,
        (_, v) if v < 99.95 => 1,
        _ => 0,
    };
    format!("{value:.digits$}{}", UNITS[unit])
}

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
        line(
            now.duration_since(self.started),
            &Figures {
                connected: stats.devices_connected.get(),
                devices: self.devices,
                sent,
                rate,
                accepted: stats.readings_accepted.get(),
                disabled: stats.devices_disabled.get(),
                rejected: stats.readings_rejected.get(),
                duplicate_batches: stats.duplicate_batches.get(),
                retries: stats.retries.get(),
                commands: stats.commands_received.get(),
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_rounded_to_three_digits() {
        let cases = [
            (0.0, "0"),
            (987.0, "987"),
            (999.4, "999"),
            (999.6, "1.00k"),
            (1_234.0, "1.23k"),
            (12_345.0, "12.3k"),
            (123_456.0, "123k"),
            (9_999_999.0, "10.0M"),
            (10_000_000.0, "10.0M"),
            (4.2e12, "4.20T"),
        ];
        for (n, text) in cases {
            assert_eq!(si(n), text, "{n}");
        }
        assert_eq!(clock(Duration::from_secs(42)), "42s");
        assert_eq!(clock(Duration::from_secs(303)), "5m03s");
        assert_eq!(clock(Duration::from_secs(7_620)), "2h07m");
    }

    #[test]
    fn the_line_fits_80_columns_with_large_figures() {
        let large = Figures {
            connected: 99_999,
            devices: 100_000,
            sent: 10_000_000,
            rate: 1_234_567.0,
            accepted: 9_999_000,
            disabled: 0,
            rejected: 123_456,
            duplicate_batches: 45_678,
            retries: 987_654,
            commands: 100_000,
        };
        for elapsed in [0, 59, 3_599, 359_999, 35_999_999] {
            let text = line(Duration::from_secs(elapsed), &large);
            assert!(text.len() <= MAX_WIDTH, "{} columns: {text}", text.len());
            for field in [
                "100k/100k connected",
                "sent 10.0M 1.23M/s",
                "accepted 10.0M",
            ] {
                assert!(text.contains(field), "{text}");
            }
        }
        assert_eq!(
            line(Duration::from_secs(3_599), &large),
            "[59m59s] 100k/100k connected  sent 10.0M 1.23M/s  accepted 10.0M  rejected 123k"
        );
    }

    #[test]
    fn counters_that_are_zero_are_left_out() {
        let quiet = Figures {
            connected: 3,
            devices: 3,
            sent: 1_200,
            rate: 600.0,
            accepted: 1_200,
            commands: 2,
            ..Figures::default()
        };
        assert_eq!(
            line(Duration::from_secs(2), &quiet),
            "[    2s] 3/3 connected  sent 1.20k 600/s  accepted 1.20k  commands 2"
        );
    }
}
