//! TLS over 127.0.0.1 with certificates the tests make (common/pki.rs):
//! TLS clients work and others are refused, mutual TLS, reloads on request
//! and on file change while open streams go on, and bad files kept out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::pki::{TestCert, TestPki};
use crate::common::*;
use futures::StreamExt;
use ingest::domain::CertFingerprint;
use ingest::transport::{ClientAuth, ConnectionInfo, TlsAcceptor, TlsSettings};
use rustls::pki_types::ServerName;
use telemetry_proto::v1 as pb;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

backend_tests!(
    a_tls_client_registers_and_uploads,
    plaintext_and_wrong_ca_clients_are_refused,
    required_client_auth_refuses_missing_and_foreign_certificates,
    optional_client_auth_accepts_clients_with_and_without_certificates,
    a_reload_serves_new_connections_while_an_open_stream_goes_on,
    changed_files_are_reloaded_without_a_signal,
    a_broken_new_file_keeps_the_old_certificate,
);

/// Upper bound on waiting for something that should happen at once or
/// within a few poll intervals; never a reason to pass.
const PATIENCE: Duration = Duration::from_secs(10);

async fn a_tls_client_registers_and_uploads(backend: Backend) {
    let pki = TestPki::new("main");
    let (settings, _) = pki.server_settings();
    let Some(server) = TestServer::start_tls(backend, &pki, settings).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.tls_ingest(&token, None).await;
    let summary = upload(&mut client, vec![simple_batch(1, 10), simple_batch(2, 5)])
        .await
        .unwrap();
    assert_eq!(
        (summary.committed_sequence, summary.readings_accepted),
        (2, 15)
    );
    assert_eq!(server.storage.count_readings().await, 15);
    let device = server
        .tls_ops()
        .await
        .get_device(pb::GetDeviceRequest {
            device_id: "dev-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(device.committed_sequence, 2);
}

async fn plaintext_and_wrong_ca_clients_are_refused(backend: Backend) {
    let pki = TestPki::new("main");
    let (settings, _) = pki.server_settings();
    let Some(server) = TestServer::start_tls(backend, &pki, settings).await else {
        return;
    };
    let token = server.register("dev-1").await;

    // Plaintext HTTP/2 to a TLS port: the server reads a ClientHello that
    // is not there and closes. Either connecting or the call fails.
    let plaintext = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap();
    if let Ok(channel) = plaintext.connect().await {
        let mut client = ingest_client(channel, &token);
        // How it fails depends on timing: the connection closed, or the
        // server's TLS alert read as a malformed HTTP/2 frame.
        let status = upload(&mut client, vec![simple_batch(1, 1)])
            .await
            .unwrap_err();
        assert!(
            std::error::Error::source(&status).is_some(),
            "a transport failure, not an answer from the server: {status:?}"
        );
    }

    let stranger = TestPki::new("stranger");
    let wrong_ca = Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(stranger.client_config(None))
        .unwrap()
        .connect()
        .await;
    let error = wrong_ca.expect_err("a client trusting another CA must not connect");
    assert!(
        format!("{error:?}").contains("UnknownIssuer"),
        "expected a certificate verification failure, got {error:?}"
    );
    assert_eq!(server.storage.count_readings().await, 0);
}

async fn required_client_auth_refuses_missing_and_foreign_certificates(backend: Backend) {
    let pki = TestPki::new("main");
    let (settings, _) = pki.server_settings();
    let settings = settings.with_client_auth(pki.ca_path(), ClientAuth::Require);
    let Some(server) = TestServer::start_tls(backend, &pki, settings).await else {
        return;
    };
    // The server's own clients present the operator certificate.
    let token = server.register("dev-1").await;

    let device = pki.client_cert("dev-1");
    let mut client = server.tls_ingest(&token, Some(&device)).await;
    upload(&mut client, vec![simple_batch(1, 3)]).await.unwrap();

    // TLS 1.3: the client finishes its handshake before the server has
    // checked its certificate, so the refusal may surface at the first call.
    let no_certificate = call_over(server.tls_channel(None).await, &token).await;
    assert!(
        no_certificate.is_err(),
        "a client without a certificate got through"
    );

    let stranger = TestPki::new("stranger");
    let foreign = stranger.client_cert("dev-1");
    let foreign_certificate = call_over(server.tls_channel(Some(&foreign)).await, &token).await;
    assert!(
        foreign_certificate.is_err(),
        "a certificate from another CA got through"
    );

    // Raw handshakes show why: the server's alert.
    let refused = raw_handshake(&pki, server.addr, None).await.unwrap_err();
    assert!(
        refused.to_string().contains("CertificateRequired")
            || refused.to_string().contains("certificate required"),
        "{refused}"
    );
    let refused = raw_handshake(&pki, server.addr, Some(&foreign))
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("UnknownCA") || refused.to_string().contains("unknown ca"),
        "{refused}"
    );
    assert_eq!(server.storage.count_readings().await, 3);
}

async fn optional_client_auth_accepts_clients_with_and_without_certificates(backend: Backend) {
    let pki = TestPki::new("main");
    let (settings, _) = pki.server_settings();
    let settings = settings.with_client_auth(pki.ca_path(), ClientAuth::Optional);
    let Some(server) = TestServer::start_tls(backend, &pki, settings).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let device = pki.client_cert("dev-1");
    call_over(server.tls_channel(Some(&device)).await, &token)
        .await
        .unwrap();
    call_over(server.tls_channel(None).await, &token)
        .await
        .unwrap();
    // Optional is not "anything goes": a certificate that is sent must verify.
    let foreign = TestPki::new("stranger").client_cert("dev-1");
    assert!(
        call_over(server.tls_channel(Some(&foreign)).await, &token)
            .await
            .is_err()
    );
}

async fn a_reload_serves_new_connections_while_an_open_stream_goes_on(backend: Backend) {
    let pki = TestPki::new("main");
    let (settings, first) = pki.server_settings();
    let handle = settings.handle.clone();
    let Some(server) = TestServer::start_tls(backend, &pki, settings).await else {
        return;
    };
    let token = server.register("dev-1").await;
    assert_eq!(served(&pki, &server).await, first.fingerprint());

    // An upload stream on a connection made with the first certificate,
    // with its first batch committed.
    let mut client = server.tls_ingest(&token, None).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let call = tokio::spawn(async move { client.upload_readings(ReceiverStream::new(rx)).await });
    tx.send(simple_batch(1, 10)).await.unwrap();
    let mut probe = server.tls_ingest(&token, None).await;
    wait_for_cursor(&mut probe, 1).await;

    let second = pki.server_cert();
    pki.replace_server_files(&second);
    let summary = handle.reload().expect("a valid new pair reloads");
    assert_eq!(summary.fingerprint, second.fingerprint());
    assert_eq!(
        handle.certificate_not_after(),
        Some(summary.not_after),
        "the expiry a metric would show"
    );
    assert_eq!(served(&pki, &server).await, second.fingerprint());

    // The old connection's stream goes on, and so does the old connection.
    tx.send(simple_batch(2, 10)).await.unwrap();
    drop(tx);
    let summary = call.await.unwrap().unwrap().into_inner();
    assert_eq!(
        (summary.committed_sequence, summary.readings_accepted),
        (2, 20)
    );
    assert_eq!(cursor(&mut probe).await, 2);
    assert_eq!(server.storage.count_readings().await, 20);
}

async fn changed_files_are_reloaded_without_a_signal(backend: Backend) {
    // Renamed over, as certbot and `mv` do.
    let pki = TestPki::new("main");
    let (settings, first) = pki.server_settings();
    let Some(server) = TestServer::start_tls(backend, &pki, settings).await else {
        return;
    };
    assert_eq!(served(&pki, &server).await, first.fingerprint());
    let second = pki.server_cert();
    pki.replace_server_files(&second);
    wait_until_served(&pki, &server, &second).await;
    drop(server);

    // Through a symlink swapped to a new directory, as Kubernetes updates a
    // mounted secret: the paths stay, the files behind them change.
    let k8s = pki.path("k8s");
    let third = pki.server_cert();
    for (version, cert) in [("v1", &second), ("v2", &third)] {
        std::fs::create_dir_all(k8s.join(version)).unwrap();
        cert.write(
            &k8s.join(version).join("tls.crt"),
            &k8s.join(version).join("tls.key"),
        );
    }
    std::os::unix::fs::symlink("v1", k8s.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", k8s.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", k8s.join("tls.key")).unwrap();
    let mut settings = TlsSettings::new(k8s.join("tls.crt"), k8s.join("tls.key"));
    settings.poll_interval = Duration::from_millis(50);
    let Some(server) = TestServer::start_tls(backend, &pki, settings).await else {
        return;
    };
    let token = server.register("dev-1").await;
    assert_eq!(served(&pki, &server).await, second.fingerprint());
    std::os::unix::fs::symlink("v2", k8s.join("..data_tmp")).unwrap();
    std::fs::rename(k8s.join("..data_tmp"), k8s.join("..data")).unwrap();
    wait_until_served(&pki, &server, &third).await;
    let mut client = server.tls_ingest(&token, None).await;
    upload(&mut client, vec![simple_batch(1, 2)]).await.unwrap();
}

async fn a_broken_new_file_keeps_the_old_certificate(backend: Backend) {
    let pki = TestPki::new("main");
    let (settings, first) = pki.server_settings();
    let handle = settings.handle.clone();
    let Some(server) = TestServer::start_tls(backend, &pki, settings).await else {
        return;
    };
    let token = server.register("dev-1").await;

    // Garbage for a certificate.
    std::fs::write(pki.path("server.pem"), "not a certificate\n").unwrap();
    let error = handle.reload().unwrap_err().to_string();
    assert!(error.contains("server.pem"), "{error}");
    assert!(error.contains("no PEM CERTIFICATE"), "{error}");
    assert_still_served(&pki, &server, &token, &first).await;

    // A valid certificate with another certificate's key.
    let second = pki.server_cert();
    let third = pki.server_cert();
    std::fs::write(pki.path("server.pem"), &second.cert_pem).unwrap();
    std::fs::write(pki.path("server.key"), &third.key_pem).unwrap();
    let error = handle.reload().unwrap_err().to_string();
    assert!(error.contains("does not belong"), "{error}");
    assert_still_served(&pki, &server, &token, &first).await;

    // An expired certificate.
    let expired = pki.expired_server_cert();
    pki.replace_server_files(&expired);
    let error = handle.reload().unwrap_err().to_string();
    assert!(error.contains("expired at 2001-01-01"), "{error}");
    assert_still_served(&pki, &server, &token, &first).await;

    // The poller tries the same files and keeps the old certificate too;
    // a good pair afterwards is picked up.
    pki.replace_server_files(&second);
    wait_until_served(&pki, &server, &second).await;
}

// ---- the acceptor, below tonic -------------------------------------------

/// What the auth layer reads: the verified client certificate's
/// fingerprint and names (CN, then DNS SANs, then URI SANs), and the peer
/// address.
#[tokio::test]
async fn connection_info_carries_the_verified_client_certificate() {
    let pki = TestPki::new("main");
    let (settings, _) = pki.server_settings();
    let settings = settings.with_client_auth(pki.ca_path(), ClientAuth::Require);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let (mut incoming, _transport) = ingest::transport::listen(
        listener,
        Some(&settings),
        PATIENCE,
        stopping,
        Default::default(),
    )
    .unwrap();

    let device = pki.client_cert_with_sans("dev-7", &["dev-7.example", "urn:device:dev-7"]);
    let client = tokio::spawn({
        let config = pki.rustls_client(Some(&device));
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let local = tcp.local_addr().unwrap();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .unwrap();
            (local, tls)
        }
    });
    let connection = tokio::time::timeout(PATIENCE, incoming.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (client_addr, _tls) = client.await.unwrap();
    let info: ConnectionInfo = connection.connect_info();
    assert_eq!(info.remote_addr, Some(client_addr));
    let certificate = info.client_certificate.expect("an mTLS connection");
    assert_eq!(certificate.fingerprint, device.fingerprint());
    assert_eq!(
        certificate.names,
        ["dev-7", "dev-7.example", "urn:device:dev-7"]
    );
    assert!(certificate.names_device("dev-7"));
}

/// tonic puts the connection's info into every request's extensions before
/// the server's layers run: where the auth layer finds it.
#[tokio::test]
async fn connection_info_reaches_the_server_layers() {
    let pki = TestPki::new("main");
    let (settings, _) = pki.server_settings();
    let settings = settings.with_client_auth(pki.ca_path(), ClientAuth::Optional);
    for tls in [Some(settings), None] {
        let seen = Arc::new(Mutex::new(Vec::<ConnectionInfo>::new()));
        let (addr, _stop) = serve_health_recording(tls.as_ref(), seen.clone()).await;
        let device = pki.client_cert("dev-9");
        let channel = match &tls {
            Some(_) => Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(pki.client_config(Some(&device)))
                .unwrap(),
            None => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
        }
        .connect()
        .await
        .unwrap();
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "one request, one record");
        assert_eq!(seen[0].remote_addr.unwrap().ip(), addr.ip());
        match tls {
            Some(_) => {
                let certificate = seen[0].client_certificate.as_ref().unwrap();
                assert_eq!(certificate.fingerprint, device.fingerprint());
                assert_eq!(certificate.names, ["dev-9"]);
            }
            None => assert!(seen[0].client_certificate.is_none()),
        }
    }
}

