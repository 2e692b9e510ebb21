//! Readings into SQLite through the C API, inside the writer's transaction.
//!
//! sqlx binds each value as an enum in an argument vector, sent to the
//! connection's worker thread and bound there one by one: at a million
//! readings a second that marshalling was about a tenth of the SQLite
//! thread (docs/benchmarks.md). Here one prepared single-row statement is
//! bound straight from the columns and stepped once per row, which is the
//! loop SQLite's own shell runs. sqlx lends the handle (`lock_handle`) for
//! the duration, so the rows land in the transaction sqlx opened and
//! commit with everything else in the group.

use std::ffi::{CStr, c_int};
use std::ptr::{self, NonNull};

use libsqlite3_sys as ffi;
use sqlx::SqliteConnection;

use super::ReadingColumns;

const INSERT_READING: &CStr =
    c"INSERT INTO readings (sensor_pk, time_unix_nano, value) VALUES (?1, ?2, ?3)";

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
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle();
    // The loop runs for tens of milliseconds on a big group: long enough
    // that the runtime should move this worker's other tasks elsewhere.
    // A current-thread runtime (some tests) cannot, and simply waits.
    let run = || insert_on(db, rows);
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(run),
        _ => run(),
    }
}

fn insert_on(db: NonNull<ffi::sqlite3>, rows: &ReadingColumns) -> Result<(), sqlx::Error> {
    let statement = Statement::prepare(db, INSERT_READING)?;
    for ((&sensor_pk, &time), &value) in rows.sensor_pk.iter().zip(&rows.time).zip(&rows.value) {
        statement.insert_row(sensor_pk, time, value)?;
    }
    Ok(())
}

/// A prepared statement, finalized on drop.
struct Statement {
    db: NonNull<ffi::sqlite3>,
    raw: NonNull<ffi::sqlite3_stmt>,
}

impl Statement {
    fn prepare(db: NonNull<ffi::sqlite3>, sql: &CStr) -> Result<Self, sqlx::Error> {
        let mut raw = ptr::null_mut();
        // SAFETY: `db` is an open connection lent by sqlx for as long as
        // this statement lives (the lock guard outlives the call), and `sql`
        // is NUL-terminated.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db.as_ptr(),
                sql.as_ptr(),
                -1,
                ffi::SQLITE_PREPARE_PERSISTENT as u32,
                &mut raw,
                ptr::null_mut(),
            )
        };
        match NonNull::new(raw) {
            Some(raw) if rc == ffi::SQLITE_OK => Ok(Self { db, raw }),
            _ => Err(error(db, rc, "preparing the readings insert")),
        }
    }

    fn insert_row(&self, sensor_pk: i64, time: i64, value: f64) -> Result<(), sqlx::Error> {
        let stmt = self.raw.as_ptr();
        // SAFETY: `stmt` is a live statement of three parameters on a
        // connection this thread holds; binding numbers copies them.
        let rc = unsafe {
            let mut rc = ffi::sqlite3_bind_int64(stmt, 1, sensor_pk);
            if rc == ffi::SQLITE_OK {
                rc = ffi::sqlite3_bind_int64(stmt, 2, time);
            }
            if rc == ffi::SQLITE_OK {
                rc = ffi::sqlite3_bind_double(stmt, 3, value);
            }
            if rc == ffi::SQLITE_OK {
                rc = ffi::sqlite3_step(stmt);
            }
            // Reset whatever happened, so the statement can run again (or
            // be finalized) and a failed step's error stays readable.
            ffi::sqlite3_reset(stmt);
            rc
        };
        if rc == ffi::SQLITE_DONE {
            Ok(())
        } else {
            Err(error(self.db, rc, "inserting readings"))
        }
    }
}

impl Drop for Statement {
    fn drop(&mut self) {
        // SAFETY: the statement was prepared on `db` and is finalized once.
        unsafe {
            ffi::sqlite3_finalize(self.raw.as_ptr());
        }
    }
}

/// SQLite's message for a failed call. NaN and infinities never get here
/// (the domain refuses them), so a failure is a fault of the database:
/// full disk, I/O error, corruption.
fn error(db: NonNull<ffi::sqlite3>, rc: c_int, doing: &str) -> sqlx::Error {
    // SAFETY: sqlite3_errmsg returns a NUL-terminated string owned by the
    // connection, valid until its next call; it is copied at once.
    let message = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db.as_ptr())) }
        .to_string_lossy()
        .into_owned();
    sqlx::Error::Protocol(format!("SQLite error {rc} {doing}: {message}"))
}
