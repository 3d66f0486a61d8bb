//! The OCI runtime configuration (`config.json`) of a task container, as Docker would run it:
//! the process from the spec over the image's config, all capabilities dropped but the
//! spec's, `noNewPrivileges`, Docker's rlimits, masked and read-only paths and mounts, fresh
//! namespaces (the network one from the pool when the task has a network), and stevedore's
//! own cgroup as the parent of the runtime's.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::error::EngineError;
use crate::oci::ImageRunConfig;
use crate::spec::ContainerSpec;

/// `PATH` when neither the image nor the spec sets one (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The paths Docker hides from a container (`/proc` and `/sys` entries that tell about the
/// host or reach its hardware).
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// The `/proc` entries Docker makes read-only.
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The system calls a task is refused (`EPERM`), as Docker's default seccomp profile refuses
/// them to a container without `CAP_SYS_ADMIN`: those that reach the host's kernel state
/// (modules, keys, clocks, swap, reboot, mounts, BPF, perf, io_uring, userfaultfd, NUMA
/// policies), and every way into new namespaces, whose user namespace would hand the task
/// the capabilities it was refused.
const REFUSED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "fanotify_init",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
];

/// `CLONE_NEWUSER`: a `clone` with it is refused (the other namespace flags need
/// `CAP_SYS_ADMIN`, which a task does not have).
const CLONE_NEWUSER: u64 = 0x1000_0000;

/// The task's seccomp filter: everything but [`REFUSED_SYSCALLS`] and a `clone` into a new
/// user namespace; `clone3` (whose flags a filter cannot read) answers `ENOSYS`, so the C
/// library falls back to `clone`. Calls of another architecture than the runtime's own are
/// refused by the filter as a whole.
fn seccomp() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": REFUSED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
             "args": [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER,
                       "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
        ],
    })
}

/// The open files a task may have, soft and hard (what Docker's daemon gives by default),
/// unless this process may have fewer: a runtime cannot raise a hard limit it inherited.
const NOFILE_LIMIT: u64 = 1_048_576;

/// [`NOFILE_LIMIT`], or this process's own hard limit of open files when that is lower.
pub(crate) fn nofile_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits
                .lines()
                .find(|line| line.starts_with("Max open files"))?;
            // Max open files  <soft>  <hard>  files
            line.split_whitespace().nth(4)?.parse::<u64>().ok()
        })
        .map_or(NOFILE_LIMIT, |hard| hard.min(NOFILE_LIMIT))
}

/// Everything the configuration is made from beside the spec.
#[derive(Debug, Clone)]
pub(crate) struct Bundle<'a> {
    pub(crate) spec: &'a ContainerSpec,
    pub(crate) image: &'a ImageRunConfig,
    /// The mounted overlay.
    pub(crate) rootfs: &'a Path,
    /// The directory of the container's `hosts`, `hostname` and `resolv.conf`.
    pub(crate) etc_dir: &'a Path,
    pub(crate) hostname: &'a str,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Its supplementary groups.
    pub(crate) additional_gids: &'a [u32],
    pub(crate) home: &'a str,
    /// The prepared network namespace; `None`: a fresh, empty one.
    pub(crate) netns: Option<&'a Path>,
    /// The runtime's cgroup (inside the task's own).
    pub(crate) cgroups_path: &'a str,
    /// Whether the container gets a cgroup namespace (cgroup v2, as Docker does).
    pub(crate) cgroup_namespace: bool,
    /// The open files it may have ([`nofile_limit`]).
    pub(crate) nofile: u64,
}

/// The process's arguments: the spec's entrypoint or the image's, then the spec's command
/// or, when the spec keeps the image's entrypoint, the image's (an entrypoint given in the
/// spec drops the image's command, as Docker does).
pub(crate) fn process_args(
    spec: &ContainerSpec,
    image: &ImageRunConfig,
) -> Result<Vec<String>, EngineError> {
    let entrypoint = match &spec.entrypoint {
        Some(entrypoint) => entrypoint.clone(),
        None => image.entrypoint.clone().unwrap_or_default(),
    };
    let cmd = match (&spec.cmd, &spec.entrypoint) {
        (Some(cmd), _) => cmd.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => image.cmd.clone().unwrap_or_default(),
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(EngineError::invalid_spec(
            "neither the spec nor the image gives a command to run",
        ));
    }
    Ok(args)
}