/// A client that opens a socket and never finishes its handshake must not
/// stop the server from accepting others, and is closed at the deadline.
#[tokio::test]
async fn a_stalled_handshake_holds_up_no_one_and_is_closed_at_the_deadline() {
    let pki = TestPki::new("main");
    let (settings, served_cert) = pki.server_settings();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let deadline = Duration::from_millis(500);
    let (mut incoming, _transport) = ingest::transport::listen(
        listener,
        Some(&settings),
        deadline,
        stopping,
        Default::default(),
    )
    .unwrap();
    tokio::spawn(async move { while incoming.next().await.is_some() {} });

    let mut stalled = TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let served = pki.served_certificate(addr).await.unwrap();
    assert_eq!(CertFingerprint::of_der(&served), served_cert.fingerprint());

    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(PATIENCE, stalled.read(&mut buf))
        .await
        .expect("the server closes a stalled handshake");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(started.elapsed() >= deadline / 2);
}

#[tokio::test]
async fn bad_files_and_flags_are_refused_at_start_with_a_reason() {
    let pki = TestPki::new("main");
    let (settings, _) = pki.server_settings();
    let load_error = |settings: &TlsSettings| match TlsAcceptor::load(settings) {
        Ok(_) => panic!("loaded"),
        Err(error) => error.to_string(),
    };

    let missing = TlsSettings::new(pki.path("nope.pem"), pki.path("server.key"));
    let error = load_error(&missing);
    assert!(
        error.contains("cannot read server certificate") && error.contains("nope.pem"),
        "{error}"
    );

    std::fs::write(pki.path("garbage.key"), "-----BEGIN PRIVATE KEY-----\nxx\n").unwrap();
    let garbage = TlsSettings::new(pki.path("server.pem"), pki.path("garbage.key"));
    let error = load_error(&garbage);
    assert!(error.contains("garbage.key"), "{error}");

    let other = pki.server_cert();
    std::fs::write(pki.path("other.key"), &other.key_pem).unwrap();
    let mismatched = TlsSettings::new(pki.path("server.pem"), pki.path("other.key"));
    assert!(load_error(&mismatched).contains("does not belong to the certificate"));

    let mut no_ca = settings.clone();
    no_ca.client_auth = ClientAuth::Require;
    assert!(load_error(&no_ca).contains("needs --tls-client-ca"));

    let not_a_ca = settings
        .clone()
        .with_client_auth(pki.path("other.key"), ClientAuth::Require);
    assert!(load_error(&not_a_ca).contains("no PEM CERTIFICATE"));

    // The server itself refuses to start.
    let storage = TestStorage::new(Backend::Sqlite).await.unwrap();
    let mut config = ingest::Config::new(
        storage.data_dir.path().to_owned(),
        storage.database.clone(),
        ingest::auth::OpsTokenSource::Value(ingest::domain::Token::new(OPS_TOKEN.into())),
    );
    config.tls = Some(mismatched);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = ingest::run(config, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("does not belong"),
        "{error:#}"
    );
}

