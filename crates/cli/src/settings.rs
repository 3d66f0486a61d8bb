//! Settings of `stevedore serve` and the admin commands: defaults, then a TOML file, then
//! `STEVEDORE_*` environment variables, then command-line flags — each overriding the last.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use stevedore_engine::{
    DEFAULT_BLOCKED_RANGES, Destination, NetworkSpec, RegistryAuth, parse_ipv4_net,
};
use stevedore_model::stack::StackSetting;
use stevedore_model::{CodeImages, QuotaLimits, StackImages, StackTable, limits};
use stevedore_runner::{PublishedApi, RunnerConfig, TaskNetworkConfig};
use stevedore_server::ServerConfig;
use stevedore_server::retention::{Pace, RetentionConfig, RetentionPolicy};
use stevedore_store::{PgOptions, SqliteOptions, SyncMode};

/// The CPUs `serve` keeps from its embedded runner's tasks for the API and the store, unless
/// `runner.reserve_cpus` says otherwise.
pub const SERVE_RESERVE_CPUS: f64 = 0.5;

/// Everything configurable, as read from files and the environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Where the server listens.
    pub listen: SocketAddr,
    /// Where the database and `iron.json` live.
    pub data_dir: PathBuf,
    /// The database: absent for SQLite in `data_dir` (the default), or a `postgres://` URL of a
    /// PostgreSQL database that several servers share.
    pub database: Option<String>,
    /// The most connections to PostgreSQL this server opens.
    pub database_max_connections: u32,
    /// SQLite only: `normal` survives a crash of the process; `full` also a power failure.
    pub sync: String,
    pub max_payload_bytes: usize,
    pub max_package_bytes: usize,
    pub max_unpacked_bytes: u64,
    pub min_run_every_secs: u32,
    /// A runner unseen this long (no lease asked for) and holding no live lease counts as
    /// gone: cluster statistics drop it, and a runner sharing its engine removes its
    /// containers. Above the longest a runner waits between lease calls (30 s).
    pub runner_online_window_secs: u64,
    /// How often the scheduler looks for due schedules, in milliseconds: a scheduled task
    /// starts at most this late.
    pub scheduler_interval_ms: u64,
    /// Which images the built-in stacks run on: `official` (default), each language's
    /// official image as a connected machine pulls it, or `local`, the images
    /// `stevedore stack build-local` builds from Debian's archive without any registry.
    pub stack_images: StackImages,
    /// Changes to the built-in stacks (`[[stacks]]` with a stack's `name` and a new `image`,
    /// `aliases` or `runtimes`) and stacks of one's own (`name`, `image`, `runtimes`, and
    /// optionally `aliases`).
    pub stacks: Vec<StackSetting>,
    pub runner: RunnerSettings,
    /// The network tasks run on and what they may reach (`[task_network]`), for the
    /// embedded runner, remote runners and `run`, and for the server's check of a code's
    /// `network`.
    pub task_network: TaskNetworkSettings,
    pub metrics: MetricsSettings,
    /// The key that seals projects' registry passwords, 64 hex digits. Servers sharing a
    /// PostgreSQL database must all have the same key: set it here (or
    /// `STEVEDORE_CREDENTIAL_KEY`) or point `credential_key_file` at one shared file. Absent,
    /// the key comes from `credential_key_file`.
    pub credential_key: Option<Secret>,
    /// A file holding the key (64 hex digits). Default `credential.key` in the data directory,
    /// created with a random key (mode 0600) on the first start.
    pub credential_key_file: Option<PathBuf>,
    /// The operator's registry for the images `code push --dockerfile` builds: when set, they
    /// are pushed there (under `<server_address>/<repository>/<project id>/`) so runners on
    /// other machines can pull them; absent, they stay on the machine that built them.
    pub code_registry: Option<CodeRegistrySettings>,
    /// What one project may hold (`[quotas]`, `STEVEDORE_QUOTAS__<KEY>`): the defaults of
    /// every project; an admin sets a project's own with `PUT /2/projects/{id}/quotas`.
    /// Servers sharing a PostgreSQL database should all have the same.
    pub quotas: QuotaLimits,
    /// How long finished work's data is kept (`[retention]`, `STEVEDORE_RETENTION__<KEY>`):
    /// the leader removes older logs, payloads and packages every `interval_secs`;
    /// `stevedore gc` does it at once.
    pub retention: RetentionSettings,
    /// What runs the task containers of `serve`'s runner and of `stevedore runner`:
    /// `docker` (the default) or `oci` (`STEVEDORE_ENGINE`, `--engine`).
    pub engine: EngineKind,
    /// The direct OCI runtime (`[oci]`, `STEVEDORE_OCI__<KEY>`), when `engine = "oci"`.
    pub oci: OciSettings,
}

