//! A task container's own cgroup, made by stevedore and holding the task's limits: the OCI
//! runtime puts the container in a child of it, and it outlives the container, so the OOM
//! kills, CPU time and peak memory it counted are read exactly once the container stopped.
//!
//! ```text
//! task group: <CPU group or stevedore-oci>/<container id>   limits, counters; stevedore's
//! container:  <task group>/ctr                              the runtime's own (no limits)
//! cgroup v1:  /sys/fs/cgroup/{memory,cpu,cpuacct,pids}/<task group>
//!             memory.limit_in_bytes (+ memory.memsw.limit_in_bytes), cpu.cfs_quota_us,
//!             pids.max; read: memory.max_usage_in_bytes, memory.oom_control `oom_kill`,
//!             cpuacct.usage, pids.peak
//! cgroup v2:  /sys/fs/cgroup/<task group>
//!             memory.max, memory.swap.max = 0, cpu.max, pids.max; read: memory.peak,
//!             memory.events `oom_kill`, cpu.stat `usage_usec`, pids.peak
//! ```
//!
//! The limit sits on the task group, so the kernel's OOM killer acts for the task group. On
//! cgroup v2 the group's `memory.events` counts the kills of its children too, exactly. On
//! v1 the `oom_kill` of `memory.oom_control` counts only kills of processes in the group
//! itself, and the runtime's child (where the processes are) is gone once the container
//! stopped; but the group's OOM notification (an eventfd registered in its
//! `cgroup.event_control`, [`OomWatch`]) fires when the group itself runs out, and also when
//! the group is removed, so a firing counts only with the group's peak at its limit (less
//! what the kernel charges per CPU in batches). Without one (it could not be registered) a
//! container killed by SIGKILL whose group peaked at its limit was killed for its memory
//! ([`oom_killed`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::EventfdFlags;
use rustix::fs::{Mode, OFlags};

use crate::cpu_group::{CGROUP_ROOT, Hierarchy};
use crate::engine::ResourceSample;
use crate::error::EngineError;
use crate::usage_group::{Account, keyed_count, peak_at_limit, read_account, read_number};

/// The parent of the task groups of containers outside any CPU group.
pub(crate) const TASKS_ROOT: &str = "stevedore-oci";
/// The runtime's own group inside a task group.
pub(crate) const RUNTIME_CHILD: &str = "ctr";
/// The CFS period quotas are given in, microseconds (the kernel's default).
const PERIOD_US: u64 = 100_000;
/// The cgroup v1 controllers a task group is made in.
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];

/// The limits a task group holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) memory_bytes: Option<u64>,
    pub(crate) nano_cpus: Option<u64>,
    pub(crate) pids: Option<u64>,
}

/// One task's group: `path` relative to the hierarchy's root (to each controller's on v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskGroup {
    pub(crate) path: String,
    pub(crate) hierarchy: Hierarchy,
    root: PathBuf,
}

/// The OOM notification of a cgroup v1 task group: an eventfd the kernel counts up each
/// time the group runs out of memory (and once more when the group is removed: read it
/// before).
#[derive(Debug)]
pub(crate) struct OomWatch {
    events: OwnedFd,
    /// The group's `memory.oom_control`, open for as long as the registration lasts.
    _control: OwnedFd,
}

// === impl OomWatch ===

impl OomWatch {
    /// Whether the group ran out of memory since the watch began.
    pub(crate) fn fired(&self) -> bool {
        let mut count = [0u8; 8];
        matches!(rustix::io::read(&self.events, &mut count), Ok(8)) && u64::from_ne_bytes(count) > 0
    }
}

