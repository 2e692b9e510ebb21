//! QueryReadings end to end: the real server, its generated client, both
//! backends. Ordering, chunk boundaries, resuming at every chunk, rollup
//! against raw, bad input, limits, cancel, read-your-writes, and the same
//! answers from SQLite and PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use ingest::storage::Database;
use prost::Message;
use telemetry_proto::v1 as pb;
use tonic::Code;

/// Chunks small enough that a few hundred readings make many of them.
const CHUNK_BYTES: usize = 1024;

/// Pages of raw readings small enough to end inside runs of equal
/// readings and to span several series.
const PAGE_ROWS: usize = 37;

/// Readings as long ago as a DST change of Europe/Berlin are accepted.
async fn start(backend: Backend) -> Option<TestServer> {
    TestServer::start_configured(backend, |c| {
        c.limits.readings.retention = Duration::from_secs(400 * 24 * 3600);
        c.read.chunk_bytes = CHUNK_BYTES;
        c.read.page_rows = PAGE_ROWS;
    })
    .await
}

/// [`start`], with device "d1" registered, and its upload client.
async fn start_with_d1(backend: Backend) -> Option<(TestServer, Ingest)> {
    let server = start(backend).await?;
    let token = server.register("d1").await;
    let ingest = server.ingest(&token).await;
    Some((server, ingest))
}

/// [`start_with_d1`], with `n` temperature readings a second apart (and
/// ties) from the hour 3 hours ago, which it returns with them.
async fn start_with_temperature(
    backend: Backend,
    n: u64,
) -> Option<(TestServer, u64, Vec<(u64, f64)>)> {
    let (server, mut ingest) = start_with_d1(backend).await?;
    let t0 = hour_start(3);
    let temp = points(t0, n, SEC);
    load(&mut ingest, 1, "temperature", &temp).await;
    Some((server, t0, temp))
}

fn ids(devices: &[&str]) -> Option<pb::DeviceSelector> {
    Some(pb::DeviceSelector {
        selector: Some(pb::device_selector::Selector::Ids(pb::DeviceIdList {
            device_ids: devices.iter().map(|d| (*d).to_owned()).collect(),
        })),
    })
}

fn raw(devices: &[&str], start: u64, end: u64) -> pb::QueryReadingsRequest {
    pb::QueryReadingsRequest {
        devices: ids(devices),
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        ..Default::default()
    }
}

fn every(width_millis: u64, aggs: &[pb::Aggregate]) -> Option<pb::Downsample> {
    Some(pb::Downsample {
        bucket: Some(pb::downsample::Bucket::WidthMillis(width_millis)),
        time_zone: String::new(),
        aggregates: aggs.iter().map(|a| *a as i32).collect(),
    })
}

fn calendar(unit: pb::CalendarUnit, zone: &str, aggs: &[pb::Aggregate]) -> Option<pb::Downsample> {
    Some(pb::Downsample {
        bucket: Some(pb::downsample::Bucket::Calendar(unit as i32)),
        time_zone: zone.into(),
        aggregates: aggs.iter().map(|a| *a as i32).collect(),
    })
}

const ALL_AGGS: [pb::Aggregate; 7] = [
    pb::Aggregate::Count,
    pb::Aggregate::Min,
    pb::Aggregate::Max,
    pb::Aggregate::Sum,
    pb::Aggregate::Avg,
    pb::Aggregate::First,
    pb::Aggregate::Last,
];

/// Every chunk of a query, or its status.
async fn query(
    ops: &mut Ops,
    req: pb::QueryReadingsRequest,
) -> Result<Vec<pb::ReadingsChunk>, tonic::Status> {
    let mut stream = ops.query_readings(req).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await? {
        chunks.push(chunk);
    }
    Ok(chunks)
}

/// Raw rows: (device, sensor, unit, time, value).
type RawRow = (String, String, String, u64, f64);

fn raw_rows(chunks: &[pb::ReadingsChunk]) -> Vec<RawRow> {
    let mut rows = Vec::new();
    for c in chunks {
        let Some(pb::readings_chunk::Data::Series(s)) = &c.data else {
            panic!("a raw chunk: {c:?}");
        };
        for (t, v) in s.time_unix_nano.iter().zip(&s.value) {
            rows.push((
                c.device_id.clone(),
                s.sensor.clone(),
                s.unit.clone(),
                *t,
                *v,
            ));
        }
    }
    rows
}

/// A chunk without its token: what two answers are compared by.
fn data(chunk: &pb::ReadingsChunk) -> pb::ReadingsChunk {
    pb::ReadingsChunk {
        resume_token: String::new(),
        ..chunk.clone()
    }
}

/// Bucket rows: (device, sensor, start, [count, min, max, sum, avg, first, last]
/// as far as asked).
type BucketRow = (String, String, u64, Vec<f64>);

fn bucket_rows(chunks: &[pb::ReadingsChunk]) -> Vec<BucketRow> {
    let mut rows = Vec::new();
    for c in chunks {
        let Some(pb::readings_chunk::Data::Buckets(b)) = &c.data else {
            panic!("a bucket chunk: {c:?}");
        };
        for i in 0..b.bucket_start_unix_nano.len() {
            let mut values = Vec::new();
            if !b.count.is_empty() {
                values.push(b.count[i] as f64);
            }
            for col in [&b.min, &b.max, &b.sum, &b.avg, &b.first, &b.last] {
                if !col.is_empty() {
                    values.push(col[i]);
                }
            }
            rows.push((
                c.device_id.clone(),
                b.sensor.clone(),
                b.bucket_start_unix_nano[i],
                values,
            ));
        }
    }
    rows
}

/// Equal, but sums and averages (columns 3 and 4 of all seven) within a
/// relative 1e-12.
fn assert_buckets_agree(a: &[BucketRow], b: &[BucketRow], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: bucket counts");
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.0, &x.1, x.2), (&y.0, &y.1, y.2), "{what}");
        for (i, (p, q)) in x.3.iter().zip(&y.3).enumerate() {
            let close = p == q || ((p - q).abs() <= 1e-12 * p.abs().max(q.abs()));
            assert!(close, "{what}: bucket {} column {i}: {p} against {q}", x.2);
        }
    }
}

