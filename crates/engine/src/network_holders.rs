//! Docker task containers on a task network without a network namespace of their own: each
//! joins a running *holder* container's (`NetworkMode: container:<holder>`), one task per
//! holder at a time, the way the OCI runtime takes a prepared namespace from its pool.
//!
//! Joining a container already on the network spares the engine the part of a container's
//! life that costs it most after the container itself: a namespace, a veth, an address, the
//! embedded DNS server's rules, and their teardown. Measured with a bare Engine API loop on 2
//! cores (Docker 20.10, busybox `true`): 352 to 392 ms of the machine's CPU per container on
//! the task network, 279 ms with network `none`, 120 to 125 ms joined to a holder.
//!
//! A holder is a container of its own image (one static program that sleeps, imported from
//! this module: no registry, no other image), on the task's network, with every capability
//! dropped, a read-only root, one process and a few MiB. It carries the labels of the task it
//! was made for except the task's own ([`LABEL_TASK`]), so the runner's reapers remove it with
//! the runner's other containers: at start-up, at shutdown, and when the runner is gone. Tasks
//! join only holders with their labels, the project's ([`crate::LABEL_PROJECT`]) among them:
//! a holder serves one project's tasks, never another tenant's.
//!
//! What a task could leave in a namespace it shares with the next one of its project, and why
//! none of it reaches that task (what the kernel keeps of closed connections for a while,
//! such as sockets in `TIME_WAIT` listed in `/proc/net/tcp`, stays within the project):
//!
//! - processes and sockets: the task's container is removed before its holder is lent again,
//!   and every process of it dies with its PID namespace, its sockets with them;
//! - addresses, routes, firewall rules, sysctls: changing them needs `NET_ADMIN`, which a task
//!   given it (or `SYS_ADMIN`) never gets a holder ([`NetworkHolders::key_for`]);
//! - connection tracking: the host's entries from and to the holder's address, and the
//!   namespace's own table (the embedded DNS server's translation), are deleted before the
//!   holder is lent again;
//! - `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname`: the engine would give a task the
//!   holder's own files, writable; the task gets them mounted read-only instead.
//!
//! The task's host name is its holder's (the engine refuses another with a joined network).
//!
//! Holders are used only where they can be watched from here: the engine on this machine (a
//! holder's process visible in `/proc`, checked when it starts) and the `conntrack` tool
//! installed. Otherwise, or under an engine that refused the first holder, every task gets a
//! network namespace of its own as before, said once. A holder found dead when lent (the
//! engine restarted without live restore, someone removed it) is replaced.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::firewall;
use crate::spec::{ContainerSpec, LABEL_TASK};

/// The image holders run, built here ([`holder_rootfs_tar`] of [`holder_program`]).
pub(crate) const HOLDER_IMAGE: &str = "stevedore/network-holder:1";
/// The label every holder carries, with its network's name.
pub const LABEL_NETWORK_HOLDER: &str = "stevedore.network-holder";
/// The holder's program, the only file of its image.
pub(crate) const HOLDER_PROGRAM: &str = "/network-holder";
/// The memory a holder may use: its program touches a page or two.
pub(crate) const HOLDER_MEMORY_BYTES: i64 = 8 << 20;
/// How many holders of one network and labels wait to be lent; more are removed when given
/// back. A runner needs one per slot, plus the task it prepares ahead.
const IDLE_PER_KEY: usize = 16;
/// How many holders of an engine wait to be lent, all networks and projects together.
const IDLE_IN_ALL: usize = 64;
/// The files the engine shares between a joined container and its holder, mounted read-only
/// into the task.
pub(crate) const SHARED_FILES: [&str; 3] = ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"];
/// Capabilities that let a task change its network namespace: such a task gets one of its own.
const NAMESPACE_CHANGING_CAPABILITIES: [&str; 3] = ["NET_ADMIN", "SYS_ADMIN", "ALL"];

const UNTRIED: u8 = 0;
const WORKS: u8 = 1;
const OFF: u8 = 2;

