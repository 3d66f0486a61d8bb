//! A CPU group of task containers, for the Docker implementation: a cgroup of stevedore's own
//! on the engine's host whose CPU quota caps every container created under it together
//! (Docker's `CgroupParent`), so that what runs beside the tasks (the API and the store of
//! `serve`, the engine itself) keeps the rest of the machine however many tasks are busy.
//!
//! ```text
//! cgroup v1 (cgroupfs driver): /sys/fs/cgroup/cpu/<group>/cpu.cfs_quota_us = cpus × cpu.cfs_period_us
//! cgroup v2 (cgroupfs driver): /sys/fs/cgroup/<group>/cpu.max = "<quota> <period>"
//!                              (+cpu enabled in the root's and the group's subtree_control)
//! containers:                  /<group>/<container id>, created by the engine under it
//! ```
//!
//! Each container keeps its own limit (`NanoCpus`) inside the group's. The group is a
//! directory of the host's cgroup file system, so it works only on the engine's own host, as
//! root, with the `cgroupfs` driver (under systemd's driver cgroups are systemd's to make);
//! anything else is [`EngineError::LimitUnenforceable`], never a silent success.

use std::path::{Path, PathBuf};

use crate::error::EngineError;

/// What the errors call the missing capability.
const CAPABILITY: &str = "a CPU reserve (a capped cgroup for task containers)";
/// Where the host's cgroup file systems are mounted.
pub(crate) const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The CFS period the quota is given in, microseconds (the kernel's default).
const PERIOD_US: u64 = 100_000;

/// Which cgroup hierarchy the engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hierarchy {
    V1,
    V2,
}

/// Makes sure the group `name` exists on this host with its CPU quota at `nano_cpus`
/// (billionths of a CPU); its containers get `/<name>` as their `CgroupParent`.
pub(crate) async fn ensure(
    name: &str,
    nano_cpus: u64,
    hierarchy: Hierarchy,
    driver: &str,
) -> Result<(), EngineError> {
    check_name(name)?;
    if driver != "cgroupfs" {
        return Err(unenforceable(format!(
            "the engine's cgroup driver is {driver:?}; only the cgroupfs driver lets the runner \
             make a group for task containers"
        )));
    }
    let root = Path::new(CGROUP_ROOT);
    let quota = quota_us(nano_cpus);
    match hierarchy {
        Hierarchy::V1 => {
            let controller = root.join("cpu");
            require_dir(&controller).await?;
            let group = controller.join(name);
            create_dir(&group).await?;
            write(&group.join("cpu.cfs_period_us"), &PERIOD_US.to_string()).await?;
            write(&group.join("cpu.cfs_quota_us"), &quota.to_string()).await?;
        }
        Hierarchy::V2 => {
            require_dir(root).await?;
            // The root hands the cpu controller down (systems usually do already).
            write(&root.join("cgroup.subtree_control"), "+cpu").await?;
            let group = root.join(name);
            create_dir(&group).await?;
            write(&group.join("cpu.max"), &format!("{quota} {PERIOD_US}")).await?;
            // Containers below get the controllers the engine limits them with; the ones
            // the kernel lacks are left out rather than failing the whole group.
            for controller in ["+cpu", "+memory", "+pids", "+io", "+cpuset"] {
                let _ = tokio::fs::write(group.join("cgroup.subtree_control"), controller).await;
            }
        }
    }
    tracing::info!(
        group = name,
        cpus = nano_cpus as f64 / 1e9,
        ?hierarchy,
        "task containers share a capped CPU group"
    );
    Ok(())
}