/// Uploads `points` of `sensor` for a device, in batches of 500.
async fn load(ingest: &mut Ingest, first_seq: u64, sensor: &str, points: &[(u64, f64)]) -> u64 {
    let mut seq = first_seq;
    let mut batches = Vec::new();
    for part in points.chunks(500) {
        batches.push(batch(seq, vec![series(sensor, "Cel", part)]));
        seq += 1;
    }
    upload(ingest, batches).await.unwrap();
    seq
}

/// Readings every `step` from `from`, with ties: every tenth time twice
/// with another value, every 25th twice with the same value.
fn points(from: u64, n: u64, step: u64) -> Vec<(u64, f64)> {
    let mut out = Vec::new();
    for i in 0..n {
        let t = from + i * step;
        let v = ((i * 7919) % 1000) as f64 / 8.0 - 40.0;
        out.push((t, v));
        if i % 10 == 0 {
            out.push((t, v - 1.5));
        }
        if i % 25 == 0 {
            out.push((t, v));
        }
    }
    out
}

fn sorted(mut p: Vec<(u64, f64)>) -> Vec<(u64, f64)> {
    p.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    p
}

async fn raw_readings_come_back_in_order_in_bounded_chunks(backend: Backend) {
    let Some((server, mut ingest)) = start_with_d1(backend).await else {
        return;
    };
    let t0 = hour_start(5);
    let temp = points(t0, 300, SEC);
    let hum = points(t0 + 500, 200, 2 * SEC);
    let seq = load(&mut ingest, 1, "temperature", &temp).await;
    load(&mut ingest, seq, "humidity", &hum).await;

    let mut ops = server.ops().await;
    let chunks = query(&mut ops, raw(&["d1"], t0, t0 + HOUR)).await.unwrap();
    assert!(chunks.len() > 10, "{} chunks", chunks.len());
    for c in &chunks {
        assert!(c.encoded_len() <= CHUNK_BYTES, "{}", c.encoded_len());
        assert!(!c.resume_token.is_empty());
    }
    // Each series is whole and contiguous, by (time, value).
    let rows = raw_rows(&chunks);
    let mut by_series: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    let mut order = Vec::new();
    for (device, sensor, unit, t, v) in &rows {
        assert_eq!((device.as_str(), unit.as_str()), ("d1", "Cel"));
        if order.last() != Some(sensor) {
            assert!(!order.contains(sensor), "{sensor} comes back in one run");
            order.push(sensor.clone());
        }
        by_series.entry(sensor.clone()).or_default().push((*t, *v));
    }
    assert_eq!(by_series["temperature"], sorted(temp.clone()));
    assert_eq!(by_series["humidity"], sorted(hum));

    // Only the sensors asked for, only the range asked for.
    let mut req = raw(&["d1"], t0 + 10 * SEC, t0 + 20 * SEC);
    req.sensors = vec!["temperature".into()];
    let rows = raw_rows(&query(&mut ops, req).await.unwrap());
    let expected: Vec<_> = sorted(temp)
        .into_iter()
        .filter(|p| p.0 >= t0 + 10 * SEC && p.0 < t0 + 20 * SEC)
        .collect();
    assert_eq!(
        rows.iter().map(|r| (r.3, r.4)).collect::<Vec<_>>(),
        expected
    );
}

async fn resuming_at_every_chunk_gives_exactly_the_rest(backend: Backend) {
    let Some((server, mut ingest)) = start_with_d1(backend).await else {
        return;
    };
    let t0 = hour_start(5);
    // Runs of equal readings longer than a chunk, so tokens fall inside them.
    let mut temp = points(t0, 150, SEC);
    temp.extend(std::iter::repeat_n((t0 + 7 * SEC, 3.25), 120));
    let seq = load(&mut ingest, 1, "temperature", &temp).await;
    load(&mut ingest, seq, "humidity", &points(t0, 100, 3 * SEC)).await;
    let mut ops = server.ops().await;
    let requests = [
        raw(&["d1"], t0, t0 + HOUR),
        pb::QueryReadingsRequest {
            downsample: every(1000, &ALL_AGGS),
            ..raw(&["d1"], t0, t0 + HOUR)
        },
        pb::QueryReadingsRequest {
            downsample: every(7000, &[pb::Aggregate::Count, pb::Aggregate::Last]),
            ..raw(&["d1"], t0 + 3 * SEC, t0 + 290 * SEC)
        },
    ];
    for req in requests {
        let full = query(&mut ops, req.clone()).await.unwrap();
        assert!(full.len() >= 3, "{} chunks", full.len());
        assert!(full.iter().all(|c| c.encoded_len() <= CHUNK_BYTES));
        for (i, chunk) in full.iter().enumerate() {
            let rest = query(
                &mut ops,
                pb::QueryReadingsRequest {
                    resume_token: chunk.resume_token.clone(),
                    ..req.clone()
                },
            )
            .await
            .unwrap();
            let want: Vec<_> = full[i + 1..].iter().map(data).collect();
            let got: Vec<_> = rest.iter().map(data).collect();
            assert_eq!(got, want, "resumed after chunk {i} of {}", full.len());
        }
    }
}

