//! Test harness: the real server on 127.0.0.1:0, real HTTP/2 clients, real
//! databases (a temporary SQLite file; a fresh PostgreSQL database per test).

#![allow(dead_code)]

pub mod admin;
pub mod alert_helpers;
pub mod cluster;
pub mod control;
pub mod pki;
mod readings;
mod wait;

pub use control::ControlDevice;
pub use readings::*;
// Not every test target polls.
#[allow(unused_imports)]
pub use wait::{eventually, eventually_ok};

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use ingest::auth::OpsTokenSource;
use ingest::domain::Token;
use ingest::storage::Database;
use ingest::{Config, Limits};
pub use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ingest_client::IngestClient;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Runs an async test body once per backend: `backend_tests!(name, ...)`
/// expands to `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await;
                }
            )*
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub type Ops = OpsClient<InterceptedService<Channel, Bearer>>;
pub type Ingest = IngestClient<InterceptedService<Channel, Bearer>>;

/// Storage that outlives a server, so a test can restart on the same data.
pub struct TestStorage {
    pub data_dir: tempfile::TempDir,
    pub database: Database,
    pg: Option<PgTestDb>,
}

impl TestStorage {
    /// `None` when PostgreSQL is not reachable and not required: the test
    /// is skipped, loudly.
    pub async fn new(backend: Backend) -> Option<Self> {
        let data_dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => Some(Self {
                database: Database::Sqlite {
                    path: data_dir.path().join("telemetry.db"),
                },
                data_dir,
                pg: None,
            }),
            Backend::Postgres => {
                let pg = PgTestDb::create().await?;
                Some(Self {
                    database: Database::Postgres {
                        url: pg.url.clone(),
                    },
                    data_dir,
                    pg: Some(pg),
                })
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self.database {
            Database::Sqlite { .. } => Backend::Sqlite,
            Database::Postgres { .. } => Backend::Postgres,
        }
    }

    /// A direct connection for checking what is stored.
    pub async fn count_readings(&self) -> i64 {
        self.scalar("SELECT COUNT(*) FROM readings").await
    }

    /// Runs statements (several, separated by `;`) directly.
    pub async fn execute(&self, sql: &str) {
        match &self.database {
            Database::Sqlite { path } => {
                let url = format!("sqlite://{}", path.display());
                let mut conn: sqlx::SqliteConnection =
                    sqlx::Connection::connect(&url).await.unwrap();
                sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
            }
            Database::Postgres { url } => {
                let mut conn: sqlx::PgConnection = sqlx::Connection::connect(url).await.unwrap();
                sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
            }
        }
    }

    /// Makes every insert into `table` fail while `fail_inserts` holds a
    /// row: the database refusing a write, the way a full disk or a lost
    /// connection does, at a moment the test chooses.
    pub async fn install_insert_failure(&self, table: &str) {
        let sql = match &self.database {
            Database::Sqlite { .. } => format!(
                "CREATE TABLE IF NOT EXISTS fail_inserts (x INTEGER); \
                 CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} \
                 WHEN EXISTS (SELECT 1 FROM fail_inserts) \
                 BEGIN SELECT RAISE(ABORT, 'injected failure'); END;"
            ),
            Database::Postgres { .. } => format!(
                "CREATE TABLE IF NOT EXISTS fail_inserts (x INTEGER); \
                 CREATE OR REPLACE FUNCTION fail_inserts() RETURNS trigger AS $$ \
                 BEGIN IF EXISTS (SELECT 1 FROM fail_inserts) THEN \
                 RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql; \
                 CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} \
                 FOR EACH ROW EXECUTE FUNCTION fail_inserts();"
            ),
        };
        self.execute(&sql).await;
    }

    pub async fn set_insert_failure(&self, failing: bool) {
        self.execute(if failing {
            "INSERT INTO fail_inserts VALUES (1)"
        } else {
            "DELETE FROM fail_inserts"
        })
        .await;
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        match &self.database {
            Database::Sqlite { path } => {
                let url = format!("sqlite://{}", path.display());
                let mut conn: sqlx::SqliteConnection =
                    sqlx::Connection::connect(&url).await.unwrap();
                sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
            }
            Database::Postgres { url } => {
                let mut conn: sqlx::PgConnection = sqlx::Connection::connect(url).await.unwrap();
                sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
            }
        }
    }
}

pub const OPS_TOKEN: &str = "ops_test_token";

/// Changes a test server's configuration; kept for restarts.
pub type Configure = std::sync::Arc<dyn Fn(&mut Config) + Send + Sync>;

/// A running server.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    /// The admin listener: /metrics, /healthz, /readyz.
    pub admin_addr: std::net::SocketAddr,
    /// The MQTT listener.
    pub mqtt_addr: std::net::SocketAddr,
    pub storage: TestStorage,
    pub limits: Limits,
    configure: Option<Configure>,
    /// Set by `start_tls`: the server's own clients use TLS.
    pub tls: Option<pki::ClientSide>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> Option<Self> {
        Self::start_with(backend, Limits::default()).await
    }

    pub async fn start_with(backend: Backend, limits: Limits) -> Option<Self> {
        let storage = TestStorage::new(backend).await?;
        Some(Self::start_on(storage, limits, None).await)
    }

    /// Starts with a configuration changed by `configure`.
    pub async fn start_configured(
        backend: Backend,
        configure: impl Fn(&mut Config) + Send + Sync + 'static,
    ) -> Option<Self> {
        let storage = TestStorage::new(backend).await?;
        Some(
            Self::start_on(
                storage,
                Limits::default(),
                Some(std::sync::Arc::new(configure)),
            )
            .await,
        )
    }

