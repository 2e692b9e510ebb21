//! Hostile input and resource bounds (issue 11), on both backends, against
//! the real server: every case gets a precise status naming what to change,
//! and nothing of a refused request reaches the database.

use std::time::Duration;

use crate::common::control::{hello, open_control, ping, send_command};
use crate::common::*;
use bytes::Bytes;
use ingest::Limits;
use prost::Message;
use telemetry_proto::raw::RawCodec;
use telemetry_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

backend_tests!(
    free_text_with_nul_or_escapes_is_refused_at_registration,
    a_hello_with_bad_firmware_is_refused_and_nothing_recorded,
    an_ack_with_a_nul_detail_ends_the_stream_and_records_nothing,
    oversized_messages_are_resource_exhausted_on_every_service,
    undecodable_messages_are_internal_and_name_the_method,
    a_flood_of_series_is_refused_while_decoding,
    sensors_past_the_device_limit_are_rejected_and_the_rest_kept,
    the_summary_lists_at_most_1024_sensors,
    silent_streams_are_ended_naming_their_limit,
    a_connection_without_a_preface_is_closed,
    the_server_pings_and_closes_a_connection_that_does_not_answer,
    a_quiet_healthy_control_stream_is_not_cut,
    a_device_over_its_reading_rate_is_held_back_not_refused,
    stream_opens_past_the_rate_get_a_retry_delay,
    a_hostile_corpus_gets_precise_statuses_and_changes_nothing,
);

/// Rows of every table a request could write to.
async fn snapshot(server: &TestServer) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in [
        "devices",
        "sensors",
        "readings",
        "commands",
        "alert_rules",
        "alert_events",
    ] {
        counts.push(
            server
                .storage
                .scalar(&format!("SELECT COUNT(*) FROM {table}"))
                .await,
        );
    }
    counts.push(
        server
            .storage
            .scalar("SELECT COUNT(*) FROM devices WHERE online OR firmware_version IS NOT NULL")
            .await,
    );
    counts
}

fn expect(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the server accepted what it must refuse");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} does not say {needle:?}",
        status.message()
    );
}

