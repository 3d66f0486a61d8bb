//! Log shipping: a container's stdout and stderr go to the task source in chunks while the
//! task runs, so `GET tasks/{id}/log` shows what exists so far.
//!
//! Output is buffered and shipped every `flush_interval` or as soon as `flush_bytes` are
//! buffered, whichever comes first. The source keeps at most `cap` bytes and writes the
//! truncation marker itself; the shipper sends no more than one byte past the cap (so the
//! source sees that something was cut) and then ships nothing more.
//!
//! The shipper also reads the output for progress lines (see the `progress` module) and
//! forwards them, coalesced. Past the cap it goes on reading, shipping nothing, so progress
//! still arrives from a task whose log is full.
//!
//! The output comes from the engine's attachment to the container (made before its start,
//! so nothing is missed). A task that prints faster than the shipper reads waits for it, so
//! nothing is lost before the cap either: past it the shipper reads on only for progress
//! lines. The engine keeps a bounded copy of its own, read only when the attachment broke
//! with the engine: the part past what the attachment delivered ([`skip_output`]) is shipped
//! by a second shipper that takes over where the first stopped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use stevedore_engine::LogChunkStream;
use tokio::time::{Instant, MissedTickBehavior};

use crate::error::SourceError;
use crate::progress::ProgressReporter;
use crate::source::TaskSource;

/// `output` without its first `skip` bytes (stdout and stderr together, in order): the part of
/// an engine's kept output that a broken attachment had not delivered. The counter holds what
/// was left to skip when the stream ended, above 0 when the kept output was shorter than
/// `skip` (the engine's copy had rolled over).
pub(crate) fn skip_output(output: LogChunkStream, skip: u64) -> (LogChunkStream, Arc<AtomicU64>) {
    let unmatched = Arc::new(AtomicU64::new(skip));
    let left = Arc::clone(&unmatched);
    let rest = output
        .filter_map(move |chunk| {
            let chunk = match chunk {
                Ok(mut chunk) => {
                    let to_skip = left.load(Ordering::Relaxed);
                    let len = chunk.bytes.len() as u64;
                    if to_skip >= len {
                        left.store(to_skip - len, Ordering::Relaxed);
                        None
                    } else {
                        left.store(0, Ordering::Relaxed);
                        // Below `len`, which is a usize.
                        let from = usize::try_from(to_skip).unwrap_or(usize::MAX);
                        chunk.bytes = chunk.bytes.slice(from..);
                        Some(Ok(chunk))
                    }
                }
                Err(error) => Some(Err(error)),
            };
            std::future::ready(chunk)
        })
        .boxed();
    (rest, unmatched)
}

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
    /// Progress lines found in the output and not yet forwarded.
    pub progress: ProgressReporter,
}

/// How shipping ended.
#[derive(Debug)]
pub(crate) struct ShippedLogs {
    /// Bytes the source holds, as it last said.
    pub stored: u64,
    /// Output bytes read from the stream.
    pub read: u64,
    /// The cap was reached and later output was dropped.
    pub capped: bool,
}

/// What the shipping loop reacts to.
enum Event {
    Output(Option<Result<stevedore_engine::LogChunk, stevedore_engine::EngineError>>),
    FlushDue,
    ProgressDue,
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
    /// Reads `chunks` until the container's output ends (or the source refuses, or the
    /// stream fails), shipping as it goes up to the cap and forwarding progress throughout.
    pub(crate) async fn ship(mut self, mut chunks: LogChunkStream) -> ShippedLogs {
        let mut buffer: Vec<u8> = Vec::new();
        let mut read: u64 = 0;
        let mut capped = false;
        let mut flush_due = tokio::time::interval(self.flush_interval);
        flush_due.set_missed_tick_behavior(MissedTickBehavior::Delay);
        flush_due.reset();
        loop {
            let progress_due = self.progress.due();
            let event = tokio::select! {
                chunk = chunks.next() => Event::Output(chunk),
                _ = flush_due.tick(), if !capped => Event::FlushDue,
                () = sleep_until(progress_due) => Event::ProgressDue,
            };
            let stop = match event {
                Event::Output(Some(Ok(chunk))) => {
                    read += chunk.bytes.len() as u64;
                    let fresh = &chunk.bytes[..];
                    self.progress.scan(chunk.stream, fresh);
                    if self.progress.is_due() {
                        self.forward_progress().await;
                    }
                    if capped {
                        continue;
                    }
                    buffer.extend_from_slice(fresh);
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
                    self.forward_progress().await;
                    let stop = match stop {
                        Some(stop) => Some(stop),
                        None if capped => Some(Stop::Capped),
                        None => Some(Stop::StreamFailed),
                    };
                    return self.ended(read, stop);
                }
                Event::Output(None) => {
                    let stop = self.flush(&mut buffer).await;
                    // The last value goes out before the task's result is recorded.
                    self.forward_progress().await;
                    return self.ended(read, stop.or(capped.then_some(Stop::Capped)));
                }
                Event::FlushDue => self.flush(&mut buffer).await,
                Event::ProgressDue => {
                    self.forward_progress().await;
                    None
                }
            };
            match stop {
                None => {}
                Some(Stop::Capped) => {
                    // Nothing more is shipped; reading goes on for progress lines.
                    capped = true;
                    buffer = Vec::new();
                }
                Some(stop) => return self.ended(read, Some(stop)),
            }
        }
    }