/// What runs task containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// The Docker engine: images it builds, pulls and holds, containers it runs.
    #[default]
    Docker,
    /// An OCI runtime (`crun`, or `runc`) driven directly, on images unpacked into
    /// stevedore's own store: a container starts in a fraction of Docker's time.
    Oci,
}

/// `[oci]`: the direct OCI runtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct OciSettings {
    /// The runtime: `crun`, `runc` or a path to either. Absent: `crun` when installed,
    /// `runc` otherwise.
    pub runtime: Option<PathBuf>,
    /// Where bundles, the runtime's state and the image store live: a local file system
    /// that holds device nodes and extended attributes (ext4, xfs, tmpfs; not overlayfs).
    /// Absent: `oci` in the data directory.
    pub root: Option<PathBuf>,
    /// The task network's bridge (at most 14 characters): the engine's own, not the Docker
    /// network's (`task_network.bridge`), so both engines can run on one host.
    pub bridge: String,
    /// The task network's IPv4 subnet.
    pub subnet: String,
    /// Network namespaces kept ready for tasks.
    pub pool_size: usize,
    /// Take images the local Docker engine has from it (the stacks `stack build-local`
    /// built, images pushed nowhere); pull the others from their registries.
    pub import_from_docker: bool,
    /// Registries (`host:port`) that may be reached over plain HTTP when they do not speak
    /// TLS; loopback ones always may. Every other registry is reached over HTTPS only.
    pub insecure_registries: Vec<String>,
    /// A PEM file of CA certificates trusted for registries' HTTPS besides the system's
    /// roots: the authority of private registries with certificates of their own. Absent:
    /// the system's roots alone.
    pub ca_file: Option<PathBuf>,
}

impl Default for OciSettings {
    fn default() -> Self {
        OciSettings {
            runtime: None,
            root: None,
            bridge: stevedore_engine::oci::DEFAULT_TASK_BRIDGE.to_owned(),
            subnet: stevedore_engine::oci::DEFAULT_TASK_SUBNET.to_string(),
            pool_size: 8,
            import_from_docker: true,
            insecure_registries: Vec::new(),
            ca_file: None,
        }
    }
}

/// `[retention]`: what finished work leaves behind, and for how long it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    /// Remove old data on the leader (the default); off, nothing is removed but by
    /// `stevedore gc`.
    pub enabled: bool,
    /// Days a finished task's log is kept after the task ended.
    pub log_days: u32,
    /// Days a finished task's payload is kept after the task ended.
    pub payload_days: u32,
    /// Revisions per code whose packages are kept, the latest ones.
    pub keep_revisions: u32,
    /// Seconds from the start of one retention pass to the start of the next.
    pub interval_secs: u64,
}

/// The longest age retention takes: a century.
const MAX_RETENTION_DAYS: u32 = 36_500;
/// The longest time between two retention passes: thirty days.
const MAX_RETENTION_INTERVAL_SECS: u64 = 30 * 86_400;

/// A setting that must never be printed (a password, a key): its `Debug` says only whether
/// it is set.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The operator's registry for built code images, with the operator's credentials for it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CodeRegistrySettings {
    /// The registry's address, e.g. `registry.example.com:5000`.
    pub server_address: String,
    /// The repository path the images go under (default `stevedore`).
    #[serde(default = "default_code_repository")]
    pub repository: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl CodeRegistrySettings {
    /// The operator's credentials for the registry.
    pub fn auth(&self) -> RegistryAuth {
        RegistryAuth {
            username: self.username.clone(),
            password: self.password.as_ref().map(|secret| secret.0.clone()),
            identity_token: None,
            server_address: Some(self.server_address.clone()),
        }
    }
}

fn default_code_repository() -> String {
    "stevedore".to_owned()
}

/// `GET /metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsSettings {
    /// On the API's address, ask scrapers for an admin token (the default); off
    /// (`STEVEDORE_METRICS__TOKEN_REQUIRED=false`), anyone who reaches the API may scrape
    /// every project's code and cluster names.
    pub token_required: bool,
    /// Also serve `/metrics`, without a token, on this address of its own
    /// (`STEVEDORE_METRICS__LISTEN=127.0.0.1:9464`), for a scraper the operator lets reach it.
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            token_required: true,
            listen: None,
        }
    }
}

