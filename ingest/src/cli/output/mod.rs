//! How the operator commands print, in one place. A subcommand says what it
//! asked and what it shows (the columns of its table, the fields of its
//! JSON); this module renders it:
//!
//! - [`Answer`]: `--json` for scripts (one JSON object per line, never
//!   clipped) or text for people.
//! - [`Table`]: aligned columns under a header row, no borders, long cells
//!   clipped with `…`, laid out by comfy-table.
//! - [`Format`]: the rows of `ingest report` as a table, CSV or JSON lines,
//!   streamed.
//! - Text for people: times, durations, `yes`/`no`, `-`, gRPC errors.

mod rows;
mod table;

use std::fmt::Display;
use std::io::{self, Write};
use std::time::Duration;

pub use rows::{CsvRows, Format, JsonRows, TableRows};
pub(crate) use table::{Column, Table};

/// Where a command's answer goes: with `--json`, JSON; otherwise text.
pub(crate) struct Answer<W> {
    out: W,
    json: bool,
}

impl Answer<io::StdoutLock<'static>> {
    pub(crate) fn stdout(json: bool) -> Self {
        Self::new(io::stdout().lock(), json)
    }
}

impl<W: Write> Answer<W> {
    pub(crate) fn new(out: W, json: bool) -> Self {
        Self { out, json }
    }

    /// One item: its JSON object on a line, or its text (a line, a table of
    /// one row, a block).
    pub(crate) fn one<T: ?Sized, D: Display>(
        &mut self,
        item: &T,
        json: impl FnOnce(&T) -> serde_json::Value,
        text: impl FnOnce(&T) -> D,
    ) -> io::Result<()> {
        if self.json {
            json_line(&mut self.out, &json(item))?;
        } else {
            writeln!(self.out, "{}", text(item))?;
        }
        self.out.flush()
    }

    /// A list: a JSON object per item, each on its line, or their table.
    pub(crate) fn list<T>(
        &mut self,
        items: &[T],
        json: impl Fn(&T) -> serde_json::Value,
        table: impl FnOnce(&[T]) -> Table,
    ) -> io::Result<()> {
        if self.json {
            for item in items {
                json_line(&mut self.out, &json(item))?;
            }
        } else {
            table(items).write(&mut self.out)?;
        }
        self.out.flush()
    }
}

/// `value` as compact JSON on a line of its own (JSON Lines).
fn json_line(out: &mut impl Write, value: &serde_json::Value) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

/// A gRPC error as the CLI prints it: `Code: message`.
pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    // What tonic answers when the other end speaks HTTP/1 (the admin
    // port, a web server) rather than gRPC.
    if status.code() == tonic::Code::Unknown && status.message() == "transport error" {
        return anyhow::anyhow!(
            "the server did not answer as a gRPC server: is --server the admin HTTP port \
             (--admin-listen) rather than the gRPC port (--listen, 50051 by default)?"
        );
    }
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// What the server accepted but thinks a person should know (a rule for
/// a device not registered yet), on stderr: stdout keeps the answer alone.
pub(crate) fn warn(warnings: &[String]) {
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
}

/// A unary call's answer, or its error as the CLI prints it
/// ([`status_error`]).
pub(crate) fn reply<T>(answer: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    answer
        .map(tonic::Response::into_inner)
        .map_err(status_error)
}

/// The width tables fit: `COLUMNS` if set, else the terminal's (standard
/// output's), else 80, so that output piped to a pager or a file reads
/// the same as on a common terminal. Full values are in `--json` and CSV.
pub(crate) fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .filter(|&c| c > 0)
        .or_else(|| terminal_size::terminal_size().map(|(w, _)| usize::from(w.0)))
        .unwrap_or(80)
}

/// A time for people, in every table alike: RFC 3339 in UTC to the second
/// (JSON has the nanoseconds), `-` for none.
pub(crate) fn time(nanos: u64) -> String {
    if nanos == 0 {
        return "-".into();
    }
    utc(nanos as i64)
}

/// RFC 3339 in UTC to the second, as the reporting views' `*_utc` columns:
/// `2025-01-31T12:00:00Z`.
pub(crate) fn utc(nanos: i64) -> String {
    match chrono::DateTime::from_timestamp(nanos / 1_000_000_000, 0) {
        Some(time) => time.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => nanos.to_string(),
    }
}

