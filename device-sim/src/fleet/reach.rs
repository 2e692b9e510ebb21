//! Is anything listening at `--server`? Asked once at the start, so that a
//! wrong address or a server that is not running is said plainly before
//! the devices' retries and a report of zeros. The run goes on either way:
//! a server that comes up late is still reached (channels connect lazily
//! and every device retries with backoff).

use std::time::Duration;

use tokio::net::TcpStream;
use tonic::transport::Uri;

/// How long a TCP connect may take before the server counts as absent.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// One line per server of `servers` that nothing answers at, saying what
/// to check.
pub async fn unreachable(servers: &[String]) -> Vec<String> {
    let probes = servers.iter().map(|server| async move {
        probe(server)
            .await
            .err()
            .map(|cause| no_server_message(server, &cause))
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

fn no_server_message(server: &str, cause: &str) -> String {
    format!(
        "no ingest server at {server} ({cause}): is `ingest serve` running? (--server, \
         DEVICE_SIM_SERVER); the devices keep retrying with backoff"
    )
}

/// Opens (and drops) one TCP connection to `server`; `Err` says why not.
async fn probe(server: &str) -> Result<(), String> {
    let uri: Uri = server.parse().map_err(|e| format!("not a URL: {e}"))?;
    let host = uri.host().ok_or("no host in the URL")?;
    // A bracketed IPv6 literal is given back with its brackets.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    match tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect((host, port))).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err("connection refused".into())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_elapsed) => Err(format!(
            "no answer to a TCP connect within {} s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_named_with_what_to_check() {
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let listening = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = format!("http://{}", listening.local_addr().expect("addr"));
        let closed = format!("http://{closed}");

        let messages = unreachable(&[open, closed.clone()]).await;
        assert_eq!(
            messages,
            [format!(
                "no ingest server at {closed} (connection refused): is `ingest serve` running? \
                 (--server, DEVICE_SIM_SERVER); the devices keep retrying with backoff"
            )]
        );
    }
}
