//! Scale-out (issue 14): three `ingest serve` processes on one PostgreSQL
//! database, each with one worker thread and short replica leases, driven
//! only through their listeners. Each check has a counted pass rule and a
//! time budget; the figures (command round trip, alert latency, how long a
//! killed process's devices took to read offline) are printed. The plan is
//! section 6 of docs/design scale-out.md; the SQLite check refuses a second
//! server on one database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::alert_helpers::{above, put, rule, temperatures};
use crate::common::cluster::{Cluster, ClusterSpec, spawn_logged};
use crate::common::control::{ping, send_command};
use crate::common::*;
use ingest::storage::Database;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

const LEASE: Duration = Duration::from_secs(6);
const RENEW: Duration = Duration::from_secs(2);
/// Scheduling slack on a shared two-core machine, on top of lease + renew.
const MARGIN: Duration = Duration::from_secs(3);
/// Every check's budget, from the moment its cluster serves.
const CHECK_BUDGET: Duration = Duration::from_secs(30);

/// Three processes with the lease timings of the test plan.
fn three() -> ClusterSpec {
    ClusterSpec::new(3).args(&[
        "--replica-lease",
        "6s",
        "--replica-renew",
        "2s",
        // Watchers tell a quiet stream from a dead one quickly.
        "--alert-heartbeat",
        "500ms",
    ])
}

/// Fails the check once it has run past its budget; prints how long it
/// took either way.
fn budget(check: &str, started: Instant) {
    let took = started.elapsed();
    println!("{check}: {:.1} s", took.as_secs_f64());
    assert!(
        took <= CHECK_BUDGET,
        "{check} took {took:?}, over its budget of {CHECK_BUDGET:?}"
    );
}

// ---- devices, commands, watchers -------------------------------------------

/// A Control stream that acknowledges every command, reporting each id
/// (before acknowledging it) on the returned receiver.
fn acking(mut device: ControlDevice) -> mpsc::UnboundedReceiver<u64> {
    let (seen, ids) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(command) = device.next_within(Duration::from_secs(120)).await {
            let _ = seen.send(command.command_id);
            device
                .ack(command.command_id, pb::CommandAckState::Done, "pong")
                .await;
        }
    });
    ids
}

async fn get_command(ops: &mut Ops, command_id: u64) -> pb::Command {
    ops.get_command(pb::GetCommandRequest { command_id })
        .await
        .unwrap()
        .into_inner()
}

