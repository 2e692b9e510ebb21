//! One SQL text, run on either backend.
//!
//! Most of our SQL reads the same on SQLite and PostgreSQL, placeholders
//! included: both take `$1, $2, ...` (sqlx's SQLite driver binds `$N` to the
//! N-th argument). So a query that is the same on both is written once, as
//! an ordinary method of [`Store`] (or a function taking a [`Conn`], when it
//! also runs inside the group commit's transaction), and runs through the
//! small types here, which pick the driver statement by statement:
//!
//! ```text
//! let mut tx = self.begin_write().await?;
//! tx.query("UPDATE commands SET state = $1 WHERE command_id = $2")
//!     .bind(state.as_str())
//!     .bind(id)
//!     .execute()
//!     .await?;
//! tx.commit().await?;
//! ```
//!
//! A value bound or read must be a type both drivers encode or decode
//! ([`Param`], [`Value`]), so the compiler checks every shared query against
//! both. What is not the same (COPY, arrays, the C-API bulk insert, day
//! partitions, replicas, locking) is written with sqlx directly in
//! `postgres.rs` and `sqlite.rs`; the few words of SQL that differ inside an
//! otherwise shared query are the methods at the end of this file.
//!
//! Why not `sqlx::Any`: it needs pools of its own, so a shared query could
//! not run inside the group commit's transaction nor behind SQLite's write
//! gate, and it knows neither PostgreSQL's arrays nor COPY.

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgPool, PgRow};
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqlitePool, SqliteRow};
use sqlx::{
    Database, Decode, Encode, PgConnection, Pool, Postgres, Sqlite, SqliteConnection, Transaction,
    Type,
};
use tokio::sync::OwnedMutexGuard;

use super::Store;
use super::sqlite::SqliteWriteTx;

/// A value both drivers can bind.
pub(super) trait Param<'q>:
    'q + Send + Encode<'q, Sqlite> + Type<Sqlite> + Encode<'q, Postgres> + Type<Postgres>
{
}

impl<'q, T> Param<'q> for T where
    T: 'q + Send + Encode<'q, Sqlite> + Type<Sqlite> + Encode<'q, Postgres> + Type<Postgres>
{
}

/// A column type both drivers can decode.
pub(super) trait Value:
    for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

impl<T> Value for T where
    T: for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

/// A `u64` (an id, a sequence, a cursor) as the BIGINT the column holds;
/// past `i64::MAX`, where no stored value is, it stays at `i64::MAX`.
pub(super) fn bigint(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// A connection of either backend, borrowed for some statements: a pooled
/// one, a write transaction's, or the group commit's.
pub(super) enum Conn<'c> {
    Sqlite(&'c mut SqliteConnection),
    Postgres(&'c mut PgConnection),
}

impl Conn<'_> {
    pub(super) fn query<'q>(&mut self, sql: &'q str) -> Statement<'_, 'q> {
        match self {
            Self::Sqlite(c) => Statement::Sqlite(On::Conn(c), sqlx::query(sql)),
            Self::Postgres(c) => Statement::Postgres(On::Conn(c), sqlx::query(sql)),
        }
    }

    /// Tells the other server processes on `channel` once the transaction
    /// commits (PostgreSQL's NOTIFY). Nothing on SQLite, which one process
    /// serves.
    pub(super) async fn notify(&mut self, channel: &str, payload: &str) -> Result<(), sqlx::Error> {
        if let Self::Postgres(_) = self {
            self.query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(payload)
                .execute()
                .await?;
        }
        Ok(())
    }
}

/// Where a statement runs: on a connection, or on any of a pool's.
pub(super) enum On<'c, C, P> {
    Conn(&'c mut C),
    Pool(&'c P),
}

impl<'c, DB: Database> On<'c, DB::Connection, Pool<DB>> {
    /// The connection to run on: the one borrowed, or one taken from the
    /// pool into `taken` (back in the pool when `taken` is dropped), as
    /// sqlx's `&Pool` executor does.
    async fn conn<'t>(
        self,
        taken: &'t mut Option<PoolConnection<DB>>,
    ) -> Result<&'t mut DB::Connection, sqlx::Error>
    where
        'c: 't,
    {
        match self {
            Self::Conn(c) => Ok(c),
            Self::Pool(p) => Ok(taken.insert(p.acquire().await?)),
        }
    }
}

