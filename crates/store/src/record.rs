//! What every backend does to a task between loading its row and writing it back: the lease
//! check, the state changes (each through `stevedore_model::transition`) and the field updates
//! that go with them, and the plan for appending to a capped log.
//!
//! Keeping this out of the SQL modules means the SQLite and PostgreSQL stores share one
//! definition of what `complete`, `requeue` or `cancel` do to a task; a backend only loads a
//! `TaskRecord`, calls one of these methods and writes the record back, guarded by the status
//! and lease token it loaded.

use chrono::{Duration, SubsecRound};
use stevedore_model::{
    Event, NewTask, Task, TaskOutcome, TaskStatus, Timestamp, new_id, transition,
};

use crate::{Result, RunReport, StoreError};

/// A task as stored, with the columns `Task` does not show.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TaskRecord {
    pub task: Task,
    /// The current lease's token while the task is leased.
    pub lease_token: Option<i64>,
    pub lease_expires_at: Option<Timestamp>,
    /// The log reached its cap and ends with the truncation marker.
    pub log_truncated: bool,
    /// The row's version when it was loaded. A write succeeds only while the stored row still
    /// has it (and bumps it), so two writers can never both act on the same version of a task.
    pub version: i64,
}

/// What `cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelEffect {
    /// The task was queued and is cancelled now.
    Cancelled,
    /// A runner holds it; it was asked to kill it.
    Requested,
}

/// How to add bytes to a log that may not grow past its cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogAppendPlan {
    /// Cut the stored log back to this many bytes first (to make room for the marker).
    pub truncate_to: Option<u64>,
    /// Chunks to append, each with its byte offset in the log.
    pub chunks: Vec<(u64, Vec<u8>)>,
    /// The log's size afterwards.
    pub new_size: u64,
    /// Whether the log is now truncated.
    pub truncated: bool,
}

/// Timestamps are stored with microsecond precision (SQLite integers, PostgreSQL
/// `timestamptz`); values handed back to callers are cut the same way, so what a method
/// returns equals what a later read returns.
pub(crate) fn normalize(at: Timestamp) -> Timestamp {
    at.trunc_subsecs(6)
}

/// The line that ends a log cut at its cap.
pub(crate) fn truncation_marker(cap: u64) -> String {
    format!("\n[stevedore: log truncated at {cap} bytes]\n")
}

/// Where the truncation marker begins in a log that reached its cap: a truncated log is exactly
/// `cap` bytes long and ends with the marker (cut to the cap when the cap is smaller).
pub(crate) fn truncation_marker_start(size: u64) -> u64 {
    let marker = u64::try_from(truncation_marker(size).len()).unwrap_or(u64::MAX);
    size - marker.min(size)
}

/// Plans an append of `bytes` to a log of `size` bytes that may hold at most `cap` bytes in
/// total, marker included. Returns `None` when nothing is to be written.
pub(crate) fn plan_log_append(
    size: u64,
    truncated: bool,
    bytes: &[u8],
    cap: u64,
) -> Option<LogAppendPlan> {
    if truncated || bytes.is_empty() {
        return None;
    }
    let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if size.saturating_add(len) <= cap {
        return Some(LogAppendPlan {
            truncate_to: None,
            chunks: vec![(size, bytes.to_vec())],
            new_size: size + len,
            truncated: false,
        });
    }
    let marker = truncation_marker(cap);
    let marker = &marker.as_bytes()[..marker.len().min(usize::try_from(cap).unwrap_or(usize::MAX))];
    let marker_len = u64::try_from(marker.len()).unwrap_or(u64::MAX);
    // The user's bytes that fit in front of the marker.
    let kept = cap - marker_len;
    let mut plan = LogAppendPlan {
        truncate_to: None,
        chunks: Vec::with_capacity(2),
        new_size: cap,
        truncated: true,
    };
    if size > kept {
        plan.truncate_to = Some(kept);
    } else if size < kept {
        let room = usize::try_from(kept - size).unwrap_or(usize::MAX);
        plan.chunks
            .push((size, bytes[..room.min(bytes.len())].to_vec()));
    }
    if !marker.is_empty() {
        plan.chunks.push((kept, marker.to_vec()));
    }
    Some(plan)
}

