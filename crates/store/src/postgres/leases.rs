//! The runner's side: the lease transaction, heartbeats, starts, progress, completions,
//! requeues and rescues.

use chrono::Duration;
use sqlx::Postgres;
use sqlx::Row;
use sqlx::postgres::{PgArguments, PgConnection};
use sqlx::query::QueryAs;
use stevedore_model::limits::MAX_PRIORITY;
use stevedore_model::{Quota, QuotaLimits, Task, TaskOutcome, TaskStatus, Timestamp};

use crate::convert::signed;

use super::batch::LeasedChange;
use super::rows::{self, task_columns};
use super::tasks;
use super::{PgStore, finish};
use crate::convert::micros;
use crate::record::{
    FairShare, FreeSlots, LeaseSlots, Next, ProjectTurn, Rescue, Slot, TaskRecord, normalize,
    normalize_report, served_turns,
};
use crate::{
    HeartbeatReply, Lease, LeaseRequest, LeasedTask, Requeue, RescuedTask, Result, RunReport,
    StoreError,
};

/// The first key of the advisory locks that serialize leasing per code (the second is a hash
/// of the code id): an arbitrary constant, so stevedore's locks stay apart from any other
/// application's on the same database.
const CODE_LOCK_CLASS: i32 = 0x5374_6476;

/// The first key of the advisory locks that serialize leasing per project, for its
/// `running_tasks` quota (the second is a hash of the project id).
const PROJECT_LOCK_CLASS: i32 = 0x5374_6477;

/// The filter every lease candidate `t` (of code `c`) passes, whatever its priority and
/// project: due by `$1`, of a runnable code, in one of the runner's clusters `$2`, and
/// visible to the request's owner (`$owner`): a project's runner gets only that project's
/// tasks; the operator's runners get none of a project that owns a cluster of the task's
/// cluster name.
macro_rules! runnable_due_task {
    ($owner:literal) => {
        concat!(
            "t.due_at <= $1 AND NOT c.paused AND c.deleted_at IS NULL AND t.cluster = ANY($2) \
             AND (CASE WHEN ",
            $owner,
            "::text IS NULL THEN NOT EXISTS (SELECT 1 FROM clusters AS k \
             WHERE k.project_id = t.project_id AND k.name = t.cluster) ELSE t.project_id = ",
            $owner,
            " END)"
        )
    };
}

/// A project's `running_tasks` quota in SQL, for the project the expression `$project` names:
/// `used`, how many of its tasks hold a slot (those preparing or running); `limit`, its own
/// limit (NULL when it has none: then the default, `running_limit`). Both the count without
/// the lock (`count_project_slots`) and the count again under it (`confirm_leases`) read these,
/// with the values `bind_running_slots` binds as `$2` to `$4`. The statuses are bound, not
/// written out, so that under the generic plans of the lease transaction (`lease_due_tasks`)
/// the count takes `tasks_by_project_status` rather than scan every active task of every
/// project.
macro_rules! running_slots {
    (used: $project:literal) => {
        concat!(
            "(SELECT count(*) FROM tasks AS t WHERE t.project_id = ",
            $project,
            " AND t.status IN ($2, $3))"
        )
    };
    (limit: $project:literal) => {
        concat!(
            "(SELECT q.\"limit\" FROM project_quotas AS q WHERE q.project_id = ",
            $project,
            " AND q.quota = $4)"
        )
    };
}

