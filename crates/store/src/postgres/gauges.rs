//! The task counts behind the metrics gauges.

use sqlx::Row;
use stevedore_model::Timestamp;

use super::PgStore;
use crate::convert::{micros, status, unsigned};
use crate::{Result, StoreGauges};

pub(super) async fn gauges(store: &PgStore, now: Timestamp) -> Result<StoreGauges> {
    let status_rows = sqlx::query(
        "SELECT status, COUNT(*) AS n FROM tasks \
         WHERE status IN ('queued', 'preparing', 'running') GROUP BY status",
    )
    .fetch_all(&store.pool)
    .await?;
    let mut by_status = Vec::with_capacity(status_rows.len());
    for row in &status_rows {
        let text: String = row.try_get("status")?;
        by_status.push((status(&text)?, unsigned("n", row.try_get("n")?)?));
    }
    let depth_rows = sqlx::query(
        "SELECT priority, COUNT(*) AS n FROM tasks \
         WHERE status = 'queued' AND due_at <= $1 GROUP BY priority",
    )
    .bind(micros(now))
    .fetch_all(&store.pool)
    .await?;
    let mut queue_depth = Vec::with_capacity(depth_rows.len());
    for row in &depth_rows {
        let priority: i16 = row.try_get("priority")?;
        queue_depth.push((
            unsigned("priority", i64::from(priority))?,
            unsigned("n", row.try_get("n")?)?,
        ));
    }
    Ok(StoreGauges::from_counts(&by_status, &queue_depth))
}
