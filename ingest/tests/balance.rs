//! The `ingest` CLI given several servers (`--server a,b`): its calls are
//! balanced over those that answer, so a command works while one of them
//! is down, and fails, naming each, only when none answers.
//!
//! Each server has its own SQLite here, so where a registration went shows
//! which server took the call.

mod common;

use common::*;

async fn devices_on(server: &TestServer) -> i64 {
    server.storage.scalar("SELECT COUNT(*) FROM devices").await
}

async fn register(servers: &[&TestServer], device_id: &str) -> CliRun {
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    ingest_cli(vec![
        "devices".into(),
        "register".into(),
        device_id.into(),
        "--server".into(),
        urls.join(","),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_spread_over_every_server_of_the_list() {
    let (Some(a), Some(b)) = (
        TestServer::start(Backend::Sqlite).await,
        TestServer::start(Backend::Sqlite).await,
    ) else {
        return;
    };
    // One process per call: each picks a server at random, so 16 calls
    // all on one server would be a 1-in-32768 event.
    for n in 0..16 {
        let run = register(&[&a, &b], &format!("dev-{n}")).await;
        assert!(run.success, "{}", run.stderr);
    }
    let (on_a, on_b) = (devices_on(&a).await, devices_on(&b).await);
    assert_eq!(on_a + on_b, 16);
    assert!(on_a > 0 && on_b > 0, "a {on_a}, b {on_b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_is_skipped() {
    let (Some(a), Some(mut b)) = (
        TestServer::start(Backend::Sqlite).await,
        TestServer::start(Backend::Sqlite).await,
    ) else {
        return;
    };
    b.stop().await;
    // In either order: the dead one is tried, refused, and left out.
    for (n, servers) in [[&b, &a], [&a, &b]].iter().enumerate() {
        let run = register(servers, &format!("dev-{n}")).await;
        assert!(run.success, "{}", run.stderr);
        assert!(
            run.stderr.contains(&format!("connecting to {}", b.url())),
            "the dead server is named: {}",
            run.stderr
        );
    }
    assert_eq!(devices_on(&a).await, 2);
    assert_eq!(devices_on(&b).await, 0);

    // None answers: the command fails, naming both.
    let mut a = a;
    a.stop().await;
    let run = register(&[&a, &b], "dev-9").await;
    assert!(!run.success);
    assert!(run.stderr.contains("no server of"), "{}", run.stderr);
    assert!(run.stderr.contains(&a.url()) && run.stderr.contains(&b.url()));
}
