//! `ingest serve`: every flag is also an `INGEST_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::auth::OpsTokenSource;
use crate::cluster::ClusterConfig;
use crate::domain::ReadingLimits;
use crate::domain::reading::SensorName;
use crate::feed::FeedConfig;
use crate::observability::LogFormat;
use crate::pipeline::commit::WriterConfig;
use crate::pipeline::upload::UploadTimeouts;
use crate::read::ReadConfig;
use crate::retention::RetentionConfig;
use crate::server::config::{Config, Limits};
use crate::storage::Database;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "INGEST_LISTEN", default_value = "127.0.0.1:50051",
          value_parser = listen_addr)]
    listen: SocketAddr,
    /// Plain-HTTP admin address serving /metrics, /healthz and /readyz;
    /// empty turns it off.
    #[arg(long, env = "INGEST_ADMIN_LISTEN", default_value = "127.0.0.1:9464")]
    admin_listen: String,
    /// Address of the MQTT listener (3.1.1 and 5): devices publish
    /// readings to devices/{id}/readings, and a QoS 1 PUBACK means
    /// committed. Empty (the default) turns it off; 127.0.0.1:1883 is
    /// MQTT's usual port.
    #[arg(long, env = "INGEST_MQTT_LISTEN", default_value = "")]
    mqtt_listen: String,
    /// QoS 1 PUBLISHes one MQTT connection may have unanswered (v5's
    /// Receive Maximum); past it, its socket is not read.
    #[arg(long, env = "INGEST_MQTT_RECEIVE_MAXIMUM", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..))]
    mqtt_receive_maximum: u16,
    /// Largest MQTT packet accepted, in bytes; a larger one ends its
    /// session as soon as its header is read.
    #[arg(long, env = "INGEST_MQTT_MAX_PACKET_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(64..))]
    mqtt_max_packet_bytes: u32,
    /// An MQTT connection must send CONNECT within this.
    #[arg(long, env = "INGEST_MQTT_CONNECT_TIMEOUT", default_value = "10s", value_parser = super::duration)]
    mqtt_connect_timeout: Duration,
    #[command(flatten)]
    storage: StorageArgs,
    /// Log lines as text, or as JSON objects (with the events' and spans'
    /// fields) for log shippers. RUST_LOG filters either.
    #[arg(long, env = "INGEST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(super) log_format: LogFormat,
    /// Ops tokens: a file of `NAME TOKEN` lines (or one bare token), or a
    /// directory of one token per file. This flag wins over INGEST_OPS_TOKEN
    /// (one token, from the environment only), which wins over
    /// INGEST_OPS_TOKEN_FILE; with none, a token is generated into
    /// <data-dir>/ops.token at first start. [env: INGEST_OPS_TOKEN,
    /// INGEST_OPS_TOKEN_FILE]
    #[arg(long)]
    ops_token_file: Option<PathBuf>,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "INGEST_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_message_bytes: usize,
    /// Devices one RegisterDevices call may create (all in one
    /// transaction); `ingest devices register --from-file` sends a file in
    /// calls of this size.
    #[arg(long, env = "INGEST_MAX_REGISTER_DEVICES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_register_devices: u32,
    /// Readings decoded and not yet committed, all upload streams
    /// together (about 16 bytes each, plus each series' names). Past it, a
    /// stream waits unread and HTTP/2 flow control holds its device back:
    /// a server that falls behind keeps batches waiting in the devices, not
    /// in its memory. A batch larger than the budget waits for all of it.
    #[arg(long, env = "INGEST_MAX_BUFFERED_READINGS", default_value_t = 500_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_buffered_readings: u32,
    /// Most readings in one batch.
    #[arg(long, env = "INGEST_MAX_BATCH_READINGS", default_value_t = 10_000)]
    max_batch_readings: usize,
    /// Most series in one batch, enforced while the batch is decoded: it
    /// bounds what a message can make the server allocate (an empty series
    /// is 2 bytes on the wire and about 100 in memory).
    #[arg(long, env = "INGEST_MAX_BATCH_SERIES", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_batch_series: u32,
    /// Sensors (name and unit pairs) one device may have; readings of a new
    /// sensor past it are rejected (TOO_MANY_SENSORS), the rest of their
    /// batch is kept.
    #[arg(long, env = "INGEST_MAX_SENSORS_PER_DEVICE", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_sensors_per_device: u32,
    /// Readings per second one device may send over all its streams; a
    /// device over it is held back by HTTP/2 flow control (nothing is
    /// refused) and its summary says for how long. 0: no limit.
    #[arg(
        long,
        env = "INGEST_MAX_READINGS_PER_SECOND_PER_DEVICE",
        default_value_t = 0
    )]
    max_readings_per_second_per_device: u64,
    /// UploadReadings and Control streams one device may open per minute;
    /// past it, RESOURCE_EXHAUSTED with google.rpc.RetryInfo. 0: no limit.
    #[arg(
        long,
        env = "INGEST_MAX_STREAM_OPENS_PER_MINUTE_PER_DEVICE",
        default_value_t = 0
    )]
    max_stream_opens_per_minute_per_device: u64,
    /// How long a new upload stream may wait before its first batch.
    #[arg(long, env = "INGEST_UPLOAD_FIRST_MESSAGE_TIMEOUT", default_value = "30s",
          value_parser = super::duration)]
    upload_first_message_timeout: Duration,
    /// How long an upload stream may stay silent between two batches.
    #[arg(long, env = "INGEST_UPLOAD_IDLE_TIMEOUT", default_value = "2m",
          value_parser = super::duration)]
    upload_idle_timeout: Duration,
    /// How long a new Control stream may wait before its DeviceHello.
    #[arg(long, env = "INGEST_CONTROL_HELLO_TIMEOUT", default_value = "30s",
          value_parser = super::duration)]
    control_hello_timeout: Duration,
    /// How long a new connection may take to send the HTTP/2 preface.
    #[arg(long, env = "INGEST_HANDSHAKE_TIMEOUT", default_value = "10s",
          value_parser = super::duration)]
    handshake_timeout: Duration,
    /// HTTP/2 PING on a connection quiet this long; keeps healthy quiet
    /// Control streams open and finds dead peers.
    #[arg(long, env = "INGEST_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s",
          value_parser = super::duration)]
    http2_keepalive_interval: Duration,
    /// A connection that does not answer a PING within this is closed.
    #[arg(long, env = "INGEST_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s",
          value_parser = super::duration)]
    http2_keepalive_timeout: Duration,
    /// Longest sensor name, in bytes (at most 255).
    #[arg(long, env = "INGEST_MAX_SENSOR_NAME_LEN", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=SensorName::HARD_MAX_LEN as i64))]
    max_sensor_name_len: u16,
    /// How far ahead of the server's clock a reading's timestamp may be.
    #[arg(long, env = "INGEST_MAX_FUTURE_SKEW", default_value = "5m", value_parser = super::duration)]
    max_future_skew: Duration,
    /// How long raw readings are kept: older ones are removed in the
    /// background and refused on arrival.
    #[arg(long, env = "INGEST_RETENTION", default_value = "30d", value_parser = super::duration)]
    retention: Duration,
    /// How long hourly rollups (readings_hourly, readings_daily) are kept.
    #[arg(long, env = "INGEST_ROLLUP_RETENTION", default_value = "730d", value_parser = super::duration)]
    rollup_retention: Duration,
    /// How often old data is removed (and, on PostgreSQL, partitions for the
    /// coming days are created).
    #[arg(long, env = "INGEST_RETENTION_INTERVAL", default_value = "1m", value_parser = super::duration)]
    retention_interval: Duration,
    /// Rows one retention delete step removes at most; each step is one
    /// short transaction, so ingest waits for one step at most.
    #[arg(long, env = "INGEST_RETENTION_STEP_ROWS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    retention_step_rows: u32,
    /// PostgreSQL: days of readings partitions created ahead of today.
    #[arg(long, env = "INGEST_PARTITIONS_AHEAD_DAYS", default_value_t = 3)]
    partitions_ahead_days: u32,
    /// Do not maintain the hourly rollup. Only to measure what it costs:
    /// readings_hourly, readings_daily, latest_readings and device_status
    /// then miss what is written meanwhile.
    #[arg(long, env = "INGEST_DISABLE_ROLLUPS")]
    disable_rollups: bool,
    /// Do not append committed batches to the readings feed. Only to
    /// measure what the feed costs: WatchReadings then sees nothing.
    #[arg(long, env = "INGEST_DISABLE_FEED")]
    disable_feed: bool,
    /// Batches of one upload stream waiting for their commit.
    #[arg(long, env = "INGEST_MAX_INFLIGHT_BATCHES", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_inflight_batches: u32,
    /// Batches queued for the writer, all streams together, before uploads
    /// are slowed down.
    #[arg(long, env = "INGEST_WRITER_QUEUE_BATCHES", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    writer_queue_batches: u32,
    /// Readings one group commit takes at most.
    #[arg(long, env = "INGEST_MAX_GROUP_READINGS", default_value_t = 50_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_group_readings: u32,
    /// How long one group commit should take: a group stops taking batches
    /// once its commit, at the speed the last commits went, would take
    /// longer. Bounds how long a backlog makes each commit (and so the
    /// write lock SQLite's other writers wait for), at the price of
    /// throughput: every commit has a fixed cost, and on a 2-core machine
    /// 10ms cost a fifth of the saturating rate. 0 (the default) leaves
    /// groups bounded by --max-group-readings only.
    #[arg(long, env = "INGEST_GROUP_COMMIT_BUDGET", default_value = "0s",
          value_parser = super::duration)]
    group_commit_budget: std::time::Duration,
    /// Writer tasks (and connections) committing in parallel on PostgreSQL;
    /// SQLite always has one.
    #[arg(long, env = "INGEST_POSTGRES_WRITERS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    postgres_writers: u32,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, env = "INGEST_HTTP2_MAX_STREAMS", default_value_t = 4096)]
    http2_max_streams: u32,
    /// HTTP/2 flow-control window per stream, in bytes.
    #[arg(long, env = "INGEST_HTTP2_STREAM_WINDOW", default_value_t = 1024 * 1024)]
    http2_stream_window: u32,
    /// HTTP/2 flow-control window per connection, in bytes.
    #[arg(long, env = "INGEST_HTTP2_CONNECTION_WINDOW", default_value_t = 16 * 1024 * 1024)]
    http2_connection_window: u32,
    /// Interval of heartbeats on quiet alert watch streams.
    #[arg(long, env = "INGEST_ALERT_HEARTBEAT", default_value = "5s", value_parser = super::duration)]
    alert_heartbeat: Duration,
    /// Live alert events kept for watchers; a watcher further behind
    /// catches up from the database.
    #[arg(long, env = "INGEST_ALERT_LIVE_BUFFER", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    alert_live_buffer: u32,
    /// Commands queued or sent but not yet acknowledged, per device; beyond
    /// it SendCommand answers RESOURCE_EXHAUSTED.
    #[arg(long, env = "INGEST_MAX_PENDING_COMMANDS", default_value_t = 100)]
    max_pending_commands: u64,
    /// Time to live of a command that names none.
    #[arg(long, env = "INGEST_COMMAND_TTL", default_value = "1h", value_parser = super::duration)]
    command_ttl: Duration,
    /// After SIGINT/SIGTERM, how long open calls may take to finish.
    #[arg(long, env = "INGEST_SHUTDOWN_GRACE", default_value = "30s", value_parser = super::duration)]
    shutdown_grace: Duration,
    #[command(flatten)]
    tls: super::tls_args::ServeTlsArgs,
    /// PostgreSQL: a server process unheard of for this long is taken for
    /// dead by the others sharing the database, and its devices are shown
    /// offline.
    #[arg(long, env = "INGEST_REPLICA_LEASE", default_value = "10s", value_parser = super::duration)]
    replica_lease: Duration,
    /// PostgreSQL: how often a server process renews its lease and looks
    /// for dead ones. Well under --replica-lease.
    #[arg(long, env = "INGEST_REPLICA_RENEW", default_value = "2s", value_parser = super::duration)]
    replica_renew: Duration,
    /// Control streams end after this (±10%, status UNAVAILABLE "rebalance")
    /// and devices reconnect, perhaps to another server process, so streams
    /// spread after scaling out. 0 turns it off.
    #[arg(long, env = "INGEST_CONTROL_MAX_LIFETIME", default_value = "45m", value_parser = super::duration)]
    control_max_lifetime: Duration,
    /// Connections are told to go away (HTTP/2 GOAWAY; open calls finish)
    /// after this (±10% per process), so clients reconnect and spread over
    /// server processes added since. 0 turns it off.
    #[arg(long, env = "INGEST_MAX_CONNECTION_AGE", default_value = "30m", value_parser = super::duration)]
    max_connection_age: Duration,
    /// Test hook: every transaction recording alert events stays open this
    /// long after taking its event ids, as a slow commit would.
    #[arg(long, hide = true, default_value = "0s", value_parser = super::duration)]
    test_hold_event_tx: Duration,
    #[command(flatten)]
    read: ReadArgs,
    #[command(flatten)]
    feed: FeedArgs,
}