async fn buckets_from_the_rollup_equal_buckets_from_raw_readings(backend: Backend) {
    let Some((server, mut ingest)) = start_with_d1(backend).await else {
        return;
    };
    let t0 = hour_start(30);
    // Readings over 30 hours, every 97 s, with ties; uploaded in two
    // passes so hours get their rollup rows merged.
    let all = points(t0 + 13, 30 * 3600 / 97, 97 * SEC);
    let (a, b): (Vec<_>, Vec<_>) = all.iter().enumerate().partition(|(i, _)| i % 3 == 0);
    let a: Vec<_> = a.into_iter().map(|(_, p)| *p).collect();
    let b: Vec<_> = b.into_iter().map(|(_, p)| *p).collect();
    let seq = load(&mut ingest, 1, "temperature", &b).await;
    load(&mut ingest, seq, "temperature", &a).await;
    let mut ops = server.ops().await;
    let end = t0 + 30 * HOUR;
    for downsample in [
        every(3_600_000, &ALL_AGGS),
        every(6 * 3_600_000, &ALL_AGGS),
        calendar(pb::CalendarUnit::Day, "Europe/Berlin", &ALL_AGGS),
        calendar(pb::CalendarUnit::Day, "", &ALL_AGGS),
    ] {
        // Whole hours: from the rollup. One nanosecond more: from raw
        // readings (no reading lies in that nanosecond).
        let rollup = bucket_rows(
            &query(
                &mut ops,
                pb::QueryReadingsRequest {
                    downsample: downsample.clone(),
                    ..raw(&["d1"], t0, end)
                },
            )
            .await
            .unwrap(),
        );
        let from_raw = bucket_rows(
            &query(
                &mut ops,
                pb::QueryReadingsRequest {
                    downsample: downsample.clone(),
                    ..raw(&["d1"], t0, end + 1)
                },
            )
            .await
            .unwrap(),
        );
        assert!(!rollup.is_empty());
        assert_buckets_agree(&rollup, &from_raw, &format!("{downsample:?}"));
        // And both against a naive pass over what was uploaded.
        let d = downsample.clone().unwrap();
        if let Some(pb::downsample::Bucket::WidthMillis(ms)) = d.bucket {
            let naive = naive_buckets(&all, t0, end, ms * 1_000_000);
            assert_buckets_agree(&from_raw, &naive, "naive");
        }
    }
    // The rollup path really reads the rollup: with raw readings gone, it
    // still answers, and raw reading does not.
    server.storage.execute("DELETE FROM readings").await;
    let req = pb::QueryReadingsRequest {
        downsample: every(3_600_000, &ALL_AGGS),
        ..raw(&["d1"], t0, end)
    };
    assert!(!query(&mut ops, req.clone()).await.unwrap().is_empty());
    let req = pb::QueryReadingsRequest {
        end_time_unix_nano: end + 1,
        ..req
    };
    assert!(query(&mut ops, req).await.unwrap().is_empty());
}

/// All seven aggregates of fixed-width buckets of `points` of one sensor
/// "d1"/"temperature", computed the plain way.
fn naive_buckets(points: &[(u64, f64)], start: u64, end: u64, width: u64) -> Vec<BucketRow> {
    let mut buckets: BTreeMap<u64, Vec<(u64, f64)>> = BTreeMap::new();
    for &(t, v) in points {
        if t >= start && t < end {
            buckets.entry(t - t % width).or_default().push((t, v));
        }
    }
    buckets
        .into_iter()
        .map(|(b, ps)| {
            let ps = sorted(ps);
            let n = ps.len() as f64;
            let sum: f64 = ps.iter().map(|p| p.1).sum();
            let min = ps.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
            let max = ps.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
            let values = vec![n, min, max, sum, sum / n, ps[0].1, ps[ps.len() - 1].1];
            ("d1".to_owned(), "temperature".to_owned(), b, values)
        })
        .collect()
}

