//! What every backend does to a task between loading its row and writing it back: the lease
//! check, the state changes (each through `stevedore_model::transition`) and the field updates
//! that go with them; and likewise for schedules (`new_schedule`, `change_schedule`, the checks
//! and moves of a fire). The pure parts every holder of a task shares (a queued task from a
//! `NewTask`, the end of a run, the plan for appending to a capped log) are `stevedore-model`'s.
//!
//! Keeping this out of the SQL modules means the SQLite and PostgreSQL stores share one
//! definition of what `complete`, `requeue` or `cancel` do to a task; a backend only loads a
//! `TaskRecord`, calls one of these methods and writes the record back, guarded by the status
//! and lease token it loaded.

mod fair_share;
mod retention;

use std::collections::HashMap;

use chrono::{Duration, SubsecRound};
pub(crate) use stevedore_model::log::{LogAppendPlan, plan_log_append, truncation_marker_start};
use stevedore_model::{
    CodeSpec, Event, NewTask, Schedule, ScheduleSpec, ScheduleStatus, Task, TaskOutcome, Timestamp,
    automatic_retry, new_id, transition,
};

use crate::{HeartbeatReply, Requeue, Result, RunReport, StoreError};

pub(crate) use fair_share::{FairShare, Next, ProjectTurn, served_turns};
pub(crate) use retention::{PruneCandidate, plan_prune, walk_start};

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

/// The most rows one statement of a bulk change (`cancel_all`, a code's deletion) writes. Each
/// chunk is a write transaction of its own, so on SQLite's single writer other writes go in
/// between chunks instead of waiting for the whole change (a chunk takes a few milliseconds).
pub(crate) const BULK_CHUNK: i64 = 500;

/// Why a task is taken back from its runner without the runner's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rescue {
    /// Its lease expired: the runner stopped heartbeating (the rescuer).
    LeaseExpired,
    /// The runner started again under the same id, so it runs none of the tasks it held
    /// (`Store::release_runner`).
    RunnerRestarted,
}

/// What `cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelEffect {
    /// The task was queued and is cancelled now.
    Cancelled,
    /// A runner holds it; it was asked to kill it.
    Requested,
}

/// Timestamps are stored with microsecond precision (SQLite integers, PostgreSQL
/// `timestamptz`); values handed back to callers are cut the same way, so what a method
/// returns equals what a later read returns.
pub(crate) fn normalize(at: Timestamp) -> Timestamp {
    at.trunc_subsecs(6)
}

/// A runner's report with its times cut as `normalize` cuts them.
pub(crate) fn normalize_report(report: &RunReport) -> RunReport {
    RunReport {
        start_time: report.start_time.map(normalize),
        end_time: report.end_time.map(normalize),
        ..report.clone()
    }
}

/// A new queued task of a resolved code revision, due at `now + delay`.
fn queued_task(
    project_id: &str,
    code_id: &str,
    code_rev: u32,
    new_task: &NewTask,
    now: Timestamp,
) -> Task {
    Task::queued(project_id, code_id, code_rev, new_task, now)
}

