//! `UploadReadings` decodes its batches here rather than in the generated
//! code, to bound the memory a message can make the server allocate.
//!
//! Protobuf lets a 2-byte field become a 96-byte `SensorSeries` (plus the
//! vector's growth): a 4 MiB message of empty series decodes to over 200 MiB.
//! Counting series while decoding stops such a message at
//! `--max-batch-series` before it costs more than a few kilobytes; past that
//! cap every field decodes to at most about its own size (packed or unpacked
//! numbers, strings), so a batch costs at most about twice its encoded size.
//!
//! The generated server still serves the other methods; [`IngestRoutes`]
//! sends `UploadReadings` calls here and everything else to it.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use futures::future::BoxFuture;
use prost::Message;
use prost::encoding::{DecodeContext, decode_key, message};
use telemetry_proto::v1 as pb;
use telemetry_proto::v1::ingest_server::IngestServer;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming};
use tonic::server::{ClientStreamingService, NamedService};

use super::IngestService;
use super::compression::compressed;

const UPLOAD_PATH: &str = "/telemetry.v1.Ingest/UploadReadings";
/// `ReadingBatch.series`.
const SERIES_TAG: u32 = 2;

/// Why a batch could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum BatchDecodeError {
    #[error(
        "the batch has more than {max} series, the server's limit per batch (--max-batch-series); send a sensor's readings in one series, or smaller batches"
    )]
    TooManySeries { max: usize },
    #[error("failed to decode Protobuf message: {0}")]
    Malformed(#[from] prost::DecodeError),
}

impl From<BatchDecodeError> for Status {
    fn from(e: BatchDecodeError) -> Self {
        match e {
            BatchDecodeError::TooManySeries { .. } => Status::resource_exhausted(e.to_string()),
            // gRPC's convention for an unparsable message; the transport
            // status layer adds the method's name.
            BatchDecodeError::Malformed(_) => Status::internal(e.to_string()),
        }
    }
}

/// Decodes one `ReadingBatch`, refusing it as soon as it holds more than
/// `max_series` series.
pub fn decode_batch(
    mut buf: impl Buf,
    max_series: usize,
) -> Result<pb::ReadingBatch, BatchDecodeError> {
    let mut batch = pb::ReadingBatch::default();
    let ctx = DecodeContext::default();
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        if tag == SERIES_TAG {
            if batch.series.len() >= max_series {
                return Err(BatchDecodeError::TooManySeries { max: max_series });
            }
            let mut series = pb::SensorSeries::default();
            message::merge(wire_type, &mut series, &mut buf, ctx.clone())?;
            batch.series.push(series);
        } else {
            batch.merge_field(tag, wire_type, &mut buf, ctx.clone())?;
        }
    }
    Ok(batch)
}

/// Encodes summaries; decodes batches with [`decode_batch`].
#[derive(Debug, Clone, Copy)]
pub struct BatchCodec {
    pub max_series: usize,
}

impl Codec for BatchCodec {
    type Encode = pb::UploadSummary;
    type Decode = pb::ReadingBatch;
    type Encoder = SummaryEncoder;
    type Decoder = BatchDecoder;

    fn encoder(&mut self) -> SummaryEncoder {
        SummaryEncoder
    }

    fn decoder(&mut self) -> BatchDecoder {
        BatchDecoder {
            max_series: self.max_series,
        }
    }
}

#[derive(Debug)]
pub struct SummaryEncoder;

impl Encoder for SummaryEncoder {
    type Item = pb::UploadSummary;
    type Error = Status;

    fn encode(&mut self, item: pb::UploadSummary, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the summary: {e}")))
    }

    /// Small, as for every generated service (telemetry_proto::codec).
    fn buffer_settings(&self) -> BufferSettings {
        telemetry_proto::codec::buffer_settings()
    }
}

#[derive(Debug)]
pub struct BatchDecoder {
    max_series: usize,
}