/// The holders of one engine, by network and labels, and which task container has which.
#[derive(Debug)]
pub(crate) struct NetworkHolders {
    state: AtomicU8,
    /// The `conntrack` tool, found when the engine was made.
    conntrack: Option<PathBuf>,
    lent: Mutex<Lent>,
    /// One holder image import at a time.
    pub(crate) image_guard: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Lent {
    idle: HashMap<HolderKey, Vec<Holder>>,
    /// By the task container's id.
    lent: HashMap<String, Holder>,
}

/// Which holders a task may join: those on its network, carrying its labels but the task's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct HolderKey {
    pub(crate) network: String,
    pub(crate) labels: BTreeMap<String, String>,
}

/// A running holder container, as it was inspected after its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) id: String,
    pub(crate) key: HolderKey,
    /// Its process, on this machine.
    pub(crate) pid: u32,
    /// Its address on the network.
    pub(crate) address: Option<Ipv4Addr>,
    /// The engine's files of it, in [`SHARED_FILES`]' order: bind mounted into a task.
    pub(crate) shared_files: [String; 3],
}

/// Why no holder was lent.
#[derive(Debug)]
pub(crate) enum NoHolder {
    /// Holders cannot work with this engine from here: every task gets its own namespace.
    Unusable(String),
    /// This one could not be made (an engine error): this task gets its own namespace.
    Failed(String),
    /// Not for this task (its network is missing): its own create says why.
    NotNow(String),
}

// === impl NetworkHolders ===

impl NetworkHolders {
    /// Tried at the first task on a network.
    pub(crate) fn new() -> Self {
        NetworkHolders {
            state: AtomicU8::new(UNTRIED),
            conntrack: firewall::find_program("conntrack"),
            lent: Mutex::default(),
            image_guard: tokio::sync::Mutex::new(()),
        }
    }

    /// Never tried: every task gets a network namespace of its own.
    pub(crate) fn off() -> Self {
        NetworkHolders {
            state: AtomicU8::new(OFF),
            ..NetworkHolders::new()
        }
    }

    fn lent(&self) -> MutexGuard<'_, Lent> {
        self.lent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether tasks may join holders (not yet refused).
    pub(crate) fn worth_trying(&self) -> bool {
        self.state.load(Ordering::Relaxed) != OFF
    }

    /// The `conntrack` tool, or why holders cannot be used without it.
    pub(crate) fn conntrack(&self) -> Result<PathBuf, NoHolder> {
        self.conntrack.clone().ok_or_else(|| {
            NoHolder::Unusable(
                "conntrack is not installed (Debian: apt-get install conntrack), so a task's \
                 connections could not be forgotten before the next task joins its network"
                    .to_owned(),
            )
        })
    }

    /// The holders `spec` may join: `None` for a task without a network, on the host's or
    /// the engine's default one, joined to a container already, or holding a capability that
    /// changes its namespace.
    pub(crate) fn key_for(&self, spec: &ContainerSpec) -> Option<HolderKey> {
        if !self.worth_trying() {
            return None;
        }
        let network = spec.network_mode.as_deref()?;
        if matches!(network, "none" | "host" | "default" | "bridge") || network.contains(':') {
            return None;
        }
        let capabilities = spec.effective_capabilities();
        if capabilities.iter().any(|capability| {
            let name = capability.trim_start_matches("CAP_").to_ascii_uppercase();
            NAMESPACE_CHANGING_CAPABILITIES.contains(&name.as_str())
        }) {
            return None;
        }
        let mut labels = spec.labels.clone();
        labels.remove(LABEL_TASK);
        Some(HolderKey {
            network: network.to_owned(),
            labels,
        })
    }

    /// An idle holder of `key` still running, if any; dead ones met on the way are returned
    /// for removal.
    pub(crate) fn take_idle(&self, key: &HolderKey) -> (Option<Holder>, Vec<Holder>) {
        let mut dead = Vec::new();
        let mut lent = self.lent();
        let Some(idle) = lent.idle.get_mut(key) else {
            return (None, dead);
        };
        while let Some(holder) = idle.pop() {
            if holder.alive() {
                return (Some(holder), dead);
            }
            dead.push(holder);
        }
        (None, dead)
    }

    /// A holder was made and lent: holders work with this engine.
    pub(crate) fn worked(&self) {
        self.state.store(WORKS, Ordering::Relaxed);
    }

