//! The MQTT listener with real clients: rumqttc (3.1.1 and 5) and, where
//! installed, mosquitto_pub. A PUBACK means committed; a resend is stored
//! once; a device publishes only as itself.

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Packet as V5Packet, PubAckReason, PublishProperties,
};
use rumqttc::v5::{AsyncClient as V5Client, Event as V5Event, MqttOptions as V5Options};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use crate::common::{Backend, TestServer, eventually, now_nanos};

backend_tests!(
    a_puback_means_committed_on_both_versions,
    a_resent_batch_is_acknowledged_and_stored_once,
    a_publication_without_seq_is_stored_at_least_once,
    a_batch_that_cannot_commit_is_never_acknowledged,
    a_device_publishes_only_as_itself,
    bad_payloads_are_refused_with_a_reason,
    qos0_and_protobuf_are_stored_too,
    mosquitto_pub_publishes_readings,
    mqtt_over_tls_with_a_token_or_a_bound_certificate,
    disabling_a_device_ends_its_session_within_a_second,
    thingsboard_firmware_works_by_changing_the_host,
    a_subscribed_device_gets_each_batchs_summary,
    paho_mqtt_publishes_on_both_versions,
);

/// Our readings JSON: `n` readings of one sensor, a millisecond apart.
fn json_batch(seq: u64, n: usize) -> String {
    let start = now_nanos() - 60_000_000_000 + seq * 1_000_000_000;
    let t: Vec<String> = (0..n)
        .map(|i| (start + i as u64 * 1_000_000).to_string())
        .collect();
    let v: Vec<String> = (0..n).map(|i| format!("{}.5", 20 + i)).collect();
    format!(
        r#"{{"seq":{seq},"series":[{{"sensor":"temperature","unit":"Cel","t":[{}],"v":[{}]}}]}}"#,
        t.join(","),
        v.join(",")
    )
}

/// A client session: its client, and what the server sent (or how the
/// connection ended), in order.
struct Session<C, P> {
    client: C,
    incoming: mpsc::UnboundedReceiver<Result<P, String>>,
}

type V311 = Session<AsyncClient, Packet>;
type V5 = Session<V5Client, V5Packet>;

/// Polls a rumqttc event loop (either version) into a channel until the
/// connection ends.
macro_rules! forward_incoming {
    ($eventloop:ident, $event:ident) => {{
        let (tx, incoming) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let next = match $eventloop.poll().await {
                    Ok($event::Incoming(packet)) => Ok(packet),
                    Ok($event::Outgoing(_)) => continue,
                    Err(e) => Err(e.to_string()),
                };
                let ended = next.is_err();
                if tx.send(next).is_err() || ended {
                    return;
                }
            }
        });
        incoming
    }};
}

async fn connect_v311(server: &TestServer, client_id: &str, user: &str, password: &str) -> V311 {
    connect_v311_with(server, client_id, user, password, true).await
}

async fn connect_v311_with(
    server: &TestServer,
    client_id: &str,
    user: &str,
    password: &str,
    clean_session: bool,
) -> V311 {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", server.mqtt_addr.port());
    options.set_credentials(user, password);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(clean_session);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let incoming = forward_incoming!(eventloop, Event);
    Session { client, incoming }
}

async fn connect_v5(server: &TestServer, client_id: &str, user: &str, password: &str) -> V5 {
    connect_v5_with(server, client_id, user, password, |_| {}).await
}

async fn connect_v5_with(
    server: &TestServer,
    client_id: &str,
    user: &str,
    password: &str,
    configure: impl FnOnce(&mut V5Options),
) -> V5 {
    let mut options = V5Options::new(client_id, "127.0.0.1", server.mqtt_addr.port());
    options.set_credentials(user, password);
    options.set_keep_alive(Duration::from_secs(30));
    configure(&mut options);
    let (client, mut eventloop) = V5Client::new(options, 64);
    let incoming = forward_incoming!(eventloop, V5Event);
    Session { client, incoming }
}

impl<C, P> Session<C, P> {
    async fn next(&mut self) -> Result<P, String> {
        tokio::time::timeout(Duration::from_secs(10), self.incoming.recv())
            .await
            .expect("something from the server within 10 s")
            .unwrap_or_else(|| Err("event loop ended".into()))
    }
}

