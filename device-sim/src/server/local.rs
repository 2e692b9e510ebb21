//! `--local-server`: the real ingest server, started in this process, so
//! that one command runs the whole system with nothing to set up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ingest::auth::{OpsTokenSource, resolve_ops_token};
use ingest::storage::Database;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct LocalServer {
    pub url: String,
    pub ops_token: String,
    pub database: PathBuf,
    /// The server's admin listener: /metrics, /healthz, /readyz (printed
    /// at start; tests scrape it).
    #[cfg_attr(not(test), allow(dead_code))]
    pub admin: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl LocalServer {
    pub async fn start(data_dir: &Path, listen: SocketAddr) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        // Resolved here rather than by the server, so the fleet has the
        // token before the server has finished starting.
        let token = resolve_ops_token(&OpsTokenSource::Generated {
            data_dir: data_dir.to_owned(),
        })?;
        let database = data_dir.join("telemetry.db");
        let config = ingest::Config::new(
            data_dir.to_owned(),
            Database::Sqlite {
                path: database.clone(),
            },
            OpsTokenSource::Value(token.clone()),
        );
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen} for the local server (use --listen)"))?;
        let addr = listener.local_addr()?;
        // Beside it, on a port of its own: several demos may run at once.
        let admin_listener = tokio::net::TcpListener::bind((addr.ip(), 0)).await?;
        let admin = admin_listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ingest::server::run_with_admin(
            config,
            listener,
            Some(admin_listener),
            async {
                let _ = stopped.await;
            },
        ));
        eprintln!(
            "local ingest server on http://{addr}, metrics on http://{admin}/metrics, data in {} (ops token in {})",
            data_dir.display(),
            data_dir.join("ops.token").display()
        );
        Ok(Self {
            url: format!("http://{addr}"),
            ops_token: token.expose().to_owned(),
            database,
            admin,
            stop,
            task,
        })
    }

    /// Shuts the server down gracefully and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("the local server panicked")?
    }
}
