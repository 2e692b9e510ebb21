//! Row writers: `table` for terminals, `csv` for spreadsheets, `json` (JSON
//! Lines) for scripts. Each writes rows as they come; only the table holds
//! back its first rows, to size its columns.

use std::io::{self, Write};

use super::Value;

/// Where report rows go: the header once, then every row, then `finish`.
pub trait RowWriter {
    fn header(&mut self, columns: &[String]) -> io::Result<()>;
    fn row(&mut self, row: &[Value]) -> io::Result<()>;
    /// Writes what is held back and flushes.
    fn finish(&mut self) -> io::Result<()>;
}

/// An output format of `ingest report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns with a header, for people: times in UTC to the
    /// second, numbers to 3 decimals, NULL as `-`.
    #[default]
    Table,
    /// RFC 4180 CSV with a header row: full precision, NULL as an empty
    /// field (an empty text is `""`).
    Csv,
    /// JSON Lines: one object per row, keyed by column name, NULL as null.
    Json,
}

impl Format {
    pub fn writer<'a, W: Write + Send + 'a>(self, out: W) -> Box<dyn RowWriter + Send + 'a> {
        match self {
            Self::Table => Box::new(TableWriter::new(out)),
            Self::Csv => Box::new(CsvWriter::new(out)),
            Self::Json => Box::new(JsonWriter::new(out)),
        }
    }
}

// ---- json -----------------------------------------------------------------

/// One JSON object per line, keys in the view's column order. Integers and
/// floats are JSON numbers (a whole float keeps its `.0`), exactly as stored.
pub struct JsonWriter<W> {
    out: W,
    /// Each column's `"name":`, encoded once.
    keys: Vec<String>,
}

impl<W: Write> JsonWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            keys: Vec::new(),
        }
    }
}

impl<W: Write> RowWriter for JsonWriter<W> {
    fn header(&mut self, columns: &[String]) -> io::Result<()> {
        self.keys = columns
            .iter()
            .map(|c| serde_json::to_string(c).map(|key| key + ":"))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    fn row(&mut self, row: &[Value]) -> io::Result<()> {
        self.out.write_all(b"{")?;
        for (i, (key, value)) in self.keys.iter().zip(row).enumerate() {
            if i > 0 {
                self.out.write_all(b",")?;
            }
            self.out.write_all(key.as_bytes())?;
            match value {
                Value::Null => self.out.write_all(b"null")?,
                Value::Int(v) => write!(self.out, "{v}")?,
                Value::Float(v) if v.is_finite() => serde_json::to_writer(&mut self.out, v)?,
                Value::Float(_) => self.out.write_all(b"null")?,
                Value::Text(v) => serde_json::to_writer(&mut self.out, v)?,
            }
        }
        self.out.write_all(b"}\n")
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

// ---- csv ------------------------------------------------------------------

/// CSV with a header row. A field is quoted when it holds a comma, a quote
/// or a line break (quotes doubled, RFC 4180); records end with `\n`.
/// Floats have full precision, in Rust's shortest form that reads back to
/// the same double (a whole float prints as `2`). NULL is an empty field;
/// an empty text is `""`, so the two stay apart.
pub struct CsvWriter<W> {
    out: W,
}

impl<W: Write> CsvWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    fn text(&mut self, text: &str) -> io::Result<()> {
        if text.is_empty() || text.contains([',', '"', '\r', '\n']) {
            write!(self.out, "\"{}\"", text.replace('"', "\"\""))
        } else {
            self.out.write_all(text.as_bytes())
        }
    }
}

impl<W: Write> RowWriter for CsvWriter<W> {
    fn header(&mut self, columns: &[String]) -> io::Result<()> {
        for (i, column) in columns.iter().enumerate() {
            if i > 0 {
                self.out.write_all(b",")?;
            }
            self.text(column)?;
        }
        self.out.write_all(b"\n")
    }

    fn row(&mut self, row: &[Value]) -> io::Result<()> {
        for (i, value) in row.iter().enumerate() {
            if i > 0 {
                self.out.write_all(b",")?;
            }
            match value {
                Value::Null => {}
                Value::Int(v) => write!(self.out, "{v}")?,
                Value::Float(v) => write!(self.out, "{v}")?,
                Value::Text(v) => self.text(v)?,
            }
        }
        self.out.write_all(b"\n")
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

// ---- table ----------------------------------------------------------------

/// Rows held back to size the columns; later rows use those widths (a wider
/// value shifts the rest of its line rather than holding every row).
const TABLE_SAMPLE_ROWS: usize = 1000;

/// Aligned columns for a terminal. A `X_unix_nano` column is shown as the
/// time it is, in UTC to the second like the views' `*_utc` columns: as
/// `X_utc`, or left out when the view has an `X_utc` column already.
/// Numbers are right-aligned, floats to at most 3 decimals; NULL is `-`.
pub struct TableWriter<W> {
    out: W,
    columns: Vec<TableColumn>,
    /// The first rows, formatted, until the widths are known; `None` after.
    held: Option<Vec<Vec<String>>>,
}

struct TableColumn {
    /// Index of the column in the report's rows.
    source: usize,
    header: String,
    /// Unix nanoseconds shown as a UTC time.
    time: bool,
    width: usize,
    /// Right-aligned (numbers); decided by the first value that is not NULL.
    right: Option<bool>,
}

impl<W: Write> TableWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            columns: Vec::new(),
            held: Some(Vec::new()),
        }
    }

    /// Sizes the columns by the held rows and writes the header and them.
    fn release(&mut self) -> io::Result<()> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        for (i, column) in self.columns.iter_mut().enumerate() {
            let widest = held.iter().map(|cells| width(&cells[i])).max();
            column.width = column.width.max(widest.unwrap_or(0));
        }
        let header: Vec<String> = self.columns.iter().map(|c| c.header.clone()).collect();
        self.line(&header)?;
        for cells in &held {
            self.line(cells)?;
        }
        Ok(())
    }

