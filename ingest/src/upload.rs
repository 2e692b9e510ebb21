//! One `UploadReadings` stream, from the first batch to the summary:
//! validate each batch, hand it to the group-commit writer, wait for the
//! commits, tally what happened.
//!
//! A stream keeps a few batches in flight so that decoding the next batch
//! overlaps committing the previous ones; the cap keeps one fast device from
//! filling the writer's queue on its own.

use std::collections::VecDeque;

use futures::{Stream, StreamExt};
use telemetry_proto::v1 as pb;
use tokio::sync::{oneshot, watch};

use crate::domain::reading::{BatchReport, RawSeries, validate_batch};
use crate::domain::summary::SequenceNotIncreasing;
use crate::domain::time::now_unix_nanos;
use crate::domain::{BatchError, ReadingLimits, UploadTally};
use crate::storage::writer::{BatchOutcome, CommitResult, WriterHandle};
use crate::storage::{DeviceKey, StorageError, Store};

/// What every upload stream shares.
#[derive(Clone)]
pub struct UploadContext {
    pub store: Store,
    /// Commits batches, and records the alerts they cause in the same
    /// transaction: the summary never runs ahead of an alert.
    pub writer: WriterHandle,
    pub limits: ReadingLimits,
    /// Batches of one stream submitted but not yet committed.
    pub max_inflight_batches: usize,
    /// Turns true when the server begins shutting down.
    pub shutdown: watch::Receiver<bool>,
}

/// Why an upload stream ended without a summary.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Sequence(#[from] SequenceNotIncreasing),
    /// The gRPC framing refused a message over `--max-message-bytes`.
    #[error("{0}")]
    MessageTooLarge(String),
    /// The client's stream broke (cancelled, reset, undecodable).
    #[error("{}", .0.message())]
    Transport(tonic::Status),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("a batch could not be committed")]
    CommitFailed,
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// An upload error with the device's high-water mark when the stream ended,
/// so the client learns what it need not resend.
#[derive(Debug)]
pub struct UploadFailure {
    pub error: UploadError,
    pub committed_sequence: u64,
}

type InFlight = VecDeque<(BatchReport, oneshot::Receiver<CommitResult>)>;

/// Runs an upload stream for `device` to its end.
pub async fn run<S>(
    messages: S,
    device: &DeviceKey,
    ctx: &UploadContext,
) -> Result<UploadTally, UploadFailure>
where
    S: Stream<Item = Result<pb::ReadingBatch, tonic::Status>> + Unpin,
{
    let mut tally = UploadTally::new(ctx.limits.max_listed_rejections, 0);
    let mut inflight = InFlight::new();
    let ended = receive(messages, device, ctx, &mut tally, &mut inflight).await;
    // Batches already handed over commit whatever happened to the stream;
    // wait for them, so the summary (or error) tells the truth.
    let settled = settle(&mut tally, &mut inflight, 0).await;
    let outcome = ended.and(settled);
    if tally.batches_committed + tally.duplicate_batches == 0 {
        // No batch reached the writer: ask the database for the mark.
        match ctx.store.committed_sequence(device.pk).await {
            Ok(seq) => tally.committed_sequence = seq,
            Err(e) if outcome.is_ok() => {
                return Err(UploadFailure {
                    error: e.into(),
                    committed_sequence: 0,
                });
            }
            Err(_) => {}
        }
    }
    match outcome {
        Ok(()) => Ok(tally),
        Err(error) => Err(UploadFailure {
            error,
            committed_sequence: tally.committed_sequence,
        }),
    }
}

async fn receive<S>(
    mut messages: S,
    device: &DeviceKey,
    ctx: &UploadContext,
    tally: &mut UploadTally,
    inflight: &mut InFlight,
) -> Result<(), UploadError>
where
    S: Stream<Item = Result<pb::ReadingBatch, tonic::Status>> + Unpin,
{
    let writer = ctx.writer.stream(device.pk);
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stopping| *stopping) => return Err(UploadError::ShuttingDown),
            next = messages.next() => next,
        };
        let message = match next {
            None => return Ok(()),
            Some(Ok(message)) => message,
            Some(Err(status)) => return Err(transport_error(status)),
        };
        let series = message
            .series
            .into_iter()
            .map(|s| RawSeries {
                sensor: s.sensor,
                unit: s.unit,
                times: s.time_unix_nano,
                values: s.value,
            })
            .collect();
        let batch = validate_batch(message.sequence, series, &ctx.limits, now_unix_nanos())?;
        tally.receive(batch.sequence)?;
        settle(tally, inflight, ctx.max_inflight_batches.max(1) - 1).await?;
        let committed = writer.submit(batch.sequence, batch.series).await?;
        inflight.push_back((batch.report, committed));
    }
}

/// Waits for the oldest in-flight batches until at most `keep` remain.
async fn settle(
    tally: &mut UploadTally,
    inflight: &mut InFlight,
    keep: usize,
) -> Result<(), UploadError> {
    let mut failed = false;
    while inflight.len() > keep {
        let (report, committed) = inflight.pop_front().expect("len > keep >= 0");
        match committed.await {
            Ok(Ok(BatchOutcome::Committed { committed_sequence })) => {
                tally.committed(report, committed_sequence);
            }
            Ok(Ok(BatchOutcome::Duplicate { committed_sequence })) => {
                tally.duplicate(committed_sequence);
            }
            // The writer dropped the reply only if it stopped mid-group.
            Ok(Err(_)) | Err(_) => failed = true,
        }
    }
    if failed {
        Err(UploadError::CommitFailed)
    } else {
        Ok(())
    }
}

/// tonic reports an oversized message as OUT_OF_RANGE; gRPC clients expect
/// RESOURCE_EXHAUSTED for it, with a hint at what to change.
fn transport_error(status: tonic::Status) -> UploadError {
    if status.code() == tonic::Code::OutOfRange && status.message().contains("too large") {
        UploadError::MessageTooLarge(status.message().to_owned())
    } else {
        UploadError::Transport(status)
    }
}
