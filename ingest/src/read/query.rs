//! A QueryReadings request as values that passed validation: every field
//! checked once here, each refusal naming its field.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono_tz::Tz;

use super::buckets::{Aggregate, Bucketing, CalendarUnit};
use crate::domain::{DeviceId, SensorName};
use crate::storage::rollup::HOUR_NANOS;

/// Which devices a query reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSelection {
    /// These ids, sorted and each once.
    Ids(Vec<String>),
    /// Devices carrying all of these labels; empty: every device.
    Labels(BTreeMap<String, String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Downsample {
    pub bucketing: Bucketing,
    /// Sorted, each once.
    pub aggregates: Vec<Aggregate>,
}

/// A validated query.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadQuery {
    pub devices: DeviceSelection,
    /// Sorted, each once; empty: every sensor.
    pub sensors: Vec<String>,
    /// `[start, end)`, unix nanos, start < end.
    pub start: i64,
    pub end: i64,
    /// `None`: raw readings.
    pub downsample: Option<Downsample>,
}

/// What a request asks, before validation (the handler fills it from the
/// protobuf message).
#[derive(Debug, Clone, Default)]
pub struct QueryRequest {
    pub device_ids: Option<Vec<String>>,
    /// `Some` for a label selector (empty map with `all`).
    pub labels: Option<BTreeMap<String, String>>,
    pub sensors: Vec<String>,
    pub start: u64,
    pub end: u64,
    pub downsample: Option<DownsampleRequest>,
}

#[derive(Debug, Clone, Default)]
pub struct DownsampleRequest {
    pub width: Option<Duration>,
    pub calendar: Option<CalendarUnit>,
    pub time_zone: String,
    pub aggregates: Vec<Aggregate>,
}

/// A request refused before reading anything: INVALID_ARGUMENT.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidQuery {
    #[error("devices: say which devices (device ids, labels or all)")]
    NoDevices,
    #[error("devices: {n} device ids listed, at most {max} per call")]
    TooManyIds { n: usize, max: usize },
    #[error("devices: {0}")]
    DeviceId(String),
    #[error("sensors: {name:?} is not a sensor name ({reason})")]
    Sensor { name: String, reason: String },
    #[error("start_time_unix_nano and end_time_unix_nano: {what}")]
    Range { what: String },
    #[error("downsample.width_millis: {0} ms is under the minimum of 1000 ms")]
    WidthTooSmall(u128),
    #[error("downsample: give either width_millis or calendar")]
    NoBucket,
    #[error("downsample.time_zone: {0:?} is not an IANA time zone (e.g. Europe/Berlin)")]
    UnknownZone(String),
    #[error(
        "downsample.time_zone applies to calendar buckets only; width buckets align to the unix epoch"
    )]
    ZoneWithWidth,
    #[error(
        "downsample.aggregates: ask for at least one of count, min, max, sum, avg, first, last"
    )]
    NoAggregates,
    #[error("downsample.aggregates: {0} is not an aggregate")]
    UnknownAggregate(i32),
    #[error("downsample.calendar: {0} is not a calendar unit")]
    UnknownCalendarUnit(i32),
}

