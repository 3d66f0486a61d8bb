//! [`RunnerConfig`]: everything a runner is told, with the defaults an operator would expect.

use std::path::PathBuf;
use std::time::Duration;

use stevedore_engine::RegistryAuth;
use stevedore_model::CodeImages;
use stevedore_model::StackTable;
use stevedore_model::limits::DEFAULT_MEMORY_MIB;
use stevedore_model::task::DEFAULT_CLUSTER;

use crate::error::RunnerError;
use crate::network::TaskNetworkConfig;

/// How one runner behaves. `RunnerConfig::default()` is what `stevedore serve` embeds.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The runner's name in leases and on its containers' `stevedore.runner` label. Keep it
    /// stable across restarts: start-up reaps the containers carrying it. Default `embedded`.
    pub runner_id: String,
    /// The clusters whose tasks this runner takes. Default `["default"]`.
    pub clusters: Vec<String>,
    /// The most tasks running at once; `None` derives it from the engine's cores and memory
    /// at start-up ([`default_capacity`]).
    pub capacity: Option<u32>,
    /// The memory, MiB, that the containers of running tasks may hold together; a task whose
    /// limit does not fit waits until enough is free. `None` derives it from the engine's
    /// memory at start-up ([`default_memory_budget_mib`]).
    pub memory_budget_mib: Option<u64>,
    /// How many more tasks may be leased while every slot is taken, to be prepared (image
    /// present, container created with its files and attached) and started the moment a slot
    /// is given back. Only while the runner's recent runs were short (a median of at most
    /// 2 s over the last 8), so that no task waits leased behind long ones. 0: none. Default 1.
    pub prepare_ahead: u32,
    /// How long a lease lasts without a heartbeat. Default 30 s.
    pub lease_secs: u32,
    /// How often a leased task's lease is extended, which is also how fast a cancellation
    /// reaches the container. Default 1 s.
    pub heartbeat_interval: Duration,
    /// The longest pause between lease attempts when there is no work; the pause grows from
    /// an eighth of it after work was found. Default 1 s.
    pub idle_poll_interval: Duration,
    /// The most log bytes kept per task; past it the source writes a truncation marker and
    /// the runner stops shipping. Default 10 MiB.
    pub log_cap_bytes: u64,
    /// Buffered log output is shipped at least this often while a task runs. Default 200 ms.
    pub log_flush_interval: Duration,
    /// ... and as soon as this many bytes are buffered. Default 64 KiB.
    pub log_flush_bytes: usize,
    /// Progress lines a task prints (`::stevedore-progress::...`) are forwarded at most this
    /// often, the latest value winning; the last one always goes out before the result.
    /// Zero forwards every line. Default 250 ms.
    pub progress_interval: Duration,
    /// On shutdown, how long running tasks may go on before they are killed and requeued.
    /// Default 30 s.
    pub shutdown_grace: Duration,
    /// After this many infrastructure failures a task ends `error` instead of being queued
    /// again. Default 5.
    pub max_infra_attempts: u32,
    /// The delay before a task the infrastructure failed runs again, doubled for every
    /// earlier such failure of the task. Default 2 s.
    pub requeue_backoff_base: Duration,
    /// The longest such delay. Default 5 minutes.
    pub requeue_backoff_max: Duration,
    /// The stacks runtime codes run on. Default: the built-in stacks with their official
    /// images.
    pub stacks: StackTable,
    /// Credentials for private registries, picked by the image's registry host (an entry
    /// without `server_address` serves Docker Hub). Default none.
    pub registry_auth: Vec<RegistryAuth>,
    /// Where the images `code push --dockerfile` builds live (the operator's registry, or
    /// this machine): an image under it belongs to the project its path names, is pulled
    /// with the operator's credentials, and runs for that project only. Default: local.
    pub code_images: CodeImages,
    /// The most processes and threads in one task's container: holds a fork bomb. `None`
    /// leaves it unlimited. Default 512.
    pub pids_limit: Option<u64>,
    /// How long making a task's image present (a pull) may take: past it the attempt ends
    /// and the task goes back to the queue as an infrastructure failure (a slow or
    /// unreachable registry), so a pull never holds a slot for ever. Default 10 minutes.
    pub pull_timeout: Duration,
    /// The largest image a task may pull, in bytes: a pull is stopped as soon as its layers'
    /// download sizes add up to more, and a pulled image larger on disk is refused; either
    /// ends the task `error` (its image is the user's choice). `None`: no limit. Default
    /// 10 GiB.
    pub max_image_bytes: Option<u64>,
    /// The disk the engine's images may take, MiB: over it, the images this runner used
    /// least recently (and uses no more) are removed, never a stack image. `None`: images
    /// are never removed. Default 20 GiB.
    pub image_disk_budget_mib: Option<u64>,
    /// How often the images are weighed against the budget, besides after every pull.
    /// Default 5 minutes.
    pub image_janitor_interval: Duration,
    /// How often the runner lists the containers of other runners on its engine and removes
    /// those of runners the server reports gone (they outlived their leases: a runner that
    /// died with its watchdog, a host that lost its way to the server). `None`: never.
    /// Default a minute.
    pub reap_gone_interval: Option<Duration>,
    /// Where the runner writes down until when each running task's lease surely holds (the
    /// lease ledger), for a watchdog process that outlives the runner to stop the containers
    /// of a runner that died. `None`: no ledger (a local run, tests).
    pub lease_ledger: Option<std::path::PathBuf>,
    /// The CPU limit of a task whose code sets no `cpus`, in CPUs; `None` leaves such tasks
    /// unlimited. Default 1: a busy loop takes one core, not the machine.
    pub default_cpus: Option<f64>,
    /// CPUs kept from the tasks for what runs beside them on the engine's machine (the API
    /// and the store of `serve`): the containers of all tasks together get at most the
    /// machine's cores less this (a CPU group, `ContainerRuntime::ensure_cpu_group`). 0
    /// (the default here; `serve` keeps half a core) caps nothing.
    pub reserve_cpus: f64,
    /// Run even when the engine cannot enforce memory limits. Default false: the runner
    /// refuses, because one task could then take the whole machine down.
    pub allow_unlimited_memory: bool,
    /// The network tasks run on (the managed, isolated one for `bridge`) and what they may
    /// reach from it.
    pub network: TaskNetworkConfig,
    /// Where the runner spools code packages on their way into containers, in a directory of
    /// its own (`runner-<id>`): a file per task being prepared, removed when its attempt ends
    /// and, what a killed runner left, when the runner starts again. Give it a disk with room
    /// for `capacity` packages; not a memory-backed `/tmp`. Default: the system's temporary
    /// directory (`stevedore serve` and `stevedore runner` use `work` in their data
    /// directory).
    pub work_dir: PathBuf,
}

