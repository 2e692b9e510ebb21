//! A device's control channel: it holds an `Ingest.Control` stream open,
//! introduces itself with a `DeviceHello`, reports its status periodically,
//! and hands the commands the server sends down to [`super::commands`],
//! acknowledging each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use telemetry_client::backoff::Backoff;
use telemetry_client::status::retry_delay;
use telemetry_proto::v1::{
    CommandAck, DeviceHello, DeviceMessage, DeviceStatus, ServerMessage, device_message,
    server_message,
};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, Streaming};
use tracing::{debug, info, warn};

use super::access::{Access, disabled_backoff};
use super::call_failure::{is_disabled, token_refused};
use super::client::{DeviceClient, describe};
use super::commands::{CAPABILITIES, Commands};
use super::sampling::device_seed;
use super::settings::DeviceShared;
use crate::config::Config;
use crate::report::Stats;
use crate::shutdown::Shutdown;

pub const FIRMWARE_VERSION: &str = "sim-1.0";
/// Messages queued for the request body of a Control stream, boxed: tokio
/// allocates a channel's slots 32 at a time whatever its bound, and 32
/// inline messages cost every device over 2 KiB for a queue that is nearly
/// always empty.
const CONTROL_QUEUE: usize = 16;
/// How long the server may take to accept a Control stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a message may wait for room on the stream before the stream
/// counts as stuck.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream that stayed up this long was healthy: the next failure backs
/// off from the start again. A stream that keeps being ended at once (say,
/// superseded by another process using the same token) backs off further
/// each time.
const STABLE_STREAM: Duration = Duration::from_secs(10);

/// A stream the server ended for rebalancing is reopened within this
/// (uniformly spread), so the devices of one server process do not all
/// reconnect in the same instant.
const REBALANCE_JITTER: Duration = Duration::from_millis(200);

/// Why a Control stream ended.
#[derive(Debug)]
enum StreamEnd {
    Shutdown,
    /// A reboot command was acknowledged; the stream is half-closed and
    /// handed over so the acknowledgement can drain.
    Reboot(Box<Streaming<ServerMessage>>),
    /// The server or the network failed; reconnect with backoff.
    Retry(String),
    /// The server ended a healthy stream (UNAVAILABLE "rebalance...") so
    /// that the device reconnects, possibly to another server process:
    /// reconnect at once, it is no failure.
    Rebalance,
    /// The server has no Control call.
    Unimplemented(String),
    /// An operator disabled the device: retry, with a longer backoff, until
    /// enabled again.
    Disabled,
    /// Retrying cannot help; the device stops.
    Fatal(String),
}

pub struct Controller {
    device_id: String,
    client: DeviceClient,
    shared: Arc<DeviceShared>,
    stats: Arc<Stats>,
    shutdown: Shutdown,
    status_interval: Duration,
    reboot_delay: Duration,
    /// Survives reboots, as if kept in flash: a reboot command whose
    /// acknowledgement was lost must not reboot the device again when it is
    /// redelivered.
    commands: Commands,
    booted: Instant,
    backoff: Backoff,
    /// The backoff while an operator has the device disabled.
    disabled_backoff: Backoff,
    /// Whether an operator has disabled the device (shared with its
    /// uploader).
    access: Arc<Access>,
    /// How long the server asked the device to wait with its last refusal
    /// (RetryInfo, when it opens streams too fast).
    server_delay: Option<Duration>,
    /// The device's typical received signal strength, in dBm.
    signal_dbm: i32,
}

impl Controller {
    pub fn new(
        device_id: String,
        client: DeviceClient,
        shared: Arc<DeviceShared>,
        config: &Config,
        stats: Arc<Stats>,
        access: Arc<Access>,
        shutdown: Shutdown,
    ) -> Self {
        // Some devices sit near the gateway, others at the edge of range.
        let signal_dbm = -85 + (device_seed(&device_id) % 31) as i32;
        Self {
            commands: Commands::new(
                device_id.clone(),
                Arc::clone(&shared),
                Arc::clone(&stats),
                config.sensors,
            ),
            device_id,
            client,
            shared,
            stats,
            shutdown,
            status_interval: config.status_interval,
            reboot_delay: config.reboot_delay,
            booted: Instant::now(),
            backoff: Backoff::default(),
            disabled_backoff: disabled_backoff(),
            access,
            server_delay: None,
            signal_dbm,
        }
    }

