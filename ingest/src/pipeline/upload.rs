//! One upload stream, from the first batch to the summary (gRPC's
//! `UploadReadings`; the stream's messages already taken off the wire):
//! validate each batch, hand it to the group-commit writer, wait for the
//! commits, tally what happened.
//!
//! A stream keeps a few batches in flight so that decoding the next batch
//! overlaps committing the previous ones; the cap keeps one fast device from
//! filling the writer's queue on its own.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use super::Pipeline;
use super::commit::{BatchOutcome, CommitResult};
use crate::auth::{CredentialEnded, CredentialWatch, until_ended};
use crate::domain::DeviceKey;
use crate::domain::reading::{BatchReport, RawBatch, validate_batch};
use crate::domain::summary::SequenceNotIncreasing;
use crate::domain::time::now_unix_nanos;
use crate::domain::{BatchError, RejectReason, UploadTally};
use crate::metrics::Metrics;
use crate::storage::StorageError;

/// How long an upload stream may keep the server waiting for a message.
#[derive(Debug, Clone, Copy)]
pub struct UploadTimeouts {
    /// From opening the stream to its first batch.
    pub first_message: Duration,
    /// Between two batches.
    pub idle: Duration,
}

impl Default for UploadTimeouts {
    fn default() -> Self {
        Self {
            first_message: Duration::from_secs(30),
            idle: Duration::from_secs(120),
        }
    }
}

/// Why an upload stream ended without a summary.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Sequence(#[from] SequenceNotIncreasing),
    /// The client's stream broke (cancelled, reset, undecodable, over a
    /// size limit; see `grpc::transport_status`).
    #[error("{}", .0.message())]
    Transport(tonic::Status),
    #[error(
        "no batch within {0:?} of opening the stream (the server's --upload-first-message-timeout)"
    )]
    FirstMessageTimeout(Duration),
    #[error(
        "no batch within {0:?} of the previous one (the server's --upload-idle-timeout); close the stream when there is nothing to send"
    )]
    IdleTimeout(Duration),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("a batch could not be committed")]
    CommitFailed,
    #[error("the server is shutting down")]
    ShuttingDown,
    /// An operator revoked or disabled what the stream authenticated with.
    #[error("credential revoked: {0}")]
    CredentialEnded(CredentialEnded),
}

/// An upload error with the device's high-water mark when the stream ended,
/// so the client learns what it need not resend.
#[derive(Debug)]
pub struct UploadFailure {
    pub error: UploadError,
    pub committed_sequence: u64,
}

/// Batches handed to the writer: what was found in each, when it arrived,
/// where its commit will be answered, and its "durable" span (ended by the
/// answer, and with it the batch's span; disabled, and free, unless traces
/// are exported or RUST_LOG asks for DEBUG).
type InFlight = VecDeque<(
    BatchReport,
    Instant,
    oneshot::Receiver<CommitResult>,
    tracing::Span,
)>;

