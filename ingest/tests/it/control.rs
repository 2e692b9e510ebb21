//! Device control end to end on both backends: the Control stream, the
//! durable command queue, redelivery, supersede and presence.

use std::time::Duration;

use crate::common::control::{open_control, ping, send_command};
use crate::common::*;
use telemetry_proto::v1 as pb;
use tonic::Code;

backend_tests!(
    a_command_does_not_wait_for_a_group_holding_its_device,
    a_command_to_an_online_device_is_acknowledged,
    an_offline_device_gets_its_queued_commands_in_order_on_connect,
    a_command_expires_when_its_ttl_passes_before_delivery,
    an_unacknowledged_command_is_redelivered_after_a_dropped_stream,
    a_second_stream_supersedes_the_first,
    wait_returns_on_failed_and_on_timeout,
    the_queue_limit_is_enforced,
    a_device_cannot_receive_or_acknowledge_another_devices_commands,
    presence_follows_the_control_stream,
    last_seen_is_the_last_message_heard,
    devices_are_offline_once_the_server_stops,
    queued_commands_survive_a_restart,
    the_first_message_must_be_hello,
    a_superseded_streams_late_disconnect_leaves_the_device_online,
    concurrent_senders_never_pass_the_queue_limit,
    a_control_stream_ends_for_rebalancing_after_its_lifetime,
    the_database_records_each_stream_with_a_new_generation,
);

fn interval(ms: u32) -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::SetSamplingInterval(
            pb::SetSamplingInterval { interval_ms: ms },
        )),
        ..Default::default()
    }
}

async fn a_command_to_an_online_device_is_acknowledged(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut device = ControlDevice::connect(&server, &token).await;
    let mut ops = server.ops().await;
    let sending =
        tokio::spawn(async move { send_command(&mut ops, "dev-1", ping(), 0, 5000).await });
    let command = device.command().await;
    assert!(matches!(command.kind, Some(pb::command::Kind::Ping(_))));
    assert_eq!(command.state(), pb::CommandState::Sent);
    device
        .ack(command.command_id, pb::CommandAckState::Done, "pong")
        .await;
    let done = sending.await.unwrap().unwrap();
    assert_eq!(done.command_id, command.command_id);
    assert_eq!(done.state(), pb::CommandState::Acked);
    assert_eq!(done.result, "pong");
    assert!(done.created_time_unix_nano <= done.sent_time_unix_nano);
    assert!(done.sent_time_unix_nano <= done.finished_time_unix_nano);
}

async fn an_offline_device_gets_its_queued_commands_in_order_on_connect(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut ops = server.ops().await;
    let mut ids = Vec::new();
    for ms in [100, 200, 300] {
        let queued = send_command(&mut ops, "dev-1", interval(ms), 0, 0)
            .await
            .unwrap();
        assert_eq!(queued.state(), pb::CommandState::Queued);
        ids.push(queued.command_id);
    }
    let mut device = ControlDevice::connect(&server, &token).await;
    let mut received = Vec::new();
    for _ in 0..3 {
        received.push(device.command().await.command_id);
    }
    assert_eq!(received, ids);
    // The sent mark is written just after the command goes down the stream.
    let sent = eventually_ok("the sent mark", Duration::from_secs(10), async || {
        let command = ops
            .get_command(pb::GetCommandRequest { command_id: ids[0] })
            .await
            .unwrap()
            .into_inner();
        match command.state() {
            pb::CommandState::Queued => Err("still queued".into()),
            _ => Ok(command),
        }
    })
    .await;
    assert_eq!(
        sent.state(),
        pb::CommandState::Sent,
        "delivered is not acknowledged"
    );
}

async fn a_command_expires_when_its_ttl_passes_before_delivery(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut ops = server.ops().await;
    let expired = send_command(&mut ops, "dev-1", interval(100), 300, 5000)
        .await
        .unwrap();
    assert_eq!(expired.state(), pb::CommandState::Expired);
    assert!(expired.finished_time_unix_nano > 0);
    // On connect, only the fresh command arrives.
    let fresh = send_command(&mut ops, "dev-1", ping(), 0, 0).await.unwrap();
    let mut device = ControlDevice::connect(&server, &token).await;
    assert_eq!(device.command().await.command_id, fresh.command_id);
}

