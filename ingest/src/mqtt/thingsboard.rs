//! ThingsBoard's device telemetry, so firmware written for ThingsBoard
//! works by changing the host: `v1/devices/me/telemetry` ("me" is the
//! signed-in device) carrying `{"key": value, …}`, `{"ts": ms, "values":
//! {…}}`, or an array of either. Each key is a sensor (without a unit).
//! Values must be numbers; any other value is left out and counted, and the
//! rest of the publication is kept. Without `ts` a value is stamped with
//! the server's clock.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::domain::reading::RawSeries;

pub const TELEMETRY_TOPIC: &str = "v1/devices/me/telemetry";

/// A publication's series, and how many values were not numbers.
#[derive(Default)]
pub struct Telemetry {
    pub series: Vec<RawSeries>,
    pub not_numbers: u64,
}

/// Why a payload is not ThingsBoard telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the payload is not JSON: {0}")]
    Json(String),
    #[error(
        r#"expected {{"key": value, …}}, {{"ts": milliseconds, "values": {{…}}}} or an array of them; {0}"#
    )]
    Shape(&'static str),
}

/// Parses a telemetry payload; `now` (Unix nanoseconds) stamps values
/// without `ts`.
pub fn parse(payload: &[u8], now: u64) -> Result<Telemetry, TelemetryError> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| TelemetryError::Json(e.to_string()))?;
    let entries = match value {
        Value::Array(entries) => entries,
        one => vec![one],
    };
    // Series by key, in key order: one per sensor however many entries.
    let mut by_key: BTreeMap<String, RawSeries> = BTreeMap::new();
    let mut telemetry = Telemetry::default();
    for entry in entries {
        let Value::Object(mut map) = entry else {
            return Err(TelemetryError::Shape("an entry is not an object"));
        };
        let (time, values) = match (map.remove("ts"), map.remove("values")) {
            (Some(ts), Some(Value::Object(values))) => {
                let ms = ts.as_u64().ok_or(TelemetryError::Shape(
                    "ts is not a whole number of milliseconds",
                ))?;
                (ms.saturating_mul(1_000_000), values)
            }
            (Some(_), _) => return Err(TelemetryError::Shape("ts without a values object")),
            (None, Some(_)) => return Err(TelemetryError::Shape("values without ts")),
            (None, None) => (now, map),
        };
        for (key, value) in values {
            let Some(number) = value.as_f64() else {
                telemetry.not_numbers += 1;
                continue;
            };
            let series = by_key.entry(key.clone()).or_insert_with(|| RawSeries {
                sensor: key,
                unit: String::new(),
                times: Vec::new(),
                values: Vec::new(),
            });
            series.times.push(time);
            series.values.push(number);
        }
    }
    telemetry.series = by_key.into_values().collect();
    Ok(telemetry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_shapes_parse() {
        let t = parse(br#"{"temperature":21.5,"humidity":40}"#, 7).unwrap();
        assert_eq!(t.series.len(), 2);
        assert_eq!(t.series[1].sensor, "temperature");
        assert_eq!(t.series[1].times, vec![7]);

        let t = parse(br#"{"ts":1000,"values":{"temperature":1}}"#, 7).unwrap();
        assert_eq!(t.series[0].times, vec![1_000_000_000]);

        let t = parse(
            br#"[{"ts":1,"values":{"t":1}},{"ts":2,"values":{"t":2}},{"u":3}]"#,
            7,
        )
        .unwrap();
        assert_eq!(t.series[0].times, vec![1_000_000, 2_000_000]);
        assert_eq!(t.series[1].values, vec![3.0]);
    }

    #[test]
    fn values_that_are_not_numbers_are_counted_and_left_out() {
        let t = parse(br#"{"t":1,"status":"ok","on":true,"cfg":{}}"#, 7).unwrap();
        assert_eq!(t.not_numbers, 3);
        assert_eq!(t.series.len(), 1);
    }

    #[test]
    fn other_shapes_are_refused() {
        for bad in [
            &b"1"[..],
            b"[1]",
            br#"{"ts":"x","values":{}}"#,
            br#"{"values":{}}"#,
            b"nope",
        ] {
            assert!(parse(bad, 7).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
