//! Reaping the containers of gone runners.
//!
//! A runner removes its own leftovers at start-up, and its watchdog stops its containers when
//! it dies. What neither covers: a runner whose watchdog died with it (an OOM kill of both, a
//! container runtime restarted under them), a runner that never comes back under its id, or
//! one on another host that drives this engine remotely. Their containers outlive their leases
//! and run beside the rescued copies of their tasks.
//!
//! So every runner looks, now and then, at the containers of *other* runners on its engine and
//! asks the server which of those runners are gone: seen leasing, unseen for longer than the
//! online window, holding no live lease. Only those runners' containers are removed. A runner
//! the server never saw (one of another server with its own store, sharing the engine) is
//! never touched, nor is a live runner that is merely busy (its heartbeats keep its leases
//! live).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stevedore_engine::{ContainerEngine, ContainerId};
use tokio_util::sync::CancellationToken;

use crate::container::LABEL_RUNNER;
use crate::runner::remove_containers;
use crate::source::TaskSource;

/// Looks every `interval` (the first time after one interval, when the runner's own start-up
/// is over) until `shutdown`.
pub(crate) async fn reap_gone_runners(
    engine: Arc<dyn ContainerEngine>,
    source: Arc<dyn TaskSource>,
    own_id: String,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        reap_once(engine.as_ref(), source.as_ref(), &own_id).await;
    }
}

/// One look: lists the other runners' containers, asks which runners are gone, removes
/// theirs. How many it removed. Failures are logged and left for the next look.
pub(crate) async fn reap_once(
    engine: &dyn ContainerEngine,
    source: &dyn TaskSource,
    own_id: &str,
) -> usize {
    let listed = match engine.list_labeled_containers(LABEL_RUNNER, None).await {
        Ok(listed) => listed,
        Err(error) => {
            tracing::debug!(%error, "cannot list other runners' containers");
            return 0;
        }
    };
    let mut by_runner: BTreeMap<String, Vec<ContainerId>> = BTreeMap::new();
    for container in listed {
        if let Some(runner) = container.labels.get(LABEL_RUNNER)
            && runner != own_id
        {
            by_runner
                .entry(runner.clone())
                .or_default()
                .push(container.id);
        }
    }
    if by_runner.is_empty() {
        return 0;
    }
    let runners: Vec<String> = by_runner.keys().cloned().collect();
    let gone = match source.gone_runners(&runners).await {
        Ok(gone) => gone,
        Err(error) => {
            tracing::debug!(%error, "cannot ask which runners are gone");
            return 0;
        }
    };
    let mut doomed = Vec::new();
    for runner in gone {
        if let Some(ids) = by_runner.remove(&runner) {
            tracing::warn!(
                gone_runner = %runner,
                containers = ids.len(),
                "removing the containers of a runner the server reports gone: they outlived \
                 its leases"
            );
            doomed.extend(ids);
        }
    }
    remove_containers(engine, doomed, "removed a gone runner's container").await
}