/// A new queued task of a code whose latest revision is `latest`. It pins that revision, or the
/// one it asks for (`NewTask::code_rev`, a retry), which must exist.
pub(crate) fn queued_task_of_code(
    project_id: &str,
    code_id: &str,
    latest: u32,
    new_task: &NewTask,
    now: Timestamp,
) -> Result<Task> {
    let code_rev = match new_task.code_rev {
        Some(pinned) if pinned == 0 || pinned > latest => {
            return Err(StoreError::not_found(format!(
                "revision {pinned} of code {}",
                new_task.code_name
            )));
        }
        Some(pinned) => pinned,
        None => latest,
    };
    Ok(queued_task(project_id, code_id, code_rev, new_task, now))
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
    /// Leases every record of a batch to `runner_id` until `expires_at`, each with a fresh
    /// random token ([`fresh_lease_tokens`]).
    pub fn grant_leases(
        records: &mut [TaskRecord],
        runner_id: &str,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<()> {
        let tokens = fresh_lease_tokens(records.len())?;
        for (record, token) in records.iter_mut().zip(tokens) {
            record.grant_lease(runner_id, token, expires_at, now)?;
        }
        Ok(())
    }

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

    /// Extends the lease to `now + lease_secs`, and tells the runner whether to cancel.
    pub fn extend_lease(&mut self, lease_secs: u32, now: Timestamp) -> HeartbeatReply {
        let expires_at = now + Duration::seconds(i64::from(lease_secs));
        self.lease_expires_at = Some(expires_at);
        self.task.updated_at = now;
        HeartbeatReply {
            expires_at,
            cancel_requested: self.task.cancel_requested,
        }
    }

    /// The container started: `preparing` → `running`. An earlier infrastructure failure's
    /// message is history now; `msg` carries the task's own progress from here on.
    pub fn start(&mut self, start_time: Timestamp, now: Timestamp) -> Result<()> {
        self.apply(&Event::Started, now)?;
        self.task.start_time = Some(start_time);
        self.task.msg = None;
        Ok(())
    }

    /// Whether a completion with `outcome` may call for a user retry at all: most completions
    /// succeed, and that much is decided without reading anything.
    pub fn may_retry(&self, outcome: &TaskOutcome) -> bool {
        outcome.is_user_failure() && !self.task.cancel_requested
    }

    /// The user retry a completion with `outcome` calls for while the task's code revision,
    /// with `spec`, has retries left (`stevedore_model::automatic_retry` decides). It pins the
    /// revision that failed.
    pub fn retry(&self, outcome: &TaskOutcome, spec: &CodeSpec, now: Timestamp) -> Option<Task> {
        let task = &self.task;
        let retry = automatic_retry(task, outcome, spec)?;
        Some(queued_task(
            &task.project_id,
            &task.code_id,
            task.code_rev,
            &retry,
            now,
        ))
    }

    /// Records the run's end (`Task::finish`) and clears the lease.
    pub fn finish(
        &mut self,
        outcome: &TaskOutcome,
        report: &RunReport,
        now: Timestamp,
    ) -> Result<()> {
        self.task.finish(outcome, report, now)?;
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

    /// A runner's requeue (`Store::requeue`): `give_back` with its reason, due time and cap.
    pub fn requeue(&mut self, requeue: &Requeue, now: Timestamp) -> Result<()> {
        let due_at = normalize(requeue.due_at);
        self.give_back(&requeue.reason, due_at, requeue.max_infra_attempts, now)
    }

    /// Takes back a task from its runner without the runner's word: due again at once, unless
    /// that was its last infrastructure attempt.
    pub fn rescue(&mut self, why: Rescue, max_infra_attempts: u32, now: Timestamp) -> Result<()> {
        let runner = self.task.runner_id.as_deref().unwrap_or("(unknown)");
        let reason = match why {
            Rescue::LeaseExpired => format!("the lease of runner {runner} expired"),
            Rescue::RunnerRestarted => {
                format!("runner {runner} restarted while it held the task")
            }
        };
        self.give_back(&reason, now, max_infra_attempts, now)
    }

    /// A user's cancel: a queued task ends at once, a leased one is flagged for its runner, a
    /// finished one is a conflict.
    pub fn cancel(&mut self, now: Timestamp) -> Result<CancelEffect> {
        self.refuse_finished()?;
        let status = self.task.status;
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

    /// Progress set through the API: a finished task is a conflict.
    pub fn set_user_progress(
        &mut self,
        percent: Option<u8>,
        msg: Option<&str>,
        now: Timestamp,
    ) -> Result<()> {
        self.refuse_finished()?;
        self.set_progress(percent, msg, now);
        Ok(())
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

    fn refuse_finished(&self) -> Result<()> {
        let status = self.task.status;
        if status.is_terminal() {
            return Err(StoreError::Conflict(format!(
                "task {} is already finished: it is {status}",
                self.task.id
            )));
        }
        Ok(())
    }

    fn clear_lease(&mut self) {
        self.lease_token = None;
        self.lease_expires_at = None;
        self.task.runner_id = None;
    }
}

/// The slots one lease call may fill: each code's `max_concurrency` and each project's
/// `running_tasks` quota. The free slots of a code with a limit, and of a project, are counted
/// the first time one of its tasks is offered, the way the backend must count them
/// (`uncounted`, `counted`); the tasks picked in this call are taken off as they are picked.
#[derive(Debug, Default)]
pub(crate) struct LeaseSlots {
    /// Codes with a limit: how many more of their tasks may start.
    codes: HashMap<String, i64>,
    /// Codes that are full; the lease query skips them.
    full_codes: Vec<String>,
    /// Projects seen: how many more of their tasks may start.
    projects: HashMap<String, i64>,
}

/// Which free slots the backend counts for `LeaseSlots`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FreeSlots {
    /// The candidate's project's, under its `running_tasks` quota.
    OfProject,
    /// The candidate's code's, of its `max_concurrency` `limit`.
    OfCode { limit: i64 },
}

/// Whether a candidate may be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Taken,
    /// Its code is at its `max_concurrency`; the next fetch leaves the code out.
    CodeFull,
    /// Its project is at its `running_tasks` quota; the call serves the project no more.
    ProjectFull,
}

// === impl LeaseSlots ===

impl LeaseSlots {
    /// Codes that are full; the lease query skips them.
    pub fn full_codes(&self) -> &[String] {
        &self.full_codes
    }

    /// What the backend must count before `take` can decide about a candidate of a code
    /// with `code_limit`, if anything. Ask until `None`, handing each count to `counted`.
    pub fn uncounted(&self, record: &TaskRecord, code_limit: Option<i64>) -> Option<FreeSlots> {
        match self.projects.get(&record.task.project_id) {
            None => return Some(FreeSlots::OfProject),
            Some(free) if *free <= 0 => return None,
            Some(_) => {}
        }
        let limit = code_limit?;
        (!self.codes.contains_key(&record.task.code_id)).then_some(FreeSlots::OfCode { limit })
    }

    /// Records what the backend counted for a candidate.
    pub fn counted(&mut self, record: &TaskRecord, what: FreeSlots, free: i64) {
        let (counts, id) = match what {
            FreeSlots::OfProject => (&mut self.projects, &record.task.project_id),
            FreeSlots::OfCode { .. } => (&mut self.codes, &record.task.code_id),
        };
        counts.insert(id.clone(), free);
    }

    /// Takes a slot of the candidate's project and of its code, if both have one free.
    /// Everything `uncounted` asked for must have been counted.
    pub fn take(&mut self, record: &TaskRecord, code_limit: Option<i64>) -> Slot {
        let (project_id, code_id) = (&record.task.project_id, &record.task.code_id);
        if self.projects.get(project_id).is_none_or(|free| *free <= 0) {
            return Slot::ProjectFull;
        }
        if code_limit.is_some() {
            let free = self.codes.entry(code_id.clone()).or_insert(0);
            if *free <= 0 {
                if !self.full_codes.contains(code_id) {
                    self.full_codes.push(code_id.clone());
                }
                return Slot::CodeFull;
            }
            *free -= 1;
            if *free == 0 {
                self.full_codes.push(code_id.clone());
            }
        }
        if let Some(free) = self.projects.get_mut(project_id) {
            *free -= 1;
        }
        Slot::Taken
    }
}

// === schedules ===

/// A new schedule of `code_id`, first due at `first_fire`; one that will never fire is
/// `complete` from the start.
pub(crate) fn new_schedule(
    project_id: &str,
    code_id: String,
    spec: &ScheduleSpec,
    first_fire: Option<Timestamp>,
    now: Timestamp,
) -> Schedule {
    let next_start = first_fire.map(normalize);
    Schedule {
        id: new_id(),
        project_id: project_id.to_owned(),
        code_id,
        spec: spec.clone(),
        status: schedule_status(next_start),
        next_start,
        last_run_time: None,
        run_count: 0,
        created_at: now,
        updated_at: now,
    }
}

/// How many of `specs` will be stored `scheduled` (those with a first fire time): what they
/// add to the project's schedules quota.
pub(crate) fn firing(specs: &[(ScheduleSpec, Option<Timestamp>)]) -> u64 {
    specs.iter().filter(|(_, first)| first.is_some()).count() as u64
}

/// A live schedule's status with `next_start` as its next fire time: `scheduled`, or
/// `complete` once it will never fire again.
pub(crate) fn schedule_status(next_start: Option<Timestamp>) -> ScheduleStatus {
    if next_start.is_some() {
        ScheduleStatus::Scheduled
    } else {
        ScheduleStatus::Complete
    }
}

/// Replaces a `scheduled` schedule's spec and next fire time; one that is complete or
/// cancelled is a conflict.
pub(crate) fn change_schedule(
    schedule: &mut Schedule,
    spec: &ScheduleSpec,
    next_start: Option<Timestamp>,
    now: Timestamp,
) -> Result<()> {
    if schedule.status != ScheduleStatus::Scheduled {
        return Err(StoreError::Conflict(format!(
            "schedule {} is {}; only a scheduled one can be changed",
            schedule.id,
            schedule.status.as_str()
        )));
    }
    schedule.spec = spec.clone();
    schedule.next_start = next_start;
    schedule.status = schedule_status(next_start);
    schedule.updated_at = now;
    Ok(())
}

/// Refuses to fire a schedule that is no longer due at `fired_at`: another scheduler fired it,
/// or it was cancelled.
pub(crate) fn check_due(schedule: &Schedule, fired_at: Timestamp) -> Result<()> {
    if schedule.status != ScheduleStatus::Scheduled || schedule.next_start != Some(fired_at) {
        return Err(StoreError::Conflict(format!(
            "schedule {} is not due at {fired_at}: it already fired or was cancelled",
            schedule.id
        )));
    }
    Ok(())
}

/// Where a schedule at its `max_concurrency` goes instead of firing at `fired_at`: the fire
/// time after it, as after a missed time.
pub(crate) fn next_start_after_pass(
    schedule: &Schedule,
    fired_at: Timestamp,
    now: Timestamp,
) -> Option<Timestamp> {
    schedule
        .spec
        .next_fire(fired_at, schedule.run_count, now)
        .map(normalize)
}

/// The one task a fire queued.
pub(crate) fn fired_task(mut queued: Vec<Task>) -> Result<Option<Task>> {
    queued
        .pop()
        .map(Some)
        .ok_or_else(|| StoreError::Corrupt("firing a schedule queued no task".to_owned()))
}

/// `count` lease tokens: random, positive, distinct from one another. A token is the only
/// proof that a runner holds a task's lease (every later write about the task carries it), so
/// it must not be guessable from the tokens a runner was given itself, as counted ones were. A
/// rescued task's new lease has a new token, so the old one no longer matches.
pub fn fresh_lease_tokens(count: usize) -> Result<Vec<i64>> {
    let mut bytes = vec![0_u8; count * 8];
    getrandom::fill(&mut bytes).map_err(|error| StoreError::Random(error.to_string()))?;
    let mut tokens: Vec<i64> = bytes
        .chunks_exact(8)
        .map(|chunk| {
            let raw = u64::from_le_bytes(<[u8; 8]>::try_from(chunk).unwrap_or_default());
            i64::try_from(raw >> 1).unwrap_or(i64::MAX).max(1)
        })
        .collect();
    // 63 random bits: a repeat within one batch is all but impossible, but cheap to rule out.
    let mut seen = std::collections::HashSet::with_capacity(tokens.len());
    for token in &mut tokens {
        while !seen.insert(*token) {
            *token = token.wrapping_add(1).max(1);
        }
    }
    Ok(tokens)
}

/// What still uses a cluster's name: its tasks queued or active and its schedules still
/// firing. While any does, the cluster keeps its name and stays, so no later cluster of that
/// name (another project's) inherits them.
pub struct Users {
    pub tasks: i64,
    pub schedules: i64,
}

impl Users {
    /// Refuses with a message naming what holds cluster `name` and `until`, what would let go.
    pub fn check(&self, name: &str, until: &str) -> Result<()> {
        if self.tasks > 0 {
            return Err(StoreError::Conflict(format!(
                "cluster {name:?} has {} tasks queued or running; {until} they finish (or are cancelled)",
                self.tasks
            )));
        }
        if self.schedules > 0 {
            return Err(StoreError::Conflict(format!(
                "cluster {name:?} is named by {} schedules; {until} they are cancelled or moved to another cluster",
                self.schedules
            )));
        }
        Ok(())
    }
}
