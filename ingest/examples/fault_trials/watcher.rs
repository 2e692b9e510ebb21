//! An operator's WatchAlerts stream held through every kill: it reconnects
//! from the last event id it saw, so the ids it collects must be every
//! stored event once, in order. With several servers it reconnects to the
//! next one, so its cursor is resumed on another process.

use std::time::Duration;

use telemetry_client::bearer::Bearer;
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ops_client::OpsClient;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Event ids in the order received (heartbeats left out).
    pub ids: Vec<u64>,
    pub reconnects: u64,
}

pub type Ops = OpsClient<InterceptedService<Channel, Bearer>>;

/// An Ops client per server, connecting lazily (a server may be down);
/// `None` for a bad URL or token.
pub fn clients(urls: Vec<String>, ops_token: &str) -> Option<Vec<Ops>> {
    lazy_clients(urls, ops_token, OpsClient::with_interceptor)
}

/// A client per server with `token`, built by `client` on a channel that
/// connects lazily; `None` for a bad URL or token.
pub fn lazy_clients<C>(
    urls: Vec<String>,
    token: &str,
    client: impl Fn(Channel, Bearer) -> C,
) -> Option<Vec<C>> {
    let bearer = Bearer::new(token).ok()?;
    urls.into_iter()
        .map(|url| {
            let channel = Endpoint::from_shared(url)
                .ok()?
                .connect_timeout(Duration::from_millis(500))
                .connect_lazy();
            Some(client(channel, bearer.clone()))
        })
        .collect()
}

/// Watches until `stop` turns true; `last` publishes the newest id seen, so
/// the trial can wait for the watcher to catch up.
pub async fn run(
    urls: Vec<String>,
    ops_token: String,
    last: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::default();
    let Some(mut clients) = clients(urls, &ops_token) else {
        return seen;
    };
    let mut server = 0;
    let mut first = true;
    while !*stop.borrow() {
        if !first {
            seen.reconnects += 1;
            server = (server + 1) % clients.len();
        }
        first = false;
        let ops = &mut clients[server];
        let after = seen.ids.last().copied().unwrap_or(0);
        let request = pb::WatchAlertsRequest {
            after_event_id: after,
            ..Default::default()
        };
        let opened = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = ops.watch_alerts(request) => r,
        };
        if let Ok(response) = opened {
            let mut events = response.into_inner();
            loop {
                let message = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return seen,
                    m = events.message() => m,
                };
                match message {
                    Ok(Some(e)) if e.kind() == pb::AlertEventKind::Heartbeat => {}
                    Ok(Some(e)) => {
                        seen.ids.push(e.event_id);
                        last.send_replace(e.event_id);
                    }
                    // Ended or broken: the server went away.
                    Ok(None) | Err(_) => break,
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    seen
}