    /// Holds the Control stream open until shutdown. `Err` when the device
    /// must stop (its token is refused); `Ok` on shutdown, and when the
    /// server has no Control call (the device goes on uploading without
    /// one).
    ///
    /// `connecting` is the device's place among those connecting at once:
    /// given back when the first stream has been answered, either way.
    pub async fn run(
        mut self,
        connecting: Option<Arc<OwnedSemaphorePermit>>,
    ) -> Result<(), String> {
        let mut connecting = connecting;
        loop {
            let opened = Instant::now();
            let end = self.stream(&mut connecting).await;
            connecting = None;
            match end {
                StreamEnd::Shutdown => return Ok(()),
                StreamEnd::Fatal(reason) => return Err(reason),
                StreamEnd::Unimplemented(detail) => {
                    self.stats.control_unsupported.inc();
                    if self.stats.claim_unsupported_warning() {
                        warn!(device = %self.device_id,
                              "the server does not implement Ingest.Control ({detail}); devices \
                               upload without a control channel");
                    } else {
                        debug!(device = %self.device_id, "no Ingest.Control on the server");
                    }
                    return Ok(());
                }
                StreamEnd::Reboot(inbound) => {
                    if !self.reboot(inbound).await {
                        return Ok(());
                    }
                }
                StreamEnd::Rebalance => {
                    debug!(device = %self.device_id, "control stream rebalanced; reconnecting");
                    self.stats.control_rebalances.inc();
                    self.backoff.reset();
                    let delay = REBALANCE_JITTER.mul_f64(rand::rng().random_range(0.0..=1.0));
                    if !self.wait(delay).await {
                        return Ok(());
                    }
                }
                StreamEnd::Disabled => {
                    // Said once by `Access`, whichever task saw it first.
                    self.access.refused();
                    let delay = self
                        .disabled_backoff
                        .next_delay_with(self.server_delay.take(), &mut rand::rng());
                    if !self.wait(delay).await {
                        return Ok(());
                    }
                }
                StreamEnd::Retry(reason) => {
                    if opened.elapsed() >= STABLE_STREAM {
                        self.backoff.reset();
                    }
                    self.note_failure(&reason);
                    self.stats.control_reconnects.inc();
                    let delay = self
                        .backoff
                        .next_delay_with(self.server_delay.take(), &mut rand::rng());
                    if !self.wait(delay).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Waits `delay` before the next stream; `false` if shutdown came first.
    async fn wait(&mut self, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = self.shutdown.requested() => false,
        }
    }

    fn note_failure(&self, reason: &str) {
        if self.stats.claim_transient_warning() {
            warn!(device = %self.device_id,
                  "Control failed ({reason}); reconnecting with backoff \
                   (further connection errors are logged at debug level)");
        } else {
            debug!(device = %self.device_id, "Control failed ({reason}); reconnecting");
        }
    }

    /// One Control stream, from Hello to its end.
    async fn stream(&mut self, connecting: &mut Option<Arc<OwnedSemaphorePermit>>) -> StreamEnd {
        let (tx, rx) = mpsc::channel::<Box<DeviceMessage>>(CONTROL_QUEUE);
        if tx.try_send(Box::new(self.hello())).is_err() {
            unreachable!("a new queue has room for the hello");
        }
        let mut client = self.client.clone();
        // Boxed: the controller's task would otherwise keep room for the
        // opening call for as long as the stream lasts.
        let open = Box::pin(tokio::time::timeout(OPEN_TIMEOUT, async move {
            let messages = ReceiverStream::new(rx).map(|message| *message);
            client.control(Request::new(messages)).await
        }));
        let opened = tokio::select! {
            opened = open => opened,
            () = self.shutdown.requested() => return StreamEnd::Shutdown,
        };
        let mut inbound = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return self.classify(&status),
            Err(_elapsed) => {
                return StreamEnd::Retry(format!("no answer within {} s", OPEN_TIMEOUT.as_secs()));
            }
        };
        debug!(device = %self.device_id, "control stream open");
        *connecting = None;
        self.access.admitted();
        self.disabled_backoff.reset();

        // The first status goes out right after the hello.
        let mut status_ticker = tokio::time::interval(self.status_interval);
        status_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let outgoing = tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(ServerMessage {
                        msg: Some(server_message::Msg::Command(command)),
                    })) => {
                        let outcome = self.commands.handle(command);
                        if let Err(end) = self.send(&tx, ack_message(outcome.ack)).await {
                            return end;
                        }
                        if outcome.reboot {
                            // Closing the request side lets the
                            // acknowledgement reach the server before the
                            // stream goes.
                            drop(tx);
                            return StreamEnd::Reboot(Box::new(inbound));
                        }
                        continue;
                    }
                    // A kind of message this firmware does not know.
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        return StreamEnd::Retry("the server ended the control stream".into());
                    }
                    Err(status) => return self.classify(&status),
                },
                _ = status_ticker.tick() => self.status(),
                () = self.shutdown.requested() => return StreamEnd::Shutdown,
            };
            if let Err(end) = self.send(&tx, outgoing).await {
                return end;
            }
        }
    }

    /// Queues `message` on the stream. A stream whose call has ended is not
    /// an error here: the response side reports why it ended.
    async fn send(
        &mut self,
        tx: &mpsc::Sender<Box<DeviceMessage>>,
        message: DeviceMessage,
    ) -> Result<(), StreamEnd> {
        tokio::select! {
            sent = tokio::time::timeout(SEND_TIMEOUT, tx.send(Box::new(message))) => match sent {
                Ok(_) => Ok(()),
                Err(_elapsed) => Err(StreamEnd::Retry(format!(
                    "the server has not read the control stream for {} s",
                    SEND_TIMEOUT.as_secs()
                ))),
            },
            () = self.shutdown.requested() => Err(StreamEnd::Shutdown),
        }
    }

    fn classify(&mut self, status: &Status) -> StreamEnd {
        let detail = describe(status);
        self.server_delay = retry_delay(status);
        match status.code() {
            Code::Unavailable if status.message().starts_with("rebalance") => StreamEnd::Rebalance,
            Code::Unauthenticated if is_disabled(status) => StreamEnd::Disabled,
            Code::Unauthenticated => StreamEnd::Fatal(token_refused(&self.device_id, &detail)),
            Code::Unimplemented => StreamEnd::Unimplemented(detail),
            // UNAVAILABLE and transport errors, ABORTED when another stream
            // of this device superseded this one, and anything unexpected:
            // the channel matters, so keep trying, with backoff.
            _ => StreamEnd::Retry(detail),
        }
    }

    /// Goes down for the reboot delay: the uploader and the sampler stop
    /// until the device is up again. Lets the acknowledgement of the reboot
    /// drain meanwhile. `false` if shutdown came first.
    async fn reboot(&mut self, mut inbound: Box<Streaming<ServerMessage>>) -> bool {
        self.stats.reboots.inc();
        info!(device = %self.device_id, "rebooting");
        self.shared.power.send_modify(|power| {
            power.boot += 1;
            power.up = false;
        });
        let back_up = tokio::time::sleep(self.reboot_delay);
        tokio::pin!(back_up);
        // Commands arriving meanwhile go unacknowledged; the server sends
        // them again after the reconnect.
        let mut draining = true;
        loop {
            tokio::select! {
                () = &mut back_up => break,
                () = self.shutdown.requested() => return false,
                message = inbound.message(), if draining => {
                    draining = matches!(message, Ok(Some(_)));
                }
            }
        }
        drop(inbound);
        self.booted = Instant::now();
        self.backoff.reset();
        self.shared.power.send_modify(|power| power.up = true);
        true
    }

    fn hello(&self) -> DeviceMessage {
        DeviceMessage {
            msg: Some(device_message::Msg::Hello(DeviceHello {
                firmware_version: FIRMWARE_VERSION.into(),
                capabilities: CAPABILITIES.iter().map(|&c| c.to_owned()).collect(),
                config: Some(self.shared.settings.borrow().to_proto()),
            })),
        }
    }

    fn status(&self) -> DeviceMessage {
        let signal = self.signal_dbm + rand::rng().random_range(-5..=5);
        DeviceMessage {
            msg: Some(device_message::Msg::Status(DeviceStatus {
                battery_percent: self.shared.battery(),
                uptime_seconds: self.booted.elapsed().as_secs(),
                signal_dbm: Some(signal.clamp(-90, -50)),
            })),
        }
    }
}