/// The readings feed: WatchReadings and named consumers.
#[derive(Debug, Args)]
struct FeedArgs {
    /// How long committed batches stay in the readings feed. A cursor or
    /// consumer older than this is refused (FAILED_PRECONDITION naming the
    /// earliest valid cursor). The feed keeps its own copy of each batch,
    /// about 16 bytes a reading.
    #[arg(long, env = "INGEST_FEED_RETENTION", default_value = "7d", value_parser = super::duration)]
    feed_retention: Duration,
    /// Open WatchReadings streams, all callers together; past it,
    /// RESOURCE_EXHAUSTED with a retry delay.
    #[arg(long, env = "INGEST_MAX_WATCH_STREAMS", default_value_t = 64)]
    max_watch_streams: usize,
    /// How often the feed is read for batches other server processes on
    /// the same PostgreSQL committed (this process's commits are seen at
    /// once): the delivery latency of their readings to this process's
    /// watchers.
    #[arg(long, env = "INGEST_FEED_POLL", default_value = "20ms", value_parser = super::duration)]
    feed_poll: Duration,
}

/// The read path: QueryReadings.
#[derive(Debug, Args)]
struct ReadArgs {
    /// Largest QueryReadings chunk, in bytes (far below clients' 4 MiB).
    #[arg(long, env = "INGEST_READ_CHUNK_BYTES", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=1024 * 1024))]
    read_chunk_bytes: u32,
    /// Devices one QueryReadings call may list or select.
    #[arg(long, env = "INGEST_MAX_READ_DEVICES", default_value_t = 1000)]
    max_read_devices: usize,
    /// Open QueryReadings streams, all callers together; past it,
    /// RESOURCE_EXHAUSTED with a retry delay.
    #[arg(long, env = "INGEST_MAX_READ_STREAMS", default_value_t = 64)]
    max_read_streams: usize,
    /// Open QueryReadings streams per ops token.
    #[arg(long, env = "INGEST_MAX_READ_STREAMS_PER_TOKEN", default_value_t = 16)]
    max_read_streams_per_token: usize,
    /// How long a QueryReadings resume token stays valid.
    #[arg(long, env = "INGEST_READ_TOKEN_TTL", default_value = "3d", value_parser = super::duration)]
    read_token_ttl: Duration,
    /// Database connections for QueryReadings, apart from the writer's.
    #[arg(long, env = "INGEST_READ_CONNECTIONS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    read_connections: u32,
    /// Threads that run QueryReadings' reads.
    #[arg(long, env = "INGEST_READ_THREADS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    read_threads: u16,
    /// CPU niceness of those threads, 0 (the server's own) to 19: reads
    /// take the CPU that ingest leaves.
    #[arg(long, env = "INGEST_READ_NICE", default_value_t = 19,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    read_nice: i32,
}