async fn bad_input_gets_a_precise_status(backend: Backend) {
    let Some(server) = start(backend).await else {
        return;
    };
    let token = server.register("d1").await;
    server.register("quiet").await;
    let mut ingest = server.ingest(&token).await;
    let t0 = hour_start(2);
    load(&mut ingest, 1, "temperature", &points(t0, 200, SEC)).await;
    let mut ops = server.ops().await;
    let ok = raw(&["d1"], t0, t0 + HOUR);
    let refused = {
        let ops = ops.clone();
        move |req: pb::QueryReadingsRequest| {
            let mut ops = ops.clone();
            async move { query(&mut ops, req).await.unwrap_err() }
        }
    };
    let cases: Vec<(pb::QueryReadingsRequest, Code, &str)> = vec![
        (raw(&["d1"], t0 + 5, t0), Code::InvalidArgument, "inverted"),
        (raw(&["d1"], t0, t0), Code::InvalidArgument, "empty"),
        (
            pb::QueryReadingsRequest {
                downsample: every(999, &ALL_AGGS),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "width_millis",
        ),
        (
            pb::QueryReadingsRequest {
                downsample: calendar(pb::CalendarUnit::Day, "Mars/Olympus", &ALL_AGGS),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "time_zone",
        ),
        (
            pb::QueryReadingsRequest {
                downsample: Some(pb::Downsample {
                    bucket: Some(pb::downsample::Bucket::WidthMillis(1000)),
                    time_zone: String::new(),
                    aggregates: vec![99],
                }),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "aggregates",
        ),
        (
            pb::QueryReadingsRequest {
                devices: ids(&(0..1001)
                    .map(|i| format!("d{i}"))
                    .collect::<Vec<_>>()
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "at most 1000",
        ),
        (
            pb::QueryReadingsRequest {
                devices: None,
                ..ok.clone()
            },
            Code::InvalidArgument,
            "devices",
        ),
        (
            raw(&["d1", "ghost"], t0, t0 + HOUR),
            Code::NotFound,
            "ghost",
        ),
        (
            pb::QueryReadingsRequest {
                resume_token: "00ff".into(),
                ..ok.clone()
            },
            Code::InvalidArgument,
            "resume_token",
        ),
    ];
    for (req, code, says) in cases {
        let status = refused(req.clone()).await;
        assert_eq!(status.code(), code, "{req:?}: {status:?}");
        assert!(status.message().contains(says), "{says}: {status:?}");
    }

    // A token of other arguments, or altered, cannot be used.
    let chunks = query(&mut ops, ok.clone()).await.unwrap();
    let token = chunks[0].resume_token.clone();
    let status = refused(pb::QueryReadingsRequest {
        resume_token: token.clone(),
        ..raw(&["d1", "quiet"], t0, t0 + HOUR)
    })
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("other arguments"), "{status:?}");
    let mut altered = token.into_bytes();
    let i = altered.len() / 2;
    altered[i] = if altered[i] == b'0' { b'1' } else { b'0' };
    let status = refused(pb::QueryReadingsRequest {
        resume_token: String::from_utf8(altered).unwrap(),
        ..ok.clone()
    })
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("altered"), "{status:?}");

    // A known device without readings in the range: an empty stream, OK.
    assert_eq!(
        query(&mut ops, raw(&["quiet"], t0, t0 + HOUR))
            .await
            .unwrap(),
        vec![]
    );
    assert_eq!(
        query(&mut ops, raw(&["d1"], t0 - HOUR, t0)).await.unwrap(),
        vec![]
    );
    // A device token is refused, as on every Ops call.
    let mut as_device = server
        .ops_with(Bearer::new(&server.register("d1b").await).unwrap())
        .await;
    let status = query(&mut as_device, ok).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

/// A server with small chunks, changed by `configure`, and 20000 readings
/// of "d1" from the hour it returns: more than a client reads at once.
async fn start_limited(
    backend: Backend,
    configure: impl Fn(&mut ingest::Config) + Send + Sync + 'static,
) -> Option<(TestServer, u64)> {
    let server = TestServer::start_configured(backend, move |c| {
        c.read.chunk_bytes = CHUNK_BYTES;
        configure(c);
    })
    .await?;
    let token = server.register("d1").await;
    let mut ingest = server.ingest(&token).await;
    let t0 = hour_start(2);
    // Far more than the client's HTTP/2 window and the server's queue
    // hold: a stream not read stays open.
    load(&mut ingest, 1, "temperature", &points(t0, 20_000, SEC / 8)).await;
    Some((server, t0))
}

/// A stream of that hour, of which one chunk is read: open, and unread.
async fn hold(ops: &mut Ops, t0: u64) -> tonic::Streaming<pb::ReadingsChunk> {
    let mut stream = ops
        .query_readings(raw(&["d1"], t0, t0 + HOUR))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    stream
}

async fn limits_refuse_with_retry_info(backend: Backend) {
    use tonic_types::StatusExt;
    let Some((server, t0)) = start_limited(backend, |c| c.read.max_streams_per_token = 1).await
    else {
        return;
    };
    let mut ops = server.ops().await;
    // One stream left unread holds its permit.
    let held = hold(&mut ops, t0).await;
    let status = query(&mut ops, raw(&["d1"], t0, t0 + HOUR))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-read-streams-per-token"),
        "{status:?}"
    );
    let delay = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo with a delay");
    assert!(delay > Duration::ZERO);
    // Dropping it (a cancel) stops its task and frees the permit.
    drop(held);
    eventually(
        "the cancelled stream's permit is freed",
        Duration::from_secs(5),
        async || query(&mut ops, raw(&["d1"], t0, t0 + SEC)).await.is_ok(),
    )
    .await;
    let metrics = admin::Metrics::scrape(server.admin_addr).await;
    assert_eq!(metrics.sum("read_streams_open", &[]), 0.0);
    assert!(metrics.sum("read_query_seconds_count", &[]) > 0.0);
    assert!(metrics.sum("read_rows_sent_total", &[]) > 0.0);
    assert!(metrics.sum("read_bytes_sent_total", &[]) > 0.0);
}

async fn a_deadline_stops_the_stream(backend: Backend) {
    let Some((server, mut ingest)) = start_with_d1(backend).await else {
        return;
    };
    let t0 = hour_start(2);
    load(&mut ingest, 1, "temperature", &points(t0, 3000, SEC / 2)).await;
    let mut ops = server.ops().await;
    let mut req = tonic::Request::new(raw(&["d1"], t0, t0 + HOUR));
    req.set_timeout(Duration::from_millis(300));
    let mut stream = ops.query_readings(req).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    // The client reads nothing more; the deadline ends the call, and the
    // server's task with it.
    eventually(
        "the stream's task ended",
        Duration::from_secs(5),
        async || {
            admin::Metrics::scrape(server.admin_addr)
                .await
                .sum("read_streams_open", &[])
                == 0.0
        },
    )
    .await;
    drop(stream);
}

async fn a_reading_acknowledged_is_in_the_next_answer(backend: Backend) {
    let Some((server, mut ingest)) = start_with_d1(backend).await else {
        return;
    };
    let mut ops = server.ops().await;
    let t0 = hour_start(1);
    for seq in 1..=5u64 {
        let t = t0 + seq * SEC;
        upload(
            &mut ingest,
            vec![batch(seq, vec![series("t", "", &[(t, seq as f64)])])],
        )
        .await
        .unwrap();
        let rows = raw_rows(&query(&mut ops, raw(&["d1"], t0, t0 + HOUR)).await.unwrap());
        assert_eq!(rows.len() as u64, seq);
        assert_eq!(rows.last().unwrap().3, t);
        let req = pb::QueryReadingsRequest {
            downsample: every(3_600_000, &[pb::Aggregate::Count, pb::Aggregate::Last]),
            ..raw(&["d1"], t0, t0 + HOUR)
        };
        let buckets = bucket_rows(&query(&mut ops, req).await.unwrap());
        assert_eq!(buckets[0].3, vec![seq as f64, seq as f64]);
    }
}

async fn the_cli_exports_csv_and_json_lines(backend: Backend) {
    let Some((server, t0, temp)) = start_with_temperature(backend, 300).await else {
        return;
    };
    let rfc = |t: u64| {
        chrono::DateTime::from_timestamp_nanos(t as i64)
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    };
    let (from, to) = (rfc(t0), rfc(t0 + HOUR));
    let run = server
        .operator_cli(&[
            "readings", "query", "--device", "d1", "--from", &from, "--to", &to, "--format", "csv",
        ])
        .await;
    assert!(run.success, "{}", run.stderr);
    // No progress line: stderr is not a terminal.
    assert_eq!(run.stderr, "");
    let mut lines = run.stdout.lines();
    assert_eq!(
        lines.next(),
        Some("device_id,sensor,unit,time_unix_nano,time_utc,value")
    );
    let rows: Vec<(u64, f64)> = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(&f[..3], ["d1", "temperature", "Cel"]);
            assert_eq!(f[4], rfc(f[3].parse().unwrap()).replace("+00:00", "Z"));
            (f[3].parse().unwrap(), f[5].parse().unwrap())
        })
        .collect();
    // Many chunks, every row once, in order.
    assert_eq!(rows, sorted(temp.clone()));

    // Buckets as JSON lines into a file, with a relative range.
    let file = server.storage.data_dir.path().join("buckets.jsonl");
    let run = server
        .operator_cli(&[
            "readings",
            "query",
            "--device",
            "d1",
            "--from",
            "-4h",
            "--to",
            "now",
            "--every",
            "1h",
            "--agg",
            "last,count",
            "--format",
            "jsonl",
            "--output",
            file.to_str().unwrap(),
        ])
        .await;
    assert!(run.success, "{}", run.stderr);
    let text = std::fs::read_to_string(&file).unwrap();
    let objects: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objects.len(), 1, "{text}");
    let o = &objects[0];
    assert_eq!(o["bucket_unix_nano"], serde_json::json!(t0));
    assert_eq!(o["count"], serde_json::json!(temp.len()));
    assert_eq!(o["last"], serde_json::json!(sorted(temp).last().unwrap().1));
    // Keys in the column order (serde_json's map would sort them).
    let at: Vec<usize> = [
        "device_id",
        "sensor",
        "unit",
        "bucket_unix_nano",
        "bucket_utc",
        "count",
        "last",
    ]
    .iter()
    .map(|k| text.find(&format!("\"{k}\":")).unwrap())
    .collect();
    assert!(at.is_sorted(), "{text}");

    // Refusals come back as the server's status.
    let run = server
        .operator_cli(&["readings", "query", "--device", "ghost", "--from", "-1h"])
        .await;
    assert!(!run.success);
    assert!(run.stderr.contains("NotFound"), "{}", run.stderr);
}