/// Whether the kernel killed a task group's container for its memory limit of `limit`
/// bytes, the container having ended with `exit_code`: counted on v2 and, as the task group
/// holds the limit, on v1 too; on v1 also told by the group's OOM notification (`oom_event`,
/// when it was watched: a v1 group does not count kills in the runtime's child group), or
/// else by a SIGKILL (137), either with the group's peak at the limit.
pub(crate) fn oom_killed(
    account: &Account,
    limit: Option<u64>,
    exit_code: i64,
    oom_event: Option<bool>,
) -> bool {
    if account.oom_kills.is_some_and(|kills| kills > 0) {
        return true;
    }
    if account.hierarchy == Hierarchy::V2 {
        return false;
    }
    let peak_at_limit = limit
        .zip(account.usage.peak_memory_bytes)
        .is_some_and(|(limit, peak)| peak_at_limit(peak, limit));
    match oom_event {
        // The notification also fires when the group is removed, and a group that ran out
        // reached its limit: both, or it was no OOM.
        Some(fired) => fired && peak_at_limit,
        None => exit_code == 137 && peak_at_limit,
    }
}

/// Which hierarchy this host's controllers are on: v2 when the unified hierarchy is the root
/// (`cgroup.controllers` at the root), v1 otherwise (hybrid hosts count as v1: their
/// memory, cpu and pids controllers are there).
pub(crate) fn detect_hierarchy() -> Hierarchy {
    if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
        Hierarchy::V2
    } else {
        Hierarchy::V1
    }
}

/// Whether the limits can be enforced here: (memory, swap, cpu quota, pids).
pub(crate) fn enforceable(hierarchy: Hierarchy) -> (bool, bool, bool, bool) {
    enforceable_under(Path::new(CGROUP_ROOT), hierarchy)
}

fn enforceable_under(root: &Path, hierarchy: Hierarchy) -> (bool, bool, bool, bool) {
    match hierarchy {
        Hierarchy::V1 => (
            root.join("memory/memory.limit_in_bytes").exists(),
            root.join("memory/memory.memsw.limit_in_bytes").exists(),
            root.join("cpu/cpu.cfs_quota_us").exists(),
            root.join("pids").is_dir(),
        ),
        Hierarchy::V2 => {
            let controllers =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let has = |name: &str| controllers.split_whitespace().any(|c| c == name);
            // Swap is capped with memory.swap.max, there whenever memory is.
            (has("memory"), has("memory"), has("cpu"), has("pids"))
        }
    }
}

// === impl TaskGroup ===

impl TaskGroup {
    /// The group of container `id`, inside the CPU group `cpu_group` when there is one.
    pub(crate) fn new(id: &str, cpu_group: Option<&str>, hierarchy: Hierarchy) -> Self {
        Self::under(Path::new(CGROUP_ROOT), id, cpu_group, hierarchy)
    }

    fn under(root: &Path, id: &str, cpu_group: Option<&str>, hierarchy: Hierarchy) -> Self {
        TaskGroup {
            path: format!("{}/{id}", cpu_group.unwrap_or(TASKS_ROOT)),
            hierarchy,
            root: root.to_owned(),
        }
    }

    /// The group of an earlier container, from its recorded path.
    pub(crate) fn at(path: String, hierarchy: Hierarchy) -> Self {
        TaskGroup {
            path,
            hierarchy,
            root: PathBuf::from(CGROUP_ROOT),
        }
    }

    /// What the runtime's config names as `cgroupsPath`: the runtime's own group inside.
    pub(crate) fn runtime_path(&self) -> String {
        format!("/{}/{RUNTIME_CHILD}", self.path)
    }

    /// Makes the group with `limits`. Blocking file IO.
    pub(crate) fn create(&self, limits: &Limits) -> Result<(), EngineError> {
        match self.hierarchy {
            Hierarchy::V1 => self.create_v1(limits),
            Hierarchy::V2 => self.create_v2(limits),
        }
    }

