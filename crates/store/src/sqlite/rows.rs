//! SQLite rows to domain values: how a task is selected and read back (one JSON object), and
//! the shared decoding (`crate::rows`) of everything else.

use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::Result;
use crate::convert::from_json;
use crate::record::TaskRecord;
use crate::rows::TaskRow;

/// A whole `tasks` row as one JSON object in a column named `task`, for a query that names the
/// table `t`. One value per row instead of thirty-three: sqlx copies every value of a row on
/// SQLite's worker thread and hands it over, and that per-value cost made reading a batch of
/// tasks three times slower than building and parsing the JSON. `task_record` reads it back.
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
         'lease_expires_at', t.lease_expires_at, 'version', t.version, \
         'log_removed_at', t.log_removed_at, 'payload_removed_at', t.payload_removed_at) AS task"
    };
}

pub(super) use crate::convert::{
    micros, opt_micros, opt_signed, role_text, signed, timestamp, to_json, unsigned,
};
pub(super) use crate::rows::{
    log_state, project, revision, revision_columns, schedule, schedule_columns, token,
};
pub(super) use task_columns;

/// A row of a query that selects `task_columns!`.
pub(super) fn task_record(row: &SqliteRow) -> Result<TaskRecord> {
    let json: &str = row.try_get("task")?;
    from_json::<TaskRow>("tasks row", json)?.into_record()
}