/// Where the data lives; shared by `serve` and `migrate`.
#[derive(Debug, Args)]
pub struct StorageArgs {
    /// Data directory: the SQLite database and the generated ops token.
    #[arg(long, env = "INGEST_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// postgres://user@host/db to use PostgreSQL (default: SQLite in the
    /// data directory).
    #[arg(long, env = "INGEST_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

impl StorageArgs {
    pub fn database(&self) -> anyhow::Result<Database> {
        Database::from_config(self.database_url.as_deref(), &self.data_dir)
            .map_err(anyhow::Error::msg)
    }
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        // The token itself is accepted only from the environment: a command
        // line is visible to every user of the machine.
        let ops_token = OpsTokenSource::choose(self.ops_token_file, &self.storage.data_dir);
        let mut config = Config::new(
            self.storage.data_dir.clone(),
            self.storage.database()?,
            ops_token,
        );
        config.limits = Limits {
            readings: ReadingLimits {
                max_batch_readings: self.max_batch_readings,
                max_sensor_name_len: usize::from(self.max_sensor_name_len),
                max_future_skew: self.max_future_skew,
                retention: self.retention,
                max_batch_series: self.max_batch_series as usize,
                ..ReadingLimits::default()
            },
            max_message_bytes: self.max_message_bytes,
            max_inflight_batches: self.max_inflight_batches as usize,
            max_concurrent_streams: self.http2_max_streams,
            stream_window_bytes: self.http2_stream_window,
            connection_window_bytes: self.http2_connection_window,
            upload_timeouts: UploadTimeouts {
                first_message: self.upload_first_message_timeout,
                idle: self.upload_idle_timeout,
            },
            handshake_timeout: self.handshake_timeout,
            keepalive_interval: self.http2_keepalive_interval,
            keepalive_timeout: self.http2_keepalive_timeout,
            max_readings_per_second_per_device: self.max_readings_per_second_per_device,
            max_stream_opens_per_minute_per_device: self.max_stream_opens_per_minute_per_device,
            max_register_devices: self.max_register_devices as usize,
            max_buffered_readings: self.max_buffered_readings,
        };
        config.writer = WriterConfig {
            queue_batches: self.writer_queue_batches as usize,
            max_group_readings: self.max_group_readings as usize,
            group_budget: self.group_commit_budget,
            postgres_writers: self.postgres_writers as usize,
            rollups: !self.disable_rollups,
            feed: !self.disable_feed,
            max_sensors_per_device: self.max_sensors_per_device as usize,
        };
        config.retention = RetentionConfig {
            rollups: self.rollup_retention,
            interval: self.retention_interval,
            step_rows: self.retention_step_rows as usize,
            partitions_ahead_days: self.partitions_ahead_days,
            feed: self.feed.feed_retention,
        };
        config.alerts.watch.heartbeat = self.alert_heartbeat;
        config.alerts.live_buffer = self.alert_live_buffer as usize;
        config.control.max_pending_per_device = self.max_pending_commands;
        config.control.default_ttl = self.command_ttl;
        config.control.hello_timeout = self.control_hello_timeout;
        config.shutdown_grace = self.shutdown_grace;
        config.admin_listen = match self.admin_listen.trim() {
            "" => None,
            addr => Some(addr.parse().with_context(|| {
                format!(
                    "--admin-listen {addr:?}: expected an address like 127.0.0.1:9464, or empty"
                )
            })?),
        };
        config.mqtt_listen = match self.mqtt_listen.trim() {
            "" => None,
            addr => Some(addr.parse().with_context(|| {
                format!("--mqtt-listen {addr:?}: expected an address like 127.0.0.1:1883, or empty")
            })?),
        };
        config.mqtt = crate::mqtt::MqttSettings {
            receive_maximum: self.mqtt_receive_maximum,
            max_packet_bytes: self.mqtt_max_packet_bytes as usize,
            connect_timeout: self.mqtt_connect_timeout,
        };
        config.tls = self.tls.into_settings()?;
        anyhow::ensure!(
            !self.replica_renew.is_zero() && self.replica_renew < self.replica_lease,
            "--replica-renew ({:?}) must be above zero and below --replica-lease ({:?})",
            self.replica_renew,
            self.replica_lease
        );
        config.cluster = ClusterConfig {
            lease: self.replica_lease,
            renew: self.replica_renew,
        };
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        config.control.max_lifetime = nonzero(self.control_max_lifetime);
        config.max_connection_age = nonzero(self.max_connection_age);
        config.test_hold_event_tx = self.test_hold_event_tx;
        config.read = ReadConfig {
            chunk_bytes: self.read.read_chunk_bytes as usize,
            max_devices: self.read.max_read_devices.max(1),
            token_ttl: self.read.read_token_ttl,
            max_streams: self.read.max_read_streams,
            max_streams_per_token: self.read.max_read_streams_per_token,
            pool_connections: self.read.read_connections,
            threads: usize::from(self.read.read_threads),
            nice: self.read.read_nice,
            ..ReadConfig::default()
        };
        config.feed = FeedConfig {
            max_streams: self.feed.max_watch_streams.max(1),
            poll: self.feed.feed_poll.max(Duration::from_millis(1)),
            chunk_bytes: config.read.chunk_bytes,
            max_devices: config.read.max_devices,
            ..FeedConfig::default()
        };
        Ok(config)
    }
}