    fn create_v1(&self, limits: &Limits) -> Result<(), EngineError> {
        for controller in V1_CONTROLLERS {
            let group = self.root.join(controller).join(&self.path);
            std::fs::create_dir_all(&group).map_err(|error| failed(&group, &error))?;
        }
        let memory = self.root.join("memory").join(&self.path);
        if let Some(bytes) = limits.memory_bytes {
            write(&memory.join("memory.limit_in_bytes"), &bytes.to_string())?;
            // Memory+swap at the same limit: the task never swaps past it. Absent without
            // swap accounting, where the memory limit alone holds.
            let memsw = memory.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &bytes.to_string())?;
            }
        }
        if let Some(nano_cpus) = limits.nano_cpus {
            let cpu = self.root.join("cpu").join(&self.path);
            write(&cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(
                &cpu.join("cpu.cfs_quota_us"),
                &quota_us(nano_cpus).to_string(),
            )?;
        }
        if let Some(pids) = limits.pids {
            let group = self.root.join("pids").join(&self.path);
            write(&group.join("pids.max"), &pids.to_string())?;
        }
        Ok(())
    }

    fn create_v2(&self, limits: &Limits) -> Result<(), EngineError> {
        // Every ancestor hands the controllers down (the root and a CPU group usually do
        // already); one the kernel lacks is left out rather than failing the task.
        let mut ancestor = self.root.clone();
        for component in self.path.split('/') {
            for controller in ["+memory", "+pids", "+cpu"] {
                let _ = std::fs::write(ancestor.join("cgroup.subtree_control"), controller);
            }
            ancestor.push(component);
            match std::fs::create_dir(&ancestor) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(failed(&ancestor, &error)),
            }
        }
        let group = &ancestor;
        if let Some(bytes) = limits.memory_bytes {
            write(&group.join("memory.max"), &bytes.to_string())?;
            let swap = group.join("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
        }
        if let Some(nano_cpus) = limits.nano_cpus {
            write(
                &group.join("cpu.max"),
                &format!("{} {PERIOD_US}", quota_us(nano_cpus)),
            )?;
        }
        if let Some(pids) = limits.pids {
            write(&group.join("pids.max"), &pids.to_string())?;
        }
        // The runtime's child gets the controllers too, so it can be made below.
        for controller in ["+memory", "+pids", "+cpu"] {
            let _ = std::fs::write(group.join("cgroup.subtree_control"), controller);
        }
        Ok(())
    }

    /// Registers for the group's OOM notification, on cgroup v1 (v2 counts its kills in
    /// `memory.events`). `None` when the kernel does not offer it. Blocking.
    pub(crate) fn watch_oom(&self) -> Option<OomWatch> {
        if self.hierarchy != Hierarchy::V1 {
            return None;
        }
        let memory = self.root.join("memory").join(&self.path);
        let watch = || -> std::io::Result<OomWatch> {
            let control = rustix::fs::open(
                memory.join("memory.oom_control"),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let events = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
            std::fs::write(
                memory.join("cgroup.event_control"),
                format!("{} {}", events.as_raw_fd(), control.as_raw_fd()),
            )?;
            Ok(OomWatch {
                events,
                _control: control,
            })
        };
        match watch() {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::debug!(group = %memory.display(), %error, "no OOM notification");
                None
            }
        }
    }

    /// What the group counted: once its container stopped, its whole life. Blocking file IO.
    pub(crate) fn account(&self) -> Option<Account> {
        read_account(&self.root, &self.path, self.hierarchy)
    }

    /// One sample of the group now. Blocking file IO.
    pub(crate) fn sample(&self) -> Option<ResourceSample> {
        match self.hierarchy {
            Hierarchy::V1 => Some(ResourceSample {
                memory_bytes: read_number(&self.v1("memory", "memory.usage_in_bytes"))?,
                memory_peak_bytes: read_number(&self.v1("memory", "memory.max_usage_in_bytes")),
                cpu_total_ns: read_number(&self.v1("cpuacct", "cpuacct.usage")).unwrap_or(0),
                pids: read_number(&self.v1("pids", "pids.current")),
            }),
            Hierarchy::V2 => Some(ResourceSample {
                memory_bytes: read_number(&self.v2("memory.current"))?,
                memory_peak_bytes: read_number(&self.v2("memory.peak")),
                cpu_total_ns: std::fs::read_to_string(self.v2("cpu.stat"))
                    .ok()
                    .as_deref()
                    .and_then(|stat| keyed_count(stat, "usage_usec"))
                    .map_or(0, |usec| usec.saturating_mul(1000)),
                pids: read_number(&self.v2("pids.current")),
            }),
        }
    }

    /// The group's directories, the runtime's child first: every controller's on v1.
    pub(crate) fn directories(&self) -> Vec<PathBuf> {
        let bases: Vec<PathBuf> = match self.hierarchy {
            Hierarchy::V2 => vec![self.root.join(&self.path)],
            // Every controller's, not only the four with limits: the runtime makes its own
            // group (and so this one as its parent) in all of them.
            Hierarchy::V1 => std::fs::read_dir(&self.root)
                .map(|controllers| {
                    controllers
                        .flatten()
                        .map(|controller| controller.path().join(&self.path))
                        .collect()
                })
                .unwrap_or_default(),
        };
        bases
            .iter()
            .map(|base| base.join(RUNTIME_CHILD))
            .chain(bases.iter().cloned())
            .collect()
    }

    /// Removes the group (and the runtime's child, if the runtime left it). A group whose
    /// last processes are still being torn down by the kernel is busy for a moment: tried
    /// again for up to a second. Blocking. Whether it is gone.
    pub(crate) fn remove(&self) -> bool {
        let mut gone = true;
        for directory in self.directories() {
            let mut attempts = 0;
            loop {
                match std::fs::remove_dir(&directory) {
                    Ok(()) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                    Err(error) if attempts < 100 => {
                        tracing::trace!(group = %directory.display(), %error, "the group is busy");
                        attempts += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(error) => {
                        tracing::warn!(group = %directory.display(), %error, "the task's cgroup stays");
                        gone = false;
                        break;
                    }
                }
            }
        }
        gone
    }

    fn v1(&self, controller: &str, file: &str) -> PathBuf {
        self.root.join(controller).join(&self.path).join(file)
    }

    fn v2(&self, file: &str) -> PathBuf {
        self.root.join(&self.path).join(file)
    }
}

