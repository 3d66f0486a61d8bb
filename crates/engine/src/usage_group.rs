//! A task container's own account of what it used, for the Docker implementation on the
//! engine's host: each container is created under a cgroup of its own (its `CgroupParent`,
//! inside the CPU group when there is one) that outlives it, so its CPU time and peak memory
//! are read once, exactly, after it stopped.
//!
//! ```text
//! parent:    /<CPU group or stevedore-usage>/usage-<unique>      made by the engine (runc) with
//! container: /<CPU group or stevedore-usage>/usage-<unique>/<id> the container's own, removed
//!                                                                by the engine at its exit
//! cgroup v1: cpuacct/<parent>/cpuacct.usage (ns), memory/<parent>/memory.max_usage_in_bytes,
//!            pids/<parent>/pids.peak (kernels that have it)
//! cgroup v2: <parent>/cpu.stat usage_usec, <parent>/memory.peak, <parent>/pids.peak
//! ```
//!
//! The kernel charges a container's CPU time and memory to every ancestor of its cgroup, and
//! the parent keeps them after the engine removed the container's own cgroup at its exit (which
//! it has done by the time a wait returns: the container's cgroup cannot be read then). Each
//! parent holds one container, so its peak is the container's. Docker's stats stream, the other
//! way, costs the engine a request per container and a reading of its cgroup every second while
//! it runs, misses what happens between readings and after the last, and sees nothing of a
//! container that ends within a second.
//!
//! It works only where the runner sees the engine's cgroups: the same host, the `cgroupfs`
//! driver. The engine makes the parent; after the start the runner looks for it
//! ([`UsageGroups::present`]), and when it is not there (the engine runs elsewhere, or this
//! process sees other cgroups) accounting is turned off for later containers and the caller
//! samples Docker's stats instead. The parent is removed with its container.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::cpu_group::{self, CGROUP_ROOT, Hierarchy};
use crate::engine::ResourceUsage;

/// The parent of the usage groups of containers outside any CPU group.
const USAGE_ROOT: &str = "stevedore-usage";
/// Usage groups under [`USAGE_ROOT`] older than this are what an earlier process left (its
/// containers' removal went with it) and are removed at start.
const LEFTOVER_AGE: Duration = Duration::from_secs(600);

/// The usage groups of one engine: on while the engine's cgroups are this host's.
#[derive(Debug)]
pub(crate) struct UsageGroups {
    hierarchy: Hierarchy,
    enabled: AtomicBool,
    /// Makes each group's name unique within this process; the process id and the start
    /// time make it unique between processes.
    next: AtomicU64,
    prefix: String,
}

// === impl UsageGroups ===