/// Runs an upload stream for `device` to its end, or until `credential`
/// no longer holds.
///
/// Everything is lent: the caller's future owns the stream and the
/// credential once, for as long as the stream lasts (see
/// `IngestService::upload_call`).
pub async fn run<S>(
    messages: &mut S,
    device: &DeviceKey,
    credential: &mut Option<CredentialWatch>,
    ctx: &Pipeline,
) -> Result<UploadTally, UploadFailure>
where
    S: Stream<Item = Result<RawBatch, tonic::Status>> + Unpin,
{
    let _open = ctx.metrics.stream("upload");
    let mut tally = UploadTally::new(ctx.limits.max_listed_rejections, 0);
    let mut inflight = InFlight::new();
    let ended = receive(messages, device, credential, ctx, &mut tally, &mut inflight).await;
    // Batches already handed over commit whatever happened to the stream;
    // wait for them, so the summary (or error) tells the truth.
    let settled = Box::pin(settle(&mut tally, &mut inflight, 0, &ctx.metrics)).await;
    let outcome = ended.and(settled);
    if tally.batches_committed + tally.duplicate_batches == 0 {
        // No batch reached the writer: ask the database for the mark.
        match Box::pin(ctx.store.committed_sequence(device.pk)).await {
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
    messages: &mut S,
    device: &DeviceKey,
    credential: &mut Option<CredentialWatch>,
    ctx: &Pipeline,
    tally: &mut UploadTally,
    inflight: &mut InFlight,
) -> Result<(), UploadError>
where
    S: Stream<Item = Result<RawBatch, tonic::Status>> + Unpin,
{
    let writer = ctx.stream(device);
    let mut shutdown = ctx.shutdown.clone();
    let mut first = true;
    loop {
        let (wait, timed_out) = if first {
            let t = ctx.timeouts.first_message;
            (t, UploadError::FirstMessageTimeout(t))
        } else {
            let t = ctx.timeouts.idle;
            (t, UploadError::IdleTimeout(t))
        };
        let next = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stopping| *stopping) => return Err(UploadError::ShuttingDown),
            ended = until_ended(credential) => return Err(UploadError::CredentialEnded(ended)),
            // Answers are taken as they come rather than when the next
            // batch arrives: an idle stream (a device sending every few
            // seconds, its stream open) then keeps nothing of its batches.
            answer = oldest_answer(inflight) => {
                let (report, arrived, _, durable) = inflight.pop_front().expect("answered");
                let failed = record(answer, report, arrived, durable, tally, &ctx.metrics);
                if inflight.is_empty() {
                    // Its buffer (a few hundred bytes a batch) goes too.
                    *inflight = InFlight::new();
                }
                if failed {
                    return Err(UploadError::CommitFailed);
                }
                continue;
            }
            next = tokio::time::timeout(wait, messages.next()) => match next {
                Ok(next) => next,
                Err(_) => return Err(timed_out),
            },
        };
        first = false;
        let message = match next {
            None => return Ok(()),
            Some(Ok(message)) => message,
            Some(Err(status)) => return Err(UploadError::Transport(status)),
        };
        let arrived = Instant::now();
        let readings = message.readings();
        // Room in the server's budget first, the stream unread meanwhile:
        // a server that falls behind holds the devices back through flow
        // control instead of holding their batches (see `budget`).
        let admitted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stopping| *stopping) => return Err(UploadError::ShuttingDown),
            ended = until_ended(credential) => return Err(UploadError::CredentialEnded(ended)),
            admitted = ctx.budget.admit(readings) => admitted,
        };
        // From arrival (decoded: see grpc::batch_codec) to its answer, with a
        // span per stage: validate; queue (waiting for the stream's in-flight
        // cap, then for room in the writer's queue); durable (queued to
        // committed; the group commit's span links to the batch's).
        let span = tracing::debug_span!("batch", sequence = message.sequence, readings);
        // A batch refused whole: every reading of it is rejected.
        let refused = |metrics: &Metrics| {
            metrics.reading("rejected", "invalid_batch", readings);
            metrics.batch("rejected");
        };
        let validated = tracing::debug_span!(parent: &span, "validate").in_scope(|| {
            validate_batch(
                message.sequence,
                message.series,
                &ctx.limits,
                now_unix_nanos(),
            )
        });
        let batch = match validated {
            Ok(batch) => batch,
            Err(e) => {
                refused(&ctx.metrics);
                return Err(e.into());
            }
        };
        if let Err(e) = tally.receive(batch.sequence) {
            refused(&ctx.metrics);
            return Err(e.into());
        }
        let queue = tracing::debug_span!(parent: &span, "queue");
        // The futures awaited per batch are boxed: a stream spends most of
        // its life waiting for its next message, and the state it keeps
        // meanwhile (one per connected device) would otherwise be as large
        // as the largest of them.
        Box::pin(settle(
            tally,
            inflight,
            ctx.max_inflight_batches.max(1) - 1,
            &ctx.metrics,
        ))
        .instrument(queue.clone())
        .await?;
        let received = batch.report.accepted + batch.report.rejected();
        let committed = Box::pin(writer.submit(batch.sequence, batch.series, admitted, &span))
            .instrument(queue)
            .await?;
        let durable = tracing::debug_span!(parent: &span, "durable");
        inflight.push_back((batch.report, arrived, committed, durable));
        // Over its rate the device waits here, with its stream unread: HTTP/2
        // flow control holds it back and nothing is refused or lost.
        let hold = writer.hold_for(received);
        if !hold.is_zero() {
            Box::pin(throttle(hold, &mut shutdown, credential)).await?;
            tally.throttled += hold;
            ctx.metrics
                .upload_throttled_seconds
                .inc_by(hold.as_secs_f64());
        }
    }
}