/// The runner embedded in `serve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerSettings {
    /// Run tasks in this process. Off, `serve` only stores them (for API-only servers).
    pub enabled: bool,
    /// The runner's id. At start-up the runner removes the containers and gives back the
    /// tasks an earlier life of the same id left behind, so no two runners may share one.
    /// Absent (the default): an id made unique once and kept in the data directory.
    pub id: Option<String>,
    pub clusters: Vec<String>,
    /// The most tasks at once; derived from cores and memory when absent.
    pub capacity: Option<u32>,
    /// Memory the runner may hand out to containers, MiB; 90% of the engine's when absent.
    pub memory_budget_mib: Option<u64>,
    /// Tasks leased beyond the slots while all are busy, their containers made ready to
    /// start the moment a slot frees; only while recent tasks ran short. 0: none.
    pub prepare_ahead: u32,
    pub lease_secs: u32,
    pub log_cap_bytes: u64,
    pub shutdown_grace_secs: u64,
    /// Infrastructure failures of one task before it ends `error`.
    pub max_infra_attempts: u32,
    pub pids_limit: Option<u64>,
    /// How long a task's image pull may take before the attempt is given back as the
    /// infrastructure's failure.
    pub pull_timeout_secs: u64,
    /// The largest image a task may pull, bytes (download sizes while pulling, the size on
    /// disk after); over it the task ends `error`. 0: no limit.
    pub max_image_bytes: u64,
    /// The disk the engine's images may take, MiB; over it the images this runner used least
    /// recently (and no task uses now) are removed, never a stack image. 0: never removed.
    pub image_disk_budget_mib: u64,
    /// How often the runner looks on its engine for containers of runners the server reports
    /// gone, and removes them. 0: never.
    pub reap_gone_interval_secs: u64,
    /// The CPU limit of a task whose code sets no `cpus`; 0 leaves such tasks unlimited.
    pub default_cpus: f64,
    /// CPUs kept from the tasks for the API and the store: all task containers together get
    /// the engine's cores less this. Absent: half a core in `serve`, none in `runner` and
    /// `run`, which serve no API.
    pub reserve_cpus: Option<f64>,
    /// Run even when the engine cannot enforce memory limits (not recommended).
    pub allow_unlimited_memory: bool,
    /// Credentials for pulling from private registries.
    pub registries: Vec<RegistrySettings>,
    /// Where the runner spools code packages on their way into containers (a file per task
    /// being prepared, gone when its attempt ends). Absent: `work` in the data directory for
    /// `serve` and `runner`, the system's temporary directory for `run`. Give it a disk, not
    /// a memory-backed `/tmp`.
    pub work_dir: Option<PathBuf>,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        let policy = RetentionPolicy::default();
        RetentionSettings {
            enabled: true,
            log_days: days_of(policy.log_age),
            payload_days: days_of(policy.payload_age),
            keep_revisions: policy.keep_revisions,
            interval_secs: 3600,
        }
    }
}

impl RetentionSettings {
    /// What is kept, checked: every age at least a day, at least one revision's package. A
    /// zero would remove a task's log the moment it ends, or the package its code runs, which
    /// no operator means as a standing setting (`stevedore gc --log-days 0` does it once).
    pub fn policy(&self) -> anyhow::Result<RetentionPolicy> {
        let days = |key: &str, days: u32| -> anyhow::Result<chrono::TimeDelta> {
            anyhow::ensure!(
                (1..=MAX_RETENTION_DAYS).contains(&days),
                "invalid configuration: retention.{key} must be between 1 and \
                 {MAX_RETENTION_DAYS} days, not {days}"
            );
            Ok(chrono::TimeDelta::days(i64::from(days)))
        };
        anyhow::ensure!(
            self.keep_revisions >= 1,
            "invalid configuration: retention.keep_revisions must be at least 1 (the latest \
             revision's package is what the code runs), not 0"
        );
        Ok(RetentionPolicy {
            log_age: days("log_days", self.log_days)?,
            payload_age: days("payload_days", self.payload_days)?,
            keep_revisions: self.keep_revisions,
        })
    }

    /// The leader's duty, checked; `None` when retention is off. Checked when it is off too,
    /// so that turning it on never meets a broken setting.
    pub fn config(&self) -> anyhow::Result<Option<RetentionConfig>> {
        let policy = self.policy()?;
        anyhow::ensure!(
            (1..=MAX_RETENTION_INTERVAL_SECS).contains(&self.interval_secs),
            "invalid configuration: retention.interval_secs must be between 1 and \
             {MAX_RETENTION_INTERVAL_SECS}, not {}",
            self.interval_secs
        );
        Ok(self.enabled.then(|| RetentionConfig {
            policy,
            interval: Duration::from_secs(self.interval_secs),
            pace: Pace::default(),
        }))
    }
}

