//! PostgreSQL rows to domain values: how a task is selected and read back, and the shared
//! decoding (`crate::rows`) of everything else. The representations (microseconds, signed
//! integers, status text, JSON specs) are the SQLite store's, in `crate::convert`; only payloads
//! (BYTEA, see the migration) and small numbers (SMALLINT) differ.

use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::record::TaskRecord;
use crate::rows::{SqlRow, TaskRow};
use crate::{Result, StoreError};

/// Every column of `tasks`, for a query that names the table `t`.
macro_rules! task_columns {
    () => {
        "t.id, t.project_id, t.code_id, t.code_name, t.code_rev, t.status, t.priority, \
         t.payload, t.label, t.cluster, t.timeout_secs, t.delay_secs, t.created_at, \
         t.updated_at, t.due_at, t.start_time, t.end_time, t.percent, t.msg, t.retry_count, \
         t.original_task_id, t.schedule_id, t.exit_code, t.log_size, t.log_truncated, \
         t.infra_attempts, t.cancel_requested, t.peak_memory_bytes, t.cpu_time_ms, t.runner_id, \
         t.lease_token, t.lease_expires_at, t.version, t.log_removed_at, t.payload_removed_at"
    };
}

pub(super) use crate::rows::{
    log_state, project, revision, revision_columns, schedule, schedule_columns, token,
};
pub(super) use task_columns;

/// A payload's stored bytes back to its text.
fn payload(bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes)
        .map_err(|error| StoreError::Corrupt(format!("tasks.payload is not UTF-8: {error}")))
}

pub(super) fn task_record(row: &PgRow) -> Result<TaskRecord> {
    let small = |column: &str| -> Result<Option<i64>> {
        Ok(row.try_get::<Option<i16>, _>(column)?.map(i64::from))
    };
    TaskRow {
        id: row.text("id")?,
        project_id: row.text("project_id")?,
        code_id: row.text("code_id")?,
        code_name: row.text("code_name")?,
        code_rev: row.int("code_rev")?,
        status: row.text("status")?,
        priority: i64::from(row.try_get::<i16, _>("priority")?),
        payload: payload(row.blob("payload")?.to_vec())?,
        label: row.opt_text("label")?,
        cluster: row.text("cluster")?,
        timeout_secs: row.int("timeout_secs")?,
        delay_secs: row.int("delay_secs")?,
        created_at: row.int("created_at")?,
        updated_at: row.int("updated_at")?,
        due_at: row.int("due_at")?,
        start_time: row.opt_int("start_time")?,
        end_time: row.opt_int("end_time")?,
        percent: small("percent")?,
        msg: row.opt_text("msg")?,
        retry_count: row.int("retry_count")?,
        original_task_id: row.opt_text("original_task_id")?,
        schedule_id: row.opt_text("schedule_id")?,
        exit_code: row.opt_int("exit_code")?,
        log_size: row.int("log_size")?,
        log_truncated: row.flag("log_truncated")?,
        infra_attempts: row.int("infra_attempts")?,
        cancel_requested: row.flag("cancel_requested")?,
        peak_memory_bytes: row.opt_int("peak_memory_bytes")?,
        cpu_time_ms: row.opt_int("cpu_time_ms")?,
        runner_id: row.opt_text("runner_id")?,
        lease_token: row.opt_int("lease_token")?,
        lease_expires_at: row.opt_int("lease_expires_at")?,
        version: row.int("version")?,
        log_removed_at: row.opt_int("log_removed_at")?,
        payload_removed_at: row.opt_int("payload_removed_at")?,
    }
    .into_record()
}