/// A new queued task of a resolved code revision, due at `now + delay`.
pub(crate) fn queued_task(
    project_id: &str,
    code_id: &str,
    code_rev: u32,
    new_task: &NewTask,
    now: Timestamp,
) -> Task {
    Task {
        id: new_id(),
        project_id: project_id.to_owned(),
        code_id: code_id.to_owned(),
        code_name: new_task.code_name.clone(),
        code_rev,
        status: TaskStatus::Queued,
        priority: new_task.priority,
        payload: new_task.payload.clone(),
        label: new_task.label.clone(),
        cluster: new_task.cluster.clone(),
        timeout_secs: new_task.timeout_secs,
        delay_secs: new_task.delay_secs,
        created_at: now,
        updated_at: now,
        due_at: now + Duration::seconds(i64::from(new_task.delay_secs)),
        start_time: None,
        end_time: None,
        percent: None,
        msg: None,
        retry_count: new_task.retry_count,
        original_task_id: new_task.original_task_id.clone(),
        schedule_id: new_task.schedule_id.clone(),
        exit_code: None,
        log_size: 0,
        infra_attempts: 0,
        cancel_requested: false,
        peak_memory_bytes: None,
        cpu_time_ms: None,
        runner_id: None,
    }
}

impl TaskRecord {
    /// Refuses a runner's write unless `token` is the task's current lease and the task is
    /// still alive.
    pub fn check_lease(&self, token: i64) -> Result<()> {
        if self.lease_token != Some(token) || self.task.status.is_terminal() {
            return Err(StoreError::StaleLease {
                task_id: self.task.id.clone(),
            });
        }
        Ok(())
    }

