//! One pull per image, however many tasks want it at once.
//!
//! The first caller for an image starts the pull as its own tokio task (so it finishes even if
//! that caller is cancelled); later callers join it and get the same result. Progress events
//! go out on a broadcast channel that every joined caller forwards to its own sink.
//!
//! A caller that gives up (its future is dropped: a task's pull deadline, a size limit, a
//! cancel) leaves the pull to the others; when the last one gives up, the pull is stopped
//! (its request to the engine dropped, which ends the engine's pull) instead of going on for
//! nobody.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::broadcast;

use crate::engine::{PullProgress, PullProgressSender, RegistryAuth};
use crate::error::EngineError;

/// Progress events kept for a slow joined caller before it starts missing some.
const PROGRESS_BUFFER: usize = 256;

/// Coalesces concurrent pulls of the same image into one.
#[derive(Default)]
pub(crate) struct PullCoalescer {
    inflight: Arc<Mutex<HashMap<String, InFlight>>>,
    generations: std::sync::atomic::AtomicU64,
}

/// The result of a pull, for every caller waiting on it.
type PullDone = Shared<BoxFuture<'static, Result<(), EngineError>>>;

/// A pull under way.
struct InFlight {
    /// Tells this pull from a later one under the same key.
    generation: u64,
    progress: broadcast::Sender<PullProgress>,
    done: PullDone,
    /// Callers waiting for it; the last to give up stops it.
    waiters: usize,
    abort: tokio::task::AbortHandle,
}

/// One caller's place among a pull's waiters: dropping it (done or given up) leaves, and the
/// last to leave an unfinished pull stops it.
struct Waiting {
    inflight: Arc<Mutex<HashMap<String, InFlight>>>,
    key: String,
    generation: u64,
}

/// The key a pull is shared under: the reference and a hash of the credentials (never the
/// credentials themselves), so pulls are shared only between callers with the same ones.
pub(crate) fn pull_key(reference: &str, auth: Option<&RegistryAuth>) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    auth.hash(&mut hasher);
    format!("{reference}#{:016x}", hasher.finish())
}

/// Adds `:latest` to a reference without tag or digest: the engine would otherwise pull every
/// tag of the repository.
pub(crate) fn normalize_reference(image: &str) -> String {
    let last_component = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last_component.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

// === impl PullCoalescer ===

impl PullCoalescer {
    /// Runs `start` unless a pull under `key` is already under way, then waits for whichever
    /// pull it is, forwarding progress to `sink`. `key` names the image and the credentials
    /// it is pulled with: a caller never joins a pull made with someone else's credentials.
    ///
    /// `start` gets the broadcast sender for its layer and message events.
    pub(crate) async fn pull<F, Fut>(
        &self,
        key: &str,
        image: &str,
        sink: Option<PullProgressSender>,
        start: F,
    ) -> Result<(), EngineError>
    where
        F: FnOnce(broadcast::Sender<PullProgress>) -> Fut,
        Fut: Future<Output = Result<(), EngineError>> + Send + 'static,
    {
        let (mut events, done, _waiting) = self.join_or_start(key, start);
        send(
            &sink,
            PullProgress::Started {
                image: image.to_owned(),
            },
        );

        let result = match &sink {
            None => done.await,
            Some(sink) => {
                let mut done = std::pin::pin!(done);
                loop {
                    tokio::select! {
                        result = &mut done => {
                            while let Ok(event) = events.try_recv() {
                                let _ = sink.send(event);
                            }
                            break result;
                        }
                        event = events.recv() => match event {
                            Ok(event) => { let _ = sink.send(event); }
                            // A slow reader misses some progress; the result still arrives.
                            Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => break (&mut done).await,
                        },
                    }
                }
            }
        };
        send(
            &sink,
            PullProgress::Finished {
                image: image.to_owned(),
                ok: result.is_ok(),
            },
        );
        result
    }

    fn join_or_start<F, Fut>(
        &self,
        image: &str,
        start: F,
    ) -> (broadcast::Receiver<PullProgress>, PullDone, Waiting)
    where
        F: FnOnce(broadcast::Sender<PullProgress>) -> Fut,
        Fut: Future<Output = Result<(), EngineError>> + Send + 'static,
    {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pull) = inflight.get_mut(image) {
            tracing::debug!(image, "joining a pull under way");
            pull.waiters += 1;
            let waiting = Waiting {
                inflight: Arc::clone(&self.inflight),
                key: image.to_owned(),
                generation: pull.generation,
            };
            return (pull.progress.subscribe(), pull.done.clone(), waiting);
        }

        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (progress, receiver) = broadcast::channel(PROGRESS_BUFFER);
        let pull = start(progress.clone());
        let registry = Arc::clone(&self.inflight);
        let key = image.to_owned();
        let task = tokio::spawn(async move {
            let result = pull.await;
            let mut inflight = registry.lock().unwrap_or_else(PoisonError::into_inner);
            if inflight
                .get(&key)
                .is_some_and(|p| p.generation == generation)
            {
                inflight.remove(&key);
            }
            result
        });
        let abort = task.abort_handle();
        let done = async move {
            task.await.unwrap_or_else(|join_error| {
                Err(EngineError::protocol(format!(
                    "the image pull task ended abnormally: {join_error}"
                )))
            })
        }
        .boxed()
        .shared();
        inflight.insert(
            image.to_owned(),
            InFlight {
                generation,
                progress,
                done: done.clone(),
                waiters: 1,
                abort,
            },
        );
        let waiting = Waiting {
            inflight: Arc::clone(&self.inflight),
            key: image.to_owned(),
            generation,
        };
        (receiver, done, waiting)
    }
}

