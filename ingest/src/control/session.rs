//! One device's Control stream: Hello first, then status and
//! acknowledgements up, commands down.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use futures::{Stream, StreamExt};
use telemetry_proto::v1 as pb;
use tokio::sync::{Notify, mpsc, watch};
use tracing::Instrument;

use super::center::{CommandCenter, SessionEnd, SessionSlot, until_set};
use crate::auth::{CredentialWatch, until_ended};
use crate::cluster::jittered;
use crate::domain::DeviceKey;
use crate::domain::command::CommandState;
use crate::domain::device_message::{self, InvalidDeviceMessage};
use crate::domain::text::Text;
use crate::domain::time::now_unix_nanos;
use crate::storage::cluster::{SessionOpen, SessionTicket};
use crate::storage::commands::CommandRecord;

/// What a session writes to its stream.
///
/// Boxed: tokio's channel allocates its slots 32 at a time whatever its
/// bound, so every Control session paid 32 inline commands (about 5 KiB)
/// for a queue that is almost always empty.
#[derive(Debug)]
pub enum Outgoing {
    Command(Box<CommandRecord>),
    End(Box<SessionEnd>),
}

/// Why a stream could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the first message on a Control stream must be DeviceHello")]
    NoHello,
    #[error(
        "no DeviceHello within {0:?} of opening the Control stream (the server's --control-hello-timeout)"
    )]
    HelloTimeout(std::time::Duration),
    #[error(transparent)]
    InvalidHello(#[from] InvalidDeviceMessage),
    #[error("{}", .0.message())]
    Transport(tonic::Status),
    /// Recording the stream failed; the cause is logged.
    #[error("the Control stream could not be recorded")]
    NotRecorded,
}

/// When a command counts as delivered (SENT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Once the session hands it to its stream (gRPC: HTTP/2 delivers it
    /// or the stream breaks).
    OnWrite,
    /// When the caller says so with [`CommandCenter::mark_sent`] (MQTT: on
    /// the device's PUBACK).
    ByCaller,
}

/// Starts a session once the device has said hello.
pub async fn open<S>(
    center: Arc<CommandCenter>,
    device: DeviceKey,
    mut incoming: S,
    shutdown: watch::Receiver<bool>,
    credential: Option<CredentialWatch>,
    delivery: Delivery,
) -> Result<mpsc::Receiver<Outgoing>, OpenError>
where
    S: Stream<Item = Result<pb::DeviceMessage, tonic::Status>> + Unpin + Send + 'static,
{
    let hello_timeout = center.config.hello_timeout;
    let first = tokio::time::timeout(hello_timeout, incoming.next())
        .await
        .map_err(|_| OpenError::HelloTimeout(hello_timeout))?;
    let hello = match first {
        Some(Ok(pb::DeviceMessage {
            msg: Some(pb::device_message::Msg::Hello(hello)),
        })) => hello,
        Some(Err(status)) => return Err(OpenError::Transport(status)),
        Some(Ok(_)) | None => return Err(OpenError::NoHello),
    };
    let firmware = check_hello(&hello)?;
    let seen = now_unix_nanos();
    let ticket = center
        .open_session(SessionOpen {
            device_pk: device.pk,
            at: seen,
            firmware: firmware.as_ref().map(|f| f.as_str().to_owned()),
        })
        .await
        .map_err(|error| {
            tracing::error!(%error, device = %device.id, "recording the Control stream failed");
            OpenError::NotRecorded
        })?;
    let wake = Arc::new(Notify::new());
    let last_seen = Arc::new(AtomicI64::new(seen));
    let (end_tx, end) = watch::channel(None);
    {
        let mut sessions = center.sessions.lock().expect("lock poisoned");
        match sessions.get(&device.pk) {
            // A newer stream of the device got here first: this one is over
            // before it starts.
            Some(newer) if newer.generation > ticket.generation => {
                end_tx.send_replace(Some(SessionEnd::Superseded));
            }
            // ... or a newer one on another process, heard of already.
            _ if center.newest_heard(device.pk) > ticket.generation => {
                end_tx.send_replace(Some(SessionEnd::Superseded));
            }
            _ => {
                let slot = SessionSlot {
                    generation: ticket.generation,
                    wake: wake.clone(),
                    end: end_tx,
                    last_seen: last_seen.clone(),
                    last_seen_stored: seen,
                };
                if let Some(previous) = sessions.insert(device.pk, slot) {
                    tracing::info!(device = %device.id, "a newer Control stream supersedes the open one");
                    previous.end.send_replace(Some(SessionEnd::Superseded));
                }
                center.sessions_changed(sessions.len());
            }
        }
    }
    tracing::info!(device = %device.id, firmware = firmware.as_ref().map(|f| f.as_str()), "device online");
    let (tx, rx) = mpsc::channel(16);
    // Deliver what is waiting at once.
    wake.notify_one();
    // In the Control call's span (grpc/ingest.rs), so that the span lasts
    // as long as the stream and its events are the session's.
    tokio::spawn(
        run(
            center, device, ticket, incoming, wake, end, last_seen, tx, shutdown, credential,
            delivery,
        )
        .in_current_span(),
    );
    Ok(rx)
}

