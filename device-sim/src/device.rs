//! One simulated device: a sampler task producing batches, the upload loop
//! that gets them durably into the server despite failures, and the control
//! channel through which the server changes its settings or reboots it.
//!
//! The server's committed sequence is the only acknowledgement that counts:
//! a batch leaves the device's buffer when a stream summary or the upload
//! cursor says it is stored, and everything else is resent on the next
//! stream. The server drops batches at or below its cursor, so resending too
//! much is harmless while resending too little loses data.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use telemetry_proto::v1::{GetUploadCursorRequest, ReadingBatch, RejectReason, UploadSummary};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::{debug, warn};

use telemetry_client::backoff::Backoff;
use telemetry_client::status::{is_retryable, retry_delay};

use crate::buffer::UploadBuffer;
use crate::client::{DeviceClient, describe};
use crate::config::Config;
use crate::control::Controller;
use crate::sampling::{Produced, Sampler, run_sampler};
use crate::settings::{DeviceSettings, DeviceShared, Power, power_cycled, powered_up};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Batches queued between an upload stream and the gRPC body; small, so a
/// slow server pushes back on the device instead of buffering in memory.
/// Queued boxed: tokio allocates a channel's slots 32 at a time whatever
/// its bound, and a fleet of 100,000 devices holds one such queue each.
const STREAM_QUEUE: usize = 8;
/// Batches waiting between the sampler and the uploader.
const SAMPLER_QUEUE: usize = 16;
/// How long a closed stream may take to answer before it counts as lost.
const SUMMARY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the last stream may take to answer once shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const CURSOR_TIMEOUT: Duration = Duration::from_secs(10);
/// The latest a device's first batch comes after it starts.
const FIRST_BATCH_SPREAD: Duration = Duration::from_secs(20);

/// How a device's run ended.
#[derive(Debug)]
pub struct DeviceOutcome {
    pub device_id: String,
    /// Why the device gave up, if it did.
    pub failure: Option<String>,
    /// Batches the server never acknowledged (produced or sent).
    pub unacked_batches: usize,
}

/// Runs one device until shutdown or a fatal error.
///
/// The device first waits for a place among the devices connecting at once
/// (`admission`, `--connect-concurrency`); the place is given back once its
/// upload cursor is known and its Control stream has been answered (or
/// either has given up).
pub async fn run_device(
    device_id: String,
    client: DeviceClient,
    config: Arc<Config>,
    stats: Arc<Stats>,
    admission: Arc<Semaphore>,
    mut shutdown: Shutdown,
) -> DeviceOutcome {
    let connecting = tokio::select! {
        permit = admission.acquire_owned() => permit.ok().map(Arc::new),
        () = shutdown.requested() => {
            return DeviceOutcome { device_id, failure: None, unacked_batches: 0 };
        }
    };
    let shared = Arc::new(DeviceShared::new(DeviceSettings::initial(&config)));
    let (produced_tx, produced_rx) = mpsc::channel(SAMPLER_QUEUE);
    let sampler = Sampler::new(
        &device_id,
        config.sensors,
        config.anomaly_rate,
        &shared.settings.borrow(),
    );
    shared.set_battery(sampler.battery_level());
    // Staggered over a batch period, but never past FIRST_BATCH_SPREAD: the
    // server ends a stream whose first batch is late
    // (--upload-first-message-timeout, 30 s by default), and a slow fleet
    // (a batch a minute) would otherwise lose most first streams to it.
    let first_delay = config
        .batch_period()
        .min(FIRST_BATCH_SPREAD)
        .mul_f64(rand::rng().random_range(0.0..1.0));
    let sampler_task = tokio::spawn(run_sampler(
        sampler,
        Arc::clone(&shared),
        first_delay,
        produced_tx,
        Arc::clone(&stats),
        shutdown.clone(),
    ));
    let log_id = device_id.clone();
    let mut control_task = tokio::spawn(
        Controller::new(
            device_id.clone(),
            client.clone(),
            Arc::clone(&shared),
            &config,
            Arc::clone(&stats),
            shutdown.clone(),
        )
        .run(connecting.clone()),
    );

    let mut uploader = Uploader {
        buffer: UploadBuffer::new(config.max_buffered_batches),
        device_id,
        client,
        config,
        stats,
        shutdown,
        produced: produced_rx,
        sampling: true,
        next_sequence: 0,
        backoff: Backoff::default(),
        server_delay: None,
        connected: false,
        warned_rejections: false,
        power: shared.power.subscribe(),
        boot: 0,
        connecting,
    };
    let result = {
        let upload = uploader.run();
        tokio::pin!(upload);
        let mut controlling = true;
        loop {
            tokio::select! {
                result = &mut upload => break result,
                joined = &mut control_task, if controlling => {
                    controlling = false;
                    match joined {
                        // Shutdown, or a server without Control: uploads go
                        // on regardless.
                        Ok(Ok(())) => {}
                        // The control channel found a reason to stop the
                        // whole device (its token is refused).
                        Ok(Err(reason)) => break Err(reason),
                        Err(e) => warn!(device = %log_id, "the control task failed: {e}"),
                    }
                }
            }
        }
    };
    uploader.set_connected(false);
    // After a fatal error these would otherwise run until shutdown.
    control_task.abort();
    sampler_task.abort();

    if let Err(reason) = &result {
        if uploader.stats.claim_failure_warning() {
            warn!(device = %uploader.device_id,
                  "device stopped: {reason} (further failures are listed in the report)");
        } else {
            debug!(device = %uploader.device_id, "device stopped: {reason}");
        }
    }
    DeviceOutcome {
        failure: result.err(),
        unacked_batches: uploader.buffer.len(),
        device_id: uploader.device_id,
    }
}