// ---- helpers ---------------------------------------------------------------

fn ingest_client(channel: Channel, token: &str) -> Ingest {
    telemetry_proto::v1::ingest_client::IngestClient::with_interceptor(
        channel,
        Bearer::new(token).unwrap(),
    )
}

/// A GetUploadCursor over a channel that may not have connected.
async fn call_over(
    channel: Result<Channel, tonic::transport::Error>,
    token: &str,
) -> Result<u64, String> {
    let channel = channel.map_err(|e| format!("{e:?}"))?;
    ingest_client(channel, token)
        .get_upload_cursor(pb::GetUploadCursorRequest {})
        .await
        .map(|r| r.into_inner().committed_sequence)
        .map_err(|status| format!("{status:?}"))
}

/// A TLS handshake and one read: with TLS 1.3 a refused client
/// certificate shows as the server's alert on the first read.
async fn raw_handshake(
    pki: &TestPki,
    addr: std::net::SocketAddr,
    identity: Option<&TestCert>,
) -> std::io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(pki.rustls_client(identity))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let mut buf = [0u8; 64];
    // A server that accepted the client sends its HTTP/2 SETTINGS.
    match tokio::time::timeout(PATIENCE, tls.read(&mut buf)).await {
        Ok(Ok(0)) => Err(std::io::Error::other("closed without an alert")),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(std::io::Error::other("no answer")),
    }
}

