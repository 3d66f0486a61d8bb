//! Quotas: how much one project may hold, so that no tenant fills the store, the disk or the
//! read connections of a server shared with others.
//!
//! The operator sets a default for every quota (`QuotaLimits`); a project may have its own
//! limit for any of them, set by an admin. The store checks the stored quotas inside the
//! transaction that would go past them; the server counts live-log streams, which exist only
//! in its process.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::validation::ValidationError;

/// One thing a project's holdings are capped on. A closed set: the names are the API's and
/// the settings' keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quota {
    /// Tasks `queued` (delayed ones included). A rate-like limit: runners drain it.
    QueuedTasks,
    /// Tasks `preparing` or `running` at once, on every runner together. Never refuses a
    /// request: a project at its limit gets no more leases until one of its tasks ends, and
    /// its queued tasks wait while other projects' run.
    RunningTasks,
    /// Schedules still `scheduled`.
    Schedules,
    /// Codes not deleted.
    Codes,
    /// Revisions of any one code.
    RevisionsPerCode,
    /// Bytes of the zip packages the project's live revisions hold (revisions of codes not
    /// deleted, whose package retention has not removed): each distinct package once, however
    /// many of the project's revisions or codes hold it. A package another project holds too
    /// counts for each of them, though it is stored once.
    PackageBytes,
    /// Live log streams (`log/stream`, `log?follow=true`) one token holds open on one server
    /// at once. Each polls the store for as long as it is open. A rate-like limit.
    LogStreamsPerToken,
}

/// The operator's limits, one per quota: the defaults of every project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaLimits {
    pub queued_tasks: u64,
    pub running_tasks: u64,
    pub schedules: u64,
    pub codes: u64,
    pub revisions_per_code: u64,
    pub package_bytes: u64,
    pub log_streams_per_token: u64,
}

/// A write that would take a project past one of its quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "quota exceeded: {quota} {used} of {limit}; {}, or ask the operator to raise it",
    quota.remedy()
)]
pub struct QuotaExceeded {
    pub quota: Quota,
    pub limit: u64,
    /// What the project holds now (before the refused write).
    pub used: u64,
}

// === impl Quota ===

impl Quota {
    /// Every quota, in the order the API lists them.
    pub const ALL: [Quota; 7] = [
        Quota::QueuedTasks,
        Quota::RunningTasks,
        Quota::Schedules,
        Quota::Codes,
        Quota::RevisionsPerCode,
        Quota::PackageBytes,
        Quota::LogStreamsPerToken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Quota::QueuedTasks => "queued_tasks",
            Quota::RunningTasks => "running_tasks",
            Quota::Schedules => "schedules",
            Quota::Codes => "codes",
            Quota::RevisionsPerCode => "revisions_per_code",
            Quota::PackageBytes => "package_bytes",
            Quota::LogStreamsPerToken => "log_streams_per_token",
        }
    }

    /// Whether the limit frees itself as work goes on (tasks run, streams end), so that the
    /// same request can succeed later: answered 429 rather than 403.
    pub fn is_rate_like(self) -> bool {
        matches!(
            self,
            Quota::QueuedTasks | Quota::RunningTasks | Quota::LogStreamsPerToken
        )
    }

    /// What the project can do itself to get under the limit.
    fn remedy(self) -> &'static str {
        match self {
            Quota::QueuedTasks => "wait for tasks to run, or cancel some",
            Quota::RunningTasks => "wait for running tasks to end",
            Quota::Schedules => "cancel schedules",
            Quota::Codes => "delete codes",
            Quota::RevisionsPerCode => "delete the code and push it anew",
            Quota::PackageBytes => "delete codes with large packages",
            Quota::LogStreamsPerToken => "close other live log streams of this token",
        }
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Quota {
    type Err = ValidationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Quota::ALL
            .into_iter()
            .find(|quota| quota.as_str() == text)
            .ok_or_else(|| {
                let known: Vec<&str> = Quota::ALL.iter().map(|quota| quota.as_str()).collect();
                ValidationError::new(
                    "quota",
                    format!(
                        "{text:?} is not a quota; the quotas are {}",
                        known.join(", ")
                    ),
                )
            })
    }
}

// === impl QuotaLimits ===

impl Default for QuotaLimits {
    /// Generous: far beyond what one honest project holds, low enough that one project cannot
    /// fill a shared store.
    fn default() -> Self {
        Self {
            queued_tasks: 100_000,
            running_tasks: 1_000,
            schedules: 1_000,
            codes: 1_000,
            revisions_per_code: 1_000,
            package_bytes: 10 << 30,
            log_streams_per_token: 10,
        }
    }
}

impl QuotaLimits {
    pub fn get(&self, quota: Quota) -> u64 {
        match quota {
            Quota::QueuedTasks => self.queued_tasks,
            Quota::RunningTasks => self.running_tasks,
            Quota::Schedules => self.schedules,
            Quota::Codes => self.codes,
            Quota::RevisionsPerCode => self.revisions_per_code,
            Quota::PackageBytes => self.package_bytes,
            Quota::LogStreamsPerToken => self.log_streams_per_token,
        }
    }

    pub fn set(&mut self, quota: Quota, limit: u64) {
        match quota {
            Quota::QueuedTasks => self.queued_tasks = limit,
            Quota::RunningTasks => self.running_tasks = limit,
            Quota::Schedules => self.schedules = limit,
            Quota::Codes => self.codes = limit,
            Quota::RevisionsPerCode => self.revisions_per_code = limit,
            Quota::PackageBytes => self.package_bytes = limit,
            Quota::LogStreamsPerToken => self.log_streams_per_token = limit,
        }
    }

    /// These limits with a project's own in place of the defaults.
    pub fn with_overrides(mut self, overrides: &[(Quota, u64)]) -> Self {
        for (quota, limit) in overrides {
            self.set(*quota, *limit);
        }
        self
    }

    /// Refuses adding `adding` to `used` when that passes `quota`'s limit. Adding nothing is
    /// always allowed, even over the limit (a limit lowered below what a project holds).
    pub fn check(&self, quota: Quota, used: u64, adding: u64) -> Result<(), QuotaExceeded> {
        let limit = self.get(quota);
        if adding > 0 && used.saturating_add(adding) > limit {
            return Err(QuotaExceeded { quota, limit, used });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_list_the_known() {
        for quota in Quota::ALL {
            assert_eq!(quota.as_str().parse::<Quota>(), Ok(quota));
        }
        let error = "tasks".parse::<Quota>().unwrap_err();
        assert!(
            error
                .message
                .contains("queued_tasks, running_tasks, schedules"),
            "{error}"
        );
    }

    #[test]
    fn check_counts_the_batch_and_names_the_quota() {
        let limits = QuotaLimits {
            queued_tasks: 10,
            ..QuotaLimits::default()
        };
        assert!(limits.check(Quota::QueuedTasks, 9, 1).is_ok());
        let error = limits.check(Quota::QueuedTasks, 9, 2).unwrap_err();
        assert_eq!(
            error.to_string(),
            "quota exceeded: queued_tasks 9 of 10; wait for tasks to run, or cancel some, \
             or ask the operator to raise it"
        );
        assert!(limits.check(Quota::QueuedTasks, 20, 0).is_ok());
    }

    #[test]
    fn overrides_replace_defaults() {
        let limits = QuotaLimits::default().with_overrides(&[(Quota::Codes, 3)]);
        assert_eq!(limits.codes, 3);
        assert_eq!(limits.schedules, QuotaLimits::default().schedules);
    }
}
