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
//! Only images this runner's tasks used are candidates: a pulled image cannot carry a label
//! of ours, and an image the runner never used may be the operator's. The record of when each
//! was last used is kept in the runner's own directory (beside its lease ledger) after every
//! sweep and at shutdown, so images used in an earlier life stay candidates after a restart
//! instead of filling the disk for good.
//! Stack images are never removed (the local ones cannot be pulled again). An image a
//! container still uses is refused by the engine ([`EngineError::Conflict`]) and kept. The
//! engine's sizes count a layer shared by several images in each, so the sum errs high and
//! the janitor, if anything, removes early.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stevedore_engine::{ContainerEngine, EngineError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The file of the use record, in the runner's own directory (with a dot: the lease ledger
/// beside it takes names without one for task ids).
pub(crate) const USES_FILE: &str = "image-uses.record";

/// The images this runner's tasks used: when last, and whether one uses it now.
#[derive(Debug, Default)]
pub(crate) struct ImageUses {
    records: Mutex<HashMap<String, UseRecord>>,
    /// Wakes the janitor after a pull.
    pulled: Notify,
    /// Where the record is kept across lives; `None`: this life only.
    file: Option<PathBuf>,
    /// Changed since it was last kept.
    changed: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct UseRecord {
    /// Wall-clock time, so that it means the same to the next life.
    last_used: SystemTime,
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
    /// The record kept in `dir` (what an earlier life of the runner wrote there, if anything),
    /// kept there again by [`ImageUses::keep`]. An unreadable record is started afresh: the
    /// worst it costs is images that stay until the operator removes them.
    pub(crate) fn kept_in(dir: &Path) -> ImageUses {
        let file = dir.join(USES_FILE);
        let records = match std::fs::read_to_string(&file) {
            Ok(text) => parse_record(&text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(error) => {
                tracing::warn!(%error, file = %file.display(), "cannot read the images' use record");
                HashMap::new()
            }
        };
        ImageUses {
            records: Mutex::new(records),
            file: Some(file),
            ..ImageUses::default()
        }
    }

    /// Writes the record down, when it changed since the last time (atomically: a new file
    /// renamed over the old one).
    pub(crate) async fn keep(&self) {
        let Some(file) = &self.file else { return };
        if !self.changed.swap(false, Ordering::Relaxed) {
            return;
        }
        let text = format_record(&self.lock());
        let written = async {
            let partial = file.with_extension("partial");
            tokio::fs::write(&partial, text).await?;
            tokio::fs::rename(&partial, file).await
        };
        if let Err(error) = written.await {
            self.changed.store(true, Ordering::Relaxed);
            tracing::warn!(%error, file = %file.display(), "cannot keep the images' use record");
        }
    }

    /// Marks `image` in use until the returned guard is dropped.
    pub(crate) fn acquire(self: &Arc<Self>, image: &str) -> ImageInUse {
        let mut records = self.lock();
        let record = records.entry(image.to_owned()).or_insert(UseRecord {
            last_used: SystemTime::now(),
            active: 0,
        });
        record.active += 1;
        record.last_used = SystemTime::now();
        self.changed.store(true, Ordering::Relaxed);
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
        let mut idle: Vec<(SystemTime, String)> = self
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
            self.changed.store(true, Ordering::Relaxed);
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
            record.last_used = SystemTime::now();
            self.uses.changed.store(true, Ordering::Relaxed);
        }
    }
}

/// The record as its file holds it: a line per image, the seconds since the Unix epoch it
/// was last used, a tab, its reference.
fn format_record(records: &HashMap<String, UseRecord>) -> String {
    let mut lines: Vec<(u64, &str)> = records
        .iter()
        .map(|(image, record)| {
            let secs = record
                .last_used
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            (secs, image.as_str())
        })
        .collect();
    lines.sort_unstable();
    lines
        .into_iter()
        .map(|(secs, image)| format!("{secs}\t{image}\n"))
        .collect()
}

/// [`format_record`]'s file read back; lines that do not parse are skipped.
fn parse_record(text: &str) -> HashMap<String, UseRecord> {
    text.lines()
        .filter_map(|line| {
            let (secs, image) = line.split_once('\t')?;
            let secs: u64 = secs.parse().ok()?;
            (!image.is_empty()).then(|| {
                let record = UseRecord {
                    last_used: UNIX_EPOCH + Duration::from_secs(secs),
                    active: 0,
                };
                (image.to_owned(), record)
            })
        })
        .collect()
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
            () = shutdown.cancelled() => {
                uses.keep().await;
                return;
            }
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
        uses.keep().await;
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

    #[tokio::test]
    async fn images_used_in_an_earlier_life_stay_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let engine = FakeEngine::new();
        for image in ["first:1", "second:1", "foreign:1"] {
            engine.add_image(image);
            engine.set_image_size(image, 100);
        }
        let before = Arc::new(ImageUses::kept_in(dir.path()));
        drop(before.acquire("first:1"));
        before.lock().get_mut("first:1").unwrap().last_used = UNIX_EPOCH + Duration::from_secs(10);
        drop(before.acquire("second:1"));
        before.keep().await;
        drop(before);

        // The next life knows both, the older first, and removes them over its budget.
        let after = ImageUses::kept_in(dir.path());
        assert_eq!(
            after.candidates(&HashSet::new()),
            vec!["first:1".to_owned(), "second:1".to_owned()]
        );
        let swept = sweep(&engine, &after, 200, &HashSet::new()).await.unwrap();
        assert_eq!(swept.removed, vec!["first:1".to_owned()]);
        after.keep().await;
        let kept = std::fs::read_to_string(dir.path().join(USES_FILE)).unwrap();
        assert!(
            !kept.contains("first:1") && kept.contains("second:1"),
            "{kept}"
        );
        // Nothing the ledger would take for a task's deadline.
        assert!(crate::ledger::deadlines(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn the_record_reads_back_and_skips_what_does_not_parse() {
        let text = "12\tbusybox:1\nnot a line\n\t\n34\tregistry.example:5000/a/b@sha256:00\n";
        let records = parse_record(text);
        assert_eq!(records.len(), 2);
        assert_eq!(
            parse_record(&format_record(&records))
                .keys()
                .collect::<HashSet<_>>(),
            records.keys().collect::<HashSet<_>>()
        );
    }
}
