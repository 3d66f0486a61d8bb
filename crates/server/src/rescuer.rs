//! The rescuer: gives back to the queue every task whose lease expired — its runner died, lost
//! its engine or its network — so that another lease runs it again. The expired lease's token
//! is dead from then on: whatever its old runner still sends is refused.
//!
//! A task past its infrastructure attempts (or asked to cancel) ends here instead, and is
//! counted as finished like one its runner completed.

use std::sync::Arc;
use std::time::Duration;

use stevedore_model::Clock;
use stevedore_store::Store;
use tokio_util::sync::CancellationToken;

/// How the rescuer runs.
#[derive(Debug, Clone, Copy)]
pub struct RescuerConfig {
    /// How often it looks for expired leases.
    pub interval: Duration,
    /// After this many infrastructure failures a task ends `error` instead.
    pub max_infra_attempts: u32,
}

impl Default for RescuerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            max_infra_attempts: 5,
        }
    }
}

/// Runs until `shutdown` is cancelled.
pub async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: RescuerConfig,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store
            .rescue_expired(clock.now(), config.max_infra_attempts)
            .await
        {
            Ok(rescued) if !rescued.is_empty() => {
                for task in &rescued {
                    stevedore_metrics::task_finished(task.status, &task.code_name);
                }
                // Each with its new status: `queued` again, or ended.
                tracing::warn!(count = rescued.len(), tasks = ?rescued, "rescued tasks whose lease expired");
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "rescuing expired leases failed"),
        }
    }
}
