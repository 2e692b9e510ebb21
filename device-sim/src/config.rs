//! Command-line flags (each also readable from a `DEVICE_SIM_*` variable) and
//! the checks that turn them into settings the rest of the simulator trusts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use telemetry_client::ops_token::OpsTokenSource;
use telemetry_client::tls::{ClientTls, server_list};
use tonic::codec::CompressionEncoding;

/// A fleet of simulated IoT devices streaming readings to telemetry-ingest.
///
/// Devices are registered once (tokens are kept in the credentials file),
/// then each one samples its sensors at the given rate and uploads batches
/// over long-lived `UploadReadings` streams, resending whatever the server has
/// not acknowledged after a failure. Stop with Ctrl-C (twice to skip the
/// final acknowledgement wait) or with --duration.
// No Debug: it would print the ops token.
#[derive(Clone, Parser)]
#[command(name = "device-sim", version, about, long_about)]
pub struct Args {
    /// gRPC endpoint of the ingest server: http://HOST:PORT, or
    /// https://HOST:PORT with --tls-ca. Several server processes on one
    /// database: a,b,c (each call, each stream, goes to one of them; one
    /// that goes away is failed over after backoff).
    #[arg(
        long,
        env = "DEVICE_SIM_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,

    /// PEM file: the CA that signed the server's certificate, for an
    /// https:// --server (system roots are not used).
    #[arg(long, env = "DEVICE_SIM_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,

    /// PEM file: a client certificate for mutual TLS, presented on every
    /// connection of the fleet.
    #[arg(long, env = "DEVICE_SIM_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file: the private key of --tls-cert.
    #[arg(long, env = "DEVICE_SIM_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,

    /// The ops token, to register devices that have no stored credentials
    /// and to install --anomalies' rules: a file of `NAME TOKEN` lines (the
    /// first is used), a bare token, or a directory of token files, as
    /// `ingest` reads it. This flag wins over INGEST_OPS_TOKEN (the token
    /// itself), which wins over INGEST_OPS_TOKEN_FILE; with none,
    /// <data-dir>/ops.token. [env: INGEST_OPS_TOKEN, INGEST_OPS_TOKEN_FILE]
    #[arg(long, env = "DEVICE_SIM_OPS_TOKEN_FILE")]
    pub ops_token_file: Option<PathBuf>,

    /// Directory of the ops token and credentials files; with
    /// --local-server, also where the server keeps its SQLite database.
    #[arg(long, env = "DEVICE_SIM_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Start the real ingest server in this process (SQLite in --data-dir,
    /// listening on --listen) and run the fleet against it: the whole
    /// system in one command, no setup.
    #[arg(long, env = "DEVICE_SIM_LOCAL_SERVER")]
    pub local_server: bool,

    /// With --local-server: the address the server listens on, so the
    /// `ingest` CLI can reach it while the demo runs.
    #[arg(long, env = "DEVICE_SIM_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: std::net::SocketAddr,

    /// Number of simulated devices.
    #[arg(long, env = "DEVICE_SIM_DEVICES", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub devices: u32,

    /// Device ids are this prefix followed by a five-digit number.
    #[arg(long, env = "DEVICE_SIM_DEVICE_PREFIX", default_value = "sim-")]
    pub device_prefix: String,

    /// Sensors per device: temperature, humidity, pressure, battery, then
    /// generic aux_N sensors.
    #[arg(long, env = "DEVICE_SIM_SENSORS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub sensors: u32,

    /// Samples per second of each sensor.
    #[arg(long, env = "DEVICE_SIM_SAMPLE_RATE", default_value_t = 10.0)]
    pub sample_rate: f64,

    /// Samples per sensor in one batch.
    #[arg(long, env = "DEVICE_SIM_BATCH_SIZE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_size: u32,

    /// Batches carried by one UploadReadings stream before it is closed and
    /// its summary (the acknowledgement) awaited, resends included: a
    /// backlog goes out this many at a time. More batches per stream cost
    /// fewer round trips but delay every acknowledgement.
    #[arg(long, env = "DEVICE_SIM_BATCHES_PER_STREAM", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batches_per_stream: u32,

    /// Stop after this long (e.g. "30s", "5m"); without it, run until Ctrl-C.
    #[arg(long, env = "DEVICE_SIM_DURATION")]
    pub duration: Option<humantime::Duration>,