/// Whole days of an age.
fn days_of(age: chrono::TimeDelta) -> u32 {
    u32::try_from(age.num_days()).unwrap_or(u32::MAX)
}

/// `[task_network]`: the network `bridge` codes run on, isolated from the host, from each
/// other and from the blocked ranges.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskNetworkSettings {
    /// The Docker network's name.
    pub name: String,
    /// The host's bridge interface for it (at most 14 characters), which the firewall rules
    /// match.
    pub bridge: String,
    /// Its IPv4 subnet (`172.30.0.0/16`); absent, Docker picks one that collides with nothing.
    pub subnet: Option<String>,
    /// The ranges (`CIDR` or address) tasks never reach. Default: private, carrier-grade NAT,
    /// link-local, loopback and the other special ranges.
    pub blocked: Vec<String>,
    /// Destinations tasks reach all the same: `ADDRESS[/PREFIX][:PORT]`.
    pub allowed: Vec<String>,
    /// The API's URL as tasks should use it (`http://172.30.0.1:8080`): reachable from the
    /// task network, and handed to tasks as `IRON_HOST`, `IRON_PORT`, `IRON_PROTOCOL`.
    pub api_url: Option<String>,
    /// Other Docker networks a code may name as its `network`.
    pub named_networks: Vec<String>,
    /// Run tasks even when the network cannot be isolated (no root, no iptables, a remote
    /// engine): they can then reach this host, each other and private ranges.
    pub unguarded: bool,
    /// On Docker, task containers join running network holder containers, one task per
    /// holder at a time, rather than getting a network namespace made for each (a third of
    /// the engine's work per task). `false` gives every task its own, and with it a writable
    /// `/etc/hosts` (a holder's is read-only to the task).
    pub holders: bool,
}

impl Default for TaskNetworkSettings {
    fn default() -> Self {
        let defaults = TaskNetworkConfig::default();
        Self {
            name: defaults.spec.name,
            bridge: defaults.spec.bridge,
            subnet: None,
            blocked: DEFAULT_BLOCKED_RANGES
                .iter()
                .map(|range| (*range).to_owned())
                .collect(),
            allowed: Vec::new(),
            api_url: None,
            named_networks: Vec::new(),
            unguarded: false,
            holders: true,
        }
    }
}

impl TaskNetworkSettings {
    /// The runner's view, parsed and checked.
    pub fn config(&self) -> anyhow::Result<TaskNetworkConfig> {
        let context = |what: &str| format!("invalid configuration: task_network.{what}");
        let subnet = self
            .subnet
            .as_deref()
            .filter(|subnet| !subnet.trim().is_empty())
            .map(parse_ipv4_net)
            .transpose()
            .map_err(anyhow::Error::msg)
            .with_context(|| context("subnet"))?;
        let blocked = self
            .blocked
            .iter()
            .map(|range| parse_ipv4_net(range))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)
            .with_context(|| context("blocked"))?;
        let allowed = self
            .allowed
            .iter()
            .map(|destination| destination.parse::<Destination>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)
            .with_context(|| context("allowed"))?;
        let api = self
            .api_url
            .as_deref()
            .filter(|url| !url.trim().is_empty())
            .map(published_api)
            .transpose()
            .with_context(|| context("api_url"))?;
        for name in &self.named_networks {
            anyhow::ensure!(
                !["host", "bridge", "none", "default"].contains(&name.as_str())
                    && *name != self.name,
                "{}: {name:?} cannot be listed (host is never allowed; bridge, none and the task \
                 network are there already)",
                context("named_networks")
            );
        }
        let config = TaskNetworkConfig {
            spec: NetworkSpec {
                name: self.name.clone(),
                bridge: self.bridge.clone(),
                subnet,
            },
            blocked,
            allowed,
            api,
            named_networks: self.named_networks.clone(),
            unguarded: self.unguarded,
        };
        config
            .spec
            .validate()
            .map_err(|error| anyhow::anyhow!("invalid configuration: task_network: {error}"))?;
        Ok(config)
    }
}

/// `http(s)://host[:port][/]`: where tasks find the API.
fn published_api(url: &str) -> anyhow::Result<PublishedApi> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("{url:?} is not a URL"))?;
    anyhow::ensure!(
        matches!(parsed.scheme(), "http" | "https"),
        "{url:?} must be an http:// or https:// URL"
    );
    anyhow::ensure!(
        parsed.path() == "/" || parsed.path().is_empty(),
        "{url:?} must name the server only (no path): the clients add /2/..."
    );
    let host = match parsed.host_str() {
        Some(host) if !host.starts_with('[') => host.to_owned(),
        _ => anyhow::bail!("{url:?} needs a host name or an IPv4 address (tasks have no IPv6)"),
    };
    let port = parsed
        .port_or_known_default()
        .with_context(|| format!("{url:?} has no port"))?;
    Ok(PublishedApi {
        protocol: parsed.scheme().to_owned(),
        host,
        port,
    })
}

