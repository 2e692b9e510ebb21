//! Assembles the service and serves it until shutdown.
//!
//! Shutdown, in order: stop accepting connections; tell open upload streams
//! to stop reading (they wait for their in-flight batches to commit and
//! answer); wait for open calls, at most the grace period; let the writer
//! drain its queue; close the database.

pub mod admin;
mod cluster_listener;
pub mod config;
mod lease;
pub mod shutdown;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use telemetry_proto::v1::ingest_server::IngestServer;
use telemetry_proto::v1::ops_server::OpsServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;

use crate::alerts::AlertEngine;
use crate::auth::{AuthLayer, Authenticator, Credentials, OpsTokens};
use crate::cluster::leader::Leadership;
use crate::cluster::single::ProcessLock;
use crate::cluster::{Replica, jittered};
use crate::control::CommandCenter;
use crate::feed::Feed;
use crate::grpc::compression::compressed;
use crate::grpc::transport_status::TransportStatusLayer;
use crate::grpc::{IngestRoutes, IngestService, OpsService};
use crate::metrics::Metrics;
use crate::metrics::grpc::GrpcMetricsLayer;
use crate::pipeline::commit as writer;
use crate::pipeline::rate_limit::DeviceRateLimits;
use crate::pipeline::{Pipeline, ReadingBudget};
use crate::read::{ReadConfig, Reader};
use crate::storage::{Database, Store};
use admin::Admin;
use cluster_listener::Subscribers;
use config::Config;
use prometheus_client::registry::Registry;

/// Serves on `listener` until `shutdown` resolves, then stops gracefully.
/// The admin and MQTT listeners, if configured, are bound here.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let admin = crate::server::admin::bind(config.admin_listen).await?;
    run_with_admin(config, listener, admin, shutdown).await
}

/// [`run`], with the admin listener bound by the caller (tests bind port 0).
pub async fn run_with_admin(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mqtt = match config.mqtt_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the MQTT listener to {addr} (--mqtt-listen)"))?,
        ),
        None => None,
    };
    run_with_listeners(
        config,
        Listeners {
            grpc: listener,
            admin,
            mqtt,
        },
        shutdown,
    )
    .await
}

/// The sockets a server serves, bound by the caller.
pub struct Listeners {
    pub grpc: TcpListener,
    /// /metrics, /healthz, /readyz.
    pub admin: Option<TcpListener>,
    pub mqtt: Option<TcpListener>,
}