/// The projects with runnable due tasks at each priority (`record::ProjectTurn`), with their
/// last turn and when their earliest such task became due; only the owner's with `$3`. The
/// projects with queued tasks are found by a loose index scan of `tasks_queued_by_project`
/// (each step one seek for the next (priority, project)), so a project's backlog costs
/// nothing here.
const PROJECTS_WITH_DUE_WORK: &str = concat!(
    "WITH RECURSIVE waiting (priority, project_id) AS ( \
     (SELECT t.priority, t.project_id FROM tasks AS t WHERE t.status = 'queued' \
      AND $3::text IS NULL ORDER BY t.priority, t.project_id LIMIT 1) \
     UNION ALL \
     SELECT n.priority, n.project_id FROM waiting AS w CROSS JOIN LATERAL \
      (SELECT t.priority, t.project_id FROM tasks AS t WHERE t.status = 'queued' \
       AND (t.priority, t.project_id) > (w.priority, w.project_id) \
       ORDER BY t.priority, t.project_id LIMIT 1) AS n), \
     owned (priority, project_id) AS (SELECT p::smallint, $3::text \
      FROM generate_series(0, 2) AS p WHERE $3::text IS NOT NULL) \
     SELECT w.priority, w.project_id, COALESCE(l.turn, 0) AS turn, d.due_at AS first_due \
     FROM (SELECT * FROM waiting UNION ALL SELECT * FROM owned) AS w \
     LEFT JOIN project_lease_turns AS l ON l.project_id = w.project_id \
     CROSS JOIN LATERAL (SELECT t.due_at FROM tasks AS t JOIN codes AS c ON c.id = t.code_id \
      WHERE t.status = 'queued' AND t.priority = w.priority AND t.project_id = w.project_id \
      AND ",
    runnable_due_task!("$3"),
    " ORDER BY t.due_at LIMIT 1) AS d"
);

const _: () = assert!(
    MAX_PRIORITY == 2,
    "PROJECTS_WITH_DUE_WORK lists every priority"
);

/// Lease candidates of priority `$7`: up to `$5` runnable due tasks of each project of `$8`,
/// each project's walked by due time through `tasks_queued_by_project`, in the order of `$8`,
/// locked for this transaction. (The lease plans this and `PROJECTS_WITH_DUE_WORK` once per
/// connection, generically: planned per call from the bound values, which PostgreSQL would
/// otherwise do for these, planning took longer than the statements ran. The generic plans
/// walk `tasks_queued_by_project` as the custom ones did, checked on a table of 700,000
/// tasks with one project holding most of the backlog.) `SKIP LOCKED` passes over tasks
/// another server is leasing right now instead of waiting for it; a row that another
/// transaction changed and committed after this statement's snapshot is checked again against
/// the `WHERE` clause before it is returned, so a task leased elsewhere in the meantime is not
/// returned. `$3` lists codes that
/// are full, `$4` tasks already picked in this call, `$6` is the request's owner.
const LEASE_CANDIDATES: &str = concat!(
    "SELECT x.* FROM unnest($8::text[]) WITH ORDINALITY AS w (project_id, position) \
     CROSS JOIN LATERAL (SELECT ",
    task_columns!(),
    ", c.max_concurrency AS code_max_concurrency \
     FROM tasks AS t JOIN codes AS c ON c.id = t.code_id \
     WHERE t.status = 'queued' AND t.priority = $7 AND t.project_id = w.project_id AND ",
    runnable_due_task!("$6"),
    " AND t.code_id <> ALL($3) AND t.id <> ALL($4) \
     ORDER BY t.due_at, t.id LIMIT $5 FOR UPDATE OF t SKIP LOCKED) AS x \
     ORDER BY w.position, x.due_at, x.id"
);

pub(super) async fn lease(
    store: &PgStore,
    request: &LeaseRequest,
    now: Timestamp,
) -> Result<Vec<LeasedTask>> {
    if request.max_tasks == 0 || request.clusters.is_empty() {
        return Ok(Vec::new());
    }
    let now = normalize(now);
    // Projects' free slots estimated first, confirmed under their locks after the writes; a
    // lease that went past a project's quota is rolled back and done again counting under
    // the locks from the start (`ProjectCounts`).
    let mut tx = store.pool.begin().await?;
    let leased = lease_due_tasks(&mut tx, store, request, ProjectCounts::Estimated, now).await;
    let (leased, records) = match finish_lease(tx, leased).await? {
        Some(leased) => leased,
        None => {
            let mut tx = store.pool.begin().await?;
            let leased = lease_due_tasks(&mut tx, store, request, ProjectCounts::Locked, now)
                .await
                .map(Option::unwrap_or_default);
            finish(tx, leased).await?
        }
    };
    // Committed: the runner's writes about these tasks may start from these copies.
    store.leased_writes.leased(records);
    Ok(leased)
}