    pub async fn start_on(
        storage: TestStorage,
        limits: Limits,
        configure: Option<Configure>,
    ) -> Self {
        // TEST_LOG=info (a RUST_LOG filter) shows the servers' logs.
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = Config::new(
            storage.data_dir.path().to_owned(),
            storage.database.clone(),
            OpsTokenSource::Value(Token::new(OPS_TOKEN.into())),
        );
        config.limits = limits.clone();
        if let Some(configure) = &configure {
            configure(&mut config);
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let mqtt = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mqtt_addr = mqtt.local_addr().unwrap();
        let task = tokio::spawn(ingest::server::run_with_listeners(
            config,
            ingest::server::Listeners {
                grpc: listener,
                admin: Some(admin),
                mqtt: Some(mqtt),
            },
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            admin_addr,
            mqtt_addr,
            storage,
            limits,
            configure,
            tls: None,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Sends the shutdown signal and waits until the server has stopped.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Stops the server and starts a new one on the same storage.
    pub async fn restart(mut self) -> Self {
        self.stop().await;
        let storage = std::mem::replace(&mut self.storage, TestStorage::placeholder());
        let mut server = Self::start_on(storage, self.limits.clone(), self.configure.clone()).await;
        server.tls = self.tls.take();
        server
    }

    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    pub async fn channel(&self) -> Channel {
        let endpoint = Channel::from_shared(self.url()).unwrap();
        let endpoint = match &self.tls {
            Some(side) => endpoint
                .tls_config(side.config(side.identity.as_ref()))
                .unwrap(),
            None => endpoint,
        };
        endpoint.connect().await.unwrap()
    }

    pub async fn ops(&self) -> Ops {
        OpsClient::with_interceptor(self.channel().await, Bearer::new(OPS_TOKEN).unwrap())
    }

    pub async fn ops_with(&self, bearer: Bearer) -> Ops {
        OpsClient::with_interceptor(self.channel().await, bearer)
    }

    pub async fn ingest(&self, token: &str) -> Ingest {
        IngestClient::with_interceptor(self.channel().await, Bearer::new(token).unwrap())
    }

    pub async fn ingest_with(&self, bearer: Bearer) -> Ingest {
        IngestClient::with_interceptor(self.channel().await, bearer)
    }

    /// Registers a device and returns its token.
    pub async fn register(&self, device_id: &str) -> String {
        self.ops()
            .await
            .register_device(pb::RegisterDeviceRequest {
                device_id: device_id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    /// Ops GetDevice of a device that must exist.
    pub async fn device(&self, device_id: &str) -> pb::Device {
        self.ops()
            .await
            .get_device(pb::GetDeviceRequest {
                device_id: device_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl TestStorage {
    /// Storage for another server process on the same database (its own
    /// data directory), as several `ingest serve` share one PostgreSQL.
    /// The database stays with `self`.
    pub fn beside(&self) -> Self {
        Self {
            data_dir: tempfile::tempdir().unwrap(),
            database: self.database.clone(),
            pg: None,
        }
    }

    fn placeholder() -> Self {
        Self {
            data_dir: tempfile::tempdir().unwrap(),
            database: Database::Sqlite {
                path: PathBuf::new(),
            },
            pg: None,
        }
    }
}

/// A fresh PostgreSQL database, dropped with the value.
struct PgTestDb {
    admin_url: String,
    name: String,
    url: String,
}

impl PgTestDb {
    async fn create() -> Option<Self> {
        let admin_url = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let required = std::env::var("REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        let mut admin: sqlx::PgConnection = match sqlx::Connection::connect(&admin_url).await {
            Ok(conn) => conn,
            Err(e) if required => {
                panic!("REQUIRE_POSTGRES=1 but PostgreSQL at {admin_url} is unreachable: {e}")
            }
            Err(e) => {
                eprintln!(
                    "\n!!!!!!!! SKIPPED: PostgreSQL at {admin_url} is unreachable ({e}).\n\
                     !!!!!!!! Set TEST_DATABASE_URL, or REQUIRE_POSTGRES=1 to make this a failure.\n"
                );
                return None;
            }
        };
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ingest_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand_suffix()
        );
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let url = with_database(&admin_url, &name);
        Some(Self {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on async
        // work: use a runtime of our own on another thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut admin) = sqlx::Connection::connect(&admin_url).await {
                    let admin: &mut sqlx::PgConnection = &mut admin;
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(admin)
                        .await;
                }
            });
        })
        .join();
    }
}

fn rand_suffix() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

/// `postgres://u@h:p/db?x` with `db` replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{}{}", &base[..host_end], name, query)
}

/// What a run of the `ingest` binary printed.
pub struct CliRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the real `ingest` binary with `args`, with the test ops token and
/// none of the environment's settings that would point it elsewhere.
pub async fn ingest_cli(args: Vec<String>) -> CliRun {
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ingest"))
            .args(&args)
            .env("INGEST_OPS_TOKEN", OPS_TOKEN)
            .env_remove("INGEST_SERVER")
            .env_remove("INGEST_DATABASE_URL")
            .env_remove("INGEST_DATA_DIR")
            // Tables at full width, to check their values; the operator_cli
            // tests check that they fit 80 columns.
            .env("COLUMNS", "250")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        CliRun {
            success: output.status.success(),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    })
    .await
    .unwrap()
}

impl TestServer {
    /// `ingest ARGS... --server URL` against this server, as an operator
    /// runs it.
    pub async fn operator_cli(&self, args: &[&str]) -> CliRun {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.extend(["--server".into(), self.url()]);
        ingest_cli(all).await
    }
}