/// Rows of an answer, grouped by series (device, sensor) in a stable
/// order: series may come in another order on another backend (their
/// sensor keys), readings within one may not.
fn by_series<T: Clone>(rows: &[T], key: impl Fn(&T) -> (String, String)) -> Vec<T> {
    let mut rows = rows.to_vec();
    rows.sort_by_key(|r| key(r));
    rows
}

/// Both backends' answers to `req`, compared: raw rows exactly, buckets
/// exactly but sums and averages within 1e-12.
async fn assert_same_answer(sqlite: &mut Ops, postgres: &mut Ops, req: pb::QueryReadingsRequest) {
    let a = query(sqlite, req.clone()).await.unwrap();
    let b = query(postgres, req.clone()).await.unwrap();
    let what = format!(
        "{:?} [{}, {})",
        req.downsample, req.start_time_unix_nano, req.end_time_unix_nano
    );
    if req.downsample.is_none() {
        let key = |r: &RawRow| (r.0.clone(), r.1.clone());
        assert_eq!(
            by_series(&raw_rows(&a), key),
            by_series(&raw_rows(&b), key),
            "{what}"
        );
    } else {
        let key = |r: &BucketRow| (r.0.clone(), r.1.clone());
        assert_buckets_agree(
            &by_series(&bucket_rows(&a), key),
            &by_series(&bucket_rows(&b), key),
            &what,
        );
    }
}

fn utc(s: &str) -> u64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .timestamp_nanos_opt()
        .unwrap() as u64
}

/// The same readings loaded into SQLite and PostgreSQL give the same
/// answers: raw and every aggregate, over days crossing the end of DST in
/// Europe/Berlin (2026-10-25) and PostgreSQL's day partitions, buckets cut
/// by the range's edges, empty ranges, a device with 256 sensors; then
/// random ranges and widths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_postgres_give_the_same_answers() {
    let Some(sqlite) = start(Backend::Sqlite).await else {
        return;
    };
    let Some(postgres) = start(Backend::Postgres).await else {
        return;
    };
    let day0 = utc("2026-10-23T00:00:00Z");
    let end = utc("2026-10-27T00:00:00Z");
    // Every 7 minutes and 13 s over four days, with ties.
    let berlin = points(day0 + 11, (end - day0) / (433 * SEC), 433 * SEC);
    let t1 = hour_start(3);
    for server in [&sqlite, &postgres] {
        let token = server.register("berlin").await;
        let mut ingest = server.ingest(&token).await;
        load(&mut ingest, 1, "temperature", &berlin).await;
        let token = server.register("many").await;
        let mut ingest = server.ingest(&token).await;
        let batches: Vec<_> = (0..256u64)
            .map(|i| {
                let p = points(t1 + i, 12, 5 * MIN);
                batch(i + 1, vec![series(&format!("s{i:03}"), "V", &p)])
            })
            .collect();
        upload(&mut ingest, batches).await.unwrap();
    }
    let (mut a, mut b) = (sqlite.ops().await, postgres.ops().await);

    let mut requests = Vec::new();
    let ranges = [
        (day0, end),
        // Cut inside hours and days.
        (day0 + 5 * HOUR + 17 * MIN, end - 10 * HOUR - 57 * SEC),
        // Empty: no readings there.
        (day0 - 3 * HOUR, day0),
    ];
    let downsamples = [
        None,
        every(1000, &ALL_AGGS),
        every(600_000, &ALL_AGGS),
        every(3_600_000, &ALL_AGGS),
        every(7 * 3_600_000, &ALL_AGGS),
        calendar(pb::CalendarUnit::Day, "Europe/Berlin", &ALL_AGGS),
        calendar(pb::CalendarUnit::Day, "", &ALL_AGGS),
        calendar(pb::CalendarUnit::Week, "Europe/Berlin", &ALL_AGGS),
        calendar(pb::CalendarUnit::Month, "Europe/Berlin", &ALL_AGGS),
        calendar(pb::CalendarUnit::Day, "Asia/Kolkata", &ALL_AGGS),
    ];
    for (start, stop) in ranges {
        for d in &downsamples {
            requests.push(pb::QueryReadingsRequest {
                downsample: d.clone(),
                ..raw(&["berlin"], start, stop)
            });
        }
    }
    for d in [None, every(60_000, &ALL_AGGS), every(3_600_000, &ALL_AGGS)] {
        requests.push(pb::QueryReadingsRequest {
            downsample: d,
            ..raw(&["many"], t1, t1 + 2 * HOUR)
        });
    }
    for req in requests {
        assert_same_answer(&mut a, &mut b, req).await;
    }
    // The day of the change lasts 25 hours in Berlin, on both.
    let days = bucket_rows(
        &query(
            &mut a,
            pb::QueryReadingsRequest {
                downsample: calendar(
                    pb::CalendarUnit::Day,
                    "Europe/Berlin",
                    &[pb::Aggregate::Count],
                ),
                ..raw(&["berlin"], day0, end)
            },
        )
        .await
        .unwrap(),
    );
    let starts: Vec<u64> = days.iter().map(|d| d.2).collect();
    assert!(
        starts.windows(2).any(|w| w[1] - w[0] == 25 * HOUR),
        "{starts:?}"
    );

    // Random ranges and widths: both backends agree with each other and
    // with a naive pass over what was uploaded.
    use proptest::prelude::*;
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 24,
        ..Default::default()
    });
    let span = end - day0;
    let strategy = (0..span, 1..span, 1u64..20_000);
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        runner
            .run(&strategy, |(offset, len, width_s)| {
                let start = day0 + offset;
                let stop = (start + len).min(end + HOUR);
                let req = pb::QueryReadingsRequest {
                    downsample: every(width_s * 1000, &ALL_AGGS),
                    ..raw(&["berlin"], start, stop)
                };
                let (mut a, mut b) = (a.clone(), b.clone());
                let got = handle.block_on(async {
                    assert_same_answer(&mut a, &mut b, req.clone()).await;
                    bucket_rows(&query(&mut a, req).await.unwrap())
                });
                let mut want = naive_buckets(&berlin, start, stop, width_s * SEC);
                for w in &mut want {
                    w.0 = "berlin".into();
                }
                assert_buckets_agree(&got, &want, &format!("[{start}, {stop}) every {width_s} s"));
                prop_assert!(true);
                Ok(())
            })
            .unwrap();
    });
}