/// Credentials for one registry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegistrySettings {
    /// The registry's address, e.g. `registry.example.com`.
    pub server_address: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub identity_token: Option<String>,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        let defaults = RunnerConfig::default();
        Self {
            enabled: true,
            id: None,
            clusters: defaults.clusters,
            capacity: None,
            memory_budget_mib: None,
            prepare_ahead: defaults.prepare_ahead,
            lease_secs: defaults.lease_secs,
            log_cap_bytes: defaults.log_cap_bytes,
            shutdown_grace_secs: defaults.shutdown_grace.as_secs(),
            max_infra_attempts: defaults.max_infra_attempts,
            pids_limit: defaults.pids_limit,
            pull_timeout_secs: defaults.pull_timeout.as_secs(),
            max_image_bytes: defaults.max_image_bytes.unwrap_or(0),
            image_disk_budget_mib: defaults.image_disk_budget_mib.unwrap_or(0),
            reap_gone_interval_secs: defaults
                .reap_gone_interval
                .map_or(0, |interval| interval.as_secs()),
            default_cpus: defaults.default_cpus.unwrap_or(0.0),
            reserve_cpus: None,
            allow_unlimited_memory: defaults.allow_unlimited_memory,
            registries: Vec::new(),
            work_dir: None,
        }
    }
}

/// The placeholder id of a runner config before the runner's identity is settled
/// (`identity::runner_identity`).
fn defaults_runner_id() -> String {
    RunnerConfig::default().runner_id
}

impl RunnerSettings {
    pub fn runner_config(&self, stacks: &StackTable) -> RunnerConfig {
        RunnerConfig {
            runner_id: self.id.clone().unwrap_or(defaults_runner_id()),
            clusters: self.clusters.clone(),
            capacity: self.capacity,
            memory_budget_mib: self.memory_budget_mib,
            prepare_ahead: self.prepare_ahead,
            lease_secs: self.lease_secs,
            log_cap_bytes: self.log_cap_bytes,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            max_infra_attempts: self.max_infra_attempts,
            pids_limit: self.pids_limit,
            pull_timeout: Duration::from_secs(self.pull_timeout_secs),
            max_image_bytes: (self.max_image_bytes > 0).then_some(self.max_image_bytes),
            image_disk_budget_mib: (self.image_disk_budget_mib > 0)
                .then_some(self.image_disk_budget_mib),
            reap_gone_interval: (self.reap_gone_interval_secs > 0)
                .then(|| Duration::from_secs(self.reap_gone_interval_secs)),
            default_cpus: (self.default_cpus > 0.0).then_some(self.default_cpus),
            reserve_cpus: self.reserve_cpus.unwrap_or(0.0),
            allow_unlimited_memory: self.allow_unlimited_memory,
            stacks: stacks.clone(),
            registry_auth: self
                .registries
                .iter()
                .map(|registry| RegistryAuth {
                    username: registry.username.clone(),
                    password: registry.password.clone(),
                    identity_token: registry.identity_token.clone(),
                    server_address: Some(registry.server_address.clone()),
                })
                .collect(),
            ..RunnerConfig::default()
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        let server = ServerConfig::default();
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("stevedore-data"),
            database: None,
            database_max_connections: 10,
            sync: "normal".to_owned(),
            max_payload_bytes: limits::DEFAULT_MAX_PAYLOAD_BYTES,
            max_package_bytes: server.package.max_bytes,
            max_unpacked_bytes: server.package.max_unpacked_bytes,
            min_run_every_secs: limits::DEFAULT_MIN_RUN_EVERY_SECS,
            runner_online_window_secs: server.runner_api.online_window.as_secs(),
            scheduler_interval_ms: 1000,
            stack_images: StackImages::default(),
            stacks: Vec::new(),
            runner: RunnerSettings::default(),
            task_network: TaskNetworkSettings::default(),
            metrics: MetricsSettings::default(),
            credential_key: None,
            credential_key_file: None,
            code_registry: None,
            quotas: QuotaLimits::default(),
            retention: RetentionSettings::default(),
            engine: EngineKind::default(),
            oci: OciSettings::default(),
        }
    }
}

