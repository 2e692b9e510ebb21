//! QueryReadings' messages: the request into the read path's values, its
//! chunks into protobuf.

use std::collections::BTreeMap;
use std::time::Duration;

use telemetry_proto::v1 as pb;

use crate::read::query::DownsampleRequest;
use crate::read::{Aggregate, CalendarUnit, Chunk, ChunkData, InvalidQuery, QueryRequest};

/// The request's fields as the read path validates them.
pub fn query_from_pb(req: &pb::QueryReadingsRequest) -> Result<QueryRequest, InvalidQuery> {
    use pb::device_selector::Selector;
    let (device_ids, labels) = match req.devices.as_ref().and_then(|d| d.selector.as_ref()) {
        Some(Selector::Ids(list)) => (Some(list.device_ids.clone()), None),
        Some(Selector::Labels(m)) => {
            let labels: BTreeMap<_, _> = m.labels.clone().into_iter().collect();
            (None, Some(labels))
        }
        Some(Selector::All(true)) => (None, Some(BTreeMap::new())),
        Some(Selector::All(false)) | None => (None, None),
    };
    let downsample = req
        .downsample
        .as_ref()
        .map(downsample_from_pb)
        .transpose()?;
    Ok(QueryRequest {
        device_ids,
        labels,
        sensors: req.sensors.clone(),
        start: req.start_time_unix_nano,
        end: req.end_time_unix_nano,
        downsample,
    })
}

fn downsample_from_pb(d: &pb::Downsample) -> Result<DownsampleRequest, InvalidQuery> {
    use pb::downsample::Bucket;
    let (width, calendar) = match d.bucket {
        Some(Bucket::WidthMillis(ms)) => (Some(Duration::from_millis(ms)), None),
        Some(Bucket::Calendar(unit)) => {
            let unit = match pb::CalendarUnit::try_from(unit) {
                Ok(pb::CalendarUnit::Day) => CalendarUnit::Day,
                Ok(pb::CalendarUnit::Week) => CalendarUnit::Week,
                Ok(pb::CalendarUnit::Month) => CalendarUnit::Month,
                Ok(pb::CalendarUnit::Unspecified) | Err(_) => {
                    return Err(InvalidQuery::UnknownCalendarUnit(unit));
                }
            };
            (None, Some(unit))
        }
        None => (None, None),
    };
    let aggregates = d
        .aggregates
        .iter()
        .map(|&a| match pb::Aggregate::try_from(a) {
            Ok(pb::Aggregate::Count) => Ok(Aggregate::Count),
            Ok(pb::Aggregate::Min) => Ok(Aggregate::Min),
            Ok(pb::Aggregate::Max) => Ok(Aggregate::Max),
            Ok(pb::Aggregate::Sum) => Ok(Aggregate::Sum),
            Ok(pb::Aggregate::Avg) => Ok(Aggregate::Avg),
            Ok(pb::Aggregate::First) => Ok(Aggregate::First),
            Ok(pb::Aggregate::Last) => Ok(Aggregate::Last),
            Ok(pb::Aggregate::Unspecified) | Err(_) => Err(InvalidQuery::UnknownAggregate(a)),
        })
        .collect::<Result<_, _>>()?;
    Ok(DownsampleRequest {
        width,
        calendar,
        time_zone: d.time_zone.clone(),
        aggregates,
    })
}

/// A chunk as sent, and the rows it holds (readings or buckets).
pub fn chunk_to_pb(chunk: Chunk) -> (pb::ReadingsChunk, usize) {
    let (data, rows) = match chunk.data {
        ChunkData::Raw { time, value } => {
            let rows = time.len();
            let series = pb::SensorSeries {
                sensor: chunk.sensor,
                unit: chunk.unit,
                time_unix_nano: time.into_iter().map(|t| t as u64).collect(),
                value,
            };
            (pb::readings_chunk::Data::Series(series), rows)
        }
        ChunkData::Buckets(b) => {
            let rows = b.len();
            let buckets = pb::BucketSeries {
                sensor: chunk.sensor,
                unit: chunk.unit,
                bucket_start_unix_nano: b.start.into_iter().map(|t| t as u64).collect(),
                count: b.count,
                min: b.min,
                max: b.max,
                sum: b.sum,
                avg: b.avg,
                first: b.first,
                last: b.last,
            };
            (pb::readings_chunk::Data::Buckets(buckets), rows)
        }
    };
    let message = pb::ReadingsChunk {
        device_id: chunk.device_id,
        data: Some(data),
        resume_token: chunk.resume_token,
        ..Default::default()
    };
    (message, rows)
}