/// The environment: the image's, the spec's over it (by name, in order), and `PATH`,
/// `HOSTNAME` and `HOME` when neither sets them.
pub(crate) fn environment(
    spec: &ContainerSpec,
    image: &ImageRunConfig,
    hostname: &str,
    home: &str,
) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |name: &str, value: &str, replace: bool| {
        if values.contains_key(name) && !replace {
            return;
        }
        if values.insert(name.to_owned(), value.to_owned()).is_none() {
            names.push(name.to_owned());
        }
    };
    for pair in &image.env {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        set(name, value, true);
    }
    for (name, value) in &spec.env {
        set(name, value, true);
    }
    for (name, value) in [
        ("PATH", DEFAULT_PATH),
        ("HOSTNAME", hostname),
        ("HOME", home),
    ] {
        set(name, value, false);
    }
    names
        .iter()
        .map(|name| format!("{name}={}", values.get(name).map_or("", String::as_str)))
        .collect()
}

/// The capability names in the OCI form (`CAP_CHOWN`), from the spec's (`CHOWN` or
/// `CAP_CHOWN`).
pub(crate) fn capabilities(spec: &ContainerSpec) -> Vec<String> {
    let mut names: Vec<String> = spec
        .effective_capabilities()
        .iter()
        .map(|name| {
            let upper = name.trim().to_ascii_uppercase();
            if upper.starts_with("CAP_") {
                upper
            } else {
                format!("CAP_{upper}")
            }
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The `config.json` of the container.
pub(crate) fn config(bundle: &Bundle<'_>) -> Result<Value, EngineError> {
    let spec = bundle.spec;
    let capabilities = capabilities(spec);
    let cwd = spec
        .working_dir
        .clone()
        .or_else(|| bundle.image.working_dir.clone())
        .filter(|dir| !dir.is_empty())
        .unwrap_or_else(|| "/".to_owned());
    if !cwd.starts_with('/') {
        return Err(EngineError::invalid_spec(format!(
            "the working directory {cwd:?} is not absolute"
        )));
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    namespaces.push(match bundle.netns {
        Some(path) => json!({"type": "network", "path": path}),
        None => json!({"type": "network"}),
    });
    if bundle.cgroup_namespace {
        namespaces.push(json!({"type": "cgroup"}));
    }
    let etc = |file: &str| bundle.etc_dir.join(file);
    let mut annotations = serde_json::Map::new();
    for (key, value) in &spec.labels {
        annotations.insert(key.clone(), Value::String(value.clone()));
    }
    let mut user = json!({"uid": bundle.uid, "gid": bundle.gid});
    if !bundle.additional_gids.is_empty() {
        user["additionalGids"] = json!(bundle.additional_gids);
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": user,
            "args": process_args(spec, bundle.image)?,
            "env": environment(spec, bundle.image, bundle.hostname, bundle.home),
            "cwd": cwd,
            "capabilities": {
                "bounding": capabilities,
                "effective": capabilities,
                "permitted": capabilities,
            },
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": bundle.nofile, "soft": bundle.nofile},
            ],
            "noNewPrivileges": true,
        },
        "root": {"path": bundle.rootfs, "readonly": false},
        "hostname": bundle.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/etc/hosts", "type": "bind", "source": etc("hosts"),
             "options": ["rbind", "rprivate", "ro"]},
            {"destination": "/etc/hostname", "type": "bind", "source": etc("hostname"),
             "options": ["rbind", "rprivate", "ro"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": etc("resolv.conf"),
             "options": ["rbind", "rprivate", "ro"]},
        ],
        "annotations": annotations,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": bundle.cgroups_path,
            // The limits are on stevedore's own group around the runtime's; only the device
            // rules are the runtime's (deny all, then its defaults: null, zero, tty...).
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
            },
            "seccomp": seccomp(),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }))
}

