//! `telemetry.v1.Ingest`: the device-facing service. The caller's identity
//! is always the authenticated device, never a request field.

use std::pin::Pin;

use futures::Stream;
use telemetry_proto::v1 as pb;
use tonic::{Request, Response, Status, Streaming};

use super::{convert, status};
use crate::auth;
use crate::upload::{self, UploadContext};

pub struct IngestService {
    ctx: UploadContext,
}

impl IngestService {
    pub fn new(ctx: UploadContext) -> Self {
        Self { ctx }
    }
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::ingest_server::Ingest for IngestService {
    #[tracing::instrument(skip_all, fields(device = tracing::field::Empty))]
    async fn upload_readings(
        &self,
        request: Request<Streaming<pb::ReadingBatch>>,
    ) -> Result<Response<pb::UploadSummary>, Status> {
        let device = auth::device(&request)?.clone();
        tracing::Span::current().record("device", device.id.as_str());
        match upload::run(request.into_inner(), &device, &self.ctx).await {
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

    type ControlStream = ControlStream;

    async fn control(
        &self,
        _request: Request<Streaming<pb::DeviceMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        Err(Status::unimplemented(
            "Ingest.Control is not available in this server version",
        ))
    }

    async fn get_upload_cursor(
        &self,
        request: Request<pb::GetUploadCursorRequest>,
    ) -> Result<Response<pb::UploadCursor>, Status> {
        let device = auth::device(&request)?;
        let committed_sequence = self
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
