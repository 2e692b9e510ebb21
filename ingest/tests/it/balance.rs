//! The `ingest` CLI given several servers (`--server a,b`): its calls are
//! balanced over those that answer, so a command works while one of them
//! is down, and fails, naming each, only when none answers.
//!
//! Each server has its own SQLite in the first tests, so where a
//! registration went shows which server took the call; the watcher's test
//! runs two servers on one PostgreSQL database, as scale-out does.

use std::time::Duration;

use crate::common::alert_helpers::{put, temperatures, too_hot};
use crate::common::*;

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
    assert!(run.stderr.contains("no ingest server at"), "{}", run.stderr);
    assert!(run.stderr.contains(&a.url()) && run.stderr.contains(&b.url()));
}

/// Two server processes on one PostgreSQL database, as scale-out runs
/// them, and the tokens of devices d1 and d2; quick heartbeats and a short
/// shutdown grace keep the test short.
async fn two_on_one_database() -> Option<(TestServer, TestServer, [String; 2])> {
    let configure: Configure = std::sync::Arc::new(|config: &mut ingest::Config| {
        config.alerts.watch.heartbeat = Duration::from_millis(200);
        config.shutdown_grace = Duration::from_secs(1);
    });
    let storage = TestStorage::new(Backend::Postgres).await?;
    let beside = storage.beside();
    let a = TestServer::start_on(storage, Default::default(), Some(configure.clone())).await;
    // The devices and the rule exist before the second process starts, so
    // both have them whatever the server side shares at run time.
    let mut ops = a.ops().await;
    put(&mut ops, too_hot()).await;
    let tokens = [a.register("d1").await, a.register("d2").await];
    let b = TestServer::start_on(beside, Default::default(), Some(configure)).await;
    Some((a, b, tokens))
}

/// `ingest alerts watch --json` as a child process, its lines on a channel.
struct WatchCli {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl WatchCli {
    fn start(servers: &[&TestServer]) -> Self {
        use std::io::BufRead;
        let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ingest"))
            .args([
                "alerts",
                "watch",
                "--json",
                "--from-start",
                "--stall-timeout",
                "2s",
            ])
            .args(["--server", &urls.join(",")])
            .env("INGEST_OPS_TOKEN", OPS_TOKEN)
            .env_remove("INGEST_SERVER")
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next event printed: (event id, device).
    async fn event(&mut self) -> (u64, String) {
        let line = tokio::time::timeout(Duration::from_secs(20), self.lines.recv())
            .await
            .expect("an event within 20 s")
            .expect("the watcher runs");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        (
            event["event_id"].as_u64().unwrap(),
            event["device_id"].as_str().unwrap().to_owned(),
        )
    }
}

impl Drop for WatchCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open WatchAlerts streams on `server`, from its /metrics.
async fn watch_streams(server: &TestServer) -> usize {
    server
        .metrics()
        .await
        .sum("ingest_streams", &[("kind", "watch")]) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_watch_goes_on_when_its_server_goes_away() {
    let Some((a, b, [d1, d2])) = two_on_one_database().await else {
        return;
    };
    let mut watch = WatchCli::start(&[&a, &b]);
    // Whichever server the watcher reached, it is the one to stop.
    let a_watched = eventually_ok("a watch stream", Duration::from_secs(20), async || {
        match (watch_streams(&a).await, watch_streams(&b).await) {
            (1, 0) => Ok(true),
            (0, 1) => Ok(false),
            seen => Err(format!("watch streams on (a, b): {seen:?}")),
        }
    })
    .await;
    let (mut watched, mut other) = if a_watched { (a, b) } else { (b, a) };
    let now = now_nanos();
    temperatures(&mut watched.ingest(&d1).await, 1, now, &[45.0]).await;
    let (first, device) = watch.event().await;
    assert_eq!(device, "d1");

    watched.stop().await;
    // Judged by the process that is left, delivered to the watcher once it
    // has reconnected there, after the event it already printed.
    temperatures(&mut other.ingest(&d2).await, 1, now, &[45.0]).await;
    let (second, device) = watch.event().await;
    assert_eq!(device, "d2");
    assert!(second > first, "{first} then {second}");
    other.stop().await;
}