/// One unary call with hand-made bytes.
async fn raw_unary<M: Message + Default + Send + 'static>(
    server: &TestServer,
    path: &'static str,
    token: &str,
    body: Vec<u8>,
) -> Result<M, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(Bytes::from(body));
    Bearer::new(token).unwrap().authorize(&mut request);
    grpc.unary(
        request,
        PathAndQuery::from_static(path),
        RawCodec::<M>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// An upload stream of hand-made messages.
async fn raw_upload(
    server: &TestServer,
    token: &str,
    messages: Vec<Vec<u8>>,
) -> Result<pb::UploadSummary, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter(
        messages.into_iter().map(Bytes::from).collect::<Vec<_>>(),
    ));
    Bearer::new(token).unwrap().authorize(&mut request);
    grpc.client_streaming(
        request,
        PathAndQuery::from_static("/telemetry.v1.Ingest/UploadReadings"),
        RawCodec::<pb::UploadSummary>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

fn register(id: &str, display_name: &str, labels: &[(&str, &str)]) -> pb::RegisterDeviceRequest {
    pb::RegisterDeviceRequest {
        device_id: id.into(),
        display_name: display_name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// Opens a Control stream whose first messages are `first`; the sender
/// keeps the stream open.
async fn control(
    server: &TestServer,
    token: &str,
    first: Vec<pb::DeviceMessage>,
) -> (
    mpsc::Sender<pb::DeviceMessage>,
    Result<tonic::Streaming<pb::ServerMessage>, tonic::Status>,
) {
    open_control(server.ingest(token).await, first).await
}

async fn next_status(stream: &mut tonic::Streaming<pb::ServerMessage>) -> tonic::Status {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream neither answered nor ended")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => return status,
        }
    }
}

async fn free_text_with_nul_or_escapes_is_refused_at_registration(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    // Serving: the schema is in place.
    server.register("d0").await;
    let before = snapshot(&server).await;
    let mut ops = server.ops().await;
    let long = "x".repeat(257);
    for (request, needle) in [
        (
            register("d1", "pump\0", &[]),
            "display_name contains NUL (U+0000)",
        ),
        (
            register("d1", "\x1b[2Jpump", &[]),
            "display_name contains ESC",
        ),
        (
            register("d1", "pu\u{9b}31mmp", &[]),
            "display_name contains CSI",
        ),
        (
            register("d1", &long, &[]),
            "display_name is too long: 257 characters, at most 256",
        ),
        (
            register("d1", "ok", &[("site", "a\0b")]),
            "the value of label \"site\" contains NUL",
        ),
        (
            register("d1", "ok", &[("site", "\x07")]),
            "the value of label \"site\" contains control character U+0007",
        ),
    ] {
        expect(
            ops.register_device(request).await,
            Code::InvalidArgument,
            needle,
        );
    }
    assert_eq!(snapshot(&server).await, before);
    // Printable Unicode and tabs are fine.
    ops.register_device(register("d1", "Pumpe\tÜberlauf ✓", &[("site", "Köln")]))
        .await
        .unwrap();
}

async fn a_hello_with_bad_firmware_is_refused_and_nothing_recorded(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("d1").await;
    let before = snapshot(&server).await;
    let long = "1".repeat(129);
    for (firmware, needle) in [
        ("v1\0", "DeviceHello.firmware_version contains NUL"),
        (
            "\x1b]0;owned\x07",
            "DeviceHello.firmware_version contains ESC",
        ),
        (
            long.as_str(),
            "DeviceHello.firmware_version is too long: 129 characters, at most 128",
        ),
    ] {
        let (_tx, opened) = control(&server, &token, vec![hello(firmware)]).await;
        expect(opened.map(|_| ()), Code::InvalidArgument, needle);
    }
    assert_eq!(
        snapshot(&server).await,
        before,
        "presence or firmware was recorded"
    );
    let device = server.device("d1").await;
    assert!(!device.online);
    assert_eq!(device.firmware_version, "");
}

async fn an_ack_with_a_nul_detail_ends_the_stream_and_records_nothing(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("d1").await;
    let mut ops = server.ops().await;
    let mut device = ControlDevice::open(server.ingest(&token).await, "fw-1")
        .await
        .unwrap();
    let sent = send_command(&mut ops, "d1", ping(), 0, 0).await.unwrap();
    let command = device.command().await;
    assert_eq!(command.command_id, sent.command_id);
    device
        .ack(sent.command_id, pb::CommandAckState::Done, "done\0")
        .await;
    let status = next_status(&mut device.rx).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "CommandAck.detail (command {}) contains NUL",
            sent.command_id
        )),
        "{status:?}"
    );
    let stored = ops
        .get_command(pb::GetCommandRequest {
            command_id: sent.command_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(stored.state(), pb::CommandState::Acked);
    assert_eq!(stored.result, "");
}

async fn oversized_messages_are_resource_exhausted_on_every_service(backend: Backend) {
    let limits = Limits {
        max_message_bytes: 16 * 1024,
        ..Limits::default()
    };
    let Some(server) = TestServer::start_with(backend, limits).await else {
        return;
    };
    let token = server.register("d1").await;
    let before = snapshot(&server).await;
    let big = "x".repeat(20 * 1024);
    expect(
        server
            .ops()
            .await
            .register_device(register("d2", &big, &[]))
            .await,
        Code::ResourceExhausted,
        "telemetry.v1.Ops/RegisterDevice: message larger than the server's limit of 16384 bytes (--max-message-bytes)",
    );
    let (_tx, opened) = control(&server, &token, vec![hello(&big)]).await;
    expect(
        opened.map(|_| ()),
        Code::ResourceExhausted,
        "telemetry.v1.Ingest/Control: message larger than the server's limit of 16384 bytes (--max-message-bytes)",
    );
    let points: Vec<_> = (0..2000).map(|i| (now_nanos() - i, 1.0)).collect();
    let mut ingest = server.ingest(&token).await;
    expect(
        upload(&mut ingest, vec![batch(1, vec![series("t", "", &points)])]).await,
        Code::ResourceExhausted,
        "telemetry.v1.Ingest/UploadReadings: message larger than the server's limit of 16384 bytes (--max-message-bytes)",
    );
    assert_eq!(snapshot(&server).await, before);
}

async fn undecodable_messages_are_internal_and_name_the_method(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("d1").await;
    let before = snapshot(&server).await;
    // A length that runs past the end; a string that is not UTF-8; a wire
    // type that does not exist.
    for body in [
        vec![0x0a, 0x7f, b'a'],
        vec![0x0a, 0x02, 0xff, 0xfe],
        vec![0x0f],
    ] {
        expect(
            raw_unary::<pb::RegisterDeviceResponse>(
                &server,
                "/telemetry.v1.Ops/RegisterDevice",
                OPS_TOKEN,
                body.clone(),
            )
            .await,
            Code::Internal,
            "telemetry.v1.Ops/RegisterDevice: ",
        );
        expect(
            raw_upload(&server, &token, vec![body]).await,
            Code::Internal,
            "telemetry.v1.Ingest/UploadReadings: ",
        );
    }
    assert_eq!(snapshot(&server).await, before);
}

async fn a_flood_of_series_is_refused_while_decoding(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("d1").await;
    let before = snapshot(&server).await;
    let mut flood = vec![0x08, 0x01];
    for _ in 0..100_000 {
        flood.extend_from_slice(&[0x12, 0x00]);
    }
    expect(
        raw_upload(&server, &token, vec![flood]).await,
        Code::ResourceExhausted,
        "more than 1024 series, the server's limit per batch (--max-batch-series)",
    );
    assert_eq!(snapshot(&server).await, before);
    // At the limit is fine.
    let t = now_nanos();
    let at_limit: Vec<_> = (0..1024).map(|_| series("t", "", &[(t, 1.0)])).collect();
    let summary = upload(&mut server.ingest(&token).await, vec![batch(1, at_limit)])
        .await
        .unwrap();
    assert_eq!(summary.readings_accepted, 1024);
}

async fn sensors_past_the_device_limit_are_rejected_and_the_rest_kept(backend: Backend) {
    let Some(server) = TestServer::start_configured(backend, |c| {
        c.writer.max_sensors_per_device = 3;
    })
    .await
    else {
        return;
    };
    let token = server.register("d1").await;
    let mut ingest = server.ingest(&token).await;
    let t = now_nanos();
    let s = |name: &str, n: u64| {
        let points: Vec<_> = (0..n).map(|i| (t - i, 1.0)).collect();
        series(name, "", &points)
    };
    let summary = upload(
        &mut ingest,
        vec![
            batch(1, vec![s("a", 2), s("b", 2)]),
            batch(2, vec![s("c", 1), s("d", 3), s("a", 1), s("e", 4)]),
        ],
    )
    .await
    .unwrap();
    assert_eq!(summary.readings_accepted, 6);
    assert_eq!(summary.readings_rejected, 7);
    assert_eq!(
        summary.rejections,
        vec![pb::RejectionCount {
            reason: pb::RejectReason::TooManySensors as i32,
            count: 7
        }]
    );
    assert_eq!(
        summary
            .first_rejected
            .iter()
            .map(|r| (r.sequence, r.series_index))
            .collect::<Vec<_>>(),
        vec![(2, 1), (2, 3)]
    );
    let names: Vec<_> = summary.sensors.iter().map(|s| s.sensor.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(server.storage.count_readings().await, 6);
    assert_eq!(
        server.storage.scalar("SELECT COUNT(*) FROM sensors").await,
        3
    );
    // Known sensors keep working.
    let summary = upload(&mut ingest, vec![batch(3, vec![s("b", 5)])])
        .await
        .unwrap();
    assert_eq!(summary.readings_accepted, 5);
}

async fn the_summary_lists_at_most_1024_sensors(backend: Backend) {
    let Some(server) = TestServer::start_configured(backend, |c| {
        c.writer.max_sensors_per_device = 2000;
        c.limits.readings.max_batch_series = 2000;
    })
    .await
    else {
        return;
    };
    let token = server.register("d1").await;
    let t = now_nanos();
    let many: Vec<_> = (0..1100)
        .map(|i| series(&format!("s{i:04}"), "", &[(t, 1.0)]))
        .collect();
    let summary = upload(&mut server.ingest(&token).await, vec![batch(1, many)])
        .await
        .unwrap();
    assert_eq!(summary.readings_accepted, 1100);
    assert_eq!(summary.sensors.len(), 1024);
    assert!(summary.sensors_truncated);
}

async fn silent_streams_are_ended_naming_their_limit(backend: Backend) {
    let Some(server) = TestServer::start_configured(backend, |c| {
        c.limits.upload_timeouts.first_message = Duration::from_millis(300);
        c.limits.upload_timeouts.idle = Duration::from_millis(300);
        c.control.hello_timeout = Duration::from_millis(300);
    })
    .await
    else {
        return;
    };
    let token = server.register("d1").await;
    let mut ingest = server.ingest(&token).await;

    let (tx, rx) = mpsc::channel::<pb::ReadingBatch>(4);
    expect(
        ingest.upload_readings(ReceiverStream::new(rx)).await,
        Code::DeadlineExceeded,
        "--upload-first-message-timeout",
    );
    drop(tx);

    let (tx, rx) = mpsc::channel::<pb::ReadingBatch>(4);
    tx.send(simple_batch(1, 3)).await.unwrap();
    expect(
        ingest.upload_readings(ReceiverStream::new(rx)).await,
        Code::DeadlineExceeded,
        "--upload-idle-timeout",
    );
    drop(tx);
    // The batch before the silence is committed and the status said so.
    assert_eq!(cursor(&mut ingest).await, 1);

    let (_tx, opened) = control(&server, &token, vec![]).await;
    expect(
        opened.map(|_| ()),
        Code::DeadlineExceeded,
        "--control-hello-timeout",
    );
}

async fn a_connection_without_a_preface_is_closed(backend: Backend) {
    let Some(server) = TestServer::start_configured(backend, |c| {
        c.limits.handshake_timeout = Duration::from_millis(300);
    })
    .await
    else {
        return;
    };
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 64];
    // Whatever the server writes first (its SETTINGS), it then closes.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection stayed open");
    // A real client still connects.
    server.register("d1").await;
}

async fn the_server_pings_and_closes_a_connection_that_does_not_answer(backend: Backend) {
    let Some(server) = TestServer::start_configured(backend, |c| {
        c.limits.keepalive_interval = Duration::from_millis(200);
        c.limits.keepalive_timeout = Duration::from_millis(200);
    })
    .await
    else {
        return;
    };
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // An empty SETTINGS frame, then silence: no PING is ever answered.
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut pinged = false;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut header = [0u8; 9];
        loop {
            if tcp.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let (kind, flags) = (header[3], header[4]);
            if kind == 6 && flags & 1 == 0 {
                pinged = true;
            }
            let mut payload = vec![0u8; len];
            if tcp.read_exact(&mut payload).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(pinged, "the server sent no PING");
    assert!(ended.is_ok(), "a connection that ignores PINGs stayed open");
}

async fn a_quiet_healthy_control_stream_is_not_cut(backend: Backend) {
    let Some(server) = TestServer::start_configured(backend, |c| {
        c.limits.keepalive_interval = Duration::from_millis(100);
        c.limits.keepalive_timeout = Duration::from_millis(200);
        c.limits.upload_timeouts.idle = Duration::from_millis(200);
    })
    .await
    else {
        return;
    };
    let token = server.register("d1").await;
    let (_tx, opened) = control(&server, &token, vec![hello("fw")]).await;
    let mut stream = opened.unwrap();
    // Many keepalive rounds, and longer than any stream timeout, with no
    // message either way: the client answers PINGs, so nothing is cut.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = send_command(&mut server.ops().await, "d1", ping(), 0, 0)
        .await
        .unwrap();
    let delivered = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .expect("the quiet stream was cut")
        .unwrap();
    let Some(pb::server_message::Msg::Command(command)) = delivered.msg else {
        panic!("expected the command");
    };
    assert_eq!(command.command_id, sent.command_id);
}

async fn a_device_over_its_reading_rate_is_held_back_not_refused(backend: Backend) {
    let Some(server) = TestServer::start_configured(backend, |c| {
        c.limits.max_readings_per_second_per_device = 1000;
    })
    .await
    else {
        return;
    };
    let token = server.register("d1").await;
    let started = std::time::Instant::now();
    let summary = upload(
        &mut server.ingest(&token).await,
        (1..=3).map(|i| simple_batch(i, 1000)).collect(),
    )
    .await
    .unwrap();
    assert_eq!(summary.readings_accepted, 3000);
    // A second's burst, then 2000 readings at 1000/s.
    assert!(
        (1_900..=6_000).contains(&summary.throttled_millis),
        "throttled {} ms",
        summary.throttled_millis
    );
    assert!(started.elapsed() >= Duration::from_millis(1_900));
    assert_eq!(server.storage.count_readings().await, 3000);
}

async fn stream_opens_past_the_rate_get_a_retry_delay(backend: Backend) {
    use tonic_types::StatusExt;
    let Some(server) = TestServer::start_configured(backend, |c| {
        c.limits.max_stream_opens_per_minute_per_device = 2;
    })
    .await
    else {
        return;
    };
    let token = server.register("d1").await;
    let mut ingest = server.ingest(&token).await;
    upload(&mut ingest, vec![simple_batch(1, 1)]).await.unwrap();
    upload(&mut ingest, vec![simple_batch(2, 1)]).await.unwrap();
    let status = upload(&mut ingest, vec![simple_batch(3, 1)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("--max-stream-opens-per-minute-per-device")
    );
    let retry = status
        .get_details_retry_info()
        .expect("RetryInfo in the status details");
    let delay = retry.retry_delay.expect("a retry delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(30),
        "{delay:?}"
    );
    // The refused stream stored nothing; Control streams count too.
    assert_eq!(cursor(&mut ingest).await, 2);
    let (_tx, opened) = control(&server, &token, vec![hello("fw")]).await;
    assert_eq!(opened.unwrap_err().code(), Code::ResourceExhausted);
    // Another device has its own allowance.
    let other = server.register("d2").await;
    upload(&mut server.ingest(&other).await, vec![simple_batch(1, 1)])
        .await
        .unwrap();
}

/// One hostile request and what it must get.
struct Case {
    name: &'static str,
    path: &'static str,
    /// The ops token, or the device's.
    ops: bool,
    body: Vec<u8>,
    code: Code,
    needle: &'static str,
}

fn case(
    name: &'static str,
    path: &'static str,
    ops: bool,
    body: impl Message,
    code: Code,
    needle: &'static str,
) -> Case {
    Case {
        name,
        path,
        ops,
        body: body.encode_to_vec(),
        code,
        needle,
    }
}

fn raw(
    name: &'static str,
    path: &'static str,
    ops: bool,
    body: &[u8],
    code: Code,
    needle: &'static str,
) -> Case {
    Case {
        name,
        path,
        ops,
        body: body.to_vec(),
        code,
        needle,
    }
}

async fn a_hostile_corpus_gets_precise_statuses_and_changes_nothing(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("d1").await;
    let before = snapshot(&server).await;
    const REGISTER: &str = "/telemetry.v1.Ops/RegisterDevice";
    const GET: &str = "/telemetry.v1.Ops/GetDevice";
    const LIST: &str = "/telemetry.v1.Ops/ListDevices";
    const SEND: &str = "/telemetry.v1.Ops/SendCommand";
    const RULE: &str = "/telemetry.v1.Ops/PutAlertRule";
    const ALERTS: &str = "/telemetry.v1.Ops/ListAlerts";
    const ACK: &str = "/telemetry.v1.Ops/AckAlert";
    const COMMANDS: &str = "/telemetry.v1.Ops/ListCommands";
    const CURSOR: &str = "/telemetry.v1.Ingest/GetUploadCursor";
    let random: Vec<u8> = (0..512u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let cases = vec![
        raw(
            "random bytes",
            REGISTER,
            true,
            &random,
            Code::Internal,
            "telemetry.v1.Ops/RegisterDevice: ",
        ),
        raw(
            "random bytes",
            SEND,
            true,
            &random,
            Code::Internal,
            "telemetry.v1.Ops/SendCommand: ",
        ),
        raw(
            "random bytes",
            CURSOR,
            false,
            &random,
            Code::Internal,
            "telemetry.v1.Ingest/GetUploadCursor: ",
        ),
        raw(
            "wrong wire type (varint for a string)",
            REGISTER,
            true,
            &[0x08, 0x01],
            Code::Internal,
            "RegisterDevice",
        ),
        raw(
            "invalid UTF-8 in a device id",
            GET,
            true,
            &[0x0a, 0x03, b'a', 0xc3, 0x28],
            Code::Internal,
            "GetDevice",
        ),
        case(
            "NUL in a device id",
            REGISTER,
            true,
            register("a\0b", "", &[]),
            Code::InvalidArgument,
            "device id",
        ),
        case(
            "escape in a device id",
            GET,
            true,
            pb::GetDeviceRequest {
                device_id: "\x1b[2J".into(),
            },
            Code::InvalidArgument,
            "device id",
        ),
        case(
            "huge device id",
            GET,
            true,
            pb::GetDeviceRequest {
                device_id: "a".repeat(100_000),
            },
            Code::InvalidArgument,
            "device id",
        ),
        case(
            "NUL in a label key",
            REGISTER,
            true,
            register("d9", "", &[("a\0", "v")]),
            Code::InvalidArgument,
            "label key",
        ),
        case(
            "33 labels",
            REGISTER,
            true,
            pb::RegisterDeviceRequest {
                device_id: "d9".into(),
                labels: (0..33).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "too many labels",
        ),
        case(
            "forged page token",
            LIST,
            true,
            pb::ListDevicesRequest {
                page_size: u32::MAX,
                page_token: "zz\0".into(),
            },
            Code::InvalidArgument,
            "page_token",
        ),
        case(
            "command for an unknown device",
            SEND,
            true,
            pb::SendCommandRequest {
                device_id: "nobody".into(),
                command: Some(ping()),
                ..Default::default()
            },
            Code::NotFound,
            "nobody",
        ),
        case(
            "command without a kind",
            SEND,
            true,
            pb::SendCommandRequest {
                device_id: "d1".into(),
                command: Some(pb::Command::default()),
                ..Default::default()
            },
            Code::InvalidArgument,
            "command",
        ),
        case(
            "ttl of u64::MAX",
            SEND,
            true,
            pb::SendCommandRequest {
                device_id: "d1".into(),
                command: Some(ping()),
                ttl_millis: u64::MAX,
                ..Default::default()
            },
            Code::InvalidArgument,
            "ttl",
        ),
        case(
            "sampling interval 0",
            SEND,
            true,
            pb::SendCommandRequest {
                device_id: "d1".into(),
                command: Some(pb::Command {
                    kind: Some(pb::command::Kind::SetSamplingInterval(
                        pb::SetSamplingInterval { interval_ms: 0 },
                    )),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Code::InvalidArgument,
            "interval",
        ),
        case(
            "NUL in a sensor to disable",
            SEND,
            true,
            pb::SendCommandRequest {
                device_id: "d1".into(),
                command: Some(pb::Command {
                    kind: Some(pb::command::Kind::SetSensorEnabled(pb::SetSensorEnabled {
                        sensor: "t\0".into(),
                        enabled: false,
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Code::InvalidArgument,
            "sensor",
        ),
        case(
            "custom command that is not JSON",
            SEND,
            true,
            pb::SendCommandRequest {
                device_id: "d1".into(),
                command: Some(pb::Command {
                    kind: Some(pb::command::Kind::Custom(pb::CustomCommand {
                        json: "{\0".into(),
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Code::InvalidArgument,
            "JSON",
        ),
        case(
            "rule with NUL in its id",
            RULE,
            true,
            pb::PutAlertRuleRequest {
                rule: Some(pb::AlertRule {
                    rule_id: "r\0".into(),
                    ..Default::default()
                }),
            },
            Code::InvalidArgument,
            "rule",
        ),
        case(
            "rule with a NaN threshold",
            RULE,
            true,
            pb::PutAlertRuleRequest {
                rule: Some(pb::AlertRule {
                    rule_id: "r1".into(),
                    sensor: "t".into(),
                    severity: pb::Severity::Warning as i32,
                    condition: Some(pb::alert_rule::Condition::Threshold(
                        pb::ThresholdCondition {
                            direction: 1,
                            fire_value: f64::NAN,
                            clear_value: 0.0,
                            for_millis: u64::MAX,
                        },
                    )),
                    ..Default::default()
                }),
            },
            Code::InvalidArgument,
            "invalid alert rule",
        ),
        case(
            "rule selecting a label value with NUL",
            RULE,
            true,
            pb::PutAlertRuleRequest {
                rule: Some(pb::AlertRule {
                    rule_id: "r1".into(),
                    sensor: "t".into(),
                    severity: pb::Severity::Warning as i32,
                    devices: Some(pb::DeviceSelector {
                        selector: Some(pb::device_selector::Selector::Labels(pb::LabelMatch {
                            labels: [("site".to_owned(), "\0".to_owned())].into(),
                        })),
                    }),
                    condition: Some(pb::alert_rule::Condition::Inactivity(
                        pb::InactivityCondition {
                            silence_millis: 1000,
                        },
                    )),
                    warnings: Vec::new(),
                }),
            },
            Code::InvalidArgument,
            "contains NUL",
        ),
        case(
            "alerts of a NUL device",
            ALERTS,
            true,
            pb::ListAlertsRequest {
                device_ids: vec!["\0".into()],
                limit: u32::MAX,
                ..Default::default()
            },
            Code::InvalidArgument,
            "device_ids",
        ),
        case(
            "ack of alert u64::MAX",
            ACK,
            true,
            pb::AckAlertRequest { alert_id: u64::MAX },
            Code::NotFound,
            "alert",
        ),
        case(
            "commands of a NUL device",
            COMMANDS,
            true,
            pb::ListCommandsRequest {
                device_id: "\0".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "device id",
        ),
        case(
            "ops call with a device token",
            LIST,
            false,
            pb::ListDevicesRequest::default(),
            Code::Unauthenticated,
            "ops token",
        ),
    ];
    for c in cases {
        let token = if c.ops { OPS_TOKEN } else { token.as_str() };
        let result = raw_unary::<()>(&server, c.path, token, c.body).await;
        let status = match result {
            Ok(_) => panic!("{}: accepted", c.name),
            Err(status) => status,
        };
        assert_eq!(status.code(), c.code, "{}: {status:?}", c.name);
        assert!(
            status.message().contains(c.needle),
            "{}: {:?} does not say {:?}",
            c.name,
            status.message(),
            c.needle
        );
    }

    // Uploads: each its own stream.
    let t = now_nanos();
    let uploads: Vec<(&str, pb::ReadingBatch, Code, &str)> = vec![
        (
            "sequence 0",
            batch(0, vec![series("t", "", &[(t, 1.0)])]),
            Code::InvalidArgument,
            "sequence must start at 1",
        ),
        (
            "sequence u64::MAX",
            batch(u64::MAX, vec![series("t", "", &[(t, 1.0)])]),
            Code::InvalidArgument,
            "larger than the largest supported",
        ),
        (
            "mismatched columns",
            batch(
                1,
                vec![pb::SensorSeries {
                    sensor: "t".into(),
                    unit: String::new(),
                    time_unix_nano: vec![t, t],
                    value: vec![1.0],
                }],
            ),
            Code::InvalidArgument,
            "must have the same length",
        ),
        (
            "too many readings",
            simple_batch(1, 10_001),
            Code::ResourceExhausted,
            "--max-batch-readings",
        ),
    ];
    let mut ingest = server.ingest(&token).await;
    for (name, b, code, needle) in uploads {
        let status = upload(&mut ingest, vec![b]).await.unwrap_err();
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(status.message().contains(needle), "{name}: {status:?}");
    }
    // Readings with NUL, escapes or non-finite values are rejected one by
    // one, never stored.
    let summary = upload(
        &mut ingest,
        vec![batch(
            1,
            vec![
                series("t\0", "", &[(t, 1.0)]),
                series("t", "\x1b[0m", &[(t, 1.0)]),
                series("t", "", &[(t, f64::NAN), (u64::MAX, 1.0), (0, 1.0)]),
            ],
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        (summary.readings_accepted, summary.readings_rejected),
        (0, 5)
    );

    let mut after = snapshot(&server).await;
    // The last batch committed (its readings all rejected) and created no
    // sensor, reading or anything else.
    assert_eq!(after.len(), before.len());
    assert_eq!(std::mem::take(&mut after), before);
    // And the server is healthy.
    server.register("d2").await;
}
