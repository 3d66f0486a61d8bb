//! The OCI runtime configuration (`config.json`) of a task container, as Docker would run it:
//! the process from the spec over the image's config, all capabilities dropped but the
//! spec's, `noNewPrivileges`, Docker's seccomp allow-list and rlimits, masked and read-only
//! paths and mounts, fresh namespaces (the network one from the pool when the task has a
//! network), and stevedore's own cgroup as the parent of the runtime's.

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

/// The system calls every task may make, whatever its capabilities: the unconditional list of
/// Docker's default seccomp profile (moby's `profiles/seccomp/default.json`). Docker has run
/// containers under it since 1.10 and adds each call a C library or language runtime comes to
/// need, so following it keeps ordinary programs working while the rest stays shut. A few of Docker's entries are narrowed because stevedore refused those
/// calls before it had an allow-list, and still does:
///
/// - `io_uring_setup`, `io_uring_enter` and `io_uring_register` are left out: the ring
///   performs reads, writes and connects that this filter never sees, and has been a steady
///   source of kernel exploits (Docker's later profiles drop it as well);
/// - `name_to_handle_at` goes with `CAP_SYS_ADMIN`, as in Docker 20.10 (see
///   [`CAPABILITY_SYSCALLS`]): it is the first half of the `open_by_handle_at` escape from a
///   container;
/// - `clock_adjtime` and `clock_adjtime64` go with `CAP_SYS_TIME`, like `clock_settime`
///   (`adjtimex` still tells how the clock is disciplined);
/// - `process_vm_readv` and `process_vm_writev`, which Docker gives every container on
///   kernels from 4.8 beside `ptrace`, go with `CAP_SYS_PTRACE`: they read and write another
///   process's memory without stopping it. `ptrace` itself stays open to debuggers and
///   tracers (see [`kernel_rechecks_traced_calls`]).
///
/// The names of other architectures' calls (`chown32`, `mmap2`, `socketcall`...) are listed
/// as Docker lists them: the filter covers the companion architectures of
/// [`ARCHITECTURES`], and a runtime skips a name its libseccomp does not know.
const ALLOWED_SYSCALLS: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_time64",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// The system calls a task may make only when it holds a capability, as in Docker's profile:
/// the kernel would check the capability anyway, and the filter keeps the call's code out of
/// reach of a task that could never use it. A task holds [`DEFAULT_CAPABILITIES`] unless
/// its spec says otherwise, none of which is here.
///
/// Unlike Docker, `CAP_SYS_ADMIN` does not open `unshare`, `setns`, `clone3` or a `clone`
/// into new namespaces (see [`CLONE_NAMESPACE_FLAGS`]): a new user namespace would hand a
/// task every capability it was refused, whatever else its spec grants.
///
/// [`DEFAULT_CAPABILITIES`]: crate::spec::DEFAULT_CAPABILITIES
const CAPABILITY_SYSCALLS: &[(&str, &[&str])] = &[
    ("CAP_BPF", &["bpf"]),
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    ("CAP_PERFMON", &["perf_event_open"]),
    (
        "CAP_SYS_ADMIN",
        &[
            "bpf",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "name_to_handle_at",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "syslog",
            "umount",
            "umount2",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    (
        "CAP_SYS_MODULE",
        &["delete_module", "finit_module", "init_module"],
    ),
    (
        "CAP_SYS_NICE",
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_PTRACE",
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    ("CAP_SYS_RAWIO", &["ioperm", "iopl"]),
    (
        "CAP_SYS_TIME",
        &[
            "clock_adjtime",
            "clock_adjtime64",
            "clock_settime",
            "clock_settime64",
            "settimeofday",
            "stime",
        ],
    ),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    ("CAP_SYSLOG", &["syslog"]),
];

/// The architectures whose calls the filter judges by [`ALLOWED_SYSCALLS`]: the host's own and
/// the companions its CPU runs natively (32-bit x86 and x32 beside x86_64, 32-bit arm beside
/// aarch64), as Docker lists them. A call made in any other architecture's convention is
/// refused whole, so a syscall number cannot be smuggled in under another table.
#[cfg(target_arch = "x86_64")]
const ARCHITECTURES: &[&str] = &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"];
#[cfg(target_arch = "aarch64")]
const ARCHITECTURES: &[&str] = &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"];
/// Elsewhere the runtime's own architecture only.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCHITECTURES: &[&str] = &[];

/// The calls only the host's architecture has and Docker allows there: thread-pointer setup
/// (`arch_prctl`) and the local descriptor table on x86, the cache and TLS calls on arm.
#[cfg(target_arch = "x86_64")]
const ARCHITECTURE_SYSCALLS: &[&str] = &["arch_prctl", "modify_ldt"];
#[cfg(target_arch = "aarch64")]
const ARCHITECTURE_SYSCALLS: &[&str] = &[
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "breakpoint",
    "cacheflush",
    "set_tls",
    "sync_file_range2",
];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCHITECTURE_SYSCALLS: &[&str] = &[];

/// The `clone` flags that make new namespaces (`CLONE_NEWNS`, `CLONE_NEWCGROUP`,
/// `CLONE_NEWUTS`, `CLONE_NEWIPC`, `CLONE_NEWUSER`, `CLONE_NEWPID`, `CLONE_NEWNET`): a `clone`
/// with any of them is refused, as Docker refuses it without `CAP_SYS_ADMIN`. Threads and
/// forks pass.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7e02_0000;

/// The argument that holds `clone`'s flags (s390 swaps the first two).
const CLONE_FLAGS_ARGUMENT: u32 = if cfg!(target_arch = "s390x") { 1 } else { 0 };

/// The `personality` values Docker lets through: Linux, 32-bit Linux (what `linux32` and
/// `setarch i686` ask for), each with the old `uname` numbering, and the query
/// (`0xffffffff`). Other flags, such as turning address randomisation off, are refused.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// `AF_VSOCK`: a socket of this family reaches the hypervisor or host past the network
/// namespace, so Docker refuses it and so does stevedore.
const AF_VSOCK: u64 = 40;

/// `ENOSYS`, the answer to `clone3`: its flags sit in memory a filter cannot read, so it cannot
/// be judged like `clone`, and "not implemented" makes the C library fall back to `clone`
/// (which is judged), where `EPERM` would be taken as a real refusal.
const ENOSYS: u32 = 38;

/// `EPERM`, the answer to every call not allowed: what the kernel answers to an unprivileged
/// caller, so programs take it as the refusal it is (Docker's `defaultErrnoRet`).
const EPERM: u32 = 1;

/// Whether this kernel checks the filter again after a tracer changed a call (4.8 and later):
/// only then is `ptrace` harmless to allow without `CAP_SYS_PTRACE`, as Docker allows it,
/// since before, a task tracing its own child could rewrite a checked call into a refused one.
fn kernel_rechecks_traced_calls() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (4, 8),
        _ => false,
    }
}

/// The task's seccomp filter, an allow-list in the form of Docker's default profile: every
/// call not listed answers `EPERM`, so a kernel interface a task has no business with (and
/// every new one a later kernel adds) stays out of its reach unless it is named here.
///
/// `capabilities` are the task's own ([`capabilities`]): they open
/// [`CAPABILITY_SYSCALLS`] as they open them in Docker.
fn seccomp(capabilities: &[String]) -> Value {
    let mut allowed: Vec<&str> = ALLOWED_SYSCALLS
        .iter()
        .chain(ARCHITECTURE_SYSCALLS)
        .copied()
        .collect();
    for (capability, names) in CAPABILITY_SYSCALLS {
        if capabilities.iter().any(|held| held == capability) {
            allowed.extend_from_slice(names);
        }
    }
    if kernel_rechecks_traced_calls() {
        allowed.push("ptrace");
    }
    allowed.sort_unstable();
    allowed.dedup();
    let mut syscalls = vec![
        json!({"names": allowed, "action": "SCMP_ACT_ALLOW"}),
        json!({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}]}),
        json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": CLONE_FLAGS_ARGUMENT, "value": CLONE_NAMESPACE_FLAGS,
                         "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}),
    ];
    // One rule per value: the conditions of one rule must all hold at once.
    syscalls.extend(PERSONALITIES.iter().map(|persona| {
        json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": persona, "op": "SCMP_CMP_EQ"}]})
    }));
    let mut filter = json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "syscalls": syscalls,
    });
    if !ARCHITECTURES.is_empty() {
        filter["architectures"] = json!(ARCHITECTURES);
    }
    filter
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
            "seccomp": seccomp(&capabilities),
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

    /// What the deny list refused before the allow-list: each must stay refused to a task
    /// with the default capabilities.
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

    /// The calls a filter allows whatever their arguments.
    fn allowed(filter: &Value) -> Vec<String> {
        let rules = filter["syscalls"].as_array().cloned().unwrap_or_default();
        rules
            .iter()
            .filter(|rule| rule["action"] == json!("SCMP_ACT_ALLOW") && rule.get("args").is_none())
            .flat_map(|rule| rule["names"].as_array().cloned().unwrap_or_default())
            .filter_map(|name| name.as_str().map(str::to_owned))
            .collect()
    }

    /// The rules for one call that look at its arguments or answer otherwise than allowing.
    fn special_rules<'a>(filter: &'a Value, name: &str) -> Vec<&'a Value> {
        filter["syscalls"]
            .as_array()
            .map(|rules| {
                rules
                    .iter()
                    .filter(|rule| rule["names"] == json!([name]))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn the_seccomp_filter_is_an_allow_list_like_dockers() {
        let spec = ContainerSpec::new("img");
        let filter = seccomp(&capabilities(&spec));
        assert_eq!(filter["defaultAction"], json!("SCMP_ACT_ERRNO"));
        assert_eq!(filter["defaultErrnoRet"], json!(1));
        let allowed = allowed(&filter);
        for name in [
            "read",
            "write",
            "openat",
            "execve",
            "futex",
            "rseq",
            "faccessat2",
            "statx",
        ] {
            assert!(allowed.contains(&name.to_owned()), "{name} is refused");
        }
        for name in REFUSED_SYSCALLS
            .iter()
            .chain(&["clone", "clone3", "chroot", "vhangup"])
        {
            assert!(!allowed.contains(&(*name).to_owned()), "{name} is allowed");
        }
        let mut sorted = allowed.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, allowed, "listed twice or out of order");

        // Threads and forks, never new namespaces; clone3 sends the C library back to clone.
        assert_eq!(
            special_rules(&filter, "clone"),
            [&json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                     "args": [{"index": 0, "value": 0x7e02_0000_u64, "valueTwo": 0,
                               "op": "SCMP_CMP_MASKED_EQ"}]})]
        );
        assert_eq!(
            special_rules(&filter, "clone3"),
            [&json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38})]
        );
        assert_eq!(
            special_rules(&filter, "socket")[0]["args"],
            json!([{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}])
        );
        let personalities: Vec<&Value> = special_rules(&filter, "personality")
            .iter()
            .map(|rule| &rule["args"][0]["value"])
            .collect();
        assert_eq!(
            personalities,
            [
                &json!(0),
                &json!(8),
                &json!(0x2_0000),
                &json!(0x2_0008),
                &json!(0xffff_ffff_u64)
            ]
        );
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                filter["architectures"],
                json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
            );
            assert!(allowed.contains(&"arch_prctl".to_owned()));
        }
    }

    #[test]
    fn capabilities_open_their_calls_but_never_a_namespace() {
        let mut spec = ContainerSpec::new("img");
        spec.capabilities = Some(vec!["SYS_PTRACE".into(), "sys_admin".into()]);
        let filter = seccomp(&capabilities(&spec));
        let allowed = allowed(&filter);
        for name in [
            "process_vm_readv",
            "kcmp",
            "ptrace",
            "mount",
            "umount2",
            "syslog",
        ] {
            assert!(allowed.contains(&name.to_owned()), "{name} is refused");
        }
        for name in [
            "unshare",
            "setns",
            "clone",
            "clone3",
            "reboot",
            "settimeofday",
        ] {
            assert!(!allowed.contains(&name.to_owned()), "{name} is allowed");
        }
        assert_eq!(special_rules(&filter, "clone").len(), 1);
    }

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
        let filter = &config["linux"]["seccomp"];
        assert_eq!(filter["defaultAction"], json!("SCMP_ACT_ERRNO"));
        assert_eq!(filter["defaultErrnoRet"], json!(1));
        assert!(allowed(filter).contains(&"execve".to_owned()));
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