/// One statement and its arguments, with where it will run.
pub(super) enum Statement<'c, 'q> {
    Sqlite(
        On<'c, SqliteConnection, SqlitePool>,
        Query<'q, Sqlite, SqliteArguments<'q>>,
    ),
    Postgres(
        On<'c, PgConnection, PgPool>,
        Query<'q, Postgres, PgArguments>,
    ),
}

impl<'q> Statement<'_, 'q> {
    /// Binds the next `$N`.
    pub(super) fn bind<T: Param<'q>>(self, value: T) -> Self {
        match self {
            Self::Sqlite(on, q) => Self::Sqlite(on, q.bind(value)),
            Self::Postgres(on, q) => Self::Postgres(on, q.bind(value)),
        }
    }

    /// Runs it; returns how many rows it changed.
    pub(super) async fn execute(self) -> Result<u64, sqlx::Error> {
        let done = match self {
            Self::Sqlite(on, q) => q.execute(on.conn(&mut None).await?).await?.rows_affected(),
            Self::Postgres(on, q) => q.execute(on.conn(&mut None).await?).await?.rows_affected(),
        };
        Ok(done)
    }

    /// The one row; `RowNotFound` if there is none (as sqlx's `fetch_one`).
    pub(super) async fn fetch_one(self) -> Result<Row, sqlx::Error> {
        self.fetch_optional().await?.ok_or(sqlx::Error::RowNotFound)
    }

    pub(super) async fn fetch_optional(self) -> Result<Option<Row>, sqlx::Error> {
        let row = match self {
            Self::Sqlite(on, q) => {
                let row = q.fetch_optional(on.conn(&mut None).await?).await?;
                row.map(Row::Sqlite)
            }
            Self::Postgres(on, q) => {
                let row = q.fetch_optional(on.conn(&mut None).await?).await?;
                row.map(Row::Postgres)
            }
        };
        Ok(row)
    }

    pub(super) async fn fetch_all(self) -> Result<Vec<Row>, sqlx::Error> {
        let rows: Vec<Row> = match self {
            Self::Sqlite(on, q) => {
                let rows = q.fetch_all(on.conn(&mut None).await?).await?;
                rows.into_iter().map(Row::Sqlite).collect()
            }
            Self::Postgres(on, q) => {
                let rows = q.fetch_all(on.conn(&mut None).await?).await?;
                rows.into_iter().map(Row::Postgres).collect()
            }
        };
        Ok(rows)
    }

    /// The first column of the one row.
    pub(super) async fn fetch_scalar<T: Value>(self) -> Result<T, sqlx::Error> {
        self.fetch_one().await?.get(0)
    }

    /// The first column of the row, if there is one.
    pub(super) async fn fetch_optional_scalar<T: Value>(self) -> Result<Option<T>, sqlx::Error> {
        self.fetch_optional()
            .await?
            .map(|row| row.get(0))
            .transpose()
    }

    /// The first column of every row.
    pub(super) async fn fetch_scalars<T: Value>(self) -> Result<Vec<T>, sqlx::Error> {
        self.fetch_all()
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect()
    }
}

/// A row of either backend.
pub(super) enum Row {
    Sqlite(SqliteRow),
    Postgres(PgRow),
}

impl Row {
    /// The value of a column, by its position.
    pub(super) fn get<T: Value>(&self, column: usize) -> Result<T, sqlx::Error> {
        match self {
            Self::Sqlite(r) => sqlx::Row::try_get(r, column),
            Self::Postgres(r) => sqlx::Row::try_get(r, column),
        }
    }
}

/// A pooled connection; taken for a write on SQLite, it also holds the
/// write gate (see `SqliteStore`) until dropped.
pub(super) struct Pooled {
    conn: PooledConn,
    /// Dropped after `conn` is back in the pool.
    _gate: Option<OwnedMutexGuard<()>>,
}

enum PooledConn {
    Sqlite(PoolConnection<Sqlite>),
    Postgres(PoolConnection<Postgres>),
}

impl Pooled {
    pub(super) fn conn(&mut self) -> Conn<'_> {
        match &mut self.conn {
            PooledConn::Sqlite(c) => Conn::Sqlite(c),
            PooledConn::Postgres(c) => Conn::Postgres(c),
        }
    }

    pub(super) fn query<'q>(&mut self, sql: &'q str) -> Statement<'_, 'q> {
        match &mut self.conn {
            PooledConn::Sqlite(c) => Statement::Sqlite(On::Conn(c), sqlx::query(sql)),
            PooledConn::Postgres(c) => Statement::Postgres(On::Conn(c), sqlx::query(sql)),
        }
    }
}

