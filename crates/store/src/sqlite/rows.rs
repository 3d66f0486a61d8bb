//! Rows to domain values and back: the column lists every query selects, and the conversions
//! of time, integers and statuses at the boundary of the database.

use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use stevedore_model::{CodeRevision, Schedule, ScheduleStatus, Task};

use crate::record::{TaskRecord, truncation_marker_start};
use crate::{LogSlice, Project, Result, StoreError, TokenRecord};

/// A whole `tasks` row as one JSON object in a column named `task`, for a query that names the
/// table `t`. One value per row instead of thirty-three: sqlx copies every value of a row on
/// SQLite's worker thread and hands it over, and that per-value cost made reading a batch of
/// tasks three times slower than building and parsing the JSON. `TaskRow` reads it back.
macro_rules! task_columns {
    () => {
        "json_object('id', t.id, 'project_id', t.project_id, 'code_id', t.code_id, \
         'code_name', t.code_name, 'code_rev', t.code_rev, 'status', t.status, \
         'priority', t.priority, 'payload', t.payload, 'label', t.label, 'cluster', t.cluster, \
         'timeout_secs', t.timeout_secs, 'delay_secs', t.delay_secs, 'created_at', t.created_at, \
         'updated_at', t.updated_at, 'due_at', t.due_at, 'start_time', t.start_time, \
         'end_time', t.end_time, 'percent', t.percent, 'msg', t.msg, 'retry_count', t.retry_count, \
         'original_task_id', t.original_task_id, 'schedule_id', t.schedule_id, \
         'exit_code', t.exit_code, 'log_size', t.log_size, 'log_truncated', t.log_truncated, \
         'infra_attempts', t.infra_attempts, 'cancel_requested', t.cancel_requested, \
         'peak_memory_bytes', t.peak_memory_bytes, 'cpu_time_ms', t.cpu_time_ms, \
         'runner_id', t.runner_id, 'lease_token', t.lease_token, \
         'lease_expires_at', t.lease_expires_at, 'version', t.version) AS task"
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

// === conversions ===

use crate::convert::{from_json, opt_timestamp, opt_unsigned, role, status};
pub(super) use crate::convert::{
    micros, opt_micros, opt_signed, role_text, signed, timestamp, to_json, unsigned,
};

// === decoding ===

/// A `tasks` row as `task_columns!` writes it.
#[derive(serde::Deserialize)]
struct TaskRow {
    id: String,
    project_id: String,
    code_id: String,
    code_name: String,
    code_rev: i64,
    status: String,
    priority: i64,
    payload: String,
    label: Option<String>,
    cluster: String,
    timeout_secs: i64,
    delay_secs: i64,
    created_at: i64,
    updated_at: i64,
    due_at: i64,
    start_time: Option<i64>,
    end_time: Option<i64>,
    percent: Option<i64>,
    msg: Option<String>,
    retry_count: i64,
    original_task_id: Option<String>,
    schedule_id: Option<String>,
    exit_code: Option<i64>,
    log_size: i64,
    log_truncated: i64,
    infra_attempts: i64,
    cancel_requested: i64,
    peak_memory_bytes: Option<i64>,
    cpu_time_ms: Option<i64>,
    runner_id: Option<String>,
    lease_token: Option<i64>,
    lease_expires_at: Option<i64>,
    version: i64,
}

pub(super) fn task_record(row: &SqliteRow) -> Result<TaskRecord> {
    let json: &str = row.try_get("task")?;
    let row: TaskRow = from_json("tasks row", json)?;
    let task = Task {
        code_rev: unsigned("code_rev", row.code_rev)?,
        status: status(&row.status)?,
        priority: unsigned("priority", row.priority)?,
        timeout_secs: unsigned("timeout_secs", row.timeout_secs)?,
        delay_secs: unsigned("delay_secs", row.delay_secs)?,
        created_at: timestamp(row.created_at)?,
        updated_at: timestamp(row.updated_at)?,
        due_at: timestamp(row.due_at)?,
        start_time: opt_timestamp(row.start_time)?,
        end_time: opt_timestamp(row.end_time)?,
        percent: opt_unsigned("percent", row.percent)?,
        retry_count: unsigned("retry_count", row.retry_count)?,
        exit_code: row.exit_code,
        log_size: unsigned("log_size", row.log_size)?,
        infra_attempts: unsigned("infra_attempts", row.infra_attempts)?,
        cancel_requested: row.cancel_requested != 0,
        peak_memory_bytes: opt_unsigned("peak_memory_bytes", row.peak_memory_bytes)?,
        cpu_time_ms: opt_unsigned("cpu_time_ms", row.cpu_time_ms)?,
        id: row.id,
        project_id: row.project_id,
        code_id: row.code_id,
        code_name: row.code_name,
        payload: row.payload,
        label: row.label,
        cluster: row.cluster,
        msg: row.msg,
        original_task_id: row.original_task_id,
        schedule_id: row.schedule_id,
        runner_id: row.runner_id,
    };
    Ok(TaskRecord {
        task,
        lease_token: row.lease_token,
        lease_expires_at: opt_timestamp(row.lease_expires_at)?,
        log_truncated: row.log_truncated != 0,
        version: row.version,
    })
}

/// What a log follower needs of a task, from a row of `logs::log_state`, as a slice without
/// bytes.
pub(super) fn log_state(row: &SqliteRow) -> Result<LogSlice> {
    let size = unsigned("log_size", row.try_get("log_size")?)?;
    let truncated = row.try_get::<i64, _>("log_truncated")? != 0;
    Ok(LogSlice {
        bytes: Vec::new(),
        size,
        truncated_at: truncated.then(|| truncation_marker_start(size)),
        status: status(row.try_get("status")?)?,
        percent: opt_unsigned("percent", row.try_get("percent")?)?,
        msg: row.try_get("msg")?,
    })
}

pub(super) fn revision(row: &SqliteRow) -> Result<CodeRevision> {
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

pub(super) fn schedule(row: &SqliteRow) -> Result<Schedule> {
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

pub(super) fn project(row: &SqliteRow) -> Result<Project> {
    Ok(Project {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        created_at: timestamp(row.try_get("created_at")?)?,
    })
}

pub(super) fn token(row: &SqliteRow) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: row.try_get("id")?,
        project_id: row.try_get("project_id")?,
        role: role(row.try_get("role")?)?,
        created_at: timestamp(row.try_get("created_at")?)?,
    })
}