async fn devices_by_label_within_the_device_limit(backend: Backend) {
    let Some(server) = TestServer::start_configured(backend, |c| {
        c.read.max_devices = 2;
    })
    .await
    else {
        return;
    };
    let mut ops = server.ops().await;
    let t0 = hour_start(1);
    for (id, site) in [
        ("a1", "north"),
        ("a2", "north"),
        ("b1", "south"),
        ("b2", "south"),
        ("b3", "south"),
    ] {
        let token = ops
            .register_device(pb::RegisterDeviceRequest {
                device_id: id.into(),
                labels: [("site".to_owned(), site.to_owned())].into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let mut ingest = server.ingest(&token).await;
        upload(
            &mut ingest,
            vec![batch(1, vec![series("t", "", &[(t0 + SEC, 1.0)])])],
        )
        .await
        .unwrap();
    }
    let selector = |selector| pb::QueryReadingsRequest {
        devices: Some(pb::DeviceSelector {
            selector: Some(selector),
        }),
        ..raw(&[], t0, t0 + HOUR)
    };
    let north = pb::device_selector::Selector::Labels(pb::LabelMatch {
        labels: [("site".to_owned(), "north".to_owned())].into(),
    });
    let mut devices: Vec<_> = raw_rows(&query(&mut ops, selector(north)).await.unwrap())
        .into_iter()
        .map(|r| r.0)
        .collect();
    devices.sort();
    assert_eq!(devices, ["a1", "a2"]);
    for too_many in [
        pb::device_selector::Selector::Labels(pb::LabelMatch {
            labels: [("site".to_owned(), "south".to_owned())].into(),
        }),
        pb::device_selector::Selector::All(true),
    ] {
        let status = query(&mut ops, selector(too_many)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("more than 2"), "{status:?}");
    }
    let status = query(&mut ops, raw(&["a1", "a2", "b1"], t0, t0 + HOUR))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("at most 2"), "{status:?}");
}

/// Rollup rows without their first reading (written before migration
/// 0011, their raw readings partly gone) are not trusted for FIRST: those
/// buckets come from raw readings; the other aggregates still come from
/// the rollup.
async fn rollup_rows_without_first_fall_back_to_raw_readings(backend: Backend) {
    let Some((server, mut ingest)) = start_with_d1(backend).await else {
        return;
    };
    let t0 = hour_start(6);
    let all = points(t0 + 5, 5 * 3600 / 61, 61 * SEC);
    load(&mut ingest, 1, "temperature", &all).await;
    let mut ops = server.ops().await;
    let req = |aggs: &[pb::Aggregate]| pb::QueryReadingsRequest {
        downsample: every(3_600_000, aggs),
        ..raw(&["d1"], t0, t0 + 5 * HOUR)
    };
    let before = bucket_rows(&query(&mut ops, req(&ALL_AGGS)).await.unwrap());
    server
        .storage
        .execute(
            "UPDATE readings_hourly_rollup SET first_time_unix_nano = NULL, first_value = NULL",
        )
        .await;
    let after = bucket_rows(&query(&mut ops, req(&ALL_AGGS)).await.unwrap());
    assert_buckets_agree(&after, &before, "first from raw readings");
    // Without FIRST, the rollup answers: also with the raw readings gone.
    server.storage.execute("DELETE FROM readings").await;
    assert_eq!(
        bucket_rows(&query(&mut ops, req(&[pb::Aggregate::Count])).await.unwrap()).len(),
        before.len()
    );
    assert_eq!(query(&mut ops, req(&ALL_AGGS)).await.unwrap(), vec![]);
}

/// Server processes sharing a PostgreSQL database accept each other's
/// resume tokens: the key is in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_on_the_database_accepts_the_token() {
    let Some((first, mut ingest)) = start_with_d1(Backend::Postgres).await else {
        return;
    };
    let t0 = hour_start(2);
    load(&mut ingest, 1, "temperature", &points(t0, 400, SEC)).await;
    let second = TestServer::start_on(
        first.storage.beside(),
        ingest::Limits::default(),
        Some(std::sync::Arc::new(|c: &mut ingest::Config| {
            c.read.chunk_bytes = CHUNK_BYTES;
        })),
    )
    .await;
    let req = raw(&["d1"], t0, t0 + HOUR);
    let full = query(&mut first.ops().await, req.clone()).await.unwrap();
    let rest = query(
        &mut second.ops().await,
        pb::QueryReadingsRequest {
            resume_token: full[2].resume_token.clone(),
            ..req
        },
    )
    .await
    .unwrap();
    assert_eq!(
        rest.iter().map(data).collect::<Vec<_>>(),
        full[3..].iter().map(data).collect::<Vec<_>>()
    );
}