impl QueryRequest {
    /// Validates; `max_ids` bounds the ids one call may list.
    pub fn validate(self, max_ids: usize) -> Result<ReadQuery, InvalidQuery> {
        let devices = match (self.device_ids, self.labels) {
            (Some(mut ids), None) => {
                if ids.is_empty() {
                    return Err(InvalidQuery::NoDevices);
                }
                if ids.len() > max_ids {
                    return Err(InvalidQuery::TooManyIds {
                        n: ids.len(),
                        max: max_ids,
                    });
                }
                for id in &ids {
                    DeviceId::parse(id).map_err(|e| InvalidQuery::DeviceId(e.to_string()))?;
                }
                ids.sort_unstable();
                ids.dedup();
                DeviceSelection::Ids(ids)
            }
            (None, Some(labels)) => DeviceSelection::Labels(labels),
            _ => return Err(InvalidQuery::NoDevices),
        };
        let mut sensors = self.sensors;
        for name in &sensors {
            SensorName::parse(name, SensorName::HARD_MAX_LEN).map_err(|r| {
                InvalidQuery::Sensor {
                    name: name.clone(),
                    reason: format!("{r:?}"),
                }
            })?;
        }
        sensors.sort_unstable();
        sensors.dedup();
        let range = |what: String| InvalidQuery::Range { what };
        if self.start >= self.end {
            return Err(range(format!(
                "the range [{}, {}) is {}; start must be before end",
                self.start,
                self.end,
                if self.start == self.end {
                    "empty"
                } else {
                    "inverted"
                }
            )));
        }
        if self.end > i64::MAX as u64 {
            return Err(range(format!(
                "end {} is past the largest time, {}",
                self.end,
                i64::MAX
            )));
        }
        let downsample = self
            .downsample
            .map(DownsampleRequest::validate)
            .transpose()?;
        Ok(ReadQuery {
            devices,
            sensors,
            start: self.start as i64,
            end: self.end as i64,
            downsample,
        })
    }
}

impl DownsampleRequest {
    fn validate(self) -> Result<Downsample, InvalidQuery> {
        let bucketing = match (self.width, self.calendar) {
            (Some(width), None) => {
                if width < Duration::from_secs(1) {
                    return Err(InvalidQuery::WidthTooSmall(width.as_millis()));
                }
                if !self.time_zone.is_empty() {
                    return Err(InvalidQuery::ZoneWithWidth);
                }
                Bucketing::Width(i64::try_from(width.as_nanos()).unwrap_or(i64::MAX))
            }
            (None, Some(unit)) => {
                let tz = if self.time_zone.is_empty() {
                    chrono_tz::UTC
                } else {
                    self.time_zone
                        .parse::<Tz>()
                        .map_err(|_| InvalidQuery::UnknownZone(self.time_zone.clone()))?
                };
                Bucketing::Calendar { unit, tz }
            }
            _ => return Err(InvalidQuery::NoBucket),
        };
        let mut aggregates = self.aggregates;
        if aggregates.is_empty() {
            return Err(InvalidQuery::NoAggregates);
        }
        aggregates.sort_unstable();
        aggregates.dedup();
        Ok(Downsample {
            bucketing,
            aggregates,
        })
    }
}

impl ReadQuery {
    /// The arguments as one canonical text, for the resume token's hash:
    /// equal queries give equal text whatever order their lists came in.
    pub fn canonical(&self) -> String {
        let devices = match &self.devices {
            DeviceSelection::Ids(ids) => format!("ids={}", ids.join(",")),
            DeviceSelection::Labels(labels) => format!("labels={labels:?}"),
        };
        let downsample = match &self.downsample {
            None => "raw".to_owned(),
            Some(d) => {
                let bucketing = match d.bucketing {
                    Bucketing::Width(w) => format!("width={w}"),
                    Bucketing::Calendar { unit, tz } => format!("calendar={unit:?}@{}", tz.name()),
                };
                let aggs: Vec<_> = d.aggregates.iter().map(|a| a.name()).collect();
                format!("{bucketing};aggs={}", aggs.join(","))
            }
        };
        format!(
            "v1;{devices};sensors={};range={}..{};{downsample}",
            self.sensors.join(","),
            self.start,
            self.end
        )
    }

    /// Whether buckets can come from the hourly rollup: every bucket is
    /// whole UTC hours, and so is the range.
    pub fn rollup_eligible(&self) -> bool {
        let Some(d) = &self.downsample else {
            return false;
        };
        self.start.rem_euclid(HOUR_NANOS) == 0
            && self.end.rem_euclid(HOUR_NANOS) == 0
            && d.bucketing.hour_aligned(self.start, self.end)
    }
}
