//! One MQTT connection, from CONNECT to its end.
//!
//! A QoS 1 PUBLISH is answered only once its batch has committed in a group
//! commit, through the same [`Pipeline`] entry as a gRPC upload. Answers
//! leave in the order the PUBLISHes came, as MQTT requires: a queue of
//! pending answers, the oldest written first. While the queue holds the
//! server's Receive Maximum, the socket is not read, so TCP flow control
//! holds the device back instead of the server buffering for it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use telemetry_proto::v1 as pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::payload::{self, PayloadError, Topic, TopicError};
use super::wire::{
    self, Connect, Goodbye, Inbound, Outbound, PubRefusal, Publish, ReadError, Refusal, Version,
};
use super::{MqttContext, MqttSettings};
use super::{commands, thingsboard};
use crate::auth::{AuthFailure, CredentialWatch, until_ended};
use crate::control::center::SessionEnd;
use crate::control::session::{self as control, Delivery, Outgoing};
use crate::domain::command::CommandState;
use crate::domain::reading::{BatchReport, ValidatedBatch, validate_batch};
use crate::domain::time::{UnixNanos, now_unix_nanos};
use crate::domain::{ClientCertificate, DeviceId, DeviceKey, RejectReason, TokenHash};
use crate::metrics::{Metrics, ReasonLabel};
use crate::pipeline::commit::NEXT_SEQUENCE;
use crate::pipeline::{BatchOutcome, CommitResult, DeviceStream, Receipt};
use crate::storage::StorageError;
use crate::storage::commands::CommandRecord;
use crate::storage::mqtt_sessions::KeptSession;
use crate::transport::Connection;

/// Runs one connection to its end. Errors are the session's own and end
/// only it: they are logged and counted here.
pub async fn run(io: Connection, shared: Arc<MqttContext>) {
    let peer = io.info().remote_addr;
    let certificate = io.info().client_certificate.clone();
    let mut shutdown = shared.pipeline.shutdown.clone();
    let mut conn = Conn {
        io,
        buf: BytesMut::with_capacity(4096),
        out: BytesMut::new(),
        version: Version::V311,
    };
    let read = tokio::select! {
        () = stopping(&mut shutdown) => return,
        read = tokio::time::timeout(shared.settings.connect_timeout, conn.read_connect(&shared.settings)) => read,
    };
    let connect = match read {
        Ok(Ok(connect)) => connect,
        Ok(Err(ConnectFailed::Io)) => return,
        Ok(Err(ConnectFailed::Packet(error))) => {
            refuse(&shared.metrics, "malformed_connect");
            tracing::debug!(?peer, %error, "MQTT connection refused before CONNECT");
            if let ReadError::UnsupportedLevel(_) = error {
                // A 3.1.1 CONNACK is what clients of every level read.
                conn.version = Version::V311;
                conn.refuse(Refusal::UnsupportedVersion, &shared.settings, None)
                    .await;
            }
            return;
        }
        Err(_) => {
            refuse(&shared.metrics, "connect_timeout");
            tracing::debug!(?peer, timeout = ?shared.settings.connect_timeout, "no MQTT CONNECT in time");
            return;
        }
    };
    let (device, watch) = match admit(&connect, certificate.as_deref(), &shared).await {
        Ok(admitted) => admitted,
        Err((refusal, reason)) => {
            tracing::info!(?peer, client_id = %connect.client_id, %reason, "MQTT connection refused");
            conn.refuse(refusal, &shared.settings, Some(reason)).await;
            return;
        }
    };
    // The device's Control session, as a gRPC Control stream would open
    // it: presence, and its commands. Its input carries only the hello;
    // dropping it (with this session) ends the Control session.
    let (control_in, control_input) = mpsc::channel(1);
    let _ = control_in.try_send(Ok(pb::DeviceMessage {
        msg: Some(pb::device_message::Msg::Hello(pb::DeviceHello::default())),
    }));
    let commands = match control::open(
        shared.control.clone(),
        device.clone(),
        ReceiverStream::new(control_input),
        shutdown.clone(),
        None,
        Delivery::ByCaller,
    )
    .await
    {
        Ok(commands) => commands,
        Err(error) => {
            tracing::warn!(?peer, device = %device.id, %error, "MQTT connection refused: its session could not be recorded");
            let reason = Some("the server cannot record the session now; retry".into());
            conn.refuse(Refusal::ServerUnavailable, &shared.settings, reason)
                .await;
            return;
        }
    };
    let kept = Kept::asked(&connect, conn.version);
    let connected = now_unix_nanos();
    let resumed = match resume(&shared, &device, connect.clean_start, kept, connected).await {
        Ok(resumed) => resumed,
        Err(error) => {
            tracing::error!(?peer, device = %device.id, %error, "reading the MQTT session failed");
            let reason = Some("the server cannot read the session now; retry".into());
            conn.refuse(Refusal::ServerUnavailable, &shared.settings, reason)
                .await;
            return;
        }
    };
    let accepted = answer_connect(None, resumed.is_some(), &shared.settings, None);
    if conn.send(&accepted).await.is_err() {
        return;
    }
    let span = tracing::info_span!("mqtt", device = %device.id, version = conn.version.name());
    let keep_alive = connect.keep_alive;
    let receive_maximum = connect.receive_maximum;
    async move {
        tracing::debug!(?peer, keep_alive, "MQTT session open");
        let _open = shared.metrics.stream("mqtt");
        let mut session = Session {
            stream: shared.pipeline.stream(&device),
            device,
            credential: Some(watch),
            pending: VecDeque::new(),
            commands,
            _control_in: control_in,
            subscribed: resumed.is_some_and(|k| k.commands_subscribed),
            summaries: false,
            kept,
            connected,
            held: VecDeque::new(),
            outbound: HashMap::new(),
            next_pkid: 0,
            outbound_max: usize::from(receive_maximum.unwrap_or(u16::MAX)).min(OUTBOUND_MAX),
            shared: shared.clone(),
            // MQTT's keep alive: the server may close a connection silent
            // for one and a half times it.
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
        };
        let end = session.serve(&mut conn, &mut shutdown).await;
        // Batches already handed over commit whatever happened; their
        // answers still go out where the connection allows.
        let settled = session.settle_all(&mut conn, end.writes()).await;
        if let Err(error) = session.leave().await {
            tracing::error!(%error, "recording the end of the MQTT session failed");
        }
        if let (End::Goodbye(why, reason), Ok(())) = (end, settled) {
            tracing::info!(?why, %reason, "MQTT session ended by the server");
            let _ = conn.send(&Outbound::Disconnect { why, reason }).await;
        }
        tracing::debug!("MQTT session closed");
    }
    .instrument(span)
    .await;
}