/// Migration 0011 on a database that has rollup rows: each row gets the
/// first reading of its hour from the raw readings, unless retention took
/// some of them (then it stays NULL, and reads fall back to raw readings).
async fn migration_0011_fills_in_the_first_reading(backend: Backend) {
    let Some((mut server, mut ingest)) = start_with_d1(backend).await else {
        return;
    };
    let t0 = hour_start(6);
    load(
        &mut ingest,
        1,
        "temperature",
        &points(t0 + 5, 5 * 3600 / 61, 61 * SEC),
    )
    .await;
    drop(ingest);
    server.stop().await;
    // The schema as it was before 0011, holding the rows written since.
    server
        .storage
        .execute(
            "ALTER TABLE readings_hourly_rollup DROP COLUMN first_time_unix_nano; \
             ALTER TABLE readings_hourly_rollup DROP COLUMN first_value; \
             DROP TABLE server_secrets; \
             DELETE FROM _sqlx_migrations WHERE version = 11",
        )
        .await;
    // Retention took the start of one hour.
    server
        .storage
        .execute(&format!(
            "DELETE FROM readings WHERE time_unix_nano >= {} AND time_unix_nano < {}",
            t0 + HOUR,
            t0 + HOUR + 10 * MIN
        ))
        .await;
    let server = server.restart().await;
    // Served once migrated: a first call waits for that.
    let req = pb::QueryReadingsRequest {
        downsample: every(3_600_000, &[pb::Aggregate::First]),
        ..raw(&["d1"], t0, t0 + 6 * HOUR)
    };
    let answer = query(&mut server.ops().await, req).await.unwrap();
    assert!(!answer.is_empty());
    let s = &server.storage;
    let rows = s
        .scalar("SELECT COUNT(*) FROM readings_hourly_rollup")
        .await;
    assert!(rows >= 5);
    assert_eq!(
        s.scalar("SELECT COUNT(*) FROM readings_hourly_rollup WHERE first_time_unix_nano IS NULL")
            .await,
        1
    );
    // Every other row: the smallest (time, value) of its hour.
    let right = s
        .scalar(
            "SELECT COUNT(*) FROM readings_hourly_rollup r WHERE first_time_unix_nano = \
             (SELECT MIN(time_unix_nano) FROM readings x WHERE x.sensor_pk = r.sensor_pk \
              AND x.time_unix_nano >= r.hour_unix_nano \
              AND x.time_unix_nano < r.hour_unix_nano + 3600000000000) \
             AND first_value = (SELECT MIN(value) FROM readings x \
              WHERE x.sensor_pk = r.sensor_pk AND x.time_unix_nano = r.first_time_unix_nano)",
        )
        .await;
    assert_eq!(right, rows - 1);
}

/// Migration 0012 on a database of readings in the old layout (on SQLite
/// a rowid table with a (sensor, time) index; on PostgreSQL without the
/// batch columns): every reading stays, equal ones too, and reads answer
/// as before. Readings from then on carry their batch's sequence and
/// their place in it.
async fn migration_0012_keeps_every_reading(backend: Backend) {
    let Some((mut server, mut ingest)) = start_with_d1(backend).await else {
        return;
    };
    let t0 = hour_start(4);
    let seq = load(&mut ingest, 1, "temperature", &points(t0, 300, SEC)).await;
    load(&mut ingest, seq, "humidity", &points(t0, 40, 7 * SEC)).await;
    let everything = raw(&["d1"], t0, t0 + HOUR);
    let before = raw_rows(
        &query(&mut server.ops().await, everything.clone())
            .await
            .unwrap(),
    );
    drop(ingest);
    server.stop().await;
    let old_layout = match backend {
        Backend::Sqlite => {
            "CREATE TABLE readings_old (sensor_pk INTEGER NOT NULL, \
             time_unix_nano INTEGER NOT NULL, value REAL NOT NULL); \
             INSERT INTO readings_old SELECT sensor_pk, time_unix_nano, value FROM readings \
             ORDER BY batch_sequence, batch_index; \
             DROP TABLE readings; \
             ALTER TABLE readings_old RENAME TO readings; \
             CREATE INDEX readings_sensor_time ON readings (sensor_pk, time_unix_nano); \
             DELETE FROM _sqlx_migrations WHERE version = 12"
        }
        Backend::Postgres => {
            "ALTER TABLE readings DROP COLUMN batch_sequence, DROP COLUMN batch_index; \
             DELETE FROM _sqlx_migrations WHERE version = 12"
        }
    };
    server.storage.execute(old_layout).await;
    let server = server.restart().await;
    let after = raw_rows(&query(&mut server.ops().await, everything).await.unwrap());
    assert_eq!(after, before);
    let s = &server.storage;
    assert_eq!(
        s.scalar("SELECT COUNT(*) FROM readings WHERE batch_sequence = 0")
            .await,
        before.len() as i64
    );

    // A new batch of two series: places count on across the series.
    let token = server.register("d2").await;
    let mut ingest = server.ingest(&token).await;
    let two = batch(
        9,
        vec![
            series("a", "", &[(t0, 1.0), (t0 + SEC, 2.0)]),
            series("b", "", &[(t0, 3.0), (t0, 3.0), (t0 + SEC, 4.0)]),
        ],
    );
    upload(&mut ingest, vec![two]).await.unwrap();
    let places = s
        .scalar(
            "SELECT COUNT(*) FROM readings r JOIN sensors s ON s.pk = r.sensor_pk \
             JOIN devices d ON d.pk = s.device_pk WHERE d.device_id = 'd2' AND r.batch_sequence = 9 \
             AND ((s.sensor = 'a' AND r.batch_index = CAST(r.value AS INTEGER) - 1) \
               OR (s.sensor = 'b' AND r.batch_index IN (2, 3, 4)))",
        )
        .await;
    assert_eq!(places, 5);
    assert_eq!(
        s.scalar("SELECT COUNT(DISTINCT batch_index) FROM readings WHERE batch_sequence = 9")
            .await,
        5
    );
}

/// `--max-read-streams` bounds the streams of all tokens together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_stream_limit_holds_for_every_token() {
    let Some((server, t0)) = start_limited(Backend::Sqlite, |c| c.read.max_streams = 2).await
    else {
        return;
    };
    let mut ops = server.ops().await;
    let mut held = vec![hold(&mut ops, t0).await, hold(&mut ops, t0).await];
    let status = query(&mut ops, raw(&["d1"], t0, t0 + HOUR))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-read-streams"),
        "{status:?}"
    );
    // Finishing one (reading it to its end) frees its place.
    let mut first = held.remove(0);
    while first.message().await.unwrap().is_some() {}
    eventually("a place is free", Duration::from_secs(5), async || {
        query(&mut ops, raw(&["d1"], t0, t0 + SEC)).await.is_ok()
    })
    .await;
}