    /// No holder could be lent. Before any holder worked, any reason turns them off for good;
    /// after, only an unusable engine does, and a failure costs only this task its holder.
    pub(crate) fn not_lent(&self, why: NoHolder) {
        let before = self.state.load(Ordering::Relaxed);
        match why {
            NoHolder::Unusable(reason) => {
                if self.state.swap(OFF, Ordering::Relaxed) != OFF {
                    tracing::info!(
                        %reason,
                        "task containers get a network namespace of their own each"
                    );
                }
            }
            NoHolder::Failed(reason) if before == UNTRIED => {
                if self.state.swap(OFF, Ordering::Relaxed) != OFF {
                    tracing::warn!(
                        %reason,
                        "the first network holder failed: task containers get a network \
                         namespace of their own each"
                    );
                }
            }
            NoHolder::NotNow(reason) => {
                tracing::debug!(%reason, "no network holder for this task");
            }
            NoHolder::Failed(reason) => tracing::warn!(
                %reason,
                "cannot make a network holder: this task gets a network namespace of its own"
            ),
        }
    }

    /// `container` joined `holder`, until it is removed.
    pub(crate) fn lend(&self, container: &str, holder: Holder) {
        self.lent().lent.insert(container.to_owned(), holder);
    }

    /// The holder `container` joined, now that it is gone.
    pub(crate) fn given_back(&self, container: &str) -> Option<Holder> {
        self.lent().lent.remove(container)
    }

    /// Puts `holder` back among the idle ones, reset; gives it back to be removed when
    /// enough of its kind wait already.
    #[must_use]
    pub(crate) fn keep_idle(&self, holder: Holder) -> Option<Holder> {
        let mut lent = self.lent();
        let in_all: usize = lent.idle.values().map(Vec::len).sum();
        let idle = lent.idle.entry(holder.key.clone()).or_default();
        if idle.len() >= IDLE_PER_KEY || in_all >= IDLE_IN_ALL {
            return Some(holder);
        }
        idle.push(holder);
        None
    }

    /// Every idle holder, taken out: for removal.
    pub(crate) fn drain_idle(&self) -> Vec<Holder> {
        self.lent()
            .idle
            .drain()
            .flat_map(|(_, holders)| holders)
            .collect()
    }
}

// === impl Holder ===

impl Holder {
    /// Whether its process still runs (the engine did not restart, nobody removed it): its
    /// command line is still the holder program's.
    pub(crate) fn alive(&self) -> bool {
        is_holder_process(self.pid)
    }
}

