//! Raw readings out of SQLite through the C API, for the read path's
//! exports.
//!
//! Through sqlx every row is built as an owned row object on the
//! connection's worker thread and sent over a channel to the task that
//! asked: at an export's rate that costs more than SQLite's own stepping
//! (a profile of `bench/run --only read` showed the channel, the row
//! objects and their allocations above `sqlite3VdbeExec`). Here one page is
//! stepped on the borrowed handle straight into columns.

use std::ffi::CString;
use std::ptr::NonNull;

use libsqlite3_sys as ffi;
use sqlx::SqliteConnection;

use super::read_page::{RawRows, RowsPage};
use super::sqlite_ffi::{Statement, error, on_handle};

/// One series' readings from a (time, value) on, before an end: a range
/// of the table's key, read in key order (migration 0012).
const SERIES_SQL: &str = "SELECT time_unix_nano, value FROM readings \
     WHERE sensor_pk = ?1 AND (time_unix_nano, value) >= (?2, ?3) AND time_unix_nano < ?4 \
     ORDER BY time_unix_nano, value LIMIT ?5";

/// See [`super::ReadPool::raw_rows`]. SQLite has no partitions to open,
/// so a statement per series costs little: the page runs the same prepared
/// statement once per series until it holds `limit` rows.
pub(super) async fn raw_rows(
    conn: &mut SqliteConnection,
    page: &RowsPage<'_>,
) -> Result<RawRows, sqlx::Error> {
    on_handle(conn, |db| read_on(db, page)).await
}

fn read_on(db: NonNull<ffi::sqlite3>, page: &RowsPage<'_>) -> Result<RawRows, sqlx::Error> {
    let stmt = Statement::prepare(db, &CString::new(SERIES_SQL).expect("no NUL in SQL"))?;
    let raw = stmt.raw.as_ptr();
    let RowsPage {
        from, start, end, ..
    } = *page;
    let mut read = RawRows::with_capacity(page.limit);
    for &pk in page.sensor_pks.iter().filter(|&&pk| pk >= from.sensor_pk) {
        let left = page.limit - read.len();
        if left == 0 {
            break;
        }
        let (time, value) = if pk == from.sensor_pk && from.time >= start {
            (from.time, from.value)
        } else {
            (start, f64::MIN)
        };
        let mut rc;
        // SAFETY: `raw` is a live statement with five parameters on a
        // connection this thread holds (sqlx's lock guard outlives the
        // call); columns are read only after SQLITE_ROW, by index within
        // the two selected, and the statement is reset before it is bound
        // again or finalized.
        unsafe {
            ffi::sqlite3_bind_int64(raw, 1, pk);
            ffi::sqlite3_bind_int64(raw, 2, time);
            ffi::sqlite3_bind_double(raw, 3, value);
            ffi::sqlite3_bind_int64(raw, 4, end);
            ffi::sqlite3_bind_int64(raw, 5, left as i64);
            loop {
                rc = ffi::sqlite3_step(raw);
                if rc != ffi::SQLITE_ROW {
                    break;
                }
                read.push(
                    pk,
                    ffi::sqlite3_column_int64(raw, 0),
                    ffi::sqlite3_column_double(raw, 1),
                );
            }
            ffi::sqlite3_reset(raw);
        }
        if rc != ffi::SQLITE_DONE {
            return Err(error(db, rc, "reading readings"));
        }
    }
    Ok(read)
}
