//! Retention's chunks, decided alike by both backends: which of the tasks a call of
//! `Store::prune_task_data` read it takes, and where the walk goes on.

use crate::convert::{micros, timestamp};
use crate::{PruneCursor, Result, TaskDataPrune};

/// The most log bytes one call of `prune_task_data` removes, past its first task: a chunk of
/// `max_rows` tasks with 10 MiB logs each would otherwise hold the writer for seconds.
pub(crate) const PRUNE_CHUNK_BYTES: u64 = 32 << 20;

/// A finished task that still holds what the walk removes, as the walk's query read it (in
/// the walk's order: end time, then id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PruneCandidate {
    pub end_time: i64,
    pub task_id: String,
    /// What it holds: its log's size or its payload's bytes.
    pub bytes: u64,
}

/// The tasks one call prunes and what it reports.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PrunePlan {
    pub task_ids: Vec<String>,
    pub prune: TaskDataPrune,
}

/// Where the walk's query starts: after the cursor, or before every task (ids are never
/// empty).
pub(crate) fn walk_start(after: Option<&PruneCursor>) -> (i64, &str) {
    match after {
        Some(cursor) => (micros(cursor.end_time), cursor.task_id.as_str()),
        None => (i64::MIN, ""),
    }
}

/// Takes the first `candidates` (at most `max_rows` of them, read in order) until their bytes
/// reach [`PRUNE_CHUNK_BYTES`], always the first one. The walk goes on after the last one
/// taken when the query filled `max_rows` or some were left for the bytes; otherwise it is
/// done.
pub(crate) fn plan_prune(candidates: Vec<PruneCandidate>, max_rows: u32) -> Result<PrunePlan> {
    let read = candidates.len();
    let full = u32::try_from(read).map_or(true, |read| read >= max_rows);
    let mut prune = TaskDataPrune::default();
    let mut task_ids = Vec::with_capacity(read);
    let mut last = None;
    for candidate in candidates {
        if !task_ids.is_empty() && prune.bytes >= PRUNE_CHUNK_BYTES {
            break;
        }
        prune.passed += 1;
        prune.removed += u64::from(candidate.bytes > 0);
        prune.bytes = prune.bytes.saturating_add(candidate.bytes);
        last = Some((candidate.end_time, candidate.task_id.clone()));
        task_ids.push(candidate.task_id);
    }
    let cut = task_ids.len() < read;
    prune.next = match last {
        Some((end_time, task_id)) if full || cut => Some(PruneCursor {
            end_time: timestamp(end_time)?,
            task_id,
        }),
        _ => None,
    };
    Ok(PrunePlan { task_ids, prune })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(n: i64, bytes: u64) -> PruneCandidate {
        PruneCandidate {
            end_time: n * 1_000_000,
            task_id: format!("t{n}"),
            bytes,
        }
    }

    #[test]
    fn a_short_read_is_the_end_of_the_walk() {
        let plan = plan_prune(vec![candidate(1, 5), candidate(2, 0)], 3).unwrap();
        assert_eq!(plan.task_ids, ["t1", "t2"]);
        assert_eq!(
            (plan.prune.passed, plan.prune.removed, plan.prune.bytes),
            (2, 1, 5)
        );
        assert_eq!(plan.prune.next, None);
        assert_eq!(
            plan_prune(Vec::new(), 3).unwrap().prune,
            TaskDataPrune::default()
        );
    }

    #[test]
    fn a_full_read_goes_on_after_its_last_task() {
        let plan = plan_prune(vec![candidate(1, 5), candidate(2, 7)], 2).unwrap();
        let next = plan.prune.next.unwrap();
        assert_eq!(next.task_id, "t2");
        assert_eq!(walk_start(Some(&next)), (2_000_000, "t2"));
    }

    #[test]
    fn big_logs_end_a_chunk_early_but_never_before_its_first_task() {
        let big = PRUNE_CHUNK_BYTES;
        let plan = plan_prune(vec![candidate(1, big * 2), candidate(2, 1)], 10).unwrap();
        assert_eq!(plan.task_ids, ["t1"]);
        assert_eq!(plan.prune.next.unwrap().task_id, "t1");
        let plan = plan_prune(
            vec![candidate(1, big - 1), candidate(2, 1), candidate(3, 1)],
            10,
        )
        .unwrap();
        assert_eq!(plan.task_ids, ["t1", "t2"]);
    }
}