impl UsageGroups {
    /// Usage groups on `hierarchy`, when the engine's cgroup `driver` lets the runner read them
    /// and the hierarchy is mounted here; `None` otherwise. Removes the groups an earlier
    /// process left.
    pub(crate) async fn new(hierarchy: Hierarchy, driver: &str) -> Option<UsageGroups> {
        if driver != "cgroupfs" {
            tracing::debug!(driver, "no usage groups under this cgroup driver");
            return None;
        }
        let probe = match hierarchy {
            Hierarchy::V1 => Path::new(CGROUP_ROOT).join("memory"),
            Hierarchy::V2 => Path::new(CGROUP_ROOT).join("cgroup.controllers"),
        };
        if tokio::fs::metadata(&probe).await.is_err() {
            tracing::debug!(probe = %probe.display(), "no usage groups: the cgroups are not here");
            return None;
        }
        remove_leftovers(hierarchy).await;
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|since| since.as_millis())
            .unwrap_or(0);
        Some(UsageGroups {
            hierarchy,
            enabled: AtomicBool::new(true),
            next: AtomicU64::new(0),
            prefix: format!("usage-{}-{started:x}", std::process::id()),
        })
    }

    /// A new group's path for a container created in `cpu_group` (or in none), or `None`
    /// once accounting is off.
    pub(crate) fn allocate(&self, cpu_group: Option<&str>) -> Option<String> {
        if !self.enabled.load(Ordering::Relaxed) {
            return None;
        }
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let parent = cpu_group.unwrap_or(USAGE_ROOT);
        Some(format!("{parent}/{}-{number}", self.prefix))
    }

    /// Whether the group `path` is there, as it is once its container started on an engine
    /// whose cgroups this process sees. When it is not, accounting goes off for the
    /// containers created from now on.
    pub(crate) async fn present(&self, path: &str) -> bool {
        let present = tokio::fs::metadata(self.probe_dir(path))
            .await
            .is_ok_and(|metadata| metadata.is_dir());
        if !present && self.enabled.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                group = path,
                "a container's usage group is not on this machine (the engine's cgroups are \
                 elsewhere): usage is sampled from the engine's stats from now on"
            );
        }
        present
    }

    /// What the container of the group `path` used over its life, read once it stopped.
    /// `None` when the group cannot be read.
    pub(crate) async fn read(&self, path: &str) -> Option<Account> {
        let (path, hierarchy) = (path.to_owned(), self.hierarchy);
        let usage = tokio::task::spawn_blocking(move || read_now(&path, hierarchy))
            .await
            .ok()
            .flatten();
        if usage.is_none() {
            tracing::debug!("a usage group cannot be read");
        }
        usage
    }

    /// Removes the group `path`, once its container is gone (a group that still holds one
    /// stays, and its container's removal tries again).
    pub(crate) async fn remove(&self, path: &str) {
        cpu_group::remove_path(path, self.hierarchy).await;
    }

    /// The directory that shows whether the group exists.
    fn probe_dir(&self, path: &str) -> PathBuf {
        let root = Path::new(CGROUP_ROOT);
        match self.hierarchy {
            Hierarchy::V1 => root.join("memory").join(path),
            Hierarchy::V2 => root.join(path),
        }
    }
}

/// Removes the groups under [`USAGE_ROOT`] older than [`LEFTOVER_AGE`]: an earlier process's
/// (a group whose container still exists cannot be removed, and stays).
async fn remove_leftovers(hierarchy: Hierarchy) {
    let root = Path::new(CGROUP_ROOT);
    let parent = match hierarchy {
        Hierarchy::V1 => root.join("memory").join(USAGE_ROOT),
        Hierarchy::V2 => root.join(USAGE_ROOT),
    };
    let Ok(mut groups) = tokio::fs::read_dir(&parent).await else {
        return;
    };
    while let Ok(Some(group)) = groups.next_entry().await {
        let old = group
            .metadata()
            .await
            .ok()
            .and_then(|metadata| metadata.modified().ok())
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > LEFTOVER_AGE);
        if old && let Some(name) = group.file_name().to_str() {
            cpu_group::remove_path(&format!("{USAGE_ROOT}/{name}"), hierarchy).await;
        }
    }
}

/// What a usage group holds of its container's life once the container stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    pub(crate) usage: ResourceUsage,
    /// How many processes the kernel killed in the group for its memory limit: counted on
    /// cgroup v2 only (its `memory.events` counts a child's kills in every ancestor; v1
    /// counts them in the container's own group alone, which is gone once it stopped).
    pub(crate) oom_kills: Option<u64>,
}

impl Account {
    /// Whether the container was killed for exceeding its memory limit of `limit` bytes,
    /// as far as the group tells: on cgroup v2 its count of OOM kills; on v1, whether the
    /// group's peak reached the limit (less the charges the kernel may hold back per CPU),
    /// as it has for a container the kernel killed for its memory. `None` without a limit
    /// or a peak.
    pub(crate) fn oom_killed(&self, limit: Option<u64>) -> Option<bool> {
        if let Some(kills) = self.oom_kills {
            return Some(kills > 0);
        }
        let limit = limit.filter(|limit| *limit > 0)?;
        let peak = self.usage.peak_memory_bytes?;
        Some(peak >= limit.saturating_sub(OOM_PEAK_SLACK.max(limit / 64)))
    }
}

/// How far below its limit a group's recorded peak may stay when its container was killed
/// for memory: the kernel charges pages in per-CPU batches, so a charge can fail before the
/// counter shows the whole limit.
const OOM_PEAK_SLACK: u64 = 512 << 10;