impl Decoder for BatchDecoder {
    type Item = pb::ReadingBatch;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<pb::ReadingBatch>, Status> {
        // The decode stage of a batch, in the stream's span: the batch's own
        // span (upload.rs) starts once its sequence number is known.
        let _decode = tracing::debug_span!("decode", bytes = src.remaining()).entered();
        decode_batch(src, self.max_series)
            .map(Some)
            .map_err(Status::from)
    }

    /// Small, as for every generated service (telemetry_proto::codec): an
    /// upload stream mostly waits, and its buffer grows to the batches it
    /// carries.
    fn buffer_settings(&self) -> BufferSettings {
        telemetry_proto::codec::buffer_settings()
    }
}

/// The Ingest service with `UploadReadings` decoded by [`BatchCodec`].
#[derive(Clone)]
pub struct IngestRoutes {
    service: Arc<IngestService>,
    generated: IngestServer<IngestService>,
    codec: BatchCodec,
    max_message_bytes: usize,
}

impl IngestRoutes {
    /// Every method takes the encodings of [`super::compression`].
    pub fn new(service: IngestService, max_series: usize, max_message_bytes: usize) -> Self {
        let service = Arc::new(service);
        let generated = compressed!(
            IngestServer::from_arc(service.clone()).max_decoding_message_size(max_message_bytes)
        );
        Self {
            service,
            generated,
            codec: BatchCodec { max_series },
            max_message_bytes,
        }
    }
}

impl NamedService for IngestRoutes {
    const NAME: &'static str = <IngestServer<IngestService> as NamedService>::NAME;
}

impl<B> tower::Service<http::Request<B>> for IngestRoutes
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync + 'static>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != UPLOAD_PATH {
            return Box::pin(tower::Service::call(&mut self.generated, request));
        }
        let mut grpc = compressed!(
            tonic::server::Grpc::new(self.codec).max_decoding_message_size(self.max_message_bytes)
        );
        let method = UploadMethod(self.service.clone());
        Box::pin(async move { Ok(grpc.client_streaming(method, request).await) })
    }
}

struct UploadMethod(Arc<IngestService>);

impl ClientStreamingService<pb::ReadingBatch> for UploadMethod {
    type Response = pb::UploadSummary;
    type Future = BoxFuture<'static, Result<tonic::Response<pb::UploadSummary>, Status>>;

    fn call(&mut self, request: tonic::Request<Streaming<pb::ReadingBatch>>) -> Self::Future {
        self.0.upload_call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(series: usize) -> Vec<u8> {
        pb::ReadingBatch {
            sequence: 3,
            series: vec![
                pb::SensorSeries {
                    sensor: "t".into(),
                    unit: String::new(),
                    time_unix_nano: vec![1, 2],
                    value: vec![1.0, 2.0],
                };
                series
            ],
        }
        .encode_to_vec()
    }

    #[test]
    fn decodes_what_the_generated_code_decodes() {
        let bytes = encoded(5);
        let ours = decode_batch(&bytes[..], 5).unwrap();
        assert_eq!(ours, pb::ReadingBatch::decode(&bytes[..]).unwrap());
    }

    #[test]
    fn stops_at_the_series_cap() {
        let bytes = encoded(6);
        assert!(matches!(
            decode_batch(&bytes[..], 5),
            Err(BatchDecodeError::TooManySeries { max: 5 })
        ));
        // Two million empty series: refused after the cap, not decoded.
        let flood: Vec<u8> = std::iter::repeat_n([0x12u8, 0x00], 2_000_000)
            .flatten()
            .collect();
        assert!(matches!(
            decode_batch(&flood[..], 1024),
            Err(BatchDecodeError::TooManySeries { max: 1024 })
        ));
    }

    #[test]
    fn malformed_bytes_are_an_error() {
        assert!(matches!(
            decode_batch(&[0x12u8, 0x05, 0x01][..], 10),
            Err(BatchDecodeError::Malformed(_))
        ));
    }
}