/// `online` of every device, as Ops ListDevices on one process says.
async fn online_map(ops: &mut Ops) -> HashMap<String, bool> {
    let mut online = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = ops
            .list_devices(pb::ListDevicesRequest {
                page_size: 1000,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        for d in page.devices {
            online.insert(d.device_id, d.online);
        }
        if page.next_page_token.is_empty() {
            return online;
        }
        page_token = page.next_page_token;
    }
}

async fn get_online(ops: &mut Ops, device: &str) -> bool {
    ops.get_device(pb::GetDeviceRequest {
        device_id: device.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .online
}

/// Polls (every 50 ms) until every device in `ids` reads `online` via
/// `ops`; how long it took.
async fn wait_online(ops: &mut Ops, ids: &[String], online: bool, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let map = online_map(ops).await;
        let wrong: Vec<_> = ids
            .iter()
            .filter(|id| map.get(*id) != Some(&online))
            .collect();
        if wrong.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{} devices still not online={online} after {within:?}: {:?}",
            wrong.len(),
            wrong.iter().take(10).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// WatchAlerts on one process from `after`: the next event that is not a
/// heartbeat, or `None` once the stream is quiet for `quiet`.
struct Watch(tonic::Streaming<pb::AlertEvent>);

impl Watch {
    async fn open(cluster: &Cluster, process: usize, after: u64) -> Self {
        Self::open_at(&cluster.url(process), after)
            .await
            .unwrap_or_else(|e| panic!("WatchAlerts on process {process}: {e}"))
    }

    async fn open_at(url: &str, after: u64) -> Result<Self, String> {
        let channel = Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        let stream = OpsClient::with_interceptor(channel, Bearer::new(OPS_TOKEN).unwrap())
            .watch_alerts(pb::WatchAlertsRequest {
                after_event_id: after,
                ..Default::default()
            })
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        Ok(Self(stream))
    }

    /// The next event (heartbeats skipped); panics if nothing at all, not
    /// even a heartbeat, comes within `within`, or the stream breaks.
    async fn event(&mut self, within: Duration) -> pb::AlertEvent {
        self.try_event(within)
            .await
            .unwrap_or_else(|e| panic!("the watch stream {e}"))
    }

    async fn try_event(&mut self, within: Duration) -> Result<pb::AlertEvent, String> {
        loop {
            let item = tokio::time::timeout(within, self.0.message())
                .await
                .map_err(|_| format!("was silent for {within:?}"))?
                .map_err(|s| format!("failed: {s}"))?
                .ok_or("ended")?;
            if item.kind() != pb::AlertEventKind::Heartbeat {
                return Ok(item);
            }
        }
    }
}

/// Opens a watcher on one process from the start, then collects its
/// events on a task until it has `target` (sent once known) of them, or
/// `until`.
async fn collect_events(
    cluster: &Cluster,
    process: usize,
    mut target: watch::Receiver<Option<usize>>,
    until: Instant,
) -> tokio::task::JoinHandle<Vec<pb::AlertEvent>> {
    let mut watch = Watch::open(cluster, process, 0).await;
    tokio::spawn(async move {
        let mut events = Vec::new();
        let mut told = true;
        loop {
            if let Some(n) = *target.borrow_and_update()
                && events.len() >= n
            {
                return events;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return events,
                r = target.changed(), if told => told = r.is_ok(),
                e = watch.event(Duration::from_secs(10)) => events.push(e),
            }
        }
    })
}

/// p50 and p99 of `samples`, in milliseconds.
fn percentiles(samples: &[Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

/// Event ids, kinds and devices in the table, in id order.
async fn stored_events(cluster: &Cluster) -> Vec<(u64, String, String)> {
    let Database::Postgres { url } = &cluster.storage.database else {
        unreachable!()
    };
    let mut conn: sqlx::PgConnection = sqlx::Connection::connect(url).await.unwrap();
    let rows: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT event_id, kind, device_id FROM alert_events ORDER BY event_id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(id, kind, device)| (id as u64, kind, device))
        .collect()
}

/// Ids `1..=n` with nothing missing, nothing twice, in order: what a
/// watcher must have seen. Describes the first difference.
fn contiguous(who: &str, seen: &[u64], stored: &[u64]) {
    let n = stored.len() as u64;
    assert_eq!(
        stored,
        (1..=n).collect::<Vec<_>>(),
        "the table's event ids are not 1..={n}"
    );
    if seen != stored {
        let first = (0..seen.len().max(stored.len()))
            .find(|&i| seen.get(i) != stored.get(i))
            .unwrap_or(0);
        let repeated = seen.windows(2).filter(|w| w[1] <= w[0]).count();
        let gaps = seen.windows(2).filter(|w| w[1] > w[0] + 1).count();
        panic!(
            "{who} saw {} events, the table has {n}: {repeated} out of order or repeated, {gaps} gaps; first difference at #{first}: saw {:?}, stored {:?}",
            seen.len(),
            seen.get(first),
            stored.get(first)
        );
    }
}

// ---- the harness itself (runs against any server) -----------------------

/// Start, addresses, clients, SIGKILL, restart, stop on drop: what every
/// other check stands on, with no scale-out flag, so it also tells a
/// harness fault from a server one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_starts_kills_and_restarts_processes() {
    let Some(mut cluster) = Cluster::start(ClusterSpec::new(3)).await else {
        return;
    };
    let started = Instant::now();
    let addrs: HashSet<_> = cluster.nodes.iter().map(|n| n.addr).collect();
    assert_eq!(addrs.len(), 3, "three listeners");
    let token = cluster.register("dev-1").await;
    // Registered through process 0, visible through process 2: one database.
    let mut ops2 = cluster.ops(2).await;
    assert!(online_map(&mut ops2).await.contains_key("dev-1"));
    let summary = upload(
        &mut cluster.ingest(1, &token).await,
        vec![simple_batch(1, 3)],
    )
    .await
    .unwrap();
    assert_eq!(summary.committed_sequence, 1);
    let (status, _) = cluster.admin(1, "/healthz").await;
    assert_eq!(status, 200);
    assert!(cluster.metric(1, "ingest_batches_total").await.is_some());

    let pid = cluster.nodes[1].pid().unwrap();
    cluster.kill9(1).await;
    assert!(!process_exists(pid), "process 1 (pid {pid}) is gone");
    assert_eq!(cluster.running(), vec![0, 2]);
    cluster.start_process(1).await;
    assert_eq!(cursor(&mut cluster.ingest(1, &token).await).await, 1);
    let status = cluster.restart(2).await;
    assert!(status.success(), "SIGTERM stop of process 2: {status}");
    assert!(
        online_map(&mut cluster.ops(2).await)
            .await
            .contains_key("dev-1")
    );
    let pids: Vec<u32> = cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    assert_eq!(pids.len(), 3);
    budget("harness", started);
    drop(cluster);
    for pid in pids {
        assert!(!process_exists(pid), "pid {pid} outlived its cluster");
    }
}

fn process_exists(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the pid exists; it sends nothing.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

// ---- 1. a command across processes ------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_on_one_process_is_acked_by_a_stream_on_another() {
    let Some(cluster) = Cluster::start(three()).await else {
        return;
    };
    let started = Instant::now();
    let token = cluster.register("dev-1").await;
    let mut received = acking(cluster.control(0, &token).await);
    let mut ops = cluster.ops(1).await;
    const COMMANDS: usize = 50;
    let mut round_trips = Vec::with_capacity(COMMANDS);
    for n in 0..COMMANDS {
        let sent_at = Instant::now();
        let done = send_command(&mut ops, "dev-1", ping(), 0, 10_000)
            .await
            .unwrap_or_else(|s| panic!("command {n}: {s}"));
        round_trips.push(sent_at.elapsed());
        assert_eq!(
            done.state(),
            pb::CommandState::Acked,
            "command {n} (id {}): wait on process 1 returned {:?} for a stream on process 0",
            done.command_id,
            done.state()
        );
        assert_eq!(done.result, "pong");
        assert_eq!(
            received.try_recv().ok(),
            Some(done.command_id),
            "command {n}: the stream got it once"
        );
    }
    let (p50, p99) = percentiles(&round_trips);
    println!(
        "cross-process command round trip (SendCommand wait on 1, stream on 0), {COMMANDS} commands: p50 {p50:.1} ms, p99 {p99:.1} ms"
    );
    budget("cross-process command", started);
}

// ---- 2. supersede across processes, then a late disconnect ------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_another_process_supersedes_and_a_late_disconnect_keeps_it_online() {
    let Some(cluster) = Cluster::start(three()).await else {
        return;
    };
    let started = Instant::now();
    let token = cluster.register("dev-1").await;
    let ids = ["dev-1".to_owned()];
    let mut ops_c = cluster.ops(2).await;
    let mut first = cluster.control(0, &token).await;
    wait_online(&mut ops_c, &ids, true, Duration::from_secs(10)).await;
    let mut second = cluster.control(1, &token).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), first.rx.message())
        .await
        .expect("the stream on process 0 neither ended nor received anything within 10 s of a newer stream of its device on process 1")
        .expect_err("the stream on process 0 must end with a status, not go on");
    assert_eq!(
        ended.code(),
        Code::Aborted,
        "the stream on process 0 after a newer one on process 1: {ended:?}"
    );
    assert!(
        ended.message().starts_with("superseded"),
        "{}",
        ended.message()
    );
    // #2244: the old stream's connection goes away after the new one is
    // established; its end must not mark the device offline.
    drop(first);
    let mut ops_a = cluster.ops(0).await;
    let mut ops_b = cluster.ops(1).await;
    let watching = Instant::now();
    let mut polls = 0;
    while watching.elapsed() < Duration::from_secs(3) {
        for (name, ops) in [("C", &mut ops_c), ("A", &mut ops_a), ("B", &mut ops_b)] {
            assert!(
                get_online(ops, "dev-1").await,
                "poll {polls}: GetDevice on {name} says offline {:?} after the superseded stream's connection dropped",
                watching.elapsed()
            );
        }
        polls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the newer stream is the one commands reach.
    let queued = send_command(&mut ops_c, "dev-1", ping(), 0, 0)
        .await
        .unwrap();
    let got = second.next().await.unwrap();
    assert_eq!(got.command_id, queued.command_id);
    println!("online at all {polls} polls (x3 processes) after the late disconnect");
    budget("supersede across processes", started);
}

// ---- 3. alert order with one process's event transaction held --------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_ids_stay_contiguous_and_ordered_while_one_process_holds_its_event_transaction() {
    let spec = three().process_args(0, &["--test-hold-event-tx", "200ms"]);
    let Some(cluster) = Cluster::start(spec).await else {
        return;
    };
    let started = Instant::now();
    const DEVICES: usize = 30;
    const BATCHES: u64 = 4;
    put(
        &mut cluster.ops(1).await,
        rule(
            "hot",
            "temperature",
            pb::Severity::Warning,
            above(40.0, 35.0, 0),
        ),
    )
    .await;
    let devices = cluster.register_many("dev", DEVICES).await;
    let expected = DEVICES * BATCHES as usize * 2;
    let until = started + Duration::from_secs(25);
    let (target_tx, target) = watch::channel(None);
    let on_c = collect_events(&cluster, 2, target.clone(), until).await;

    // A watcher that drops its stream at random points and resumes from
    // its cursor on a random process.
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    let hopping = tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let mut seen: Vec<u64> = Vec::new();
        let mut hops = 0;
        while seen.len() < expected && Instant::now() < until {
            let process = rng.random_range(0..3);
            let channel = tonic::transport::Channel::from_shared(urls[process].clone())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut ops = telemetry_proto::v1::ops_client::OpsClient::with_interceptor(
                channel,
                Bearer::new(OPS_TOKEN).unwrap(),
            );
            let mut stream = ops
                .watch_alerts(pb::WatchAlertsRequest {
                    after_event_id: seen.last().copied().unwrap_or(0),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            hops += 1;
            let take = rng.random_range(1..=15);
            let mut taken = 0;
            while taken < take && seen.len() < expected && Instant::now() < until {
                let item = tokio::time::timeout(Duration::from_secs(10), stream.message())
                    .await
                    .expect("silent watch stream")
                    .unwrap()
                    .expect("the watch stream ended");
                if item.kind() != pb::AlertEventKind::Heartbeat {
                    seen.push(item.event_id);
                    taken += 1;
                }
            }
        }
        (seen, hops)
    });

    // Each batch fires and resolves once; a device's batches go to the
    // three processes in turn, so its rule memory must hold across them.
    let channels: Vec<_> = futures::future::join_all((0..3).map(|i| cluster.channel(i))).await;
    let t0 = now_nanos() - 600 * SEC;
    let uploads: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(d, (_, token))| {
            let clients: Vec<Ingest> = channels
                .iter()
                .map(|c| {
                    telemetry_proto::v1::ingest_client::IngestClient::with_interceptor(
                        c.clone(),
                        Bearer::new(token).unwrap(),
                    )
                })
                .collect();
            tokio::spawn(async move {
                let mut clients = clients;
                let mut held = Vec::new();
                for k in 1..=BATCHES {
                    let process = (d + k as usize) % 3;
                    let sent_at = Instant::now();
                    temperatures(&mut clients[process], k, t0 + k * 10 * SEC, &[50.0, 30.0]).await;
                    if process == 0 {
                        held.push(sent_at.elapsed());
                    }
                }
                held
            })
        })
        .collect();
    let mut on_holding_process = Vec::new();
    for u in uploads {
        on_holding_process.extend(u.await.unwrap());
    }
    let uploaded = started.elapsed();
    // Every batch there wrote events, so every one was held: proof that
    // the hook struck and the other processes' event writers met it.
    let shortest = on_holding_process.iter().min().unwrap();
    assert!(
        *shortest >= Duration::from_millis(200),
        "a batch on process 0 (--test-hold-event-tx 200ms) was acknowledged after {shortest:?}: the hold did not happen"
    );
    let stored = stored_events(&cluster).await;
    assert_eq!(
        stored.len(),
        expected,
        "{DEVICES} devices x {BATCHES} batches, each firing and resolving once"
    );
    target_tx.send_replace(Some(expected));
    let on_c: Vec<u64> = on_c.await.unwrap().iter().map(|e| e.event_id).collect();
    let (hopped, hops) = hopping.await.unwrap();
    let ids: Vec<u64> = stored.iter().map(|e| e.0).collect();
    contiguous("the watcher on process 2", &on_c, &ids);
    contiguous("the watcher hopping between processes", &hopped, &ids);
    let mut per_device: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (_, kind, device) in &stored {
        per_device.entry(device).or_default().push(kind);
    }
    let alternating: Vec<&str> = (0..BATCHES).flat_map(|_| ["fired", "resolved"]).collect();
    for (device, kinds) in &per_device {
        assert_eq!(kinds, &alternating, "{device}'s events in id order");
    }
    println!(
        "{expected} events, uploads took {:.1} s with process 0 holding each event transaction 200 ms; hopping watcher reconnected {hops} times",
        uploaded.as_secs_f64()
    );
    budget("alert order with a held event transaction", started);
}