async fn an_unacknowledged_command_is_redelivered_after_a_dropped_stream(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut ops = server.ops().await;
    let mut device = ControlDevice::connect(&server, &token).await;
    let queued = send_command(&mut ops, "dev-1", ping(), 0, 0).await.unwrap();
    assert_eq!(device.command().await.command_id, queued.command_id);
    drop(device); // the connection drops before the device acknowledges
    let mut device = ControlDevice::connect(&server, &token).await;
    let again = device.command().await;
    assert_eq!(
        again.command_id, queued.command_id,
        "same id, so the device can ignore a repeat"
    );
    device
        .ack(again.command_id, pb::CommandAckState::Done, "pong")
        .await;
    let done = send_command(&mut ops, "dev-1", ping(), 0, 0).await.unwrap();
    // The next command arrives; the acknowledged one is not delivered again.
    assert_eq!(device.command().await.command_id, done.command_id);
    let first = ops
        .get_command(pb::GetCommandRequest {
            command_id: queued.command_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.state(), pb::CommandState::Acked);
}

async fn a_second_stream_supersedes_the_first(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut first = ControlDevice::connect(&server, &token).await;
    let mut second = ControlDevice::connect(&server, &token).await;
    let status = first.next().await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert!(
        status.message().contains("superseded"),
        "{}",
        status.message()
    );
    let queued = send_command(&mut server.ops().await, "dev-1", ping(), 0, 0)
        .await
        .unwrap();
    assert_eq!(second.command().await.command_id, queued.command_id);
}

async fn wait_returns_on_failed_and_on_timeout(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut ops = server.ops().await;
    // Offline: the wait runs out and the command is still queued.
    let started = std::time::Instant::now();
    let waited = send_command(&mut ops, "dev-1", ping(), 0, 300)
        .await
        .unwrap();
    assert_eq!(waited.state(), pb::CommandState::Queued);
    assert!(started.elapsed() >= Duration::from_millis(300));

    let mut device = ControlDevice::connect(&server, &token).await;
    assert_eq!(device.command().await.command_id, waited.command_id);
    device
        .ack(waited.command_id, pb::CommandAckState::Done, "pong")
        .await;
    let mut ops2 = server.ops().await;
    let sending =
        tokio::spawn(async move { send_command(&mut ops2, "dev-1", interval(100), 0, 5000).await });
    let command = device.command().await;
    device
        .ack(
            command.command_id,
            pb::CommandAckState::Failed,
            "interval too short for this sensor",
        )
        .await;
    let failed = sending.await.unwrap().unwrap();
    assert_eq!(failed.state(), pb::CommandState::Failed);
    assert_eq!(failed.result, "interval too short for this sensor");
}

async fn the_queue_limit_is_enforced(backend: Backend) {
    let Some(server) =
        TestServer::start_configured(backend, |config| config.control.max_pending_per_device = 2)
            .await
    else {
        return;
    };
    server.register("dev-1").await;
    let mut ops = server.ops().await;
    send_command(&mut ops, "dev-1", ping(), 0, 0).await.unwrap();
    send_command(&mut ops, "dev-1", ping(), 0, 0).await.unwrap();
    let status = send_command(&mut ops, "dev-1", ping(), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("queue is full"),
        "{}",
        status.message()
    );
    let bad = send_command(&mut ops, "dev-1", interval(1), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let missing = send_command(&mut ops, "nobody", ping(), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

async fn a_device_cannot_receive_or_acknowledge_another_devices_commands(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let a = server.register("dev-a").await;
    let b = server.register("dev-b").await;
    let mut ops = server.ops().await;
    let mut device_a = ControlDevice::connect(&server, &a).await;
    let mut device_b = ControlDevice::connect(&server, &b).await;
    let for_b = send_command(&mut ops, "dev-b", ping(), 0, 0).await.unwrap();
    assert_eq!(device_b.command().await.command_id, for_b.command_id);
    // A claims B's command.
    device_a
        .ack(for_b.command_id, pb::CommandAckState::Done, "mine")
        .await;
    // A's own command goes through A's stream, after its bogus ack was handled.
    let mut ops2 = server.ops().await;
    let sending =
        tokio::spawn(async move { send_command(&mut ops2, "dev-a", ping(), 0, 5000).await });
    let for_a = device_a.command().await;
    device_a
        .ack(for_a.command_id, pb::CommandAckState::Done, "pong")
        .await;
    assert_eq!(
        sending.await.unwrap().unwrap().state(),
        pb::CommandState::Acked
    );
    let b_state = ops
        .get_command(pb::GetCommandRequest {
            command_id: for_b.command_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        b_state.state(),
        pb::CommandState::Sent,
        "A's acknowledgement was ignored"
    );
    assert_eq!(b_state.result, "");
}

async fn presence_follows_the_control_stream(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut ops = server.ops().await;
    let get = |ops: &mut Ops| {
        let mut ops = ops.clone();
        async move {
            ops.get_device(pb::GetDeviceRequest {
                device_id: "dev-1".into(),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let before = get(&mut ops).await;
    assert!(!before.online);
    assert_eq!(before.last_seen_time_unix_nano, 0);
    let device = ControlDevice::connect(&server, &token).await;
    let online = get(&mut ops).await;
    assert!(online.online);
    assert_eq!(online.firmware_version, "test-1.2");
    assert!(online.last_seen_time_unix_nano > 0);
    let listed = ops
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert!(listed[0].online);
    drop(device);
    // The server notices the stream end on its own; wait for it.
    let offline = loop {
        let d = get(&mut ops).await;
        if !d.online {
            break d;
        }
        tokio::task::yield_now().await;
    };
    assert!(offline.last_seen_time_unix_nano >= online.last_seen_time_unix_nano);
}

/// The database's `last_seen` is refreshed every few seconds; the RPCs
/// answer with the live value.
async fn last_seen_is_the_last_message_heard(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut device = ControlDevice::connect(&server, &token).await;
    let mut ops = server.ops().await;
    let connected = ops
        .get_device(pb::GetDeviceRequest {
            device_id: "dev-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .last_seen_time_unix_nano;
    let mut sender = ops.clone();
    let sending =
        tokio::spawn(async move { send_command(&mut sender, "dev-1", ping(), 0, 5000).await });
    let command = device.command().await;
    let before_ack = now_nanos();
    device
        .ack(command.command_id, pb::CommandAckState::Done, "pong")
        .await;
    // Returns once the server has handled the acknowledgement.
    sending.await.unwrap().unwrap();
    let got = ops
        .get_device(pb::GetDeviceRequest {
            device_id: "dev-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.last_seen_time_unix_nano >= before_ack);
    assert!(before_ack > connected);
    let listed = ops
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert!(listed[0].last_seen_time_unix_nano >= before_ack);
    // The database catches up within its write interval (5 s).
    let sql = "SELECT COALESCE(last_seen_unix_nano, 0) FROM devices WHERE device_id = 'dev-1'";
    eventually("last_seen written", Duration::from_secs(20), async || {
        server.storage.scalar(sql).await as u64 >= before_ack
    })
    .await;
    drop(device);
}

/// SQL readers see no device online while no server runs, even one whose
/// control stream was open when the server stopped.
async fn devices_are_offline_once_the_server_stops(backend: Backend) {
    let Some(mut server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let device = ControlDevice::connect(&server, &token).await;
    let online = "SELECT online FROM device_status WHERE device_id = 'dev-1'";
    assert_eq!(server.storage.scalar(online).await, 1);
    server.stop().await;
    assert_eq!(server.storage.scalar(online).await, 0);
    drop(device);
}

async fn queued_commands_survive_a_restart(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let queued = send_command(&mut server.ops().await, "dev-1", interval(250), 0, 0)
        .await
        .unwrap();
    let server = server.restart().await;
    let mut device = ControlDevice::connect(&server, &token).await;
    let command = device.command().await;
    assert_eq!(command.command_id, queued.command_id);
    assert!(matches!(
        command.kind,
        Some(pb::command::Kind::SetSamplingInterval(
            pb::SetSamplingInterval { interval_ms: 250 }
        ))
    ));
}

async fn the_first_message_must_be_hello(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let status_msg = pb::DeviceMessage {
        msg: Some(pb::device_message::Msg::Status(pb::DeviceStatus::default())),
    };
    let (_tx, opened) = open_control(server.ingest(&token).await, vec![status_msg]).await;
    let status = opened.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("DeviceHello"));
}

async fn online(server: &TestServer, device: &str) -> bool {
    server.device(device).await.online
}

/// The old stream ends after the new one opened: its goodbye must not
/// mark the device offline (the database checks the stream's generation).
async fn a_superseded_streams_late_disconnect_leaves_the_device_online(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut first = ControlDevice::connect(&server, &token).await;
    let mut second = ControlDevice::connect(&server, &token).await;
    assert_eq!(first.next().await.unwrap_err().code(), Code::Aborted);
    drop(first);
    // The server has handled the first stream's end once its session row
    // is not the newest any more and a command still reaches the second.
    let queued = send_command(&mut server.ops().await, "dev-1", ping(), 0, 0)
        .await
        .unwrap();
    assert_eq!(second.command().await.command_id, queued.command_id);
    assert!(online(&server, "dev-1").await);
    assert_eq!(
        server
            .storage
            .scalar("SELECT COUNT(*) FROM devices WHERE online")
            .await,
        1,
        "the devices table agrees"
    );
}

/// Twenty SendCommands at once against a limit of 10: exactly 10 queue.
async fn concurrent_senders_never_pass_the_queue_limit(backend: Backend) {
    let Some(server) =
        TestServer::start_configured(backend, |config| config.control.max_pending_per_device = 10)
            .await
    else {
        return;
    };
    server.register("dev-1").await;
    let mut sends = Vec::new();
    for _ in 0..20 {
        let mut ops = server.ops().await;
        sends.push(tokio::spawn(async move {
            send_command(&mut ops, "dev-1", ping(), 0, 0).await
        }));
    }
    let (mut queued, mut refused) = (0, 0);
    for s in sends {
        match s.await.unwrap() {
            Ok(_) => queued += 1,
            Err(status) if status.code() == Code::ResourceExhausted => refused += 1,
            Err(status) => panic!("unexpected {status:?}"),
        }
    }
    assert_eq!((queued, refused), (10, 10));
    assert_eq!(
        server
            .storage
            .scalar("SELECT COUNT(*) FROM commands WHERE state = 'queued'")
            .await,
        10
    );
}

async fn a_control_stream_ends_for_rebalancing_after_its_lifetime(backend: Backend) {
    let Some(server) = TestServer::start_configured(backend, |config| {
        config.control.max_lifetime = Some(Duration::from_millis(300))
    })
    .await
    else {
        return;
    };
    let token = server.register("dev-1").await;
    let started = std::time::Instant::now();
    let mut device = ControlDevice::connect(&server, &token).await;
    let status = device.next().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().starts_with("rebalance"),
        "{}",
        status.message()
    );
    // ±10% of the lifetime.
    assert!(started.elapsed() >= Duration::from_millis(270));
    // The device reconnects and goes on.
    let mut again = ControlDevice::connect(&server, &token).await;
    let queued = send_command(&mut server.ops().await, "dev-1", ping(), 0, 0)
        .await
        .unwrap();
    assert_eq!(again.command().await.command_id, queued.command_id);
}

async fn the_database_records_each_stream_with_a_new_generation(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let generation = "SELECT generation FROM device_sessions s JOIN devices d ON d.pk = s.device_pk \
                      WHERE d.device_id = 'dev-1' AND s.replica_id IS NOT NULL";
    let first = ControlDevice::connect(&server, &token).await;
    // Recorded before the stream serves: a command proves it serves.
    let mut second = ControlDevice::connect(&server, &token).await;
    let queued = send_command(&mut server.ops().await, "dev-1", ping(), 0, 0)
        .await
        .unwrap();
    assert_eq!(second.command().await.command_id, queued.command_id);
    assert_eq!(server.storage.scalar(generation).await, 2);
    drop(first);
    drop(second);
    let offline = loop {
        if !online(&server, "dev-1").await {
            break true;
        }
        tokio::task::yield_now().await;
    };
    assert!(offline);
    assert_eq!(
        server
            .storage
            .scalar("SELECT COUNT(*) FROM device_sessions WHERE replica_id IS NOT NULL")
            .await,
        0,
        "no stream is recorded once both ended"
    );
}

/// A group commit holds its devices' rows until it commits; queueing a
/// command to one of them must not wait for it on PostgreSQL (the group
/// takes `FOR NO KEY UPDATE`, the queue has a lock of its own). The group
/// is held open by the test hook that holds a transaction recording alert
/// events. SQLite has one write lock: there the command waits its turn, and
/// only its outcome is checked.
async fn a_command_does_not_wait_for_a_group_holding_its_device(backend: Backend) {
    use crate::common::alert_helpers::{put, temperatures, too_hot};
    const HOLD: Duration = Duration::from_secs(5);
    let Some(server) = TestServer::start_configured(backend, |config| {
        config.test_hold_event_tx = HOLD;
    })
    .await
    else {
        return;
    };
    let mut ops = server.ops().await;
    put(&mut ops, too_hot()).await;
    let token = server.register("hot-1").await;
    let mut ingest = server.ingest(&token).await;
    // 45 degrees fires the rule: its group takes event ids and is held.
    let mut upload =
        tokio::spawn(
            async move { temperatures(&mut ingest, 1, now_nanos() - 10 * SEC, &[45.0]).await },
        );
    if backend == Backend::Postgres {
        eventually("the group to be held open", HOLD, async || {
            server
                .storage
                .scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND state = 'idle in transaction'",
                )
                .await
                > 0
        })
        .await;
        let command = tokio::select! {
            biased;
            summary = &mut upload => panic!("the group committed first: {summary:?}"),
            command = send_command(&mut ops, "hot-1", ping(), 60_000, 0) => command.unwrap(),
        };
        assert_eq!(command.state, pb::CommandState::Queued as i32);
    } else {
        let command = send_command(&mut ops, "hot-1", ping(), 60_000, 0)
            .await
            .unwrap();
        assert_eq!(command.state, pb::CommandState::Queued as i32);
    }
    let summary = upload.await.unwrap();
    assert_eq!(summary.committed_sequence, 1);
}
