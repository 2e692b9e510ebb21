//! TLS flags: the server's (`ingest serve`) and the clients' (operator
//! subcommands). The client's certificate flags have their own variables,
//! `INGEST_CLIENT_TLS_*`, so a shell that runs the server with
//! `INGEST_TLS_CERT` set does not make the CLI present the server's
//! certificate.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use tonic::transport::Endpoint;

use telemetry_client::balance::{Transport, balanced, single};
use telemetry_client::tls::{ClientTls, server_list};

use crate::transport::{ClientAuth, TlsSettings};

#[derive(Debug, Args)]
pub struct ServeTlsArgs {
    /// PEM file: the server's certificate, then its intermediates. With
    /// --tls-key, the server speaks TLS only; it reloads both on SIGHUP and
    /// when they change.
    #[arg(long, env = "INGEST_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// PEM file: the private key of --tls-cert.
    #[arg(long, env = "INGEST_TLS_KEY", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// PEM file: the CA certificates (one or several) that sign client
    /// certificates, for mutual TLS. Reloaded with the certificate.
    #[arg(long, env = "INGEST_TLS_CLIENT_CA", value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
    /// Whether clients must present a certificate signed by
    /// --tls-client-ca [default: require with --tls-client-ca, else none].
    #[arg(long, env = "INGEST_TLS_CLIENT_AUTH", value_enum)]
    tls_client_auth: Option<ClientAuth>,
}

impl ServeTlsArgs {
    pub fn into_settings(self) -> anyhow::Result<Option<TlsSettings>> {
        let (cert, key) = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) => {
                if self.tls_client_ca.is_some() || self.tls_client_auth.is_some() {
                    bail!(
                        "--tls-client-ca and --tls-client-auth need TLS: give --tls-cert and --tls-key too"
                    );
                }
                return Ok(None);
            }
            _ => bail!(
                "--tls-cert and --tls-key go together: give both to serve TLS, or neither to serve plaintext"
            ),
        };
        let mut settings = TlsSettings::new(cert, key);
        let mode = self.tls_client_auth.unwrap_or(match self.tls_client_ca {
            Some(_) => ClientAuth::Require,
            None => ClientAuth::None,
        });
        settings.client_ca = self.tls_client_ca;
        settings.client_auth = mode;
        settings.check()?;
        Ok(Some(settings))
    }
}

/// How an operator subcommand reaches an `https://` server.
#[derive(Debug, Args)]
pub struct ClientTlsArgs {
    /// PEM file: the CA that signed the server's certificate (for https://
    /// addresses; system roots are not used).
    #[arg(long, env = "INGEST_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// PEM file: a client certificate, when the server requires mutual TLS.
    #[arg(long, env = "INGEST_CLIENT_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// PEM file: the private key of --tls-cert.
    #[arg(long, env = "INGEST_CLIENT_TLS_KEY", value_name = "PEM")]
    tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    pub fn client_tls(&self) -> ClientTls {
        ClientTls {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }

    /// A connected channel to `url`.
    pub async fn connect(&self, url: &str) -> anyhow::Result<tonic::transport::Channel> {
        connect_one(self.client_tls().endpoint(url)?, url).await
    }

    /// The servers of a `--server` value: one address connects as
    /// [`ClientTlsArgs::connect`]; several are each connected to at once,
    /// and calls are balanced ([`balanced`]) over those that answered, so
    /// a command works while one of them is down. Fails only when none
    /// answers, with every reason.
    pub async fn connect_any(&self, servers: &str) -> anyhow::Result<Transport> {
        let list = server_list(servers)?;
        let endpoints = self.client_tls().endpoints(&list)?;
        if let ([url], [endpoint]) = (&list[..], &endpoints[..]) {
            return Ok(single(connect_one(endpoint.clone(), url).await?));
        }
        let tries = endpoints
            .into_iter()
            .zip(&list)
            .map(|(endpoint, url)| async move {
                // A black-holed address would otherwise hold the command for the
                // system's TCP timeout, minutes, while the others answered.
                connect_one(endpoint.connect_timeout(CONNECT_TIMEOUT), url).await
            });
        let mut live = Vec::new();
        let mut failures = Vec::new();
        for connected in futures::future::join_all(tries).await {
            match connected {
                Ok(channel) => live.push(channel),
                Err(error) => failures.push(error),
            }
        }
        if live.is_empty() {
            let others: Vec<String> = failures[1..].iter().map(|e| format!("{e:#}")).collect();
            let first = failures.swap_remove(0);
            // The first error stays the source, so callers can still tell a
            // transport failure from a bad argument.
            return Err(first.context(format!(
                "no server of {servers} answered (also: {})",
                others.join("; ")
            )));
        }
        for failure in &failures {
            tracing::warn!("{failure:#}; using the other servers");
        }
        Ok(balanced(live))
    }
}

/// How long one of several servers gets to accept a connection.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn connect_one(endpoint: Endpoint, url: &str) -> anyhow::Result<tonic::transport::Channel> {
    let hint = match endpoint.uri().scheme_str() {
        Some("https") => {
            " (TLS: --tls-ca must hold the CA that signed the server's certificate, and a server that requires client certificates needs --tls-cert and --tls-key)"
        }
        _ => "",
    };
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {url}{hint}"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        tls: ServeTlsArgs,
    }

    fn settings(args: &[&str]) -> anyhow::Result<Option<TlsSettings>> {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)?.tls.into_settings()
    }

    #[test]
    fn both_or_neither_of_certificate_and_key() {
        assert!(settings(&[]).unwrap().is_none());
        assert!(
            settings(&["--tls-cert", "c.pem", "--tls-key", "k.pem"])
                .unwrap()
                .is_some()
        );
        let error = settings(&["--tls-cert", "c.pem"]).unwrap_err().to_string();
        assert!(error.contains("go together"), "{error}");
        assert!(settings(&["--tls-key", "k.pem"]).is_err());
        assert!(settings(&["--tls-client-ca", "ca.pem"]).is_err());
    }

    #[test]
    fn client_auth_defaults_to_require_with_a_ca() {
        let base = ["--tls-cert", "c.pem", "--tls-key", "k.pem"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            settings(&args)
        };
        assert_eq!(with(&[]).unwrap().unwrap().client_auth, ClientAuth::None);
        let mtls = with(&["--tls-client-ca", "ca.pem"]).unwrap().unwrap();
        assert_eq!(mtls.client_auth, ClientAuth::Require);
        let optional = with(&["--tls-client-ca", "ca.pem", "--tls-client-auth", "optional"]);
        assert_eq!(optional.unwrap().unwrap().client_auth, ClientAuth::Optional);
        for mode in ["optional", "require"] {
            let error = with(&["--tls-client-auth", mode]).unwrap_err().to_string();
            assert!(error.contains("needs --tls-client-ca"), "{error}");
        }
        assert!(with(&["--tls-client-auth", "none"]).unwrap().is_some());
    }
}
