//! Connecting operator subcommands to a server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use telemetry_client::balance::Transport;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1::ops_client::OpsClient;

/// How operator subcommands reach the server.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The server's address: http://HOST:PORT, or https://HOST:PORT with
    /// --tls-ca. Several server processes: a,b,c (calls are balanced over
    /// those that answer).
    #[arg(long, env = "INGEST_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// File holding the ops token (used when INGEST_OPS_TOKEN is not set).
    #[arg(
        long,
        env = "INGEST_OPS_TOKEN_FILE",
        default_value = "./data/ops.token"
    )]
    ops_token_file: PathBuf,
    #[command(flatten)]
    tls: super::tls_args::ClientTlsArgs,
}

pub type Ops = OpsClient<tonic::service::interceptor::InterceptedService<Transport, Bearer>>;

impl ServerArgs {
    pub async fn ops(&self) -> anyhow::Result<Ops> {
        let token = match std::env::var("INGEST_OPS_TOKEN") {
            Ok(token) => token,
            Err(_) => std::fs::read_to_string(&self.ops_token_file).with_context(|| {
                format!(
                    "reading the ops token from {} (set INGEST_OPS_TOKEN or --ops-token-file)",
                    self.ops_token_file.display()
                )
            })?,
        };
        let bearer =
            Bearer::new(&token).context("the ops token has characters not allowed in a header")?;
        let channel = self.tls.connect_any(&self.server).await?;
        Ok(OpsClient::with_interceptor(channel, bearer))
    }
}