/// Removes the group `name` on this host when it is empty (a cgroup with tasks or children
/// cannot be removed, and stays), after the usage groups (`usage_group`) its containers'
/// removals left, if any.
pub(crate) async fn remove(name: &str, hierarchy: Hierarchy) -> Result<(), EngineError> {
    check_name(name)?;
    let root = Path::new(CGROUP_ROOT);
    let listed = match hierarchy {
        Hierarchy::V1 => root.join("memory").join(name),
        Hierarchy::V2 => root.join(name),
    };
    if let Ok(mut children) = tokio::fs::read_dir(&listed).await {
        while let Ok(Some(child)) = children.next_entry().await {
            if child.file_type().await.is_ok_and(|kind| kind.is_dir())
                && let Some(child) = child.file_name().to_str()
            {
                remove_path(&format!("{name}/{child}"), hierarchy).await;
            }
        }
    }
    remove_path(name, hierarchy).await;
    Ok(())
}

/// Removes the cgroup at `path` (relative to the hierarchy's root) on this host when it is
/// empty. On cgroup v1 the engine made its directory under every controller (memory, pids,
/// ...), not only one: each goes.
pub(crate) async fn remove_path(path: &str, hierarchy: Hierarchy) {
    let path = path.to_owned();
    // One blocking task for the whole walk: a dozen directories on cgroup v1.
    let removed = tokio::task::spawn_blocking(move || remove_path_now(&path, hierarchy)).await;
    if let Err(error) = removed {
        tracing::debug!(%error, "removing a cgroup stopped");
    }
}

/// [`remove_path`], on this thread.
fn remove_path_now(path: &str, hierarchy: Hierarchy) {
    let root = Path::new(CGROUP_ROOT);
    let groups = match hierarchy {
        Hierarchy::V2 => vec![root.join(path)],
        Hierarchy::V1 => std::fs::read_dir(root)
            .map(|controllers| {
                controllers
                    .flatten()
                    .map(|controller| controller.path().join(path))
                    .collect()
            })
            .unwrap_or_default(),
    };
    for group in groups {
        match std::fs::remove_dir(&group) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => tracing::debug!(group = %group.display(), %error, "the group stays"),
        }
    }
}

/// The quota per period for `nano_cpus`, at least the kernel's minimum of 1 ms.
fn quota_us(nano_cpus: u64) -> u64 {
    (u128::from(nano_cpus) * u128::from(PERIOD_US) / 1_000_000_000)
        .try_into()
        .unwrap_or(u64::MAX)
        .max(1_000)
}

/// A group name is one path component of plain characters.
pub(crate) fn check_name(name: &str) -> Result<(), EngineError> {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if plain {
        Ok(())
    } else {
        Err(EngineError::invalid_spec(format!(
            "the CPU group name {name:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

async fn require_dir(path: &Path) -> Result<(), EngineError> {
    if tokio::fs::metadata(path).await.is_ok_and(|m| m.is_dir()) {
        Ok(())
    } else {
        Err(unenforceable(format!(
            "{} is not on this machine: the engine runs elsewhere, or this process runs in a \
             container without the host's cgroups; run the runner on the engine's host as root",
            path.display()
        )))
    }
}

async fn create_dir(path: &PathBuf) -> Result<(), EngineError> {
    match tokio::fs::create_dir(path).await {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(unenforceable(format!(
            "cannot create {}: {error} (the runner must run as root on the engine's host)",
            path.display()
        ))),
    }
}

async fn write(path: &Path, value: &str) -> Result<(), EngineError> {
    tokio::fs::write(path, value).await.map_err(|error| {
        unenforceable(format!(
            "cannot write {value:?} to {}: {error}",
            path.display()
        ))
    })
}

fn unenforceable(hint: String) -> EngineError {
    EngineError::LimitUnenforceable {
        capability: CAPABILITY.to_owned(),
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_are_per_period_with_a_floor() {
        assert_eq!(quota_us(1_500_000_000), 150_000);
        assert_eq!(quota_us(1), 1_000);
        assert_eq!(quota_us(16_000_000_000), 1_600_000);
    }

    #[test]
    fn names_are_one_plain_component() {
        assert!(check_name("stevedore-embedded").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "sp ace"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