/// Commits a lease, or rolls it back: on an error, and when it went past a project's quota
/// (`None`).
async fn finish_lease(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    leased: Result<Option<(Vec<LeasedTask>, Vec<TaskRecord>)>>,
) -> Result<Option<(Vec<LeasedTask>, Vec<TaskRecord>)>> {
    match leased {
        Ok(None) => {
            tx.rollback().await?;
            Ok(None)
        }
        leased => finish(tx, leased).await,
    }
}

pub(super) async fn heartbeat(
    store: &PgStore,
    task_id: &str,
    token: i64,
    lease_secs: u32,
    now: Timestamp,
) -> Result<HeartbeatReply> {
    let changed = store
        .change_leased(
            task_id,
            token,
            LeasedChange::Heartbeat { lease_secs },
            normalize(now),
        )
        .await?;
    changed.heartbeat.ok_or_else(|| {
        StoreError::Corrupt(format!("the heartbeat of task {task_id} was not answered"))
    })
}

pub(super) async fn mark_running(
    store: &PgStore,
    task_id: &str,
    token: i64,
    start_time: Timestamp,
    now: Timestamp,
) -> Result<Task> {
    let start_time = normalize(start_time);
    let change = LeasedChange::Start { start_time };
    Ok(store
        .change_leased(task_id, token, change, normalize(now))
        .await?
        .task)
}

pub(super) async fn progress(
    store: &PgStore,
    task_id: &str,
    token: i64,
    percent: Option<u8>,
    msg: Option<&str>,
    now: Timestamp,
) -> Result<()> {
    let change = LeasedChange::Progress {
        percent,
        msg: msg.map(str::to_owned),
    };
    store
        .change_leased(task_id, token, change, normalize(now))
        .await?;
    Ok(())
}

pub(super) async fn complete(
    store: &PgStore,
    task_id: &str,
    token: i64,
    outcome: &TaskOutcome,
    report: &RunReport,
    now: Timestamp,
) -> Result<Task> {
    let change = LeasedChange::Complete {
        outcome: outcome.clone(),
        report: normalize_report(report),
    };
    Ok(store
        .change_leased(task_id, token, change, normalize(now))
        .await?
        .task)
}

pub(super) async fn requeue(
    store: &PgStore,
    task_id: &str,
    token: i64,
    requeue: &Requeue,
    now: Timestamp,
) -> Result<Task> {
    let change = LeasedChange::Requeue(requeue.clone());
    Ok(store
        .change_leased(task_id, token, change, normalize(now))
        .await?
        .task)
}

pub(super) async fn rescue_expired(
    store: &PgStore,
    now: Timestamp,
    max_infra_attempts: u32,
) -> Result<Vec<RescuedTask>> {
    let now = normalize(now);
    // The rescuer's rounds keep the gauges' change log short even when nobody scrapes.
    super::gauges::fold_task_counts(&mut *store.pool.acquire().await?).await?;
    // SKIP LOCKED: a task whose runner is writing about it right now (a heartbeat) is not
    // expired for long; two rescuers each take the ones the other does not hold.
    let held = sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks AS t WHERE t.status IN ($1, $2) AND t.lease_expires_at < $3 \
         ORDER BY t.lease_expires_at, t.id FOR UPDATE SKIP LOCKED"
    ))
    .bind(TaskStatus::Preparing.as_str())
    .bind(TaskStatus::Running.as_str())
    .bind(micros(now));
    rescue(store, held, Rescue::LeaseExpired, max_infra_attempts, now).await
}

pub(super) async fn release_runner(
    store: &PgStore,
    runner_id: &str,
    project_id: Option<&str>,
    now: Timestamp,
    max_infra_attempts: u32,
) -> Result<Vec<RescuedTask>> {
    let now = normalize(now);
    // Rows locked, waiting for a write about them to end: the runner's own last writes of an
    // earlier life, if any are still in flight, go first. The statuses are written out, not
    // bound, so that the planner sees they are those of the partial `tasks_by_runner`.
    let held = sqlx::query(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks AS t WHERE t.runner_id = $1 AND t.status IN ('preparing', 'running') \
         AND ($2::text IS NULL OR t.project_id = $2) ORDER BY t.id FOR UPDATE"
    ))
    .bind(runner_id.to_owned())
    .bind(project_id.map(str::to_owned));
    rescue(
        store,
        held,
        Rescue::RunnerRestarted,
        max_infra_attempts,
        now,
    )
    .await
}

