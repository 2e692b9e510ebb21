//! `--local-server`: the whole system in one command. The real ingest
//! server starts in this process, the fleet runs against it, and the demo
//! shows what the system does: alerts fire and resolve (with
//! `--anomalies`, as against any server: `fleet/alerts.rs`), and halfway
//! through a command changes every device.

mod command;

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use crate::fleet;
use crate::server::local::LocalServer;

/// Runs the fleet against a server started on `listen` with its data in
/// `data_dir`, then stops the server and says where the data is.
pub async fn run(
    mut config: Config,
    data_dir: &Path,
    listen: SocketAddr,
) -> anyhow::Result<ExitCode> {
    let server = LocalServer::start(data_dir, listen).await?;
    config.servers = vec![server.url.clone()];
    config.ops_token = Some(server.ops_token.clone());
    let devices = (1..=config.devices).map(|n| config.device_id(n)).collect();
    let halfway = config.duration.map_or(Duration::from_secs(15), |d| d / 2);
    let command = command::start(
        server.url.clone(),
        server.ops_token.clone(),
        devices,
        config.sample_rate,
        halfway,
    );
    let code = fleet::run(config).await;
    command.abort();
    let database = server.database.clone();
    server.stop().await?;
    println!(
        "  stored in         {} (SQLite; try: sqlite3 {} 'SELECT COUNT(*) FROM readings')",
        database.display(),
        database.display()
    );
    code
}