/// [`run`], with every listener bound by the caller (tests bind port 0).
pub async fn run_with_listeners(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Listeners {
        grpc: listener,
        admin: admin_listener,
        mqtt: mqtt_listener,
    } = listeners;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let ops_tokens = Arc::new(OpsTokens::load(config.ops_token.clone())?);
    // Held until the server returns: a second server on the same SQLite
    // file is refused (several processes need PostgreSQL).
    let _sole_process = match &config.database {
        Database::Sqlite { path } => Some(ProcessLock::acquire(path)?),
        Database::Postgres { .. } => None,
    };
    let replica = Replica::new();
    let store = Store::open_named(&config.database, &replica.connection_name(None))
        .await
        .context("opening the database")?
        .with_event_tx_hold(config.test_hold_event_tx);
    let local_addr = listener.local_addr()?;
    lease::register(&store, &replica, &local_addr.to_string(), &config.cluster)
        .await
        .context("registering this server process")?;
    tracing::info!(addr = %local_addr, backend = store.backend_name(), replica = replica.short(), "serving");

    // One registry for the process, passed down: no global metrics.
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let (stopping_tx, stopping) = watch::channel(false);
    let (leadership, leader_task) =
        match store.side_connection(&replica.connection_name(Some("leader"))) {
            Some(options) => {
                let (leadership, task) =
                    Leadership::contend(options, stopping.clone(), metrics.clone());
                (leadership, Some(task))
            }
            None => (Leadership::sole(&metrics), None),
        };
    let credentials = Credentials::start(store.clone(), stopping.clone());
    let ops_reload = tokio::spawn(reload_ops_tokens_on_hangup(
        ops_tokens.clone(),
        stopping.clone(),
    ));
    let (alerts, alerts_task) = AlertEngine::start(
        store.clone(),
        config.alerts.live_buffer,
        stopping.clone(),
        leadership.clone(),
        metrics.clone(),
    )
    .await
    .context("starting the alert engine")?;
    // Woken after each of this process's commits: the feed follows at once.
    let committed = Arc::new(tokio::sync::Notify::new());
    let (writer, writer_task) =
        writer::spawn(&store, &config.writer, &alerts, &metrics, &committed);
    let (feed, feed_task) = Feed::start(
        &store,
        config.feed.clone(),
        committed,
        stopping.clone(),
        metrics.clone(),
    )
    .await
    .context("starting the readings feed")?;
    let (control, sweeper) = CommandCenter::start(
        store.clone(),
        config.control.clone(),
        replica.clone(),
        leadership,
        stopping.clone(),
        metrics.clone(),
    )
    .await
    .context("starting device control")?;
    // What the other server processes on the database commit, heard here.
    let cluster_tasks = match store.side_connection(&replica.connection_name(Some("listener"))) {
        Some(options) => vec![
            cluster_listener::start(
                options,
                Subscribers {
                    alerts: alerts.clone(),
                    control: control.clone(),
                    credentials: credentials.clone(),
                },
                stopping.clone(),
                metrics.clone(),
            ),
            lease::keep(
                store.clone(),
                replica.clone(),
                local_addr.to_string(),
                config.cluster.clone(),
                control.clone(),
                stopping.clone(),
            ),
        ],
        None => Vec::new(),
    };
    let retention = tokio::spawn(crate::retention::run(
        store.clone(),
        config.retention.clone(),
        config.limits.readings.retention,
        stopping.clone(),
        metrics.clone(),
    ));
    let upload = Pipeline {
        store: store.clone(),
        writer,
        limits: config.limits.readings.clone(),
        max_inflight_batches: config.limits.max_inflight_batches,
        shutdown: stopping.clone(),
        rate_limits: Arc::new(DeviceRateLimits::new(
            config.limits.max_readings_per_second_per_device,
            config.limits.max_stream_opens_per_minute_per_device,
        )),
        timeouts: config.limits.upload_timeouts,
        metrics: metrics.clone(),
        budget: ReadingBudget::new(
            config.limits.max_buffered_readings,
            metrics.buffered_readings.clone(),
            metrics.upload_budget_wait_seconds.clone(),
        ),
    };
    metrics
        .buffered_readings_limit
        .set(i64::from(config.limits.max_buffered_readings));
    // Reads get connections of their own: a long export never waits for,
    // nor holds, the writer's.
    let read_config = ReadConfig {
        raw_retention: Some(config.limits.readings.retention),
        ..config.read.clone()
    };
    let reader = Reader::open(&store, read_config, metrics.clone())
        .await
        .context("opening the read path")?;
    // Every service takes gzip and zstd (grpc/compression.rs); the message
    // size limit applies to the decompressed message.
    let max_message = config.limits.max_message_bytes;
    // Only with a listener: the context holds a writer handle, and the
    // writer stops (at shutdown) once every handle is gone.
    let mqtt = mqtt_listener.map(|listener| {
        let context = crate::mqtt::MqttContext {
            pipeline: upload.clone(),
            credentials: credentials.clone(),
            control: control.clone(),
            settings: config.mqtt.clone(),
            metrics: metrics.clone(),
        };
        (listener, context)
    });
    let ingest = IngestRoutes::new(
        IngestService::new(upload, control.clone()),
        config.limits.readings.max_batch_series,
        max_message,
    );
    let ops = compressed!(
        OpsServer::new(OpsService {
            store: store.clone(),
            alerts,
            control,
            credentials: credentials.clone(),
            watch: config.alerts.watch.clone(),
            shutdown: stopping.clone(),
            reader: reader.clone(),
            feed: feed.clone(),
            max_register_devices: config.limits.max_register_devices,
        })
        .max_decoding_message_size(max_message)
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    let health_service = compressed!(health_service);
    health.set_serving::<IngestServer<IngestService>>().await;
    health.set_serving::<OpsServer<OpsService>>().await;
    // Both reflection versions: grpcurl and Postman speak v1, Python's
    // grpcio-reflection and older tools only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(telemetry_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = compressed!(
        reflection()
            .build_v1()
            .context("building the reflection service (v1)")?
    );
    let reflection_v1alpha = compressed!(
        reflection()
            .build_v1alpha()
            .context("building the reflection service (v1alpha)")?
    );

    let auth = Arc::new(Authenticator::new(ops_tokens, credentials, metrics.clone()));
    let signal = {
        let health = health.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections; finishing open calls");
            health
                .set_not_serving::<IngestServer<IngestService>>()
                .await;
            health.set_not_serving::<OpsServer<OpsService>>().await;
            let _ = stopping_tx.send(true);
        }
    };
    // TLS (or plaintext) in front of tonic; the reloader stops at shutdown.
    let (incoming, transport) = crate::transport::listen(
        listener,
        config.tls.as_ref(),
        config.limits.handshake_timeout,
        stopping.clone(),
        metrics.tls_handshake_failures.clone(),
    )
    .context("setting up TLS")?;
    if let Some(tls) = &config.tls {
        crate::transport::expiry_metric::register_expiry_metric(&mut registry, tls.handle.clone());
    }
    let mqtt_task = mqtt.map(|(listener, mqtt_context)| {
        if let Ok(addr) = listener.local_addr() {
            let tls = transport.acceptor.is_some();
            tracing::info!(%addr, tls, "MQTT listener: devices publish to devices/{{id}}/readings");
        }
        tokio::spawn(crate::mqtt::serve(
            listener,
            mqtt_context,
            transport.acceptor.clone(),
        ))
    });
    let mut builder = Server::builder();
    if let Some(age) = config.max_connection_age {
        // Connections end gracefully (GOAWAY; open streams finish) after
        // this, so a fleet spreads over processes added later. Jittered per
        // process: tonic takes one age for all of a server's connections.
        builder = builder.max_connection_age(jittered(age));
    }
    let serve = builder
        .initial_stream_window_size(config.limits.stream_window_bytes)
        .initial_connection_window_size(config.limits.connection_window_bytes)
        .max_concurrent_streams(config.limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(config.limits.keepalive_interval))
        .http2_keepalive_timeout(Some(config.limits.keepalive_timeout))
        // Outermost, so each call counts under the code its client sees.
        .layer(GrpcMetricsLayer::new(metrics.clone()))
        .layer(TransportStatusLayer {
            max_message_bytes: max_message,
        })
        .layer(AuthLayer::new(auth))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ingest)
        .add_service(ops)
        .serve_with_incoming_shutdown(incoming, signal);

    let admin_task = admin_listener.map(|listener| {
        match listener.local_addr() {
            Ok(addr) => tracing::info!(%addr, "admin listener: /metrics, /healthz, /readyz"),
            Err(_) => tracing::info!("admin listener: /metrics, /healthz, /readyz"),
        }
        let admin = Admin {
            registry: Arc::new(registry),
            metrics: metrics.clone(),
            store: store.clone(),
            stopping: stopping.clone(),
        };
        tokio::spawn(admin.serve(listener))
    });
    let mut stopped = stopping;
    let grace = config.shutdown_grace;
    tokio::select! {
        result = serve => result.context("serving gRPC")?,
        () = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(?grace, "grace period over; closing the remaining connections"),
    }

    // MQTT sessions answer what they have in flight, then end.
    if let Some(mut task) = mqtt_task
        && tokio::time::timeout(grace, &mut task).await.is_err()
    {
        tracing::warn!("MQTT sessions did not end within the grace period");
        task.abort();
    }
    // Every writer handle lived in the services and sessions, now dropped:
    // the writer commits what is queued and stops.
    if tokio::time::timeout(grace, writer_task).await.is_err() {
        tracing::warn!("the writer did not drain within the grace period");
    }
    // The alert feed, the readings feed's follower and the TLS reloader
    // stopped with the shutdown signal.
    let _ = alerts_task.await;
    let _ = feed_task.await;
    transport.stopped().await;
    let _ = sweeper.await;
    // A pass cut short loses nothing: each step is its own transaction.
    retention.abort();
    let _ = retention.await;
    let _ = ops_reload.await;
    if let Some(admin) = admin_task {
        let _ = admin.await;
    }
    for task in cluster_tasks.into_iter().chain(leader_task) {
        let _ = task.await;
    }
    // Control streams closed with their connections, some without a goodbye
    // when the grace period ran out: the devices table must not show this
    // process's devices online to SQL readers once it is gone. Other
    // processes' devices are theirs.
    if let Err(error) = store.release_replica(&replica.id).await {
        tracing::warn!(%error, "could not mark this process's devices offline");
    }
    reader.close().await;
    feed.close().await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Reads the ops tokens again on SIGHUP, so an operator can replace one
/// while another is in use. A bad file keeps the tokens in force.
async fn reload_ops_tokens_on_hangup(tokens: Arc<OpsTokens>, mut stopping: watch::Receiver<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; ops tokens reload only on restart");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return,
            Some(()) = hangups.recv() => match tokens.reload() {
                Ok(count) => tracing::info!(count, "ops tokens reloaded"),
                Err(error) => tracing::error!(error = format!("{error:#}"), "ops tokens not reloaded; the previous ones stay in force"),
            },
        }
    }
}