/// The fingerprint of the certificate a new connection is served.
async fn served(pki: &TestPki, server: &TestServer) -> CertFingerprint {
    CertFingerprint::of_der(&pki.served_certificate(server.addr).await.unwrap())
}

/// New connections, one after another, until one is served `cert`.
async fn wait_until_served(pki: &TestPki, server: &TestServer, cert: &TestCert) {
    let expected = cert.fingerprint();
    eventually(
        "the server picking up the new certificate",
        PATIENCE,
        async || served(pki, server).await == expected,
    )
    .await;
}

async fn assert_still_served(pki: &TestPki, server: &TestServer, token: &str, cert: &TestCert) {
    assert_eq!(served(pki, server).await, cert.fingerprint());
    call_over(server.tls_channel(None).await, token)
        .await
        .expect("new connections still work");
}

async fn wait_for_cursor(client: &mut Ingest, sequence: u64) {
    eventually(
        &format!("batch {sequence} committed"),
        PATIENCE,
        async || cursor(client).await >= sequence,
    )
    .await;
}

/// A bare tonic server (health only) on the TLS incoming stream, with a
/// layer that records the ConnectionInfo of every request.
async fn serve_health_recording(
    tls: Option<&TlsSettings>,
    seen: Arc<Mutex<Vec<ConnectionInfo>>>,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (_stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let (incoming, _transport) =
        ingest::transport::listen(listener, tls, PATIENCE, stopping, Default::default()).unwrap();
    let (_health, health_service) = tonic_health::server::health_reporter();
    let record = tower::ServiceBuilder::new().map_request(
        move |request: http::Request<tonic::body::Body>| {
            if let Some(info) = request.extensions().get::<ConnectionInfo>() {
                seen.lock().unwrap().push(info.clone());
            }
            request
        },
    );
    tokio::spawn(async move {
        let _keep = _stopping_tx;
        tonic::transport::Server::builder()
            .layer(record)
            .add_service(health_service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
    });
    (addr, stop_tx)
}