#[derive(Debug)]
enum ConnectFailed {
    Io,
    Packet(ReadError),
}

fn refuse(metrics: &Metrics, reason: &'static str) {
    metrics
        .mqtt_refusals
        .get_or_create(&ReasonLabel { reason })
        .inc();
}

fn answer_connect(
    refused: Option<Refusal>,
    session_present: bool,
    settings: &MqttSettings,
    reason: Option<String>,
) -> Outbound {
    Outbound::ConnAck {
        refused,
        session_present,
        receive_maximum: settings.receive_maximum,
        max_packet_size: settings.max_packet_bytes as u32,
        reason,
    }
}

/// Checks who the client is: the client id is a device id, the username
/// (if any) the same id, and the password that device's token, or the TLS
/// client certificate bound to it, or both (then they must agree). As
/// ThingsBoard's firmware does, the token may come as the username, with
/// no password.
async fn admit(
    connect: &Connect,
    certificate: Option<&ClientCertificate>,
    shared: &MqttContext,
) -> Result<(DeviceKey, CredentialWatch), (Refusal, String)> {
    let metrics = &shared.metrics;
    let Ok(id) = DeviceId::parse(&connect.client_id) else {
        refuse(metrics, "client_id");
        return Err((
            Refusal::ClientIdNotValid,
            "the client id must be the device id (letters, digits, _ . - :)".into(),
        ));
    };
    let password = connect.password.as_deref().filter(|p| !p.is_empty());
    let token = match (password, connect.username.as_deref()) {
        (Some(_), Some(user)) if user != id.as_str() => {
            refuse(metrics, "username");
            return Err((
                Refusal::BadUsernameOrPassword,
                "the username must be the device id, the same as the client id".into(),
            ));
        }
        (Some(password), _) => Some(TokenHash::of(password)),
        // ThingsBoard's firmware signs in with its access token as the
        // username and no password.
        (None, Some(user)) if user != id.as_str() && !user.is_empty() => Some(TokenHash::of(user)),
        (None, _) => None,
    };
    if token.is_none() && certificate.is_none() {
        refuse(metrics, "no_password");
        return Err((
            Refusal::BadUsernameOrPassword,
            "the password must be the device token (or connect over TLS with the device's bound client certificate)".into(),
        ));
    }
    let authenticated = shared
        .credentials
        .authenticate(certificate, token)
        .await
        .map_err(|failure| {
            metrics
                .auth_failures
                .get_or_create(&ReasonLabel {
                    reason: failure.reason(),
                })
                .inc();
            let refusal = match failure {
                AuthFailure::Unavailable => Refusal::ServerUnavailable,
                AuthFailure::DeviceDisabled(_) | AuthFailure::MtlsRequired(_) => {
                    Refusal::NotAuthorized
                }
                _ => Refusal::BadUsernameOrPassword,
            };
            (refusal, failure.to_string())
        })?;
    if authenticated.key.id != id {
        refuse(metrics, "token_of_another_device");
        return Err((
            Refusal::NotAuthorized,
            format!("the token is not device {id}'s"),
        ));
    }
    let watch = authenticated
        .take_watch()
        .expect("a fresh authentication has its watch");
    Ok((authenticated.key, watch))
}

