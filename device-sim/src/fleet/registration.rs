//! Devices the server does not know yet: registered through the ops token,
//! their tokens saved before anything else can go wrong.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use telemetry_client::backoff::Backoff;
use telemetry_client::balance::Transport;
use telemetry_client::bearer::Bearer;
use telemetry_client::ops_token::client_token;
use telemetry_client::status::is_transient;
use telemetry_proto::v1::ops_client::OpsClient;
use telemetry_proto::v1::{RegisterDeviceRequest, RegisterDevicesRequest};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tracing::debug;

use super::credentials;
use crate::config::Config;
use crate::device::client::describe;
use crate::device::sampling::device_seed;
use crate::report::DeviceFailure;
use crate::shutdown::Shutdown;

type OpsApi = OpsClient<InterceptedService<Transport, Bearer>>;

/// Devices per RegisterDevices call: one transaction each, far below the
/// server's default limit of 10,000 and its 4 MiB message limit.
const REGISTER_CHUNK: usize = 1000;
/// RegisterDevices calls in flight: the database takes one at a time, so a
/// second only hides the network's round trip.
const CHUNKS_IN_FLIGHT: usize = 2;
/// Single registrations in flight at once, where a chunk falls back to
/// them: enough to be quick without queueing thousands of calls on one
/// connection.
const REGISTER_CONCURRENCY: usize = 32;
/// Attempts per registration while the server is unreachable; with the
/// default backoff this waits out roughly half a minute of server start-up.
const REGISTER_ATTEMPTS: u32 = 12;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The label every simulated device is registered with; the demo alert
/// rules select on it.
pub const FLEET_LABEL: (&str, &str) = ("fleet", "sim");
/// Sites a simulated device is spread over, for label-based alert rules.
const SITES: [&str; 4] = ["plant-1", "plant-2", "warehouse-north", "lab"];

/// Loads stored tokens and registers every device that has none, saving the
/// new tokens before anything else can go wrong. Returns the credentials and
/// the devices that could not be registered.
pub async fn ensure_credentials(
    config: &Config,
    channel: &Transport,
    shutdown: &Shutdown,
) -> anyhow::Result<(credentials::Credentials, Vec<DeviceFailure>)> {
    let mut credentials = credentials::load(&config.credentials_file)?;
    let missing: Vec<String> = (1..=config.devices)
        .map(|n| config.device_id(n))
        .filter(|id| !credentials.contains_key(id))
        .collect();
    if missing.is_empty() {
        return Ok((credentials, Vec::new()));
    }

    // Only needed now: a fleet that is fully registered runs without it.
    let ops_token = read_ops_token(config)?;
    let mut client = OpsClient::with_interceptor(
        channel.clone(),
        Bearer::new(&ops_token).context("the ops token")?,
    );
    if let Some(encoding) = config.compression.encoding() {
        client = client.send_compressed(encoding).accept_compressed(encoding);
    }
    if !config.quiet {
        eprintln!("registering {} device(s)...", missing.len());
    }
    // Whole chunks in one call and one transaction each; a chunk the
    // server refuses as a whole (an id taken, an older server without
    // RegisterDevices) is registered device by device, which says which
    // devices failed and why.
    let chunks: Vec<Vec<String>> = missing
        .chunks(REGISTER_CHUNK)
        .map(<[String]>::to_vec)
        .collect();
    let results: Vec<(String, Registration)> = futures::stream::iter(chunks)
        .map(|ids| {
            register_chunk(
                client.clone(),
                ids,
                &config.credentials_file,
                shutdown.clone(),
            )
        })
        .buffer_unordered(CHUNKS_IN_FLIGHT)
        .flat_map(futures::stream::iter)
        .collect()
        .await;

    let mut failures = Vec::new();
    let mut registered = 0usize;
    let mut ops_rejected = None;
    for (device_id, registration) in results {
        match registration {
            Registration::Token(token) => {
                credentials.insert(device_id, token);
                registered += 1;
            }
            Registration::Failed(reason) => failures.push(DeviceFailure { device_id, reason }),
            Registration::Interrupted => failures.push(DeviceFailure {
                device_id,
                reason: "registration interrupted by shutdown".into(),
            }),
            Registration::OpsTokenRejected(reason) => {
                ops_rejected.get_or_insert(reason);
            }
        }
    }
    if registered > 0 {
        // Tokens cannot be fetched again, so they are saved before any other
        // error can end the run.
        credentials::save(&config.credentials_file, &credentials).with_context(|| {
            format!(
                "saving {registered} new device token(s); those devices are registered but \
                 their tokens are lost"
            )
        })?;
    }
    if let Some(reason) = ops_rejected {
        bail!(
            "the server rejected the ops token ({reason}); check --ops-token or --ops-token-file"
        );
    }
    Ok((credentials, failures))
}

