//! Log shipping: a container's stdout and stderr go to the task source in chunks while the
//! task runs, so `GET tasks/{id}/log` shows what exists so far.
//!
//! Output is buffered and shipped every `flush_interval` or as soon as `flush_bytes` are
//! buffered, whichever comes first. The source keeps at most `cap` bytes and writes the
//! truncation marker itself; the shipper sends no more than one byte past the cap (so the
//! source sees that something was cut) and then stops.
//!
//! A live stream can end before it delivered everything: Docker 20.10's followed logs of a
//! container that exits right after its start sometimes end empty although the output is in
//! the container's log (about one in ten `echo`-and-exit containers here). So once the
//! container has stopped, the supervisor reads its log once more from the start and ships
//! whatever follows the bytes the live stream delivered ([`LogShipper::skip`]).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use stevedore_engine::LogChunkStream;
use tokio::time::MissedTickBehavior;

use crate::error::SourceError;
use crate::source::TaskSource;

/// Ships one task's output.
pub(crate) struct LogShipper {
    pub source: Arc<dyn TaskSource>,
    pub task_id: String,
    pub token: i64,
    pub cap: u64,
    pub flush_interval: Duration,
    pub flush_bytes: usize,
    /// Bytes the source already holds for this task (from an earlier attempt).
    pub stored: u64,
    /// Output bytes at the start of the stream that were shipped already (by the live
    /// stream, when this is the catch-up read) and are skipped.
    pub skip: u64,
}

/// How shipping ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShippedLogs {
    /// Bytes the source holds, as it last said.
    pub stored: u64,
    /// Output bytes read from the stream, skipped ones included.
    pub read: u64,
    /// The cap was reached and later output was dropped.
    pub capped: bool,
    /// Shipping stopped early: the cap, a refusal, or a failed stream. Nothing more is to
    /// be shipped.
    pub stopped: bool,
}

/// What the shipping loop reacts to.
enum Event {
    Output(Option<Result<stevedore_engine::LogChunk, stevedore_engine::EngineError>>),
    FlushDue,
}

/// Why shipping ended early.
enum Stop {
    Capped,
    Refused,
    StreamFailed,
}

/// Buffered output beyond this many flushes' worth is dropped while the source is
/// unreachable, so a long outage cannot grow the runner's memory without bound.
const MAX_BUFFERED_FLUSHES: usize = 16;

// === impl LogShipper ===

impl LogShipper {
    /// Reads `chunks` until the container's output ends (or the cap is reached, or the
    /// source refuses), shipping as it goes.
    pub(crate) async fn ship(mut self, mut chunks: LogChunkStream) -> ShippedLogs {
        let mut buffer: Vec<u8> = Vec::new();
        let mut read: u64 = 0;
        let mut flush_due = tokio::time::interval(self.flush_interval);
        flush_due.set_missed_tick_behavior(MissedTickBehavior::Delay);
        flush_due.reset();
        loop {
            let event = tokio::select! {
                chunk = chunks.next() => Event::Output(chunk),
                _ = flush_due.tick() => Event::FlushDue,
            };
            let stop = match event {
                Event::Output(Some(Ok(chunk))) => {
                    let len = chunk.bytes.len() as u64;
                    let skipped = self.skip.saturating_sub(read).min(len);
                    read += len;
                    buffer.extend_from_slice(&chunk.bytes[usize::try_from(skipped).unwrap_or(0)..]);
                    if buffer.len() < self.flush_bytes {
                        continue;
                    }
                    self.flush(&mut buffer).await
                }
                Event::Output(Some(Err(error))) => {
                    // The engine lost the stream; the supervisor learns what happened from
                    // its wait. Keep what was read.
                    tracing::warn!(%error, "the container's log stream failed");
                    let stop = self.flush(&mut buffer).await;
                    return self.ended(read, stop.or(Some(Stop::StreamFailed)));
                }
                Event::Output(None) => {
                    let stop = self.flush(&mut buffer).await;
                    return self.ended(read, stop);
                }
                Event::FlushDue => self.flush(&mut buffer).await,
            };
            if stop.is_some() {
                return self.ended(read, stop);
            }
        }
    }

    /// Ships the buffer. Returns why shipping must stop, if it must.
    async fn flush(&mut self, buffer: &mut Vec<u8>) -> Option<Stop> {
        if buffer.is_empty() {
            return None;
        }
        // One byte past the cap is enough for the source to cut and mark.
        let room = self.cap.saturating_sub(self.stored).saturating_add(1);
        let sending = usize::try_from(room).map_or(buffer.len(), |room| room.min(buffer.len()));
        let truncating = self.stored + sending as u64 > self.cap;
        match self
            .source
            .append_log(&self.task_id, self.token, &buffer[..sending], self.cap)
            .await
        {
            Ok(stored) => {
                self.stored = stored;
                buffer.clear();
                truncating.then_some(Stop::Capped)
            }
            Err(error @ SourceError::Unavailable { .. }) => {
                tracing::warn!(%error, "cannot ship log output now; keeping it for the next try");
                if buffer.len() > self.flush_bytes.saturating_mul(MAX_BUFFERED_FLUSHES) {
                    tracing::warn!(dropped = buffer.len(), "dropping buffered log output");
                    buffer.clear();
                }
                None
            }
            Err(error) => {
                // A stale lease or a refusal: the supervisor finds out through its heartbeat.
                tracing::debug!(%error, "log shipping stopped");
                Some(Stop::Refused)
            }
        }
    }

    fn ended(&self, read: u64, stop: Option<Stop>) -> ShippedLogs {
        ShippedLogs {
            stored: self.stored,
            read,
            capped: matches!(stop, Some(Stop::Capped)),
            stopped: stop.is_some(),
        }
    }
}
