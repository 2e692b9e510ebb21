//! MQTT load: a fleet of devices, each on its own TCP connection, publishing
//! batches at QoS 1 to a running server's MQTT listener at a set rate, and
//! what came back: committed readings/s (a reading counts once its PUBACK
//! came, which means committed) and the PUBACK latency from the moment the
//! PUBLISH was written.
//!
//! ```sh
//! cargo run --release -p ingest --example mqtt_load -- \
//!     --mqtt 127.0.0.1:1883 --devices 10000 --readings-per-publish 1 --rate 50000
//! ```
//!
//! The devices are registered first (`RegisterDevices`, 1,000 a call) over
//! gRPC with the ops token. A bare client on the MQTT codec rather than a
//! full client library: the load generator shares the machine's cores with
//! the server, so it should cost as little as it can. Prints one JSON line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use clap::Parser;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
use std::sync::Mutex;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// The server's MQTT listener.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// The server's gRPC address, to register the devices.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    #[arg(long, default_value = "./data/ops.token")]
    ops_token_file: std::path::PathBuf,
    #[arg(long, default_value_t = 10_000)]
    devices: u32,
    #[arg(long, default_value_t = 1)]
    readings_per_publish: u32,
    /// Readings per second offered, the whole fleet together; 0: as fast
    /// as each device's window allows.
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// PUBLISHes a device has unacknowledged, at most.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Measured after `--warm-up`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warm_up: Duration,
    /// Device ids are PREFIX-00001 and on; a new prefix per run keeps each
    /// run's devices fresh.
    #[arg(long, default_value = "mq")]
    prefix: String,
}