/// A TCP proxy to `target` whose first connection breaks after passing
/// `cut_after` bytes from the server; later ones pass everything.
async fn breaking_proxy(target: std::net::SocketAddr, cut_after: usize) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(target).await.unwrap();
            if !std::mem::take(&mut first) {
                tokio::spawn(async move {
                    let (mut client, mut server) = (client, server);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                continue;
            }
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut passed = 0;
                let mut buf = vec![0u8; 4096];
                while passed < cut_after {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(cut_after - passed),
                    };
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    passed += n;
                }
                // Both directions end: the connection is gone mid-answer.
                up.abort();
            });
        }
    });
    addr
}

/// A connection that breaks in the middle of an export: the CLI resumes
/// from the last chunk's token, and every row comes out exactly once.
async fn the_cli_resumes_a_broken_export_without_repeating_a_row(backend: Backend) {
    let Some((server, _, temp)) = start_with_temperature(backend, 3000).await else {
        return;
    };
    let proxy = breaking_proxy(server.addr, 20_000).await;
    let run = ingest_cli(
        [
            "readings",
            "query",
            "--device",
            "d1",
            "--from",
            "-4h",
            "--format",
            "csv",
            "--server",
            &format!("http://{proxy}"),
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(run.success, "{}", run.stderr);
    assert!(run.stderr.contains("resuming after"), "{}", run.stderr);
    let rows: Vec<(u64, f64)> = run
        .stdout
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[3].parse().unwrap(), f[5].parse().unwrap())
        })
        .collect();
    assert_eq!(rows, sorted(temp));
}

/// A paused export does not pin SQLite's WAL: between pages no read
/// transaction is open, so while a client holds a stream without reading
/// it, the writer's commits go on and a TRUNCATE checkpoint (which waits
/// for no reader to need the WAL) completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_export_does_not_pin_the_sqlite_wal() {
    let Some((server, mut ingest)) = start_with_d1(Backend::Sqlite).await else {
        return;
    };
    let t0 = hour_start(3);
    let mut seq = load(&mut ingest, 1, "temperature", &points(t0, 20_000, SEC / 4)).await;
    let mut ops = server.ops().await;
    let mut paused = ops
        .query_readings(raw(&["d1"], t0, t0 + HOUR))
        .await
        .unwrap()
        .into_inner();
    paused.message().await.unwrap().unwrap();
    // Ingest goes on beside the paused reader.
    for i in 0..5 {
        seq = load(
            &mut ingest,
            seq,
            "humidity",
            &points(t0 + i * MIN, 2000, 10 * MIN / 2000),
        )
        .await;
    }
    let Database::Sqlite { path } = &server.storage.database else {
        unreachable!()
    };
    let url = format!("sqlite://{}", path.display());
    eventually(
        "a TRUNCATE checkpoint completes",
        Duration::from_secs(10),
        async || {
            let mut conn: sqlx::SqliteConnection = sqlx::Connection::connect(&url).await.unwrap();
            let (busy, log, done): (i64, i64, i64) =
                sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            busy == 0 && log == done
        },
    )
    .await;
    // The paused stream is still there, and goes on where it was.
    assert!(paused.message().await.unwrap().is_some());
}

/// Readings past `--retention` are not read, whichever backend removes
/// them how (SQLite row by row, PostgreSQL whole day partitions): a range
/// across the retention boundary answers alike on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retention_boundary_reads_alike_on_both_backends() {
    let Some((mut sqlite, mut a)) = start_with_d1(Backend::Sqlite).await else {
        return;
    };
    let Some((mut postgres, mut b)) = start_with_d1(Backend::Postgres).await else {
        return;
    };
    const DAY: u64 = 24 * HOUR;
    let from = hour_start(4 * 24);
    let old = points(from + 3, 3 * DAY / (7 * MIN), 7 * MIN);
    load(&mut a, 1, "temperature", &old).await;
    load(&mut b, 1, "temperature", &old).await;
    // The same data, served with a retention that ends inside a day.
    let mut again = Vec::new();
    for server in [&mut sqlite, &mut postgres] {
        server.stop().await;
        let retention = ingest::Limits {
            readings: ingest::domain::ReadingLimits {
                retention: Duration::from_secs(60 * 60 * 24 * 5 / 2),
                ..Default::default()
            },
            ..Default::default()
        };
        again.push(TestServer::start_on(server.storage.beside(), retention, None).await);
    }
    let (mut a, mut b) = (again[0].ops().await, again[1].ops().await);
    let cutoff = now_nanos() - 5 * DAY / 2;
    let all = raw(&["d1"], from, from + 3 * DAY);
    let rows = raw_rows(&query(&mut a, all.clone()).await.unwrap());
    assert!(!rows.is_empty());
    assert!(
        rows.iter().all(|r| r.3 >= cutoff - MIN),
        "nothing past retention"
    );
    for downsample in [None, every(3_600_000, &ALL_AGGS), every(600_000, &ALL_AGGS)] {
        let req = pb::QueryReadingsRequest {
            downsample,
            // Not whole hours: from raw readings.
            ..raw(&["d1"], from + 1, from + 3 * DAY)
        };
        assert_same_answer(&mut a, &mut b, req).await;
    }
}

backend_tests!(
    the_cli_resumes_a_broken_export_without_repeating_a_row,
    migration_0011_fills_in_the_first_reading,
    migration_0012_keeps_every_reading,
    devices_by_label_within_the_device_limit,
    rollup_rows_without_first_fall_back_to_raw_readings,
    the_cli_exports_csv_and_json_lines,
    raw_readings_come_back_in_order_in_bounded_chunks,
    resuming_at_every_chunk_gives_exactly_the_rest,
    buckets_from_the_rollup_equal_buckets_from_raw_readings,
    bad_input_gets_a_precise_status,
    limits_refuse_with_retry_info,
    a_deadline_stops_the_stream,
    a_reading_acknowledged_is_in_the_next_answer,
);
