//! The image janitor: keeps the engine's images under a disk budget by removing those this
//! runner used least recently.
//!
//! ```text
//! attempt ─ImageUses::acquire(image)─▶ in use (never removed) ─drop─▶ last used now
//! janitor (every interval, and after each pull):
//!   Σ sizes of the engine's images > budget? ─▶ remove the least recently used image the
//!   runner knows, not in use, not a stack image ─▶ list again ─▶ … until under budget
//! ```
//!
//! Only images this runner's tasks used in its current life are candidates: a pulled image
//! cannot carry a label of ours, and an image the runner never used may be the operator's.
//! Stack images are never removed (the local ones cannot be pulled again). An image a
//! container still uses is refused by the engine ([`EngineError::Conflict`]) and kept. The
//! engine's sizes count a layer shared by several images in each, so the sum errs high and
//! the janitor, if anything, removes early.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use stevedore_engine::{ContainerEngine, EngineError};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The images this runner's tasks used: when last, and whether one uses it now.
#[derive(Debug, Default)]
pub(crate) struct ImageUses {
    records: Mutex<HashMap<String, UseRecord>>,
    /// Wakes the janitor after a pull.
    pulled: Notify,
}

#[derive(Debug, Clone, Copy)]
struct UseRecord {
    last_used: Instant,
    active: usize,
}

/// One task's use of an image: while it lives the janitor leaves the image alone.
#[derive(Debug)]
pub(crate) struct ImageInUse {
    uses: Arc<ImageUses>,
    image: String,
}

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Sweep {
    /// The images' total size before, bytes.
    pub before: u64,
    /// ... and after.
    pub after: u64,
    /// The references removed, least recently used first.
    pub removed: Vec<String>,
}

// === impl ImageUses ===

impl ImageUses {
    /// Marks `image` in use until the returned guard is dropped.
    pub(crate) fn acquire(self: &Arc<Self>, image: &str) -> ImageInUse {
        let mut records = self.lock();
        let record = records.entry(image.to_owned()).or_insert(UseRecord {
            last_used: Instant::now(),
            active: 0,
        });
        record.active += 1;
        record.last_used = Instant::now();
        ImageInUse {
            uses: Arc::clone(self),
            image: image.to_owned(),
        }
    }

    /// A task pulled an image: the janitor looks at the budget now.
    pub(crate) fn pulled(&self) {
        self.pulled.notify_one();
    }

    /// The known images not in use and not `protected`, least recently used first.
    fn candidates(&self, protected: &HashSet<String>) -> Vec<String> {
        let mut idle: Vec<(Instant, String)> = self
            .lock()
            .iter()
            .filter(|(image, record)| record.active == 0 && !protected.contains(*image))
            .map(|(image, record)| (record.last_used, image.clone()))
            .collect();
        idle.sort();
        idle.into_iter().map(|(_, image)| image).collect()
    }

    fn forget(&self, image: &str) {
        let mut records = self.lock();
        if records.get(image).is_some_and(|record| record.active == 0) {
            records.remove(image);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, UseRecord>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ImageInUse {
    fn drop(&mut self) {
        let mut records = self.uses.lock();
        if let Some(record) = records.get_mut(&self.image) {
            record.active = record.active.saturating_sub(1);
            record.last_used = Instant::now();
        }
    }
}

/// Sweeps every `interval` and after each pull until `shutdown`.
pub(crate) async fn janitor(
    engine: Arc<dyn ContainerEngine>,
    uses: Arc<ImageUses>,
    budget_bytes: u64,
    protected: HashSet<String>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = uses.pulled.notified() => {}
            () = shutdown.cancelled() => return,
        }
        match sweep(engine.as_ref(), &uses, budget_bytes, &protected).await {
            Ok(sweep) if !sweep.removed.is_empty() => tracing::info!(
                before_mib = sweep.before >> 20,
                after_mib = sweep.after >> 20,
                budget_mib = budget_bytes >> 20,
                removed = ?sweep.removed,
                "removed least recently used images over the disk budget"
            ),
            Ok(sweep) if sweep.after > budget_bytes => tracing::warn!(
                images_mib = sweep.after >> 20,
                budget_mib = budget_bytes >> 20,
                "the images are over the disk budget, and none of them may be removed"
            ),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot weigh the images against the budget"),
        }
    }
}

/// Removes the least recently used idle images until the images' total size is within
/// `budget_bytes`, or no candidate is left.
pub(crate) async fn sweep(
    engine: &dyn ContainerEngine,
    uses: &ImageUses,
    budget_bytes: u64,
    protected: &HashSet<String>,
) -> Result<Sweep, EngineError> {
    let total = |images: &[stevedore_engine::ImageEntry]| -> u64 {
        images.iter().map(|image| image.size_bytes).sum()
    };
    let before = total(&engine.list_images().await?);
    let mut sweep = Sweep {
        before,
        after: before,
        removed: Vec::new(),
    };
    if before <= budget_bytes {
        return Ok(sweep);
    }
    for image in uses.candidates(protected) {
        match engine.remove_image(&image).await {
            Ok(()) => {
                uses.forget(&image);
                sweep.removed.push(image);
            }
            Err(EngineError::ImageNotFound { .. }) => uses.forget(&image),
            // A container (perhaps not ours) still uses it; it stays.
            Err(EngineError::Conflict { .. }) => continue,
            Err(error) => return Err(error),
        }
        sweep.after = total(&engine.list_images().await?);
        if sweep.after <= budget_bytes {
            break;
        }
    }
    Ok(sweep)
}

#[cfg(test)]
mod tests {
    use stevedore_engine::ImageStore;
    use stevedore_engine::fake::FakeEngine;

    use super::*;

    #[tokio::test]
    async fn the_least_recently_used_idle_images_go_until_under_budget() {
        let engine = FakeEngine::new();
        for image in ["old:1", "older:1", "busy:1", "stack:1", "foreign:1"] {
            engine.add_image(image);
            engine.set_image_size(image, 100);
        }
        let uses = Arc::new(ImageUses::default());
        drop(uses.acquire("older:1"));
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(uses.acquire("stack:1"));
        drop(uses.acquire("old:1"));
        let _busy = uses.acquire("busy:1");
        let protected = HashSet::from(["stack:1".to_owned()]);

        // Within budget: nothing goes.
        let none = sweep(&engine, &uses, 500, &protected).await.unwrap();
        assert!(none.removed.is_empty());

        // 500 bytes over a budget of 300: the two idle ones this runner used, oldest first;
        // never the busy one, the stack image or the one it never used.
        let swept = sweep(&engine, &uses, 300, &protected).await.unwrap();
        assert_eq!(
            swept.removed,
            vec!["older:1".to_owned(), "old:1".to_owned()]
        );
        assert_eq!((swept.before, swept.after), (500, 300));
        assert!(engine.image_present("busy:1").await.unwrap());
        assert!(engine.image_present("stack:1").await.unwrap());
        assert!(engine.image_present("foreign:1").await.unwrap());

        // Still over a tighter budget, and nothing left that may go.
        let stuck = sweep(&engine, &uses, 100, &protected).await.unwrap();
        assert!(stuck.removed.is_empty());
        assert_eq!(stuck.after, 300);
    }
}
