//! The server's configuration, as the library takes it. The `ingest serve`
//! command line (see `cli::serve`) builds one; tests build one directly.

use std::path::PathBuf;
use std::time::Duration;

use crate::alerts::WatchConfig;
use crate::auth::OpsTokenSource;
use crate::control::ControlConfig;
use crate::domain::ReadingLimits;
use crate::feed::FeedConfig;
use crate::pipeline::commit::WriterConfig;
use crate::pipeline::upload::UploadTimeouts;
use crate::read::ReadConfig;
use crate::retention::RetentionConfig;
use crate::storage::Database;

#[derive(Debug, Clone)]
pub struct Config {
    /// Holds the SQLite database (unless PostgreSQL is used) and the
    /// generated ops token.
    pub data_dir: PathBuf,
    pub database: Database,
    pub ops_token: OpsTokenSource,
    pub limits: Limits,
    pub writer: WriterConfig,
    pub alerts: AlertsConfig,
    pub control: ControlConfig,
    pub retention: RetentionConfig,
    /// After a shutdown signal, how long to wait for open calls to finish
    /// before closing their connections.
    pub shutdown_grace: Duration,
    /// Where to serve /metrics, /healthz and /readyz; `None`: nowhere.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Serve TLS with these certificates; `None`: plaintext.
    pub tls: Option<crate::transport::TlsSettings>,
    /// Leases of server processes sharing a PostgreSQL database.
    pub cluster: crate::cluster::ClusterConfig,
    /// Connections are sent GOAWAY after this (±10%); `None`: never.
    pub max_connection_age: Option<Duration>,
    /// A test hook: every transaction recording alert events stays open
    /// this long after taking its event ids ([`crate::storage::EventTxHold`]).
    pub test_hold_event_tx: Duration,
    /// QueryReadings: chunk size, limits, resume tokens, read connections.
    pub read: ReadConfig,
    /// WatchReadings and named consumers. Its retention is
    /// `retention.feed`; chunk size and device limit come from `read`.
    pub feed: FeedConfig,
    /// Serve MQTT here; `None`: no MQTT listener.
    pub mqtt_listen: Option<std::net::SocketAddr>,
    pub mqtt: crate::mqtt::MqttSettings,
}

impl Config {
    /// Defaults for everything but where the data lives.
    pub fn new(data_dir: PathBuf, database: Database, ops_token: OpsTokenSource) -> Self {
        Self {
            data_dir,
            database,
            ops_token,
            limits: Limits::default(),
            writer: WriterConfig::default(),
            alerts: AlertsConfig::default(),
            control: ControlConfig::default(),
            retention: RetentionConfig::default(),
            shutdown_grace: Duration::from_secs(30),
            admin_listen: None,
            tls: None,
            cluster: crate::cluster::ClusterConfig::default(),
            max_connection_age: Some(Duration::from_secs(30 * 60)),
            test_hold_event_tx: Duration::ZERO,
            read: ReadConfig::default(),
            feed: FeedConfig::default(),
            mqtt_listen: None,
            mqtt: crate::mqtt::MqttSettings::default(),
        }
    }
}

/// Limits on what clients may send.
#[derive(Debug, Clone)]
pub struct Limits {
    pub readings: ReadingLimits,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Batches of one upload stream submitted but not yet committed.
    pub max_inflight_batches: usize,
    /// Concurrent HTTP/2 streams per connection: each device multiplexed on
    /// a connection holds one or two.
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control windows, in bytes: how much a client may send
    /// ahead of what the server has read, per stream and per connection.
    /// They bound the memory a slow database lets clients fill. The
    /// connection window also sizes h2's budget for small DATA frames, so
    /// hundreds of devices' tiny unary calls on one connection are not
    /// mistaken for a flood.
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    pub upload_timeouts: UploadTimeouts,
    /// A connection must complete its TLS and HTTP/2 handshake (send the
    /// HTTP/2 preface) within this, or it is closed.
    pub handshake_timeout: Duration,
    /// HTTP/2 PING sent on a connection quiet for this long; a connection
    /// that does not answer within `keepalive_timeout` is closed. This is
    /// what keeps a healthy, quiet Control stream open.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Readings per second one device may send, over all its streams; a
    /// device over it is held back by flow control. 0: no limit.
    pub max_readings_per_second_per_device: u64,
    /// UploadReadings and Control streams one device may open per minute;
    /// past it, RESOURCE_EXHAUSTED with a retry delay. 0: no limit.
    pub max_stream_opens_per_minute_per_device: u64,
    /// Devices one RegisterDevices call may create.
    pub max_register_devices: usize,
    /// Readings decoded and not yet committed, all streams together; past
    /// it, upload streams wait unread (HTTP/2 flow control).
    pub max_buffered_readings: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            readings: ReadingLimits::default(),
            max_message_bytes: 4 * 1024 * 1024,
            max_inflight_batches: 8,
            max_concurrent_streams: 4096,
            stream_window_bytes: 1024 * 1024,
            connection_window_bytes: 16 * 1024 * 1024,
            upload_timeouts: UploadTimeouts::default(),
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_readings_per_second_per_device: 0,
            max_stream_opens_per_minute_per_device: 0,
            max_register_devices: 10_000,
            max_buffered_readings: 500_000,
        }
    }
}

/// The alert engine and watch streams.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    /// Live events kept for watchers; one further behind catches up from
    /// the database.
    pub live_buffer: usize,
    pub watch: WatchConfig,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            live_buffer: 4096,
            watch: WatchConfig::default(),
        }
    }
}