fn ack_message(ack: CommandAck) -> DeviceMessage {
    DeviceMessage {
        msg: Some(device_message::Msg::Ack(ack)),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use telemetry_proto::v1::command::Kind;
    use telemetry_proto::v1::{
        CommandAckState, CustomCommand, Ping, Reboot, SetBatchSize, SetSamplingInterval,
        SetSensorEnabled,
    };
    use tokio::task::JoinHandle;

    use super::*;
    use crate::config::Args;
    use crate::device::client::test_client;
    use crate::device::settings::{DeviceSettings, Power};
    use crate::server::mock::{GOOD_TOKEN, MockControl, MockIngest, serve};
    use crate::shutdown::ShutdownTrigger;

    struct Harness {
        control: MockControl,
        shared: Arc<DeviceShared>,
        stats: Arc<Stats>,
        trigger: ShutdownTrigger,
        task: JoinHandle<Result<(), String>>,
    }

    /// A controller for a device sampling every 100 ms in batches of 10,
    /// reporting status every 50 ms and rebooting in 50 ms.
    async fn start(mock: MockIngest, token: &str) -> Harness {
        let control = mock.control.clone().unwrap_or_default();
        let addr = serve(mock).await;
        let server = format!("http://{addr}");
        let argv = [
            "device-sim",
            "--server",
            &server,
            "--sample-rate",
            "10",
            "--batch-size",
            "10",
            "--status-interval",
            "50ms",
            "--reboot-delay",
            "50ms",
        ];
        let config = Config::from_args(Args::try_parse_from(argv).expect("args")).expect("config");
        let client = test_client(server, token);
        let shared = Arc::new(DeviceShared::new(DeviceSettings::initial(&config)));
        let stats = Arc::new(Stats::new());
        let (trigger, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(
            Controller::new(
                "sim-00001".into(),
                client,
                Arc::clone(&shared),
                &config,
                Arc::clone(&stats),
                Arc::new(crate::device::access::Access::new(
                    "sim-00001".into(),
                    Arc::clone(&stats),
                )),
                shutdown,
            )
            .run(None),
        );
        Harness {
            control,
            shared,
            stats,
            trigger,
            task,
        }
    }

    async fn start_controlled() -> Harness {
        start(
            MockIngest {
                control: Some(MockControl::default()),
                ..MockIngest::default()
            },
            GOOD_TOKEN,
        )
        .await
    }

    /// A controlled device whose first hello the server has read: ready
    /// for commands.
    async fn start_greeted() -> Harness {
        let h = start_controlled().await;
        h.control.next_hello().await;
        h
    }

    impl Harness {
        async fn stop(self) -> Result<(), String> {
            self.trigger.trigger();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("the controller stops after shutdown")
                .expect("the controller does not panic")
        }

        async fn ack(&self, id: u64, kind: Kind) -> CommandAck {
            self.control.command(id, kind);
            self.control.next_ack().await
        }
    }

    fn done(command_id: u64, detail: &str) -> CommandAck {
        CommandAck {
            command_id,
            state: CommandAckState::Done.into(),
            detail: detail.into(),
        }
    }

    fn interval(interval_ms: u32) -> Kind {
        Kind::SetSamplingInterval(SetSamplingInterval { interval_ms })
    }

    #[tokio::test]
    async fn obeys_each_command_once_and_acknowledges_repeats() {
        let h = start_controlled().await;
        h.shared.set_battery(Some(81.5));

        let hello = h.control.next_hello().await;
        assert_eq!(hello.firmware_version, "sim-1.0");
        assert_eq!(hello.capabilities, CAPABILITIES);
        let config = hello.config.expect("config");
        assert_eq!(config.sampling_interval_ms, 100);
        assert_eq!(config.batch_size, 10);
        assert!(config.disabled_sensors.is_empty());

        let first = h.ack(1, interval(500)).await;
        assert_eq!(first, done(1, "interval 500 ms"));
        assert_eq!(
            h.shared.settings.borrow().interval,
            Duration::from_millis(500)
        );
        assert_eq!(h.ack(2, Kind::Ping(Ping {})).await, done(2, "pong"));
        // Redelivered after a reconnect (here with other arguments, which
        // would show if it were applied again): the same ack, not applied.
        assert_eq!(h.ack(1, interval(20)).await, first);
        assert_eq!(
            h.shared.settings.borrow().interval,
            Duration::from_millis(500)
        );
        assert_eq!(h.stats.commands_received.get(), 3);
        assert_eq!(h.stats.commands_done.get(), 2);
        assert_eq!(h.stats.commands_repeated.get(), 1);
        assert_eq!(h.stats.commands_failed.get(), 0);

        let status = loop {
            if let device_message::Msg::Status(status) = h.control.next().await {
                break status;
            }
        };
        assert_eq!(status.battery_percent, Some(81.5));
        assert!(status.uptime_seconds < 5);
        assert!((-90..=-50).contains(&status.signal_dbm.expect("signal")));
        assert_eq!(h.control.streams(), 1);
        assert_eq!(h.stop().await, Ok(()));
    }

    #[tokio::test]
    async fn refuses_what_it_cannot_do_and_applies_the_rest() {
        let h = start_greeted().await;
        let failed = |ack: CommandAck, needle: &str| {
            assert_eq!(ack.state, i32::from(CommandAckState::Failed), "{ack:?}");
            assert!(ack.detail.contains(needle), "{ack:?}");
        };
        failed(h.ack(1, interval(5)).await, "out of range");
        failed(h.ack(2, interval(3_600_001)).await, "out of range");
        failed(
            h.ack(3, Kind::SetBatchSize(SetBatchSize { batch_size: 0 }))
                .await,
            "at least 1",
        );
        let disable = |sensor: &str| {
            Kind::SetSensorEnabled(SetSensorEnabled {
                sensor: sensor.into(),
                enabled: false,
            })
        };
        failed(h.ack(4, disable("nope")).await, "unknown sensor");
        let custom = |json: &str| Kind::Custom(CustomCommand { json: json.into() });
        failed(h.ack(5, custom("{nope")).await, "not valid JSON");
        assert_eq!(h.stats.commands_failed.get(), 5);
        assert_eq!(
            *h.shared.settings.borrow(),
            DeviceSettings {
                interval: Duration::from_millis(100),
                batch_size: 10,
                disabled: Default::default(),
            },
            "failed commands change nothing"
        );

        assert_eq!(
            h.ack(6, custom(r#"{"led":"blink"}"#)).await,
            done(6, "custom command received (15 bytes of JSON)")
        );
        assert_eq!(
            h.ack(7, disable("humidity")).await,
            done(7, "humidity disabled")
        );
        assert_eq!(
            h.ack(8, Kind::SetBatchSize(SetBatchSize { batch_size: 25 }))
                .await,
            done(8, "batch size 25")
        );
        {
            let settings = h.shared.settings.borrow();
            assert_eq!(settings.batch_size, 25);
            assert!(settings.disabled.contains("humidity"));
        }
        assert_eq!(h.stats.commands_done.get(), 3);

        // A reconnect introduces the device with its current settings.
        h.control.send(Err(Status::aborted("superseded")));
        let config = h.control.next_hello().await.config.expect("config");
        assert_eq!(config.batch_size, 25);
        assert_eq!(config.disabled_sensors, ["humidity"]);
        assert_eq!(h.stats.control_reconnects.get(), 1);
        assert_eq!(h.stop().await, Ok(()));
    }

    #[tokio::test]
    async fn a_rebalanced_stream_reconnects_at_once_and_is_no_failure() {
        let h = start_greeted().await;
        // What a server sends when a Control stream reached its lifetime.
        h.control.send(Err(Status::unavailable(
            "rebalance: reconnect, possibly to another server",
        )));
        let ended = Instant::now();
        h.control.next_hello().await;
        // No backoff: within the jitter, plus a generous margin for a busy
        // machine.
        assert!(ended.elapsed() < REBALANCE_JITTER + Duration::from_secs(2));
        assert_eq!(h.stats.control_rebalances.get(), 1);
        assert_eq!(h.stats.control_reconnects.get(), 0, "not a failure");
        assert_eq!(h.control.streams(), 2);
        // The new stream carries commands as the old one did.
        assert_eq!(h.ack(1, Kind::Ping(Ping {})).await, done(1, "pong"));

        // UNAVAILABLE without "rebalance" is a failure, as before.
        h.control.send(Err(Status::unavailable("shutting down")));
        h.control.next_hello().await;
        assert_eq!(h.stats.control_reconnects.get(), 1);
        assert_eq!(h.stats.control_rebalances.get(), 1);
        assert_eq!(h.stop().await, Ok(()));
    }

    #[tokio::test]
    async fn reboots_once_even_when_the_command_comes_again() {
        let h = start_greeted().await;
        let mut power = h.shared.power.subscribe();
        assert_eq!(
            h.ack(9, Kind::Reboot(Reboot {})).await,
            done(9, "rebooting")
        );
        // Down, then up again with a new boot number, then a new hello.
        tokio::time::timeout(Duration::from_secs(5), power.wait_for(|p| !p.up))
            .await
            .expect("goes down")
            .expect("power state");
        h.control.next_hello().await;
        assert_eq!(*h.shared.power.borrow(), Power { boot: 1, up: true });
        assert_eq!(h.control.streams(), 2);
        assert_eq!(h.stats.reboots.get(), 1);

        // The server did not get the ack and sends the reboot again.
        assert_eq!(
            h.ack(9, Kind::Reboot(Reboot {})).await,
            done(9, "rebooting")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(h.stats.reboots.get(), 1);
        assert_eq!(h.control.streams(), 2);
        assert_eq!(h.stats.control_reconnects.get(), 0);
        assert_eq!(h.stop().await, Ok(()));
    }

    #[tokio::test]
    async fn a_rejected_token_stops_the_device() {
        let h = start(
            MockIngest {
                control: Some(MockControl::default()),
                ..MockIngest::default()
            },
            "wrong",
        )
        .await;
        let result = tokio::time::timeout(Duration::from_secs(5), h.task)
            .await
            .expect("gives up at once")
            .expect("no panic");
        let reason = result.expect_err("fatal");
        assert!(reason.contains("token"), "{reason}");
    }

    #[tokio::test]
    async fn an_older_server_without_control_stops_only_the_control_task() {
        let h = start(MockIngest::default(), GOOD_TOKEN).await;
        let result = tokio::time::timeout(Duration::from_secs(5), h.task)
            .await
            .expect("gives up at once")
            .expect("no panic");
        assert_eq!(result, Ok(()));
        assert_eq!(h.stats.control_unsupported.get(), 1);
        assert_eq!(h.stats.control_reconnects.get(), 0);
    }
}
