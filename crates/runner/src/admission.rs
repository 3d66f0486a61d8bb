//! Admission: how many tasks run at once, and how much memory their containers may hold
//! together. A slot is taken when a task is leased; its memory is reserved before its
//! container is created, waiting while the budget is spent. Both are given back when the
//! task's [`Slot`] is dropped, which wakes the lease loop and waiting tasks at once.
//!
//! While every slot is taken, a few more tasks may be leased *ahead* (`prepare_ahead`): such
//! a task's place is not yet a slot. Its image is made present and its container created
//! and attached, and then it waits for the first slot given back ([`Slot::hold`]), so the
//! freed slot starts a container at once instead of after a create and an upload. A task
//! waiting ahead has the first claim on a freed slot: the lease loop leases for the slots
//! nobody waits for. Tasks are leased ahead only while the runner's recent runs were short
//! (the median of the last [`RECENT_RUNS`] under [`AHEAD_RUN_LIMIT`]), so a task does not
//! sit leased behind hours-long ones while another runner could start it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use stevedore_model::limits::DEFAULT_MEMORY_MIB;
use tokio::sync::watch;

/// How many of the latest runs (container start to exit) decide whether tasks are leased
/// ahead.
pub(crate) const RECENT_RUNS: usize = 8;
/// Tasks are leased ahead only while the median of the recent runs is at most this.
pub(crate) const AHEAD_RUN_LIMIT: Duration = Duration::from_secs(2);
/// Fewer recent runs than this say nothing yet: no task is leased ahead.
const RUNS_BEFORE_AHEAD: usize = 4;

/// The runner's capacity and memory budget, and what is in use.
#[derive(Debug)]
pub(crate) struct Admission {
    capacity: u32,
    memory_budget_mib: u64,
    /// The most tasks leased ahead at once.
    prepare_ahead: u32,
    in_use: Mutex<InUse>,
    /// Bumped whenever a slot or memory is given back.
    released: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct InUse {
    slots: u32,
    memory_mib: u64,
    /// Tasks leased ahead that hold no slot yet.
    ahead: u32,
    /// The latest runs' lengths, newest last.
    recent_runs: VecDeque<Duration>,
}

/// One leased task's place in the runner: a slot, or a wait for one when the task was
/// leased ahead. Dropping it gives the place (and the memory it reserved) back.
#[derive(Debug)]
pub(crate) struct Slot {
    admission: Arc<Admission>,
    memory_mib: u64,
    /// Whether this is a slot; false while a task leased ahead waits for one.
    held: bool,
}

// === impl Admission ===

impl Admission {
    /// `capacity` slots and `memory_budget_mib` for their containers, with up to
    /// `prepare_ahead` more tasks leased ahead while every slot is taken.
    pub(crate) fn new(capacity: u32, memory_budget_mib: u64, prepare_ahead: u32) -> Arc<Self> {
        stevedore_metrics::runner_slots(capacity, 0);
        Arc::new(Admission {
            capacity,
            memory_budget_mib,
            prepare_ahead,
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
        // A slot given back goes to a task waiting ahead first.
        let free_slots = self.capacity.saturating_sub(in_use.slots + in_use.ahead);
        if in_use.slots == 0 {
            return free_slots.min(1).max(free_slots.min(self.by_memory(0)));
        }
        free_slots.min(self.by_memory(in_use.memory_mib))
    }

    /// How many tasks to lease ahead now: none while a slot is free for a task leased the
    /// ordinary way, nor while the recent runs were long or too few to tell.
    pub(crate) fn ahead_size(&self) -> u32 {
        let in_use = self.lock();
        if in_use.slots + in_use.ahead < self.capacity || !runs_are_short(&in_use.recent_runs) {
            return 0;
        }
        self.prepare_ahead.saturating_sub(in_use.ahead)
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
            held: true,
        }
    }

    /// A place for a task leased ahead (no more than [`Admission::ahead_size`] asked for):
    /// [`Slot::hold`] waits for its slot.
    pub(crate) fn take_ahead(self: &Arc<Self>) -> Slot {
        self.lock().ahead += 1;
        Slot {
            admission: Arc::clone(self),
            memory_mib: 0,
            held: false,
        }
    }

    /// Records how long a task's container ran, for [`Admission::ahead_size`].
    pub(crate) fn record_run(&self, ran: Duration) {
        let mut in_use = self.lock();
        if in_use.recent_runs.len() == RECENT_RUNS {
            in_use.recent_runs.pop_front();
        }
        in_use.recent_runs.push_back(ran);
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
        self.tell_released();
    }

    /// Wakes the lease loop and the waiting tasks: a slot, memory or a place ahead changed.
    fn tell_released(&self) {
        self.released
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }
}

/// Whether the recent runs say that a slot frees soon: enough of them, and their median at
/// most [`AHEAD_RUN_LIMIT`].
fn runs_are_short(recent: &VecDeque<Duration>) -> bool {
    if recent.len() < RUNS_BEFORE_AHEAD {
        return false;
    }
    let mut sorted: Vec<Duration> = recent.iter().copied().collect();
    sorted.sort_unstable();
    sorted[sorted.len() / 2] <= AHEAD_RUN_LIMIT
}

// === impl Slot ===

impl Slot {
    /// The runner's whole memory budget, MiB.
    pub(crate) fn budget_mib(&self) -> u64 {
        self.admission.memory_budget_mib
    }

