//! Restarts and graceful shutdown: nothing acknowledged is lost, nothing in
//! flight is cut off.

use std::time::Duration;

use crate::common::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

backend_tests!(
    data_and_cursors_survive_a_restart,
    shutdown_commits_in_flight_batches_and_answers,
);

async fn data_and_cursors_survive_a_restart(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    upload(&mut client, (1..=4).map(|s| simple_batch(s, 25)).collect())
        .await
        .unwrap();

    let server = server.restart().await;
    let mut client = server.ingest(&token).await;
    assert_eq!(cursor(&mut client).await, 4, "the cursor is durable");
    let device = server.device("dev-1").await;
    assert_eq!(device.committed_sequence, 4);
    // The device did not see the last summary and resends from 3.
    let s = upload(&mut client, (3..=6).map(|s| simple_batch(s, 25)).collect())
        .await
        .unwrap();
    assert_eq!(
        (
            s.duplicate_batches,
            s.batches_committed,
            s.committed_sequence
        ),
        (2, 2, 6)
    );
    assert_eq!(server.storage.count_readings().await, 6 * 25);
}

async fn shutdown_commits_in_flight_batches_and_answers(backend: Backend) {
    let Some(mut server) = TestServer::start(backend).await else {
        return;
    };
    let token = server.register("dev-1").await;
    let mut client = server.ingest(&token).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let call = tokio::spawn(async move { client.upload_readings(ReceiverStream::new(rx)).await });
    for s in 1..=3 {
        tx.send(simple_batch(s, 10)).await.unwrap();
    }
    // Wait until the server has committed them, the stream still open.
    let mut probe = server.ingest(&token).await;
    eventually(
        "batches 1-3 committed",
        Duration::from_secs(10),
        async || cursor(&mut probe).await >= 3,
    )
    .await;

    server.stop().await;
    let status = call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("shutting down"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("up to sequence 3"),
        "{}",
        status.message()
    );
    drop(tx);
    assert_eq!(server.storage.count_readings().await, 30);
}
