//! Values at the boundary of every database: time as integer microseconds since the epoch,
//! unsigned counts in signed 64-bit columns, statuses and roles as text, specs as JSON. Shared by
//! the SQLite and PostgreSQL stores, whose schemas use the same representations.

use std::collections::HashMap;

use chrono::DateTime;
use stevedore_model::{CodeKind, CodeSpec, TaskStatus, Timestamp};

use crate::{CodeStats, Page, Result, StoreError, TokenRole, UsageRow};

pub(crate) fn micros(at: Timestamp) -> i64 {
    at.timestamp_micros()
}

pub(crate) fn opt_micros(at: Option<Timestamp>) -> Option<i64> {
    at.map(micros)
}

pub(crate) fn timestamp(value: i64) -> Result<Timestamp> {
    DateTime::from_timestamp_micros(value)
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp {value} is out of range")))
}

pub(crate) fn opt_timestamp(value: Option<i64>) -> Result<Option<Timestamp>> {
    value.map(timestamp).transpose()
}

/// Unsigned values go into signed 64-bit columns (PostgreSQL has no unsigned types either);
/// nothing stevedore counts comes near `i64::MAX`, so saturating is never lossy in practice.
pub(crate) fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn opt_signed(value: Option<u64>) -> Option<i64> {
    value.map(signed)
}

pub(crate) fn unsigned<T: TryFrom<i64>>(column: &str, value: i64) -> Result<T> {
    T::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{column} holds {value}, out of range")))
}

pub(crate) fn opt_unsigned<T: TryFrom<i64>>(column: &str, value: Option<i64>) -> Result<Option<T>> {
    value.map(|value| unsigned(column, value)).transpose()
}

/// `LIMIT` and `OFFSET` of a 1-based page; page 0 reads as page 1.
pub(crate) fn limit_offset(page: Page) -> (i64, i64) {
    let per_page = i64::from(page.per_page);
    (per_page, i64::from(page.page.max(1) - 1) * per_page)
}

/// Turns a unique-key violation into a `Conflict` with a message for the user.
pub(crate) fn unique_violation(error: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match &error {
        sqlx::Error::Database(database) if database.is_unique_violation() => {
            StoreError::Conflict(message())
        }
        _ => StoreError::Database(error),
    }
}

pub(crate) fn status(text: &str) -> Result<TaskStatus> {
    text.parse()
        .map_err(|error| StoreError::Corrupt(format!("tasks.status: {error}")))
}

/// Counts by status from `(status, count)` rows of a `GROUP BY status`: every status in
/// lifecycle order, zeros included, so callers need not know which statuses had rows.
pub(crate) fn status_counts(rows: impl IntoIterator<Item = (String, i64)>) -> Result<CodeStats> {
    let mut by_status: Vec<(TaskStatus, u64)> =
        TaskStatus::ALL.iter().map(|known| (*known, 0)).collect();
    for (text, count) in rows {
        let found = status(&text)?;
        if let Some(entry) = by_status.iter_mut().find(|(known, _)| *known == found) {
            entry.1 = unsigned("count", count)?;
        }
    }
    Ok(CodeStats { by_status })
}

pub(crate) fn role_text(role: TokenRole) -> &'static str {
    match role {
        TokenRole::Project => "project",
        TokenRole::Runner => "runner",
        TokenRole::Admin => "admin",
    }
}

pub(crate) fn role(text: &str) -> Result<TokenRole> {
    match text {
        "project" => Ok(TokenRole::Project),
        "runner" => Ok(TokenRole::Runner),
        "admin" => Ok(TokenRole::Admin),
        other => Err(StoreError::Corrupt(format!("unknown token role {other:?}"))),
    }
}

pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|error| StoreError::Corrupt(format!("cannot encode JSON: {error}")))
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(column: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt(format!("{column}: {error}")))
}

/// The usage query's rows as `UsageRow`s. Both backends select the same columns (`bucket`,
/// `code_id`, `code_name`, `code_rev`, `complete`, `error`, `timeout`, `cancelled`,
/// `compute_micros`, `spec`); each revision's spec is parsed once however many buckets it has.
pub(crate) fn usage_rows<R>(rows: &[R]) -> Result<Vec<UsageRow>>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut kinds: HashMap<(String, i64), CodeKind> = HashMap::new();
    rows.iter()
        .map(|row| {
            let code_id: String = row.try_get("code_id")?;
            let code_rev: i64 = row.try_get("code_rev")?;
            let kind = match kinds.get(&(code_id.clone(), code_rev)) {
                Some(kind) => kind.clone(),
                None => {
                    let spec: String = row.try_get("spec")?;
                    let kind = from_json::<CodeSpec>("code_revisions.spec", &spec)?.kind;
                    kinds.insert((code_id.clone(), code_rev), kind.clone());
                    kind
                }
            };
            let count = |column: &str| -> Result<u64> { unsigned(column, row.try_get(column)?) };
            Ok(UsageRow {
                bucket_start: timestamp(row.try_get("bucket")?)?,
                code_name: row.try_get("code_name")?,
                code_rev: unsigned("code_rev", code_rev)?,
                code_id,
                kind,
                complete: count("complete")?,
                error: count("error")?,
                timeout: count("timeout")?,
                cancelled: count("cancelled")?,
                compute_ms: count("compute_micros")? / 1000,
            })
        })
        .collect()
}

/// A project's own quota limits from their rows, `(quota, limit)`. A quota this build does not
/// know (written by a newer one) is left out: its default applies here.
pub(crate) fn own_quota_limits(
    rows: impl IntoIterator<Item = (String, i64)>,
) -> Result<Vec<(stevedore_model::Quota, u64)>> {
    let mut own = Vec::new();
    for (name, limit) in rows {
        let Ok(quota) = name.parse() else {
            continue;
        };
        own.push((quota, unsigned("limit", limit)?));
    }
    Ok(own)
}