/// Rule judged on the process that commits the batch, watcher on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_latency_across_processes() {
    let Some(cluster) = Cluster::start(three()).await else {
        return;
    };
    let started = Instant::now();
    put(
        &mut cluster.ops(0).await,
        rule(
            "hot",
            "temperature",
            pb::Severity::Warning,
            above(40.0, 35.0, 0),
        ),
    )
    .await;
    let token = cluster.register("dev-1").await;
    let mut watch = Watch::open(&cluster, 1, 0).await;
    let mut client = cluster.ingest(0, &token).await;
    const EVENTS: u64 = 50;
    let mut latencies = Vec::new();
    for k in 1..=EVENTS {
        let value = if k % 2 == 1 { 50.0 } else { 30.0 };
        let sent_at = Instant::now();
        temperatures(&mut client, k, now_nanos() - SEC, &[value]).await;
        let event = watch.event(Duration::from_secs(5)).await;
        latencies.push(sent_at.elapsed());
        if started.elapsed() > CHECK_BUDGET {
            let (p50, p99) = percentiles(&latencies);
            panic!("over budget after {k} of {EVENTS} events: p50 {p50:.1} ms, p99 {p99:.1} ms");
        }
        let kind = if k % 2 == 1 {
            pb::AlertEventKind::Fired
        } else {
            pb::AlertEventKind::Resolved
        };
        assert_eq!(event.kind(), kind, "event {k}");
        assert_eq!(event.event_id, k, "event {k}");
    }
    let (p50, p99) = percentiles(&latencies);
    println!(
        "cross-process alert latency (upload on 0 to WatchAlerts on 1), {EVENTS} events: p50 {p50:.1} ms, p99 {p99:.1} ms"
    );
    budget("cross-process alert latency", started);
}

