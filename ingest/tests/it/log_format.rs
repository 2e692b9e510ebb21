//! `ingest serve --log-format json`: every log line is a JSON object a log
//! shipper can read, with the event's fields under `fields`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn json_log_lines_carry_the_fields() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ingest"))
        .args(["serve", "--log-format", "json", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", ""])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .env_remove("INGEST_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both streams, read on threads: a line on either may come first.
    let (tx, lines) = mpsc::channel::<(&str, String)>();
    let readers: Vec<_> = [
        (
            "stdout",
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        ),
        ("stderr", Box::new(child.stderr.take().unwrap())),
    ]
    .into_iter()
    .map(|(name, stream)| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send((name, line)).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let serving = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (name, line) = match lines.recv_timeout(left) {
            Ok(got) => got,
            Err(_) => {
                let _ = child.kill();
                panic!("no \"serving\" line within 60 s; saw:\n{}", seen.join("\n"));
            }
        };
        let value: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{name} line is not JSON ({e}): {line}"));
        seen.push(line);
        if value["fields"]["message"] == "serving" {
            break value;
        }
    };
    let addr = serving["fields"]["addr"].as_str().expect("fields.addr");
    assert!(addr.starts_with("127.0.0.1:"), "{serving}");
    assert_ne!(addr, "127.0.0.1:0", "the bound port, not the requested one");
    assert_eq!(serving["fields"]["backend"], "sqlite", "{serving}");
    assert_eq!(serving["level"], "INFO", "{serving}");
    assert!(serving["target"].as_str().is_some(), "{serving}");
    assert!(serving["timestamp"].as_str().is_some(), "{serving}");

    // "serving" is logged just before the server listens for SIGTERM: wait
    // until it answers, or the signal's default action would kill it.
    serving_health(addr);

    // SAFETY: kill(2) on our own child's pid, which has not been reaped.
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    // The lines up to the exit, every one JSON too.
    for (name, line) in lines.iter() {
        let value: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{name} line is not JSON ({e}): {line}"));
        seen.push(value["fields"]["message"].to_string());
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}; lines: {seen:?}");
    assert!(
        seen.iter().any(|m| m == "\"stopped\""),
        "no \"stopped\" line: {seen:?}"
    );
    for reader in readers {
        reader.join().unwrap();
    }
}

/// Waits (at most 30 s) until the gRPC health service at `addr` answers.
fn serving_health(addr: &str) {
    let url = format!("http://{addr}");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let answered = async {
                    let channel = tonic::transport::Channel::from_shared(url.clone())
                        .unwrap()
                        .connect()
                        .await?;
                    tonic_health::pb::health_client::HealthClient::new(channel)
                        .check(tonic_health::pb::HealthCheckRequest::default())
                        .await?;
                    Ok::<_, Box<dyn std::error::Error>>(())
                }
                .await;
                match answered {
                    Ok(()) => return,
                    Err(e) if tokio::time::Instant::now() > deadline => {
                        panic!("{url}: no health answer within 30 s: {e}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
}