/// [`UsageGroups::read`], on this thread.
fn read_now(path: &str, hierarchy: Hierarchy) -> Option<Account> {
    let root = Path::new(CGROUP_ROOT);
    let (cpu_total_ns, peak_memory_bytes, peak_pids, oom_kills) = match hierarchy {
        Hierarchy::V1 => (
            read_number(&root.join("cpuacct").join(path).join("cpuacct.usage")),
            read_number(
                &root
                    .join("memory")
                    .join(path)
                    .join("memory.max_usage_in_bytes"),
            ),
            read_number(&root.join("pids").join(path).join("pids.peak")),
            None,
        ),
        Hierarchy::V2 => {
            let group = root.join(path);
            let cpu_stat = std::fs::read_to_string(group.join("cpu.stat")).ok();
            (
                cpu_stat
                    .as_deref()
                    .and_then(usage_usec)
                    .map(|usec| usec.saturating_mul(1000)),
                read_number(&group.join("memory.peak")),
                read_number(&group.join("pids.peak")),
                std::fs::read_to_string(group.join("memory.events"))
                    .ok()
                    .as_deref()
                    .and_then(|events| event_count(events, "oom_kill")),
            )
        }
    };
    if cpu_total_ns.is_none() && peak_memory_bytes.is_none() {
        return None;
    }
    Some(Account {
        usage: ResourceUsage {
            peak_memory_bytes,
            cpu_total_ns,
            peak_pids,
            samples: 1,
        },
        oom_kills,
    })
}

/// The count of `event` in a cgroup v2 `memory.events`.
fn event_count(events: &str, event: &str) -> Option<u64> {
    events.lines().find_map(|line| {
        let (name, count) = line.split_once(' ')?;
        (name == event).then(|| count.trim().parse().ok()).flatten()
    })
}

/// A file holding one number.
fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `usage_usec` of a cgroup v2 `cpu.stat`.
fn usage_usec(cpu_stat: &str) -> Option<u64> {
    cpu_stat
        .lines()
        .find_map(|line| line.strip_prefix("usage_usec "))
        .and_then(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_stat_gives_its_usage() {
        let stat = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
        assert_eq!(usage_usec(stat), Some(1234));
        assert_eq!(usage_usec("user_usec 1\n"), None);
    }

    #[test]
    fn memory_events_give_the_oom_kills() {
        let events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(event_count(events, "oom_kill"), Some(1));
        assert_eq!(event_count(events, "oom"), Some(1));
        assert_eq!(event_count("max 3\n", "oom_kill"), None);
    }

    #[test]
    fn an_oom_kill_is_counted_on_v2_and_told_by_the_peak_on_v1() {
        let account = |peak: u64, oom_kills: Option<u64>| Account {
            usage: ResourceUsage {
                peak_memory_bytes: Some(peak),
                cpu_total_ns: Some(1),
                peak_pids: Some(1),
                samples: 1,
            },
            oom_kills,
        };
        let limit = Some(8 << 20);
        // v2 counts: the peak does not matter.
        assert_eq!(account(1 << 20, Some(1)).oom_killed(limit), Some(true));
        assert_eq!(account(8 << 20, Some(0)).oom_killed(limit), Some(false));
        // v1: a peak at the limit (or within the kernel's batch below it) is an OOM kill.
        assert_eq!(account(8_650_752, None).oom_killed(limit), Some(true));
        assert_eq!(
            account((8 << 20) - (256 << 10), None).oom_killed(limit),
            Some(true)
        );
        assert_eq!(account(4 << 20, None).oom_killed(limit), Some(false));
        // Without a limit v1 cannot tell.
        assert_eq!(account(8 << 20, None).oom_killed(None), None);
    }

    #[test]
    fn groups_are_unique_and_inside_the_cpu_group() {
        let groups = UsageGroups {
            hierarchy: Hierarchy::V1,
            enabled: AtomicBool::new(true),
            next: AtomicU64::new(0),
            prefix: "usage-1-a".to_owned(),
        };
        assert_eq!(
            groups.allocate(None).as_deref(),
            Some("stevedore-usage/usage-1-a-0")
        );
        assert_eq!(
            groups.allocate(Some("stevedore-r1")).as_deref(),
            Some("stevedore-r1/usage-1-a-1")
        );
        groups.enabled.store(false, Ordering::Relaxed);
        assert_eq!(groups.allocate(None), None);
    }
}