/// Takes back the leased tasks `held` selects (and locks), in one transaction.
async fn rescue(
    store: &PgStore,
    held: sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>,
    why: Rescue,
    max_infra_attempts: u32,
    now: Timestamp,
) -> Result<Vec<RescuedTask>> {
    let mut tx = store.pool.begin().await?;
    let result: Result<_> = async {
        let held = held.fetch_all(&mut *tx).await?;
        let mut rescued = Vec::with_capacity(held.len());
        let mut requeued = false;
        for row in &held {
            let mut record = rows::task_record(row)?;
            record.rescue(why, max_infra_attempts, now)?;
            tasks::write(&mut tx, &mut record).await?;
            requeued |= record.task.status == TaskStatus::Queued;
            rescued.push(RescuedTask::from(&record.task));
        }
        if requeued {
            tasks::notify_work(&mut tx).await?;
        }
        Ok(rescued)
    }
    .await;
    finish(tx, result).await
}

/// How a lease counts the free slots of the projects it serves under their `running_tasks`
/// quotas.
///
/// Counted under a per-project advisory lock held to the commit, leases of one project
/// serialize for as long as each writes its leases: most of a lease. So a lease first only
/// estimates (counts what committed, without the lock), writes, and then takes the locks of
/// the projects it served and counts again: every lease of a project commits under the lock
/// after a count that saw its own leases and every lease committed before, so none commits
/// past the quota, and the lock is held for one count. A lease that the second count finds
/// past a quota (another lease took the last slots meanwhile) is rolled back and done again
/// `Locked`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProjectCounts {
    Estimated,
    Locked,
}

