//! The scheduler, the rescuer and retention run in one process at a time: the leader among the
//! servers sharing a store. Every server runs this loop; it tries to lead, runs them while it
//! does, and stops them the moment it no longer does (its database connection was lost, say),
//! so another server takes over. They are safe to overlap for a moment anyway: firing and
//! rescue are guarded in the store, and two retention passes skip each other's tasks.

use std::sync::Arc;
use std::time::Duration;

use stevedore_model::Clock;
use stevedore_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::EnqueueHook;
use crate::rescuer::{self, RescuerConfig};
use crate::retention::{self, RetentionConfig};
use crate::scheduler::{self, SchedulerConfig};

/// How often a follower asks to lead, and a leader checks that it still does.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// What the leader runs.
#[derive(Clone)]
pub struct LeaderDuties {
    pub scheduler: SchedulerConfig,
    pub rescuer: RescuerConfig,
    /// Retention's passes; `None` when the operator turned retention off.
    pub retention: Option<RetentionConfig>,
    pub on_enqueue: Option<EnqueueHook>,
    pub check_interval: Duration,
}

/// Leads whenever it can until `shutdown`.
pub async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    duties: LeaderDuties,
    shutdown: CancellationToken,
) {
    let mut was_refused = false;
    loop {
        let leadership = match store.try_lead().await {
            Ok(leadership) => leadership,
            Err(error) => {
                tracing::warn!(%error, "cannot ask the store for the leadership");
                None
            }
        };
        if let Some(leadership) = leadership {
            tracing::info!(
                retention = duties.retention.is_some(),
                "leading: this server runs the scheduler, the rescuer and retention"
            );
            let duty = shutdown.child_token();
            let tasks = TaskTracker::new();
            tasks.spawn(rescuer::run(
                store.clone(),
                clock.clone(),
                duties.rescuer,
                duty.clone(),
            ));
            tasks.spawn(scheduler::run(
                store.clone(),
                clock.clone(),
                duties.scheduler,
                duties.on_enqueue.clone(),
                duty.clone(),
            ));
            if let Some(config) = duties.retention {
                tasks.spawn(retention::run(
                    store.clone(),
                    clock.clone(),
                    config,
                    duty.clone(),
                ));
            }
            tasks.close();
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(duties.check_interval) => {}
                }
                if !leadership.is_held().await {
                    tracing::warn!(
                        "lost the leadership: stopping the scheduler, the rescuer and retention"
                    );
                    break;
                }
            }
            duty.cancel();
            tasks.wait().await;
            drop(leadership);
            was_refused = false;
        } else if !was_refused {
            tracing::info!("another server leads; standing by to take over");
            was_refused = true;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(duties.check_interval) => {}
        }
    }
}
