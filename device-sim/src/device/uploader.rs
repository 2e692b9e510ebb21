//! A device's uploads: batches get durably into the server despite
//! failures.
//!
//! The server's committed sequence is the only acknowledgement that counts:
//! a batch leaves the device's buffer when a stream summary or the upload
//! cursor says it is stored, and everything else is resent on the next
//! stream. The server drops batches at or below its cursor, so resending too
//! much is harmless while resending too little loses data.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use telemetry_client::backoff::Backoff;
use telemetry_client::status::retry_delay;
use telemetry_proto::v1::{GetUploadCursorRequest, ReadingBatch, RejectReason, UploadSummary};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::access::{Access, disabled_backoff};
use super::call_failure::{CallFailure, classify};
use super::client::DeviceClient;
use super::sampling::Produced;
use super::settings::{Power, power_cycled, powered_up};
use super::upload_buffer::UploadBuffer;
use crate::config::Config;
use crate::report::Stats;
use crate::shutdown::Shutdown;

/// Batches queued between an upload stream and the gRPC body; small, so a
/// slow server pushes back on the device instead of buffering in memory.
/// Queued boxed: tokio allocates a channel's slots 32 at a time whatever
/// its bound, and a fleet of 100,000 devices holds one such queue each.
const STREAM_QUEUE: usize = 8;
/// How long a closed stream may take to answer before it counts as lost.
const SUMMARY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the last stream may take to answer once shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const CURSOR_TIMEOUT: Duration = Duration::from_secs(10);

enum StreamEnd {
    /// The summary arrived; open the next stream.
    Acknowledged,
    /// Shutdown was requested and the last stream is settled (or abandoned).
    ShuttingDown,
    /// The device is rebooting; the stream was dropped unsettled.
    Rebooting,
}

/// Why the uploader stopped uploading.
#[derive(Debug)]
enum Halt {
    Shutdown,
    /// The device is rebooting: resume once it is up.
    Reboot,
    Fatal(String),
}

pub struct Uploader {
    device_id: String,
    client: DeviceClient,
    config: Arc<Config>,
    stats: Arc<Stats>,
    shutdown: Shutdown,
    produced: mpsc::Receiver<Produced>,
    /// False once the sampler has stopped.
    sampling: bool,
    buffer: UploadBuffer,
    /// The sequence the next produced batch gets; 0 until the server's
    /// cursor is known, because numbering must continue from it.
    next_sequence: u64,
    backoff: Backoff,
    /// The backoff while an operator has the device disabled: capped
    /// higher, since only a person can end it.
    disabled_backoff: Backoff,
    /// Whether an operator has disabled the device (shared with its
    /// controller).
    access: Arc<Access>,
    /// How long the server asked the device to wait with its last refusal
    /// (RetryInfo); the next backoff waits at least this long.
    server_delay: Option<Duration>,
    connected: bool,
    warned_rejections: bool,
    /// The device's power state, and the boot this uploader runs in.
    power: watch::Receiver<Power>,
    boot: u64,
    /// The device's place among those connecting at once, until its first
    /// cursor is known (shared with its controller).
    connecting: Option<Arc<OwnedSemaphorePermit>>,
}