/// The lease transaction's body; the caller holds the transaction and commits it.
///
/// Hands out due queued tasks priority by priority (highest first) and, within a priority,
/// in turns between the projects with due work (`record::FairShare`); candidates come locked
/// (`LEASE_CANDIDATES`). `max_concurrency` is decided under a per-code advisory lock
/// (`free_slots`), the `running_tasks` quota as `counts` says (`ProjectCounts`). Each task
/// gets a random token (`TaskRecord::grant_leases`); each project served gets a new turn
/// (`confirm_leases`). Returns the leased tasks and their records as written, or `None` when
/// the lease went past a project's quota and must be rolled back.
async fn lease_due_tasks(
    conn: &mut PgConnection,
    store: &PgStore,
    request: &LeaseRequest,
    counts: ProjectCounts,
    now: Timestamp,
) -> Result<Option<(Vec<LeasedTask>, Vec<TaskRecord>)>> {
    // The lease's statements are planned once per connection, not per call: planning them
    // from the bound values took longer than running them. Generic plans walk the same
    // indexes (the statuses counted are bound, not written out, so that the counts take
    // `tasks_by_project_status` rather than scan every active task of every project).
    sqlx::raw_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await?;
    let max_tasks = usize::try_from(request.max_tasks).unwrap_or(usize::MAX);
    let owner = request.owner.as_deref();
    let projects = projects_with_due_work(conn, &request.clusters, owner, now).await?;
    let mut share = FairShare::new(projects);
    let mut picked: Vec<TaskRecord> = Vec::with_capacity(max_tasks.min(1024));
    let mut slots = LeaseSlots::default();
    // Whether this call holds an advisory lock yet (`free_project_slots`).
    let mut holds_lock = false;
    while picked.len() < max_tasks {
        match share.next(max_tasks - picked.len()) {
            Next::Done => break,
            Next::Fetch(plan) => {
                let picked_ids: Vec<&str> = picked
                    .iter()
                    .map(|record| record.task.id.as_str())
                    .collect();
                let candidates = sqlx::query(LEASE_CANDIDATES)
                    .bind(micros(now))
                    .bind(&request.clusters)
                    .bind(slots.full_codes())
                    .bind(&picked_ids)
                    .bind(i64::try_from(plan.per_project).unwrap_or(i64::MAX))
                    .bind(owner)
                    .bind(i16::from(plan.priority))
                    .bind(&plan.projects)
                    .fetch_all(&mut *conn)
                    .await?;
                let candidates = candidates
                    .iter()
                    .map(|row| {
                        Ok((
                            rows::task_record(row)?,
                            row.try_get::<Option<i64>, _>("code_max_concurrency")?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                share.refill(&plan, candidates)?;
            }
            Next::Candidate(candidate) => {
                let (record, limit) = *candidate;
                while let Some(what) = slots.uncounted(&record, limit) {
                    let free = match what {
                        FreeSlots::OfProject => {
                            let project_id = &record.task.project_id;
                            project_slots(conn, store, project_id, counts, &mut holds_lock).await?
                        }
                        FreeSlots::OfCode { limit } => {
                            let free = free_slots(conn, &record.task.code_id, limit).await?;
                            holds_lock |= free.is_some();
                            free
                        }
                    };
                    let free = free.unwrap_or(0);
                    slots.counted(&record, what, free);
                }
                match slots.take(&record, limit) {
                    Slot::Taken => picked.push(record),
                    Slot::CodeFull => {}
                    Slot::ProjectFull => share.drop_project(&record.task.project_id),
                }
            }
        }
    }
    if picked.is_empty() {
        return Ok(Some((Vec::new(), Vec::new())));
    }
    let expires_at = now + Duration::seconds(i64::from(request.lease_secs));
    TaskRecord::grant_leases(&mut picked, &request.runner_id, expires_at, now)?;
    write_leases(conn, &picked, expires_at, now).await?;
    let within = confirm_leases(
        conn,
        &store.quota_defaults,
        &served_turns(&picked),
        counts == ProjectCounts::Estimated,
    )
    .await?;
    if !within {
        return Ok(None);
    }

    let mut leased = Vec::with_capacity(picked.len());
    let mut records = Vec::with_capacity(picked.len());
    for mut record in picked {
        record.version += 1;
        records.push(record.clone());
        // Leased means the code was running, whatever a concurrent pause says.
        let code = store
            .revisions
            .leased(conn, &record.task.code_id, record.task.code_rev)
            .await?;
        let token = record.lease_token.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "task {} was leased without a token",
                record.task.id
            ))
        })?;
        leased.push(LeasedTask {
            task: record.task,
            code,
            lease: Lease { token, expires_at },
            registry_credential: None,
        });
    }
    Ok(Some((leased, records)))
}

/// The projects with runnable due tasks at each priority, for `FairShare`.
async fn projects_with_due_work(
    conn: &mut PgConnection,
    clusters: &[String],
    owner: Option<&str>,
    now: Timestamp,
) -> Result<Vec<ProjectTurn>> {
    let rows = sqlx::query(PROJECTS_WITH_DUE_WORK)
        .bind(micros(now))
        .bind(clusters)
        .bind(owner)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| {
            let priority: i16 = row.try_get("priority")?;
            Ok(ProjectTurn {
                priority: u8::try_from(priority)
                    .map_err(|_| StoreError::Corrupt(format!("priority {priority}")))?,
                project_id: row.try_get("project_id")?,
                turn: row.try_get("turn")?,
                first_due: row.try_get("first_due")?,
            })
        })
        .collect()
}

