//! Connecting operator subcommands to a server: its address, the ops
//! token and where it came from, and errors that say what to do.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use telemetry_client::balance::Transport;
use telemetry_client::bearer::Bearer;
use telemetry_proto::v1::ops_client::OpsClient;
use tower::ServiceExt;

use telemetry_client::ops_token::{OpsTokenSource, client_token};

/// How operator subcommands reach the server.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The server's address: http://HOST:PORT, or https://HOST:PORT with
    /// --tls-ca. Several server processes: a,b,c (calls are balanced over
    /// those that answer).
    #[arg(long, env = "INGEST_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// The ops token: a file of `NAME TOKEN` lines (the first is used), a
    /// bare token, or a directory of token files, as `serve` reads it. This
    /// flag wins over INGEST_OPS_TOKEN (the token itself), which wins over
    /// INGEST_OPS_TOKEN_FILE; with none, <data-dir>/ops.token. [env:
    /// INGEST_OPS_TOKEN, INGEST_OPS_TOKEN_FILE]
    #[arg(long)]
    ops_token_file: Option<PathBuf>,
    /// The server's data directory, where it wrote ops.token.
    #[arg(long, env = "INGEST_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    #[command(flatten)]
    tls: super::tls_args::ClientTlsArgs,
}

pub type Ops = OpsClient<tonic::service::interceptor::InterceptedService<Transport, Bearer>>;

impl ServerArgs {
    pub async fn ops(&self) -> anyhow::Result<Ops> {
        let source = OpsTokenSource::choose(self.ops_token_file.clone(), &self.data_dir);
        let (token, origin) = client_token(&source)?;
        let bearer = Bearer::new(&token).with_context(|| format!("the ops token from {origin}"))?;
        let channel = self
            .tls
            .connect_any(&self.server)
            .await
            .map_err(|error| no_server(error, &self.server))?;
        Ok(OpsClient::with_interceptor(
            says_where_the_token_came_from(channel, origin),
            bearer,
        ))
    }

    /// Connects and makes one Ops call: its answer, or its error as the
    /// CLI prints it.
    pub async fn call<T>(
        &self,
        call: impl AsyncFnOnce(&mut Ops) -> Result<tonic::Response<T>, tonic::Status>,
    ) -> anyhow::Result<T> {
        let mut ops = self.ops().await?;
        super::output::reply(call(&mut ops).await)
    }
}

/// No server answered at the address: said once, with the likely cause
/// and the flags that set it (the transport's own text repeats itself).
#[derive(Debug, thiserror::Error)]
#[error(
    "no ingest server at {server} ({cause}): is `ingest serve` running there? \
     (set the address with --server or INGEST_SERVER)"
)]
pub struct NoServer {
    server: String,
    cause: String,
}

/// A connection that could not be made: with a refused or unreachable
/// address, [`NoServer`]; anything else (TLS, a bad address) as it was.
fn no_server(error: anyhow::Error, server: &str) -> anyhow::Error {
    let unreachable = error.chain().find_map(|e| {
        e.downcast_ref::<std::io::Error>().filter(|io| {
            use std::io::ErrorKind::*;
            matches!(
                io.kind(),
                ConnectionRefused | HostUnreachable | NetworkUnreachable | TimedOut
            )
        })
    });
    match unreachable {
        Some(io) => NoServer {
            server: server.to_owned(),
            cause: io.kind().to_string(),
        }
        .into(),
        None => error,
    }
}

/// Adds to an UNAUTHENTICATED answer where the refused token came from, so
/// the operator knows which file or variable to fix. The server answers
/// a refused call with its status in the headers (no body), which is
/// where this looks.
fn says_where_the_token_came_from(transport: Transport, origin: String) -> Transport {
    Transport::new(transport.map_response(move |mut response| {
        if let Some(status) = tonic::Status::from_header_map(response.headers())
            && status.code() == tonic::Code::Unauthenticated
        {
            let explained = tonic::Status::unauthenticated(format!(
                "{} (this command's token came from {origin})",
                status.message()
            ));
            let headers = response.headers_mut();
            headers.remove("grpc-message");
            // Only fails for headers tonic cannot write; the original
            // status then stays.
            let _ = explained.add_header(headers);
        }
        response
    }))
}

/// Why one call of a long stream (an export, a tail) stopped.
pub(super) enum StreamFailure {
    Status(tonic::Status),
    Write(std::io::Error),
}

/// When a long stream resumes after a failure, and when it gives up: at
/// most `MAX_ATTEMPTS` failed calls in a row with nothing received in
/// between, each after a backoff (honouring the server's RetryInfo).
pub(super) struct Resumes {
    backoff: telemetry_client::backoff::Backoff,
    rng: rand::rngs::ThreadRng,
    failures: u32,
}

impl Resumes {
    const MAX_ATTEMPTS: u32 = 8;

    pub(super) fn new() -> Self {
        Self {
            backoff: telemetry_client::backoff::Backoff::default(),
            rng: rand::rng(),
            failures: 0,
        }
    }

    /// The delay before resuming after `status`, or the error to give up
    /// with: a status not worth retrying, or too many failures in a row.
    /// `progressed`: the failed call received something, which starts the
    /// count over. `from` says where it resumes, for the line on stderr.
    pub(super) fn after(
        &mut self,
        status: tonic::Status,
        progressed: bool,
        from: &str,
    ) -> anyhow::Result<std::time::Duration> {
        if !telemetry_client::status::is_retryable(&status) {
            return Err(super::output::status_error(status));
        }
        if progressed {
            self.backoff.reset();
            self.failures = 0;
        }
        self.failures += 1;
        if self.failures > Self::MAX_ATTEMPTS {
            return Err(super::output::status_error(status));
        }
        let delay = self.backoff.next_delay_after(&status, &mut self.rng);
        eprintln!(
            "{:?}: {}; resuming {from} in {delay:?}",
            status.code(),
            status.message()
        );
        Ok(delay)
    }
}