/// `holder` once its process runs the holder program, seen from here. The engine's start
/// returns as the runtime lets its init go on to the program, so for a moment the process may
/// still be the runtime's; a process that is not there at all is another machine's (an engine
/// on another host, a runner in a container of its own).
pub(crate) async fn running_its_program(holder: Holder) -> Result<Holder, NoHolder> {
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);
    let began = std::time::Instant::now();
    loop {
        if is_holder_process(holder.pid) {
            return Ok(holder);
        }
        if !std::path::Path::new(&format!("/proc/{}", holder.pid)).exists() {
            return Err(NoHolder::Unusable(
                "the engine's containers' processes are not visible from here (an engine on \
                 another host, or a runner in a container of its own)"
                    .to_owned(),
            ));
        }
        if began.elapsed() > PATIENCE {
            return Err(NoHolder::Failed(format!(
                "the network holder's process {} does not run its program",
                holder.pid
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Whether `pid` on this machine runs the holder program.
pub(crate) fn is_holder_process(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline.split(|byte| *byte == 0).next() == Some(HOLDER_PROGRAM.as_bytes())
    })
}

/// Deletes the connection tracking entries `holder`'s last task left: the host's from and to
/// its address, and those of its namespace's own table (where the engine's embedded DNS
/// server translates addresses). Each table is read first, and `conntrack` run only where it
/// has entries to delete, which for a task that made no connection is nowhere. The
/// namespace's table is flushed only while the holder's process runs, in a namespace that is
/// not this process's (a reused process id must never flush the host's table).
pub(crate) async fn forget_connections(conntrack: &std::path::Path, holder: &Holder) {
    if let Some(address) = holder.address {
        crate::oci::netns::forget_task_connections(conntrack, &[address]).await;
    }
    let namespace = format!("/proc/{}/ns/net", holder.pid);
    let own_namespace = |path: &str| std::fs::read_link(path).ok();
    if !holder.alive() || own_namespace(&namespace) == own_namespace("/proc/self/ns/net") {
        return;
    }
    let own_table = format!("/proc/{}/net/nf_conntrack", holder.pid);
    let has_entries = tokio::fs::read_to_string(&own_table)
        .await
        .is_ok_and(|table| !table.trim().is_empty());
    if !has_entries {
        return;
    }
    let flushed = tokio::process::Command::new("nsenter")
        .arg(format!("--net={namespace}"))
        .arg("--")
        .arg(conntrack)
        .arg("-F")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await;
    match flushed {
        Ok(status) if status.success() => {}
        Ok(status) => {
            tracing::warn!(holder = %holder.id, %status, "cannot flush a network holder's connection table");
        }
        Err(error) => {
            tracing::warn!(holder = %holder.id, %error, "cannot run nsenter to flush a network holder's connection table");
        }
    }
}

/// The holder image's root: only `program` at [`HOLDER_PROGRAM`].
pub(crate) fn holder_rootfs_tar(program: &[u8], mtime: u64) -> Result<Vec<u8>, crate::EngineError> {
    let mut archive = crate::archive::ArchiveBuilder::new(Vec::new(), mtime);
    archive.file(HOLDER_PROGRAM, 0o555, program)?;
    archive.finish()
}

/// A static x86-64 Linux program that sleeps until it is killed: one ELF header, one
/// loadable segment (the whole file, read and execute), and three instructions that call
/// `pause` for ever. As PID 1 of its container it ignores every signal but `SIGKILL`, which
/// is what removing the container sends.
#[cfg(target_arch = "x86_64")]
pub(crate) fn holder_program() -> Option<Vec<u8>> {
    const BASE: u64 = 0x40_0000;
    const HEADER: u16 = 64;
    const PROGRAM_HEADER: u16 = 56;
    // mov eax, 34 (pause); syscall; jmp back to the mov.
    const CODE: [u8; 9] = [0xb8, 0x22, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xf7];
    let size = u64::from(HEADER + PROGRAM_HEADER) + CODE.len() as u64;
    let mut elf = Vec::with_capacity(usize::try_from(size).ok()?);
    // Identification: magic, 64-bit, little-endian, version 1, System V ABI, padding.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // an executable
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // version
    elf.extend_from_slice(&(BASE + u64::from(HEADER + PROGRAM_HEADER)).to_le_bytes()); // entry
    elf.extend_from_slice(&u64::from(HEADER).to_le_bytes()); // program headers' offset
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    for half in [HEADER, PROGRAM_HEADER, 1, 0, 0, 0] {
        // header size, program header size and count, section header size, count, names
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // read and execute
    elf.extend_from_slice(&0u64.to_le_bytes()); // from the file's start
    elf.extend_from_slice(&BASE.to_le_bytes()); // virtual address
    elf.extend_from_slice(&BASE.to_le_bytes()); // physical address
    elf.extend_from_slice(&size.to_le_bytes()); // in the file
    elf.extend_from_slice(&size.to_le_bytes()); // in memory
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // page alignment
    elf.extend_from_slice(&CODE);
    Some(elf)
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn holder_program() -> Option<Vec<u8>> {
    None
}

/// The holder's create request: on `key`'s network with its labels, nothing it does not need.
pub(crate) fn holder_body(key: &HolderKey) -> bollard::models::ContainerCreateBody {
    use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
    let mut labels: HashMap<String, String> = key
        .labels
        .iter()
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    labels.insert(LABEL_NETWORK_HOLDER.to_owned(), key.network.clone());
    ContainerCreateBody {
        image: Some(HOLDER_IMAGE.to_owned()),
        entrypoint: Some(vec![HOLDER_PROGRAM.to_owned()]),
        labels: Some(labels),
        network_disabled: Some(false),
        host_config: Some(HostConfig {
            network_mode: Some(key.network.clone()),
            memory: Some(HOLDER_MEMORY_BYTES),
            memory_swap: Some(HOLDER_MEMORY_BYTES),
            pids_limit: Some(1),
            readonly_rootfs: Some(true),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            cap_drop: Some(vec!["ALL".to_owned()]),
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".to_owned()),
                config: None,
            }),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    }
}

/// Has a task's create request join `holder`: its network namespace, and its shared files
/// mounted read-only.
pub(crate) fn join(host_config: &mut bollard::models::HostConfig, holder: &Holder) {
    host_config.network_mode = Some(format!("container:{}", holder.id));
    host_config.mounts = Some(shared_file_mounts(holder));
}

/// The read-only bind mounts of a holder's shared files, for a task joining it.
fn shared_file_mounts(holder: &Holder) -> Vec<bollard::models::Mount> {
    use bollard::models::{Mount, MountType};
    SHARED_FILES
        .iter()
        .zip(&holder.shared_files)
        .map(|(target, source)| Mount {
            target: Some((*target).to_owned()),
            source: Some(source.clone()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Mount::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_on(network: &str) -> ContainerSpec {
        ContainerSpec {
            image: "busybox".to_owned(),
            network_mode: Some(network.to_owned()),
            labels: BTreeMap::from([
                (LABEL_TASK.to_owned(), "t1".to_owned()),
                ("stevedore.runner".to_owned(), "r1".to_owned()),
            ]),
            ..ContainerSpec::default()
        }
    }

    #[test]
    fn only_tasks_on_a_named_network_without_network_powers_join_holders() {
        let holders = NetworkHolders::new();
        let key = holders.key_for(&spec_on("stevedore-tasks")).unwrap();
        assert_eq!(key.network, "stevedore-tasks");
        assert_eq!(
            key.labels,
            BTreeMap::from([("stevedore.runner".to_owned(), "r1".to_owned())]),
            "the task's own label is not a holder's"
        );
        for network in ["none", "host", "bridge", "default", "container:abc"] {
            assert_eq!(holders.key_for(&spec_on(network)), None, "{network}");
        }
        let mut no_network = spec_on("x");
        no_network.network_mode = None;
        assert_eq!(holders.key_for(&no_network), None);
        for capability in ["NET_ADMIN", "CAP_SYS_ADMIN", "all"] {
            let mut powerful = spec_on("stevedore-tasks");
            powerful.capabilities = Some(vec!["CHOWN".to_owned(), capability.to_owned()]);
            assert_eq!(holders.key_for(&powerful), None, "{capability}");
        }
        assert_eq!(
            NetworkHolders::off().key_for(&spec_on("stevedore-tasks")),
            None
        );
    }

    #[test]
    fn a_failure_before_any_holder_worked_turns_them_off_after_only_this_once() {
        let holders = NetworkHolders::new();
        holders.not_lent(NoHolder::Failed("no".to_owned()));
        assert!(!holders.worth_trying());

        let holders = NetworkHolders::new();
        holders.worked();
        holders.not_lent(NoHolder::Failed("no".to_owned()));
        assert!(holders.worth_trying());
        holders.not_lent(NoHolder::Unusable("never".to_owned()));
        assert!(!holders.worth_trying());
    }

    #[test]
    fn idle_holders_are_bounded_per_key_and_dead_ones_are_handed_out_for_removal() {
        let holders = NetworkHolders::new();
        let key = holders.key_for(&spec_on("stevedore-tasks")).unwrap();
        let holder = |n: usize| Holder {
            id: format!("h{n}"),
            key: key.clone(),
            // No process has this id: every one of these holders is dead.
            pid: u32::MAX,
            address: None,
            shared_files: Default::default(),
        };
        for n in 0..IDLE_PER_KEY {
            assert_eq!(holders.keep_idle(holder(n)), None);
        }
        assert_eq!(holders.keep_idle(holder(99)), Some(holder(99)));
        // All keys together are bounded too.
        for project in 0..IDLE_IN_ALL {
            let mut other = holder(1000 + project);
            other
                .key
                .labels
                .insert("stevedore.project".to_owned(), project.to_string());
            let refused = holders.keep_idle(other).is_some();
            assert_eq!(refused, IDLE_PER_KEY + project >= IDLE_IN_ALL, "{project}");
        }
        let (alive, dead) = holders.take_idle(&key);
        assert_eq!(alive, None);
        assert_eq!(dead.len(), IDLE_PER_KEY);
        assert_eq!(holders.drain_idle().len(), IDLE_IN_ALL - IDLE_PER_KEY);
    }

    #[test]
    fn the_sleeper_program_runs_and_sleeps() {
        let Some(program) = holder_program() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sleeper");
        std::fs::write(&path, &program).unwrap();
        std::fs::set_permissions(
            &path,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
        )
        .unwrap();
        let mut child = std::process::Command::new(&path).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(child.try_wait().unwrap(), None, "the program ended");
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success());
    }
}
