//! The fleet: one task per device, uploading like a device that must not
//! lose data. It asks GetUploadCursor where to resume, sends the next few
//! batches on one stream, and after any failure backs off briefly and asks
//! again, resending what was not acknowledged with the same sequence
//! numbers (and, now and then, batches it was never told about, as a device
//! that lost the acknowledgement would). With several servers a device
//! starts on one and, after a failure, resumes against the next, as a
//! balancing client would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ingest_client::IngestClient;
use tonic::transport::Endpoint;

use super::plan::Plan;

/// Batches on one upload stream, at most: small, so a trial has many
/// streams and many summaries around each kill.
const MAX_BATCHES_PER_STREAM: u64 = 6;

/// What one device was told, for the checks.
#[derive(Debug, Clone, Default)]
pub struct DeviceLog {
    pub device: u32,
    /// The highest committed_sequence of any summary it received: every
    /// batch up to it was acknowledged and must be stored.
    pub acked: u64,
    /// The highest cursor GetUploadCursor returned: also a promise.
    pub cursor: u64,
    pub streams: u64,
    pub failed_streams: u64,
    /// Batches sent again although the server had committed them.
    pub resent_committed: u64,
    /// Times it moved to another server after a failure (several servers).
    pub failovers: u64,
    pub finished: bool,
}

/// Batches acknowledged so far, all devices together: the clock the fault
/// schedule runs on.
#[derive(Debug, Default)]
pub struct Progress {
    pub acked_batches: AtomicU64,
}

pub async fn run_device(
    plan: Arc<Plan>,
    device: u32,
    token: String,
    urls: Vec<String>,
    progress: Arc<Progress>,
    deadline: Instant,
) -> DeviceLog {
    let mut log = DeviceLog {
        device,
        ..DeviceLog::default()
    };
    let mut rng = StdRng::seed_from_u64(plan.seed ^ (u64::from(device) << 32));
    let Ok(bearer) = Bearer::new(&token) else {
        return log;
    };
    let clients_len = urls.len();
    let mut clients = Vec::with_capacity(clients_len);
    for url in urls {
        let endpoint = match Endpoint::from_shared(url) {
            Ok(e) => e
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(5)),
            Err(_) => return log,
        };
        // Lazy: reconnects by itself after the server comes back.
        let channel = endpoint.connect_lazy();
        clients.push(IngestClient::with_interceptor(channel, bearer.clone()));
    }
    // Devices spread over the servers; with one server, always it. The
    // choice of the next server has its own generator, so the batches a
    // seed sends do not depend on the number of servers.
    let mut server = device as usize % clients.len();
    let mut balancer = StdRng::seed_from_u64(plan.seed ^ (u64::from(device) << 32) ^ 0xba1a);
    let mut fail_over = |server: &mut usize, log: &mut DeviceLog| {
        if clients_len > 1 {
            // Any other server, as a balancing client would pick: the
            // fleet stays spread over the survivors.
            *server = (*server + balancer.random_range(1..clients_len)) % clients_len;
            log.failovers += 1;
        }
    };
    let mut after_failure = false;
    while Instant::now() < deadline {
        let client = &mut clients[server];
        let cursor = match client
            .get_upload_cursor(pb::GetUploadCursorRequest {})
            .await
        {
            Ok(c) => c.into_inner().committed_sequence,
            Err(_) => {
                fail_over(&mut server, &mut log);
                back_off(&mut rng).await;
                continue;
            }
        };
        log.cursor = log.cursor.max(cursor);
        if cursor >= plan.batches {
            log.finished = true;
            break;
        }
        // A device that lost the acknowledgement resends from what it knew.
        let from = if after_failure && log.acked < cursor && rng.random_bool(0.3) {
            log.resent_committed += cursor - log.acked;
            log.acked + 1
        } else {
            cursor + 1
        };
        let n = rng.random_range(1..=MAX_BATCHES_PER_STREAM);
        let to = (cursor + n).min(plan.batches);
        let batches: Vec<_> = (from..=to).map(|s| plan.batch_proto(device, s)).collect();
        log.streams += 1;
        match client.upload_readings(tokio_stream::iter(batches)).await {
            Ok(summary) => {
                let committed = summary.into_inner().committed_sequence;
                if committed > log.acked {
                    progress
                        .acked_batches
                        .fetch_add(committed - log.acked, Ordering::Relaxed);
                    log.acked = committed;
                }
                after_failure = false;
            }
            Err(_) => {
                log.failed_streams += 1;
                after_failure = true;
                fail_over(&mut server, &mut log);
                back_off(&mut rng).await;
            }
        }
    }
    log
}

/// 10 to 100 ms, jittered so the fleet does not come back in lockstep.
pub async fn back_off(rng: &mut StdRng) {
    tokio::time::sleep(Duration::from_millis(rng.random_range(10..=100))).await;
}