    /// Leave the acknowledgement latencies of the first this long out of
    /// the report: a fleet started at once sends its first batches in the
    /// same instant, and their wait says nothing of the steady state.
    #[arg(long, env = "DEVICE_SIM_LATENCY_WARMUP", default_value = "0s")]
    pub latency_warmup: humantime::Duration,

    /// Number of HTTP/2 connections shared by the devices.
    #[arg(long, env = "DEVICE_SIM_CONNECTIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connections: u32,

    /// Compression of every call's messages (uploads, Control, registration);
    /// the server is also asked to compress its answers the same way.
    #[arg(long, env = "DEVICE_SIM_COMPRESSION", value_enum, default_value_t = Compression::None)]
    pub compression: Compression,

    /// JSON file mapping device id to device token, written with mode 0600
    /// [default: <data-dir>/sim-credentials.json].
    #[arg(long, env = "DEVICE_SIM_CREDENTIALS_FILE")]
    pub credentials_file: Option<PathBuf>,

    /// Inject anomalies (spikes, drifts, stuck values, dropouts) into
    /// readings, and install alert rules they trip (demo-too-hot,
    /// demo-pressure-jump, demo-humidity-silent; on devices labelled
    /// fleet=sim only) on the server, local or not, when an ops token is at
    /// hand (--ops-token, --ops-token-file); their alerts are printed as
    /// they fire and resolve.
    #[arg(long, env = "DEVICE_SIM_ANOMALIES")]
    pub anomalies: bool,

    /// Probability per sample that an anomaly starts (with --anomalies).
    #[arg(long, env = "DEVICE_SIM_ANOMALY_RATE", default_value_t = 0.01)]
    pub anomaly_rate: f64,

    /// Unacknowledged batches kept per device for resending; beyond this the
    /// oldest is dropped.
    #[arg(long, env = "DEVICE_SIM_MAX_BUFFERED_BATCHES", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_buffered_batches: u32,

    /// Devices connecting at once (fetching their upload cursor and opening
    /// their Control stream for the first time). The rest wait their turn,
    /// so a large fleet started together comes online as fast as the server
    /// admits it instead of timing out and retrying in a storm.
    #[arg(long, env = "DEVICE_SIM_CONNECT_CONCURRENCY", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_concurrency: u32,

    /// How often each device sends a status report (battery, uptime,
    /// signal) on its Control stream.
    #[arg(long, env = "DEVICE_SIM_STATUS_INTERVAL", default_value = "10s")]
    pub status_interval: humantime::Duration,

    /// How long a device told to reboot stays down before it reconnects.
    #[arg(long, env = "DEVICE_SIM_REBOOT_DELAY", default_value = "1s")]
    pub reboot_delay: humantime::Duration,

    /// Also write the final report as JSON to this file.
    #[arg(long, env = "DEVICE_SIM_REPORT_JSON")]
    pub report_json: Option<PathBuf>,

    /// No live progress line.
    #[arg(short, long, env = "DEVICE_SIM_QUIET")]
    pub quiet: bool,
}

/// Validated settings derived from [`Args`]. No Debug, like [`Args`].
#[derive(Clone)]
pub struct Config {
    /// One address, or several server processes to balance over.
    pub servers: Vec<String>,
    /// TLS files for an https:// server, checked against its scheme.
    pub tls: ClientTls,
    /// The ops token itself, when the local server gave it.
    pub ops_token: Option<String>,
    /// Where the ops token comes from otherwise.
    pub ops_token_source: OpsTokenSource,
    pub devices: u32,
    pub device_prefix: String,
    pub sensors: usize,
    pub sample_rate: f64,
    pub batch_size: usize,
    pub batches_per_stream: usize,
    pub duration: Option<Duration>,
    pub latency_warmup: Duration,
    pub connections: usize,
    pub compression: Compression,
    pub credentials_file: PathBuf,
    /// `Some(rate)` when anomalies are on.
    pub anomaly_rate: Option<f64>,
    pub max_buffered_batches: usize,
    pub connect_concurrency: usize,
    pub status_interval: Duration,
    pub reboot_delay: Duration,
    pub report_json: Option<PathBuf>,
    pub quiet: bool,
}

/// `--compression`: how every call's messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The gRPC encoding, used both for what the fleet sends and for what
    /// it accepts back; `None` sends and asks for plain messages.
    pub fn encoding(self) -> Option<CompressionEncoding> {
        match self {
            Self::None => None,
            Self::Gzip => Some(CompressionEncoding::Gzip),
            Self::Zstd => Some(CompressionEncoding::Zstd),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        })
    }
}