/// RFC 3339 in UTC with the nanoseconds a reading's time has: the
/// `time_utc` column of exported readings.
pub(crate) fn utc_nanos(nanos: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(nanos)
        .format("%Y-%m-%dT%H:%M:%S%.fZ")
        .to_string()
}

/// `500ms`, `2s`, `1m 30s`.
pub(crate) fn duration_text(millis: u64) -> String {
    humantime::format_duration(Duration::from_millis(millis)).to_string()
}

/// A reading's value for people: at most 6 significant digits, no
/// trailing zeros (`21.5`, `0.000123`, `1.23457e9`). `--json` and CSV keep
/// every digit.
pub(crate) fn number(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return v.to_string();
    }
    let magnitude = v.abs().log10().floor() as i32;
    if !(-4..9).contains(&magnitude) {
        let text = format!("{v:.5e}");
        let (mantissa, exponent) = text.split_once('e').expect("exponent format");
        return format!("{}e{exponent}", without_trailing_zeros(mantissa));
    }
    let decimals = (5 - magnitude).max(0) as usize;
    without_trailing_zeros(&format!("{v:.decimals$}")).to_owned()
}

fn without_trailing_zeros(decimal: &str) -> &str {
    if decimal.contains('.') {
        decimal.trim_end_matches('0').trim_end_matches('.')
    } else {
        decimal
    }
}

pub(crate) fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `-` for an empty text.
pub(crate) fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// An enum's name for JSON: `null` where a table shows `placeholder`
/// (the value was unspecified or unknown to this client).
pub(crate) fn name_or_null(name: &str, placeholder: &str) -> serde_json::Value {
    if name == placeholder {
        serde_json::Value::Null
    } else {
        name.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(
        json: bool,
        print: impl FnOnce(&mut Answer<&mut Vec<u8>>) -> io::Result<()>,
    ) -> String {
        let mut out = Vec::new();
        print(&mut Answer::new(&mut out, json)).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn long() -> String {
        format!("{}\n\"quoted\"", "x".repeat(200))
    }

    #[test]
    fn json_is_one_compact_object_per_line_and_never_clipped() {
        let value = serde_json::json!({ "id": 7, "text": long(), "none": null });
        let text = answer(true, |a| a.one(&value, Clone::clone, |_| "not this"));
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with("}\n"), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
        assert_eq!(back["text"].as_str().unwrap().len(), 209);

        let items = [1, 2, 3];
        let text = answer(true, |a| {
            a.list(
                &items,
                |n| serde_json::json!({ "n": n }),
                |_| unreachable!("no table for --json"),
            )
        });
        assert_eq!(text, "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n");
    }

    #[test]
    fn text_is_the_line_or_the_table() {
        let text = answer(false, |a| {
            a.one(&5, |_| unreachable!("no JSON"), |n| format!("{n} items"))
        });
        assert_eq!(text, "5 items\n");
        let text = answer(false, |a| {
            a.list(
                &[long()],
                |_| unreachable!("no JSON"),
                |items| {
                    let mut table = Table::new([Column::left("TEXT")]).clip(10);
                    for item in items {
                        table.row([item]);
                    }
                    table
                },
            )
        });
        assert_eq!(text, "TEXT\nxxxxxxxxx…\n");
    }

    #[test]
    fn times_and_words_for_people() {
        // 2026-11-23 22:51:20.123 UTC
        let t = 1_795_474_280_123_456_789;
        assert_eq!(time(0), "-");
        assert_eq!(time(t), "2026-11-23T22:51:20Z");
        assert_eq!(utc(t as i64), "2026-11-23T22:51:20Z");
        assert_eq!(duration_text(90_000), "1m 30s");
        assert_eq!((yes_no(true), yes_no(false)), ("yes", "no"));
        assert_eq!(number(21.5), "21.5");
        assert_eq!(number(-3.0), "-3");
        assert_eq!(number(1.0 / 3.0), "0.333333");
        assert_eq!(number(1234.56789), "1234.57");
        assert_eq!(number(0.000123), "0.000123");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(1_234_567_890.0), "1.23457e9");
        assert_eq!(number(0.00001), "1e-5");
        assert_eq!((or_dash(""), or_dash("a")), ("-", "a"));
    }
}