    fn line(&mut self, cells: &[String]) -> io::Result<()> {
        let mut line = String::new();
        for (i, (column, cell)) in self.columns.iter().zip(cells).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = column.width.saturating_sub(width(cell));
            if column.right == Some(true) {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i + 1 < self.columns.len() {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        // An empty last cell would leave the separator dangling.
        let line = line.trim_end_matches(' ');
        self.out.write_all(line.as_bytes())?;
        self.out.write_all(b"\n")
    }
}

impl<W: Write> RowWriter for TableWriter<W> {
    fn header(&mut self, columns: &[String]) -> io::Result<()> {
        self.columns = Vec::with_capacity(columns.len());
        for (source, name) in columns.iter().enumerate() {
            let (header, time) = match name.strip_suffix("_unix_nano") {
                Some(stem) => {
                    let utc = format!("{stem}_utc");
                    if columns.contains(&utc) {
                        continue;
                    }
                    (utc, true)
                }
                None => (name.clone(), false),
            };
            self.columns.push(TableColumn {
                source,
                width: width(&header),
                header,
                time,
                right: None,
            });
        }
        Ok(())
    }

    fn row(&mut self, row: &[Value]) -> io::Result<()> {
        let mut cells = Vec::with_capacity(self.columns.len());
        for column in &mut self.columns {
            let value = row.get(column.source).unwrap_or(&Value::Null);
            if column.right.is_none() && *value != Value::Null {
                column.right =
                    Some(!column.time && matches!(value, Value::Int(_) | Value::Float(_)));
            }
            cells.push(table_cell(value, column.time));
        }
        match &mut self.held {
            Some(held) => {
                held.push(cells);
                if held.len() >= TABLE_SAMPLE_ROWS {
                    self.release()?;
                }
                Ok(())
            }
            None => self.line(&cells),
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.release()?;
        self.out.flush()
    }
}

fn width(cell: &str) -> usize {
    cell.chars().count()
}

fn table_cell(value: &Value, time: bool) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::Int(nanos) if time => utc(*nanos),
        Value::Int(v) => v.to_string(),
        Value::Float(v) => float3(*v),
        // A line break or tab inside a value would break the table.
        Value::Text(v) if v.contains(char::is_control) => v
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
        Value::Text(v) => v.clone(),
    }
}

/// As the views' `*_utc` columns: whole seconds, `2025-01-31T12:00:00Z`.
fn utc(nanos: i64) -> String {
    match chrono::DateTime::from_timestamp(nanos / 1_000_000_000, 0) {
        Some(time) => time.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => nanos.to_string(),
    }
}

/// At most 3 decimals, no trailing zeros: `2`, `2.5`, `0.333`.
fn float3(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(format: Format, columns: &[&str], rows: &[Vec<Value>]) -> String {
        let mut out = Vec::new();
        {
            let mut writer = format.writer(&mut out);
            let columns: Vec<String> = columns.iter().map(|c| (*c).to_owned()).collect();
            writer.header(&columns).unwrap();
            for row in rows {
                writer.row(row).unwrap();
            }
            writer.finish().unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    fn rows() -> Vec<Vec<Value>> {
        vec![
            vec![
                Value::Int(7),
                Value::Text("dev-a".into()),
                Value::Int(1_738_324_800_999_999_999),
                Value::Text("2025-01-31T12:00:00Z".into()),
                Value::Int(1_738_328_400_000_000_000),
                Value::Float(2.0),
                Value::Float(0.1 + 0.2),
                Value::Text("say \"hi\", then\nleave".into()),
            ],
            vec![
                Value::Int(12),
                Value::Text("dev-b".into()),
                Value::Int(1_738_324_800_000_000_000),
                Value::Text("2025-01-31T12:00:00Z".into()),
                Value::Null,
                Value::Float(-0.0001),
                Value::Null,
                Value::Text(String::new()),
            ],
        ]
    }

    const COLUMNS: &[&str] = &[
        "id",
        "device_id",
        "fired_unix_nano",
        "fired_utc",
        "acked_unix_nano",
        "avg_value",
        "seconds",
        "message",
    ];

    #[test]
    fn json_lines_keep_types_and_column_order() {
        assert_eq!(
            render(Format::Json, COLUMNS, &rows()),
            "{\"id\":7,\"device_id\":\"dev-a\",\"fired_unix_nano\":1738324800999999999,\
             \"fired_utc\":\"2025-01-31T12:00:00Z\",\"acked_unix_nano\":1738328400000000000,\
             \"avg_value\":2.0,\"seconds\":0.30000000000000004,\
             \"message\":\"say \\\"hi\\\", then\\nleave\"}\n\
             {\"id\":12,\"device_id\":\"dev-b\",\"fired_unix_nano\":1738324800000000000,\
             \"fired_utc\":\"2025-01-31T12:00:00Z\",\"acked_unix_nano\":null,\
             \"avg_value\":-0.0001,\"seconds\":null,\"message\":\"\"}\n"
        );
    }

    #[test]
    fn csv_quotes_as_rfc_4180_and_keeps_full_precision() {
        assert_eq!(
            render(Format::Csv, COLUMNS, &rows()),
            "id,device_id,fired_unix_nano,fired_utc,acked_unix_nano,avg_value,seconds,message\n\
             7,dev-a,1738324800999999999,2025-01-31T12:00:00Z,1738328400000000000,2,\
             0.30000000000000004,\"say \"\"hi\"\", then\nleave\"\n\
             12,dev-b,1738324800000000000,2025-01-31T12:00:00Z,,-0.0001,,\"\"\n"
        );
    }

    #[test]
    fn table_aligns_and_shows_times_in_utc() {
        assert_eq!(
            render(Format::Table, COLUMNS, &rows()),
            "id  device_id  fired_utc             acked_utc             avg_value  seconds  message\n \
             7  dev-a      2025-01-31T12:00:00Z  2025-01-31T13:00:00Z          2      0.3  say \"hi\", then\\nleave\n\
             12  dev-b      2025-01-31T12:00:00Z  -                             0        -\n"
        );
    }

    #[test]
    fn table_of_no_rows_is_its_header() {
        assert_eq!(
            render(Format::Table, &["device_id", "online"], &[]),
            "device_id  online\n"
        );
    }

    #[test]
    fn floats_in_tables_have_at_most_three_decimals() {
        assert_eq!(float3(2.0), "2");
        assert_eq!(float3(2.5), "2.5");
        assert_eq!(float3(1.0 / 3.0), "0.333");
        assert_eq!(float3(-0.0001), "0");
        assert_eq!(float3(1234.5678), "1234.568");
    }
}