// ---- 4. the LISTEN connections killed during traffic --------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_listen_connections_loses_no_event_command_or_wakeup() {
    let Some(cluster) = Cluster::start(three()).await else {
        return;
    };
    let started = Instant::now();
    assert_eq!(
        cluster.count_backends("ingest-%-listener").await,
        3,
        "one listener connection per process (application_name ingest-<id>-listener)"
    );
    put(
        &mut cluster.ops(0).await,
        rule(
            "hot",
            "temperature",
            pb::Severity::Warning,
            above(40.0, 35.0, 0),
        ),
    )
    .await;
    const CONTROLLED: usize = 12;
    const COMMANDS: usize = 5;
    const UPLOADERS: usize = 12;
    const BATCHES: u64 = 6;
    let controlled = cluster.register_many("ctl", CONTROLLED).await;
    let uploaders = cluster.register_many("upl", UPLOADERS).await;
    let expected_events = UPLOADERS * BATCHES as usize * 2;
    let until = started + Duration::from_secs(25);
    let (target_tx, target) = watch::channel(None);
    let mut watchers = Vec::new();
    for i in 0..3 {
        watchers.push(collect_events(&cluster, i, target.clone(), until).await);
    }
    let mut received = Vec::new();
    for (d, (_, token)) in controlled.iter().enumerate() {
        received.push(acking(cluster.control(d % 3, token).await));
    }

    let (stop_tx, mut stop) = watch::channel(false);
    let killer = {
        let storage_url = cluster.database_url.clone();
        tokio::spawn(async move {
            let mut conn: sqlx::PgConnection =
                sqlx::Connection::connect(&storage_url).await.unwrap();
            let mut terminated = 0i64;
            let mut rounds = 0;
            while !*stop.borrow() {
                let n: i64 = sqlx::query_scalar(
                    "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name LIKE 'ingest-%-listener'",
                )
                .fetch_one(&mut conn)
                .await
                .unwrap();
                terminated += n;
                rounds += 1;
                tokio::select! {
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
            }
            (terminated, rounds)
        })
    };

    let mut commanders = Vec::new();
    for (d, (id, _)) in controlled.iter().enumerate() {
        let mut ops = cluster.ops((d + 1) % 3).await;
        let id = id.clone();
        commanders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..COMMANDS {
                let sent_at = Instant::now();
                let done = send_command(&mut ops, &id, ping(), 0, 15_000)
                    .await
                    .unwrap_or_else(|s| panic!("{id} command {n}: {s}"));
                assert_eq!(
                    done.state(),
                    pb::CommandState::Acked,
                    "{id} command {n} (id {}) after {:?}",
                    done.command_id,
                    sent_at.elapsed()
                );
                acked.push((done.command_id, sent_at.elapsed()));
            }
            acked
        }));
    }
    let channels: Vec<_> = futures::future::join_all((0..3).map(|i| cluster.channel(i))).await;
    let t0 = now_nanos() - 600 * SEC;
    let mut uploads = Vec::new();
    for (d, (_, token)) in uploaders.iter().enumerate() {
        let mut clients: Vec<Ingest> = channels
            .iter()
            .map(|c| {
                telemetry_proto::v1::ingest_client::IngestClient::with_interceptor(
                    c.clone(),
                    Bearer::new(token).unwrap(),
                )
            })
            .collect();
        uploads.push(tokio::spawn(async move {
            for k in 1..=BATCHES {
                temperatures(
                    &mut clients[(d + k as usize) % 3],
                    k,
                    t0 + k * 10 * SEC,
                    &[50.0, 30.0],
                )
                .await;
                // Spread over the fault rounds rather than done at once.
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }));
    }
    let mut round_trips = Vec::new();
    for (d, c) in commanders.into_iter().enumerate() {
        let acked = c.await.unwrap();
        let sent: Vec<u64> = acked.iter().map(|a| a.0).collect();
        let mut got = Vec::new();
        while let Ok(id) = received[d].try_recv() {
            got.push(id);
        }
        let lost: Vec<_> = sent.iter().filter(|id| !got.contains(id)).collect();
        assert!(
            lost.is_empty(),
            "{}: commands acked but never delivered?! {lost:?} (delivered {got:?})",
            controlled[d].0
        );
        assert_eq!(
            got, sent,
            "{}: each command delivered once, in order, on the one open stream",
            controlled[d].0
        );
        round_trips.extend(acked.iter().map(|a| a.1));
    }
    for u in uploads {
        u.await.unwrap();
    }
    stop_tx.send_replace(true);
    let (terminated, rounds) = killer.await.unwrap();
    assert!(
        terminated > 0,
        "no listener connection was terminated in {rounds} rounds: the fault never struck"
    );
    let stored = stored_events(&cluster).await;
    assert_eq!(stored.len(), expected_events);
    target_tx.send_replace(Some(expected_events));
    let ids: Vec<u64> = stored.iter().map(|e| e.0).collect();
    for (i, w) in watchers.into_iter().enumerate() {
        let seen: Vec<u64> = w.await.unwrap().iter().map(|e| e.event_id).collect();
        contiguous(&format!("the watcher on process {i}"), &seen, &ids);
    }
    // Each process opened its listener again.
    eventually(
        "the listener connections back",
        Duration::from_secs(10),
        async || cluster.count_backends("ingest-%-listener").await >= 3,
    )
    .await;
    let (p50, p99) = percentiles(&round_trips);
    println!(
        "{terminated} listener connections terminated in {rounds} rounds; {} commands acked (p50 {p50:.1} ms, p99 {p99:.1} ms), {expected_events} events seen by 3 watchers",
        round_trips.len()
    );
    budget("listener loss", started);
}