/// Writes a batch of fresh leases in one statement: the fields `TaskRecord::grant_lease`
/// changes. Every record was queued and locked by this transaction, so every row must match.
///
/// The rows are also named by `id = ANY(…)`: joined with `unnest` alone, the planner reckons
/// a hash join over a scan of the whole table cheaper than an index probe per task, and on a
/// table whose updates have left many dead rows (a busy queue between two vacuums) that scan
/// took tens of milliseconds per lease.
async fn write_leases(
    conn: &mut PgConnection,
    leased: &[TaskRecord],
    expires_at: Timestamp,
    now: Timestamp,
) -> Result<()> {
    let Some(first) = leased.first() else {
        return Ok(());
    };
    let (status, runner_id) = (first.task.status, first.task.runner_id.as_deref());
    if !leased
        .iter()
        .all(|record| record.task.status == status && record.task.runner_id.as_deref() == runner_id)
    {
        return Err(StoreError::Corrupt(
            "a lease batch must share its status and runner".to_owned(),
        ));
    }
    let ids: Vec<&str> = leased
        .iter()
        .map(|record| record.task.id.as_str())
        .collect();
    let tokens: Vec<Option<i64>> = leased.iter().map(|record| record.lease_token).collect();
    let written = sqlx::query(
        "UPDATE tasks SET status = $1, updated_at = $2, runner_id = $3, lease_expires_at = $4, \
         lease_token = picked.token, version = tasks.version + 1 \
         FROM unnest($5::text[], $6::bigint[]) AS picked (id, token) \
         WHERE tasks.id = ANY($5) AND tasks.id = picked.id AND tasks.status = $7 \
         AND tasks.lease_token IS NULL",
    )
    .bind(status.as_str())
    .bind(micros(now))
    .bind(runner_id)
    .bind(micros(expires_at))
    .bind(&ids)
    .bind(&tokens)
    .bind(TaskStatus::Queued.as_str())
    .execute(&mut *conn)
    .await?;
    if written.rows_affected() != leased.len() as u64 {
        return Err(StoreError::Conflict(
            "tasks changed while they were being leased; try again".to_owned(),
        ));
    }
    Ok(())
}

/// After the leases are written: takes the advisory locks of the projects served (`served`,
/// in turn order), gives each a turn later than every turn before, and with `check` counts
/// each project's active tasks again, this lease's included. `false` when a project is past
/// its `running_tasks` quota (its own limit, else `defaults`): the lease must be rolled back.
///
/// The locks are waited for in the order of their keys, so two leases never wait for each
/// other in a circle; a lease counting under the locks (`ProjectCounts::Locked`) holds them
/// already. The count is a statement after the one that took the locks, so that it sees every
/// lease committed under them before. A project's turn row is written only under its lock, so
/// no lease waits for another on it (a project's first row may wait for another server
/// inserting the same row at that moment, once in the project's life).
async fn confirm_leases(
    conn: &mut PgConnection,
    defaults: &QuotaLimits,
    served: &[&str],
    check: bool,
) -> Result<bool> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock($1, k.key) FROM (SELECT DISTINCT hashtext(p) AS key \
         FROM unnest($2::text[]) AS p ORDER BY key) AS k",
    )
    .bind(PROJECT_LOCK_CLASS)
    .bind(served)
    .execute(&mut *conn)
    .await?;
    let query = sqlx::query_as(concat!(
        "WITH turns AS (INSERT INTO project_lease_turns (project_id, turn) \
         SELECT s.project_id, m.turn + s.position \
         FROM unnest($1::text[]) WITH ORDINALITY AS s (project_id, position), \
         (SELECT COALESCE(max(turn), 0) AS turn FROM project_lease_turns) AS m \
         ON CONFLICT (project_id) DO UPDATE SET turn = excluded.turn) \
         SELECT CASE WHEN $5 THEN ",
        running_slots!(used: "s.project_id"),
        " END, ",
        running_slots!(limit: "s.project_id"),
        " FROM unnest($1::text[]) AS s (project_id)"
    ))
    .bind(served);
    let counted: Vec<(Option<i64>, Option<i64>)> = bind_running_slots(query)
        .bind(check)
        .fetch_all(&mut *conn)
        .await?;
    Ok(counted
        .into_iter()
        .all(|(active, own)| active.is_none_or(|active| active <= running_limit(defaults, own))))
}

