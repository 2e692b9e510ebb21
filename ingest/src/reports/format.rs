//! Where report rows go: the `ingest` CLI's output module writes them as
//! a table, CSV or JSON lines.

use std::io;

use super::Value;

/// Where report rows go: the header once, then every row, then `finish`.
pub trait RowWriter {
    fn header(&mut self, columns: &[String]) -> io::Result<()>;
    fn row(&mut self, row: &[Value]) -> io::Result<()>;
    /// Writes what is held back and flushes.
    fn finish(&mut self) -> io::Result<()>;
}
