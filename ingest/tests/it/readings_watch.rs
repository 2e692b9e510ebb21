//! WatchReadings end to end: the real server, its generated client, both
//! backends. Replay then live with no gap and no duplicate, resuming at
//! every chunk, heartbeats, selections, named consumers, retention, bad
//! input and limits.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::*;
use telemetry_proto::v1 as pb;
use tonic::Code;

/// Chunks small enough that a batch of a few hundred readings makes several.
const CHUNK_BYTES: usize = 1024;
const HEARTBEAT: Duration = Duration::from_millis(200);
/// A bound on any one wait for the stream: a failure, not a pause.
const PATIENCE: Duration = Duration::from_secs(20);

async fn start(backend: Backend) -> Option<TestServer> {
    start_with(backend, |_| {}).await
}

async fn start_with(
    backend: Backend,
    more: impl Fn(&mut ingest::server::config::Config) + Send + Sync + 'static,
) -> Option<TestServer> {
    TestServer::start_configured(backend, move |c| {
        c.feed.chunk_bytes = CHUNK_BYTES;
        c.feed.heartbeat = HEARTBEAT;
        // Pages that end inside a replay.
        c.feed.page_batches = 3;
        c.feed.page_readings = 150;
        more(c);
    })
    .await
}

/// [`start`], with device "d1" registered and its upload client, and the
/// time its readings start at.
async fn start_with_d1(backend: Backend) -> Option<(TestServer, Ingest, u64)> {
    let server = start(backend).await?;
    let d1 = server.ingest(&server.register("d1").await).await;
    Some((server, d1, hour_start(2)))
}

/// A reading as a consumer keys it: (device, batch sequence, index in
/// batch), with what it holds: (sensor, time, value).
type Key = (String, u64, u32);
type Row = (String, u64, f64);

/// Readings of the chunks in the order they came, with their positions.
fn rows(chunks: &[pb::ReadingsChunk]) -> Vec<(u64, Key, Row)> {
    let mut out = Vec::new();
    for c in chunks {
        let Some(pb::readings_chunk::Data::Series(s)) = &c.data else {
            continue;
        };
        for (i, (t, v)) in s.time_unix_nano.iter().zip(&s.value).enumerate() {
            out.push((
                c.position,
                (
                    c.device_id.clone(),
                    c.batch_sequence,
                    c.first_index + i as u32,
                ),
                (s.sensor.clone(), *t, *v),
            ));
        }
    }
    out
}

/// The readings of `batches` of `device`, keyed as the feed keys them.
fn expected(device: &str, batches: &[pb::ReadingBatch]) -> Vec<(Key, Row)> {
    let mut out = Vec::new();
    for b in batches {
        let mut index = 0u32;
        for s in &b.series {
            for (t, v) in s.time_unix_nano.iter().zip(&s.value) {
                out.push((
                    (device.to_owned(), b.sequence, index),
                    (s.sensor.clone(), *t, *v),
                ));
                index += 1;
            }
        }
    }
    out
}

/// Batches `first..first + n` of two series (temperature then humidity),
/// `per_series` readings each, from `t0`.
fn batches(first: u64, n: u64, per_series: u64, t0: u64) -> Vec<pb::ReadingBatch> {
    (first..first + n)
        .map(|seq| {
            let at = |k: u64, shift: f64| -> Vec<(u64, f64)> {
                (0..per_series)
                    .map(|i| {
                        (
                            t0 + (seq * 1000 + i) * MIN / 1000 + k,
                            seq as f64 + i as f64 / 8.0 + shift,
                        )
                    })
                    .collect()
            };
            batch(
                seq,
                vec![
                    series("temperature", "Cel", &at(0, 0.0)),
                    series("humidity", "%", &at(1, 0.5)),
                ],
            )
        })
        .collect()
}

fn from(start: pb::watch_readings_request::Start) -> pb::WatchReadingsRequest {
    pb::WatchReadingsRequest {
        start: Some(start),
        ..Default::default()
    }
}

