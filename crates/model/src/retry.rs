//! User retries: which finished tasks get a new task, and when it is due.
//!
//! IronWorker retries a task that ends `error` or `timeout` while its code's `retries` exceed
//! the task's `retry_count`, after a fixed `retries_delay`. stevedore adds an optional
//! exponential backoff. The store calls `automatic_retry` inside the transaction that records
//! a runner's completion, so a retry is queued exactly when the result is recorded, whichever
//! runner reported it.
//!
//! What does not spend a user retry, by construction: an infrastructure give-up (the task
//! ends `error` through the store's `requeue` or `rescue_expired`, which carry no
//! `TaskOutcome` and never ask for a retry: the infrastructure already ran it again several
//! times and failed, so more runs would only repeat that), a cancellation, a success, and a
//! failure of a task whose user asked to cancel it (the exit raced the kill).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::code::CodeSpec;
use crate::limits::MAX_RETRIES_DELAY_SECS;
use crate::status::TaskStatus;
use crate::task::{NewTask, Task, TaskOutcome};
use crate::validation::ValidationError;

/// How the delay between user retries grows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetriesBackoff {
    /// Every retry waits `retries_delay`, as in IronWorker.
    #[default]
    Fixed,
    /// Retry number n+1 waits `retries_delay * 2^n`, at most `MAX_BACKOFF_DELAY_SECS`.
    Exponential,
}

/// The longest an exponential backoff waits between retries: one day.
pub const MAX_BACKOFF_DELAY_SECS: u32 = MAX_RETRIES_DELAY_SECS;

/// Seconds until the retry of a task that had `retry_count` retries before it (0 for an
/// original task). Never below `delay_secs`, never decreasing in `retry_count`, and with
/// exponential backoff never above `MAX_BACKOFF_DELAY_SECS` (unless `delay_secs` itself is).
pub fn retry_delay_secs(delay_secs: u32, backoff: RetriesBackoff, retry_count: u32) -> u32 {
    match backoff {
        RetriesBackoff::Fixed => delay_secs,
        RetriesBackoff::Exponential => {
            let factor = 1_u64.checked_shl(retry_count.min(63)).unwrap_or(u64::MAX);
            let delay = u64::from(delay_secs).saturating_mul(factor);
            let cap = u64::from(MAX_BACKOFF_DELAY_SECS.max(delay_secs));
            u32::try_from(delay.min(cap)).unwrap_or(u32::MAX)
        }
    }
}

/// The retry to queue for a task a runner just completed with `outcome`, given the spec of
/// the code revision the task pinned; `None` when it is not retried. The retry runs the same
/// revision with the same payload, priority, timeout, label, cluster and schedule, counts one
/// more retry, points at the first task of the chain, and is delayed by `retry_delay_secs`.
pub fn automatic_retry(failed: &Task, outcome: &TaskOutcome, spec: &CodeSpec) -> Option<NewTask> {
    let failed_by_user = matches!(failed.status, TaskStatus::Error | TaskStatus::Timeout)
        && outcome.is_user_failure()
        && !failed.cancel_requested;
    if !failed_by_user || failed.retry_count >= spec.retries {
        return None;
    }
    let delay_secs = retry_delay_secs(
        spec.retries_delay_secs,
        spec.retries_backoff,
        failed.retry_count,
    );
    Some(NewTask::retry_of(failed, delay_secs))
}

impl RetriesBackoff {
    pub const ALL: [RetriesBackoff; 2] = [RetriesBackoff::Fixed, RetriesBackoff::Exponential];

    pub fn as_str(self) -> &'static str {
        match self {
            RetriesBackoff::Fixed => "fixed",
            RetriesBackoff::Exponential => "exponential",
        }
    }
}

impl fmt::Display for RetriesBackoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RetriesBackoff {
    type Err = ValidationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        RetriesBackoff::ALL
            .into_iter()
            .find(|backoff| backoff.as_str() == text)
            .ok_or_else(|| {
                ValidationError::new(
                    "retries_backoff",
                    format!("must be \"fixed\" or \"exponential\", got {text:?}"),
                )
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fixed_delay_never_grows() {
        for retry_count in [0, 1, 5, 99] {
            assert_eq!(retry_delay_secs(60, RetriesBackoff::Fixed, retry_count), 60);
        }
    }

    #[test]
    fn exponential_delay_doubles_then_stops_at_a_day() {
        let delays: Vec<u32> = (0..5)
            .map(|n| retry_delay_secs(60, RetriesBackoff::Exponential, n))
            .collect();
        assert_eq!(delays, [60, 120, 240, 480, 960]);
        assert_eq!(
            retry_delay_secs(60, RetriesBackoff::Exponential, 20),
            MAX_BACKOFF_DELAY_SECS
        );
        assert_eq!(
            retry_delay_secs(60, RetriesBackoff::Exponential, u32::MAX),
            MAX_BACKOFF_DELAY_SECS
        );
        assert_eq!(retry_delay_secs(0, RetriesBackoff::Exponential, 10), 0);
    }

    #[test]
    fn backoff_names_round_trip() {
        for backoff in RetriesBackoff::ALL {
            assert_eq!(backoff.as_str().parse::<RetriesBackoff>().unwrap(), backoff);
        }
        assert_eq!(
            "linear".parse::<RetriesBackoff>().unwrap_err().field,
            "retries_backoff"
        );
    }

    proptest! {
        #[test]
        fn exponential_delay_is_bounded_and_monotonic(
            delay in 0..=MAX_RETRIES_DELAY_SECS,
            retry_count in 0_u32..200,
        ) {
            let this = retry_delay_secs(delay, RetriesBackoff::Exponential, retry_count);
            let next = retry_delay_secs(delay, RetriesBackoff::Exponential, retry_count + 1);
            prop_assert!(this >= delay, "below the fixed delay");
            prop_assert!(this >= retry_delay_secs(delay, RetriesBackoff::Fixed, retry_count));
            prop_assert!(next >= this, "decreasing");
            prop_assert!(this <= MAX_BACKOFF_DELAY_SECS, "above the cap");
        }
    }
}
