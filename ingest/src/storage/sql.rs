//! One SQL text, run on either backend.
//!
//! Most of our SQL reads the same on SQLite and PostgreSQL, placeholders
//! included: both take `$1, $2, ...` (sqlx's SQLite driver binds `$N` to the
//! N-th argument). So a query that is the same on both is written once, as
//! an ordinary method of [`Store`](super::Store) (or a function taking a
//! [`Conn`], when it also runs inside the group commit's transaction), and
//! runs through the small types here, which pick the driver statement by
//! statement:
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
//! `postgres.rs` and `sqlite.rs`. The connections a shared query runs on
//! (`Store::query` for reads, `write_conn`, `begin_write`) and the few words
//! of SQL that differ inside an otherwise shared query (`Store::row_lock`,
//! `json_type`, `bytewise`) are in `mod.rs`, beside [`Store`](super::Store).
//!
//! Why not `sqlx::Any`: it needs pools of its own, so a shared query could
//! not run inside the group commit's transaction nor behind SQLite's write
//! gate, and it knows neither PostgreSQL's arrays nor COPY.

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgPool, PgRow};
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqlitePool, SqliteRow};
use sqlx::{
    Database, Decode, Encode, PgConnection, Pool, Postgres, Sqlite, SqliteConnection, Type,
};

use super::StorageError;

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

/// `$1, $2, ..., $n`: the placeholders of an `IN (...)` list of `n` values.
pub(super) fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A connection of either backend, borrowed for some statements: a pooled
/// one, a write transaction's, or the group commit's.
pub(super) enum Conn<'c> {
    Sqlite(&'c mut SqliteConnection),
    Postgres(&'c mut PgConnection),
}

impl<'c> Conn<'c> {
    /// A statement that runs on this connection and ends the borrow: how a
    /// holder of a connection (`Pooled`, `WriteTx`) lends it to one
    /// statement at a time (`tx.query(..)`).
    pub(super) fn into_query<'q>(self, sql: &'q str) -> Statement<'c, 'q> {
        match self {
            Self::Sqlite(c) => Statement::Sqlite(On::Conn(c), sqlx::query(sql)),
            Self::Postgres(c) => Statement::Postgres(On::Conn(c), sqlx::query(sql)),
        }
    }

    /// A statement on this connection, which stays usable after it.
    pub(super) fn query<'q>(&mut self, sql: &'q str) -> Statement<'_, 'q> {
        let conn = match self {
            Self::Sqlite(c) => Conn::Sqlite(c),
            Self::Postgres(c) => Conn::Postgres(c),
        };
        conn.into_query(sql)
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

    /// Every row, each decoded by `decode`.
    pub(super) async fn fetch_all_as<T>(
        self,
        decode: fn(&Row) -> Result<T, StorageError>,
    ) -> Result<Vec<T>, StorageError> {
        self.fetch_all().await?.iter().map(decode).collect()
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