fn earliest() -> pb::WatchReadingsRequest {
    from(pb::watch_readings_request::Start::FromEarliest(true))
}

fn after(cursor: &str) -> pb::WatchReadingsRequest {
    from(pb::watch_readings_request::Start::FromCursor(
        cursor.to_owned(),
    ))
}

type Watch = tonic::Streaming<pb::ReadingsChunk>;

async fn watch(ops: &mut Ops, req: pb::WatchReadingsRequest) -> Result<Watch, tonic::Status> {
    Ok(ops.watch_readings(req).await?.into_inner())
}

/// Messages of the stream until `enough` holds of the readings so far.
async fn take_until(
    stream: &mut Watch,
    mut enough: impl FnMut(&[pb::ReadingsChunk]) -> bool,
) -> Vec<pb::ReadingsChunk> {
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while !enough(&got) {
            let message = stream
                .message()
                .await
                .expect("the stream goes on")
                .expect("the stream does not end");
            got.push(message);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the stream stalled after {} messages", got.len()));
    got
}

/// Messages until the stream holds `n` readings.
async fn take_readings(stream: &mut Watch, n: usize) -> Vec<pb::ReadingsChunk> {
    take_until(stream, |got| rows(got).len() >= n).await
}

/// Checks what a watcher saw: positions never go back, a batch's readings
/// come together and in order, and nothing comes twice.
fn assert_commit_ordered(seen: &[(u64, Key, Row)]) {
    let mut keys = HashSet::new();
    for pair in seen.windows(2) {
        let ((p1, k1, _), (p2, k2, _)) = (&pair[0], &pair[1]);
        assert!(p1 <= p2, "position {p2} after {p1}");
        if p1 == p2 {
            assert_eq!((&k1.0, k1.1), (&k2.0, k2.1), "one position, one batch");
            assert!(
                k1.2 < k2.2,
                "indices in order within a batch: {k1:?} then {k2:?}"
            );
        }
    }
    for (_, key, _) in seen {
        assert!(keys.insert(key.clone()), "{key:?} came twice");
    }
}

fn sorted(mut v: Vec<(Key, Row)>) -> Vec<(Key, Row)> {
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

async fn replay_then_live_without_gap_or_duplicate(backend: Backend) {
    let Some((server, mut d1, t0)) = start_with_d1(backend).await else {
        return;
    };
    let mut d2 = server.ingest(&server.register("d2").await).await;
    let before1 = batches(1, 5, 40, t0);
    let before2 = batches(1, 4, 70, t0 + SEC);
    upload(&mut d1, before1.clone()).await.unwrap();
    upload(&mut d2, before2.clone()).await.unwrap();
    let mut ops = server.ops().await;
    let mut stream = watch(&mut ops, earliest()).await.unwrap();
    let first = take_until(&mut stream, |got| {
        rows(got).len() >= expected("d1", &before1).len() + expected("d2", &before2).len()
    })
    .await;
    // The first message says where the watch starts.
    assert!(
        matches!(first[0].data, Some(pb::readings_chunk::Data::Heartbeat(_))),
        "{:?}",
        first[0]
    );
    // Live: two devices upload while the watcher reads.
    let after1 = batches(6, 6, 30, t0);
    let after2 = batches(5, 6, 90, t0 + SEC);
    let uploads = tokio::spawn({
        let (after1, after2) = (after1.clone(), after2.clone());
        async move {
            for (b1, b2) in after1.into_iter().zip(after2) {
                upload(&mut d1, vec![b1]).await.unwrap();
                upload(&mut d2, vec![b2]).await.unwrap();
            }
        }
    });
    let all: Vec<(Key, Row)> = [&before1, &after1]
        .iter()
        .flat_map(|b| expected("d1", b))
        .chain([&before2, &after2].iter().flat_map(|b| expected("d2", b)))
        .collect();
    let rest = take_until(&mut stream, |got| {
        rows(&first).len() + rows(got).len() >= all.len()
    })
    .await;
    uploads.await.unwrap();
    let seen: Vec<_> = rows(&first).into_iter().chain(rows(&rest)).collect();
    assert_commit_ordered(&seen);
    let got = sorted(
        seen.iter()
            .map(|(_, k, r)| (k.clone(), r.clone()))
            .collect(),
    );
    let total = all.len();
    assert_eq!(got, sorted(all));
    // Positions are gap-free: the batches are 1..=21.
    let positions: Vec<u64> = {
        let mut p: Vec<u64> = seen.iter().map(|(p, _, _)| *p).collect();
        p.dedup();
        p
    };
    assert_eq!(positions, (1..=21).collect::<Vec<_>>());
    // A chunk stays far under the limit.
    for c in first.iter().chain(&rest) {
        assert!(
            prost::Message::encoded_len(c) < CHUNK_BYTES + 512,
            "{}",
            prost::Message::encoded_len(c)
        );
    }
    let metrics = admin::Metrics::scrape(server.admin_addr).await;
    assert_eq!(metrics.sum("watch_streams_open", &[]), 1.0);
    assert!(metrics.sum("watch_rows_sent_total", &[]) >= total as f64);
    eventually("the feed's high-water metric", PATIENCE, async || {
        admin::Metrics::scrape(server.admin_addr)
            .await
            .sum("readings_feed_last_position", &[])
            == 21.0
    })
    .await;
}

async fn resuming_at_every_chunk_gives_exactly_the_rest(backend: Backend) {
    let Some((server, mut d1, t0)) = start_with_d1(backend).await else {
        return;
    };
    // Batches of 2 × 100 readings: several chunks each.
    let sent = batches(1, 4, 100, t0);
    upload(&mut d1, sent.clone()).await.unwrap();
    let total = expected("d1", &sent).len();
    let mut ops = server.ops().await;
    let mut stream = watch(&mut ops, earliest()).await.unwrap();
    let all = take_readings(&mut stream, total).await;
    drop(stream);
    let all_rows = rows(&all);
    assert_eq!(all_rows.len(), total);
    assert!(all.len() > 8, "{} messages", all.len());
    for (i, message) in all.iter().enumerate() {
        assert!(!message.cursor.is_empty(), "message {i} carries a cursor");
        let rest_rows = rows(&all[i + 1..]);
        let mut stream = watch(&mut ops, after(&message.cursor)).await.unwrap();
        let rest = take_readings(&mut stream, rest_rows.len()).await;
        assert_eq!(rows(&rest), rest_rows, "resumed after message {i}");
    }
}

async fn a_quiet_stream_sends_its_cursor_and_resumes_from_it(backend: Backend) {
    let Some((server, mut d1, t0)) = start_with_d1(backend).await else {
        return;
    };
    upload(&mut d1, batches(1, 2, 10, t0)).await.unwrap();
    let mut ops = server.ops().await;
    let mut stream = watch(
        &mut ops,
        from(pb::watch_readings_request::Start::FromNow(true)),
    )
    .await
    .unwrap();
    // From now: a heartbeat at the newest position first, then more while
    // nothing happens.
    let beats = take_until(&mut stream, |got| got.len() >= 3).await;
    for beat in &beats {
        assert!(
            matches!(beat.data, Some(pb::readings_chunk::Data::Heartbeat(_))),
            "{beat:?}"
        );
        assert_eq!(beat.position, 2);
    }
    let cursor = beats[2].cursor.clone();
    drop(stream);
    let more = batches(3, 1, 10, t0);
    upload(&mut d1, more.clone()).await.unwrap();
    let mut stream = watch(&mut ops, after(&cursor)).await.unwrap();
    let got = take_readings(&mut stream, 20).await;
    let got: Vec<_> = rows(&got).into_iter().map(|(_, k, r)| (k, r)).collect();
    assert_eq!(got, expected("d1", &more));
}

async fn a_selection_sees_only_its_devices_and_sensors(backend: Backend) {
    let Some((server, mut d1, t0)) = start_with_d1(backend).await else {
        return;
    };
    let mut d2 = server.ingest(&server.register("d2").await).await;
    let b1 = batches(1, 3, 20, t0);
    let b2 = batches(1, 3, 20, t0);
    upload(&mut d1, b1.clone()).await.unwrap();
    upload(&mut d2, b2.clone()).await.unwrap();
    let mut ops = server.ops().await;
    let req = pb::WatchReadingsRequest {
        devices: Some(pb::DeviceSelector {
            selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
                device_ids: vec!["d2".into()],
            })),
        }),
        sensors: vec!["humidity".into()],
        start: Some(pb::watch_readings_request::Start::FromEarliest(true)),
    };
    let mut stream = watch(&mut ops, req).await.unwrap();
    let want: Vec<(Key, Row)> = expected("d2", &b2)
        .into_iter()
        .filter(|(_, r)| r.0 == "humidity")
        .collect();
    let got = take_readings(&mut stream, want.len()).await;
    let seen: Vec<_> = rows(&got).into_iter().map(|(_, k, r)| (k, r)).collect();
    assert_eq!(seen, want);
    // The cursor moves past what the selection skips: a heartbeat names
    // the newest position.
    let beat = take_until(&mut stream, |got| {
        got.last()
            .is_some_and(|m| matches!(m.data, Some(pb::readings_chunk::Data::Heartbeat(_))))
    })
    .await;
    assert_eq!(beat.last().unwrap().position, 6);
}