#[allow(clippy::too_many_arguments)]
async fn run<S>(
    center: Arc<CommandCenter>,
    device: DeviceKey,
    ticket: SessionTicket,
    mut incoming: S,
    wake: Arc<Notify>,
    mut end: watch::Receiver<Option<SessionEnd>>,
    last_seen: Arc<AtomicI64>,
    tx: mpsc::Sender<Outgoing>,
    mut shutdown: watch::Receiver<bool>,
    mut credential: Option<CredentialWatch>,
    delivery: Delivery,
) where
    S: Stream<Item = Result<pb::DeviceMessage, tonic::Status>> + Unpin,
{
    let _open = center.metrics.stream("control");
    // Ids written to this stream: a wake-up does not repeat them here.
    let mut written = HashSet::new();
    let stale = end.clone();
    let lifetime = async {
        match center.config.max_lifetime {
            Some(max) => tokio::time::sleep(jittered(max)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(lifetime);
    let end = loop {
        tokio::select! {
            biased;
            ended = ended(&mut end) => break Some(ended),
            () = until_set(&mut shutdown) => break Some(SessionEnd::ShuttingDown),
            // After the messages already handled: their acks are recorded.
            ended = until_ended(&mut credential) => {
                tracing::info!(device = %device.id, %ended, "credential revoked; ending the Control stream");
                break Some(SessionEnd::CredentialEnded(ended));
            }
            // Boxed, as `handle` and the goodbye below: a session spends its
            // life waiting, and its task would otherwise be as large as
            // the largest database call it ever makes.
            () = wake.notified() => {
                if !Box::pin(deliver(&center, &device, &stale, &tx, &mut written, delivery)).await {
                    break None;
                }
            }
            message = incoming.next() => match message {
                Some(Ok(message)) => {
                    // Written to the database with all sessions' (`LAST_SEEN_WRITE_INTERVAL`).
                    last_seen.store(now_unix_nanos(), Ordering::Relaxed);
                    if let Err(refused) = Box::pin(handle(&center, &device, message)).await {
                        tracing::info!(device = %device.id, error = %refused, "Control message refused; ending the stream");
                        break Some(SessionEnd::Refused(refused));
                    }
                }
                Some(Err(_)) | None => break None,
            },
            () = tx.closed() => break None,
            () = &mut lifetime => {
                tracing::info!(device = %device.id, "Control stream reached its lifetime; the device reconnects");
                break Some(SessionEnd::Rebalance);
            }
        }
    };
    if let Some(end) = end {
        let _ = tx.send(Outgoing::End(Box::new(end))).await;
    }
    let current = {
        let mut sessions = center.sessions.lock().expect("lock poisoned");
        let current = sessions
            .get(&device.pk)
            .is_some_and(|s| s.generation == ticket.generation);
        if current {
            sessions.remove(&device.pk);
            center.sessions_changed(sessions.len());
        }
        current
    };
    // A superseded session leaves presence to its successor, here or on
    // another process; the database checks the generation again, so a late
    // goodbye never marks a device offline that reconnected elsewhere.
    if current {
        match center.close_session((ticket, now_unix_nanos())).await {
            Ok(true) => tracing::info!(device = %device.id, "device offline"),
            Ok(false) => {}
            Err(error) => tracing::error!(%error, "recording presence failed"),
        }
    }
}

/// Resolves when the stream is ended from outside.
async fn ended(end: &mut watch::Receiver<Option<SessionEnd>>) -> SessionEnd {
    match end.wait_for(Option::is_some).await {
        Ok(set) => set.clone().unwrap_or(SessionEnd::Superseded),
        // The sender lives in the session's slot: gone means replaced.
        Err(_) => SessionEnd::Superseded,
    }
}

/// Writes the device's deliverable commands, oldest first. False if the
/// stream is gone.
async fn deliver(
    center: &Arc<CommandCenter>,
    device: &DeviceKey,
    superseded: &watch::Receiver<Option<SessionEnd>>,
    tx: &mpsc::Sender<Outgoing>,
    written: &mut HashSet<u64>,
    delivery: Delivery,
) -> bool {
    let commands = match center
        .store
        .deliverable_commands(device.pk, now_unix_nanos())
        .await
    {
        Ok(commands) => commands,
        Err(error) => {
            tracing::error!(%error, "reading deliverable commands failed");
            return true;
        }
    };
    for command in commands {
        if written.contains(&command.command_id) {
            continue;
        }
        // Never write to a stream a newer one has replaced.
        if superseded.borrow().is_some() {
            return true;
        }
        let now = now_unix_nanos();
        // Past its deadline a queued command is the sweeper's to expire;
        // it is never delivered late.
        if command.state == CommandState::Queued && command.expires <= now {
            continue;
        }
        let id = command.command_id;
        written.insert(id);
        let mut command = command;
        command.state = CommandState::Sent;
        command.sent.get_or_insert(now);
        if tx.send(Outgoing::Command(Box::new(command))).await.is_err() {
            return false;
        }
        // Recorded after the write and beside the session, off the
        // command's critical path; its acknowledgement need not wait behind
        // this one (an acknowledgement recorded first keeps its state; the
        // delivery time is filled in).
        if delivery == Delivery::OnWrite {
            center.mark_sent(id, now);
        }
    }
    true
}

/// Checks a DeviceHello against the limits; its firmware version, if any.
fn check_hello(hello: &pb::DeviceHello) -> Result<Option<Text>, InvalidDeviceMessage> {
    let firmware = device_message::firmware_version(&hello.firmware_version)?;
    let disabled = hello
        .config
        .as_ref()
        .map_or(&[][..], |c| &c.disabled_sensors[..]);
    device_message::hello_lists(&hello.capabilities, disabled)?;
    Ok(firmware)
}

/// Acts on one message; refuses (storing nothing of it) one past the limits.
async fn handle(
    center: &CommandCenter,
    device: &DeviceKey,
    message: pb::DeviceMessage,
) -> Result<(), InvalidDeviceMessage> {
    let Some(msg) = message.msg else {
        return Ok(());
    };
    match msg {
        // A repeated hello changes nothing, but is held to the same limits.
        pb::device_message::Msg::Hello(hello) => {
            check_hello(&hello)?;
        }
        pb::device_message::Msg::Status(status) => {
            device_message::status(status.battery_percent, status.signal_dbm)?;
        }
        pb::device_message::Msg::Ack(ack) => {
            let detail = device_message::ack_detail(ack.command_id, &ack.detail)?;
            let state = match ack.state() {
                pb::CommandAckState::Accepted | pb::CommandAckState::Done => CommandState::Acked,
                pb::CommandAckState::Failed => CommandState::Failed,
                pb::CommandAckState::Unspecified => return Ok(()),
            };
            acknowledge(center, device, ack.command_id, state, detail.as_str()).await;
        }
    }
    Ok(())
}

/// Records a device's acknowledgement of one of its commands. Not this
/// device's command, or one already final, is ignored, so a device can
/// never settle another device's command. False only if it could not be
/// recorded (the cause is logged): the device should send it again.
pub async fn acknowledge(
    center: &CommandCenter,
    device: &DeviceKey,
    command_id: u64,
    state: CommandState,
    detail: &str,
) -> bool {
    match center
        .store
        .ack_command(device.pk, command_id, state, detail, now_unix_nanos())
        .await
    {
        Ok(Some(command)) => {
            tracing::info!(
                command_id = command.command_id,
                state = state.as_str(),
                "command acknowledged"
            );
            center.changed(command.command_id, command.state);
            true
        }
        Ok(None) => {
            tracing::warn!(device = %device.id, command_id, "acknowledgement ignored");
            true
        }
        Err(error) => {
            tracing::error!(%error, "recording an acknowledgement failed");
            false
        }
    }
}
