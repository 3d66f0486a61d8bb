//! PostgreSQL rows to domain values: the column lists every query selects and their decoding.
//! The representations (microseconds, signed integers, status text, JSON specs) are the SQLite
//! store's, in `crate::convert`; only payloads differ (BYTEA, see the migration).

use sqlx::Row;
use sqlx::postgres::PgRow;
use stevedore_model::{CodeRevision, Schedule, ScheduleStatus, Task};

use crate::convert::{from_json, opt_timestamp, opt_unsigned, role, status, timestamp, unsigned};
use crate::record::{TaskRecord, truncation_marker_start};
use crate::{LogSlice, Project, Result, StoreError, TokenRecord};

/// Every column of `tasks`, for a query that names the table `t`.
macro_rules! task_columns {
    () => {
        "t.id, t.project_id, t.code_id, t.code_name, t.code_rev, t.status, t.priority, \
         t.payload, t.label, t.cluster, t.timeout_secs, t.delay_secs, t.created_at, \
         t.updated_at, t.due_at, t.start_time, t.end_time, t.percent, t.msg, t.retry_count, \
         t.original_task_id, t.schedule_id, t.exit_code, t.log_size, t.log_truncated, \
         t.infra_attempts, t.cancel_requested, t.peak_memory_bytes, t.cpu_time_ms, t.runner_id, \
         t.lease_token, t.lease_expires_at, t.version"
    };
}

/// The columns of a code revision, for a query that joins `codes c` and `code_revisions r`.
macro_rules! revision_columns {
    () => {
        "c.id AS code_id, c.project_id, c.paused, c.created_at AS code_created_at, r.rev, r.spec, \
         r.package_sha256, r.package_size, r.created_at AS rev_created_at"
    };
}

/// Every column of `schedules`, for a query that names the table `s`.
macro_rules! schedule_columns {
    () => {
        "s.id, s.project_id, s.code_id, s.spec, s.status, s.next_start, s.last_run_time, \
         s.run_count, s.created_at, s.updated_at"
    };
}

pub(super) use {revision_columns, schedule_columns, task_columns};

/// A payload's stored bytes back to its text.
fn payload(bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes)
        .map_err(|error| StoreError::Corrupt(format!("tasks.payload is not UTF-8: {error}")))
}

pub(super) fn task_record(row: &PgRow) -> Result<TaskRecord> {
    let task = Task {
        id: row.try_get("id")?,
        project_id: row.try_get("project_id")?,
        code_id: row.try_get("code_id")?,
        code_name: row.try_get("code_name")?,
        code_rev: unsigned("code_rev", row.try_get("code_rev")?)?,
        status: status(row.try_get("status")?)?,
        priority: unsigned("priority", i64::from(row.try_get::<i16, _>("priority")?))?,
        payload: payload(row.try_get("payload")?)?,
        label: row.try_get("label")?,
        cluster: row.try_get("cluster")?,
        timeout_secs: unsigned("timeout_secs", row.try_get("timeout_secs")?)?,
        delay_secs: unsigned("delay_secs", row.try_get("delay_secs")?)?,
        created_at: timestamp(row.try_get("created_at")?)?,
        updated_at: timestamp(row.try_get("updated_at")?)?,
        due_at: timestamp(row.try_get("due_at")?)?,
        start_time: opt_timestamp(row.try_get("start_time")?)?,
        end_time: opt_timestamp(row.try_get("end_time")?)?,
        percent: opt_unsigned(
            "percent",
            row.try_get::<Option<i16>, _>("percent")?.map(i64::from),
        )?,
        msg: row.try_get("msg")?,
        retry_count: unsigned("retry_count", row.try_get("retry_count")?)?,
        original_task_id: row.try_get("original_task_id")?,
        schedule_id: row.try_get("schedule_id")?,
        exit_code: row.try_get("exit_code")?,
        log_size: unsigned("log_size", row.try_get("log_size")?)?,
        infra_attempts: unsigned("infra_attempts", row.try_get("infra_attempts")?)?,
        cancel_requested: row.try_get("cancel_requested")?,
        peak_memory_bytes: opt_unsigned("peak_memory_bytes", row.try_get("peak_memory_bytes")?)?,
        cpu_time_ms: opt_unsigned("cpu_time_ms", row.try_get("cpu_time_ms")?)?,
        runner_id: row.try_get("runner_id")?,
    };
    Ok(TaskRecord {
        task,
        lease_token: row.try_get("lease_token")?,
        lease_expires_at: opt_timestamp(row.try_get("lease_expires_at")?)?,
        log_truncated: row.try_get("log_truncated")?,
        version: row.try_get("version")?,
    })
}

/// What a log follower needs of a task, as a slice without bytes.
pub(super) fn log_state(row: &PgRow) -> Result<LogSlice> {
    let size = unsigned("log_size", row.try_get("log_size")?)?;
    let truncated: bool = row.try_get("log_truncated")?;
    Ok(LogSlice {
        bytes: Vec::new(),
        size,
        truncated_at: truncated.then(|| truncation_marker_start(size)),
        status: status(row.try_get("status")?)?,
        percent: opt_unsigned(
            "percent",
            row.try_get::<Option<i16>, _>("percent")?.map(i64::from),
        )?,
        msg: row.try_get("msg")?,
    })
}

pub(super) fn revision(row: &PgRow) -> Result<CodeRevision> {
    let spec: String = row.try_get("spec")?;
    Ok(CodeRevision {
        id: row.try_get("code_id")?,
        project_id: row.try_get("project_id")?,
        rev: unsigned("rev", row.try_get("rev")?)?,
        spec: from_json("code_revisions.spec", &spec)?,
        package_sha256: row.try_get("package_sha256")?,
        package_size: opt_unsigned("package_size", row.try_get("package_size")?)?,
        created_at: timestamp(row.try_get("code_created_at")?)?,
        updated_at: timestamp(row.try_get("rev_created_at")?)?,
        paused: row.try_get("paused")?,
    })
}

pub(super) fn schedule(row: &PgRow) -> Result<Schedule> {
    let spec: String = row.try_get("spec")?;
    let status: String = row.try_get("status")?;
    Ok(Schedule {
        id: row.try_get("id")?,
        project_id: row.try_get("project_id")?,
        code_id: row.try_get("code_id")?,
        spec: from_json("schedules.spec", &spec)?,
        status: status
            .parse::<ScheduleStatus>()
            .map_err(|error| StoreError::Corrupt(format!("schedules.status: {error}")))?,
        next_start: opt_timestamp(row.try_get("next_start")?)?,
        last_run_time: opt_timestamp(row.try_get("last_run_time")?)?,
        run_count: unsigned("run_count", row.try_get("run_count")?)?,
        created_at: timestamp(row.try_get("created_at")?)?,
        updated_at: timestamp(row.try_get("updated_at")?)?,
    })
}

pub(super) fn project(row: &PgRow) -> Result<Project> {
    Ok(Project {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        created_at: timestamp(row.try_get("created_at")?)?,
    })
}

pub(super) fn token(row: &PgRow) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: row.try_get("id")?,
        project_id: row.try_get("project_id")?,
        role: role(row.try_get("role")?)?,
        created_at: timestamp(row.try_get("created_at")?)?,
    })
}
