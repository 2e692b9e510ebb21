//! The rows of `ingest report`: `table` for terminals, `csv` for
//! spreadsheets, `json` (JSON Lines) for scripts. Each writes rows as they
//! come; only the table holds back its first rows, to size its columns.

use std::fmt::Write as _;
use std::io::{self, Write};

use super::{Column, Table, utc};
use crate::reports::{RowWriter, Value};

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
    #[value(alias = "jsonl")]
    Json,
}

impl Format {
    pub fn writer<'a, W: Write + Send + 'a>(self, out: W) -> Box<dyn RowWriter + Send + 'a> {
        match self {
            Self::Table => Box::new(TableRows::new(out)),
            Self::Csv => Box::new(CsvRows::new(out)),
            Self::Json => Box::new(JsonRows::new(out)),
        }
    }
}

// ---- json -----------------------------------------------------------------

/// One JSON object per line, keys in the view's column order. Integers and
/// floats are JSON numbers (a whole float keeps its `.0`), exactly as stored.
pub struct JsonRows<W> {
    out: W,
    /// Each column's `"name":`, encoded once.
    keys: Vec<String>,
}

impl<W: Write> JsonRows<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            keys: Vec::new(),
        }
    }
}

impl<W: Write> RowWriter for JsonRows<W> {
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

/// CSV with a header row, written by csv-core: a field is quoted when it
/// holds a comma, a quote or a line break (quotes doubled, RFC 4180);
/// records end with `\n`. Floats have full precision, in Rust's shortest
/// form that reads back to the same double (a whole float prints as `2`).
/// NULL is an empty field; an empty text is `""`, so the two stay apart.
pub struct CsvRows<W> {
    out: CsvOut<W>,
    /// A number as text.
    number: String,
}

impl<W: Write> CsvRows<W> {
    pub fn new(out: W) -> Self {
        Self {
            out: CsvOut {
                out,
                csv: csv_core::Writer::new(),
                field: Vec::new(),
            },
            number: String::new(),
        }
    }
}

impl<W: Write> RowWriter for CsvRows<W> {
    fn header(&mut self, columns: &[String]) -> io::Result<()> {
        for (i, column) in columns.iter().enumerate() {
            self.out.field(i, columns.len(), Some(column))?;
        }
        self.out.end()
    }

    fn row(&mut self, row: &[Value]) -> io::Result<()> {
        for (i, value) in row.iter().enumerate() {
            self.number.clear();
            let field = match value {
                Value::Null => None,
                Value::Int(v) => Some(write_number(&mut self.number, v)),
                Value::Float(v) => Some(write_number(&mut self.number, v)),
                Value::Text(v) => Some(v.as_str()),
            };
            self.out.field(i, row.len(), field)?;
        }
        self.out.end()
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.out.flush()
    }
}

fn write_number(buf: &mut String, v: impl std::fmt::Display) -> &str {
    write!(buf, "{v}").expect("a String takes any text");
    buf
}

/// csv-core's fields, delimiters and terminators, written out.
struct CsvOut<W> {
    out: W,
    csv: csv_core::Writer,
    /// A field as csv-core writes it.
    field: Vec<u8>,
}

impl<W: Write> CsvOut<W> {
    /// Field `i` of a record of `len`; `None` is NULL.
    fn field(&mut self, i: usize, len: usize, field: Option<&str>) -> io::Result<()> {
        if i > 0 {
            // A closing quote and the comma.
            let mut buf = [0; 2];
            let (_, n) = self.csv.delimiter(&mut buf);
            self.out.write_all(&buf[..n])?;
        }
        match field {
            None => Ok(()),
            // csv-core quotes an empty field only when it is the record's
            // only one, which it then does itself.
            Some("") if len > 1 => self.out.write_all(b"\"\""),
            Some(text) => {
                // At worst: two quotes around a field of quotes, each doubled.
                self.field.resize(2 * text.len() + 2, 0);
                let (result, _, n) = self.csv.field(text.as_bytes(), &mut self.field);
                debug_assert_eq!(result, csv_core::WriteResult::InputEmpty);
                self.out.write_all(&self.field[..n])
            }
        }
    }

