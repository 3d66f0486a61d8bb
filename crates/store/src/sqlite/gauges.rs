//! The task counts behind the metrics gauges, and the bytes of task data stored.
//!
//! They are read from `task_counts`, which triggers keep in the same transaction as every
//! change of a task's status or priority (migration 0009), log size or retention (0011), so a
//! scrape reads a few rows whatever the number of tasks. Only the queued tasks that are not due yet are counted, apart
//! (through `tasks_queued`, one range per priority): usually few.

use sqlx::{Connection, Row};
use stevedore_model::Timestamp;
use stevedore_model::limits::MAX_PRIORITY;

use super::SqliteStore;
use crate::convert::{micros, status, unsigned};
use crate::{DataSizes, Result, StoreGauges};

/// Queued tasks not due yet at `?1`, by priority.
macro_rules! queued_later_of_priority {
    ($priority:literal) => {
        concat!(
            "SELECT ",
            $priority,
            " AS priority, COUNT(*) AS n FROM tasks \
             WHERE status = 'queued' AND priority = ",
            $priority,
            " AND due_at > ?1"
        )
    };
}

const QUEUED_LATER: &str = concat!(
    queued_later_of_priority!("2"),
    " UNION ALL ",
    queued_later_of_priority!("1"),
    " UNION ALL ",
    queued_later_of_priority!("0"),
);

const _: () = assert!(MAX_PRIORITY == 2, "QUEUED_LATER lists every priority");

pub(super) async fn gauges(store: &SqliteStore, now: Timestamp) -> Result<StoreGauges> {
    let mut conn = store.readers.acquire().await?;
    // One read transaction: both reads see the same snapshot.
    let mut tx = conn.begin().await?;
    let count_rows = sqlx::query(
        "SELECT status, priority, n FROM task_counts \
         WHERE status IN ('queued', 'preparing', 'running')",
    )
    .fetch_all(&mut *tx)
    .await?;
    let later_rows = sqlx::query(QUEUED_LATER)
        .bind(micros(now))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut counts = Vec::with_capacity(count_rows.len());
    for row in &count_rows {
        let text: String = row.try_get("status")?;
        counts.push((
            status(&text)?,
            unsigned("priority", row.try_get("priority")?)?,
            unsigned("n", row.try_get("n")?)?,
        ));
    }
    let mut queued_later = Vec::with_capacity(later_rows.len());
    for row in &later_rows {
        queued_later.push((
            unsigned("priority", row.try_get("priority")?)?,
            unsigned("n", row.try_get("n")?)?,
        ));
    }
    Ok(StoreGauges::from_task_counts(&counts, &queued_later))
}

pub(super) async fn data_sizes(store: &SqliteStore) -> Result<DataSizes> {
    let mut conn = store.readers.acquire().await?;
    let row = sqlx::query(
        "SELECT coalesce(sum(log_bytes), 0) AS log_bytes, \
         coalesce(sum(payload_bytes), 0) AS payload_bytes FROM task_counts",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(DataSizes {
        log_bytes: unsigned("log_bytes", row.try_get("log_bytes")?)?,
        payload_bytes: unsigned("payload_bytes", row.try_get("payload_bytes")?)?,
    })
}