// ---- 5. the per-device queue limit across processes -----------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_limit_holds_across_processes() {
    let Some(cluster) = Cluster::start(three().args(&["--max-pending-commands", "10"])).await
    else {
        return;
    };
    let started = Instant::now();
    cluster.register("dev-1").await;
    const PER_PROCESS: usize = 20;
    let barrier = Arc::new(tokio::sync::Barrier::new(3 * PER_PROCESS));
    let mut sends = Vec::new();
    for i in 0..3 {
        let ops = cluster.ops(i).await;
        for _ in 0..PER_PROCESS {
            let mut ops = ops.clone();
            let barrier = barrier.clone();
            sends.push(tokio::spawn(async move {
                barrier.wait().await;
                send_command(&mut ops, "dev-1", ping(), 0, 0).await
            }));
        }
    }
    let (mut queued, mut exhausted, mut other) = (0, 0, Vec::new());
    for s in sends {
        match s.await.unwrap() {
            Ok(c) if c.state() == pb::CommandState::Queued => queued += 1,
            Err(s) if s.code() == Code::ResourceExhausted => exhausted += 1,
            r => other.push(format!("{r:?}")),
        }
    }
    let in_table = cluster
        .storage
        .scalar("SELECT COUNT(*) FROM commands WHERE state = 'queued'")
        .await;
    assert_eq!(
        (queued, exhausted, in_table, other.len()),
        (10, 50, 10, 0),
        "(queued, RESOURCE_EXHAUSTED, queued rows, other answers {other:?})"
    );
    budget("queue limit", started);
}