// The server refuses ids it cannot store, so catch a bad prefix here with a
// message that names the flag instead of failing every registration.
const MAX_DEVICE_ID_LEN: usize = 128;
const DEVICE_NUMBER_WIDTH: usize = 5;
/// Status reports are heartbeats; more often than this is only load.
const MIN_STATUS_INTERVAL: Duration = Duration::from_millis(10);
const MAX_REBOOT_DELAY: Duration = Duration::from_secs(3600);

impl Config {
    pub fn from_args(args: Args) -> anyhow::Result<Self> {
        let servers = server_list(&args.server).context("--server")?;
        let tls = ClientTls {
            ca: args.tls_ca,
            cert: args.tls_cert,
            key: args.tls_key,
        };
        // Reads the files now: a wrong path fails here, naming the flag,
        // not as every device's connection error.
        tls.endpoints(&servers).context("--server")?;

        ensure!(
            args.sample_rate.is_finite() && args.sample_rate > 0.0,
            "--sample-rate must be a positive number of samples per second, got {}",
            args.sample_rate
        );
        let batch_period_secs = f64::from(args.batch_size) / args.sample_rate;
        // tokio intervals cannot tick at zero, and a period beyond a day means
        // the flags were almost certainly swapped.
        ensure!(
            (0.001..=86_400.0).contains(&batch_period_secs),
            "--batch-size / --sample-rate gives a batch every {batch_period_secs} s; \
             it must be between 1 ms and 1 day"
        );

        ensure!(
            (0.0..=1.0).contains(&args.anomaly_rate),
            "--anomaly-rate is a probability and must be within 0..=1, got {}",
            args.anomaly_rate
        );

        validate_device_prefix(&args.device_prefix)?;

        let status_interval: Duration = args.status_interval.into();
        ensure!(
            status_interval >= MIN_STATUS_INTERVAL,
            "--status-interval must be at least {} ms",
            MIN_STATUS_INTERVAL.as_millis()
        );
        let reboot_delay: Duration = args.reboot_delay.into();
        ensure!(
            reboot_delay <= MAX_REBOOT_DELAY,
            "--reboot-delay must be at most {} s",
            MAX_REBOOT_DELAY.as_secs()
        );

        Ok(Self {
            servers,
            tls,
            ops_token: None,
            ops_token_source: OpsTokenSource::choose(args.ops_token_file, &args.data_dir),
            devices: args.devices,
            device_prefix: args.device_prefix,
            sensors: usize::try_from(args.sensors).context("--sensors is too large")?,
            sample_rate: args.sample_rate,
            batch_size: usize::try_from(args.batch_size).context("--batch-size is too large")?,
            batches_per_stream: usize::try_from(args.batches_per_stream)
                .context("--batches-per-stream is too large")?,
            duration: args.duration.map(Into::into),
            latency_warmup: args.latency_warmup.into(),
            connections: usize::try_from(args.connections).context("--connections is too large")?,
            compression: args.compression,
            credentials_file: args
                .credentials_file
                .unwrap_or_else(|| args.data_dir.join("sim-credentials.json")),
            anomaly_rate: args.anomalies.then_some(args.anomaly_rate),
            max_buffered_batches: usize::try_from(args.max_buffered_batches)
                .context("--max-buffered-batches is too large")?,
            status_interval,
            connect_concurrency: args.connect_concurrency as usize,
            reboot_delay,
            report_json: args.report_json,
            quiet: args.quiet,
        })
    }

    /// Time between two batches of one device.
    pub fn batch_period(&self) -> Duration {
        Duration::from_secs_f64(self.batch_size as f64 / self.sample_rate)
    }

    /// The id of device `n` (1-based), e.g. `sim-00001`.
    pub fn device_id(&self, n: u32) -> String {
        device_id(&self.device_prefix, n)
    }
}

pub fn device_id(prefix: &str, n: u32) -> String {
    format!("{prefix}{n:0width$}", width = DEVICE_NUMBER_WIDTH)
}