impl V311 {
    /// Whether the session was present.
    async fn expect_connack(&mut self) -> bool {
        match self.next().await {
            Ok(Packet::ConnAck(ack)) => {
                assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
                ack.session_present
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn expect_puback(&mut self) -> u16 {
        match self.next().await {
            Ok(Packet::PubAck(ack)) => ack.pkid,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

impl V5 {
    /// Publishes at QoS 1 and waits for the PUBACK's reason and text.
    async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
    ) -> (PubAckReason, Option<String>) {
        self.client
            .publish(topic, Q5::AtLeastOnce, false, payload.into())
            .await
            .unwrap();
        self.expect_puback().await
    }

    /// Whether the session was present.
    async fn expect_connack(&mut self) -> bool {
        match self.next().await {
            Ok(V5Packet::ConnAck(ack)) => {
                assert_eq!(ack.code, ConnectReturnCode::Success);
                let properties = ack.properties.expect("CONNACK properties");
                assert_eq!(properties.max_qos, Some(1), "QoS 2 is not offered");
                assert!(properties.receive_max.is_some_and(|r| r > 0));
                ack.session_present
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn expect_puback(&mut self) -> (PubAckReason, Option<String>) {
        match self.next().await {
            Ok(V5Packet::PubAck(ack)) => (ack.reason, ack.properties.and_then(|p| p.reason_string)),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

async fn a_puback_means_committed_on_both_versions(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("mq-311").await;
    let mut old = connect_v311(&server, "mq-311", "mq-311", &token).await;
    old.expect_connack().await;
    for seq in 1..=5u64 {
        old.client
            .publish(
                "devices/mq-311/readings",
                QoS::AtLeastOnce,
                false,
                json_batch(seq, 10),
            )
            .await
            .unwrap();
        old.expect_puback().await;
        // Acknowledged, so committed: every batch so far is there now.
        assert_eq!(
            server.storage.count_readings().await,
            seq as i64 * 10,
            "after the PUBACK of batch {seq}"
        );
    }

    let token = server.register("mq-5").await;
    let mut new = connect_v5(&server, "mq-5", "mq-5", &token).await;
    new.expect_connack().await;
    for seq in 1..=5u64 {
        assert_eq!(
            new.publish("devices/mq-5/readings", json_batch(seq, 10))
                .await
                .0,
            PubAckReason::Success
        );
        assert_eq!(server.storage.count_readings().await, 50 + seq as i64 * 10);
    }
    // The device's mark is the gRPC one: an upload resumes after batch 5.
    assert_eq!(server.device("mq-5").await.committed_sequence, 5);
}

async fn a_resent_batch_is_acknowledged_and_stored_once(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("mq-dup").await;
    let mut device = connect_v5(&server, "mq-dup", "mq-dup", &token).await;
    device.expect_connack().await;
    let batch = json_batch(1, 7);
    for _ in 0..3 {
        assert_eq!(
            device
                .publish("devices/mq-dup/readings", batch.clone())
                .await
                .0,
            PubAckReason::Success
        );
    }
    // Also as the user property, with the payload's seq left out.
    let without_seq = batch.replacen(r#""seq":1,"#, "", 1);
    device
        .client
        .publish_with_properties(
            "devices/mq-dup/readings",
            Q5::AtLeastOnce,
            false,
            without_seq,
            PublishProperties {
                user_properties: vec![("seq".into(), "1".into())],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(device.expect_puback().await.0, PubAckReason::Success);
    assert_eq!(server.storage.count_readings().await, 7);
}

async fn a_publication_without_seq_is_stored_at_least_once(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("mq-noseq").await;
    let mut device = connect_v311(&server, "mq-noseq", "mq-noseq", &token).await;
    device.expect_connack().await;
    let batch = json_batch(1, 4).replacen(r#""seq":1,"#, "", 1);
    for _ in 0..2 {
        device
            .client
            .publish(
                "devices/mq-noseq/readings",
                QoS::AtLeastOnce,
                false,
                batch.clone(),
            )
            .await
            .unwrap();
        device.expect_puback().await;
    }
    // Sent twice, stored twice: each took the next sequence.
    assert_eq!(server.storage.count_readings().await, 8);
    assert_eq!(server.device("mq-noseq").await.committed_sequence, 2);
}

async fn a_batch_that_cannot_commit_is_never_acknowledged(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("mq-fail").await;
    server.storage.install_insert_failure("readings").await;
    server.storage.set_insert_failure(true).await;
    let mut device = connect_v5(&server, "mq-fail", "mq-fail", &token).await;
    device.expect_connack().await;
    device
        .client
        .publish(
            "devices/mq-fail/readings",
            Q5::AtLeastOnce,
            false,
            json_batch(1, 5),
        )
        .await
        .unwrap();
    // No PUBACK: the server ends the session saying why, and the client
    // keeps the PUBLISH to send again.
    let ended = match device.next().await {
        Ok(V5Packet::Disconnect(d)) => d
            .properties
            .and_then(|p| p.reason_string)
            .unwrap_or_default(),
        // rumqttc reports a server's DISCONNECT as the end of its loop.
        Err(e) => e,
        other => panic!("expected DISCONNECT, got {other:?}"),
    };
    assert!(ended.contains("could not be committed"), "{ended}");
    assert_eq!(server.storage.count_readings().await, 0);

    // Once the database takes writes again, the resend is committed.
    server.storage.set_insert_failure(false).await;
    let mut again = connect_v5(&server, "mq-fail", "mq-fail", &token).await;
    again.expect_connack().await;
    assert_eq!(
        again
            .publish("devices/mq-fail/readings", json_batch(1, 5))
            .await
            .0,
        PubAckReason::Success
    );
    assert_eq!(server.storage.count_readings().await, 5);
}

async fn a_device_publishes_only_as_itself(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let mine = server.register("mq-a").await;
    let _theirs = server.register("mq-b").await;

    // Refused at CONNECT: a wrong token, a username that is not the client
    // id, a client id that is no device id.
    for (client_id, user, password, code) in [
        (
            "mq-a",
            "mq-a",
            "not-the-token",
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            "mq-a",
            "mq-b",
            mine.as_str(),
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            "mq-b",
            "mq-b",
            mine.as_str(),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            "a/b",
            "a/b",
            mine.as_str(),
            ConnectReturnCode::ClientIdentifierNotValid,
        ),
    ] {
        let mut refused = connect_v5(&server, client_id, user, password).await;
        match refused.next().await {
            Ok(V5Packet::ConnAck(ack)) => assert_eq!(ack.code, code, "{client_id}/{user}"),
            Err(e) => assert!(e.contains(&format!("{code:?}")), "{client_id}/{user}: {e}"),
            other => panic!("{client_id}/{user}: {other:?}"),
        }
    }
    let mut old = connect_v311(&server, "mq-a", "mq-a", "not-the-token").await;
    match old.next().await {
        Err(e) => assert!(e.contains("BadUserNamePassword"), "{e}"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // v5: another device's topic is refused by its PUBACK alone, and the
    // session goes on.
    let mut device = connect_v5(&server, "mq-a", "mq-a", &mine).await;
    device.expect_connack().await;
    let (reason, text) = device
        .publish("devices/mq-b/readings", json_batch(1, 3))
        .await;
    assert_eq!(reason, PubAckReason::NotAuthorized);
    assert!(text.unwrap_or_default().contains("its own topics"));
    assert_eq!(
        device
            .publish("devices/mq-a/readings", json_batch(1, 3))
            .await
            .0,
        PubAckReason::Success
    );
    assert_eq!(server.storage.count_readings().await, 3);
    assert_eq!(server.device("mq-b").await.committed_sequence, 0);

    // 3.1.1 has no refusing PUBACK: the session ends.
    let mut old = connect_v311(&server, "mq-a", "mq-a", &mine).await;
    old.expect_connack().await;
    old.client
        .publish(
            "devices/mq-b/readings",
            QoS::AtLeastOnce,
            false,
            json_batch(2, 3),
        )
        .await
        .unwrap();
    assert!(old.next().await.is_err(), "the session ends");
    assert_eq!(server.storage.count_readings().await, 3);
}

async fn bad_payloads_are_refused_with_a_reason(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("mq-bad").await;
    let mut device = connect_v5(&server, "mq-bad", "mq-bad", &token).await;
    device.expect_connack().await;
    for (payload, expected) in [
        ("not json".to_string(), "not our readings JSON"),
        (r#"{"seq":0,"series":[]}"#.to_string(), "must start at 1"),
        (
            r#"{"seq":1,"series":[{"sensor":"t","unit":"Cel","t":[1,2],"v":[1]}]}"#.to_string(),
            "same length",
        ),
    ] {
        let (reason, text) = device.publish("devices/mq-bad/readings", payload).await;
        assert_eq!(reason, PubAckReason::PayloadFormatInvalid);
        let text = text.unwrap_or_default();
        assert!(text.contains(expected), "{text}");
    }
    // An unknown topic under its own id.
    assert_eq!(
        device
            .publish("devices/mq-bad/status", json_batch(1, 1))
            .await
            .0,
        PubAckReason::TopicNameInvalid
    );
    assert_eq!(server.storage.count_readings().await, 0);
    // The refusals are counted by reason.
    let metrics = server.metrics().await;
    assert_eq!(
        metrics.get(
            "ingest_mqtt_refusals_total",
            &[("reason", "payload_invalid")]
        ),
        Some(3.0)
    );
}

async fn qos0_and_protobuf_are_stored_too(backend: Backend) {
    use prost::Message;
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("mq-pb").await;
    let mut device = connect_v311(&server, "mq-pb", "mq-pb", &token).await;
    device.expect_connack().await;
    let batch = crate::common::simple_batch(1, 4);
    device
        .client
        .publish(
            "devices/mq-pb/readings/pb",
            QoS::AtLeastOnce,
            false,
            batch.encode_to_vec(),
        )
        .await
        .unwrap();
    device.expect_puback().await;
    assert_eq!(server.storage.count_readings().await, 4);
    // QoS 0 gets no answer; it is stored all the same.
    device
        .client
        .publish(
            "devices/mq-pb/readings",
            QoS::AtMostOnce,
            false,
            json_batch(2, 6),
        )
        .await
        .unwrap();
    eventually(
        "the QoS 0 batch is stored",
        Duration::from_secs(10),
        async || server.storage.count_readings().await == 10,
    )
    .await;
}

/// Whether Debian's mosquitto_pub is here. Its tests are skipped (loudly)
/// where it is not, unless REQUIRE_MQTT_CLIENTS=1 (set by .ci/run).
fn mosquitto_pub_installed() -> bool {
    if std::process::Command::new("mosquitto_pub")
        .arg("--help")
        .output()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var("REQUIRE_MQTT_CLIENTS").as_deref() != Ok("1"),
        "REQUIRE_MQTT_CLIENTS=1 but mosquitto_pub is not installed (apt-get install mosquitto-clients)"
    );
    eprintln!(
        "\n!!!!!!!! SKIPPED: mosquitto_pub is not installed (apt-get install mosquitto-clients)\n"
    );
    false
}

/// Publishes `payload` at QoS 1 with mosquitto_pub and `args`; its exit
/// status and stderr. It exits once its PUBACK came.
async fn mosquitto_pub(
    server: &TestServer,
    args: &[&str],
    topic: &str,
    payload: &str,
) -> (bool, String) {
    let output = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.mqtt_addr.port().to_string(),
        ])
        .args(args)
        .args(["-q", "1", "-t", topic, "-m", payload])
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Debian's mosquitto_pub, both protocol versions.
async fn mosquitto_pub_publishes_readings(backend: Backend) {
    if !mosquitto_pub_installed() {
        return;
    }
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("mq-cli").await;
    let topic = "devices/mq-cli/readings";
    for (seq, version) in [(1u64, "mqttv311"), (2, "mqttv5")] {
        let login = ["-i", "mq-cli", "-u", "mq-cli", "-P", &token, "-V", version];
        let (ok, stderr) = mosquitto_pub(&server, &login, topic, &json_batch(seq, 3)).await;
        assert!(ok, "{version}: {stderr}");
        // Acknowledged, so committed.
        assert_eq!(server.storage.count_readings().await, seq as i64 * 3);
    }
    let wrong = [
        "-i", "mq-cli", "-u", "mq-cli", "-P", "wrong", "-V", "mqttv5",
    ];
    let (ok, _) = mosquitto_pub(&server, &wrong, topic, &json_batch(3, 3)).await;
    assert!(!ok);
    assert_eq!(server.storage.count_readings().await, 6);
}

/// The MQTT port speaks TLS when the gRPC port does, with the same
/// certificate; a device signs in with its token or its bound certificate.
async fn mqtt_over_tls_with_a_token_or_a_bound_certificate(backend: Backend) {
    use crate::common::pki::TestPki;
    use ingest::transport::ClientAuth;
    if !mosquitto_pub_installed() {
        return;
    }
    let pki = TestPki::new("mqtt");
    let (settings, _) = pki.server_settings();
    let settings = settings.with_client_auth(pki.ca_path(), ClientAuth::Optional);
    let Some(server) = TestServer::start_tls(backend, &pki, settings).await else {
        return;
    };
    let ca = pki.ca_path().display().to_string();
    let token = server
        .tls_ops()
        .await
        .register_device(telemetry_proto::v1::RegisterDeviceRequest {
            device_id: "mq-tls".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let login = [
        "--cafile", &ca, "-i", "mq-tls", "-u", "mq-tls", "-P", &token, "-V", "mqttv311",
    ];
    let (ok, stderr) = mosquitto_pub(
        &server,
        &login,
        "devices/mq-tls/readings",
        &json_batch(1, 3),
    )
    .await;
    assert!(ok, "token over TLS: {stderr}");

    // A bound certificate and no password.
    let cert = pki.client_cert("mq-cert");
    let (cert_path, key_path) = (pki.path("mq-cert.pem"), pki.path("mq-cert.key"));
    cert.write(&cert_path, &key_path);
    server
        .tls_ops()
        .await
        .register_device(telemetry_proto::v1::RegisterDeviceRequest {
            device_id: "mq-cert".into(),
            certificate_pem: cert.cert_pem.clone(),
            require_mtls: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let (cert_path, key_path) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let login = [
        "--cafile", &ca, "--cert", &cert_path, "--key", &key_path, "-i", "mq-cert", "-V", "mqttv5",
    ];
    let (ok, stderr) = mosquitto_pub(
        &server,
        &login,
        "devices/mq-cert/readings",
        &json_batch(1, 4),
    )
    .await;
    assert!(ok, "certificate: {stderr}");
    assert_eq!(server.storage.count_readings().await, 7);

    // Plaintext on the TLS port gets nowhere.
    let plain = ["-i", "mq-tls", "-u", "mq-tls", "-P", &token, "-V", "mqttv5"];
    let (ok, _) = mosquitto_pub(
        &server,
        &plain,
        "devices/mq-tls/readings",
        &json_batch(2, 3),
    )
    .await;
    assert!(!ok);
    assert_eq!(server.storage.count_readings().await, 7);
}

async fn disabling_a_device_ends_its_session_within_a_second(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("mq-off").await;
    let mut device = connect_v5(&server, "mq-off", "mq-off", &token).await;
    device.expect_connack().await;
    let started = std::time::Instant::now();
    server
        .ops()
        .await
        .disable_device(telemetry_proto::v1::DisableDeviceRequest {
            device_id: "mq-off".into(),
        })
        .await
        .unwrap();
    let ended = match device.next().await {
        Ok(V5Packet::Disconnect(d)) => format!("{:?}", d.reason_code),
        Err(e) => e,
        other => panic!("expected the session to end, got {other:?}"),
    };
    assert!(ended.contains("NotAuthorized"), "{ended}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "ended after {:?}",
        started.elapsed()
    );
    // And it cannot come back.
    let mut again = connect_v5(&server, "mq-off", "mq-off", &token).await;
    match again.next().await {
        Ok(V5Packet::ConnAck(ack)) => assert_eq!(ack.code, ConnectReturnCode::NotAuthorized),
        Err(e) => assert!(e.contains("NotAuthorized"), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// ThingsBoard's telemetry topic and payloads, signed in as its firmware
/// does: the access token as the username, no password.
async fn thingsboard_firmware_works_by_changing_the_host(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("tb-1").await;
    let mut device = connect_v311(&server, "tb-1", &token, "").await;
    device.expect_connack().await;
    let now_ms = now_nanos() / 1_000_000;
    let topic = "v1/devices/me/telemetry";
    for payload in [
        r#"{"temperature":21.5,"humidity":40,"status":"ok"}"#.to_string(),
        format!(
            r#"{{"ts":{},"values":{{"temperature":22}}}}"#,
            now_ms - 1000
        ),
        format!(
            r#"[{{"ts":{},"values":{{"temperature":23}}}},{{"ts":{},"values":{{"temperature":24,"on":true}}}}]"#,
            now_ms - 3000,
            now_ms - 2000
        ),
    ] {
        device
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        device.expect_puback().await;
    }
    // Numbers only: "ok" and true were left out, and counted.
    assert_eq!(server.storage.count_readings().await, 5);
    let metrics = server.metrics().await;
    assert_eq!(
        metrics.get(
            "ingest_mqtt_refusals_total",
            &[("reason", "telemetry_not_a_number")]
        ),
        Some(2.0)
    );
}

async fn a_subscribed_device_gets_each_batchs_summary(backend: Backend) {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("mq-sum").await;
    let mut device = connect_v5(&server, "mq-sum", "mq-sum", &token).await;
    device.expect_connack().await;
    device
        .client
        .subscribe("devices/mq-sum/summary", Q5::AtLeastOnce)
        .await
        .unwrap();
    match device.next().await {
        Ok(V5Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            vec![SubscribeReasonCode::Success(Q5::AtMostOnce)]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // Three readings, one a day in the future.
    let now = now_nanos();
    let future = now + 86_400_000_000_000;
    let batch = format!(
        r#"{{"seq":1,"series":[{{"sensor":"t","unit":"Cel","t":[{},{},{future}],"v":[1,2,3]}}]}}"#,
        now - 2_000_000_000,
        now - 1_000_000_000
    );
    let mut summaries = Vec::new();
    for _ in 0..2 {
        let (reason, _) = device
            .publish("devices/mq-sum/readings", batch.clone())
            .await;
        assert_eq!(reason, PubAckReason::Success);
        match device.next().await {
            Ok(V5Packet::Publish(p)) => {
                assert_eq!(&p.topic[..], b"devices/mq-sum/summary");
                summaries.push(serde_json::from_slice::<serde_json::Value>(&p.payload).unwrap());
            }
            other => panic!("expected a summary, got {other:?}"),
        }
    }
    assert_eq!(summaries[0]["outcome"], "committed");
    assert_eq!(summaries[0]["accepted"], 2);
    assert_eq!(summaries[0]["rejected"]["timestamp_in_future"], 1);
    assert_eq!(summaries[0]["committedSequence"], 1);
    assert_eq!(summaries[1]["outcome"], "duplicate", "the resend");
}

/// Publishes one batch at QoS 1 with paho-mqtt and exits 0 once it is
/// acknowledged: `host port device token version(3|5) payload`. paho 1.x
/// and 2.x both.
const PAHO_PUBLISH: &str = r#"
import sys
import paho.mqtt.client as mqtt
host, port, device, token, version, payload = sys.argv[1:7]
protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
if hasattr(mqtt, "CallbackAPIVersion"):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=protocol)
else:
    client = mqtt.Client(client_id=device, protocol=protocol)
client.username_pw_set(device, token)
client.connect(host, int(port), keepalive=30)
client.loop_start()
info = client.publish("devices/%s/readings" % device, payload, qos=1)
info.wait_for_publish(timeout=10)
published = info.is_published()
client.disconnect()
client.loop_stop()
sys.exit(0 if published else 1)
"#;

/// A Python that imports paho-mqtt: `MQTT_PYTHON`, `python3`, or Debian's
/// (`apt-get install python3-paho-mqtt`). Skipped (loudly) without one,
/// unless REQUIRE_MQTT_CLIENTS=1 (set by .ci/run).
fn python_with_paho() -> Option<String> {
    let candidates = std::env::var("MQTT_PYTHON")
        .into_iter()
        .chain(["python3".to_string(), "/usr/bin/python3".to_string()]);
    for python in candidates {
        let imports = std::process::Command::new(&python)
            .args(["-c", "import paho.mqtt.client"])
            .output()
            .is_ok_and(|o| o.status.success());
        if imports {
            return Some(python);
        }
    }
    assert!(
        std::env::var("REQUIRE_MQTT_CLIENTS").as_deref() != Ok("1"),
        "REQUIRE_MQTT_CLIENTS=1 but no Python imports paho-mqtt (apt-get install python3-paho-mqtt)"
    );
    eprintln!("\n!!!!!!!! SKIPPED: no Python with paho-mqtt (apt-get install python3-paho-mqtt)\n");
    None
}

async fn paho_mqtt_publishes_on_both_versions(backend: Backend) {
    let Some(python) = python_with_paho() else {
        return;
    };
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("mq-paho").await;
    for (seq, version) in [(1u64, "3"), (2, "5")] {
        let port = server.mqtt_addr.port().to_string();
        let payload = json_batch(seq, 3);
        let args = ["127.0.0.1", &port, "mq-paho", &token, version, &payload];
        let output = tokio::process::Command::new(&python)
            .args(["-c", PAHO_PUBLISH])
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "paho v{version}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Acknowledged, so committed.
        assert_eq!(server.storage.count_readings().await, seq as i64 * 3);
    }
}

mod commands {
    use super::*;
    use crate::common::control::{ping, send_command};
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
    use telemetry_proto::v1 as pb;

    backend_tests!(
        a_command_reaches_an_mqtt_device_and_its_result_settles_it,
        an_unanswered_command_comes_again_with_its_id,
        a_newer_connection_takes_the_session_over,
        a_kept_session_survives_a_restart_with_its_subscription,
    );

    async fn command_state(server: &TestServer, id: u64) -> pb::Command {
        server
            .ops()
            .await
            .get_command(pb::GetCommandRequest { command_id: id })
            .await
            .unwrap()
            .into_inner()
    }

    async fn subscribe(device: &mut V5, id: &str) {
        device
            .client
            .subscribe(format!("devices/{id}/commands/+"), Q5::AtLeastOnce)
            .await
            .unwrap();
        match device.next().await {
            Ok(V5Packet::SubAck(ack)) => assert_eq!(
                ack.return_codes,
                vec![SubscribeReasonCode::Success(Q5::AtLeastOnce)]
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The next command published to the device: its id and JSON.
    async fn next_command(device: &mut V5) -> (u64, serde_json::Value) {
        match device.next().await {
            Ok(V5Packet::Publish(p)) => {
                let topic = String::from_utf8(p.topic.to_vec()).unwrap();
                let json: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                let id: u64 = json["commandId"].as_str().unwrap().parse().unwrap();
                assert!(topic.ends_with(&format!("/commands/{id}")), "{topic}");
                (id, json)
            }
            other => panic!("expected a command, got {other:?}"),
        }
    }

    async fn a_command_reaches_an_mqtt_device_and_its_result_settles_it(backend: Backend) {
        let Some(server) = TestServer::start(backend).await else {
            return;
        };
        let token = server.register("mq-cmd").await;
        let mut device = connect_v5(&server, "mq-cmd", "mq-cmd", &token).await;
        device.expect_connack().await;
        // An MQTT session is the device's presence.
        eventually("online", Duration::from_secs(10), async || {
            server.device("mq-cmd").await.online
        })
        .await;
        // Another device's commands are not its to read.
        device
            .client
            .subscribe("devices/mq-other/commands/+", Q5::AtLeastOnce)
            .await
            .unwrap();
        match device.next().await {
            Ok(V5Packet::SubAck(ack)) => {
                assert_eq!(ack.return_codes, vec![SubscribeReasonCode::NotAuthorized])
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
        // Queued before the subscription: delivered once it comes.
        let mut ops = server.ops().await;
        let queued = send_command(&mut ops, "mq-cmd", ping(), 60_000, 0)
            .await
            .unwrap();
        subscribe(&mut device, "mq-cmd").await;
        let (id, json) = next_command(&mut device).await;
        assert_eq!(id, queued.command_id);
        assert!(json.get("ping").is_some(), "{json}");
        // rumqttc answered with a PUBACK: that marks it SENT.
        eventually("sent", Duration::from_secs(10), async || {
            command_state(&server, id).await.state() == pb::CommandState::Sent
        })
        .await;
        let (reason, _) = device
            .publish(
                &format!("devices/mq-cmd/commands/{id}/result"),
                r#"{"success":true,"detail":"pong"}"#,
            )
            .await;
        assert_eq!(reason, PubAckReason::Success);
        // Answered after it was recorded.
        let settled = command_state(&server, id).await;
        assert_eq!(settled.state(), pb::CommandState::Acked);
        assert_eq!(settled.result, "pong");
        assert!(settled.sent_time_unix_nano > 0);

        // A command sent while subscribed arrives at once; a failure is
        // recorded as FAILED.
        let sent = send_command(&mut ops, "mq-cmd", ping(), 60_000, 0)
            .await
            .unwrap();
        let (id, _) = next_command(&mut device).await;
        assert_eq!(id, sent.command_id);
        device
            .publish(
                &format!("devices/mq-cmd/commands/{id}/result"),
                r#"{"success":false,"detail":"busy"}"#,
            )
            .await;
        assert_eq!(
            command_state(&server, id).await.state(),
            pb::CommandState::Failed
        );

        device.client.disconnect().await.unwrap();
        eventually("offline", Duration::from_secs(10), async || {
            !server.device("mq-cmd").await.online
        })
        .await;
    }

    async fn an_unanswered_command_comes_again_with_its_id(backend: Backend) {
        let Some(server) = TestServer::start(backend).await else {
            return;
        };
        let token = server.register("mq-again").await;
        let mut ops = server.ops().await;
        let queued = send_command(&mut ops, "mq-again", ping(), 60_000, 0)
            .await
            .unwrap();
        for _ in 0..2 {
            let mut device = connect_v5(&server, "mq-again", "mq-again", &token).await;
            device.expect_connack().await;
            subscribe(&mut device, "mq-again").await;
            let (id, _) = next_command(&mut device).await;
            assert_eq!(id, queued.command_id, "the same id each time");
            // Hangs up without a result.
            device.client.disconnect().await.unwrap();
        }
        let state = command_state(&server, queued.command_id).await;
        assert_eq!(state.state(), pb::CommandState::Sent);
    }

    async fn a_newer_connection_takes_the_session_over(backend: Backend) {
        let Some(server) = TestServer::start(backend).await else {
            return;
        };
        let token = server.register("mq-twice").await;
        let mut first = connect_v5(&server, "mq-twice", "mq-twice", &token).await;
        first.expect_connack().await;
        let mut second = connect_v5(&server, "mq-twice", "mq-twice", &token).await;
        second.expect_connack().await;
        let ended = match first.next().await {
            Ok(V5Packet::Disconnect(d)) => format!("{:?}", d.reason_code),
            Err(e) => e,
            other => panic!("expected the first session to end, got {other:?}"),
        };
        assert!(ended.contains("SessionTakenOver"), "{ended}");
        // The newer one carries on.
        let (reason, _) = second
            .publish("devices/mq-twice/readings", json_batch(1, 2))
            .await;
        assert_eq!(reason, PubAckReason::Success);
    }

    async fn a_kept_session_survives_a_restart_with_its_subscription(backend: Backend) {
        let Some(server) = TestServer::start(backend).await else {
            return;
        };
        let token = server.register("mq-keep").await;
        let keep = |o: &mut V5Options| {
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(3600));
        };
        let mut device = connect_v5_with(&server, "mq-keep", "mq-keep", &token, keep).await;
        assert!(!device.expect_connack().await, "nothing kept yet");
        subscribe(&mut device, "mq-keep").await;
        device.client.disconnect().await.unwrap();

        let server = server.restart().await;
        let mut ops = server.ops().await;
        let queued = send_command(&mut ops, "mq-keep", ping(), 60_000, 0)
            .await
            .unwrap();
        let mut device = connect_v5_with(&server, "mq-keep", "mq-keep", &token, keep).await;
        assert!(
            device.expect_connack().await,
            "Session Present after a restart"
        );
        // Subscribed still: the command comes without a new SUBSCRIBE.
        let (id, _) = next_command(&mut device).await;
        assert_eq!(id, queued.command_id);
        device.client.disconnect().await.unwrap();

        // A clean start forgets the session.
        let mut clean = connect_v5(&server, "mq-keep", "mq-keep", &token).await;
        assert!(!clean.expect_connack().await);
        clean.client.disconnect().await.unwrap();
        let mut again = connect_v5_with(&server, "mq-keep", "mq-keep", &token, keep).await;
        assert!(
            !again.expect_connack().await,
            "forgotten by the clean start"
        );

        // 3.1.1: Clean Session 0 keeps it too.
        let mut old = connect_v311_with(&server, "mq-keep", "mq-keep", &token, false).await;
        old.expect_connack().await;
        old.client.disconnect().await.unwrap();
        let server = server.restart().await;
        let mut old = connect_v311_with(&server, "mq-keep", "mq-keep", &token, false).await;
        assert!(
            old.expect_connack().await,
            "3.1.1 Session Present after a restart"
        );
    }
}

/// Without an MQTT listener nothing of MQTT holds a writer handle: the
/// server stops at once, not after its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_mqtt_stops_without_waiting_out_its_grace() {
    use crate::common::{OPS_TOKEN, TestStorage};
    use ingest::auth::OpsTokenSource;
    use ingest::domain::Token;
    let storage = TestStorage::new(Backend::Sqlite).await.unwrap();
    let mut config = ingest::Config::new(
        storage.data_dir.path().to_owned(),
        storage.database.clone(),
        OpsTokenSource::Value(Token::new(OPS_TOKEN.into())),
    );
    config.shutdown_grace = Duration::from_secs(300);
    assert!(config.mqtt_listen.is_none());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = tokio::spawn(ingest::server::run_with_admin(
        config,
        listener,
        None,
        async {},
    ));
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("stopped well within its grace period")
        .unwrap()
        .unwrap();
}