pub fn read_ops_token(config: &Config) -> anyhow::Result<String> {
    if let Some(token) = &config.ops_token {
        return Ok(token.clone());
    }
    let (token, _origin) = client_token(&config.ops_token_source)
        .context("the ops token (needed to register devices)")?;
    Ok(token)
}

enum Registration {
    Token(String),
    Failed(String),
    /// Every other registration will fail the same way; the run stops.
    OpsTokenRejected(String),
    Interrupted,
}

/// The device exists on the server but this run has no token for it (the
/// server shows a token only once). A new token is the fix; deleting the
/// server's data would lose every other device's readings.
fn lost_token_advice(device_id: &str, credentials_file: &Path) -> String {
    format!(
        "already registered on the server, but its token is not in the credentials file \
         {file}; issue a new one with `ingest devices rotate-token {device_id}` and add it to \
         {file} as \"{device_id}\": \"<token>\" (or use another --device-prefix)",
        file = credentials_file.display()
    )
}

fn site_of(device_id: &str) -> &'static str {
    SITES[(device_seed(device_id) % SITES.len() as u64) as usize]
}

fn registration_request(device_id: &str) -> RegisterDeviceRequest {
    RegisterDeviceRequest {
        device_id: device_id.to_owned(),
        display_name: String::new(),
        labels: [FLEET_LABEL, ("site", site_of(device_id))]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ..Default::default()
    }
}

/// How a call went after its retries.
enum Attempted<T> {
    Answered(T),
    /// Refused for a reason retrying will not change.
    Refused(tonic::Status),
    GaveUp(String),
    Interrupted,
}

/// Calls until answered, refused or out of attempts, backing off between
/// transient failures (the server starting, a connection lost).
async fn with_retries<T, F, Fut>(what: &str, shutdown: &mut Shutdown, mut call: F) -> Attempted<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut backoff = Backoff::default();
    let mut attempt = 0;
    loop {
        if shutdown.is_requested() {
            return Attempted::Interrupted;
        }
        attempt += 1;
        let reason = match tokio::time::timeout(CALL_TIMEOUT, call()).await {
            Ok(Ok(response)) => return Attempted::Answered(response.into_inner()),
            Ok(Err(status)) if is_transient(status.code()) => describe(&status),
            Ok(Err(status)) => return Attempted::Refused(status),
            Err(_elapsed) => format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
        };
        if attempt >= REGISTER_ATTEMPTS {
            return Attempted::GaveUp(format!("{what} failed {attempt} times, last with {reason}"));
        }
        debug!(attempt, "{what} failed ({reason}); retrying");
        let delay = backoff.next_delay(&mut rand::rng());
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.requested() => return Attempted::Interrupted,
        }
    }
}

