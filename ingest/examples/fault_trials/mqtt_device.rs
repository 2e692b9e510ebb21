//! Devices that speak MQTT 5 (`--protocol mqtt`): the fleet publishes its
//! batches at QoS 1 and counts a batch acknowledged only on its PUBACK;
//! the commanded devices subscribe to their commands and publish a result
//! for each. After any failure a device reconnects (to the next server,
//! with several) and publishes again from its last PUBACK: batches the
//! server committed but could not acknowledge come again and must be
//! stored once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::watch;

use super::commander::Received;
use super::fleet::{DeviceLog, Progress, back_off};
use super::plan::Plan;

/// Batches a device has published and not yet had acknowledged, at most.
const MAX_IN_FLIGHT: u64 = 6;

/// Nothing from the server for this long: the connection is taken as lost.
const SILENCE: Duration = Duration::from_secs(5);

fn connect(id: &str, token: &str, addr: SocketAddr) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_credentials(id, token);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_clean_start(true);
    AsyncClient::new(options, 64)
}

/// The next event of a connection, or why it ended.
async fn next_event(eventloop: &mut EventLoop) -> Result<Event, String> {
    match tokio::time::timeout(SILENCE, eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) if ack.code != ConnectReturnCode::Success => {
            Err(format!("refused: {:?}", ack.code))
        }
        Ok(Ok(Event::Incoming(Packet::Disconnect(d)))) => {
            Err(format!("disconnected: {:?}", d.reason_code))
        }
        Ok(Ok(event)) => Ok(event),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("silent".into()),
    }
}

pub async fn run_fleet_device(
    plan: Arc<Plan>,
    device: u32,
    token: String,
    addrs: Vec<SocketAddr>,
    progress: Arc<Progress>,
    deadline: Instant,
) -> DeviceLog {
    let mut log = DeviceLog {
        device,
        ..DeviceLog::default()
    };
    let mut rng = StdRng::seed_from_u64(plan.seed ^ (u64::from(device) << 32));
    let id = plan.device_id(device);
    let mut server = device as usize % addrs.len();
    while Instant::now() < deadline && log.acked < plan.batches {
        log.streams += 1;
        let ended = publish(
            &plan,
            device,
            &id,
            &token,
            addrs[server],
            &mut log,
            &progress,
            deadline,
        )
        .await;
        if let Err(why) = ended {
            tracing::debug!(device = %id, %why, "MQTT connection ended");
            log.failed_streams += 1;
            if addrs.len() > 1 {
                server = (server + rng.random_range(1..addrs.len())) % addrs.len();
                log.failovers += 1;
            }
            back_off(&mut rng).await;
        }
    }
    log.finished = log.acked >= plan.batches;
    // What the device knows committed is what it was acknowledged.
    log.cursor = log.acked;
    log
}

/// Publishes from the batch after the last acknowledged one, keeping a few
/// in flight, until all are acknowledged or the connection ends.
#[allow(clippy::too_many_arguments)]
async fn publish(
    plan: &Plan,
    device: u32,
    id: &str,
    token: &str,
    addr: SocketAddr,
    log: &mut DeviceLog,
    progress: &Progress,
    deadline: Instant,
) -> Result<(), String> {
    let topic = format!("devices/{id}/readings/pb");
    let (client, mut eventloop) = connect(id, token, addr);
    // PUBACKs come in the order of the PUBLISHes.
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut next = log.acked + 1;
    loop {
        while in_flight.len() < MAX_IN_FLIGHT as usize && next <= plan.batches {
            let payload = plan.batch_proto(device, next).encode_to_vec();
            client
                .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                .map_err(|e| e.to_string())?;
            in_flight.push_back(next);
            next += 1;
        }
        if in_flight.is_empty() || Instant::now() >= deadline {
            let _ = client.try_disconnect();
            return Ok(());
        }
        if let Event::Incoming(Packet::PubAck(ack)) = next_event(&mut eventloop).await? {
            if ack.reason != PubAckReason::Success {
                return Err(format!("PUBACK {:?}", ack.reason));
            }
            let sequence = in_flight.pop_front().ok_or("a PUBACK of nothing")?;
            if sequence > log.acked {
                progress
                    .acked_batches
                    .fetch_add(sequence - log.acked, Ordering::Relaxed);
                log.acked = sequence;
            }
        }
    }
}

/// A commanded device over MQTT: subscribes to its commands and answers
/// each with a result, reconnecting (to the next server) until `stop`.
pub async fn run_commanded_device(
    device: String,
    token: String,
    addrs: Vec<SocketAddr>,
    first: usize,
    mut stop: watch::Receiver<bool>,
) -> Received {
    let mut received = Received {
        device,
        ..Received::default()
    };
    let mut server = first % addrs.len();
    while !*stop.borrow() {
        received.streams += 1;
        let ended = answer_commands(&mut received, &token, addrs[server], &mut stop).await;
        tracing::debug!(device = %received.device, server, ?ended, "MQTT command session ended");
        server = (server + 1) % addrs.len();
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    received
}

async fn answer_commands(
    received: &mut Received,
    token: &str,
    addr: SocketAddr,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let id = received.device.clone();
    let (client, mut eventloop) = connect(&id, token, addr);
    client
        .try_subscribe(format!("devices/{id}/commands/+"), QoS::AtLeastOnce)
        .map_err(|e| e.to_string())?;
    loop {
        let event = tokio::select! {
            _ = stop.wait_for(|s| *s) => {
                let _ = client.try_disconnect();
                return Ok(());
            }
            event = eventloop.poll() => event.map_err(|e| e.to_string())?,
        };
        match event {
            Event::Incoming(Packet::Disconnect(d)) => {
                return Err(format!("disconnected: {:?}", d.reason_code));
            }
            Event::Incoming(Packet::Publish(publish)) => {
                let command: serde_json::Value =
                    serde_json::from_slice(&publish.payload).map_err(|e| e.to_string())?;
                let command_id: u64 = command["commandId"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or("a command without its id")?;
                *received.ids.entry(command_id).or_default() += 1;
                client
                    .try_publish(
                        format!("devices/{id}/commands/{command_id}/result"),
                        QoS::AtLeastOnce,
                        false,
                        r#"{"success":true,"detail":"pong"}"#,
                    )
                    .map_err(|e| e.to_string())?;
            }
            _ => {}
        }
    }
}
