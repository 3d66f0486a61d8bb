//! Rows to domain values, written once for both databases: the columns both schemas share,
//! the queries' column lists, and their decoding. Each backend's `rows` module keeps only what
//! its schema does its own way: SQLite reads a task as one JSON object, PostgreSQL keeps
//! payloads as BYTEA and small numbers as SMALLINT; both end in [`TaskRow`].

use sqlx::{ColumnIndex, Decode, Row, Type};
use stevedore_model::{CodeRevision, Schedule, ScheduleStatus, Task};

use crate::convert::{from_json, opt_timestamp, opt_unsigned, role, status, timestamp, unsigned};
use crate::record::{TaskRecord, truncation_marker_start};
use crate::{
    Cluster, ClusterSpec, LogSlice, Project, Result, SealedSecret, StoreError, StoredCredential,
    TokenRecord,
};

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

/// `SELECT` and the columns of `clusters`.
macro_rules! select_clusters {
    ($rest:literal) => {
        concat!(
            "SELECT id, project_id, name, memory_mib, disk_mib, runners, created_at, updated_at \
             FROM clusters ",
            $rest
        )
    };
}

/// `SELECT` and the columns of `registry_credentials`.
macro_rules! select_credentials {
    ($rest:literal) => {
        concat!(
            "SELECT project_id, registry, username, sealed, key_id, created_at, updated_at \
             FROM registry_credentials ",
            $rest
        )
    };
}

pub(crate) use {revision_columns, schedule_columns, select_clusters, select_credentials};

/// A row of either database, read by column name into the types both schemas store.
pub(crate) trait SqlRow {
    fn text(&self, column: &str) -> Result<String>;
    fn opt_text(&self, column: &str) -> Result<Option<String>>;
    fn int(&self, column: &str) -> Result<i64>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>>;
    fn flag(&self, column: &str) -> Result<bool>;
    fn blob(&self, column: &str) -> Result<&[u8]>;
}

/// A `tasks` row in the types both databases share, as each backend decodes it.
#[derive(serde::Deserialize)]
pub(crate) struct TaskRow {
    pub id: String,
    pub project_id: String,
    pub code_id: String,
    pub code_name: String,
    pub code_rev: i64,
    pub status: String,
    pub priority: i64,
    pub payload: String,
    pub label: Option<String>,
    pub cluster: String,
    pub timeout_secs: i64,
    pub delay_secs: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub due_at: i64,
    pub start_time: Option<i64>,
    pub end_time: Option<i64>,
    pub percent: Option<i64>,
    pub msg: Option<String>,
    pub retry_count: i64,
    pub original_task_id: Option<String>,
    pub schedule_id: Option<String>,
    pub exit_code: Option<i64>,
    pub log_size: i64,
    #[serde(deserialize_with = "flag")]
    pub log_truncated: bool,
    pub infra_attempts: i64,
    #[serde(deserialize_with = "flag")]
    pub cancel_requested: bool,
    pub peak_memory_bytes: Option<i64>,
    pub cpu_time_ms: Option<i64>,
    pub runner_id: Option<String>,
    pub lease_token: Option<i64>,
    pub lease_expires_at: Option<i64>,
    pub version: i64,
    pub log_removed_at: Option<i64>,
    pub payload_removed_at: Option<i64>,
}

// === impl SqlRow ===

