//! One simulated device: a sampler task producing batches, the upload loop
//! that gets them durably into the server despite failures, and the control
//! channel through which the server changes its settings or reboots it.

mod access;
mod call_failure;
pub mod client;
mod commands;
mod control;
pub mod sampling;
mod settings;
mod upload_buffer;
mod uploader;

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, warn};

use access::Access;
use client::DeviceClient;
use control::Controller;
use sampling::{Sampler, run_sampler};
use settings::{DeviceSettings, DeviceShared};
use uploader::Uploader;

use crate::config::Config;
use crate::report::Stats;
use crate::shutdown::Shutdown;

/// Batches waiting between the sampler and the uploader.
const SAMPLER_QUEUE: usize = 16;
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
    let access = Arc::new(Access::new(device_id.clone(), Arc::clone(&stats)));
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
    let mut control_task = tokio::spawn(
        Controller::new(
            device_id.clone(),
            client.clone(),
            Arc::clone(&shared),
            &config,
            Arc::clone(&stats),
            Arc::clone(&access),
            shutdown.clone(),
        )
        .run(connecting.clone()),
    );

    let mut uploader = Uploader::new(
        device_id.clone(),
        client,
        config,
        Arc::clone(&stats),
        shutdown,
        produced_rx,
        shared.power.subscribe(),
        connecting,
        access,
    );
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
                        Err(e) => warn!(device = %device_id, "the control task failed: {e}"),
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
        if stats.claim_failure_warning() {
            warn!(device = %device_id,
                  "device stopped: {reason} (further failures are listed in the report)");
        } else {
            debug!(device = %device_id, "device stopped: {reason}");
        }
    }
    DeviceOutcome {
        failure: result.err(),
        unacked_batches: uploader.unacked_batches(),
        device_id,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use clap::Parser;
    use telemetry_proto::v1::command::Kind;
    use telemetry_proto::v1::{CommandAckState, Reboot, SetSamplingInterval};

    use super::client::test_client;
    use super::*;
    use crate::config::Args;
    use crate::server::mock::{
        GOOD_TOKEN, Ledger, MockControl, MockIngest, MockOps, serve, serve_on,
    };

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
        let mut argv = vec!["device-sim", "--server", &server];
        argv.extend_from_slice(&crate::config::FAST_UPLOADS);
        argv.extend_from_slice(extra);
        let config = Config::from_args(Args::try_parse_from(argv).expect("args")).expect("config");
        let client = test_client(server, token);
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

    /// Runs one device with the good token against `mock` for `run_for`,
    /// and finds it did not fail; gives the mock's ledger and the stats.
    async fn run_without_failure(
        mock: MockIngest,
        run_for: Duration,
    ) -> (Arc<Mutex<Ledger>>, Arc<Stats>) {
        let ledger = Arc::clone(&mock.ledger);
        let (outcome, stats) = run_against(mock, GOOD_TOKEN, run_for).await;
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
        (ledger, stats)
    }

    /// Brings a mock server up at `addr`, where a device has been failing
    /// to connect; its ledger.
    async fn late_server(addr: std::net::SocketAddr) -> Arc<Mutex<Ledger>> {
        let mock = MockIngest::default();
        let ledger = Arc::clone(&mock.ledger);
        let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
        tokio::spawn(serve_on(listener, mock, MockOps::default()));
        ledger
    }

    /// Waits until `ledger` has stored `n` batches, polling rather than
    /// guessing a time: the device's backoff may be long on a busy machine.
    async fn wait_stored(ledger: &Mutex<Ledger>, n: usize, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while ledger.lock().expect("ledger").stored.len() < n {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
        let (ledger, stats) = run_without_failure(mock, Duration::from_millis(800)).await;

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
        let (ledger, stats) = run_without_failure(mock, Duration::from_millis(1500)).await;

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
        let (listener, addr) = crate::server::mock::local_listener().await;
        drop(listener);
        let running = start_device(format!("http://{addr}"), GOOD_TOKEN);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(running.stats.devices_connected.get(), 0);
        assert!(running.stats.retries.get() > 0);

        let ledger = late_server(addr).await;
        wait_stored(&ledger, 1, "the device never reached the late server").await;
        let (outcome, stats) = running.stop().await;
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
        let ledger = ledger.lock().expect("ledger");
        assert!(!ledger.stored.is_empty());
        assert_contiguous(&ledger.stored, 1);
        assert_eq!(stats.readings_sent.get(), stats.readings_accepted.get());
    }

    #[tokio::test]
    async fn a_backlog_goes_out_a_stream_of_batches_per_stream_at_a_time() {
        // A server that comes up late finds a backlog of dozens of batches:
        // on one stream, the first would wait for the last's commit.
        let (listener, addr) = crate::server::mock::local_listener().await;
        drop(listener);
        let running = start_device(format!("http://{addr}"), GOOD_TOKEN);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let ledger = late_server(addr).await;
        wait_stored(&ledger, 40, "the backlog never reached the late server").await;
        let (outcome, stats) = running.stop().await;
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
        let ledger = ledger.lock().expect("ledger");
        assert_contiguous(&ledger.stored, 1);
        assert_eq!(
            ledger.largest_stream, 5,
            "no stream carries more than --batches-per-stream (5 here), backlog or not"
        );
        assert_eq!(stats.latency_summary().count, ledger.stored.len() as u64);
    }

    #[tokio::test]
    async fn resumes_numbering_after_the_server_cursor() {
        let mock = MockIngest::default();
        mock.ledger.lock().expect("ledger").committed = 100;
        let (ledger, _) = run_without_failure(mock, Duration::from_millis(300)).await;
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
        let (ledger, stats) = run_without_failure(mock, Duration::from_millis(300)).await;
        assert_eq!(stats.control_unsupported.get(), 1);
        assert!(!ledger.lock().expect("ledger").stored.is_empty());
    }
}