// ---- 6. kill -9 of the leader ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_moves_devices_commands_and_leadership() {
    let Some(mut cluster) = Cluster::start(three()).await else {
        return;
    };
    let started = Instant::now();
    const DEVICES: usize = 30;
    let devices = cluster.register_many("dev", DEVICES).await;
    cluster.register("quiet-a").await;
    let quiet_b = cluster.register("quiet-b").await;
    let victim = cluster.wait_for_one_leader(LEASE + RENEW + MARGIN).await;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let (s1, s2) = (survivors[0], survivors[1]);
    let mut ops = cluster.ops(s1).await;

    // quiet-b reads every 250 ms until the kill, through a survivor.
    let (stop_b, mut stopped_b) = watch::channel(false);
    let mut b_client = cluster.ingest(s1, &quiet_b).await;
    let mut b_seq = 1;
    temperatures(&mut b_client, b_seq, now_nanos(), &[20.0]).await;
    let b_uploader = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped_b.changed() => return (b_client, b_seq),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            b_seq += 1;
            temperatures(&mut b_client, b_seq, now_nanos(), &[20.0]).await;
        }
    });
    let mut silent = rule(
        "silent",
        "",
        pb::Severity::Critical,
        pb::alert_rule::Condition::Inactivity(pb::InactivityCondition {
            silence_millis: 2000,
        }),
    );
    silent.devices = Some(pb::DeviceSelector {
        selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
            device_ids: vec!["quiet-a".into(), "quiet-b".into()],
        })),
    });
    put(&mut ops, silent).await;
    let events = Arc::new(Mutex::new(Vec::<pb::AlertEvent>::new()));
    let collector = {
        let url = cluster.url(s2);
        let events = events.clone();
        // Like any watcher, it resumes after the last id it saw if its
        // stream breaks: once, on a loaded CI machine, this connection to a
        // survivor ended (EOF, no GOAWAY) and the test then waited for
        // events nobody was reading. Each break is printed.
        let mut watch = Watch::open(&cluster, s2, 0).await;
        tokio::spawn(async move {
            let mut after = 0;
            loop {
                match watch.try_event(Duration::from_secs(30)).await {
                    Ok(e) => {
                        after = e.event_id;
                        events.lock().unwrap().push(e);
                    }
                    Err(error) => {
                        println!(
                            "the watch stream on process {s2} {error}; resuming after {after}"
                        );
                        let deadline = Instant::now() + Duration::from_secs(10);
                        watch = loop {
                            match Watch::open_at(&url, after).await {
                                Ok(w) => break w,
                                Err(e) if Instant::now() < deadline => {
                                    println!("reopening the watch stream: {e}");
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                Err(e) => panic!("reopening the watch stream: {e}"),
                            }
                        };
                    }
                }
            }
        })
    };
    let fired = |events: &Arc<Mutex<Vec<pb::AlertEvent>>>, device: &str| {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.device_id == device && e.kind() == pb::AlertEventKind::Fired)
            .count()
    };
    // quiet-a never reads: the leader fires it before the kill.
    eventually(
        &format!("the leader (process {victim}) firing quiet-a's inactivity"),
        Duration::from_secs(10),
        async || fired(&events, "quiet-a") > 0,
    )
    .await;

    // Every device holds a stream, a third of them on the victim; those
    // get a command they never acknowledge.
    let mut streams: Vec<Option<ControlDevice>> = Vec::new();
    for (d, (_, token)) in devices.iter().enumerate() {
        streams.push(Some(cluster.control(d % 3, token).await));
    }
    let ids: Vec<String> = devices.iter().map(|d| d.0.clone()).collect();
    wait_online(&mut ops, &ids, true, Duration::from_secs(10)).await;
    let on_victim: Vec<usize> = (0..DEVICES).filter(|d| d % 3 == victim).collect();
    let mut unacked = HashMap::new();
    for &d in &on_victim {
        let queued = send_command(&mut ops, &ids[d], ping(), 0, 0).await.unwrap();
        let got = streams[d].as_mut().unwrap().next().await.unwrap();
        assert_eq!(got.command_id, queued.command_id);
        unacked.insert(d, queued.command_id);
    }
    for (&d, &command_id) in &unacked {
        eventually(
            &format!("{}'s command marked sent", ids[d]),
            Duration::from_secs(10),
            async || get_command(&mut ops, command_id).await.state() == pb::CommandState::Sent,
        )
        .await;
    }

    stop_b.send_replace(true);
    let (mut b_client, b_seq) = b_uploader.await.unwrap();
    // Reading every 250 ms against a 2 s silence: it should not have fired
    // yet; if the machine stalled that long, only a later firing counts.
    let b_fired_before = fired(&events, "quiet-b");
    cluster.kill9(victim).await;
    let killed = Instant::now();
    for &d in &on_victim {
        // The kill broke their connections; they stay away until the
        // survivors have seen them go offline.
        streams[d] = None;
    }

    // Its devices read offline within lease + renew; the others never do.
    let victim_ids: Vec<String> = on_victim.iter().map(|&d| ids[d].clone()).collect();
    let others: Vec<&String> = ids.iter().filter(|id| !victim_ids.contains(id)).collect();
    let mut polls = 0;
    // Leadership is watched in the same loop, so both figures are times
    // from the kill, not one after the other.
    let mut leader_after = None;
    let offline_after = loop {
        let map = online_map(&mut ops).await;
        polls += 1;
        if leader_after.is_none() && cluster.leaders().await.len() == 1 {
            leader_after = Some(killed.elapsed());
        }
        let dropped: Vec<_> = others.iter().filter(|id| !map[**id]).collect();
        assert!(
            dropped.is_empty(),
            "{:?} after the kill, devices held by the survivors read offline: {dropped:?}",
            killed.elapsed()
        );
        if victim_ids.iter().all(|id| !map[id]) {
            break killed.elapsed();
        }
        let still: Vec<_> = victim_ids.iter().filter(|id| map[*id]).collect();
        assert!(
            killed.elapsed() < LEASE + RENEW + MARGIN,
            "{} of the killed process's devices still online {:?} after the kill (lease {LEASE:?} + renew {RENEW:?} + margin {MARGIN:?}): {still:?}",
            still.len(),
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let new_leader = cluster
        .wait_for_one_leader((LEASE + RENEW + MARGIN).saturating_sub(killed.elapsed()))
        .await;
    let leader_after = leader_after.unwrap_or_else(|| killed.elapsed());

    // They reconnect to the survivors and get their command again.
    for (n, &d) in on_victim.iter().enumerate() {
        let process = survivors[n % 2];
        let mut stream = cluster.control(process, &devices[d].1).await;
        let again = stream
            .next()
            .await
            .unwrap_or_else(|s| panic!("{} on process {process}: no redelivery: {s}", ids[d]));
        assert_eq!(
            again.command_id, unacked[&d],
            "{}: the unacknowledged command, same id",
            ids[d]
        );
        stream
            .ack(again.command_id, pb::CommandAckState::Done, "pong")
            .await;
        streams[d] = Some(stream);
    }
    for (&d, &command_id) in &unacked {
        eventually(
            &format!("{}'s redelivered command acked", ids[d]),
            Duration::from_secs(10),
            async || get_command(&mut ops, command_id).await.state() == pb::CommandState::Acked,
        )
        .await;
    }
    wait_online(&mut ops, &ids, true, Duration::from_secs(10)).await;

    // quiet-b went silent at the kill: the new leader fires it, once.
    let by = killed + LEASE + RENEW + MARGIN + Duration::from_secs(2);
    eventually(
        &format!(
            "quiet-b's inactivity fired within {:?} of the leader's kill",
            by - killed
        ),
        by.saturating_duration_since(Instant::now()),
        async || fired(&events, "quiet-b") != b_fired_before,
    )
    .await;
    let b_fired_after = killed.elapsed();
    temperatures(&mut b_client, b_seq + 1, now_nanos(), &[20.0]).await;
    eventually(
        "quiet-b's reading resolving it",
        Duration::from_secs(5),
        async || {
            events
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.device_id == "quiet-b" && e.kind() == pb::AlertEventKind::Resolved)
        },
    )
    .await;
    collector.abort();
    let twice = cluster
        .storage
        .scalar(
            "SELECT COUNT(*) FROM (SELECT rule_id, device_id FROM alert_events WHERE kind = 'fired' \
             GROUP BY alert_id, rule_id, device_id HAVING COUNT(*) > 1) x",
        )
        .await;
    let a_fired = cluster
        .storage
        .scalar("SELECT COUNT(*) FROM alert_events WHERE kind = 'fired' AND device_id = 'quiet-a'")
        .await;
    let b_fired = cluster
        .storage
        .scalar("SELECT COUNT(*) FROM alert_events WHERE kind = 'fired' AND device_id = 'quiet-b'")
        .await;
    let b_alerts = cluster
        .storage
        .scalar(
            "SELECT COUNT(*) FROM alerts a JOIN devices d ON d.pk = a.device_pk \
             WHERE d.device_id = 'quiet-b'",
        )
        .await;
    let a_open = cluster
        .storage
        .scalar(
            "SELECT COUNT(*) FROM alerts a JOIN devices d ON d.pk = a.device_pk \
             WHERE d.device_id = 'quiet-a' AND a.resolved_unix_nano IS NULL",
        )
        .await;
    assert_eq!(
        (twice, a_fired, a_open, b_fired),
        (0, 1, 1, b_fired_before as i64 + 1),
        "(alerts with two FIRED events, quiet-a FIRED (across the handover), quiet-a open, quiet-b FIRED ({b_fired_before} before the kill))"
    );
    assert_eq!(b_fired, b_alerts, "quiet-b: one FIRED per alert");
    let stored: Vec<u64> = stored_events(&cluster).await.iter().map(|e| e.0).collect();
    contiguous(
        "the table itself",
        &stored,
        &(1..=stored.len() as u64).collect::<Vec<_>>(),
    );
    println!(
        "killed leader {victim}: its {} devices offline after {:.1} s ({polls} polls), leader {new_leader} after {:.1} s, quiet-b fired after {:.1} s; {} commands redelivered",
        on_victim.len(),
        offline_after.as_secs_f64(),
        leader_after.as_secs_f64(),
        b_fired_after.as_secs_f64(),
        unacked.len()
    );
    budget("kill -9 of the leader", started);
}

