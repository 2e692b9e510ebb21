//! `telemetry.v1.Ingest`: the device-facing service. The caller's identity
//! is always the authenticated device, never a request field.

use std::pin::Pin;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use telemetry_proto::v1 as pb;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::command_messages::command_to_pb;
use super::{convert, status};
use crate::auth::{self, CredentialWatch};
use crate::control::CommandCenter;
use crate::control::session::{self, Delivery, Outgoing};
use crate::domain::{DeviceKey, UploadTally};
use crate::observability;
use crate::pipeline::{Pipeline, UploadFailure, upload};

/// Cheap to clone: an upload stream's future holds one for as long as the
/// stream lasts, one per connected device.
#[derive(Clone)]
pub struct IngestService(Arc<Shared>);

struct Shared {
    ctx: Pipeline,
    control: Arc<CommandCenter>,
    shutdown: watch::Receiver<bool>,
}

impl IngestService {
    pub fn new(ctx: Pipeline, control: Arc<CommandCenter>) -> Self {
        let shutdown = ctx.shutdown.clone();
        Self(Arc::new(Shared {
            ctx,
            control,
            shutdown,
        }))
    }
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::ingest_server::Ingest for IngestService {
    async fn upload_readings(
        &self,
        request: Request<Streaming<pb::ReadingBatch>>,
    ) -> Result<Response<pb::UploadSummary>, Status> {
        self.upload_call(request).await
    }

    type ControlStream = ControlStream;

    async fn control(
        &self,
        request: Request<Streaming<pb::DeviceMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        // The session's task (control::session) runs in it too: it lasts as
        // long as the stream.
        let span = tracing::info_span!("control", device = tracing::field::Empty);
        observability::follow_caller(&span, request.metadata());
        self.open_control(request).instrument(span).await
    }

    async fn get_upload_cursor(
        &self,
        request: Request<pb::GetUploadCursorRequest>,
    ) -> Result<Response<pb::UploadCursor>, Status> {
        let device = &auth::device(&request)?.key;
        let committed_sequence = self
            .0
            .ctx
            .store
            .committed_sequence(device.pk)
            .await
            .map_err(status::storage)?;
        Ok(Response::new(pb::UploadCursor {
            device_id: device.id.as_str().to_owned(),
            committed_sequence,
        }))
    }
}

impl IngestService {
    /// `UploadReadings`, as [`super::IngestRoutes`] and the generated
    /// service both serve it. The request
    /// is taken apart before the stream's future is made, and the future
    /// owns each part once and lends it down: it lives as long as the
    /// stream, one per connected device, and nested `async fn`s taking the
    /// parts by value kept a copy at every level (docs/memory.md).
    pub fn upload_call(
        &self,
        request: Request<Streaming<pb::ReadingBatch>>,
    ) -> BoxFuture<'static, Result<Response<pb::UploadSummary>, Status>> {
        let (span, accepted) = self.accept_upload(request);
        let (device, mut credential, messages) = match accepted {
            Ok(parts) => parts,
            Err(status) => return Box::pin(std::future::ready(Err(status))),
        };
        let shared = self.0.clone();
        Box::pin(
            async move {
                let mut messages = messages.map(|m| m.map(convert::raw_batch));
                let result =
                    upload::run(&mut messages, &device, &mut credential, &shared.ctx).await;
                summarize(result)
            }
            .instrument(span),
        )
    }

    /// The stream's device and its credential watch, once the device is
    /// authenticated and within its stream-open rate; the current span
    /// names the device.
    fn admit<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(DeviceKey, Option<CredentialWatch>), Status> {
        let caller = auth::device(request)?;
        let (device, credential) = (caller.key.clone(), caller.take_watch());
        tracing::Span::current().record("device", device.id.as_str());
        self.0
            .ctx
            .rate_limits
            .open_stream(device.pk)
            .map_err(status::stream_rate_exceeded)?;
        Ok((device, credential))
    }

    /// Authenticates an upload stream and admits it under the device's
    /// stream-open rate; the stream's span (made by hand rather than by
    /// `instrument`: the caller's traceparent must become its parent before
    /// it is first entered) names the device.
    #[allow(clippy::type_complexity)]
    fn accept_upload(
        &self,
        request: Request<Streaming<pb::ReadingBatch>>,
    ) -> (
        tracing::Span,
        Result<
            (
                DeviceKey,
                Option<CredentialWatch>,
                Streaming<pb::ReadingBatch>,
            ),
            Status,
        >,
    ) {
        let span = tracing::info_span!("upload_readings", device = tracing::field::Empty);
        observability::follow_caller(&span, request.metadata());
        let accepted = span.in_scope(|| -> Result<_, Status> {
            let (device, credential) = self.admit(&request)?;
            Ok((device, credential, request.into_inner()))
        });
        (span, accepted)
    }

    async fn open_control(
        &self,
        request: Request<Streaming<pb::DeviceMessage>>,
    ) -> Result<Response<ControlStream>, Status> {
        let (device, credential) = self.admit(&request)?;
        let outgoing = session::open(
            self.0.control.clone(),
            device,
            request.into_inner(),
            self.0.shutdown.clone(),
            credential,
            Delivery::OnWrite,
        )
        .await?;
        let stream = ReceiverStream::new(outgoing).map(|out| match out {
            Outgoing::Command(c) => Ok(pb::ServerMessage {
                msg: Some(pb::server_message::Msg::Command(command_to_pb(&c))),
            }),
            Outgoing::End(end) => Err(Status::from(*end)),
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The stream's summary, or why it ended early.
fn summarize(
    result: Result<UploadTally, UploadFailure>,
) -> Result<Response<pb::UploadSummary>, Status> {
    match result {
        Ok(tally) => {
            tracing::debug!(
                batches = tally.batches_received,
                accepted = tally.readings_accepted,
                rejected = tally.readings_rejected(),
                duplicates = tally.duplicate_batches,
                "upload complete"
            );
            Ok(Response::new(convert::summary(tally)))
        }
        Err(failure) => {
            tracing::info!(error = %failure.error, committed = failure.committed_sequence, "upload ended early");
            Err(failure.into())
        }
    }
}