/// What a [`RunnerConfig`] comes to on a given engine: the derived defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolvedLimits {
    pub capacity: u32,
    pub memory_budget_mib: u64,
    /// The CPU group every task container goes into, when the CPU reserve is held.
    pub cpu_group: Option<String>,
}

/// The default capacity: four tasks per core (tasks mostly wait on IO), but no more than
/// the memory budget holds at the default memory limit, and at least one.
pub fn default_capacity(ncpu: u64, memory_budget_mib: u64) -> u32 {
    let by_cores = ncpu.max(1).saturating_mul(4);
    let by_memory = memory_budget_mib / u64::from(DEFAULT_MEMORY_MIB);
    u32::try_from(by_cores.min(by_memory).max(1)).unwrap_or(u32::MAX)
}

/// The default memory budget: 90% of the engine machine's memory, leaving the rest to the
/// engine, the runner and the operating system. An engine that reports no memory gets room
/// for one default task.
pub fn default_memory_budget_mib(mem_total_bytes: u64) -> u64 {
    let total_mib = mem_total_bytes >> 20;
    if total_mib == 0 {
        return u64::from(DEFAULT_MEMORY_MIB);
    }
    total_mib / 10 * 9
}

// === impl RunnerConfig ===

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            runner_id: "embedded".to_owned(),
            clusters: vec![DEFAULT_CLUSTER.to_owned()],
            capacity: None,
            memory_budget_mib: None,
            prepare_ahead: 1,
            lease_secs: 30,
            heartbeat_interval: Duration::from_secs(1),
            idle_poll_interval: Duration::from_secs(1),
            log_cap_bytes: 10 << 20,
            log_flush_interval: Duration::from_millis(200),
            log_flush_bytes: 64 << 10,
            progress_interval: Duration::from_millis(250),
            shutdown_grace: Duration::from_secs(30),
            max_infra_attempts: 5,
            requeue_backoff_base: Duration::from_secs(2),
            requeue_backoff_max: Duration::from_secs(300),
            stacks: StackTable::default(),
            registry_auth: Vec::new(),
            code_images: CodeImages::local(),
            pids_limit: Some(512),
            pull_timeout: Duration::from_secs(600),
            max_image_bytes: Some(10 << 30),
            image_disk_budget_mib: Some(20 << 10),
            image_janitor_interval: Duration::from_secs(300),
            reap_gone_interval: Some(Duration::from_secs(60)),
            lease_ledger: None,
            default_cpus: Some(1.0),
            reserve_cpus: 0.0,
            allow_unlimited_memory: false,
            network: TaskNetworkConfig::default(),
            work_dir: std::env::temp_dir().join("stevedore"),
        }
    }
}