// ---- 7. restarting one process --------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_one_process_leaves_the_others_devices_online() {
    let Some(mut cluster) = Cluster::start(three()).await else {
        return;
    };
    let started = Instant::now();
    const DEVICES: usize = 30;
    let devices = cluster.register_many("dev", DEVICES).await;
    let mut streams = Vec::new();
    for (d, (_, token)) in devices.iter().enumerate() {
        streams.push(cluster.control(d % 3, token).await);
    }
    let ids: Vec<String> = devices.iter().map(|d| d.0.clone()).collect();
    let mut ops = cluster.ops(0).await;
    wait_online(&mut ops, &ids, true, Duration::from_secs(10)).await;
    let held: Vec<String> = (0..DEVICES)
        .filter(|d| d % 3 != 2)
        .map(|d| ids[d].clone())
        .collect();

    let (stop_tx, mut stop) = watch::channel(false);
    let url = cluster.database_url.clone();
    let held_for_poll = held.clone();
    let poller = tokio::spawn(async move {
        let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&url).await.unwrap();
        let mut polls = 0;
        let mut violations = Vec::new();
        loop {
            let t = Instant::now();
            let map = online_map(&mut ops).await;
            let via_ops = held_for_poll.iter().filter(|id| !map[*id]).count();
            let via_sql: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM devices WHERE device_id = ANY($1) AND NOT online",
            )
            .bind(&held_for_poll)
            .fetch_one(&mut conn)
            .await
            .unwrap();
            polls += 1;
            if via_ops > 0 || via_sql > 0 {
                violations.push(format!(
                    "poll {polls}: {via_ops} offline via Ops on process 0, {via_sql} via SQL"
                ));
            }
            tokio::select! {
                _ = stop.changed() => return (polls, violations),
                _ = tokio::time::sleep_until(t + Duration::from_millis(100)) => {}
            }
        }
    });
    let status = cluster.restart(2).await;
    // A renewal round after the start: a late sweep would show here.
    tokio::time::sleep(RENEW + Duration::from_millis(500)).await;
    stop_tx.send_replace(true);
    let (polls, violations) = poller.await.unwrap();
    assert!(status.success(), "process 2 stopped with {status}");
    assert!(polls >= 20, "only {polls} polls");
    assert!(
        violations.is_empty(),
        "devices held by processes 0 and 1 read offline at {} of {polls} polls while 2 restarted; the first: {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    println!(
        "{} devices held by the others online at all {polls} polls during the restart",
        held.len()
    );
    drop(streams);
    budget("restart of one process", started);
}