/// What a failed call means for the device.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CallFailure {
    /// The server or the network is down for now: back off and resume.
    Retryable(String),
    /// Retrying cannot help; the device stops and the report says why.
    Fatal(String),
}

fn classify(status: &Status) -> CallFailure {
    let detail = describe(status);
    match status.code() {
        // Transient codes, and RESOURCE_EXHAUSTED with a retry delay (too
        // many stream opens): the delay is honoured by the backoff.
        _ if is_retryable(status) => CallFailure::Retryable(detail),
        // The connection itself failed (a GOAWAY, say ENHANCE_YOUR_CALM,
        // which tonic reports as RESOURCE_EXHAUSTED): another connection, or
        // the same one reopened, can take the call.
        _ if is_connection_error(status) => CallFailure::Retryable(detail),
        Code::Unauthenticated => CallFailure::Fatal(format!(
            "the server rejected this device's token ({detail}); the credentials file does not \
             match the server's devices: delete it (or the server's data) or use another \
             --device-prefix"
        )),
        Code::InvalidArgument => CallFailure::Fatal(format!(
            "the server refused the upload as invalid ({detail}); this is a device-sim bug or a \
             client/server version mismatch"
        )),
        Code::ResourceExhausted => CallFailure::Fatal(format!(
            "the upload exceeds a server limit ({detail}); lower --batch-size or --sensors, or \
             raise the server's limit"
        )),
        _ => CallFailure::Fatal(format!("unexpected answer from the server ({detail})")),
    }
}

/// Whether `status` comes from the HTTP/2 connection rather than from the
/// server's handler (tonic puts the h2 error in the message).
fn is_connection_error(status: &Status) -> bool {
    status.message().starts_with("h2 protocol error")
}

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

