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
        let usage = tokio::task::spawn_blocking(move || {
            read_account(Path::new(CGROUP_ROOT), &path, hierarchy)
        })
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

/// What a cgroup holds of its container's life once the container stopped: read alike for
/// the Docker path's usage groups and the OCI engine's task groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Account {
    pub(crate) usage: ResourceUsage,
    /// How many processes the kernel killed in the group for its memory limit: on cgroup v2
    /// its `memory.events`, which counts a child's kills in every ancestor; on v1 its
    /// `memory.oom_control`, which counts only kills in the group itself (for the Docker
    /// path's usage group, which holds no limit, never any).
    pub(crate) oom_kills: Option<u64>,
    pub(crate) hierarchy: Hierarchy,
}

impl Account {
    /// Whether the Docker container of this usage group was killed for exceeding its memory
    /// limit of `limit` bytes, as far as the group tells: on cgroup v2 its count of OOM
    /// kills; on v1, where the kills are counted in the container's own group (gone by now),
    /// whether the group's peak reached the limit ([`peak_at_limit`]). `None` without a
    /// count, a limit or a peak.
    pub(crate) fn oom_killed(&self, limit: Option<u64>) -> Option<bool> {
        match self.hierarchy {
            Hierarchy::V2 => self.oom_kills.map(|kills| kills > 0),
            Hierarchy::V1 => Some(peak_at_limit(self.usage.peak_memory_bytes?, limit?)),
        }
    }
}

/// Whether a group's recorded `peak` reached its memory `limit`, as it has for a container
/// the kernel killed for its memory: the kernel charges pages in per-CPU batches, so a
/// charge can fail before the counter shows the whole limit.
pub(crate) fn peak_at_limit(peak: u64, limit: u64) -> bool {
    limit > 0 && peak >= limit.saturating_sub(OOM_PEAK_SLACK.max(limit / 64))
}

/// How far below its limit a group's recorded peak may stay when its container was killed
/// for memory ([`peak_at_limit`]).
const OOM_PEAK_SLACK: u64 = 512 << 10;

/// What the cgroup `path` under the hierarchy mounted at `root` counted: CPU time, peak
/// memory and pids, OOM kills (see [`Account`]). `None` when neither CPU time nor peak memory
/// can be read. Blocking file IO.
pub(crate) fn read_account(root: &Path, path: &str, hierarchy: Hierarchy) -> Option<Account> {
    let text = |file: PathBuf| std::fs::read_to_string(file).ok();
    let (cpu_total_ns, peak_memory_bytes, peak_pids, oom_kills) = match hierarchy {
        Hierarchy::V1 => {
            let v1 = |controller: &str, file: &str| root.join(controller).join(path).join(file);
            (
                read_number(&v1("cpuacct", "cpuacct.usage")),
                read_number(&v1("memory", "memory.max_usage_in_bytes")),
                read_number(&v1("pids", "pids.peak")),
                text(v1("memory", "memory.oom_control"))
                    .and_then(|control| keyed_count(&control, "oom_kill")),
            )
        }
        Hierarchy::V2 => {
            let group = root.join(path);
            (
                text(group.join("cpu.stat"))
                    .and_then(|stat| keyed_count(&stat, "usage_usec"))
                    .map(|usec| usec.saturating_mul(1000)),
                read_number(&group.join("memory.peak")),
                read_number(&group.join("pids.peak")),
                text(group.join("memory.events"))
                    .and_then(|events| keyed_count(&events, "oom_kill")),
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
        hierarchy,
    })
}

/// The number after `key` in a file of `key value` lines (`memory.events`, `cpu.stat`, v1
/// `memory.oom_control`).
pub(crate) fn keyed_count(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, count) = line.split_once(' ')?;
        (name == key).then(|| count.trim().parse().ok()).flatten()
    })
}

/// A file holding one number.
pub(crate) fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_give_their_counts() {
        let events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_count(events, "oom_kill"), Some(1));
        assert_eq!(keyed_count(events, "oom"), Some(1));
        assert_eq!(keyed_count("max 3\n", "oom_kill"), None);
        let stat = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
        assert_eq!(keyed_count(stat, "usage_usec"), Some(1234));
    }

    #[test]
    fn a_group_reads_alike_on_v1_and_v2() {
        let root = tempfile::tempdir().unwrap();
        let write = |file: &str, text: &str| {
            let file = root.path().join(file);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
        };
        write("cpuacct/g/cpuacct.usage", "5000\n");
        write("memory/g/memory.max_usage_in_bytes", "8650752\n");
        write(
            "memory/g/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        write("pids/g/pids.peak", "3\n");
        let v1 = read_account(root.path(), "g", Hierarchy::V1).unwrap();
        assert_eq!(
            (
                v1.usage.cpu_total_ns,
                v1.usage.peak_memory_bytes,
                v1.usage.peak_pids
            ),
            (Some(5000), Some(8_650_752), Some(3))
        );
        assert_eq!(v1.oom_kills, Some(2));
        write("h/cpu.stat", "usage_usec 7\nuser_usec 5\n");
        write("h/memory.peak", "4096\n");
        write("h/memory.events", "oom 1\noom_kill 1\n");
        let v2 = read_account(root.path(), "h", Hierarchy::V2).unwrap();
        assert_eq!(
            (
                v2.usage.cpu_total_ns,
                v2.usage.peak_memory_bytes,
                v2.usage.peak_pids
            ),
            (Some(7000), Some(4096), None)
        );
        assert_eq!(v2.oom_kills, Some(1));
        assert_eq!(read_account(root.path(), "none", Hierarchy::V2), None);
    }

    #[test]
    fn an_oom_kill_is_counted_on_v2_and_told_by_the_peak_on_v1() {
        let account = |peak: u64, oom_kills: Option<u64>, hierarchy| Account {
            usage: ResourceUsage {
                peak_memory_bytes: Some(peak),
                cpu_total_ns: Some(1),
                peak_pids: Some(1),
                samples: 1,
            },
            oom_kills,
            hierarchy,
        };
        let limit = Some(8 << 20);
        // v2 counts: the peak does not matter.
        let v2 = Hierarchy::V2;
        assert_eq!(account(1 << 20, Some(1), v2).oom_killed(limit), Some(true));
        assert_eq!(account(8 << 20, Some(0), v2).oom_killed(limit), Some(false));
        // v1: a peak at the limit (or within the kernel's batch below it) is an OOM kill,
        // whatever the usage group's own (always zero) count says.
        let v1 = Hierarchy::V1;
        assert_eq!(
            account(8_650_752, Some(0), v1).oom_killed(limit),
            Some(true)
        );
        assert_eq!(
            account((8 << 20) - (256 << 10), None, v1).oom_killed(limit),
            Some(true)
        );
        assert_eq!(account(4 << 20, Some(0), v1).oom_killed(limit), Some(false));
        // Without a limit v1 cannot tell.
        assert_eq!(account(8 << 20, None, v1).oom_killed(None), None);
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
