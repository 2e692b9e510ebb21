//! What the SQLite C API calls of the storage layer share: a prepared
//! statement on a connection sqlx lends, and SQLite's message for a failure.

use std::ffi::{CStr, c_int};
use std::ptr::{self, NonNull};

use libsqlite3_sys as ffi;
use sqlx::SqliteConnection;

/// A prepared statement, finalized on drop.
pub(super) struct Statement {
    pub(super) db: NonNull<ffi::sqlite3>,
    pub(super) raw: NonNull<ffi::sqlite3_stmt>,
}

impl Statement {
    pub(super) fn prepare(db: NonNull<ffi::sqlite3>, sql: &CStr) -> Result<Self, sqlx::Error> {
        let mut raw = ptr::null_mut();
        // SAFETY: `db` is an open connection lent by sqlx for as long as
        // this statement lives (the lock guard outlives the call), and `sql`
        // is NUL-terminated.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db.as_ptr(),
                sql.as_ptr(),
                -1,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut raw,
                ptr::null_mut(),
            )
        };
        match NonNull::new(raw) {
            Some(raw) if rc == ffi::SQLITE_OK => Ok(Self { db, raw }),
            _ => Err(error(db, rc, "preparing a statement")),
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
pub(super) fn error(db: NonNull<ffi::sqlite3>, rc: c_int, doing: &str) -> sqlx::Error {
    // SAFETY: sqlite3_errmsg returns a NUL-terminated string owned by the
    // connection, valid until its next call; it is copied at once.
    let message = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db.as_ptr())) }
        .to_string_lossy()
        .into_owned();
    sqlx::Error::Protocol(format!("SQLite error {rc} {doing}: {message}"))
}

/// Runs `work` on `conn`'s raw handle, which sqlx lends for the duration
/// (so statements run inside whatever transaction sqlx has open). The work
/// runs for tens of milliseconds: long enough that the runtime should move
/// this worker's other tasks elsewhere. A current-thread runtime (some
/// tests) cannot, and simply waits.
pub(super) async fn on_handle<T>(
    conn: &mut SqliteConnection,
    work: impl FnOnce(NonNull<ffi::sqlite3>) -> Result<T, sqlx::Error>,
) -> Result<T, sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle();
    let run = || work(db);
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(run),
        _ => run(),
    }
}