impl<R> SqlRow for R
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> &'r [u8]: Decode<'r, R::Database> + Type<R::Database>,
{
    fn text(&self, column: &str) -> Result<String> {
        Ok(self.try_get(column)?)
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>> {
        Ok(self.try_get(column)?)
    }

    fn int(&self, column: &str) -> Result<i64> {
        Ok(self.try_get(column)?)
    }

    fn opt_int(&self, column: &str) -> Result<Option<i64>> {
        Ok(self.try_get(column)?)
    }

    fn flag(&self, column: &str) -> Result<bool> {
        Ok(self.try_get(column)?)
    }

    fn blob(&self, column: &str) -> Result<&[u8]> {
        Ok(self.try_get(column)?)
    }
}

// === impl TaskRow ===

impl TaskRow {
    pub fn into_record(self) -> Result<TaskRecord> {
        let task = Task {
            code_rev: unsigned("code_rev", self.code_rev)?,
            status: status(&self.status)?,
            priority: unsigned("priority", self.priority)?,
            timeout_secs: unsigned("timeout_secs", self.timeout_secs)?,
            delay_secs: unsigned("delay_secs", self.delay_secs)?,
            created_at: timestamp(self.created_at)?,
            updated_at: timestamp(self.updated_at)?,
            due_at: timestamp(self.due_at)?,
            start_time: opt_timestamp(self.start_time)?,
            end_time: opt_timestamp(self.end_time)?,
            percent: opt_unsigned("percent", self.percent)?,
            retry_count: unsigned("retry_count", self.retry_count)?,
            exit_code: self.exit_code,
            log_size: unsigned("log_size", self.log_size)?,
            infra_attempts: unsigned("infra_attempts", self.infra_attempts)?,
            cancel_requested: self.cancel_requested,
            peak_memory_bytes: opt_unsigned("peak_memory_bytes", self.peak_memory_bytes)?,
            cpu_time_ms: opt_unsigned("cpu_time_ms", self.cpu_time_ms)?,
            log_removed_at: opt_timestamp(self.log_removed_at)?,
            payload_removed_at: opt_timestamp(self.payload_removed_at)?,
            id: self.id,
            project_id: self.project_id,
            code_id: self.code_id,
            code_name: self.code_name,
            payload: self.payload,
            label: self.label,
            cluster: self.cluster,
            msg: self.msg,
            original_task_id: self.original_task_id,
            schedule_id: self.schedule_id,
            runner_id: self.runner_id,
        };
        Ok(TaskRecord {
            task,
            lease_token: self.lease_token,
            lease_expires_at: opt_timestamp(self.lease_expires_at)?,
            log_truncated: self.log_truncated,
            version: self.version,
        })
    }
}

/// A flag stored as an integer, 0 or not.
fn flag<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(<i64 as serde::Deserialize>::deserialize(deserializer)? != 0)
}

// === decoding ===

/// What a log follower needs of a task (`id`, `status`, `percent`, `msg`, `log_size`,
/// `log_truncated`, `log_removed_at`), as a slice without bytes. A log that retention removed
/// is `StoreError::Removed`; one that was empty stays an empty log.
pub(crate) fn log_state(row: &impl SqlRow) -> Result<LogSlice> {
    let size = unsigned("log_size", row.int("log_size")?)?;
    if let Some(removed_at) = row.opt_int("log_removed_at")?
        && size > 0
    {
        return Err(StoreError::Removed {
            what: format!("the log of task {}", row.text("id")?),
            at: timestamp(removed_at)?,
        });
    }
    let truncated = row.flag("log_truncated")?;
    Ok(LogSlice {
        bytes: Vec::new(),
        size,
        truncated_at: truncated.then(|| truncation_marker_start(size)),
        status: status(&row.text("status")?)?,
        percent: opt_unsigned("percent", row.opt_int("percent")?)?,
        msg: row.opt_text("msg")?,
    })
}

/// Bytes `start..end` of a task's log from its `task_logs` rows (`seq`, `bytes`) in order,
/// starting with the chunk that holds `start`. Every byte must be there.
pub(crate) fn log_bytes(
    chunks: &[impl SqlRow],
    task_id: &str,
    start: u64,
    end: u64,
) -> Result<Vec<u8>> {
    let wanted = usize::try_from(end.saturating_sub(start)).unwrap_or(usize::MAX);
    let mut bytes = Vec::with_capacity(wanted);
    let mut next: Option<u64> = None;
    for chunk in chunks {
        let seq: u64 = unsigned("task_logs.seq", chunk.int("seq")?)?;
        let data = chunk.blob("bytes")?;
        if next.is_some_and(|next| next != seq) {
            break;
        }
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let (from, to) = (start.max(seq), end.min(seq.saturating_add(len)));
        if from < to {
            let range = usize::try_from(from - seq).unwrap_or(usize::MAX)
                ..usize::try_from(to - seq).unwrap_or(usize::MAX);
            bytes.extend_from_slice(&data[range]);
        }
        next = Some(seq.saturating_add(len));
    }
    if bytes.len() != wanted {
        return Err(StoreError::Corrupt(format!(
            "the log of task {task_id} lacks bytes between {start} and {end}"
        )));
    }
    Ok(bytes)
}

