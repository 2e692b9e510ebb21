//! What a device may publish, and how its payload becomes a batch.
//!
//! Topics are the device's own: `devices/{id}/readings` carries our JSON
//! (or protobuf when a v5 Content-Type says `application/x-protobuf`),
//! `devices/{id}/readings/pb` a protobuf `ReadingBatch`. The batch
//! sequence, the key that makes a resend a counted duplicate, comes from
//! the payload's `seq` or the v5 user property `seq`; never from the MQTT
//! packet id, which the client reuses once acknowledged.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use crate::domain::DeviceId;
use crate::domain::RejectReason;
use crate::domain::reading::{BatchReport, RawSeries};
use crate::grpc::batch_codec::decode_batch;
use crate::grpc::convert::raw_batch;
use crate::pipeline::BatchOutcome;

pub const PROTOBUF_CONTENT_TYPE: &str = "application/x-protobuf";

/// How a publication's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Protobuf,
}

/// What a device's publication is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Readings(Encoding),
    /// ThingsBoard's telemetry (see `thingsboard`).
    ThingsBoard,
    /// The result of one of its commands (see `commands`).
    CommandResult(u64),
}

/// Why a PUBLISH's topic is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error(
        "a device publishes only under its own topics, devices/{own}/…; {topic:?} is not one of them"
    )]
    NotOwn { own: String, topic: String },
    #[error(
        "{topic:?} is not a topic this server takes: publish readings to devices/{own}/readings (JSON) or devices/{own}/readings/pb (protobuf), a command's result to devices/{own}/commands/{{command_id}}/result"
    )]
    Unknown { own: String, topic: String },
}

/// What a device's publication to `topic` is, or why it may not publish
/// there.
pub fn publish_topic(
    topic: &str,
    device: &DeviceId,
    content_type: Option<&str>,
) -> Result<Topic, TopicError> {
    let own = device.as_str();
    if topic == super::thingsboard::TELEMETRY_TOPIC {
        return Ok(Topic::ThingsBoard);
    }
    let Some(rest) = topic
        .strip_prefix("devices/")
        .and_then(|t| t.strip_prefix(own))
        .and_then(|t| t.strip_prefix('/'))
    else {
        return Err(TopicError::NotOwn {
            own: own.to_owned(),
            topic: topic.to_owned(),
        });
    };
    match rest {
        "readings" if content_type == Some(PROTOBUF_CONTENT_TYPE) => {
            Ok(Topic::Readings(Encoding::Protobuf))
        }
        "readings" => Ok(Topic::Readings(Encoding::Json)),
        "readings/pb" => Ok(Topic::Readings(Encoding::Protobuf)),
        _ => super::commands::result_topic(rest)
            .map(Topic::CommandResult)
            .ok_or_else(|| TopicError::Unknown {
                own: own.to_owned(),
                topic: topic.to_owned(),
            }),
    }
}

/// The topic of a device's batch summaries.
pub fn summary_topic(device: &DeviceId) -> String {
    format!("devices/{device}/summary")
}

/// A batch's summary, as a device subscribed to its summary topic gets it:
/// what was stored, what was rejected and why, and its committed mark.
pub fn summary_json(report: &BatchReport, outcome: &BatchOutcome) -> Bytes {
    let rejected: serde_json::Map<String, serde_json::Value> = RejectReason::ALL
        .iter()
        .filter(|r| report.rejected_for(**r) > 0)
        .map(|r| (r.name().to_owned(), json!(report.rejected_for(*r))))
        .collect();
    let summary = match outcome {
        BatchOutcome::Committed {
            committed_sequence, ..
        } => json!({
            "seq": committed_sequence,
            "outcome": "committed",
            "accepted": report.accepted,
            "rejected": rejected,
            "committedSequence": committed_sequence,
        }),
        BatchOutcome::Duplicate { committed_sequence } => json!({
            "seq": report.sequence,
            "outcome": "duplicate",
            "accepted": 0,
            "rejected": {},
            "committedSequence": committed_sequence,
        }),
    };
    Bytes::from(summary.to_string())
}

/// Why a payload is not a batch.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("the payload is not our readings JSON: {0}")]
    Json(String),
    #[error("the payload is not a protobuf ReadingBatch: {0}")]
    Protobuf(String),
    #[error("the user property seq is {0:?}, not a whole number")]
    SeqProperty(String),
    #[error("the user property seq ({property}) and the payload's seq ({payload}) differ")]
    SeqDisagrees { property: u64, payload: u64 },
}