/// A write transaction of either backend. Dropped without `commit`, it
/// rolls back.
pub(super) enum WriteTx {
    /// Holds SQLite's write lock and the write gate from its start.
    Sqlite(SqliteWriteTx),
    Postgres(Transaction<'static, Postgres>),
}

impl WriteTx {
    pub(super) fn conn(&mut self) -> Conn<'_> {
        match self {
            Self::Sqlite(tx) => Conn::Sqlite(tx),
            Self::Postgres(tx) => Conn::Postgres(tx),
        }
    }

    pub(super) fn query<'q>(&mut self, sql: &'q str) -> Statement<'_, 'q> {
        match self {
            Self::Sqlite(tx) => Statement::Sqlite(On::Conn(tx), sqlx::query(sql)),
            Self::Postgres(tx) => Statement::Postgres(On::Conn(tx), sqlx::query(sql)),
        }
    }

    pub(super) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(tx) => tx.commit().await,
            Self::Postgres(tx) => tx.commit().await,
        }
    }
}

/// Connections, and the few words of SQL that differ between the backends.
impl Store {
    /// A statement run on any of the pool's connections: for reads.
    pub(super) fn query<'q>(&self, sql: &'q str) -> Statement<'_, 'q> {
        match self {
            Self::Sqlite(s) => Statement::Sqlite(On::Pool(&s.pool), sqlx::query(sql)),
            Self::Postgres(s) => Statement::Postgres(On::Pool(&s.pool), sqlx::query(sql)),
        }
    }

    /// A pooled connection, for several reads on one.
    pub(super) async fn read(&self) -> Result<Pooled, sqlx::Error> {
        let conn = match self {
            Self::Sqlite(s) => PooledConn::Sqlite(s.pool.acquire().await?),
            Self::Postgres(s) => PooledConn::Postgres(s.pool.acquire().await?),
        };
        Ok(Pooled { conn, _gate: None })
    }

    /// A connection for one write statement: on SQLite it waits for the
    /// write gate first. Use it as a temporary,
    /// `self.write_conn().await?.query(...)`.
    pub(super) async fn write_conn(&self) -> Result<Pooled, sqlx::Error> {
        match self {
            Self::Sqlite(s) => {
                let gate = s.lock_writes().await;
                Ok(Pooled {
                    conn: PooledConn::Sqlite(s.pool.acquire().await?),
                    _gate: Some(gate),
                })
            }
            Self::Postgres(_) => self.read().await,
        }
    }

    /// A write transaction (on SQLite holding the write lock from its
    /// start, see `SqliteStore::begin_write`).
    pub(super) async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(s) => WriteTx::Sqlite(s.begin_write().await?),
            Self::Postgres(s) => WriteTx::Postgres(s.pool.begin().await?),
        })
    }

    /// Appended to a read of a row the transaction goes on to change, so
    /// that a group commit reading the same row waits for it. SQLite has no
    /// row locks: its write transaction holds the database's one write lock
    /// from its start, which is more.
    pub(super) fn row_lock(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "",
            Self::Postgres(_) => " FOR UPDATE",
        }
    }

    /// The type a JSON parameter is cast to for a JSON column: PostgreSQL
    /// stores `jsonb`, SQLite text.
    pub(super) fn json_type(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "TEXT",
            Self::Postgres(_) => "jsonb",
        }
    }

    /// Appended to a text column to compare byte by byte, as SQLite does
    /// by default, whatever PostgreSQL's locale: pages of ids are then the
    /// same on both.
    pub(super) fn bytewise(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "",
            Self::Postgres(_) => " COLLATE \"C\"",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What writing shared SQL once rests on: sqlx's SQLite driver binds
    /// `$N` to the N-th argument, also out of order and used twice.
    #[tokio::test]
    async fn sqlite_takes_numbered_placeholders() {
        let mut conn: SqliteConnection =
            sqlx::Connection::connect("sqlite::memory:").await.unwrap();
        let row = Conn::Sqlite(&mut conn)
            .query("SELECT $2, $1, $2 + $1")
            .bind(10_i64)
            .bind(3_i64)
            .fetch_one()
            .await
            .unwrap();
        let got: (i64, i64, i64) = (
            row.get(0).unwrap(),
            row.get(1).unwrap(),
            row.get(2).unwrap(),
        );
        assert_eq!(got, (3, 10, 13));
    }
}
