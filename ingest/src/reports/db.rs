//! A read-only connection to the database a server wrote, and the rows of
//! a report streamed from it.

use std::str::FromStr;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{
    Column, ConnectOptions, Connection, Decode, Executor, Row, Statement, TypeInfo, ValueRef,
};

use super::query::{Bind, Dialect, Sql};
use super::{ReportError, ReportName, ReportQuery, RowWriter, Value};
use crate::storage::Database;

/// The report's statement with its parameters bound, for either backend.
fn bound<'q, DB: sqlx::Database>(
    sql: &'q Sql,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sql.binds
        .iter()
        .fold(sqlx::query(&sql.text), |query, bind| match bind {
            Bind::Int(v) => query.bind(*v),
            Bind::Text(v) => query.bind(v.as_str()),
        })
}

fn connect_error(backend: &'static str) -> impl FnOnce(sqlx::Error) -> ReportError {
    move |error| ReportError::Connect { backend, error }
}

/// A read-only connection for reports. It never creates a database nor
/// changes its schema: SQLite is opened read-only and must exist; on
/// PostgreSQL every transaction is read-only
/// (`default_transaction_read_only`).
pub struct ReportDb(Conn);

/// One connection, of either backend.
enum Conn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

/// A report ready to run: its statement and its columns, known before the
/// first row (a report without rows still has a header).
#[derive(Debug, Clone)]
pub struct Report {
    name: ReportName,
    sql: Sql,
    columns: Vec<String>,
}

impl Report {
    pub fn name(&self) -> ReportName {
        self.name
    }

    /// The view's column names, in its order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }
}

impl ReportDb {
    pub async fn open(database: &Database) -> Result<Self, ReportError> {
        match database {
            Database::Sqlite { path } => {
                // Checked first: SQLite's own "unable to open database file"
                // does not say what to do.
                if !path.try_exists().unwrap_or(false) {
                    return Err(ReportError::MissingDatabase(path.clone()));
                }
                let connection = SqliteConnectOptions::new()
                    .filename(path)
                    .read_only(true)
                    .create_if_missing(false)
                    .busy_timeout(Duration::from_secs(10))
                    .disable_statement_logging()
                    .connect()
                    .await
                    .map_err(connect_error("SQLite"))?;
                Ok(Self(Conn::Sqlite(connection)))
            }
            Database::Postgres { url } => {
                let connection = PgConnectOptions::from_str(url)?
                    .options([("default_transaction_read_only", "on")])
                    .disable_statement_logging()
                    .connect()
                    .await
                    .map_err(connect_error("PostgreSQL"))?;
                Ok(Self(Conn::Postgres(connection)))
            }
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self.0 {
            Conn::Sqlite(_) => "sqlite",
            Conn::Postgres(_) => "postgres",
        }
    }

    pub async fn close(self) -> Result<(), ReportError> {
        match self.0 {
            Conn::Sqlite(c) => c.close().await?,
            Conn::Postgres(c) => c.close().await?,
        }
        Ok(())
    }

    /// Checks the query and that the database has the report's view, and
    /// learns the view's columns.
    pub async fn prepare(&mut self, query: &ReportQuery) -> Result<Report, ReportError> {
        query.check()?;
        if !self.has_view(query.name).await? {
            return Err(ReportError::MissingView(query.name));
        }
        let (sql, columns) = match &mut self.0 {
            Conn::Sqlite(c) => {
                let sql = query.sql(Dialect::Sqlite);
                let columns = column_names(c.prepare(&sql.text).await?.columns());
                (sql, columns)
            }
            Conn::Postgres(c) => {
                let sql = query.sql(Dialect::Postgres);
                let columns = column_names(c.prepare(&sql.text).await?.columns());
                (sql, columns)
            }
        };
        Ok(Report {
            name: query.name,
            sql,
            columns,
        })
    }

    /// The report's rows as the database sends them: nothing is collected.
    pub fn rows<'a>(
        &'a mut self,
        report: &'a Report,
    ) -> BoxStream<'a, Result<Vec<Value>, ReportError>> {
        match &mut self.0 {
            Conn::Sqlite(c) => bound::<sqlx::Sqlite>(&report.sql)
                .fetch(c)
                .map(|row| decode_row(&row?, sqlite_kind))
                .boxed(),
            Conn::Postgres(c) => bound::<sqlx::Postgres>(&report.sql)
                .fetch(c)
                .map(|row| decode_row(&row?, postgres_kind))
                .boxed(),
        }
    }

    /// Runs a report into a writer, row by row; returns how many rows it
    /// wrote.
    pub async fn run<W: RowWriter + ?Sized>(
        &mut self,
        query: &ReportQuery,
        out: &mut W,
    ) -> Result<u64, ReportError> {
        let report = self.prepare(query).await?;
        out.header(report.columns())?;
        let mut rows = self.rows(&report);
        let mut count = 0;
        while let Some(row) = rows.try_next().await? {
            out.row(&row)?;
            count += 1;
        }
        out.finish()?;
        Ok(count)
    }

    async fn has_view(&mut self, name: ReportName) -> Result<bool, ReportError> {
        Ok(match &mut self.0 {
            Conn::Sqlite(c) => {
                let n: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'view' AND name = ?",
                )
                .bind(name.view())
                .fetch_one(c)
                .await?;
                n > 0
            }
            Conn::Postgres(c) => {
                sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                    .bind(name.view())
                    .fetch_one(c)
                    .await?
            }
        })
    }
}