/// The connection's bytes.
struct Conn<S> {
    io: S,
    /// Read and not yet decoded.
    buf: BytesMut,
    /// Encoded and not yet written.
    out: BytesMut,
    version: Version,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn read_connect(&mut self, settings: &MqttSettings) -> Result<Connect, ConnectFailed> {
        loop {
            match wire::whole_packet(&self.buf, settings.max_packet_bytes) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return Err(ConnectFailed::Packet(e)),
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(ConnectFailed::Io),
                Ok(_) => {}
            }
        }
        self.version = wire::connect_version(&self.buf).map_err(ConnectFailed::Packet)?;
        wire::read_connect(&mut self.buf, self.version).map_err(ConnectFailed::Packet)
    }

    /// The next packet if one is whole in the buffer.
    fn next_packet(&mut self, max: usize) -> Result<Option<Inbound>, ReadError> {
        if wire::whole_packet(&self.buf, max)? {
            wire::read(&mut self.buf, self.version).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Answers the CONNECT with a refusal; the session ends after it, so a
    /// failed write changes nothing.
    async fn refuse(&mut self, refusal: Refusal, settings: &MqttSettings, reason: Option<String>) {
        let answer = answer_connect(Some(refusal), false, settings, reason);
        let _ = self.send(&answer).await;
    }

    async fn send(&mut self, packet: &Outbound) -> std::io::Result<()> {
        wire::write(packet, self.version, &mut self.out);
        if self.out.is_empty() {
            return Ok(());
        }
        let result = self.io.write_all(&self.out).await;
        self.out.clear();
        result
    }
}

/// How a session's serving ended.
enum End {
    /// The client sent DISCONNECT: answers may still be written.
    Closed,
    /// The connection broke or closed: nothing more can be written.
    Gone,
    /// The server ends it, saying why (v5).
    Goodbye(Goodbye, String),
}

impl End {
    fn writes(&self) -> bool {
        !matches!(self, Self::Gone)
    }
}

/// Commands published and not yet acknowledged, at most (fewer if the
/// client's Receive Maximum says so).
const OUTBOUND_MAX: usize = 16;

/// An answer owed to a PUBLISH, in arrival order.
struct Pending {
    /// `None` for QoS 0, which gets no PUBACK.
    pkid: Option<u16>,
    answer: Answer,
}

enum Answer {
    /// Decided without the database: a refusal (v5 only).
    Refused(PubRefusal, String),
    /// Done already (a command's result, recorded).
    Done,
    /// Waits for the batch's group commit.
    Commit {
        receipt: Receipt,
        /// Readings the batch brought and those validation rejected, by
        /// reason, for the counters once it is answered.
        report: BatchReport,
    },
}

struct Session {
    device: DeviceKey,
    stream: DeviceStream,
    credential: Option<CredentialWatch>,
    pending: VecDeque<Pending>,
    /// The device's commands, from its Control session.
    commands: mpsc::Receiver<Outgoing>,
    /// Held so the Control session lasts as long as this one.
    _control_in: mpsc::Sender<Result<pb::DeviceMessage, tonic::Status>>,
    /// Whether the device subscribed to its command topic.
    subscribed: bool,
    /// Whether it subscribed to its batches' summaries.
    summaries: bool,
    /// How long the session outlives the connection.
    kept: Kept,
    /// When the device connected: fences the session's writes.
    connected: UnixNanos,
    /// Commands to publish once subscribed and within `outbound_max`.
    held: VecDeque<CommandRecord>,
    /// Commands published, by packet id, until the device's PUBACK.
    outbound: HashMap<u16, u64>,
    next_pkid: u16,
    outbound_max: usize,
    shared: Arc<MqttContext>,
    keep_alive: Option<Duration>,
}

/// Why a publication is refused, before the database.
enum Refused {
    Topic(TopicError),
    Payload(String),
}

/// What a publication carries.
enum Publication {
    Batch(ValidatedBatch),
    CommandResult {
        command_id: u64,
        state: CommandState,
        detail: String,
    },
}

impl Session {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let max_packet = self.shared.settings.max_packet_bytes;
        let receive_maximum = usize::from(self.shared.settings.receive_maximum.max(1));
        let mut heard = Instant::now();
        loop {
            // Packets already read go first, as long as there is room.
            if self.pending.len() < receive_maximum {
                match conn.next_packet(max_packet) {
                    Ok(Some(packet)) => {
                        heard = Instant::now();
                        match self.handle(packet, conn, shutdown).await {
                            Ok(()) => continue,
                            Err(end) => return end,
                        }
                    }
                    Ok(None) => {}
                    Err(error) => return self.unreadable(error),
                }
            }
            let silent_until = self.keep_alive.map(|k| heard + k);
            let room = self.pending.len() < receive_maximum;
            tokio::select! {
                biased;
                () = stopping(shutdown) => {
                    return End::Goodbye(Goodbye::ServerShuttingDown, "the server is shutting down; reconnect to another or later".into());
                }
                ended = until_ended(&mut self.credential) => {
                    return End::Goodbye(Goodbye::NotAuthorized, format!("credential revoked: {ended}"));
                }
                answered = oldest_answer(&mut self.pending) => {
                    let pending = self.pending.pop_front().expect("answered");
                    if let Err(end) = self.answer(pending, answered, conn).await {
                        return end;
                    }
                    if !room {
                        // The socket was left unread: what the device sent
                        // meanwhile waits there, so its silence is ours.
                        heard = Instant::now();
                    }
                }
                out = self.commands.recv() => match out {
                    Some(Outgoing::Command(command)) => {
                        self.held.push_back(*command);
                        if let Err(end) = self.publish_commands(conn).await {
                            return end;
                        }
                    }
                    Some(Outgoing::End(end)) => return control_ended(*end),
                    None => return End::Goodbye(Goodbye::UnspecifiedError, "the device's command session ended; reconnect".into()),
                },
                read = conn.io.read_buf(&mut conn.buf), if room => match read {
                    Ok(0) | Err(_) => return End::Gone,
                    Ok(_) => {}
                },
                () = sleep_until(silent_until), if room => {
                    return End::Goodbye(Goodbye::KeepAliveTimeout, "nothing heard within one and a half keep-alive periods".into());
                }
            }
        }
    }

    fn unreadable(&self, error: ReadError) -> End {
        let (reason, why) = match error {
            ReadError::TooLarge { .. } => ("packet_too_large", Goodbye::PacketTooLarge),
            _ => ("malformed_packet", Goodbye::MalformedPacket),
        };
        refuse(&self.shared.metrics, reason);
        End::Goodbye(why, error.to_string())
    }

    async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        packet: Inbound,
        conn: &mut Conn<S>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), End> {
        match packet {
            Inbound::Publish(publish) => self.publish(publish, conn.version, shutdown).await,
            Inbound::Subscribe { pkid, filters } => {
                let device = self.device.id.clone();
                let summary_topic = payload::summary_topic(&device);
                let granted: Vec<Option<u8>> = filters
                    .iter()
                    .map(|(filter, qos)| {
                        if *filter == summary_topic {
                            // Summaries go out at QoS 0: they repeat what
                            // the PUBACK already settled.
                            self.summaries = true;
                            Some(0)
                        } else {
                            commands::is_command_filter(filter, &device).then_some((*qos).min(1))
                        }
                    })
                    .collect();
                let commands_granted = filters
                    .iter()
                    .zip(&granted)
                    .any(|((f, _), g)| g.is_some() && commands::is_command_filter(f, &device));
                let refused = granted.iter().any(Option::is_none);
                if refused {
                    refuse(&self.shared.metrics, "subscribe_not_own");
                }
                if commands_granted {
                    self.set_subscribed(true).await?;
                }
                let reason = refused.then(|| {
                    format!("a device subscribes only to its commands, devices/{device}/commands/+")
                });
                send(
                    conn,
                    &Outbound::SubAck {
                        pkid,
                        granted,
                        reason,
                    },
                )
                .await?;
                self.publish_commands(conn).await
            }
            Inbound::Unsubscribe { pkid, filters } => {
                if filters
                    .iter()
                    .any(|f| commands::is_command_filter(f, &self.device.id))
                {
                    self.set_subscribed(false).await?;
                }
                let summary_topic = payload::summary_topic(&self.device.id);
                if filters.contains(&summary_topic) {
                    self.summaries = false;
                }
                let filters = filters.len();
                send(conn, &Outbound::UnsubAck { pkid, filters }).await
            }
            Inbound::PubAck { pkid } => {
                match self.outbound.remove(&pkid) {
                    Some(command_id) => {
                        self.shared.control.mark_sent(command_id, now_unix_nanos());
                    }
                    None => tracing::debug!(pkid, "PUBACK of nothing outstanding, ignored"),
                }
                self.publish_commands(conn).await
            }
            Inbound::PingReq => send(conn, &Outbound::PingResp).await,
            Inbound::Disconnect => Err(End::Closed),
            Inbound::Answer(name) => {
                refuse(&self.shared.metrics, "protocol_error");
                Err(End::Goodbye(
                    Goodbye::ProtocolError,
                    format!("{name} is QoS 2's, which this server does not offer"),
                ))
            }
            Inbound::Unexpected(what) => {
                refuse(&self.shared.metrics, "protocol_error");
                Err(End::Goodbye(
                    Goodbye::ProtocolError,
                    format!("{what} is not expected here"),
                ))
            }
        }
    }

    async fn publish(
        &mut self,
        publish: Publish,
        version: Version,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), End> {
        let metrics = self.shared.metrics.clone();
        if publish.qos > 1 {
            refuse(&metrics, "qos2");
            return Err(End::Goodbye(
                Goodbye::QosNotSupported,
                "QoS 2 is not offered (the CONNACK says Maximum QoS 1): publish at QoS 1; the batch's seq already makes a resend stored once".into(),
            ));
        }
        let pkid = (publish.qos == 1).then_some(publish.pkid);
        let publication = match self.classify(&publish) {
            Ok(publication) => publication,
            Err(refused) => {
                let (reason, code, why, message) = match refused {
                    Refused::Topic(e @ TopicError::NotOwn { .. }) => (
                        "topic_not_own",
                        PubRefusal::NotAuthorized,
                        Goodbye::NotAuthorized,
                        e.to_string(),
                    ),
                    Refused::Topic(e @ TopicError::Unknown { .. }) => (
                        "topic_unknown",
                        PubRefusal::TopicNameInvalid,
                        Goodbye::TopicNameInvalid,
                        e.to_string(),
                    ),
                    Refused::Payload(message) => (
                        "payload_invalid",
                        PubRefusal::PayloadFormatInvalid,
                        Goodbye::PayloadFormatInvalid,
                        message,
                    ),
                };
                refuse(&metrics, reason);
                tracing::info!(topic = %publish.topic, %message, "MQTT publication refused");
                // Only a v5 QoS 1 PUBLISH can be refused alone; otherwise the
                // session ends, which a client notices and logs.
                return match (version, pkid) {
                    (Version::V5, Some(pkid)) => {
                        self.pending.push_back(Pending {
                            pkid: Some(pkid),
                            answer: Answer::Refused(code, message),
                        });
                        Ok(())
                    }
                    _ => Err(End::Goodbye(why, message)),
                };
            }
        };
        let batch = match publication {
            Publication::Batch(batch) => batch,
            Publication::CommandResult {
                command_id,
                state,
                detail,
            } => {
                let device = &self.device;
                if !control::acknowledge(&self.shared.control, device, command_id, state, &detail)
                    .await
                {
                    return Err(End::Goodbye(
                        Goodbye::UnspecifiedError,
                        "the result could not be recorded; publish it again".into(),
                    ));
                }
                self.pending.push_back(Pending {
                    pkid,
                    answer: Answer::Done,
                });
                return Ok(());
            }
        };
        let readings = batch.row_count() as u64;
        let received = batch.report.accepted + batch.report.rejected();
        // Room in the server's budget first, the socket unread meanwhile.
        let admitted = tokio::select! {
            biased;
            () = stopping(shutdown) => return Err(End::Goodbye(Goodbye::ServerShuttingDown, "the server is shutting down".into())),
            admitted = self.shared.pipeline.budget.admit(readings) => admitted,
        };
        let span = tracing::debug_span!("batch", sequence = batch.sequence, readings);
        let receipt = self
            .stream
            .submit(batch.sequence, batch.series, admitted, &span)
            .await
            .map_err(|error| {
                tracing::error!(%error, "the writer refused a batch");
                End::Goodbye(
                    Goodbye::UnspecifiedError,
                    "the server could not take the batch; publish it again".into(),
                )
            })?;
        self.pending.push_back(Pending {
            pkid,
            answer: Answer::Commit {
                receipt,
                report: batch.report,
            },
        });
        // Over its rate the device waits here, its socket unread.
        let hold = self.stream.hold_for(received);
        if !hold.is_zero() {
            tokio::select! {
                biased;
                () = stopping(shutdown) => return Err(End::Goodbye(Goodbye::ServerShuttingDown, "the server is shutting down".into())),
                () = tokio::time::sleep(hold) => {}
            }
            metrics.upload_throttled_seconds.inc_by(hold.as_secs_f64());
        }
        Ok(())
    }

    /// What a publication carries, or why it is refused.
    fn classify(&self, publish: &Publish) -> Result<Publication, Refused> {
        let topic = payload::publish_topic(
            &publish.topic,
            &self.device.id,
            publish.content_type.as_deref(),
        )
        .map_err(Refused::Topic)?;
        let limits = &self.shared.pipeline.limits;
        let raw = match topic {
            Topic::Readings(encoding) => payload::decode(
                &publish.payload,
                encoding,
                publish.seq_property.as_deref(),
                limits.max_batch_series,
            )
            .map_err(|e: PayloadError| Refused::Payload(e.to_string()))?,
            Topic::ThingsBoard => {
                let telemetry = thingsboard::parse(&publish.payload, now_unix_nanos() as u64)
                    .map_err(|e| Refused::Payload(e.to_string()))?;
                if telemetry.not_numbers > 0 {
                    self.shared
                        .metrics
                        .mqtt_refusals
                        .get_or_create(&ReasonLabel {
                            reason: "telemetry_not_a_number",
                        })
                        .inc_by(telemetry.not_numbers);
                }
                let sequence = match publish.seq_property.as_deref() {
                    Some(s) => Some(s.trim().parse().map_err(|_| {
                        Refused::Payload(PayloadError::SeqProperty(s.to_owned()).to_string())
                    })?),
                    None => None,
                };
                payload::Decoded {
                    sequence,
                    series: telemetry.series,
                }
            }
            Topic::CommandResult(command_id) => {
                let (state, detail) = commands::decode_result(command_id, &publish.payload)
                    .map_err(|e| Refused::Payload(e.to_string()))?;
                return Ok(Publication::CommandResult {
                    command_id,
                    state,
                    detail,
                });
            }
        };
        if raw.series.len() > limits.max_batch_series {
            return Err(Refused::Payload(format!(
                "the batch has more than {} series, the server's limit per batch (--max-batch-series)",
                limits.max_batch_series
            )));
        }
        // Without a sequence of its own, the batch takes the next one when
        // it commits; it is validated as the first (any number would do).
        let mut batch = validate_batch(
            raw.sequence.unwrap_or(1),
            raw.series,
            limits,
            now_unix_nanos(),
        )
        .map_err(|e| Refused::Payload(e.to_string()))?;
        if raw.sequence.is_none() {
            batch.sequence = NEXT_SEQUENCE;
        }
        Ok(Publication::Batch(batch))
    }

    /// Records a subscription change, in the kept session first: a
    /// subscription acknowledged is one a restart keeps.
    async fn set_subscribed(&mut self, subscribed: bool) -> Result<(), End> {
        if self.subscribed != subscribed && self.kept != Kept::No {
            self.record(subscribed).await.map_err(|error| {
                tracing::error!(%error, "recording the MQTT subscription failed");
                End::Goodbye(
                    Goodbye::UnspecifiedError,
                    "the subscription could not be recorded; subscribe again".into(),
                )
            })?;
        }
        self.subscribed = subscribed;
        Ok(())
    }

    /// Keeps the session past its connection, if it is to be kept.
    async fn leave(&self) -> Result<(), StorageError> {
        if self.kept == Kept::No {
            // Recorded as ended at connect already.
            return Ok(());
        }
        self.record(self.subscribed).await
    }

    async fn record(&self, subscribed: bool) -> Result<(), StorageError> {
        let session = KeptSession {
            commands_subscribed: subscribed,
        };
        self.shared
            .pipeline
            .store
            .record_mqtt_session(
                self.device.pk,
                session,
                self.kept.until(self.connected),
                self.connected,
            )
            .await
    }

    /// Publishes held commands while subscribed and within the window.
    async fn publish_commands<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
    ) -> Result<(), End> {
        while self.subscribed && self.outbound.len() < self.outbound_max {
            let Some(command) = self.held.pop_front() else {
                break;
            };
            let pkid = self.free_pkid();
            self.outbound.insert(pkid, command.command_id);
            let packet = Outbound::Publish {
                topic: commands::command_topic(&self.device.id, command.command_id),
                qos: 1,
                pkid,
                payload: commands::command_json(&command),
            };
            send(conn, &packet).await?;
        }
        Ok(())
    }

    /// A packet id (1 to 65535) no outstanding command holds.
    fn free_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.outbound.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Writes the answer to the oldest PUBLISH and counts what became of it.
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        pending: Pending,
        answered: Option<CommitResult>,
        conn: &mut Conn<S>,
    ) -> Result<(), End> {
        let metrics = self.shared.metrics.clone();
        let mut summary = None;
        let refused = match (pending.answer, answered) {
            (Answer::Refused(code, reason), _) => Some((code, reason)),
            (Answer::Done, _) => None,
            (Answer::Commit { report, .. }, Some(Ok(outcome))) => {
                let report = count(&metrics, report, &outcome);
                if self.summaries {
                    summary = Some(payload::summary_json(&report, &outcome));
                }
                None
            }
            (Answer::Commit { report, .. }, _) => {
                metrics.batch("failed");
                metrics.reading(
                    "rejected",
                    "commit_failed",
                    report.accepted + report.rejected(),
                );
                // Not acknowledged: the client publishes it again on its
                // next connection, as MQTT has it do.
                return Err(End::Goodbye(
                    Goodbye::UnspecifiedError,
                    "a batch could not be committed; publish it again".into(),
                ));
            }
        };
        if let Some(pkid) = pending.pkid {
            let (refused, reason) = match refused {
                Some((code, reason)) => (Some(code), Some(reason)),
                None => (None, None),
            };
            let ack = Outbound::PubAck {
                pkid,
                refused,
                reason,
            };
            send(conn, &ack).await?;
        }
        if let Some(payload) = summary {
            let packet = Outbound::Publish {
                topic: payload::summary_topic(&self.device.id),
                qos: 0,
                pkid: 0,
                payload,
            };
            send(conn, &packet).await?;
        }
        Ok(())
    }

    /// Waits for every pending answer, writing each while `writes`.
    async fn settle_all<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        mut writes: bool,
    ) -> Result<(), End> {
        let mut result = Ok(());
        while !self.pending.is_empty() {
            let answered = oldest_answer(&mut self.pending).await;
            let pending = self.pending.pop_front().expect("answered");
            if !writes {
                // Counted all the same.
                if let (Answer::Commit { report, .. }, Some(Ok(outcome))) =
                    (pending.answer, answered)
                {
                    count(&self.shared.metrics, report, &outcome);
                }
                continue;
            }
            if let Err(end) = self.answer(pending, answered, conn).await {
                writes = false;
                result = Err(end);
            }
        }
        result
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    packet: &Outbound,
) -> Result<(), End> {
    conn.send(packet).await.map_err(|_| End::Gone)
}