fn validate_device_prefix(prefix: &str) -> anyhow::Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':');
    if let Some(bad) = prefix.chars().find(|c| !allowed(*c)) {
        bail!(
            "--device-prefix {prefix:?} contains {bad:?}; device ids allow only ASCII letters, \
             digits, '_', '.', '-' and ':'"
        );
    }
    if let Some(first) = prefix.chars().next() {
        ensure!(
            first.is_ascii_alphanumeric(),
            "--device-prefix {prefix:?} must start with a letter or digit"
        );
    }
    // Ids longer than the width still fit, but leave room for large fleets.
    ensure!(
        prefix.len() + DEVICE_NUMBER_WIDTH + 2 <= MAX_DEVICE_ID_LEN,
        "--device-prefix is too long: device ids are limited to {MAX_DEVICE_ID_LEN} characters"
    );
    Ok(())
}

/// For tests: sampling, batches and streams small and fast enough that a
/// device uploads many batches over many streams within a second.
#[cfg(test)]
pub const FAST_UPLOADS: [&str; 6] = [
    "--sample-rate",
    "1000",
    "--batch-size",
    "10",
    "--batches-per-stream",
    "5",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> anyhow::Result<Config> {
        let mut argv = vec!["device-sim"];
        argv.extend_from_slice(extra);
        Config::from_args(Args::try_parse_from(argv)?)
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = parse(&[]).expect("defaults");
        assert_eq!(cfg.devices, 20);
        assert_eq!(cfg.sensors, 4);
        assert_eq!(cfg.batch_period(), Duration::from_secs(1));
        assert_eq!(
            cfg.credentials_file,
            PathBuf::from("./data/sim-credentials.json")
        );
        assert_eq!(cfg.anomaly_rate, None);
        assert_eq!(cfg.device_id(1), "sim-00001");
        assert_eq!(cfg.device_id(123_456), "sim-123456");
        assert_eq!(cfg.status_interval, Duration::from_secs(10));
        assert_eq!(cfg.reboot_delay, Duration::from_secs(1));
        assert_eq!(cfg.compression, Compression::None);
        assert_eq!(cfg.servers, ["http://127.0.0.1:50051"]);
    }

    #[test]
    fn several_servers_are_a_comma_separated_list() {
        let cfg =
            parse(&["--server", "http://10.0.0.1:50051, http://10.0.0.2:50051"]).expect("valid");
        assert_eq!(
            cfg.servers,
            ["http://10.0.0.1:50051", "http://10.0.0.2:50051"]
        );
        assert!(parse(&["--server", "http://10.0.0.1:50051,"]).is_err());
        // Each address is checked: the second needs a CA.
        assert!(parse(&["--server", "http://a:1,https://b:2"]).is_err());
    }

    #[test]
    fn compression_is_one_of_the_encodings_or_none() {
        let cfg = parse(&["--compression", "zstd"]).expect("valid");
        assert_eq!(cfg.compression, Compression::Zstd);
        assert_eq!(
            cfg.compression.encoding(),
            Some(tonic::codec::CompressionEncoding::Zstd)
        );
        assert_eq!(
            parse(&["--compression", "none"])
                .expect("valid")
                .compression
                .encoding(),
            None
        );
        assert!(parse(&["--compression", "brotli"]).is_err());
    }

    #[test]
    fn anomaly_rate_applies_only_with_anomalies() {
        let cfg = parse(&["--anomalies", "--anomaly-rate", "0.5"]).expect("valid");
        assert_eq!(cfg.anomaly_rate, Some(0.5));
        assert!(parse(&["--anomalies", "--anomaly-rate", "1.5"]).is_err());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse(&["--sample-rate", "0"]).is_err());
        assert!(parse(&["--sample-rate", "NaN"]).is_err());
        assert!(parse(&["--devices", "0"]).is_err());
        assert!(parse(&["--device-prefix", "sim 1"]).is_err());
        assert!(parse(&["--device-prefix", "-sim"]).is_err());
        assert!(parse(&["--server", "ftp://example.com"]).is_err());
        // https needs the CA that signed the server's certificate...
        assert!(parse(&["--server", "https://example.com"]).is_err());
        assert!(
            parse(&[
                "--server",
                "https://example.com",
                "--tls-ca",
                "/nonexistent/ca.pem"
            ])
            .is_err()
        );
        // ...and TLS files make no sense for plaintext.
        assert!(parse(&["--tls-ca", "ca.pem"]).is_err());
        assert!(parse(&["--status-interval", "0s"]).is_err());
        assert!(parse(&["--reboot-delay", "2h"]).is_err());
    }
}