    /// Whether this is a slot: false while a task leased ahead waits for one.
    pub(crate) fn is_held(&self) -> bool {
        self.held
    }

    /// For a task leased ahead: waits for a slot given back and takes it. A task waiting
    /// ahead was counted against the free slots, so the lease loop leaves the slot to it.
    pub(crate) async fn hold(&mut self) {
        let mut released = self.admission.subscribe();
        while !self.held {
            {
                let mut in_use = self.admission.lock();
                if in_use.slots < self.admission.capacity {
                    in_use.slots += 1;
                    in_use.ahead = in_use.ahead.saturating_sub(1);
                    self.held = true;
                    stevedore_metrics::runner_slots(self.admission.capacity, in_use.slots);
                }
            }
            if self.held {
                // The place ahead is free again: the lease loop may lease the next one.
                self.admission.tell_released();
            } else if released.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Records how long this task's container ran.
    pub(crate) fn record_run(&self, ran: Duration) {
        self.admission.record_run(ran);
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
        if self.held {
            self.admission.release(self.memory_mib);
        } else {
            {
                let mut in_use = self.admission.lock();
                in_use.ahead = in_use.ahead.saturating_sub(1);
            }
            self.admission.tell_released();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn lease_size_respects_slots_and_memory() {
        let admission = Admission::new(4, 1024, 0);
        assert_eq!(admission.lease_size(), 4);
        let first = admission.take();
        let _second = admission.take();
        assert_eq!(admission.lease_size(), 2);
        drop(first);
        assert_eq!(admission.lease_size(), 3);

        // A budget below one default task still runs one task at a time.
        let small = Admission::new(4, 100, 0);
        assert_eq!(small.lease_size(), 1);
        let _only = small.take();
        assert_eq!(small.lease_size(), 0);
    }

    #[tokio::test]
    async fn memory_is_never_overcommitted_and_waiters_wake_on_release() {
        let admission = Admission::new(4, 512, 0);
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

    fn short_runs(admission: &Admission, count: usize, each: Duration) {
        for _ in 0..count {
            admission.record_run(each);
        }
    }

    #[tokio::test]
    async fn a_task_leased_ahead_takes_the_first_slot_given_back() {
        let admission = Admission::new(1, 1024, 1);
        let running = admission.take();
        assert_eq!(admission.ahead_size(), 0, "no runs seen yet: nothing ahead");
        short_runs(&admission, RUNS_BEFORE_AHEAD, Duration::from_millis(100));
        assert_eq!(admission.lease_size(), 0);
        assert_eq!(admission.ahead_size(), 1);

        let mut ahead = admission.take_ahead();
        assert!(!ahead.is_held());
        assert_eq!(admission.ahead_size(), 0, "one place ahead, taken");
        let released = admission.subscribe();
        let held = tokio::spawn(async move {
            ahead.hold().await;
            ahead
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!held.is_finished(), "the only slot is still taken");

        drop(running);
        // The freed slot is the waiting task's, not the lease loop's.
        assert_eq!(admission.lease_size(), 0);
        let ahead = tokio::time::timeout(Duration::from_secs(1), held)
            .await
            .unwrap()
            .unwrap();
        assert!(ahead.is_held());
        assert!(released.has_changed().unwrap(), "the lease loop was told");
        assert_eq!(admission.lock().slots, 1);
        assert_eq!(admission.lock().ahead, 0);
        assert_eq!(
            admission.ahead_size(),
            1,
            "the next task may be leased ahead"
        );
        drop(ahead);
        assert_eq!(admission.lease_size(), 1);
    }

    #[test]
    fn long_or_few_runs_lease_nothing_ahead() {
        let admission = Admission::new(1, 1024, 1);
        let _running = admission.take();
        short_runs(&admission, RUNS_BEFORE_AHEAD - 1, Duration::from_millis(10));
        assert_eq!(admission.ahead_size(), 0, "too few runs to tell");
        short_runs(&admission, 1, Duration::from_millis(10));
        assert_eq!(admission.ahead_size(), 1);
        // Five long runs of the last eight put the median over the limit.
        short_runs(&admission, 5, AHEAD_RUN_LIMIT + Duration::from_secs(1));
        assert_eq!(admission.lock().recent_runs.len(), RECENT_RUNS);
        assert_eq!(admission.ahead_size(), 0);
        // Without `prepare_ahead`, never.
        let none = Admission::new(1, 1024, 0);
        let _running = none.take();
        short_runs(&none, RECENT_RUNS, Duration::from_millis(10));
        assert_eq!(none.ahead_size(), 0);
    }

    #[test]
    fn a_place_ahead_given_up_unheld_leaves_its_claim() {
        let admission = Admission::new(2, 1024, 1);
        let first = admission.take();
        let _second = admission.take();
        short_runs(&admission, RUNS_BEFORE_AHEAD, Duration::from_millis(10));
        let ahead = admission.take_ahead();
        drop(first);
        assert_eq!(
            admission.lease_size(),
            0,
            "the task ahead claims the freed slot"
        );
        drop(ahead);
        assert_eq!(admission.lease_size(), 1);
        assert_eq!(admission.lock().ahead, 0);
        assert_eq!(admission.lock().slots, 1);
    }
}
