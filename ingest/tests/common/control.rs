//! A test device on the Control stream: it says hello, receives commands
//! and acknowledges them; and the operator's side, sending a command.

use std::time::Duration;

use telemetry_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Ingest, Ops, TestServer};

/// How long [`ControlDevice::next`] waits for a command.
pub const COMMAND_WAIT: Duration = Duration::from_secs(10);

/// The first message of a Control stream.
pub fn hello(firmware: &str) -> pb::DeviceMessage {
    pb::DeviceMessage {
        msg: Some(pb::device_message::Msg::Hello(pb::DeviceHello {
            firmware_version: firmware.into(),
            capabilities: vec!["ping".into()],
            config: None,
        })),
    }
}

/// A device's acknowledgement of command `command_id`.
pub fn ack(command_id: u64, state: pb::CommandAckState, detail: &str) -> pb::DeviceMessage {
    pb::DeviceMessage {
        msg: Some(pb::device_message::Msg::Ack(pb::CommandAck {
            command_id,
            state: state as i32,
            detail: detail.into(),
        })),
    }
}

pub fn ping() -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::Ping(pb::Ping {})),
        ..Default::default()
    }
}

/// Ops SendCommand: `command` to `device`, waiting up to `wait_millis` for
/// its acknowledgement.
pub async fn send_command(
    ops: &mut Ops,
    device: &str,
    command: pb::Command,
    ttl_millis: u64,
    wait_millis: u64,
) -> Result<pb::Command, tonic::Status> {
    ops.send_command(pb::SendCommandRequest {
        device_id: device.into(),
        command: Some(command),
        ttl_millis,
        wait_millis,
    })
    .await
    .map(tonic::Response::into_inner)
}

/// A device holding its Control stream open.
pub struct ControlDevice {
    /// Up: acknowledgements; dropping it hangs up.
    pub tx: mpsc::Sender<pb::DeviceMessage>,
    /// Down: commands, and the status the stream ends with.
    pub rx: tonic::Streaming<pb::ServerMessage>,
}

/// Opens a Control stream on `client` whose first messages are `first`.
/// The sender keeps the stream open, whether or not it was refused.
pub async fn open_control(
    mut client: Ingest,
    first: Vec<pb::DeviceMessage>,
) -> (
    mpsc::Sender<pb::DeviceMessage>,
    Result<tonic::Streaming<pb::ServerMessage>, tonic::Status>,
) {
    let (tx, rx) = mpsc::channel(16);
    for message in first {
        tx.send(message).await.unwrap();
    }
    let opened = client
        .control(ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    (tx, opened)
}

impl ControlDevice {
    /// Opens a Control stream on `client`, `hello(firmware)` first.
    pub async fn open(client: Ingest, firmware: &str) -> Result<Self, tonic::Status> {
        let (tx, opened) = open_control(client, vec![hello(firmware)]).await;
        Ok(Self { tx, rx: opened? })
    }

    /// Opens a Control stream on `server` with `token`, firmware `test-1.2`.
    pub async fn connect(server: &TestServer, token: &str) -> Self {
        Self::open(server.ingest(token).await, "test-1.2")
            .await
            .unwrap()
    }

    /// The next command; `Err` when the stream ends with a status (an OK
    /// one when it ends cleanly). Panics after [`COMMAND_WAIT`].
    pub async fn next(&mut self) -> Result<pb::Command, tonic::Status> {
        self.next_within(COMMAND_WAIT).await
    }

    /// [`Self::next`], panicking after `within`.
    pub async fn next_within(&mut self, within: Duration) -> Result<pb::Command, tonic::Status> {
        let message = tokio::time::timeout(within, self.rx.message())
            .await
            .unwrap_or_else(|_| panic!("no command and no end within {within:?}"))?;
        match message {
            Some(pb::ServerMessage {
                msg: Some(pb::server_message::Msg::Command(c)),
            }) => Ok(c),
            Some(other) => panic!("unexpected server message {other:?}"),
            None => Err(tonic::Status::ok("the stream ended")),
        }
    }

    /// The next command, which must come.
    pub async fn command(&mut self) -> pb::Command {
        self.next().await.expect("a command")
    }

    pub async fn ack(&self, command_id: u64, state: pb::CommandAckState, detail: &str) {
        self.tx.send(ack(command_id, state, detail)).await.unwrap();
    }
}