impl RunnerConfig {
    /// Checks what would make the runner misbehave rather than fail.
    pub fn validate(&self) -> Result<(), RunnerError> {
        let invalid = |why: &str| Err(RunnerError::InvalidConfig(why.to_owned()));
        if self.runner_id.trim().is_empty() {
            return invalid("runner_id is empty");
        }
        if self.clusters.is_empty() {
            return invalid("clusters is empty: the runner would never get a task");
        }
        if self.capacity == Some(0) {
            return invalid("capacity is 0: the runner would never run a task");
        }
        if self.memory_budget_mib == Some(0) {
            return invalid("memory_budget_mib is 0: no task would ever fit");
        }
        if self.lease_secs == 0 {
            return invalid("lease_secs is 0");
        }
        if self.heartbeat_interval.is_zero()
            || self.heartbeat_interval >= Duration::from_secs(u64::from(self.lease_secs))
        {
            return invalid("heartbeat_interval must be above 0 and shorter than the lease");
        }
        if self.idle_poll_interval.is_zero() || self.log_flush_interval.is_zero() {
            return invalid("idle_poll_interval and log_flush_interval must be above 0");
        }
        if self.log_flush_bytes == 0 {
            return invalid("log_flush_bytes is 0");
        }
        if self.image_disk_budget_mib == Some(0) || self.image_janitor_interval.is_zero() {
            return invalid("image_disk_budget_mib and image_janitor_interval must be above 0");
        }
        if self
            .reap_gone_interval
            .is_some_and(|interval| interval.is_zero())
        {
            return invalid("reap_gone_interval must be above 0 (None turns reaping off)");
        }
        if self.pull_timeout.is_zero() || self.max_image_bytes == Some(0) {
            return invalid("pull_timeout and max_image_bytes must be above 0");
        }
        if self.pids_limit == Some(0) {
            return invalid("pids_limit is 0: not even the task's own process could run");
        }
        if self
            .default_cpus
            .is_some_and(|cpus| !(cpus.is_finite() && (0.01..=1024.0).contains(&cpus)))
        {
            return invalid("default_cpus must be between 0.01 and 1024");
        }
        if !(self.reserve_cpus.is_finite() && self.reserve_cpus >= 0.0) {
            return invalid("reserve_cpus must be 0 or more");
        }
        if let Err(error) = self.network.spec.validate() {
            return invalid(&format!("task network: {error}"));
        }
        Ok(())
    }