fn column_names<C: Column>(columns: &[C]) -> Vec<String> {
    columns.iter().map(|c| c.name().to_owned()).collect()
}

/// How a value is decoded, from the type the database reports for it.
#[derive(Debug, Clone, Copy)]
enum Kind {
    I64,
    I32,
    I16,
    F64,
    F32,
    Bool,
    Text,
}

/// SQLite: the type of each value (view columns computed by expressions
/// have no declared type, so the type is the stored value's, row by row).
fn sqlite_kind(type_name: &str) -> Option<Kind> {
    match type_name {
        "INTEGER" => Some(Kind::I64),
        "REAL" => Some(Kind::F64),
        "TEXT" => Some(Kind::Text),
        _ => None,
    }
}

/// PostgreSQL: the column's type.
fn postgres_kind(type_name: &str) -> Option<Kind> {
    match type_name {
        "INT8" => Some(Kind::I64),
        "INT4" => Some(Kind::I32),
        "INT2" => Some(Kind::I16),
        "FLOAT8" => Some(Kind::F64),
        "FLOAT4" => Some(Kind::F32),
        "BOOL" => Some(Kind::Bool),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => Some(Kind::Text),
        _ => None,
    }
}

fn decode_row<'r, R>(
    row: &'r R,
    kind_of: fn(&str) -> Option<Kind>,
) -> Result<Vec<Value>, ReportError>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    i64: Decode<'r, R::Database>,
    i32: Decode<'r, R::Database>,
    i16: Decode<'r, R::Database>,
    f64: Decode<'r, R::Database>,
    f32: Decode<'r, R::Database>,
    bool: Decode<'r, R::Database>,
    String: Decode<'r, R::Database>,
{
    let mut values = Vec::with_capacity(row.len());
    for index in 0..row.len() {
        let raw = row.try_get_raw(index)?;
        if raw.is_null() {
            values.push(Value::Null);
            continue;
        }
        let kind = {
            let type_info = raw.type_info();
            match kind_of(type_info.name()) {
                Some(kind) => kind,
                None => {
                    return Err(ReportError::UnsupportedType {
                        column: row.columns()[index].name().to_owned(),
                        type_name: type_info.name().to_owned(),
                    });
                }
            }
        };
        let decoded = match kind {
            Kind::I64 => i64::decode(raw).map(Value::Int),
            Kind::I32 => i32::decode(raw).map(|v| Value::Int(v.into())),
            Kind::I16 => i16::decode(raw).map(|v| Value::Int(v.into())),
            Kind::F64 => f64::decode(raw).map(Value::Float),
            Kind::F32 => f32::decode(raw).map(|v| Value::Float(v.into())),
            Kind::Bool => bool::decode(raw).map(|v| Value::Int(v.into())),
            Kind::Text => String::decode(raw).map(Value::Text),
        };
        values.push(decoded.map_err(|source| sqlx::Error::ColumnDecode {
            index: row.columns()[index].name().to_owned(),
            source,
        })?);
    }
    Ok(values)
}