/// How many of a code's `limit` slots are free for this lease call.
///
/// Two servers leasing at once would each count a code's active tasks, each see room, and
/// together pass the limit: row locks on the tasks cannot prevent that, because the tasks that
/// matter are the ones the other transaction is about to change. So a code with a limit is
/// counted only under a transaction-scoped advisory lock on that code: whoever holds it counts
/// after every earlier holder committed (each statement in READ COMMITTED sees what committed
/// before it began) and keeps it until its own leases commit. The lock is only *tried*: a code
/// that another server is leasing right now counts as full for this call, instead of waiting
/// (which could deadlock two servers taking two codes' locks in opposite orders). The other
/// server hands the code's tasks out meanwhile, and this one sees them at its next lease.
/// A hash collision between two codes only makes one of them wait a turn.
/// `None` when the lock was not had.
async fn free_slots(conn: &mut PgConnection, code_id: &str, limit: i64) -> Result<Option<i64>> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext($2))")
        .bind(CODE_LOCK_CLASS)
        .bind(code_id)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(None);
    }
    let active: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE code_id = $1 AND status IN ($2, $3)")
            .bind(code_id)
            .bind(TaskStatus::Preparing.as_str())
            .bind(TaskStatus::Running.as_str())
            .fetch_one(&mut *conn)
            .await?;
    Ok(Some(limit - active))
}

/// Takes the project's advisory lock, held to the end of the transaction: with `wait` (the
/// call holds no advisory lock yet) waited for, else only tried. `false` when the lock was
/// not had.
///
/// Waiting, runners of one project leasing at the same moment take turns, instead of all but
/// one hearing there is nothing to run while the project's backlog waits. That wait cannot
/// close a circle: the holder waits for no advisory lock (it only tries any after its first,
/// and `confirm_leases` waits only for locks of projects it counted under them, which it holds),
/// and for no row this call holds (lease candidates are taken `SKIP LOCKED`). A later lock of
/// the same call is only tried, and a project another call is leasing right now counts as full
/// for it.
async fn lock_project(conn: &mut PgConnection, project_id: &str, wait: bool) -> Result<bool> {
    if wait {
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(PROJECT_LOCK_CLASS)
            .bind(project_id)
            .execute(&mut *conn)
            .await?;
        return Ok(true);
    }
    Ok(
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext($2))")
            .bind(PROJECT_LOCK_CLASS)
            .bind(project_id)
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// The free slots of a project for this lease, counted as `counts` says; with
/// `ProjectCounts::Locked`, `None` when the project's lock was not had (`lock_project`, which
/// waits unless the call `holds_lock` already).
async fn project_slots(
    conn: &mut PgConnection,
    store: &PgStore,
    project_id: &str,
    counts: ProjectCounts,
    holds_lock: &mut bool,
) -> Result<Option<i64>> {
    if counts == ProjectCounts::Locked {
        let locked = lock_project(conn, project_id, !*holds_lock).await?;
        *holds_lock |= locked;
        if !locked {
            return Ok(None);
        }
    }
    Ok(Some(
        count_project_slots(conn, &store.quota_defaults, project_id).await?,
    ))
}

/// How many more tasks of the project may start under its `running_tasks` quota (its own
/// limit, else `defaults`), as committed when the statement began: exact under the project's
/// lock, an estimate without it (`ProjectCounts`).
async fn count_project_slots(
    conn: &mut PgConnection,
    defaults: &QuotaLimits,
    project_id: &str,
) -> Result<i64> {
    let query = sqlx::query_as(concat!(
        "SELECT ",
        running_slots!(used: "$1"),
        ", ",
        running_slots!(limit: "$1")
    ))
    .bind(project_id);
    let (active, own): (i64, Option<i64>) = bind_running_slots(query).fetch_one(&mut *conn).await?;
    Ok(running_limit(defaults, own) - active)
}

/// Binds what `running_slots!` reads, as `$2` to `$4`: the statuses of the tasks that hold a
/// slot, and the quota's name. The caller binds `$1` before, and anything after `$4` after.
fn bind_running_slots<O>(
    query: QueryAs<'_, Postgres, O, PgArguments>,
) -> QueryAs<'_, Postgres, O, PgArguments> {
    query
        .bind(TaskStatus::Preparing.as_str())
        .bind(TaskStatus::Running.as_str())
        .bind(Quota::RunningTasks.as_str())
}

/// A project's `running_tasks` limit: its own (`own`, as `running_slots!` reads it), else
/// `defaults`.
fn running_limit(defaults: &QuotaLimits, own: Option<i64>) -> i64 {
    own.unwrap_or_else(|| signed(defaults.running_tasks))
}