/// A publication's batch: its sequence, if it gave one, and its series.
pub struct Decoded {
    /// `None`: stored at least once (a resend is stored again).
    pub sequence: Option<u64>,
    pub series: Vec<RawSeries>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBatch {
    seq: Option<u64>,
    series: Vec<JsonSeries>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSeries {
    sensor: String,
    #[serde(default)]
    unit: String,
    t: Vec<u64>,
    v: Vec<f64>,
}

/// Decodes a publication into a batch. The sequence is the payload's `seq`
/// or the v5 user property `seq` (they must agree if both are given). `max_series` bounds a protobuf
/// payload's series while decoding; JSON's are checked by validation.
pub fn decode(
    payload: &Bytes,
    encoding: Encoding,
    seq_property: Option<&str>,
    max_series: usize,
) -> Result<Decoded, PayloadError> {
    let property = seq_property
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| PayloadError::SeqProperty(s.to_owned()))
        })
        .transpose()?;
    let (in_payload, series) = match encoding {
        Encoding::Json => {
            let batch: JsonBatch =
                serde_json::from_slice(payload).map_err(|e| PayloadError::Json(e.to_string()))?;
            let series = batch
                .series
                .into_iter()
                .map(|s| RawSeries {
                    sensor: s.sensor,
                    unit: s.unit,
                    times: s.t,
                    values: s.v,
                })
                .collect();
            (batch.seq, series)
        }
        Encoding::Protobuf => {
            let batch = decode_batch(payload.clone(), max_series)
                .map_err(|e| PayloadError::Protobuf(e.to_string()))?;
            let batch = raw_batch(batch);
            // proto3: 0 is "not set".
            (
                (batch.sequence != 0).then_some(batch.sequence),
                batch.series,
            )
        }
    };
    let sequence = match (property, in_payload) {
        (Some(p), Some(q)) if p != q => {
            return Err(PayloadError::SeqDisagrees {
                property: p,
                payload: q,
            });
        }
        (Some(s), _) | (None, Some(s)) => Some(s),
        (None, None) => None,
    };
    Ok(Decoded { sequence, series })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn device() -> DeviceId {
        DeviceId::parse("dev-1").unwrap()
    }

    #[test]
    fn a_device_publishes_only_its_own_readings_topics() {
        let d = device();
        assert_eq!(
            publish_topic("devices/dev-1/readings", &d, None),
            Ok(Topic::Readings(Encoding::Json))
        );
        assert_eq!(
            publish_topic("devices/dev-1/readings", &d, Some(PROTOBUF_CONTENT_TYPE)),
            Ok(Topic::Readings(Encoding::Protobuf))
        );
        assert_eq!(
            publish_topic("devices/dev-1/readings/pb", &d, None),
            Ok(Topic::Readings(Encoding::Protobuf))
        );
        for other in [
            "devices/dev-2/readings",
            "devices/dev-10/readings",
            "devices/dev-1",
            "v1/devices/me/attributes",
            "",
        ] {
            assert!(
                matches!(
                    publish_topic(other, &d, None),
                    Err(TopicError::NotOwn { .. })
                ),
                "{other}"
            );
        }
        assert!(matches!(
            publish_topic("devices/dev-1/status", &d, None),
            Err(TopicError::Unknown { .. })
        ));
        assert_eq!(
            publish_topic("devices/dev-1/commands/9/result", &d, None),
            Ok(Topic::CommandResult(9))
        );
        assert_eq!(
            publish_topic("v1/devices/me/telemetry", &d, None),
            Ok(Topic::ThingsBoard)
        );
    }

    #[test]
    fn json_becomes_a_batch() {
        let payload = Bytes::from_static(
            br#"{"seq":7,"series":[{"sensor":"temperature","unit":"Cel","t":[1,2],"v":[20.5,21]}]}"#,
        );
        let batch = decode(&payload, Encoding::Json, None, 10).unwrap();
        assert_eq!(batch.sequence, Some(7));
        assert_eq!(batch.series[0].times, vec![1, 2]);
        assert_eq!(batch.series[0].values, vec![20.5, 21.0]);
    }

    #[test]
    fn the_sequence_comes_from_the_payload_or_the_property_and_they_must_agree() {
        let no_seq = Bytes::from_static(br#"{"series":[]}"#);
        assert_eq!(
            decode(&no_seq, Encoding::Json, Some("9"), 10)
                .unwrap()
                .sequence,
            Some(9)
        );
        assert_eq!(
            decode(&no_seq, Encoding::Json, None, 10).unwrap().sequence,
            None
        );
        let seq_3 = Bytes::from_static(br#"{"seq":3,"series":[]}"#);
        assert!(matches!(
            decode(&seq_3, Encoding::Json, Some("4"), 10),
            Err(PayloadError::SeqDisagrees { .. })
        ));
        assert!(matches!(
            decode(&seq_3, Encoding::Json, Some("x"), 10),
            Err(PayloadError::SeqProperty(_))
        ));
    }

    #[test]
    fn unknown_json_fields_are_named() {
        let payload = Bytes::from_static(br#"{"seq":1,"serie":[]}"#);
        let Err(error) = decode(&payload, Encoding::Json, None, 10) else {
            panic!("an unknown field is refused");
        };
        let error = error.to_string();
        assert!(error.contains("serie"), "{error}");
    }

    proptest! {
        /// Whatever arrives, decoding answers (a batch or an error) and
        /// never panics.
        #[test]
        fn any_payload_is_answered(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let payload = Bytes::from(bytes);
            let _ = decode(&payload, Encoding::Json, None, 4);
            let _ = decode(&payload, Encoding::Protobuf, Some("1"), 4);
        }
    }
}