/// `--listen`: an IP address and a port. The usual mistakes (a URL, a
/// missing port) get an example of what is wanted.
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        let why = if s.contains("://") {
            "without a scheme such as http://"
        } else if !s.contains(':') || s.ends_with(':') {
            "the port is missing"
        } else {
            "HOST is an IP address (names such as localhost are not looked up)"
        };
        format!("--listen wants HOST:PORT, e.g. 127.0.0.1:50051 (0.0.0.0:50051 for every interface); {why}")
    })
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let listen = args.listen;
    let config = args.into_config()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    crate::server::run(config, listener, crate::server::shutdown::signal()).await
}

#[cfg(test)]
mod readme {
    use clap::CommandFactory;

    const BEGIN: &str = "<!-- serve-flags: generated";
    const END: &str = "<!-- serve-flags: end -->";

    /// The table of `serve`'s flags as the README shows it: every visible
    /// flag, its default and the first sentence of its help, with its
    /// environment variable.
    fn flags_table() -> String {
        let cli = crate::cli::Cli::command();
        let serve = cli.find_subcommand("serve").expect("a serve subcommand");
        let mut table = String::from("| flag | default | what |\n|---|---|---|\n");
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if arg.is_hide_set() || long == "help" {
                continue;
            }
            let default: Vec<_> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            let default = match default.join(", ") {
                d if d.is_empty() => String::new(),
                d => format!("`{d}`"),
            };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
            let env = arg
                .get_env()
                .map(|e| format!(" (`{}`)", e.to_string_lossy()))
                .unwrap_or_default();
            table.push_str(&format!(
                "| `--{long}` | {default} | {}{env} |\n",
                help.replace('|', "\\|")
            ));
        }
        table
    }

    #[test]
    fn readme_lists_every_serve_flag() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let begin = readme.find(BEGIN).expect("the README's serve-flags marker");
        let table_start = begin + readme[begin..].find('\n').expect("marker line") + 1;
        let table_end = table_start + readme[table_start..].find(END).expect("end marker");
        let want = flags_table();
        if std::env::var_os("UPDATE_README").is_some() {
            let updated = format!("{}{want}{}", &readme[..table_start], &readme[table_end..]);
            std::fs::write(path, updated).expect("writing README.md");
            return;
        }
        assert!(
            readme[table_start..table_end] == want,
            "README.md's table of serve flags is out of date: run \
             `UPDATE_README=1 cargo test -p ingest --lib readme_lists_every_serve_flag`"
        );
    }
}