    /// Hands the task to a runner: `queued` → `preparing`. A lease batch is written in bulk
    /// with exactly the fields set here (status, `updated_at`, runner, token, expiry); a change
    /// here must change that statement too.
    pub fn grant_lease(
        &mut self,
        runner_id: &str,
        token: i64,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<()> {
        self.apply(&Event::Leased, now)?;
        self.task.runner_id = Some(runner_id.to_owned());
        self.lease_token = Some(token);
        self.lease_expires_at = Some(expires_at);
        Ok(())
    }

    /// Extends the lease to `now + lease_secs`.
    pub fn extend_lease(&mut self, lease_secs: u32, now: Timestamp) -> Timestamp {
        let expires_at = now + Duration::seconds(i64::from(lease_secs));
        self.lease_expires_at = Some(expires_at);
        self.task.updated_at = now;
        expires_at
    }

    /// The container started: `preparing` → `running`. An earlier infrastructure failure's
    /// message is history now; `msg` carries the task's own progress from here on.
    pub fn start(&mut self, start_time: Timestamp, now: Timestamp) -> Result<()> {
        self.apply(&Event::Started, now)?;
        self.task.start_time = Some(start_time);
        self.task.msg = None;
        Ok(())
    }

    /// Records the run's end. The outcome's message replaces `msg` when it has one.
    pub fn finish(
        &mut self,
        outcome: &TaskOutcome,
        report: &RunReport,
        now: Timestamp,
    ) -> Result<()> {
        self.apply(&outcome.event(), now)?;
        let task = &mut self.task;
        task.exit_code = outcome.exit_code();
        if let Some(message) = outcome.message() {
            task.msg = Some(message);
        }
        task.start_time = report.start_time.or(task.start_time);
        task.end_time = Some(report.end_time.unwrap_or(now));
        task.peak_memory_bytes = report.peak_memory_bytes.or(task.peak_memory_bytes);
        task.cpu_time_ms = report.cpu_time_ms.or(task.cpu_time_ms);
        self.clear_lease();
        Ok(())
    }

    /// Takes a task back after an infrastructure failure (or an expired lease). It is queued
    /// again, due at `due_at`, unless this was failure number `max_infra_attempts`: then it
    /// ends `error` with a message that blames the infrastructure. A task whose cancellation
    /// was requested is cancelled instead of queued again.
    pub fn give_back(
        &mut self,
        reason: &str,
        due_at: Timestamp,
        max_infra_attempts: u32,
        now: Timestamp,
    ) -> Result<()> {
        self.task.infra_attempts = self.task.infra_attempts.saturating_add(1);
        let attempts = self.task.infra_attempts;
        let event = if self.task.cancel_requested {
            Event::Cancelled
        } else if attempts >= max_infra_attempts {
            Event::InfrastructureGaveUp
        } else {
            Event::Requeued
        };
        self.apply(&event, now)?;
        match event {
            Event::Requeued => {
                self.task.due_at = due_at;
                self.task.start_time = None;
                self.task.msg = Some(reason.to_owned());
            }
            Event::InfrastructureGaveUp => {
                self.task.end_time = Some(now);
                self.task.msg = Some(format!(
                    "infrastructure failure after {attempts} attempts: {reason}"
                ));
            }
            _ => {
                self.task.end_time = Some(now);
                self.task.msg = TaskOutcome::Cancelled.message();
            }
        }
        self.clear_lease();
        Ok(())
    }

    /// A user's cancel: a queued task ends at once, a leased one is flagged for its runner, a
    /// finished one is a conflict.
    pub fn cancel(&mut self, now: Timestamp) -> Result<CancelEffect> {
        let status = self.task.status;
        if status.is_terminal() {
            return Err(StoreError::Conflict(format!(
                "task {} is already finished: it is {status}",
                self.task.id
            )));
        }
        if status.is_active() {
            self.task.cancel_requested = true;
            self.task.updated_at = now;
            return Ok(CancelEffect::Requested);
        }
        self.apply(&Event::Cancelled, now)?;
        self.task.end_time = Some(now);
        self.task.msg = TaskOutcome::Cancelled.message();
        Ok(CancelEffect::Cancelled)
    }

    /// Progress: each given field replaces the stored one.
    pub fn set_progress(&mut self, percent: Option<u8>, msg: Option<&str>, now: Timestamp) {
        if let Some(percent) = percent {
            self.task.percent = Some(percent.min(100));
        }
        if let Some(msg) = msg {
            self.task.msg = Some(msg.to_owned());
        }
        self.task.updated_at = now;
    }

    pub fn apply_log_plan(&mut self, plan: &LogAppendPlan, now: Timestamp) {
        self.task.log_size = plan.new_size;
        self.log_truncated = plan.truncated;
        self.task.updated_at = now;
    }

    /// The only place a loaded task's status changes.
    fn apply(&mut self, event: &Event, now: Timestamp) -> Result<()> {
        self.task.status = transition(self.task.status, event)?;
        self.task.updated_at = now;
        Ok(())
    }

    fn clear_lease(&mut self) {
        self.lease_token = None;
        self.lease_expires_at = None;
        self.task.runner_id = None;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn log_below_cap_is_appended_whole() {
        let plan = plan_log_append(10, false, b"hello", 100).unwrap();
        assert_eq!(plan.chunks, vec![(10, b"hello".to_vec())]);
        assert_eq!(plan.new_size, 15);
        assert!(!plan.truncated);
    }

    #[test]
    fn log_over_cap_ends_with_the_marker_at_exactly_the_cap() {
        let cap = 100;
        let marker = truncation_marker(cap);
        let plan = plan_log_append(0, false, &[b'x'; 500], cap).unwrap();
        let kept = cap - marker.len() as u64;
        assert_eq!(plan.truncate_to, None);
        assert_eq!(plan.chunks[0], (0, vec![b'x'; kept as usize]));
        assert_eq!(plan.chunks[1], (kept, marker.into_bytes()));
        assert_eq!(plan.new_size, cap);
        assert!(plan.truncated);
        assert_eq!(plan_log_append(cap, true, b"more", cap), None);
    }

    #[test]
    fn a_full_log_is_cut_back_to_make_room_for_the_marker() {
        let plan = plan_log_append(100, false, b"y", 100).unwrap();
        let kept = 100 - truncation_marker(100).len() as u64;
        assert_eq!(plan.truncate_to, Some(kept));
        assert_eq!(plan.chunks.len(), 1);
        assert_eq!(plan.new_size, 100);
    }

    #[test]
    fn the_marker_start_matches_the_plan() {
        for (size, cap, bytes) in [(0, 100, 500), (100, 100, 1), (0, 5, 11), (10, 1000, 2000)] {
            let plan = plan_log_append(size, false, &vec![b'x'; bytes], cap).unwrap();
            let (marker_at, _) = plan.chunks.last().unwrap();
            assert_eq!(
                truncation_marker_start(plan.new_size),
                *marker_at,
                "cap {cap}"
            );
        }
    }

    #[test]
    fn a_cap_smaller_than_the_marker_keeps_part_of_the_marker() {
        let plan = plan_log_append(0, false, b"hello world", 5).unwrap();
        assert_eq!(plan.chunks, vec![(0, b"\n[ste".to_vec())]);
        assert_eq!(plan.new_size, 5);
    }
}