/// The quota per period for `nano_cpus`, at least the kernel's minimum of 1 ms.
fn quota_us(nano_cpus: u64) -> u64 {
    (u128::from(nano_cpus) * u128::from(PERIOD_US) / 1_000_000_000)
        .try_into()
        .unwrap_or(u64::MAX)
        .max(1_000)
}

fn write(path: &Path, value: &str) -> Result<(), EngineError> {
    std::fs::write(path, value).map_err(|error| EngineError::LimitUnenforceable {
        capability: "the task's limits".to_owned(),
        hint: format!(
            "cannot write {value:?} to {}: {error} (the runner must run as root with the \
             host's cgroups)",
            path.display()
        ),
    })
}

fn failed(path: &Path, error: &std::io::Error) -> EngineError {
    EngineError::Failed {
        message: format!("cannot make the task's cgroup {}: {error}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ResourceUsage;

    /// A fake cgroup v2 root: the kernel's files are plain files here.
    fn v2_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpu memory pids io\n",
        )
        .unwrap_or_else(|error| panic!("{error}"));
        root
    }

    #[test]
    fn a_v2_group_holds_the_limits_and_hands_the_controllers_down() {
        let root = v2_root();
        let group = TaskGroup::under(root.path(), "abc", Some("stevedore-r1"), Hierarchy::V2);
        assert_eq!(group.runtime_path(), "/stevedore-r1/abc/ctr");
        // The kernel makes the interface files; here they are made for the writes to land.
        let dir = root.path().join("stevedore-r1/abc");
        std::fs::create_dir_all(&dir).unwrap_or_else(|error| panic!("{error}"));
        std::fs::write(dir.join("memory.swap.max"), "max").unwrap_or_else(|e| panic!("{e}"));
        group
            .create(&Limits {
                memory_bytes: Some(64 << 20),
                nano_cpus: Some(1_500_000_000),
                pids: Some(64),
            })
            .unwrap_or_else(|error| panic!("{error}"));
        let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("cpu.max"), "150000 100000");
        assert_eq!(read("pids.max"), "64");
        assert_eq!(read("cgroup.subtree_control"), "+cpu");
        assert_eq!(
            std::fs::read_to_string(root.path().join("stevedore-r1/cgroup.subtree_control"))
                .unwrap_or_default(),
            "+cpu"
        );
        assert_eq!(
            enforceable_under(root.path(), Hierarchy::V2),
            (true, true, true, true)
        );
    }

    #[test]
    fn a_v2_group_is_read_from_its_own_counters() {
        let root = v2_root();
        let group = TaskGroup::under(root.path(), "abc", None, Hierarchy::V2);
        let dir = root.path().join(TASKS_ROOT).join("abc");
        std::fs::create_dir_all(&dir).unwrap_or_else(|error| panic!("{error}"));
        for (file, contents) in [
            (
                "cpu.stat",
                "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n",
            ),
            ("memory.peak", "9000000\n"),
            ("memory.current", "4096\n"),
            ("pids.peak", "3\n"),
            ("pids.current", "1\n"),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n",
            ),
        ] {
            std::fs::write(dir.join(file), contents).unwrap_or_else(|error| panic!("{error}"));
        }
        assert_eq!(
            group.account(),
            Some(Account {
                usage: ResourceUsage {
                    peak_memory_bytes: Some(9_000_000),
                    cpu_total_ns: Some(1_234_000),
                    peak_pids: Some(3),
                    samples: 1,
                },
                oom_kills: Some(1),
                hierarchy: Hierarchy::V2,
            })
        );
        assert_eq!(
            group.sample(),
            Some(ResourceSample {
                memory_bytes: 4096,
                memory_peak_bytes: Some(9_000_000),
                cpu_total_ns: 1_234_000,
                pids: Some(1),
            })
        );
        assert_eq!(
            group.directories(),
            vec![dir.join(RUNTIME_CHILD), dir.clone()]
        );
        std::fs::remove_dir_all(&dir).unwrap_or_else(|error| panic!("{error}"));
        assert!(group.remove(), "a group that is gone is removed");
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
        assert!(oom_killed(
            &account(1 << 20, Some(1), Hierarchy::V2),
            limit,
            137,
            None
        ));
        assert!(!oom_killed(
            &account(8 << 20, Some(0), Hierarchy::V2),
            limit,
            137,
            None
        ));
        // v1 with the notification watched: it tells, with the peak at the limit (a child
        // process killed while the container's own ended well counts)...
        assert!(oom_killed(
            &account(8 << 20, Some(0), Hierarchy::V1),
            limit,
            0,
            Some(true)
        ));
        // ...but not alone: removing a group fires it too.
        assert!(!oom_killed(
            &account(1 << 20, Some(0), Hierarchy::V1),
            limit,
            0,
            Some(true)
        ));
        assert!(!oom_killed(
            &account(8 << 20, Some(0), Hierarchy::V1),
            limit,
            137,
            Some(false)
        ));
        // v1 without: a SIGKILL with the peak at the limit (or within the kernel's batch
        // below it).
        let v1 = |peak| account(peak, Some(0), Hierarchy::V1);
        assert!(oom_killed(&v1(8 << 20), limit, 137, None));
        assert!(oom_killed(&v1((8 << 20) - (256 << 10)), limit, 137, None));
        assert!(!oom_killed(&v1(8 << 20), limit, 1, None));
        assert!(!oom_killed(&v1(4 << 20), limit, 137, None));
        assert!(!oom_killed(&v1(8 << 20), None, 137, None));
    }

    #[test]
    fn quotas_are_per_period_with_a_floor() {
        assert_eq!(quota_us(1_500_000_000), 150_000);
        assert_eq!(quota_us(1), 1_000);
    }
}