impl Settings {
    /// Reads defaults, the file (when given or when `stevedore.toml` exists here) and the
    /// environment.
    pub fn load(config_file: Option<&Path>) -> anyhow::Result<Settings> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        match config_file {
            Some(path) => {
                anyhow::ensure!(
                    path.exists(),
                    "the configuration file {} does not exist",
                    path.display()
                );
                figment = figment.merge(Toml::file(path));
            }
            None => figment = figment.merge(Toml::file("stevedore.toml")),
        }
        figment
            // `STEVEDORE_RUNNER__CAPACITY=4` sets `runner.capacity`.
            .merge(Env::prefixed("STEVEDORE_").split("__"))
            .extract()
            .context("invalid configuration")
    }

    /// Where PostgreSQL is, when `database` names it; `None` for SQLite.
    pub fn postgres_options(&self) -> anyhow::Result<Option<PgOptions>> {
        let Some(url) = self.database.as_deref().filter(|url| !url.is_empty()) else {
            return Ok(None);
        };
        anyhow::ensure!(
            url.starts_with("postgres://") || url.starts_with("postgresql://"),
            "database must be a postgres:// URL (or absent for SQLite in the data directory)"
        );
        Ok(Some(PgOptions {
            max_connections: self.database_max_connections,
            ..PgOptions::new(url)
        }))
    }

    pub fn store_options(&self) -> anyhow::Result<SqliteOptions> {
        let sync = match self.sync.as_str() {
            "normal" => SyncMode::Normal,
            "full" => SyncMode::Full,
            other => anyhow::bail!("sync must be \"normal\" or \"full\", not {other:?}"),
        };
        Ok(SqliteOptions {
            path: self.data_dir.join("stevedore.db"),
            sync,
        })
    }

    /// The runner's configuration: the `runner` section (its work directory `work` in the
    /// data directory unless set), the stacks, the operator's code registry (whose images it
    /// recognizes and whose credentials it pulls them with) and the task network.
    pub fn runner_config(&self, stacks: &StackTable) -> anyhow::Result<RunnerConfig> {
        let mut config = self.runner.runner_config(stacks);
        config.work_dir = self
            .runner
            .work_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("work"));
        config.code_images = self.code_images();
        if let Some(registry) = &self.code_registry {
            config.registry_auth.insert(0, registry.auth());
        }
        config.network = self.task_network.config()?;
        Ok(config)
    }

    /// The configuration of the runner embedded in `serve`: [`Settings::runner_config`],
    /// keeping [`SERVE_RESERVE_CPUS`] for the API and the store unless `runner.reserve_cpus`
    /// says otherwise.
    pub fn embedded_runner_config(&self, stacks: &StackTable) -> anyhow::Result<RunnerConfig> {
        let mut config = self.runner_config(stacks)?;
        if self.runner.reserve_cpus.is_none() {
            config.reserve_cpus = SERVE_RESERVE_CPUS;
        }
        Ok(config)
    }

    /// Where `code push --dockerfile` puts the images it builds.
    pub fn code_images(&self) -> CodeImages {
        match &self.code_registry {
            Some(registry) => CodeImages {
                registry: Some(registry.server_address.clone()),
                repository: registry.repository.clone(),
            },
            None => CodeImages::local(),
        }
    }

    /// The built-in stacks on the chosen images, with the configured changes.
    pub fn stack_table(&self) -> anyhow::Result<StackTable> {
        StackTable::configured(self.stack_images, &self.stacks).context("invalid configuration")
    }

    /// The OCI engine's root directory.
    pub fn oci_root(&self) -> PathBuf {
        let root = self
            .oci
            .root
            .clone()
            .unwrap_or_else(|| self.data_dir.join("oci"));
        // Absolute: a watchdog started from elsewhere is handed the same root.
        std::path::absolute(&root).unwrap_or(root)
    }

    /// The OCI engine's set-up, checked: [`Settings::oci`] with the runner's image limits
    /// and the task network's blocked and allowed ranges (the runner applies the published
    /// API's address when it isolates the network).
    pub fn oci_engine_settings(&self) -> anyhow::Result<stevedore_engine::oci::OciEngineSettings> {
        use stevedore_engine::oci::{NetnsPoolSettings, OciImagesSettings};
        let root = self.oci_root();
        let subnet = parse_ipv4_net(&self.oci.subnet)
            .map_err(|error| anyhow::anyhow!("invalid configuration: oci.subnet: {error}"))?;
        let task_network = self.task_network.config()?;
        let network = NetnsPoolSettings {
            network: task_network.spec.name.clone(),
            bridge: self.oci.bridge.clone(),
            subnet,
            size: self.oci.pool_size.max(1),
            ..NetnsPoolSettings::default()
        };
        network
            .validate()
            .map_err(|error| anyhow::anyhow!("invalid configuration: oci: {error}"))?;
        let mut images = OciImagesSettings::new(root.join("images"));
        images.max_image_bytes =
            (self.runner.max_image_bytes > 0).then_some(self.runner.max_image_bytes);
        images.pull_timeout = Duration::from_secs(self.runner.pull_timeout_secs.max(1));
        images
            .insecure_registries
            .clone_from(&self.oci.insecure_registries);
        images.extra_ca_file.clone_from(&self.oci.ca_file);
        Ok(stevedore_engine::oci::OciEngineSettings {
            runtime: stevedore_engine::oci::OciSettings {
                state_root: root,
                runtime: self.oci.runtime.clone(),
            },
            images,
            network,
            import_from_docker: self.oci.import_from_docker,
        })
    }

    /// Where uploaded packages are spooled while they arrive: beside the database, never
    /// in memory.
    pub fn upload_dir(&self) -> PathBuf {
        self.data_dir.join("uploads")
    }

    pub fn server_config(&self) -> anyhow::Result<ServerConfig> {
        let mut config = ServerConfig {
            max_payload_bytes: self.max_payload_bytes,
            min_run_every_secs: self.min_run_every_secs,
            stacks: self.stack_table()?,
            ..ServerConfig::default()
        };
        config.package.max_bytes = self.max_package_bytes;
        config.package.max_unpacked_bytes = self.max_unpacked_bytes;
        config.upload_dir = self.upload_dir();
        if self.runner_online_window_secs == 0 {
            anyhow::bail!("runner_online_window_secs must be above 0");
        }
        config.runner_api.online_window = Duration::from_secs(self.runner_online_window_secs);
        config.metrics.token_required = self.metrics.token_required;
        config.code_images = self.code_images();
        config.named_networks = self.task_network.config()?.named_networks;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str) -> anyhow::Result<Settings> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("stevedore.toml");
        std::fs::write(&path, toml)?;
        Settings::load(Some(&path))
    }

    #[test]
    fn stacks_run_on_the_local_images_with_changes() -> anyhow::Result<()> {
        let local = load(
            r#"
stack_images = "local"

[[stacks]]
name = "ruby-3.1"
image = "mirror.example.com/ruby:3.1"

[[stacks]]
name = "deno-2"
image = "denoland/deno:2"
runtimes = ["sh"]
"#,
        )?
        .stack_table()?;
        assert_eq!(
            local.get("node-18").map(|s| s.image.as_str()),
            Some("stevedore/stack-node:18-local")
        );
        assert_eq!(
            local.get("ruby-3.1").map(|s| s.image.as_str()),
            Some("mirror.example.com/ruby:3.1")
        );
        assert!(local.get("deno-2").is_some());
        Ok(())
    }

    #[test]
    fn the_task_network_is_parsed_once_with_the_private_ranges_blocked() -> anyhow::Result<()> {
        let defaults = Settings::default().task_network.config()?;
        assert_eq!(defaults, TaskNetworkConfig::default());
        let configured = load(
            r#"
[task_network]
name = "tasks"
bridge = "tasks0"
subnet = "172.30.0.0/24"
allowed = ["10.1.2.3:5432", "192.168.7.0/24"]
api_url = "http://172.30.0.1:8080"
named_networks = ["databases"]
"#,
        )?
        .task_network
        .config()?;
        assert_eq!(configured.spec.bridge, "tasks0");
        assert_eq!(
            configured.spec.subnet.map(|net| net.to_string()),
            Some("172.30.0.0/24".to_owned())
        );
        assert_eq!(configured.allowed.len(), 2);
        assert_eq!(configured.blocked, TaskNetworkConfig::default().blocked);
        assert_eq!(
            configured.api,
            Some(PublishedApi {
                protocol: "http".into(),
                host: "172.30.0.1".into(),
                port: 8080
            })
        );
        for broken in [
            "[task_network]\nallowed = [\"10.1.2.3:http\"]\n",
            "[task_network]\nblocked = [\"10.0.0.0/33\"]\n",
            "[task_network]\napi_url = \"ftp://x\"\n",
            "[task_network]\napi_url = \"http://x:8080/2/projects\"\n",
            "[task_network]\nnamed_networks = [\"host\"]\n",
            "[task_network]\nbridge = \"a-bridge-name-too-long\"\n",
        ] {
            let refused = load(broken).and_then(|settings| settings.task_network.config());
            let message = format!(
                "{:#}",
                refused.err().unwrap_or_else(|| anyhow::anyhow!("accepted"))
            );
            assert!(message.contains("task_network"), "{broken}: {message}");
        }
        Ok(())
    }

    #[test]
    fn the_oci_image_stores_registry_settings_reach_the_engine() -> anyhow::Result<()> {
        let settings = load(
            r#"
[oci]
insecure_registries = ["registry.internal:5000"]
ca_file = "/etc/stevedore/registry-ca.pem"
"#,
        )?;
        let images = settings.oci_engine_settings()?.images;
        assert_eq!(images.insecure_registries, ["registry.internal:5000"]);
        assert_eq!(
            images.extra_ca_file.as_deref(),
            Some(Path::new("/etc/stevedore/registry-ca.pem"))
        );
        let defaults = load("")?.oci_engine_settings()?.images;
        assert_eq!(defaults.extra_ca_file, None);
        Ok(())
    }

    #[test]
    fn packages_are_spooled_in_the_data_directory_unless_the_work_dir_is_set() -> anyhow::Result<()>
    {
        let stacks = StackTable::default();
        let defaults = load("data_dir = \"/srv/stevedore\"\n")?;
        assert_eq!(
            defaults.runner_config(&stacks)?.work_dir,
            PathBuf::from("/srv/stevedore/work")
        );
        let set = load("[runner]\nwork_dir = \"/var/spool/stevedore\"\n")?;
        assert_eq!(
            set.embedded_runner_config(&stacks)?.work_dir,
            PathBuf::from("/var/spool/stevedore")
        );
        Ok(())
    }

    #[test]
    fn quotas_come_from_the_file_over_generous_defaults() -> anyhow::Result<()> {
        let settings = load("[quotas]\nqueued_tasks = 500\ncodes = 20\n")?;
        assert_eq!(settings.quotas.queued_tasks, 500);
        assert_eq!(settings.quotas.codes, 20);
        assert_eq!(
            settings.quotas.schedules,
            QuotaLimits::default().schedules,
            "an unnamed quota keeps its default"
        );
        assert!(
            load("[quotas]\nqueud_tasks = 5\n").is_err(),
            "a misspelt quota"
        );
        Ok(())
    }

    #[test]
    fn retention_comes_from_the_file_and_refuses_zeros() -> anyhow::Result<()> {
        let defaults = Settings::default().retention;
        let config = defaults.config()?.expect("on by default");
        assert_eq!(config.policy, RetentionPolicy::default());
        assert_eq!(config.interval, Duration::from_secs(3600));
        assert_eq!(
            (
                defaults.log_days,
                defaults.payload_days,
                defaults.keep_revisions
            ),
            (30, 30, 10)
        );

        let settings = load("[retention]\nlog_days = 7\ninterval_secs = 600\n")?;
        let config = settings.retention.config()?.expect("on");
        assert_eq!(config.policy.log_age, chrono::TimeDelta::days(7));
        assert_eq!(config.policy.payload_age, chrono::TimeDelta::days(30));
        assert_eq!(config.interval, Duration::from_secs(600));
        assert_eq!(
            load("[retention]\nenabled = false\n")?.retention.config()?,
            None
        );

        for (broken, key) in [
            ("log_days = 0", "retention.log_days"),
            ("payload_days = 0", "retention.payload_days"),
            ("payload_days = 40000", "retention.payload_days"),
            ("keep_revisions = 0", "retention.keep_revisions"),
            ("interval_secs = 0", "retention.interval_secs"),
        ] {
            let refused = load(&format!("[retention]\n{broken}\n"))
                .and_then(|settings| settings.retention.config());
            let message = format!("{:#}", refused.expect_err(broken));
            assert!(message.contains(key), "{broken}: {message}");
        }
        for broken in ["log_days = -1", "log_days = \"a week\"", "log_dys = 7"] {
            let message = format!(
                "{:#}",
                load(&format!("[retention]\n{broken}\n")).expect_err(broken)
            );
            assert!(
                message.contains("invalid configuration"),
                "{broken}: {message}"
            );
        }
        Ok(())
    }

    #[test]
    fn stack_settings_of_the_old_form_are_refused() {
        // A launcher belongs to the runtime now; an old `[[stacks]]` entry says so loudly.
        let old = load("[[stacks]]\nname = \"sh\"\nimage = \"x\"\nlauncher = [\"sh\"]\n");
        assert!(old.is_err());
        let new_without_runtimes = load("[[stacks]]\nname = \"mine\"\nimage = \"x\"\n")
            .and_then(|settings| settings.stack_table());
        let message = format!("{:#}", new_without_runtimes.unwrap_err());
        assert!(message.contains("runtimes"), "{message}");
        assert!(load("stack_images = \"nearby\"\n").is_err());
    }
}
