//! The server-wide budget for buffered readings (`--max-buffered-readings`):
//! while the database is stalled, the server admits no more than the budget
//! and the rest wait in the devices; once it moves, everything commits,
//! nothing lost or doubled.

use std::time::Duration;

use crate::common::*;
use ingest::Limits;
use ingest::storage::Database;

backend_tests!(a_stalled_database_holds_no_more_than_the_budget);

const BUDGET: u32 = 1_000;
const DEVICES: usize = 8;
const BATCHES: u64 = 10;
const PER_BATCH: usize = 100;

/// A connection holding the database's write lock (SQLite) or a lock on
/// `readings` that inserts wait for (PostgreSQL), until dropped. The
/// server's SQLite writer waits up to 10 s for the lock, longer than this
/// test holds it.
enum Stall {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Stall {
    async fn begin(database: &Database) -> Self {
        use sqlx::Connection;
        match database {
            Database::Sqlite { path } => {
                let url = format!("sqlite://{}", path.display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                Self::Sqlite(conn)
            }
            Database::Postgres { url } => {
                let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
                sqlx::raw_sql("BEGIN; LOCK TABLE readings IN SHARE ROW EXCLUSIVE MODE")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                Self::Postgres(conn)
            }
        }
    }

    async fn release(self) {
        match self {
            Self::Sqlite(mut conn) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
            }
            Self::Postgres(mut conn) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
            }
        }
    }
}

async fn a_stalled_database_holds_no_more_than_the_budget(backend: Backend) {
    let limits = Limits {
        max_buffered_readings: BUDGET,
        ..Limits::default()
    };
    let Some(server) = TestServer::start_with(backend, limits).await else {
        return;
    };
    let before = server.metrics().await;
    assert_eq!(
        before.get("ingest_buffered_readings_limit", &[]),
        Some(f64::from(BUDGET))
    );
    let mut tokens = Vec::new();
    for n in 0..DEVICES {
        tokens.push(server.register(&format!("budget-{n}")).await);
    }
    let stall = Stall::begin(&server.storage.database).await;
    let mut uploads = Vec::new();
    for token in &tokens {
        let mut ingest = server.ingest(token).await;
        uploads.push(tokio::spawn(async move {
            let batches = (1..=BATCHES).map(|s| simple_batch(s, PER_BATCH)).collect();
            upload(&mut ingest, batches).await
        }));
    }
    // 8 streams offer 8,000 readings; the budget admits 1,000 and the
    // streams wait, unread, for the rest.
    eventually("the budget to fill", Duration::from_secs(10), async || {
        server.metrics().await.sum("ingest_buffered_readings", &[]) == f64::from(BUDGET)
    })
    .await;
    for _ in 0..5 {
        let metrics = server.metrics().await;
        let buffered = metrics.sum("ingest_buffered_readings", &[]);
        assert!(
            buffered <= f64::from(BUDGET),
            "{buffered} buffered\n{metrics}"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(server.storage.count_readings().await, 0, "the stall holds");

    stall.release().await;
    for upload in uploads {
        let summary = upload.await.unwrap().unwrap();
        assert_eq!(summary.readings_accepted, BATCHES * PER_BATCH as u64);
        assert_eq!(summary.committed_sequence, BATCHES);
    }
    assert_eq!(
        server.storage.count_readings().await,
        (DEVICES * BATCHES as usize * PER_BATCH) as i64
    );
    let after = server.metrics().await;
    assert_eq!(after.sum("ingest_buffered_readings", &[]), 0.0, "{after}");
    assert!(
        after.sum("ingest_upload_budget_wait_seconds_total", &[]) > 0.0,
        "streams waited for the budget\n{after}"
    );
}