/// Resolves with the oldest pending answer (`None` if its writer went
/// away); pending while there is none.
async fn oldest_answer(pending: &mut VecDeque<Pending>) -> Option<CommitResult> {
    match pending.front_mut() {
        Some(Pending {
            answer: Answer::Commit { receipt, .. },
            ..
        }) => receipt.await.ok(),
        Some(Pending {
            answer: Answer::Refused(..) | Answer::Done,
            ..
        }) => None,
        None => std::future::pending().await,
    }
}

/// Resolves once the server begins shutting down. Its guard is dropped
/// inside, which keeps a session's future `Send`.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Counts a committed or duplicate batch as the gRPC upload does; the
/// batch's report as stored (series refused at commit included).
fn count(metrics: &Metrics, mut report: BatchReport, outcome: &BatchOutcome) -> BatchReport {
    match outcome {
        BatchOutcome::Committed { refused_series, .. } => {
            if !refused_series.is_empty() {
                report.refuse_series(refused_series, RejectReason::TooManySensors);
            }
            metrics.batch("committed");
            metrics.reading("committed", "", report.accepted);
            for reason in RejectReason::ALL {
                metrics.reading("rejected", reason.name(), report.rejected_for(reason));
            }
        }
        BatchOutcome::Duplicate { .. } => {
            metrics.batch("duplicate");
            metrics.reading("duplicate", "", report.accepted + report.rejected());
        }
    }
    report
}