/// Registers `ids` in one RegisterDevices call, or one by one where the
/// server refuses the chunk as a whole.
async fn register_chunk(
    client: OpsApi,
    ids: Vec<String>,
    credentials_file: &Path,
    mut shutdown: Shutdown,
) -> Vec<(String, Registration)> {
    let request = RegisterDevicesRequest {
        devices: ids.iter().map(|id| registration_request(id)).collect(),
    };
    let answer = with_retries("RegisterDevices", &mut shutdown, || {
        let (mut client, request) = (client.clone(), request.clone());
        async move { client.register_devices(request).await }
    })
    .await;
    let everyone = |registration: &dyn Fn() -> Registration| {
        ids.iter()
            .map(|id| (id.clone(), registration()))
            .collect::<Vec<_>>()
    };
    match answer {
        Attempted::Answered(response) if response.devices.len() == ids.len() => response
            .devices
            .into_iter()
            .map(|d| {
                let registration = if d.token.trim().is_empty() {
                    Registration::Failed("the server returned an empty token".into())
                } else {
                    Registration::Token(d.token)
                };
                (d.device_id, registration)
            })
            .collect(),
        Attempted::Answered(response) => everyone(&|| {
            Registration::Failed(format!(
                "RegisterDevices answered {} devices for {} asked",
                response.devices.len(),
                ids.len()
            ))
        }),
        Attempted::Refused(status)
            if matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ) =>
        {
            everyone(&|| Registration::OpsTokenRejected(describe(&status)))
        }
        Attempted::Refused(status)
            if matches!(status.code(), Code::AlreadyExists | Code::Unimplemented) =>
        {
            futures::stream::iter(ids)
                .map(|id| register_device(client.clone(), id, credentials_file, shutdown.clone()))
                .buffer_unordered(REGISTER_CONCURRENCY)
                .collect()
                .await
        }
        Attempted::Refused(status) => everyone(&|| {
            Registration::Failed(format!("RegisterDevices failed ({})", describe(&status)))
        }),
        Attempted::GaveUp(reason) => everyone(&|| Registration::Failed(reason.clone())),
        Attempted::Interrupted => everyone(&|| Registration::Interrupted),
    }
}

async fn register_device(
    client: OpsApi,
    device_id: String,
    credentials_file: &Path,
    mut shutdown: Shutdown,
) -> (String, Registration) {
    let request = registration_request(&device_id);
    let answer = with_retries("RegisterDevice", &mut shutdown, || {
        let (mut client, request) = (client.clone(), request.clone());
        async move { client.register_device(request).await }
    })
    .await;
    let registration = match answer {
        Attempted::Answered(response) if response.token.trim().is_empty() => {
            Registration::Failed("the server returned an empty token".into())
        }
        Attempted::Answered(response) => Registration::Token(response.token),
        Attempted::Refused(status) => match status.code() {
            Code::AlreadyExists => {
                Registration::Failed(lost_token_advice(&device_id, credentials_file))
            }
            Code::Unauthenticated | Code::PermissionDenied => {
                Registration::OpsTokenRejected(describe(&status))
            }
            _ => Registration::Failed(format!("RegisterDevice failed ({})", describe(&status))),
        },
        Attempted::GaveUp(reason) => Registration::Failed(reason),
        Attempted::Interrupted => Registration::Interrupted,
    };
    (device_id, registration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_token_is_answered_with_rotate_token_not_deletion() {
        let advice = lost_token_advice("sim-00003", Path::new("/data/sim-credentials.json"));
        assert_eq!(
            advice,
            "already registered on the server, but its token is not in the credentials file \
             /data/sim-credentials.json; issue a new one with `ingest devices rotate-token \
             sim-00003` and add it to /data/sim-credentials.json as \"sim-00003\": \"<token>\" \
             (or use another --device-prefix)"
        );
        assert!(!advice.contains("delete"), "{advice}");
    }

    #[test]
    fn sites_are_stable_per_device() {
        assert_eq!(site_of("sim-00001"), site_of("sim-00001"));
        let distinct: std::collections::HashSet<_> = (1..=100)
            .map(|n| site_of(&crate::config::device_id("sim-", n)))
            .collect();
        assert!(distinct.len() > 1);
    }
}
