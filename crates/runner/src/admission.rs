//! Admission: how many tasks run at once, and how much memory their containers may hold
//! together. A slot is taken when a task is leased; its memory is reserved before its
//! container is created, waiting while the budget is spent. Both are given back when the
//! task's [`Slot`] is dropped, which wakes the lease loop and waiting tasks at once.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use stevedore_model::limits::DEFAULT_MEMORY_MIB;
use tokio::sync::watch;

/// The runner's capacity and memory budget, and what is in use.
#[derive(Debug)]
pub(crate) struct Admission {
    capacity: u32,
    memory_budget_mib: u64,
    in_use: Mutex<InUse>,
    /// Bumped whenever a slot or memory is given back.
    released: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct InUse {
    slots: u32,
    memory_mib: u64,
}

/// One leased task's place in the runner. Dropping it gives the place (and the memory it
/// reserved) back.
#[derive(Debug)]
pub(crate) struct Slot {
    admission: Arc<Admission>,
    memory_mib: u64,
}

// === impl Admission ===

impl Admission {
    pub(crate) fn new(capacity: u32, memory_budget_mib: u64) -> Arc<Self> {
        stevedore_metrics::runner_slots(capacity, 0);
        Arc::new(Admission {
            capacity,
            memory_budget_mib,
            in_use: Mutex::new(InUse::default()),
            released: watch::Sender::new(0),
        })
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    pub(crate) fn memory_budget_mib(&self) -> u64 {
        self.memory_budget_mib
    }

    /// How many tasks to ask for now: the free slots, but no more than the free memory holds
    /// at the default limit (at least one when the runner is idle, so a small budget still
    /// runs tasks one by one).
    pub(crate) fn lease_size(&self) -> u32 {
        let in_use = self.lock();
        let free_slots = self.capacity.saturating_sub(in_use.slots);
        if in_use.slots == 0 {
            return free_slots.min(1).max(free_slots.min(self.by_memory(0)));
        }
        free_slots.min(self.by_memory(in_use.memory_mib))
    }

    /// Takes a slot for a freshly leased task. The lease loop asked for no more than
    /// [`Admission::lease_size`], so it is free.
    pub(crate) fn take(self: &Arc<Self>) -> Slot {
        {
            let mut in_use = self.lock();
            in_use.slots += 1;
            stevedore_metrics::runner_slots(self.capacity, in_use.slots);
        }
        Slot {
            admission: Arc::clone(self),
            memory_mib: 0,
        }
    }

    /// A receiver that sees every later release: subscribe before checking, then wait.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.released.subscribe()
    }

    fn by_memory(&self, used_mib: u64) -> u32 {
        let free = self.memory_budget_mib.saturating_sub(used_mib);
        u32::try_from(free / u64::from(DEFAULT_MEMORY_MIB)).unwrap_or(u32::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, InUse> {
        // The counters stay consistent under any panic: every update is a single statement.
        self.in_use.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, memory_mib: u64) {
        {
            let mut in_use = self.lock();
            in_use.slots = in_use.slots.saturating_sub(1);
            in_use.memory_mib = in_use.memory_mib.saturating_sub(memory_mib);
            stevedore_metrics::runner_slots(self.capacity, in_use.slots);
        }
        self.released
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }
}

// === impl Slot ===

impl Slot {
    /// The runner's whole memory budget, MiB.
    pub(crate) fn budget_mib(&self) -> u64 {
        self.admission.memory_budget_mib
    }

    /// Whether `memory_mib` could ever fit this runner's budget.
    pub(crate) fn fits_budget(&self, memory_mib: u64) -> bool {
        memory_mib <= self.admission.memory_budget_mib
    }

    /// Reserves `memory_mib` for this task's container, waiting until that much is free.
    /// Call it once; the caller checked [`Slot::fits_budget`] first.
    pub(crate) async fn reserve_memory(&mut self, memory_mib: u64) {
        let mut released = self.admission.subscribe();
        loop {
            {
                let mut in_use = self.admission.lock();
                if in_use.memory_mib + memory_mib <= self.admission.memory_budget_mib {
                    in_use.memory_mib += memory_mib;
                    self.memory_mib += memory_mib;
                    return;
                }
            }
            if released.changed().await.is_err() {
                // The admission is gone; nothing will ever be released.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.release(self.memory_mib);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn lease_size_respects_slots_and_memory() {
        let admission = Admission::new(4, 1024);
        assert_eq!(admission.lease_size(), 4);
        let first = admission.take();
        let _second = admission.take();
        assert_eq!(admission.lease_size(), 2);
        drop(first);
        assert_eq!(admission.lease_size(), 3);

        // A budget below one default task still runs one task at a time.
        let small = Admission::new(4, 100);
        assert_eq!(small.lease_size(), 1);
        let _only = small.take();
        assert_eq!(small.lease_size(), 0);
    }

    #[tokio::test]
    async fn memory_is_never_overcommitted_and_waiters_wake_on_release() {
        let admission = Admission::new(4, 512);
        let mut big = admission.take();
        big.reserve_memory(400).await;
        let mut waiting = admission.take();
        assert!(waiting.fits_budget(200));
        assert!(!waiting.fits_budget(513));
        let reserved = tokio::spawn(async move {
            waiting.reserve_memory(200).await;
            waiting
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reserved.is_finished(), "200 MiB more must not fit yet");
        drop(big);
        let waiting = tokio::time::timeout(Duration::from_secs(1), reserved)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(admission.lock().memory_mib, 200);
        drop(waiting);
        assert_eq!(admission.lock().memory_mib, 0);
        assert_eq!(admission.lock().slots, 0);
    }
}