// ---- rebalancing: Control streams have a lifetime --------------------------

/// `--control-max-lifetime`: a Control stream never ends by itself, so the
/// server ends it (UNAVAILABLE, "rebalance") after its lifetime ±10%, and
/// the device reconnects, perhaps to another process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_streams_end_for_rebalancing_after_their_lifetime() {
    let lifetime = Duration::from_secs(2);
    let Some(cluster) = Cluster::start(three().args(&["--control-max-lifetime", "2s"])).await
    else {
        return;
    };
    let started = Instant::now();
    let devices = cluster.register_many("dev", 3).await;
    let mut streams = Vec::new();
    for (i, (_, token)) in devices.iter().enumerate() {
        streams.push((i, Instant::now(), cluster.control(i, token).await));
    }
    for (i, opened, mut stream) in streams {
        let ended = tokio::time::timeout(lifetime * 3, stream.rx.message())
            .await
            .unwrap_or_else(|_| panic!("the stream on process {i} outlived 3x its lifetime"))
            .expect_err("the stream ends with a status");
        let lived = opened.elapsed();
        assert_eq!(ended.code(), Code::Unavailable, "process {i}: {ended:?}");
        assert!(
            ended.message().starts_with("rebalance"),
            "process {i}: {}",
            ended.message()
        );
        // -10% of the lifetime; +10% and the scheduling margin above.
        assert!(
            lived >= lifetime.mul_f64(0.9) && lived <= lifetime.mul_f64(1.1) + MARGIN,
            "process {i}: the stream lived {lived:?}, lifetime {lifetime:?} +-10%"
        );
        println!("process {i}: the Control stream ended after {lived:?}");
    }
    budget("Control stream lifetime", started);
}

// ---- 8. SQLite: one server per database ---------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_one_sqlite_database_refuses_to_start() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args: Vec<String> = vec![
        "serve".into(),
        "--data-dir".into(),
        data.display().to_string(),
    ];
    let first_log = dir.path().join("first.log");
    let (mut first, mut lines, _) = spawn_logged(&args, &first_log).unwrap();
    let kill_first = scopeguard(move || {
        let _ = first.kill();
        let _ = first.wait();
    });
    let by = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(by, lines.recv()).await {
            Ok(Some(line)) if line["fields"]["message"] == "serving" => break,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!(
                "the first server did not serve: {}",
                std::fs::read_to_string(&first_log).unwrap_or_default()
            ),
        }
    }
    let second_log = dir.path().join("second.log");
    let (mut second, _, copier) = spawn_logged(&args, &second_log).unwrap();
    let by = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > by {
            let _ = second.kill();
            let _ = second.wait();
            panic!(
                "a second server on the same SQLite database was still running after 20 s: {}",
                std::fs::read_to_string(&second_log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The log is copied by a thread: it is complete once the copy ends.
    copier.join().unwrap();
    let log = std::fs::read_to_string(&second_log).unwrap();
    assert!(
        !status.success(),
        "the second server exited {status}: {log}"
    );
    assert!(
        log.contains("already in use by another ingest server"),
        "the second server's message: {log}"
    );
    drop(kill_first);
    budget("SQLite refusal", started);
}

/// Runs `f` when dropped, a panic included.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