struct Uploader {
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
    async fn run(&mut self) -> Result<(), String> {
        loop {
            match self.run_powered().await {
                Halt::Shutdown => return Ok(()),
                Halt::Fatal(reason) => return Err(reason),
                Halt::Reboot => {
                    self.set_connected(false);
                    self.buffer.forget_handoffs();
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
                Err(CallFailure::Retryable(reason)) => {
                    self.note_transient("UploadReadings", &reason);
                    self.set_connected(false);
                    self.buffer.forget_handoffs();
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

    fn set_connected(&mut self, connected: bool) {
        if connected != self.connected {
            self.connected = connected;
            if connected {
                self.stats.devices_connected.inc();
            } else {
                self.stats.devices_connected.dec();
            }
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
                let delay = self
                    .backoff
                    .next_delay_with(self.server_delay.take(), &mut rand::rng());
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
                    return Ok(response.into_inner().committed_sequence);
                }
                Ok(Err(status)) => match classify(&status) {
                    CallFailure::Retryable(reason) => {
                        self.server_delay = retry_delay(&status);
                        self.set_connected(false);
                        self.note_transient("GetUploadCursor", &reason);
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

    /// One UploadReadings stream: resends every unacknowledged batch, adds
    /// new ones until the stream has carried `batches_per_stream`, closes it
    /// and waits for the summary.
    async fn upload_stream(&mut self) -> Result<StreamEnd, CallFailure> {
        let (tx, rx) = mpsc::channel::<Box<ReadingBatch>>(STREAM_QUEUE);
        let mut client = self.client.clone();
        // Spawned so the request body keeps flowing while this loop waits on
        // the sampler, the queue or the clock.
        let mut call = tokio::spawn(async move {
            let batches = ReceiverStream::new(rx).map(|batch| *batch);
            client.upload_readings(Request::new(batches)).await
        });

        let mut tx = Some(tx);
        let resend_through = self.buffer.last_sequence();
        let mut last_handed = 0u64;
        let mut handed = 0usize;
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut shutting_down = false;

        loop {
            if tx.is_some()
                && handed >= self.config.batches_per_stream
                && last_handed >= resend_through
            {
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
                    return self.finish_stream(result, last_handed, shutting_down);
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
                    self.buffer.forget_handoffs();
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
                    self.buffer.forget_handoffs();
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
        pending.handed_at = Some(Instant::now());
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
        last_handed: u64,
        shutting_down: bool,
    ) -> Result<StreamEnd, CallFailure> {
        let received = Instant::now();
        let summary = match result {
            Ok(response) => response.into_inner(),
            Err(status) => {
                self.buffer.forget_handoffs();
                self.server_delay = retry_delay(&status);
                return match classify(&status) {
                    CallFailure::Retryable(reason) if shutting_down => {
                        debug!(device = %self.device_id,
                               "last upload failed during shutdown ({reason})");
                        Ok(StreamEnd::ShuttingDown)
                    }
                    failure => Err(failure),
                };
            }
        };

        self.set_connected(true);
        let stats = &self.stats;
        stats.batches_committed.add(summary.batches_committed);
        stats.readings_accepted.add(summary.readings_accepted);
        stats.readings_rejected.add(summary.readings_rejected);
        stats.duplicate_batches.add(summary.duplicate_batches);

        let latencies: Vec<u64> = self
            .buffer
            .ack_through(summary.committed_sequence)
            .filter_map(|pending| pending.handed_at)
            .map(|handed_at| {
                u64::try_from(received.saturating_duration_since(handed_at).as_micros())
                    .unwrap_or(u64::MAX)
            })
            .collect();
        self.stats.record_ack_latencies(&latencies);
        self.buffer.forget_handoffs();

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

#[cfg(test)]
mod tests {
    use clap::Parser;
    use tonic::transport::Endpoint;
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;
    use crate::config::Args;
    use crate::mock_server::{GOOD_TOKEN, MockControl, MockIngest, MockOps, serve, serve_on};
    use telemetry_client::bearer::Bearer;
    use telemetry_proto::v1::command::Kind;
    use telemetry_proto::v1::ingest_client::IngestClient;
    use telemetry_proto::v1::{CommandAckState, Reboot, SetSamplingInterval};

    struct Running {
        device: tokio::task::JoinHandle<DeviceOutcome>,
        trigger: crate::shutdown::ShutdownTrigger,
        stats: Arc<Stats>,
    }

    /// Starts one device against `server`, with batches every 10 ms and
    /// streams of 5 to keep tests short.
    fn start_device(server: String, token: &str) -> Running {
        start_device_with(server, token, &[])
    }

    fn start_device_with(server: String, token: &str, extra: &[&str]) -> Running {
        let mut argv = vec![
            "device-sim",
            "--server",
            &server,
            "--sample-rate",
            "1000",
            "--batch-size",
            "10",
            "--batches-per-stream",
            "5",
        ];
        argv.extend_from_slice(extra);
        let config = Config::from_args(Args::try_parse_from(argv).expect("args")).expect("config");
        let channel = Endpoint::from_shared(server)
            .expect("endpoint")
            .connect_lazy();
        let client = IngestClient::with_interceptor(
            telemetry_client::balance::single(channel),
            Bearer::new(token).expect("token"),
        );
        let stats = Arc::new(Stats::new());
        let (trigger, shutdown) = crate::shutdown::channel();
        let device = tokio::spawn(run_device(
            "sim-00001".into(),
            client,
            Arc::new(config),
            Arc::clone(&stats),
            Arc::new(tokio::sync::Semaphore::new(1)),
            shutdown,
        ));
        Running {
            device,
            trigger,
            stats,
        }
    }

    impl Running {
        async fn stop(self) -> (DeviceOutcome, Arc<Stats>) {
            self.trigger.trigger();
            let outcome = tokio::time::timeout(Duration::from_secs(15), self.device)
                .await
                .expect("device stops after shutdown")
                .expect("device task does not panic");
            (outcome, self.stats)
        }
    }

    /// Runs one device against `mock` for `run_for`, then shuts it down.
    async fn run_against(
        mock: MockIngest,
        token: &str,
        run_for: Duration,
    ) -> (DeviceOutcome, Arc<Stats>) {
        let addr = serve(mock).await;
        let running = start_device(format!("http://{addr}"), token);
        tokio::time::sleep(run_for).await;
        running.stop().await
    }

    fn assert_contiguous(stored: &[u64], from: u64) {
        let expected: Vec<u64> = (from..from + stored.len() as u64).collect();
        assert_eq!(
            stored, expected,
            "every batch stored once, in order, no gaps"
        );
    }

    #[tokio::test]
    async fn uploads_and_acknowledges_everything_it_sends() {
        let mock = MockIngest::default();
        let ledger = Arc::clone(&mock.ledger);
        let (outcome, stats) = run_against(mock, GOOD_TOKEN, Duration::from_millis(800)).await;
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);

        let ledger = ledger.lock().expect("ledger");
        assert!(
            ledger.stored.len() > 20,
            "only {} batches",
            ledger.stored.len()
        );
        assert_contiguous(&ledger.stored, 1);
        assert_eq!(ledger.duplicates, 0);
        assert!(ledger.streams > 3);

        assert_eq!(stats.readings_sent.get(), stats.readings_accepted.get());
        assert_eq!(stats.batches_sent.get(), ledger.stored.len() as u64);
        assert_eq!(stats.latency_summary().count, ledger.stored.len() as u64);
        assert_eq!(stats.retries.get(), 0);
        assert_eq!(stats.devices_connected.get(), 0, "disconnected at exit");
    }

    #[tokio::test]
    async fn recovers_from_broken_streams_without_gaps_or_duplicates() {
        let mock = MockIngest {
            break_every: Some(3),
            ..MockIngest::default()
        };
        let ledger = Arc::clone(&mock.ledger);
        let (outcome, stats) = run_against(mock, GOOD_TOKEN, Duration::from_millis(1500)).await;
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);

        let ledger = ledger.lock().expect("ledger");
        assert_contiguous(&ledger.stored, 1);
        assert!(stats.retries.get() > 0);
        assert!(stats.batches_recovered.get() > 0);
        assert!(stats.batches_resent.get() > 0);
        assert_eq!(stats.dropped_batches.get(), 0);
    }

    #[tokio::test]
    async fn connects_once_a_late_server_comes_up() {
        // Reserve a port, free it, and bring the server up there later.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let running = start_device(format!("http://{addr}"), GOOD_TOKEN);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(running.stats.devices_connected.get(), 0);
        assert!(running.stats.retries.get() > 0);

        let mock = MockIngest::default();
        let ledger = Arc::clone(&mock.ledger);
        let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
        tokio::spawn(serve_on(listener, mock, MockOps::default()));
        // Wait for the first stored batch rather than a fixed time: the
        // backoff may be long on a busy machine.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while ledger.lock().expect("ledger").stored.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the device never reached the late server"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (outcome, stats) = running.stop().await;
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
        let ledger = ledger.lock().expect("ledger");
        assert!(!ledger.stored.is_empty());
        assert_contiguous(&ledger.stored, 1);
        assert_eq!(stats.readings_sent.get(), stats.readings_accepted.get());
    }

    #[tokio::test]
    async fn resumes_numbering_after_the_server_cursor() {
        let mock = MockIngest::default();
        mock.ledger.lock().expect("ledger").committed = 100;
        let ledger = Arc::clone(&mock.ledger);
        let (outcome, _) = run_against(mock, GOOD_TOKEN, Duration::from_millis(300)).await;
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
        let ledger = ledger.lock().expect("ledger");
        assert!(!ledger.stored.is_empty());
        assert_contiguous(&ledger.stored, 101);
    }

    #[tokio::test]
    async fn wrong_token_stops_the_device_with_a_reason() {
        let (outcome, stats) =
            run_against(MockIngest::default(), "wrong", Duration::from_millis(300)).await;
        let reason = outcome.failure.expect("device fails");
        assert!(reason.contains("token"), "{reason}");
        assert_eq!(stats.readings_sent.get(), 0);
    }

    /// Readings handed to streams over `window`.
    async fn readings_in_window(stats: &Stats, window: Duration) -> u64 {
        let before = stats.readings_sent.get();
        tokio::time::sleep(window).await;
        stats.readings_sent.get() - before
    }

    #[tokio::test]
    async fn obeys_its_control_stream_and_comes_back_after_a_reboot() {
        let control = MockControl::default();
        let mock = MockIngest {
            control: Some(control.clone()),
            ..MockIngest::default()
        };
        let ledger = Arc::clone(&mock.ledger);
        let addr = serve(mock).await;
        let running = start_device_with(
            format!("http://{addr}"),
            GOOD_TOKEN,
            &["--reboot-delay", "100ms", "--status-interval", "50ms"],
        );
        let stats = Arc::clone(&running.stats);
        let hello = control.next_hello().await;
        assert_eq!(hello.config.expect("config").sampling_interval_ms, 1);

        // 4 sensors, a sample a millisecond: about 4000 readings/s.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let fast = readings_in_window(&stats, Duration::from_millis(300)).await;
        control.command(
            1,
            Kind::SetSamplingInterval(SetSamplingInterval { interval_ms: 10 }),
        );
        let ack = control.next_ack().await;
        assert_eq!(ack.state, i32::from(CommandAckState::Done));
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Now about 400/s.
        let slow = readings_in_window(&stats, Duration::from_millis(300)).await;
        assert!(slow * 4 < fast, "{fast} readings before, {slow} after");

        let stored_before = ledger.lock().expect("ledger").stored.len();
        control.command(2, Kind::Reboot(Reboot {}));
        assert_eq!(control.next_ack().await.detail, "rebooting");
        let hello = control.next_hello().await;
        // Settings survive the reboot.
        assert_eq!(hello.config.expect("config").sampling_interval_ms, 10);
        tokio::time::sleep(Duration::from_millis(400)).await;

        let (outcome, stats) = running.stop().await;
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
        assert_eq!(stats.reboots.get(), 1);
        assert_eq!(stats.commands_done.get(), 2);
        let ledger = ledger.lock().expect("ledger");
        assert!(
            ledger.stored.len() > stored_before,
            "uploads resume after the reboot"
        );
        assert_contiguous(&ledger.stored, 1);
        assert_eq!(stats.devices_connected.get(), 0, "disconnected at exit");
    }

    #[tokio::test]
    async fn a_server_without_control_still_gets_uploads() {
        let mock = MockIngest::default();
        let ledger = Arc::clone(&mock.ledger);
        let (outcome, stats) = run_against(mock, GOOD_TOKEN, Duration::from_millis(300)).await;
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
        assert_eq!(stats.control_unsupported.get(), 1);
        assert!(!ledger.lock().expect("ledger").stored.is_empty());
    }

    #[test]
    fn transient_codes_retry_and_contract_violations_stop() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            assert!(matches!(
                classify(&Status::new(code, "x")),
                CallFailure::Retryable(_)
            ));
        }
        for code in [
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::PermissionDenied,
            Code::Unimplemented,
        ] {
            assert!(matches!(
                classify(&Status::new(code, "x")),
                CallFailure::Fatal(_)
            ));
        }
    }

    #[test]
    fn a_refusal_that_says_when_to_retry_is_retried() {
        // The server's answer to too many stream opens per minute
        // (ingest::grpc::status::stream_rate_exceeded).
        let status = Status::with_error_details(
            Code::ResourceExhausted,
            "this device opens streams faster than the server allows",
            ErrorDetails::with_retry_info(Some(Duration::from_secs(2))),
        );
        assert!(matches!(classify(&status), CallFailure::Retryable(_)));
    }

    #[test]
    fn unauthenticated_tells_the_user_what_to_do() {
        let CallFailure::Fatal(msg) = classify(&Status::unauthenticated("unknown token")) else {
            panic!("must be fatal");
        };
        assert!(msg.contains("credentials file"), "{msg}");
    }
}
