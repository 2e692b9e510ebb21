//! WatchReadings streams held through every kill, as a downstream job
//! holds one: each starts at the earliest batch, reconnects from the last
//! cursor it received (to the next server, with several), and keeps every
//! reading with its dedup key and feed position, so the checks can compare
//! what it saw with what is stored.

use std::time::Duration;

use telemetry_proto::v1 as pb;
use tokio::sync::watch;

/// One reading as the feed delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedRow {
    pub position: u64,
    pub device: String,
    pub sequence: u64,
    pub index: u32,
    pub time: i64,
    pub value: f64,
}

#[derive(Debug, Default, Clone)]
pub struct FeedSeen {
    /// What the watcher follows, for the report.
    pub label: String,
    /// `None`: every device.
    pub devices: Option<Vec<String>>,
    /// In the order received.
    pub rows: Vec<FeedRow>,
    pub reconnects: u64,
    /// Positions that came after a larger one: the cursor went back.
    pub backwards: Vec<(u64, u64)>,
}

/// Watches until `stop` turns true; `last` publishes the newest position
/// the watcher has considered (chunks and heartbeats), so the trial can
/// wait for it to catch up.
pub async fn run(
    label: String,
    devices: Option<Vec<String>>,
    urls: Vec<String>,
    ops_token: String,
    last: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) -> FeedSeen {
    let mut seen = FeedSeen {
        label,
        devices: devices.clone(),
        ..FeedSeen::default()
    };
    let Some(mut clients) = super::watcher::clients(urls, &ops_token) else {
        return seen;
    };
    let selector = devices.map(|ids| pb::DeviceSelector {
        selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
            device_ids: ids,
        })),
    });
    let mut cursor = String::new();
    let mut newest = 0u64;
    let mut server = 0;
    let mut first = true;
    while !*stop.borrow() {
        if !first {
            seen.reconnects += 1;
            server = (server + 1) % clients.len();
        }
        first = false;
        let start = if cursor.is_empty() {
            pb::watch_readings_request::Start::FromEarliest(true)
        } else {
            pb::watch_readings_request::Start::FromCursor(cursor.clone())
        };
        let request = pb::WatchReadingsRequest {
            devices: selector.clone(),
            sensors: Vec::new(),
            start: Some(start),
        };
        let ops = &mut clients[server];
        let opened = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = ops.watch_readings(request) => r,
        };
        if let Ok(response) = opened {
            let mut chunks = response.into_inner();
            loop {
                let message = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return seen,
                    m = chunks.message() => m,
                };
                let chunk = match message {
                    Ok(Some(chunk)) => chunk,
                    // Ended or broken: the server went away.
                    Ok(None) | Err(_) => break,
                };
                if chunk.position < newest {
                    seen.backwards.push((newest, chunk.position));
                }
                newest = newest.max(chunk.position);
                if let Some(pb::readings_chunk::Data::Series(s)) = &chunk.data {
                    for (i, (t, v)) in s.time_unix_nano.iter().zip(&s.value).enumerate() {
                        seen.rows.push(FeedRow {
                            position: chunk.position,
                            device: chunk.device_id.clone(),
                            sequence: chunk.batch_sequence,
                            index: chunk.first_index + i as u32,
                            time: *t as i64,
                            value: *v,
                        });
                    }
                }
                cursor = chunk.cursor;
                // A chunk may end inside its batch; a heartbeat's cursor is
                // past every batch up to its position.
                let through = match chunk.data {
                    Some(pb::readings_chunk::Data::Heartbeat(_)) => chunk.position,
                    _ => chunk.position.saturating_sub(1),
                };
                last.send_replace(through);
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    seen
}