/// How a session ends when its Control session ends from outside.
fn control_ended(end: SessionEnd) -> End {
    match end {
        SessionEnd::Superseded => End::Goodbye(
            Goodbye::SessionTakenOver,
            "a newer connection of this device took over".into(),
        ),
        SessionEnd::Rebalance => End::Goodbye(
            Goodbye::MaximumConnectTime,
            "the connection reached its lifetime (--control-max-lifetime); reconnect".into(),
        ),
        SessionEnd::ShuttingDown => End::Goodbye(
            Goodbye::ServerShuttingDown,
            "the server is shutting down; reconnect to another or later".into(),
        ),
        SessionEnd::CredentialEnded(ended) => End::Goodbye(
            Goodbye::NotAuthorized,
            format!("credential revoked: {ended}"),
        ),
        SessionEnd::Refused(refused) => End::Goodbye(Goodbye::ProtocolError, refused.to_string()),
    }
}

/// How long a session outlives its connection, as its CONNECT asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// Not past the connection.
    No,
    For(Duration),
    Forever,
}

impl Kept {
    fn asked(connect: &Connect, version: Version) -> Self {
        match version {
            // 3.1.1: Clean Session 0 keeps the session with no expiry.
            Version::V311 if connect.clean_start => Self::No,
            Version::V311 => Self::Forever,
            Version::V5 => match connect.session_expiry {
                None | Some(0) => Self::No,
                Some(u32::MAX) => Self::Forever,
                Some(seconds) => Self::For(Duration::from_secs(u64::from(seconds))),
            },
        }
    }

    /// Until when the session is kept, from now (`None`: for good). One
    /// not kept past its connection ends when it began.
    fn until(self, connected: UnixNanos) -> Option<UnixNanos> {
        match self {
            Self::No => Some(connected),
            Self::Forever => None,
            Self::For(d) => {
                Some(now_unix_nanos().saturating_add(d.as_nanos().min(i64::MAX as u128) as i64))
            }
        }
    }
}

/// The kept session a CONNECT continues, if any: a clean start forgets it.
/// The session is recorded at once, so a crash keeps one that is to be
/// kept, and an older connection's late writes are fenced off.
async fn resume(
    shared: &MqttContext,
    device: &DeviceKey,
    clean_start: bool,
    kept: Kept,
    connected: UnixNanos,
) -> Result<Option<KeptSession>, StorageError> {
    let store = &shared.pipeline.store;
    let resumed = if clean_start {
        None
    } else {
        store.mqtt_session(device.pk, connected).await?
    };
    let session = resumed.unwrap_or(KeptSession {
        commands_subscribed: false,
    });
    store
        .record_mqtt_session(device.pk, session, kept.until(connected), connected)
        .await?;
    Ok(resumed)
}