    /// Fills in the derived defaults for an engine with `ncpu` cores and `mem_total_bytes`.
    pub(crate) fn resolve(&self, ncpu: u64, mem_total_bytes: u64) -> ResolvedLimits {
        let memory_budget_mib = self
            .memory_budget_mib
            .unwrap_or_else(|| default_memory_budget_mib(mem_total_bytes));
        ResolvedLimits {
            capacity: self
                .capacity
                .unwrap_or_else(|| default_capacity(ncpu, memory_budget_mib)),
            memory_budget_mib,
            cpu_group: None,
        }
    }

    /// The CPUs all tasks together may use on an engine with `ncpu` cores, in billionths of
    /// a CPU: `None` without a reserve; an error when the reserve leaves nothing.
    pub(crate) fn task_cpus(&self, ncpu: u64) -> Result<Option<u64>, RunnerError> {
        if self.reserve_cpus <= 0.0 {
            return Ok(None);
        }
        let left = ncpu as f64 - self.reserve_cpus;
        if left < 0.01 {
            return Err(RunnerError::InvalidConfig(format!(
                "reserve_cpus {} leaves no CPU for tasks on an engine with {ncpu} cores",
                self.reserve_cpus
            )));
        }
        Ok(Some((left * 1e9).round() as u64))
    }

    /// The name of this runner's CPU group: one per runner id, so two runners on one host
    /// never change each other's cap.
    pub(crate) fn cpu_group_name(&self) -> String {
        let id: String = self
            .runner_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(48)
            .collect();
        format!("stevedore-{id}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_defaults_follow_cores_and_memory() {
        // 2 cores, 24 GiB: cores decide.
        assert_eq!(default_capacity(2, 22_000), 8);
        // 16 cores, 1 GiB: memory decides.
        assert_eq!(default_capacity(16, 1024), 4);
        // Never zero.
        assert_eq!(default_capacity(0, 0), 1);
        assert_eq!(default_memory_budget_mib(8 << 30), 7371);
        assert_eq!(default_memory_budget_mib(0), 256);
    }

    #[test]
    fn explicit_values_win_over_derived_ones() {
        let config = RunnerConfig {
            capacity: Some(3),
            memory_budget_mib: Some(1000),
            ..RunnerConfig::default()
        };
        assert_eq!(
            config.resolve(64, 1 << 40),
            ResolvedLimits {
                capacity: 3,
                memory_budget_mib: 1000,
                cpu_group: None,
            }
        );
    }

    #[test]
    fn the_cpu_reserve_leaves_the_rest_to_tasks_or_is_refused() {
        let config = RunnerConfig {
            reserve_cpus: 0.5,
            runner_id: "a b/c".into(),
            ..RunnerConfig::default()
        };
        assert_eq!(config.task_cpus(2).ok(), Some(Some(1_500_000_000)));
        assert!(config.task_cpus(0).is_err());
        assert_eq!(RunnerConfig::default().task_cpus(2).ok(), Some(None));
        assert_eq!(config.cpu_group_name(), "stevedore-a-b-c");
    }

    #[test]
    fn the_default_config_is_valid_and_nonsense_is_not() {
        assert!(RunnerConfig::default().validate().is_ok());
        for broken in [
            RunnerConfig {
                clusters: Vec::new(),
                ..RunnerConfig::default()
            },
            RunnerConfig {
                capacity: Some(0),
                ..RunnerConfig::default()
            },
            RunnerConfig {
                heartbeat_interval: Duration::from_secs(30),
                ..RunnerConfig::default()
            },
            RunnerConfig {
                default_cpus: Some(0.0),
                ..RunnerConfig::default()
            },
            RunnerConfig {
                reserve_cpus: -1.0,
                ..RunnerConfig::default()
            },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }
}