// === impl Waiting ===

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(pull) = inflight.get_mut(&self.key) else {
            return;
        };
        if pull.generation != self.generation {
            return;
        }
        pull.waiters = pull.waiters.saturating_sub(1);
        if pull.waiters == 0 {
            tracing::info!(image = %self.key, "nobody waits for the pull any more: stopping it");
            pull.abort.abort();
            inflight.remove(&self.key);
        }
    }
}

fn send(sink: &Option<PullProgressSender>, event: PullProgress) {
    if let Some(sink) = sink {
        // A caller that dropped its receiver no longer wants progress; that is fine.
        let _ = sink.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn references_without_tag_get_latest() {
        assert_eq!(normalize_reference("busybox"), "busybox:latest");
        assert_eq!(normalize_reference("busybox:1.36"), "busybox:1.36");
        assert_eq!(
            normalize_reference("localhost:5000/team/app"),
            "localhost:5000/team/app:latest"
        );
        assert_eq!(
            normalize_reference("localhost:5000/team/app:2"),
            "localhost:5000/team/app:2"
        );
        assert_eq!(normalize_reference("app@sha256:abcd"), "app@sha256:abcd");
    }

    #[tokio::test]
    async fn concurrent_pulls_of_one_image_run_once_and_share_progress() {
        let coalescer = Arc::new(PullCoalescer::default());
        let started = Arc::new(AtomicUsize::new(0));
        let mut waiters = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..8 {
            let (sink, receiver) = tokio::sync::mpsc::unbounded_channel();
            receivers.push(receiver);
            let coalescer = Arc::clone(&coalescer);
            let started = Arc::clone(&started);
            waiters.push(tokio::spawn(async move {
                coalescer
                    .pull("img:1", "img:1", Some(sink), move |progress| {
                        started.fetch_add(1, Ordering::SeqCst);
                        async move {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let _ = progress.send(PullProgress::Message {
                                status: "halfway".into(),
                            });
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok(())
                        }
                    })
                    .await
            }));
        }
        for waiter in waiters {
            assert_eq!(waiter.await.ok(), Some(Ok(())));
        }
        assert_eq!(started.load(Ordering::SeqCst), 1);
        for mut receiver in receivers {
            let mut events = Vec::new();
            while let Ok(event) = receiver.try_recv() {
                events.push(event);
            }
            assert_eq!(
                events.first(),
                Some(&PullProgress::Started {
                    image: "img:1".into()
                })
            );
            assert!(events.contains(&PullProgress::Message {
                status: "halfway".into()
            }));
            assert_eq!(
                events.last(),
                Some(&PullProgress::Finished {
                    image: "img:1".into(),
                    ok: true
                })
            );
        }
        // The finished pull is forgotten, so a later pull really pulls again.
        assert!(
            coalescer
                .inflight
                .lock()
                .map(|m| m.is_empty())
                .unwrap_or(false)
        );
    }

    #[tokio::test]
    async fn a_caller_giving_up_leaves_the_pull_to_the_others_and_the_last_stops_it() {
        let coalescer = Arc::new(PullCoalescer::default());
        let (finished, stopped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let pull = |finished: Arc<AtomicUsize>, stopped: Arc<AtomicUsize>| {
            move |_| async move {
                // Counts a stop: the future is dropped before it finished.
                struct OnDrop(Arc<AtomicUsize>, bool);
                impl Drop for OnDrop {
                    fn drop(&mut self) {
                        if !self.1 {
                            self.0.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                let mut guard = OnDrop(stopped, false);
                tokio::time::sleep(Duration::from_millis(300)).await;
                guard.1 = true;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        };
        let patient = {
            let coalescer = Arc::clone(&coalescer);
            let start = pull(Arc::clone(&finished), Arc::clone(&stopped));
            tokio::spawn(async move { coalescer.pull("img:1", "img:1", None, start).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let impatient = tokio::time::timeout(
            Duration::from_millis(50),
            coalescer.pull(
                "img:1",
                "img:1",
                None,
                pull(Arc::clone(&finished), Arc::clone(&stopped)),
            ),
        )
        .await;
        assert!(impatient.is_err(), "the impatient caller gave up");
        assert_eq!(patient.await.ok(), Some(Ok(())));
        assert_eq!(
            (
                finished.load(Ordering::SeqCst),
                stopped.load(Ordering::SeqCst)
            ),
            (1, 0)
        );

        // Alone, giving up stops the pull.
        let alone = tokio::time::timeout(
            Duration::from_millis(50),
            coalescer.pull(
                "img:2",
                "img:2",
                None,
                pull(Arc::clone(&finished), Arc::clone(&stopped)),
            ),
        )
        .await;
        assert!(alone.is_err());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(stopped.load(Ordering::SeqCst), 1);
        assert!(
            coalescer
                .inflight
                .lock()
                .map(|m| m.is_empty())
                .unwrap_or(false)
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "the stopped pull never finished"
        );
    }

    #[tokio::test]
    async fn a_failed_pull_fails_every_joined_caller() {
        let coalescer = Arc::new(PullCoalescer::default());
        let failure = EngineError::PullFailed {
            image: "img:1".into(),
            message: "registry down".into(),
        };
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let coalescer = Arc::clone(&coalescer);
            let failure = failure.clone();
            waiters.push(tokio::spawn(async move {
                coalescer
                    .pull("img:1", "img:1", None, move |_| async move {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        Err(failure)
                    })
                    .await
            }));
        }
        for waiter in waiters {
            assert_eq!(waiter.await.ok(), Some(Err(failure.clone())));
        }
    }
}
