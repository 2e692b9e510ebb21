//! Readings into SQLite through the C API, inside the writer's transaction.
//!
//! sqlx binds each value as an enum in an argument vector, sent to the
//! connection's worker thread and bound there one by one: at a million
//! readings a second that marshalling was about a tenth of the SQLite
//! thread (docs/benchmarks.md). Here a prepared multi-row statement is
//! bound straight from the columns, with no allocation per value. sqlx
//! lends the handle (`lock_handle`) for the duration, so the rows land in
//! the transaction sqlx opened and commit with everything else in the group.

use std::ffi::{CString, c_int};
use std::ops::Range;
use std::ptr::NonNull;

use libsqlite3_sys as ffi;
use sqlx::SqliteConnection;

use super::ReadingColumns;
use super::feed::FeedAppend;
use super::sqlite_ffi::{Statement, error, on_handle};

/// Rows per execution of the multi-row statement. One execution opens the
/// table's and the index's cursors once for all its rows; a single-row
/// statement opens them, and seeks to the table's end from its root, for
/// every row. 5 × 512 parameters stay far below SQLite's limit of 32766.
const CHUNK_ROWS: usize = 512;

/// `OR FAIL`: a statement that fails keeps the rows it already inserted,
/// so SQLite needs no statement journal to undo them, which otherwise
/// copies every page a multi-row insert touches. Nothing is kept in fact:
/// a failed insert fails its group, and the group's transaction rolls back.
fn insert_sql(rows: usize) -> CString {
    let mut sql = String::from(
        "INSERT OR FAIL INTO readings (sensor_pk, time_unix_nano, value, batch_sequence, batch_index) VALUES ",
    );
    for i in 0..rows {
        sql.push_str(if i == 0 {
            "(?,?,?,?,?)"
        } else {
            ",(?,?,?,?,?)"
        });
    }
    CString::new(sql).expect("no NUL in SQL")
}

/// Inserts every row of `rows` on `conn`, which must be inside a write
/// transaction. On error some rows may have been inserted: the caller rolls
/// the transaction back, as for any failed statement.
pub(super) async fn insert_readings(
    conn: &mut SqliteConnection,
    rows: &ReadingColumns,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    on_handle(conn, |db| insert_on(db, rows)).await
}

fn insert_on(db: NonNull<ffi::sqlite3>, rows: &ReadingColumns) -> Result<(), sqlx::Error> {
    let full_chunks = rows.len() / CHUNK_ROWS;
    let mut row = 0;
    if full_chunks > 0 {
        let chunk = Statement::prepare(db, &insert_sql(CHUNK_ROWS))?;
        for _ in 0..full_chunks {
            insert(&chunk, rows, row..row + CHUNK_ROWS)?;
            row += CHUNK_ROWS;
        }
    }
    if row < rows.len() {
        let single = Statement::prepare(db, &insert_sql(1))?;
        for r in row..rows.len() {
            insert(&single, rows, r..r + 1)?;
        }
    }
    Ok(())
}

/// Runs the multi-row insert once, bound to `range` of `rows`; `stmt`
/// must have five parameters per row of the range.
fn insert(stmt: &Statement, rows: &ReadingColumns, range: Range<usize>) -> Result<(), sqlx::Error> {
    let raw = stmt.raw.as_ptr();
    let mut rc = ffi::SQLITE_OK;
    // SAFETY: `raw` is a live statement with 5 × range.len()
    // parameters on a connection this thread holds; binding numbers
    // copies them, and parameter indexes start at 1.
    unsafe {
        let mut param: c_int = 1;
        for i in range {
            for r in [
                ffi::sqlite3_bind_int64(raw, param, rows.sensor_pk[i]),
                ffi::sqlite3_bind_int64(raw, param + 1, rows.time[i]),
                ffi::sqlite3_bind_double(raw, param + 2, rows.value[i]),
                ffi::sqlite3_bind_int64(raw, param + 3, rows.batch_sequence[i]),
                ffi::sqlite3_bind_int(raw, param + 4, rows.batch_index[i]),
            ] {
                if rc == ffi::SQLITE_OK {
                    rc = r;
                }
            }
            param += 5;
        }
        if rc == ffi::SQLITE_OK {
            rc = ffi::sqlite3_step(raw);
        }
        // Reset whatever happened, so the statement can run again (or
        // be finalized); a failed step's message stays readable.
        ffi::sqlite3_reset(raw);
    }
    if rc == ffi::SQLITE_DONE {
        Ok(())
    } else {
        Err(error(stmt.db, rc, "inserting readings"))
    }
}

/// Appends the readings feed's batches at positions `first..` through the
/// C API, as the readings: one prepared statement stepped per batch,
/// with no trip through sqlx's worker per row (at a million readings a
/// second in batches of a hundred, that is ten thousand rows a second).
pub(super) async fn insert_feed(
    conn: &mut SqliteConnection,
    first: i64,
    batches: &[FeedAppend],
    now: i64,
) -> Result<(), sqlx::Error> {
    on_handle(conn, |db| {
        let sql = CString::new(
            "INSERT OR FAIL INTO readings_feed (position, device_pk, batch_sequence, readings, committed_unix_nano, payload) \
             VALUES (?,?,?,?,?,?)",
        )
        .expect("no NUL in SQL");
        let stmt = Statement::prepare(db, &sql)?;
        let raw = stmt.raw.as_ptr();
        for (position, b) in (first..).zip(batches) {
            let mut rc = ffi::SQLITE_OK;
            // SAFETY: `raw` is a live statement with six parameters on a
            // connection this thread holds. The payload is bound without a
            // copy (SQLITE_STATIC): it outlives the step, and the reset
            // below drops SQLite's reference to it.
            unsafe {
                for r in [
                    ffi::sqlite3_bind_int64(raw, 1, position),
                    ffi::sqlite3_bind_int64(raw, 2, b.device_pk),
                    ffi::sqlite3_bind_int64(raw, 3, super::sql::bigint(b.batch_sequence)),
                    ffi::sqlite3_bind_int64(raw, 4, i64::from(b.readings)),
                    ffi::sqlite3_bind_int64(raw, 5, now),
                    ffi::sqlite3_bind_blob(
                        raw,
                        6,
                        b.payload.as_ptr().cast(),
                        c_int::try_from(b.payload.len()).unwrap_or(c_int::MAX),
                        ffi::SQLITE_STATIC(),
                    ),
                ] {
                    if rc == ffi::SQLITE_OK {
                        rc = r;
                    }
                }
                if rc == ffi::SQLITE_OK {
                    rc = ffi::sqlite3_step(raw);
                }
                ffi::sqlite3_reset(raw);
                ffi::sqlite3_clear_bindings(raw);
            }
            if rc != ffi::SQLITE_DONE {
                return Err(error(stmt.db, rc, "appending to the readings feed"));
            }
        }
        Ok(())
    })
    .await
}