    fn end(&mut self) -> io::Result<()> {
        // `""` for an empty record, a closing quote, the newline.
        let mut buf = [0; 4];
        let (_, n) = self.csv.terminator(&mut buf);
        self.out.write_all(&buf[..n])
    }
}

// ---- table ----------------------------------------------------------------

/// Rows held back to size the columns; later rows use those widths (a wider
/// value shifts the rest of its line rather than holding every row).
const TABLE_SAMPLE_ROWS: usize = 1000;

/// Aligned columns for a terminal ([`Table`]). A `X_unix_nano` column is
/// shown as the time it is, in UTC to the second like the views' `*_utc`
/// columns: as `X_utc`, or left out when the view has an `X_utc` column
/// already. Numbers are right-aligned, floats to at most 3 decimals; NULL
/// is `-`.
pub struct TableRows<W> {
    out: W,
    columns: Vec<ReportColumn>,
    /// The first rows, formatted, until the widths are known; `None` after.
    held: Option<Vec<Vec<String>>>,
    /// The widths of the held rows' columns, which later rows keep to.
    widths: Vec<usize>,
}

struct ReportColumn {
    /// Index of the column in the report's rows.
    source: usize,
    header: String,
    /// Unix nanoseconds shown as a UTC time.
    time: bool,
    /// Right-aligned (numbers); decided by the first value that is not NULL.
    right: Option<bool>,
}

impl<W: Write> TableRows<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            columns: Vec::new(),
            held: Some(Vec::new()),
            widths: Vec::new(),
        }
    }

    /// The columns, each at least `widths` wide.
    fn table(&self, widths: &[usize]) -> Table {
        let columns = self.columns.iter().enumerate().map(|(i, c)| {
            let column = if c.right == Some(true) {
                Column::right(&c.header)
            } else if c.header.ends_with("_utc") {
                Column::time(&c.header)
            } else {
                Column::left(&c.header)
            };
            column.min_width(widths.get(i).copied().unwrap_or(0))
        });
        Table::new(columns).trim_end()
    }

    /// Sizes the columns by the held rows and writes the header and them.
    fn release(&mut self) -> io::Result<()> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        let mut table = self.table(&[]);
        for cells in held {
            table.row(cells);
        }
        self.widths = table.widths();
        table.write(&mut self.out)
    }
}

impl<W: Write> RowWriter for TableRows<W> {
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
            self.columns.push(ReportColumn {
                source,
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
            None => {
                let mut line = self.table(&self.widths).headless();
                line.row(cells);
                line.write(&mut self.out)
            }
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.release()?;
        self.out.flush()
    }
}

fn table_cell(value: &Value, time: bool) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::Int(nanos) if time => utc(*nanos),
        Value::Int(v) => v.to_string(),
        Value::Float(v) => float3(*v),
        Value::Text(v) => v.clone(),
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
    fn csv_quotes_only_what_needs_it() {
        let row = |cells: &[&str]| -> Vec<Value> {
            cells.iter().map(|c| Value::Text((*c).into())).collect()
        };
        assert_eq!(
            render(
                Format::Csv,
                &["a", "b,c", "d"],
                &[
                    row(&["plain", "with space", "tab\there"]),
                    row(&["comma,", "\"", "cr\r"]),
                    row(&["", "", ""]),
                    vec![Value::Null, Value::Int(-3), Value::Float(f64::NAN)],
                ]
            ),
            "a,\"b,c\",d\n\
             plain,with space,tab\there\n\
             \"comma,\",\"\"\"\",\"cr\r\"\n\
             \"\",\"\",\"\"\n\
             ,-3,NaN\n"
        );
        // One column: csv-core writes an empty record as `""`, not as an
        // empty line a reader would skip, and an empty text stays `""`.
        assert_eq!(
            render(
                Format::Csv,
                &["only"],
                &[vec![Value::Text(String::new())], vec![Value::Int(1)]]
            ),
            "only\n\"\"\n1\n"
        );
        // Never clipped, unlike a table's cells.
        let long = "x".repeat(40_000);
        assert_eq!(
            render(Format::Csv, &["long"], &[vec![Value::Text(long.clone())]]),
            format!("long\n{long}\n")
        );
    }

    #[test]
    fn table_aligns_and_shows_times_in_utc() {
        // Fitted to 80 columns: text gives way first, times and numbers
        // never (see table.rs).
        assert_eq!(
            render(Format::Table, COLUMNS, &rows()),
            "id  devic…  fired_utc             acked_utc             avg_va…  seconds  messa…\n \
             7  dev-a   2025-01-31T12:00:00Z  2025-01-31T13:00:00Z        2      0.3  say \"…\n\
             12  dev-b   2025-01-31T12:00:00Z  -                           0        -\n"
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
    fn table_rows_after_the_sample_keep_its_widths() {
        let mut rows: Vec<Vec<Value>> = (0..TABLE_SAMPLE_ROWS as i64)
            .map(|i| vec![Value::Text("ab".into()), Value::Int(i)])
            .collect();
        rows.push(vec![Value::Text("a".into()), Value::Int(5)]);
        rows.push(vec![Value::Text("abcdef".into()), Value::Int(6)]);
        let text = render(Format::Table, &["name", "n"], &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), TABLE_SAMPLE_ROWS + 3);
        assert_eq!(lines[0], "name    n");
        assert_eq!(lines[1], "ab      0");
        // Narrower: padded to the sampled width; wider: shifts its line.
        assert_eq!(lines[TABLE_SAMPLE_ROWS + 1], "a       5");
        assert_eq!(lines[TABLE_SAMPLE_ROWS + 2], "abcdef    6");
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
