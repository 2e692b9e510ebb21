//! WatchReadings' and the consumer calls' messages: requests into the
//! feed's values, its items and consumers into protobuf.

use std::collections::BTreeMap;

use telemetry_proto::v1 as pb;
use tonic::Status;

use crate::domain::consumer::ConsumerName;
use crate::domain::reading::SensorName;
use crate::domain::{DeviceId, Labels};
use crate::feed::{ConsumerStatus, Devices, FeedError, StartFrom, WatchItem, WatchRequest};

/// The request, checked field by field; `max_devices` bounds a list of ids.
pub fn watch_from_pb(
    req: pb::WatchReadingsRequest,
    max_devices: usize,
) -> Result<WatchRequest, Status> {
    use pb::device_selector::Selector;
    use pb::watch_readings_request::Start;
    let devices = match req.devices.and_then(|d| d.selector) {
        None | Some(Selector::All(_)) => Devices::All,
        Some(Selector::Ids(list)) => {
            if list.device_ids.is_empty() {
                return Err(Status::invalid_argument(
                    "devices: ids lists no device; leave devices out to follow every device",
                ));
            }
            if list.device_ids.len() > max_devices {
                return Err(FeedError::TooManyDevices { max: max_devices }.into());
            }
            for id in &list.device_ids {
                DeviceId::parse(id)
                    .map_err(|e| Status::invalid_argument(format!("devices: {e}")))?;
            }
            Devices::Ids(list.device_ids)
        }
        Some(Selector::Labels(m)) => {
            // Checked as labels are when set, so a typo is told, not matched
            // against nothing.
            Labels::parse(m.labels.clone())
                .map_err(|e| Status::invalid_argument(format!("devices: {e}")))?;
            Devices::Labels(m.labels.into_iter().collect::<BTreeMap<_, _>>())
        }
    };
    for name in &req.sensors {
        SensorName::parse(name, SensorName::HARD_MAX_LEN).map_err(|r| {
            Status::invalid_argument(format!("sensors: {name:?} is not a sensor name ({r:?})"))
        })?;
    }
    let start = match req.start {
        None | Some(Start::FromNow(_)) => StartFrom::Now,
        Some(Start::FromEarliest(_)) => StartFrom::Earliest,
        Some(Start::FromCursor(c)) => StartFrom::Cursor(c),
        Some(Start::FromConsumer(name)) => StartFrom::Consumer(ConsumerName::parse(&name)?),
    };
    Ok(WatchRequest {
        devices,
        sensors: req.sensors,
        start,
    })
}

/// An item as sent, and the readings it holds; an end is the stream's
/// last status.
pub fn item_to_pb(item: WatchItem) -> Result<(pb::ReadingsChunk, usize), Status> {
    match item {
        WatchItem::Chunk(c) => {
            let rows = c.times.len();
            let series = pb::SensorSeries {
                sensor: c.sensor,
                unit: c.unit,
                time_unix_nano: c.times.into_iter().map(|t| t as u64).collect(),
                value: c.values,
            };
            let message = pb::ReadingsChunk {
                device_id: c.device_id,
                data: Some(pb::readings_chunk::Data::Series(series)),
                cursor: c.cursor,
                position: c.position,
                batch_sequence: c.batch_sequence,
                first_index: c.first_index,
                committed_time_unix_nano: c.committed_unix_nano as u64,
                ..Default::default()
            };
            Ok((message, rows))
        }
        WatchItem::Heartbeat {
            cursor,
            position,
            time,
        } => {
            let message = pb::ReadingsChunk {
                data: Some(pb::readings_chunk::Data::Heartbeat(pb::FeedHeartbeat {
                    time_unix_nano: time as u64,
                })),
                cursor,
                position,
                ..Default::default()
            };
            Ok((message, 0))
        }
        WatchItem::End(e) => Err(e.into()),
    }
}

pub fn consumer_to_pb(c: ConsumerStatus) -> pb::ReadingsConsumer {
    pb::ReadingsConsumer {
        name: c.name,
        cursor: c.cursor,
        position: c.position,
        updated_time_unix_nano: c.updated_unix_nano as u64,
        last_position: c.last_position,
        lag_positions: c.lag_positions,
        lag_seconds: c.lag_seconds,
    }
}
