//! Device commands through every kill. An operator sends a Ping to a few
//! devices every tick, through any server, and each of those devices holds
//! its Control stream, reconnecting after a kill (to the next server, with
//! several) and acknowledging whatever arrives. A command SendCommand
//! answered is durably queued: it must end ACKED, having reached its device,
//! perhaps more than once but always with the same id.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ingest_client::IngestClient;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Far beyond any trial: an expired command would look like a lost one.
const TTL: Duration = Duration::from_secs(600);

type Ingest = IngestClient<InterceptedService<Channel, Bearer>>;

/// What one device's Control streams delivered.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub device: String,
    /// Times each command id arrived; more than once is a redelivery.
    pub ids: BTreeMap<u64, u32>,
    /// Control streams opened, the first included.
    pub streams: u64,
}

/// What the operator was told.
#[derive(Debug, Default, Clone)]
pub struct Sent {
    /// (device, command id) of every SendCommand answered OK: the promises.
    pub answered: Vec<(String, u64)>,
    /// Calls that failed (a server down, the queue full): no promise was
    /// made, and the next tick sends a new command.
    pub failed: u64,
}

/// The commanded devices' tasks and the operator's.
pub struct Tasks {
    pub devices: Vec<JoinHandle<Received>>,
    pub sender: JoinHandle<Sent>,
    /// Stops the sender alone: the devices keep acknowledging, so the
    /// trial can wait for a fixed set of promises to be kept.
    pub stop_sender: watch::Sender<bool>,
}

/// How the commanded devices hear their commands.
pub enum Via {
    /// A gRPC Control stream.
    Control,
    /// MQTT, on these servers' MQTT listeners.
    Mqtt(Vec<std::net::SocketAddr>),
}

/// Starts a task per (device id, token), holding its Control stream (or
/// MQTT session) until `stop`, and the sender, commanding them until
/// `Tasks::stop_sender`.
pub fn spawn(
    devices: Vec<(String, String)>,
    via: Via,
    urls: &[String],
    ops_token: &str,
    seed: u64,
    stop: &watch::Receiver<bool>,
) -> Tasks {
    let ids: Vec<String> = devices.iter().map(|(id, _)| id.clone()).collect();
    let devices = devices
        .into_iter()
        .enumerate()
        .map(|(d, (id, token))| match &via {
            Via::Control => tokio::spawn(run_device(id, token, urls.to_vec(), d, stop.clone())),
            Via::Mqtt(addrs) => tokio::spawn(super::mqtt_device::run_commanded_device(
                id,
                token,
                addrs.clone(),
                d,
                stop.clone(),
            )),
        })
        .collect();
    let (stop_sender, sender_stop) = watch::channel(false);
    let sender = tokio::spawn(run_sender(
        ids,
        urls.to_vec(),
        ops_token.to_owned(),
        seed,
        sender_stop,
    ));
    Tasks {
        devices,
        sender,
        stop_sender,
    }
}

/// Holds `device`'s Control stream until `stop` turns true, starting on
/// server `first`.
async fn run_device(
    device: String,
    token: String,
    urls: Vec<String>,
    first: usize,
    mut stop: watch::Receiver<bool>,
) -> Received {
    let mut received = Received {
        device,
        ..Received::default()
    };
    let Some(mut clients) = ingest_clients(urls, &token) else {
        return received;
    };
    let mut server = first % clients.len();
    while !*stop.borrow() {
        received.streams += 1;
        let ended = hold_stream(&mut clients[server], &mut received, &mut stop).await;
        tracing::debug!(device = %received.device, server, ended, "Control stream ended");
        server = (server + 1) % clients.len();
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    received
}

/// A client per server, connecting lazily (a server may be down); `None`
/// for a bad URL or token.
fn ingest_clients(urls: Vec<String>, token: &str) -> Option<Vec<Ingest>> {
    super::watcher::lazy_clients(urls, token, IngestClient::with_interceptor)
}

/// One Control stream, until it breaks or `stop`; says why it ended. Every
/// command is acknowledged, repeats too: the first acknowledgement may have
/// died with the server before it was recorded.
async fn hold_stream(
    client: &mut Ingest,
    received: &mut Received,
    stop: &mut watch::Receiver<bool>,
) -> &'static str {
    // Roomy: an acknowledgement never waits for the server to read.
    let (tx, rx) = mpsc::channel(256);
    // Queued before the call: the server reads the hello first.
    if tx.send(hello()).await.is_err() {
        return "closed";
    }
    let opened = tokio::select! {
        _ = stop.wait_for(|s| *s) => return "stopped",
        r = client.control(ReceiverStream::new(rx)) => r,
    };
    let Ok(response) = opened else {
        return "refused";
    };
    let mut messages = response.into_inner();
    loop {
        let message = tokio::select! {
            _ = stop.wait_for(|s| *s) => return "stopped",
            m = messages.message() => m,
        };
        let command = match message {
            Ok(Some(pb::ServerMessage {
                msg: Some(pb::server_message::Msg::Command(c)),
            })) => c,
            Ok(Some(_)) => continue,
            // Ended or broken: the server went away.
            Ok(None) | Err(_) => return "broken",
        };
        *received.ids.entry(command.command_id).or_default() += 1;
        if tx.send(ack(command.command_id)).await.is_err() {
            return "closed";
        }
    }
}

fn hello() -> pb::DeviceMessage {
    pb::DeviceMessage {
        msg: Some(pb::device_message::Msg::Hello(pb::DeviceHello {
            firmware_version: "fault-trials".into(),
            capabilities: vec!["ping".into()],
            config: None,
        })),
    }
}

fn ack(command_id: u64) -> pb::DeviceMessage {
    pb::DeviceMessage {
        msg: Some(pb::device_message::Msg::Ack(pb::CommandAck {
            command_id,
            state: pb::CommandAckState::Done as i32,
            detail: "pong".into(),
        })),
    }
}

/// Sends a Ping every 50 to 100 ms until `stop`, to the devices in turn,
/// each through a server drawn at random (so a command often reaches its
/// device through another process).
async fn run_sender(
    devices: Vec<String>,
    urls: Vec<String>,
    ops_token: String,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) -> Sent {
    let mut sent = Sent::default();
    let Some(mut clients) = super::watcher::clients(urls, &ops_token) else {
        return sent;
    };
    if devices.is_empty() {
        return sent;
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc0de);
    for tick in 0.. {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(Duration::from_millis(rng.random_range(50..=100))) => {}
        }
        let device = &devices[tick % devices.len()];
        let server = rng.random_range(0..clients.len());
        let request = pb::SendCommandRequest {
            device_id: device.clone(),
            command: Some(pb::Command {
                kind: Some(pb::command::Kind::Ping(pb::Ping {})),
                ..Default::default()
            }),
            ttl_millis: TTL.as_millis() as u64,
            wait_millis: 0,
        };
        // A call cut short by `stop` was never answered: no promise.
        let answer = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = clients[server].send_command(request) => a,
        };
        match answer {
            Ok(command) => {
                let id = command.into_inner().command_id;
                sent.answered.push((device.clone(), id));
            }
            Err(status) => {
                tracing::debug!(%device, server, code = ?status.code(), "SendCommand failed");
                sent.failed += 1;
            }
        }
    }
    sent
}
