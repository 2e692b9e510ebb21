//! `ingest backup` while devices upload: the copy, restored, holds every
//! batch acknowledged before the backup started. SQLite through the
//! command's own copy; PostgreSQL through the pg_dump command it prints.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use telemetry_proto::v1 as pb;

backend_tests!(a_backup_taken_mid_ingest_restores_every_acknowledged_batch);

const DEVICES: usize = 4;
const READINGS_PER_BATCH: usize = 50;

/// The highest sequence acknowledged for each device so far.
type Acked = Arc<Mutex<HashMap<String, u64>>>;

async fn a_backup_taken_mid_ingest_restores_every_acknowledged_batch(backend: Backend) {
    let Some(server) = TestServer::start(backend).await else {
        return;
    };
    let acked: Acked = Arc::default();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut uploaders = Vec::new();
    for d in 0..DEVICES {
        let id = format!("dev-{d}");
        let mut client = server.ingest(&server.register(&id).await).await;
        let acked = acked.clone();
        let stop = stop.clone();
        uploaders.push(tokio::spawn(async move {
            let mut sequence = 0;
            while !*stop.borrow() {
                sequence += 1;
                // One batch per call: its summary is its acknowledgement.
                let summary = upload(
                    &mut client,
                    vec![simple_batch(sequence, READINGS_PER_BATCH)],
                )
                .await
                .unwrap();
                assert_eq!(summary.committed_sequence, sequence);
                acked.lock().unwrap().insert(id.clone(), sequence);
            }
        }));
    }
    // Some batches in, then the backup, with uploads still going.
    wait_for_acks(&acked, 5).await;
    let before: HashMap<String, u64> = acked.lock().unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("telemetry-backup");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ingest"));
    command.arg("backup").arg(&dest);
    match &server.storage.database {
        ingest::storage::Database::Sqlite { .. } => {
            command
                .arg("--data-dir")
                .arg(server.storage.data_dir.path());
        }
        ingest::storage::Database::Postgres { url } => {
            command.arg("--database-url").arg(url);
        }
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // More batches after the backup: the copy must not need them.
    let total_before = acked.lock().unwrap().values().sum::<u64>();
    wait_for_acks(&acked, total_before as usize + 4).await;
    let _ = stop_tx.send(true);
    for uploader in uploaders {
        uploader.await.unwrap();
    }

    let restored = TestStorage::new(server.storage.backend()).await.unwrap();
    match &restored.database {
        ingest::storage::Database::Sqlite { path } => {
            assert!(stdout.contains("integrity ok"), "{stdout}");
            std::fs::copy(&dest, path).unwrap();
        }
        ingest::storage::Database::Postgres { url } => {
            let dump = stdout
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("pg_dump "))
                .unwrap_or_else(|| panic!("no pg_dump command in {stdout:?}"));
            run_shell(dump);
            run_shell(&format!(
                "pg_restore --no-owner --exit-on-error --dbname '{url}' '{}'",
                dest.display()
            ));
        }
    }
    let restored = TestServer::start_on(restored, Default::default(), None).await;
    for (device, sequence) in &before {
        let token = rotate_token(&restored, device).await;
        let mut client = restored.ingest(&token).await;
        let got = cursor(&mut client).await;
        assert!(
            got >= *sequence,
            "{device}: acknowledged {sequence} before the backup, the restored copy has {got}"
        );
        let readings = restored
            .storage
            .scalar(&format!(
                "SELECT COUNT(*) FROM readings r JOIN sensors s ON s.pk = r.sensor_pk \
                 JOIN devices d ON d.pk = s.device_pk WHERE d.device_id = '{device}'"
            ))
            .await;
        assert_eq!(readings as u64, got * READINGS_PER_BATCH as u64, "{device}");
    }
}

/// The restored devices' tokens are the originals, which the uploaders
/// held; a fresh one is simpler to get.
async fn rotate_token(server: &TestServer, device: &str) -> String {
    server
        .ops()
        .await
        .rotate_device_token(pb::RotateDeviceTokenRequest {
            device_id: device.into(),
            overlap_millis: None,
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

async fn wait_for_acks(acked: &Acked, total: usize) {
    eventually(
        "the uploads acknowledged",
        Duration::from_secs(30),
        async || acked.lock().unwrap().values().sum::<u64>() >= total as u64,
    )
    .await;
}

fn run_shell(command: &str) {
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