/// The container's `/etc/hosts`.
pub(crate) fn hosts(hostname: &str, address: Option<std::net::Ipv4Addr>) -> String {
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    match address {
        Some(address) => hosts.push_str(&format!("{address}\t{hostname}\n")),
        None => hosts.push_str(&format!("127.0.0.1\t{hostname}\n")),
    }
    hosts
}

/// The container's `/etc/resolv.conf`.
pub(crate) fn resolv_conf(nameservers: &[std::net::Ipv4Addr]) -> String {
    nameservers
        .iter()
        .map(|server| format!("nameserver {server}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageRunConfig {
        ImageRunConfig {
            env: vec!["PATH=/bin".into(), "LANG=C".into()],
            entrypoint: Some(vec!["/entry".into()]),
            cmd: Some(vec!["default".into()]),
            working_dir: Some("/app".into()),
            user: None,
        }
    }

    #[test]
    fn arguments_follow_dockers_rules() -> Result<(), EngineError> {
        let mut spec = ContainerSpec::new("img");
        assert_eq!(process_args(&spec, &image())?, ["/entry", "default"]);
        spec.cmd = Some(vec!["mine".into()]);
        assert_eq!(process_args(&spec, &image())?, ["/entry", "mine"]);
        spec.entrypoint = Some(vec![]);
        assert_eq!(process_args(&spec, &image())?, ["mine"]);
        spec.cmd = None;
        spec.entrypoint = Some(vec!["/other".into()]);
        assert_eq!(process_args(&spec, &image())?, ["/other"]);
        spec.entrypoint = Some(vec![]);
        assert!(process_args(&spec, &image()).is_err());
        Ok(())
    }

    #[test]
    fn the_spec_environment_goes_over_the_images() {
        let mut spec = ContainerSpec::new("img");
        spec.env.push(("LANG".into(), "a=b c".into()));
        spec.env.push(("NEW".into(), String::new()));
        assert_eq!(
            environment(&spec, &image(), "host1", "/root"),
            [
                "PATH=/bin",
                "LANG=a=b c",
                "NEW=",
                "HOSTNAME=host1",
                "HOME=/root"
            ]
        );
    }

    #[test]
    fn the_config_drops_capabilities_and_privileges() -> Result<(), EngineError> {
        let mut spec = ContainerSpec::new("img");
        spec.capabilities = Some(vec!["chown".into(), "CAP_KILL".into()]);
        spec.labels.insert("stevedore.runner".into(), "r1".into());
        let config = config(&Bundle {
            spec: &spec,
            image: &image(),
            rootfs: Path::new("/b/rootfs"),
            etc_dir: Path::new("/b"),
            hostname: "abc",
            uid: 1000,
            gid: 1000,
            additional_gids: &[],
            home: "/",
            netns: Some(Path::new("/run/netns/t1")),
            cgroups_path: "/stevedore-oci/abc/ctr",
            cgroup_namespace: false,
            nofile: 1024,
        })?;
        assert_eq!(
            config["process"]["capabilities"]["bounding"],
            json!(["CAP_CHOWN", "CAP_KILL"])
        );
        assert_eq!(config["process"]["noNewPrivileges"], json!(true));
        assert_eq!(
            config["process"]["rlimits"][0],
            json!({"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024})
        );
        assert!(nofile_limit() <= NOFILE_LIMIT);
        assert_eq!(
            config["linux"]["seccomp"]["syscalls"][0]["names"],
            json!(REFUSED_SYSCALLS)
        );
        assert_eq!(config["process"]["cwd"], json!("/app"));
        assert_eq!(config["process"]["user"], json!({"uid": 1000, "gid": 1000}));
        assert_eq!(config["annotations"]["stevedore.runner"], json!("r1"));
        assert_eq!(
            config["linux"]["namespaces"][4],
            json!({"type": "network", "path": "/run/netns/t1"})
        );
        assert_eq!(
            config["linux"]["cgroupsPath"],
            json!("/stevedore-oci/abc/ctr")
        );
        Ok(())
    }
}