async fn named_consumers_commit_resume_list_and_delete(backend: Backend) {
    let Some((server, mut d1, t0)) = start_with_d1(backend).await else {
        return;
    };
    let sent = batches(1, 3, 10, t0);
    upload(&mut d1, sent.clone()).await.unwrap();
    let mut ops = server.ops().await;
    let mut stream = watch(&mut ops, earliest()).await.unwrap();
    let all = take_readings(&mut stream, 60).await;
    drop(stream);
    // The consumer read the first batch.
    let first_batch_end = all
        .iter()
        .rfind(|m| m.position == 1)
        .expect("a chunk of batch 1")
        .cursor
        .clone();
    let committed = ops
        .commit_readings_cursor(pb::CommitReadingsCursorRequest {
            consumer: "lake-loader".into(),
            cursor: first_batch_end,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed.name, "lake-loader");
    assert_eq!(committed.position, 1);
    assert_eq!(committed.last_position, 3);
    assert_eq!(committed.lag_positions, 2);
    assert!(
        committed.lag_seconds.is_some_and(|s| s >= 0.0),
        "{committed:?}"
    );
    let listed = ops
        .list_readings_consumers(pb::ListReadingsConsumersRequest {})
        .await
        .unwrap()
        .into_inner()
        .consumers;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].lag_positions, 2);
    let metrics = admin::Metrics::scrape(server.admin_addr).await;
    assert_eq!(
        metrics.sum(
            "readings_feed_consumer_lag_positions",
            &[("consumer", "lake-loader")]
        ),
        2.0
    );
    // Resuming by name continues after its cursor.
    let mut stream = watch(
        &mut ops,
        from(pb::watch_readings_request::Start::FromConsumer(
            "lake-loader".into(),
        )),
    )
    .await
    .unwrap();
    let rest = take_readings(&mut stream, 40).await;
    let rest: Vec<_> = rows(&rest).into_iter().map(|(_, k, r)| (k, r)).collect();
    assert_eq!(rest, expected("d1", &sent[1..]));
    drop(stream);
    ops.delete_readings_consumer(pb::DeleteReadingsConsumerRequest {
        consumer: "lake-loader".into(),
    })
    .await
    .unwrap();
    let gone = watch(
        &mut ops,
        from(pb::watch_readings_request::Start::FromConsumer(
            "lake-loader".into(),
        )),
    )
    .await
    .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let again = ops
        .delete_readings_consumer(pb::DeleteReadingsConsumerRequest {
            consumer: "lake-loader".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
}

async fn bad_input_gets_a_precise_status(backend: Backend) {
    let Some(server) = start(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    let malformed = watch(&mut ops, after("not-a-cursor")).await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument, "{malformed:?}");
    assert!(malformed.message().contains("cursor"), "{malformed:?}");
    // A cursor of another feed: another database's key signed it.
    let Some(other) = start(backend).await else {
        return;
    };
    let mut other_ops = other.ops().await;
    let mut stream = watch(
        &mut other_ops,
        from(pb::watch_readings_request::Start::FromNow(true)),
    )
    .await
    .unwrap();
    let foreign = stream.message().await.unwrap().unwrap().cursor;
    let refused = watch(&mut ops, after(&foreign)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("another database"),
        "{refused:?}"
    );
    let refused = ops
        .commit_readings_cursor(pb::CommitReadingsCursorRequest {
            consumer: "lake".into(),
            cursor: foreign,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    for name in ["", "-lake", "lake loader", &"x".repeat(65)] {
        let refused = watch(
            &mut ops,
            from(pb::watch_readings_request::Start::FromConsumer(name.into())),
        )
        .await
        .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{name:?}: {refused:?}"
        );
        assert!(refused.message().contains("consumer"), "{refused:?}");
    }
    let unknown = watch(
        &mut ops,
        from(pb::watch_readings_request::Start::FromConsumer(
            "nobody".into(),
        )),
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let no_device = watch(
        &mut ops,
        pb::WatchReadingsRequest {
            devices: Some(pb::DeviceSelector {
                selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
                    device_ids: vec!["ghost".into()],
                })),
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(no_device.code(), Code::NotFound, "{no_device:?}");
    let device_token = server.register("d1").await;
    let mut as_device = server.ops_with(Bearer::new(&device_token).unwrap()).await;
    let refused = watch(&mut as_device, earliest()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
}

async fn past_the_stream_limit_comes_retry_info(backend: Backend) {
    use tonic_types::StatusExt;
    let Some(server) = start_with(backend, |c| c.feed.max_streams = 1).await else {
        return;
    };
    let mut ops = server.ops().await;
    let mut held = watch(&mut ops, earliest()).await.unwrap();
    held.message().await.unwrap().unwrap();
    let status = watch(&mut ops, earliest()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-watch-streams"),
        "{status:?}"
    );
    assert!(
        status
            .get_details_retry_info()
            .and_then(|r| r.retry_delay)
            .is_some_and(|d| d > Duration::ZERO),
        "{status:?}"
    );
    drop(held);
    eventually(
        "the cancelled watch frees its place",
        PATIENCE,
        async || watch(&mut ops, earliest()).await.is_ok(),
    )
    .await;
}

async fn retention_refuses_a_cursor_it_overtook(backend: Backend) {
    let Some(server) = start_with(backend, |c| {
        c.retention.feed = Duration::from_secs(1);
        c.retention.interval = Duration::from_millis(100);
    })
    .await
    else {
        return;
    };
    let t0 = hour_start(2);
    let mut d1 = server.ingest(&server.register("d1").await).await;
    let mut ops = server.ops().await;
    // A cursor before anything was committed.
    let mut stream = watch(&mut ops, earliest()).await.unwrap();
    let start = stream.message().await.unwrap().unwrap().cursor;
    drop(stream);
    upload(&mut d1, batches(1, 2, 5, t0)).await.unwrap();
    let status = eventually_ok(
        "retention removes the batches",
        PATIENCE,
        async || match watch(&mut ops, after(&start)).await {
            Err(status) => Ok(status),
            Ok(_) => Err("still served".into()),
        },
    )
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("earliest valid cursor"),
        "{status:?}"
    );
    // The cursor it names is served.
    let named = status.message().rsplit(' ').next().unwrap().to_owned();
    let mut stream = watch(&mut ops, after(&named)).await.unwrap();
    upload(&mut d1, batches(3, 1, 5, t0)).await.unwrap();
    let got = take_readings(&mut stream, 10).await;
    assert_eq!(rows(&got)[0].1, ("d1".to_owned(), 3, 0));
}

async fn the_feed_survives_a_restart(backend: Backend) {
    let Some(server) = start(backend).await else {
        return;
    };
    let t0 = hour_start(2);
    let token = server.register("d1").await;
    let mut d1 = server.ingest(&token).await;
    let first = batches(1, 2, 10, t0);
    upload(&mut d1, first.clone()).await.unwrap();
    let mut ops = server.ops().await;
    let mut stream = watch(&mut ops, earliest()).await.unwrap();
    let got = take_readings(&mut stream, 40).await;
    let cursor = got.last().unwrap().cursor.clone();
    drop((stream, ops, d1));
    let server = server.restart().await;
    let mut d1 = server.ingest(&token).await;
    let second = batches(3, 2, 10, t0);
    upload(&mut d1, second.clone()).await.unwrap();
    let mut ops = server.ops().await;
    let mut stream = watch(&mut ops, after(&cursor)).await.unwrap();
    let got = take_readings(&mut stream, 40).await;
    let got: Vec<_> = rows(&got)
        .into_iter()
        .map(|(p, k, r)| (p, (k, r)))
        .collect();
    assert_eq!(got.first().unwrap().0, 3, "positions go on after a restart");
    let got: Vec<_> = got.into_iter().map(|(_, kr)| kr).collect();
    assert_eq!(got, expected("d1", &second));
}

backend_tests!(
    replay_then_live_without_gap_or_duplicate,
    resuming_at_every_chunk_gives_exactly_the_rest,
    a_quiet_stream_sends_its_cursor_and_resumes_from_it,
    a_selection_sees_only_its_devices_and_sensors,
    named_consumers_commit_resume_list_and_delete,
    bad_input_gets_a_precise_status,
    past_the_stream_limit_comes_retry_info,
    retention_refuses_a_cursor_it_overtook,
    the_feed_survives_a_restart,
);

mod cli {
    use super::*;
    use std::io::BufRead;

    async fn tail_follows_saves_commits_and_stops_on_ctrl_c(backend: Backend) {
        let Some(server) = start(backend).await else {
            return;
        };
        let t0 = hour_start(2);
        let mut d1 = server.ingest(&server.register("d1").await).await;
        let sent = batches(1, 3, 10, t0);
        upload(&mut d1, sent.clone()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cursor_file = dir.path().join("feed.cursor");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ingest"))
            .args([
                "readings", "tail", "--from", "earliest", "--format", "jsonl",
            ])
            .args([
                "--consumer",
                "lake",
                "--commit-every",
                "0s",
                "--cursor-file",
            ])
            .arg(&cursor_file)
            .args(["--server", &server.url()])
            .env("INGEST_OPS_TOKEN", OPS_TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let rows: Vec<serde_json::Value> = tokio::task::block_in_place(|| {
            (0..60)
                .map(|_| serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap())
                .collect()
        });
        let keys: Vec<(u64, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r["batch_sequence"].as_u64().unwrap(),
                    r["index"].as_u64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(u64, u64)> = expected("d1", &sent)
            .iter()
            .map(|((_, seq, index), _)| (*seq, u64::from(*index)))
            .collect();
        assert_eq!(keys, want);
        let first = &rows[0];
        for column in [
            "device_id",
            "sensor",
            "unit",
            "time_unix_nano",
            "time_utc",
            "value",
            "cursor",
        ] {
            assert!(!first[column].is_null(), "{column} in {first}");
        }
        let last_cursor = rows[59]["cursor"].as_str().unwrap().to_owned();
        // The cursor file follows the rows, and the consumer's cursor is
        // committed as they come (--commit-every 0s).
        eventually(
            "the cursor file holds the last cursor",
            PATIENCE,
            async || std::fs::read_to_string(&cursor_file).is_ok_and(|t| t.trim() == last_cursor),
        )
        .await;
        // SIGINT: the last cursor on stderr, a clean exit.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let output = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
        assert!(output.status.success(), "{output:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(
            stderr.contains(&format!("last cursor: {last_cursor}")),
            "{stderr}"
        );

        let run = server
            .operator_cli(&["readings", "consumers", "--json"])
            .await;
        assert!(run.success, "{}", run.stderr);
        let lake: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
        assert_eq!(lake["name"], "lake");
        assert_eq!(lake["position"], 3);
        assert_eq!(lake["lag_positions"], 0);
        // Started again, it resumes after the file's cursor: only new rows.
        upload(&mut d1, batches(4, 1, 10, t0)).await.unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ingest"))
            .args(["readings", "tail", "--format", "csv", "--cursor-file"])
            .arg(&cursor_file)
            .args(["--server", &server.url()])
            .env("INGEST_OPS_TOKEN", OPS_TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let csv: Vec<String> = tokio::task::block_in_place(|| {
            (0..21).map(|_| lines.next().unwrap().unwrap()).collect()
        });
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            csv[0],
            "device_id,sensor,unit,time_unix_nano,time_utc,value,batch_sequence,index,cursor"
        );
        assert!(csv[1].starts_with("d1,temperature,Cel,"), "{}", csv[1]);
        assert!(csv.iter().skip(1).all(|l| l.contains(",4,")), "{csv:?}");

        let run = server
            .operator_cli(&["readings", "consumers", "delete", "lake"])
            .await;
        assert!(run.success, "{}", run.stderr);
        let run = server
            .operator_cli(&["readings", "consumers", "delete", "lake"])
            .await;
        assert!(!run.success);
        assert!(
            run.stderr.contains("consumer lake does not exist"),
            "{}",
            run.stderr
        );
    }

    backend_tests!(tail_follows_saves_commits_and_stops_on_ctrl_c);
}

/// Three `ingest serve` processes on one PostgreSQL, each with two
/// writers, devices uploading through all of them at once: watchers on two
/// processes see one commit order, positions 1..=N each once, every
/// reading once, and a watcher that resumes from a cursor on a third
/// process continues it exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_commit_order_across_processes() {
    use crate::common::cluster::{Cluster, ClusterSpec};
    let Some(cluster) = Cluster::start(ClusterSpec::new(3)).await else {
        return;
    };
    let devices = cluster.register_many("feed", 6).await;
    let mut w0 = watch(&mut cluster.ops(0).await, earliest()).await.unwrap();
    let mut w2 = watch(&mut cluster.ops(2).await, earliest()).await.unwrap();
    let t0 = hour_start(2);
    const BATCHES: u64 = 15;
    let mut uploads = Vec::new();
    let mut all = Vec::new();
    for (d, (id, token)) in devices.iter().enumerate() {
        let sent = batches(1, BATCHES, 5, t0 + d as u64);
        all.extend(expected(id, &sent));
        let mut client = cluster.ingest(d % 3, token).await;
        uploads.push(tokio::spawn(async move {
            // One batch per call: many small commits from every process.
            for b in sent {
                upload(&mut client, vec![b]).await.unwrap();
            }
        }));
    }
    for u in uploads {
        u.await.unwrap();
    }
    let n = all.len();
    let seen0 = rows(&take_readings(&mut w0, n).await);
    let seen2 = rows(&take_readings(&mut w2, n).await);
    assert_commit_ordered(&seen0);
    assert_eq!(seen0, seen2, "two processes' watchers see one order");
    let got = sorted(
        seen0
            .iter()
            .map(|(_, k, r)| (k.clone(), r.clone()))
            .collect(),
    );
    assert_eq!(got, sorted(all));
    let mut positions: Vec<u64> = seen0.iter().map(|(p, _, _)| *p).collect();
    positions.dedup();
    assert_eq!(positions, (1..=6 * BATCHES).collect::<Vec<_>>());
    // A cursor taken on process 0, resumed on process 1.
    let mut w0 = watch(&mut cluster.ops(0).await, earliest()).await.unwrap();
    let half = take_readings(&mut w0, n / 2).await;
    let cursor = half.last().unwrap().cursor.clone();
    let mut w1 = watch(&mut cluster.ops(1).await, after(&cursor))
        .await
        .unwrap();
    let rest = rows(&take_readings(&mut w1, n - rows(&half).len()).await);
    let joined: Vec<_> = rows(&half).into_iter().chain(rest).collect();
    assert_eq!(joined, seen0);
}