/// What the fleet measured, all devices together.
struct Tally {
    acked: AtomicU64,
    failed_connections: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    measuring: std::sync::atomic::AtomicBool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tokens = register(&args).await?;
    let tally = Arc::new(Tally {
        acked: AtomicU64::new(0),
        failed_connections: AtomicU64::new(0),
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        measuring: false.into(),
    });
    let started = Instant::now();
    let stop_at = started + args.warm_up + args.duration;
    // Each device publishes every `interval`; spread their first publishes
    // over one interval so the fleet does not publish in lockstep.
    let per_device =
        args.rate as f64 / f64::from(args.readings_per_publish) / f64::from(args.devices);
    let interval = (per_device > 0.0).then(|| Duration::from_secs_f64(1.0 / per_device));
    let mut tasks = Vec::with_capacity(tokens.len());
    for (i, (id, token)) in tokens.into_iter().enumerate() {
        let offset = interval.map_or(Duration::ZERO, |iv| {
            iv.mul_f64(i as f64 / f64::from(args.devices))
        });
        tasks.push(tokio::spawn(device(
            args.mqtt,
            id,
            token,
            args.readings_per_publish,
            args.window,
            interval,
            offset,
            stop_at,
            tally.clone(),
        )));
    }
    tokio::time::sleep(args.warm_up).await;
    let acked_before = tally.acked.load(Ordering::Relaxed);
    tally.measuring.store(true, Ordering::Relaxed);
    let measured_from = Instant::now();
    tokio::time::sleep_until((stop_at).into()).await;
    let acked = tally.acked.load(Ordering::Relaxed) - acked_before;
    let elapsed = measured_from.elapsed().as_secs_f64();
    tally.measuring.store(false, Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    let latency = tally.latency.lock().expect("lock poisoned");
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{{\"devices\":{},\"readings_per_publish\":{},\"offered_readings_per_s\":{},\"committed_readings_per_s\":{:.0},\"publishes_per_s\":{:.0},\"puback_p50_ms\":{:.2},\"puback_p99_ms\":{:.2},\"puback_max_ms\":{:.2},\"samples\":{},\"failed_connections\":{}}}",
        args.devices,
        args.readings_per_publish,
        args.rate,
        acked as f64 * f64::from(args.readings_per_publish) / elapsed,
        acked as f64 / elapsed,
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1000.0,
        latency.len(),
        tally.failed_connections.load(Ordering::Relaxed),
    );
    Ok(())
}

/// Registers the fleet, 1,000 devices a call; their ids and tokens.
async fn register(args: &Args) -> anyhow::Result<Vec<(String, String)>> {
    let token = std::fs::read_to_string(&args.ops_token_file).context("reading the ops token")?;
    let channel = tonic::transport::Endpoint::from_shared(args.server.clone())?
        .connect()
        .await
        .context("connecting to the server")?;
    let mut ops = OpsClient::with_interceptor(channel, Bearer::new(token.trim())?);
    let ids: Vec<String> = (1..=args.devices)
        .map(|i| format!("{}-{i:05}", args.prefix))
        .collect();
    let mut tokens = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(1000) {
        let reply = ops
            .register_devices(pb::RegisterDevicesRequest {
                devices: chunk
                    .iter()
                    .map(|id| pb::RegisterDeviceRequest {
                        device_id: id.clone(),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .context("registering devices")?
            .into_inner();
        tokens.extend(reply.devices.into_iter().map(|d| (d.device_id, d.token)));
    }
    Ok(tokens)
}

/// One device: connects, then publishes every `interval` (or as its window
/// allows), reading PUBACKs as they come, until `stop_at`.
#[allow(clippy::too_many_arguments)]
async fn device(
    addr: SocketAddr,
    id: String,
    token: String,
    readings: u32,
    window: usize,
    interval: Option<Duration>,
    offset: Duration,
    stop_at: Instant,
    tally: Arc<Tally>,
) {
    let mut seq = 0u64;
    while Instant::now() < stop_at {
        if let Err(error) = publish(
            addr, &id, &token, readings, window, interval, offset, stop_at, &tally, &mut seq,
        )
        .await
        {
            tally.failed_connections.fetch_add(1, Ordering::Relaxed);
            eprintln!("{id}: {error:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn publish(
    addr: SocketAddr,
    id: &str,
    token: &str,
    readings: u32,
    window: usize,
    interval: Option<Duration>,
    offset: Duration,
    stop_at: Instant,
    tally: &Tally,
    seq: &mut u64,
) -> anyhow::Result<()> {
    let mut socket = TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let mut out = BytesMut::new();
    let mut connect = Connect::new(id);
    connect.set_login(id, token);
    connect.keep_alive = 60;
    Packet::Connect(connect).write(&mut out, usize::MAX)?;
    socket.write_all(&out).await?;
    out.clear();
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        match Packet::read(&mut buf, 1 << 20) {
            Ok(Packet::ConnAck(ack)) => {
                anyhow::ensure!(
                    ack.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success,
                    "refused: {:?}",
                    ack.code
                );
                break;
            }
            Ok(other) => anyhow::bail!("expected CONNACK, got {other:?}"),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                anyhow::ensure!(
                    socket.read_buf(&mut buf).await? > 0,
                    "closed before CONNACK"
                );
            }
            Err(e) => anyhow::bail!("{e}"),
        }
    }
    let topic = format!("devices/{id}/readings");
    let mut sent: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
    let mut next = tokio::time::Instant::now() + offset;
    let mut pkid: u16 = 0;
    loop {
        let room = sent.len() < window;
        let due = interval.is_none() || tokio::time::Instant::now() >= next;
        if room && due && Instant::now() < stop_at {
            *seq += 1;
            pkid = pkid.checked_add(1).unwrap_or(1);
            let mut publish = Publish::new(topic.as_str(), QoS::AtLeastOnce, batch(*seq, readings));
            publish.pkid = pkid;
            Packet::Publish(publish).write(&mut out, usize::MAX)?;
            socket.write_all(&out).await?;
            out.clear();
            sent.push_back(Instant::now());
            if let Some(iv) = interval {
                next += iv;
            }
            continue;
        }
        if Instant::now() >= stop_at {
            return Ok(());
        }
        let wake = if room { Some(next) } else { None };
        tokio::select! {
            read = socket.read_buf(&mut buf) => {
                anyhow::ensure!(read? > 0, "the server closed the connection");
            }
            () = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => continue,
        }
        loop {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(Packet::PubAck(_)) => {
                    let at = sent.pop_front().context("a PUBACK of nothing")?;
                    tally.acked.fetch_add(1, Ordering::Relaxed);
                    if tally.measuring.load(Ordering::Relaxed) {
                        let us = at.elapsed().as_micros() as u64;
                        let _ = tally
                            .latency
                            .lock()
                            .expect("lock poisoned")
                            .record(us.max(1));
                    }
                }
                Ok(other) => anyhow::bail!("unexpected {other:?}"),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => anyhow::bail!("{e}"),
            }
        }
    }
}

/// A batch of `n` readings, our JSON, stamped now.
fn batch(seq: u64, n: u32) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64;
    let mut t = String::new();
    let mut v = String::new();
    for i in 0..u64::from(n) {
        if i > 0 {
            t.push(',');
            v.push(',');
        }
        t.push_str(&(now - (u64::from(n) - i) * 1000).to_string());
        v.push_str(&format!("{}.5", 20 + i % 10));
    }
    format!(r#"{{"seq":{seq},"series":[{{"sensor":"t","unit":"Cel","t":[{t}],"v":[{v}]}}]}}"#)
        .into_bytes()
}