impl Uploader {
    /// The uploader of a device that has just started: it numbers batches
    /// once the server's cursor is known. `connecting` is given back then.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device_id: String,
        client: DeviceClient,
        config: Arc<Config>,
        stats: Arc<Stats>,
        shutdown: Shutdown,
        produced: mpsc::Receiver<Produced>,
        power: watch::Receiver<Power>,
        connecting: Option<Arc<OwnedSemaphorePermit>>,
        access: Arc<Access>,
    ) -> Self {
        Self {
            buffer: UploadBuffer::new(config.max_buffered_batches),
            device_id,
            client,
            config,
            stats,
            shutdown,
            produced,
            sampling: true,
            next_sequence: 0,
            backoff: Backoff::default(),
            disabled_backoff: disabled_backoff(),
            access,
            server_delay: None,
            connected: false,
            warned_rejections: false,
            power,
            boot: 0,
            connecting,
        }
    }

    /// Batches the server has not acknowledged (produced or sent).
    pub fn unacked_batches(&self) -> usize {
        self.buffer.len()
    }

    /// Uploads until shutdown; `Err` with the reason when the device must
    /// stop.
    pub async fn run(&mut self) -> Result<(), String> {
        loop {
            match self.run_powered().await {
                Halt::Shutdown => return Ok(()),
                Halt::Fatal(reason) => return Err(reason),
                Halt::Reboot => {
                    self.set_connected(false);
                    self.backoff.reset();
                    if !self.wait_for_power().await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Uploads from (re)boot until shutdown, a reboot or a fatal error.
    async fn run_powered(&mut self) -> Halt {
        let fetched = self.fetch_cursor(false).await;
        self.connecting = None;
        let cursor = match fetched {
            Ok(cursor) => cursor,
            Err(halt) => return halt,
        };
        if self.next_sequence == 0 {
            self.next_sequence = cursor.saturating_add(1);
        } else {
            // After a reboot: the dropped stream may have committed some
            // batches.
            self.resume_from(cursor);
        }

        while !self.shutdown.is_requested() {
            match self.upload_stream().await {
                Ok(StreamEnd::Acknowledged) => self.backoff.reset(),
                Ok(StreamEnd::ShuttingDown) => return Halt::Shutdown,
                Ok(StreamEnd::Rebooting) => return Halt::Reboot,
                Err(CallFailure::Fatal(reason)) => return Halt::Fatal(reason),
                Err(failure @ (CallFailure::Retryable(_) | CallFailure::Disabled)) => {
                    match failure {
                        CallFailure::Retryable(reason) => {
                            self.note_transient("UploadReadings", &reason);
                        }
                        _ => self.access.refused(),
                    }
                    self.set_connected(false);
                    // The stream may have committed some batches before it
                    // broke; only the cursor can tell which.
                    match self.fetch_cursor(true).await {
                        Ok(cursor) => self.resume_from(cursor),
                        Err(halt) => return halt,
                    }
                }
            }
        }
        Halt::Shutdown
    }

    /// Waits out a reboot; `false` if shutdown came first.
    async fn wait_for_power(&mut self) -> bool {
        loop {
            tokio::select! {
                boot = powered_up(&mut self.power) => {
                    self.boot = boot;
                    return true;
                }
                () = self.shutdown.requested() => return false,
                // Whatever the sampler produced before the device went down.
                produced = self.produced.recv(), if self.accepting() => self.accept(produced),
            }
        }
    }

    fn accepting(&self) -> bool {
        self.sampling && self.next_sequence > 0
    }

    fn accept(&mut self, produced: Option<Produced>) {
        let Some(produced) = produced else {
            self.sampling = false;
            return;
        };
        let batch = produced.into_batch(self.next_sequence);
        self.next_sequence += 1;
        if let Some(evicted) = self.buffer.push(batch) {
            self.stats.dropped_batches.inc();
            self.stats.dropped_readings.add(evicted.readings);
            debug!(device = %self.device_id, sequence = evicted.sequence(),
                   "buffer full, dropped the oldest unacknowledged batch");
        }
    }

    pub fn set_connected(&mut self, connected: bool) {
        if connected != self.connected {
            self.connected = connected;
            if connected {
                self.stats.devices_connected.inc();
            } else {
                self.stats.devices_connected.dec();
            }
        }
    }

    /// A call got through: the device is (again) allowed in.
    fn admitted(&mut self) {
        if self.access.is_disabled() {
            self.access.admitted();
            self.disabled_backoff.reset();
            self.backoff.reset();
        }
    }

    fn note_transient(&self, call: &str, reason: &str) {
        // One warning per run explains a stalled progress line; after that
        // the retry counter tells the story without flooding the terminal.
        if self.stats.claim_transient_warning() {
            warn!(device = %self.device_id,
                  "{call} failed ({reason}); retrying with backoff \
                   (further connection errors are logged at debug level)");
        } else {
            debug!(device = %self.device_id, "{call} failed ({reason}); retrying");
        }
    }

    /// Runs `fut` while still taking batches from the sampler, unless
    /// shutdown or a reboot comes first.
    async fn while_sampling<F: Future>(&mut self, fut: F) -> Result<F::Output, Halt> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                () = self.shutdown.requested() => return Err(Halt::Shutdown),
                () = power_cycled(&mut self.power, self.boot) => return Err(Halt::Reboot),
                produced = self.produced.recv(), if self.accepting() => self.accept(produced),
            }
        }
    }

    /// Asks the server for the committed sequence until it answers.
    /// `backoff_first` waits before the first attempt (after a failure).
    async fn fetch_cursor(&mut self, backoff_first: bool) -> Result<u64, Halt> {
        let mut wait = backoff_first;
        loop {
            if wait {
                let backoff = if self.access.is_disabled() {
                    &mut self.disabled_backoff
                } else {
                    &mut self.backoff
                };
                let delay = backoff.next_delay_with(self.server_delay.take(), &mut rand::rng());
                self.stats.retries.inc();
                self.while_sampling(tokio::time::sleep(delay)).await?;
            }
            wait = true;

            let mut client = self.client.clone();
            // Boxed: the device's task would otherwise keep room for this
            // call (a few KiB) for as long as it runs.
            let call = Box::pin(async move {
                tokio::time::timeout(
                    CURSOR_TIMEOUT,
                    client.get_upload_cursor(GetUploadCursorRequest {}),
                )
                .await
            });
            match self.while_sampling(call).await? {
                Ok(Ok(response)) => {
                    self.set_connected(true);
                    self.admitted();
                    return Ok(response.into_inner().committed_sequence);
                }
                Ok(Err(status)) => match classify(&status, &self.device_id) {
                    CallFailure::Retryable(reason) => {
                        self.server_delay = retry_delay(&status);
                        self.set_connected(false);
                        self.note_transient("GetUploadCursor", &reason);
                    }
                    CallFailure::Disabled => {
                        self.set_connected(false);
                        self.access.refused();
                    }
                    CallFailure::Fatal(reason) => return Err(Halt::Fatal(reason)),
                },
                Err(_elapsed) => {
                    self.set_connected(false);
                    self.note_transient("GetUploadCursor", "no answer within 10 s");
                }
            }
        }
    }

    /// Drops what the server already has and makes sure new batches number
    /// above its cursor.
    fn resume_from(&mut self, cursor: u64) {
        let recovered = self.buffer.ack_through(cursor).count();
        // Committed, but their stream's summary was lost: the reading counts
        // are unknown, so they are reported apart from accepted readings.
        self.stats.batches_recovered.add(recovered as u64);
        self.check_cursor_ahead(cursor);
    }

    fn check_cursor_ahead(&mut self, committed: u64) {
        if committed >= self.next_sequence {
            warn!(device = %self.device_id, committed, next = self.next_sequence,
                  "the server has batches this device never produced; is another device-sim \
                   using the same credentials?");
            self.next_sequence = committed.saturating_add(1);
        }
    }

    /// One UploadReadings stream: carries the oldest unacknowledged batches,
    /// resends first, until it has carried `batches_per_stream`, closes it
    /// and waits for the summary.
    ///
    /// A backlog (after an outage, or while the server is overloaded) is
    /// spread over streams rather than sent on one: the summary answers a
    /// stream's batches all at once, so a backlog sent on one stream made
    /// its first batch wait for the last one's commit, and the fleet held
    /// its whole backlog inside the server instead of in the devices (batch
    /// ack p99 10.5 s at about twice the saturating rate; 1.2 s spread).
    async fn upload_stream(&mut self) -> Result<StreamEnd, CallFailure> {
        let (tx, rx) = mpsc::channel::<Box<ReadingBatch>>(STREAM_QUEUE);
        let mut client = self.client.clone();
        // When the gRPC body took each batch off the queue to write it to
        // the HTTP/2 stream: its acknowledgement latency starts there, so
        // time spent waiting for a stream to open or for flow control is
        // time the batch waited in the device.
        let written = Arc::new(Mutex::new(Vec::<(u64, Instant)>::new()));
        // Spawned so the request body keeps flowing while this loop waits on
        // the sampler, the queue or the clock.
        let mut call = tokio::spawn({
            let written = written.clone();
            async move {
                let batches = ReceiverStream::new(rx).map(move |batch| {
                    lock(&written).push((batch.sequence, Instant::now()));
                    *batch
                });
                client.upload_readings(Request::new(batches)).await
            }
        });

        let mut tx = Some(tx);
        let mut last_handed = 0u64;
        let mut handed = 0usize;
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut shutting_down = false;

        loop {
            if tx.is_some() && handed >= self.config.batches_per_stream {
                // Dropping the sender ends the request stream; the server
                // answers once everything on it is committed.
                tx = None;
                deadline = Some(tokio::time::Instant::now() + SUMMARY_TIMEOUT);
            }
            let can_send = tx.is_some() && self.buffer.has_after(last_handed);
            // The permit future borrows `tx`, so branches only ask for the
            // stream to be closed and it happens after the select.
            let mut close = false;

            tokio::select! {
                joined = &mut call => {
                    let result = joined.map_err(|e| {
                        CallFailure::Fatal(format!("the upload task failed: {e}"))
                    })?;
                    let written = std::mem::take(&mut *lock(&written));
                    return self.finish_stream(result, &written, last_handed, shutting_down);
                }
                permit = reserve(tx.as_ref()), if can_send => match permit {
                    Ok(permit) => {
                        if let Some(sequence) = self.hand_over(permit, last_handed) {
                            last_handed = sequence;
                            handed += 1;
                        }
                    }
                    // The call has ended and dropped the stream; its result,
                    // coming next, says why.
                    Err(_) => close = true,
                },
                produced = self.produced.recv(), if self.accepting() && !shutting_down => {
                    self.accept(produced);
                }
                () = power_cycled(&mut self.power, self.boot), if !shutting_down => {
                    // A reboot drops the stream unsettled, as a power cut
                    // would; the cursor tells what it committed.
                    call.abort();
                    return Ok(StreamEnd::Rebooting);
                }
                () = self.shutdown.requested(), if !shutting_down => {
                    shutting_down = true;
                    close = true;
                    let grace = tokio::time::Instant::now() + SHUTDOWN_GRACE;
                    deadline = Some(deadline.map_or(grace, |d| d.min(grace)));
                }
                () = sleep_until(deadline) => {
                    call.abort();
                    if shutting_down {
                        warn!(device = %self.device_id,
                              "no upload summary within {} s of shutdown; giving up on it",
                              SHUTDOWN_GRACE.as_secs());
                        return Ok(StreamEnd::ShuttingDown);
                    }
                    return Err(CallFailure::Retryable(format!(
                        "no upload summary within {} s of closing the stream",
                        SUMMARY_TIMEOUT.as_secs()
                    )));
                }
            }
            if close {
                tx = None;
            }
        }
    }

    /// Sends the oldest batch above `last_handed` on the stream; returns its
    /// sequence.
    fn hand_over(
        &mut self,
        permit: mpsc::Permit<'_, Box<ReadingBatch>>,
        last_handed: u64,
    ) -> Option<u64> {
        let pending = self.buffer.next_after(last_handed)?;
        if pending.sent_before {
            self.stats.batches_resent.inc();
            self.stats.readings_resent.add(pending.readings);
        } else {
            pending.sent_before = true;
            self.stats.batches_sent.inc();
            self.stats.readings_sent.add(pending.readings);
        }
        permit.send(Box::new(pending.batch.clone()));
        Some(pending.sequence())
    }

    fn finish_stream(
        &mut self,
        result: Result<Response<UploadSummary>, Status>,
        written: &[(u64, Instant)],
        last_handed: u64,
        shutting_down: bool,
    ) -> Result<StreamEnd, CallFailure> {
        let received = Instant::now();
        let summary = match result {
            Ok(response) => response.into_inner(),
            Err(status) => {
                self.server_delay = retry_delay(&status);
                return match classify(&status, &self.device_id) {
                    CallFailure::Retryable(reason) if shutting_down => {
                        debug!(device = %self.device_id,
                               "last upload failed during shutdown ({reason})");
                        Ok(StreamEnd::ShuttingDown)
                    }
                    CallFailure::Disabled if shutting_down => {
                        self.access.refused();
                        Ok(StreamEnd::ShuttingDown)
                    }
                    failure => Err(failure),
                };
            }
        };

        self.set_connected(true);
        self.admitted();
        let stats = &self.stats;
        stats.batches_committed.add(summary.batches_committed);
        stats.readings_accepted.add(summary.readings_accepted);
        stats.readings_rejected.add(summary.readings_rejected);
        stats.duplicate_batches.add(summary.duplicate_batches);

        self.buffer
            .ack_through(summary.committed_sequence)
            .for_each(drop);
        let latencies: Vec<u64> = written
            .iter()
            .filter(|(sequence, _)| *sequence <= summary.committed_sequence)
            .map(|(_, at)| {
                u64::try_from(received.saturating_duration_since(*at).as_micros())
                    .unwrap_or(u64::MAX)
            })
            .collect();
        self.stats.record_ack_latencies(&latencies);

        if summary.committed_sequence < last_handed {
            warn!(device = %self.device_id, committed = summary.committed_sequence,
                  last_sent = last_handed,
                  "the server acknowledged the stream without committing all of it; \
                   resending the rest");
        }
        self.check_cursor_ahead(summary.committed_sequence);
        self.warn_rejections_once(&summary);

        Ok(if shutting_down {
            StreamEnd::ShuttingDown
        } else {
            StreamEnd::Acknowledged
        })
    }

    fn warn_rejections_once(&mut self, summary: &UploadSummary) {
        if summary.readings_rejected == 0 || self.warned_rejections {
            return;
        }
        self.warned_rejections = true;
        let reasons: Vec<String> = summary
            .rejections
            .iter()
            .map(|r| {
                let reason = RejectReason::try_from(r.reason).map_or_else(
                    |_| format!("reason {}", r.reason),
                    |r| r.as_str_name().into(),
                );
                format!("{reason} x{}", r.count)
            })
            .collect();
        warn!(device = %self.device_id, rejected = summary.readings_rejected,
              reasons = %reasons.join(", "),
              "the server rejected readings (later rejections are only counted)");
    }
}

/// A send slot on the stream, or never when the stream is closed (`select!`
/// builds every branch's future even when its guard is false).
async fn reserve(
    tx: Option<&mpsc::Sender<Box<ReadingBatch>>>,
) -> Result<mpsc::Permit<'_, Box<ReadingBatch>>, mpsc::error::SendError<()>> {
    match tx {
        Some(tx) => tx.reserve().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The written-times list; a panic elsewhere cannot leave it half-updated,
/// so a poisoned lock is taken as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