/// A row of `revision_columns!`.
pub(crate) fn revision(row: &impl SqlRow) -> Result<CodeRevision> {
    Ok(CodeRevision {
        id: row.text("code_id")?,
        project_id: row.text("project_id")?,
        rev: unsigned("rev", row.int("rev")?)?,
        spec: from_json("code_revisions.spec", &row.text("spec")?)?,
        package_sha256: row.opt_text("package_sha256")?,
        package_size: opt_unsigned("package_size", row.opt_int("package_size")?)?,
        created_at: timestamp(row.int("code_created_at")?)?,
        updated_at: timestamp(row.int("rev_created_at")?)?,
        paused: row.flag("paused")?,
    })
}

/// A row of `schedule_columns!`.
pub(crate) fn schedule(row: &impl SqlRow) -> Result<Schedule> {
    Ok(Schedule {
        id: row.text("id")?,
        project_id: row.text("project_id")?,
        code_id: row.text("code_id")?,
        spec: from_json("schedules.spec", &row.text("spec")?)?,
        status: row
            .text("status")?
            .parse::<ScheduleStatus>()
            .map_err(|error| StoreError::Corrupt(format!("schedules.status: {error}")))?,
        next_start: opt_timestamp(row.opt_int("next_start")?)?,
        last_run_time: opt_timestamp(row.opt_int("last_run_time")?)?,
        run_count: unsigned("run_count", row.int("run_count")?)?,
        created_at: timestamp(row.int("created_at")?)?,
        updated_at: timestamp(row.int("updated_at")?)?,
    })
}

/// A row of `projects` (`id`, `name`, `created_at`).
pub(crate) fn project(row: &impl SqlRow) -> Result<Project> {
    Ok(Project {
        id: row.text("id")?,
        name: row.text("name")?,
        created_at: timestamp(row.int("created_at")?)?,
    })
}

/// A row of `tokens` (`id`, `project_id`, `role`, `created_at`, `clusters`).
pub(crate) fn token(row: &impl SqlRow) -> Result<TokenRecord> {
    let clusters = row
        .opt_text("clusters")?
        .map(|clusters| {
            serde_json::from_str(&clusters)
                .map_err(|error| StoreError::Corrupt(format!("tokens.clusters: {error}")))
        })
        .transpose()?;
    Ok(TokenRecord {
        id: row.text("id")?,
        project_id: row.opt_text("project_id")?,
        role: role(&row.text("role")?)?,
        clusters,
        created_at: timestamp(row.int("created_at")?)?,
    })
}

/// A row of `select_clusters!`.
pub(crate) fn cluster(row: &impl SqlRow) -> Result<Cluster> {
    let size = |column: &str| -> Result<Option<u32>> { opt_unsigned(column, row.opt_int(column)?) };
    Ok(Cluster {
        id: row.text("id")?,
        project_id: row.opt_text("project_id")?,
        spec: ClusterSpec {
            name: row.text("name")?,
            memory_mib: size("memory_mib")?,
            disk_mib: size("disk_mib")?,
            runners: size("runners")?,
        },
        created_at: timestamp(row.int("created_at")?)?,
        updated_at: timestamp(row.int("updated_at")?)?,
    })
}

/// A row of `select_credentials!`.
pub(crate) fn credential(row: &impl SqlRow) -> Result<StoredCredential> {
    Ok(StoredCredential {
        project_id: row.text("project_id")?,
        registry: row.text("registry")?,
        username: row.text("username")?,
        sealed: SealedSecret {
            bytes: row.blob("sealed")?.to_vec(),
            key_id: row.text("key_id")?,
        },
        created_at: timestamp(row.int("created_at")?)?,
        updated_at: timestamp(row.int("updated_at")?)?,
    })
}

/// A `task_attempts` row as both backends read it: attempt, runner_id, leased_at, started_at,
/// ended_at, ending, exit_code, reason.
pub(crate) type AttemptRow = (
    i64,
    Option<String>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
);

pub(crate) fn attempt(row: AttemptRow) -> Result<stevedore_model::TaskAttempt> {
    let (attempt, runner_id, leased_at, started_at, ended_at, ending, exit_code, reason) = row;
    Ok(stevedore_model::TaskAttempt {
        attempt: unsigned("task_attempts.attempt", attempt)?,
        runner_id,
        leased_at: timestamp(leased_at)?,
        started_at: opt_timestamp(started_at)?,
        ended_at: opt_timestamp(ended_at)?,
        ending,
        exit_code,
        reason,
    })
}