/// Holds a device over its rate for `hold`, with its stream unread.
async fn throttle(
    hold: Duration,
    shutdown: &mut watch::Receiver<bool>,
    credential: &mut Option<CredentialWatch>,
) -> Result<(), UploadError> {
    tokio::select! {
        biased;
        _ = shutdown.wait_for(|stopping| *stopping) => Err(UploadError::ShuttingDown),
        ended = until_ended(credential) => Err(UploadError::CredentialEnded(ended)),
        () = tokio::time::sleep(hold) => Ok(()),
    }
}

/// Resolves with the answer to the oldest in-flight batch; pending while
/// there is none.
async fn oldest_answer(inflight: &mut InFlight) -> Result<CommitResult, oneshot::error::RecvError> {
    match inflight.front_mut() {
        Some((_, _, committed, _)) => committed.await,
        None => std::future::pending().await,
    }
}

/// Waits for the oldest in-flight batches until at most `keep` remain.
async fn settle(
    tally: &mut UploadTally,
    inflight: &mut InFlight,
    keep: usize,
    metrics: &Metrics,
) -> Result<(), UploadError> {
    let mut failed = false;
    while inflight.len() > keep {
        let (report, arrived, committed, durable) = inflight.pop_front().expect("len > keep >= 0");
        let answer = committed.await;
        failed |= record(answer, report, arrived, durable, tally, metrics);
    }
    if failed {
        Err(UploadError::CommitFailed)
    } else {
        Ok(())
    }
}

/// Counts a batch's answer; true if it failed to commit.
fn record(
    answer: Result<CommitResult, oneshot::error::RecvError>,
    report: BatchReport,
    arrived: Instant,
    durable: tracing::Span,
    tally: &mut UploadTally,
    metrics: &Metrics,
) -> bool {
    drop(durable);
    metrics
        .batch_ack_seconds
        .observe(arrived.elapsed().as_secs_f64());
    let received = report.accepted + report.rejected();
    match answer {
        Ok(Ok(BatchOutcome::Committed {
            committed_sequence,
            refused_series,
        })) => {
            let mut report = report;
            if !refused_series.is_empty() {
                report.refuse_series(&refused_series, RejectReason::TooManySensors);
            }
            metrics.batch("committed");
            metrics.reading("committed", "", report.accepted);
            for reason in RejectReason::ALL {
                metrics.reading("rejected", reason.name(), report.rejected_for(reason));
            }
            tally.committed(report, committed_sequence);
            false
        }
        Ok(Ok(BatchOutcome::Duplicate { committed_sequence })) => {
            metrics.batch("duplicate");
            metrics.reading("duplicate", "", received);
            tally.duplicate(committed_sequence);
            false
        }
        // The writer dropped the reply only if it stopped mid-group.
        Ok(Err(_)) | Err(_) => {
            metrics.batch("failed");
            metrics.reading("rejected", "commit_failed", received);
            true
        }
    }
}
