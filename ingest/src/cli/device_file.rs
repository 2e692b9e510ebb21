//! The devices file of `ingest devices register --from-file`: CSV with a
//! header, or JSON lines.
//!
//! CSV: a `device_id` column, an optional `display_name` column, and every
//! other column a label named by its header (an empty cell is no label):
//!
//! ```text
//! device_id,display_name,site,floor
//! pump-1,Pump 1,plant-3,2
//! ```
//!
//! JSON lines: one object per line, `{"device_id": "pump-1",
//! "display_name": "Pump 1", "labels": {"site": "plant-3"}}`. The format is
//! told by the first character that is not white space: `{` for JSON lines.
//! The server checks every value; this file only tells which line a device
//! came from.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use telemetry_proto::v1 as pb;

/// A device asked for, and the line of the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct FileDevice {
    pub line: usize,
    pub request: pb::RegisterDeviceRequest,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDevice {
    device_id: String,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    labels: HashMap<String, String>,
}

pub fn read(path: &Path) -> anyhow::Result<Vec<FileDevice>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the devices file {}", path.display()))?;
    let devices = parse(&text).with_context(|| format!("in {}", path.display()))?;
    if devices.is_empty() {
        bail!("{} lists no devices", path.display());
    }
    Ok(devices)
}

pub fn parse(text: &str) -> anyhow::Result<Vec<FileDevice>> {
    if text.trim_start().starts_with('{') {
        json_lines(text)
    } else {
        csv(text)
    }
}

fn json_lines(text: &str) -> anyhow::Result<Vec<FileDevice>> {
    let mut devices = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let device: JsonDevice = serde_json::from_str(line)
            .with_context(|| format!("line {}: expected {{\"device_id\": ...}}", index + 1))?;
        devices.push(FileDevice {
            line: index + 1,
            request: pb::RegisterDeviceRequest {
                device_id: device.device_id,
                display_name: device.display_name,
                labels: device.labels,
                ..Default::default()
            },
        });
    }
    Ok(devices)
}

fn csv(text: &str) -> anyhow::Result<Vec<FileDevice>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader.headers().context("line 1: the header")?.clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let Some(id_column) = column("device_id") else {
        bail!(
            "line 1: the header has no device_id column (it has: {}); CSV wants a header such as \
             device_id,display_name,site",
            headers.iter().collect::<Vec<_>>().join(", ")
        );
    };
    let name_column = column("display_name");
    let mut devices = Vec::new();
    for record in reader.records() {
        let record = record.context("reading a CSV record")?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let cell = |i: usize| record.get(i).unwrap_or_default().to_owned();
        let labels = headers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != id_column && Some(*i) != name_column)
            .map(|(i, key)| (key.to_owned(), cell(i)))
            .filter(|(_, value)| !value.is_empty())
            .collect();
        devices.push(FileDevice {
            line,
            request: pb::RegisterDeviceRequest {
                device_id: cell(id_column),
                display_name: name_column.map(cell).unwrap_or_default(),
                labels,
                ..Default::default()
            },
        });
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_columns_other_than_id_and_name_are_labels() {
        let devices =
            parse("device_id,display_name,site,floor\npump-1,Pump 1,plant-3,2\npump-2,,lab,\n")
                .unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].line, 2);
        assert_eq!(devices[0].request.device_id, "pump-1");
        assert_eq!(devices[0].request.display_name, "Pump 1");
        assert_eq!(devices[0].request.labels["site"], "plant-3");
        assert_eq!(devices[0].request.labels["floor"], "2");
        assert_eq!(devices[1].line, 3);
        assert_eq!(devices[1].request.display_name, "");
        assert_eq!(
            devices[1].request.labels.len(),
            1,
            "an empty cell is no label"
        );
    }

    #[test]
    fn csv_needs_a_device_id_column() {
        let error = parse("id,site\npump-1,lab\n").unwrap_err().to_string();
        assert!(error.contains("no device_id column"), "{error}");
    }

    #[test]
    fn json_lines_are_told_by_their_brace() {
        let devices = parse(
            "{\"device_id\":\"a\",\"labels\":{\"site\":\"lab\"}}\n\n{\"device_id\":\"b\",\"display_name\":\"B\"}\n",
        )
        .unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[1].line, 3);
        assert_eq!(devices[1].request.display_name, "B");
        assert_eq!(devices[0].request.labels["site"], "lab");
    }

    #[test]
    fn a_bad_json_line_is_named() {
        let error = format!(
            "{:#}",
            parse("{\"device_id\":\"a\"}\n{\"device\":\"b\"}\n").unwrap_err()
        );
        assert!(error.contains("line 2"), "{error}");
    }
}