    async fn forward_progress(&mut self) {
        self.progress
            .forward(self.source.as_ref(), &self.task_id, self.token)
            .await;
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
                stevedore_metrics::log_bytes_shipped(sending as u64);
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

    fn ended(self, read: u64, stop: Option<Stop>) -> ShippedLogs {
        ShippedLogs {
            stored: self.stored,
            read,
            capped: matches!(stop, Some(Stop::Capped)),
        }
    }
}

/// Sleeps until `at`; forever when there is no `at`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use bytes::Bytes;
    use stevedore_engine::{LogChunk, OutputStream};
    use stevedore_model::TaskOutcome;
    use stevedore_model::{HeartbeatReply, LeaseRequest, LeasedTask, RunReport};

    use super::*;
    use crate::source::RequeueRequest;

    /// One progress call: when, percent, message.
    type ProgressCall = (Instant, Option<u8>, Option<String>);

    /// Records what the shipper sends; only logs and progress are expected.
    #[derive(Default)]
    struct Recorder {
        shipped: Mutex<Vec<u8>>,
        progress: Mutex<Vec<ProgressCall>>,
    }

    #[async_trait]
    impl TaskSource for Recorder {
        async fn lease(&self, _: &LeaseRequest) -> Result<Vec<LeasedTask>, SourceError> {
            unreachable!()
        }
        async fn heartbeat(&self, _: &str, _: i64, _: u32) -> Result<HeartbeatReply, SourceError> {
            unreachable!()
        }
        async fn mark_running(&self, _: &str, _: i64) -> Result<(), SourceError> {
            unreachable!()
        }
        async fn append_log(
            &self,
            _: &str,
            _: i64,
            bytes: &[u8],
            _: u64,
        ) -> Result<u64, SourceError> {
            let mut shipped = self.shipped.lock().unwrap();
            shipped.extend_from_slice(bytes);
            Ok(shipped.len() as u64)
        }
        async fn progress(
            &self,
            _: &str,
            _: i64,
            percent: Option<u8>,
            msg: Option<&str>,
        ) -> Result<(), SourceError> {
            self.progress
                .lock()
                .unwrap()
                .push((Instant::now(), percent, msg.map(str::to_owned)));
            Ok(())
        }
        async fn complete(
            &self,
            _: &str,
            _: i64,
            _: &TaskOutcome,
            _: &RunReport,
        ) -> Result<(), SourceError> {
            unreachable!()
        }
        async fn requeue(&self, _: &str, _: i64, _: &RequeueRequest) -> Result<(), SourceError> {
            unreachable!()
        }
        async fn task_package(
            &self,
            _: &str,
            _: i64,
        ) -> Result<crate::PackageDownload, SourceError> {
            unreachable!()
        }
    }

    fn shipper(source: &Arc<Recorder>, cap: u64, progress_interval: Duration) -> LogShipper {
        LogShipper {
            source: Arc::clone(source) as Arc<dyn TaskSource>,
            task_id: "t".into(),
            token: 1,
            cap,
            flush_interval: Duration::from_millis(20),
            flush_bytes: 4096,
            stored: 0,
            progress: ProgressReporter::new(progress_interval),
        }
    }

    /// `chunks`, one every `every`.
    fn paced(chunks: Vec<Vec<u8>>, every: Duration) -> LogChunkStream {
        futures::stream::unfold(chunks.into_iter(), move |mut chunks| async move {
            let chunk = chunks.next()?;
            tokio::time::sleep(every).await;
            let chunk = LogChunk {
                stream: OutputStream::Stdout,
                bytes: Bytes::from(chunk),
            };
            Some((Ok(chunk), chunks))
        })
        .boxed()
    }

    #[tokio::test]
    async fn a_flood_of_progress_lines_is_coalesced_and_the_last_one_wins() {
        let source = Arc::new(Recorder::default());
        let interval = Duration::from_millis(100);
        // 10 000 progress lines over about half a second.
        let chunks: Vec<Vec<u8>> = (0..50)
            .map(|chunk| {
                (0..200)
                    .map(|line| {
                        let n = chunk * 200 + line;
                        format!("::stevedore-progress::{} step {n}\n", n % 100)
                    })
                    .collect::<String>()
                    .into_bytes()
            })
            .collect();
        let total: usize = chunks.iter().map(Vec::len).sum();
        let shipped = shipper(&source, 10 << 20, interval)
            .ship(paced(chunks, Duration::from_millis(10)))
            .await;
        assert!(!shipped.capped);
        assert_eq!(source.shipped.lock().unwrap().len(), total);
        let progress = source.progress.lock().unwrap().clone();
        assert!(
            (2..=12).contains(&progress.len()),
            "{} progress calls",
            progress.len()
        );
        let last = progress.last().unwrap();
        assert_eq!((last.1, last.2.as_deref()), (Some(99), Some("step 9999")));
        // All but the final flush keep the interval.
        for pair in progress[..progress.len() - 1].windows(2) {
            assert!(pair[1].0 - pair[0].0 >= interval);
        }
    }

    #[tokio::test]
    async fn progress_still_arrives_after_the_log_is_capped() {
        let source = Arc::new(Recorder::default());
        let mut filler = vec![b'x'; 4999];
        filler.push(b'\n');
        let chunks = vec![
            filler,
            b"::stevedore-progress::40 past".to_vec(),
            b" the cap\n".to_vec(),
            vec![b'y'; 5000],
        ];
        let shipped = shipper(&source, 1000, Duration::from_millis(250))
            .ship(paced(chunks, Duration::from_millis(5)))
            .await;
        assert!(shipped.capped);
        assert_eq!(shipped.read, 10_038);
        assert_eq!(source.shipped.lock().unwrap().len(), 1001);
        let progress = source.progress.lock().unwrap().clone();
        assert_eq!(progress.len(), 1);
        assert_eq!(
            (progress[0].1, progress[0].2.as_deref()),
            (Some(40), Some("past the cap"))
        );
    }
}
