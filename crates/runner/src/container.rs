//! The in-container contract (DESIGN.md section 5): how a task, its code revision and the
//! stacks become a [`ContainerSpec`].
//!
//! | what | value |
//! |---|---|
//! | `TASK_ID` | the task id |
//! | `TASK_DIR` | `/mnt/task`: the working directory, writable; a zip package is unpacked here |
//! | `PAYLOAD_FILE` | `/mnt/.task_payload` (the payload string as given) |
//! | `CONFIG_FILE` | `/mnt/.task_config` (the code's config string, empty when it has none) |
//! | user `env_vars` | from the code |
//! | `IRON_HOST`, `IRON_PORT`, `IRON_PROTOCOL` | the published API (`task_network.api_url`), when there is one and the code does not set them |
//! | network | `bridge`: the runner's isolated task network; `none`; or a network the operator lists |
//! | image code | `sh -c <command>` when a command is set, else the image's own entrypoint/cmd; a zip uploaded with it is unpacked into `/mnt/task` too |
//! | runtime code | on its stack's image, the runtime's launcher + `/mnt/task/<file_name>` + `-id <id> -d /mnt/task -payload /mnt/.task_payload -config /mnt/.task_config` |

use std::collections::BTreeMap;

use stevedore_engine::{ContainerSpec, FileToUpload, RegistryAuth, TASK_DIR, ZipPackage};
use stevedore_model::LeasedTask;
use stevedore_model::{CodeKind, StackTable};

use crate::config::RunnerConfig;

pub use stevedore_engine::{LABEL_LEDGER, LABEL_PROJECT, LABEL_RUNNER, LABEL_TASK};
/// Where the payload is, inside the container.
pub const PAYLOAD_FILE: &str = "/mnt/.task_payload";
/// Where the code's config is, inside the container.
pub const CONFIG_FILE: &str = "/mnt/.task_config";

/// What runs in a task's container, decided before anything is fetched: the image to make
/// present, the command, and whether the code's zip package goes in too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPlan {
    /// The image the container is created from.
    pub image: String,
    /// Overrides the image's entrypoint (`Some(vec![])` clears it); `None` keeps it.
    pub entrypoint: Option<Vec<String>>,
    /// The command; `None` runs the image's own.
    pub cmd: Option<Vec<String>>,
    /// What to do with the code's zip package, when the revision has one.
    pub package: PackagePlan,
}

/// Where a revision's zip package goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackagePlan {
    /// The revision has no package.
    None,
    /// Unpacked under `TASK_DIR`, as IronWorker did for an image code uploaded with a zip.
    Unpack,
    /// Unpacked under `TASK_DIR` with this entry point (a runtime code's `file_name`) made
    /// executable; a package without it is the user's error.
    UnpackWithEntryPoint(String),
}

// === impl PackagePlan ===

impl PackagePlan {
    /// The entry point to make executable, when there is one.
    pub fn entry_point(&self) -> Option<&str> {
        match self {
            PackagePlan::UnpackWithEntryPoint(entry_point) => Some(entry_point),
            PackagePlan::None | PackagePlan::Unpack => None,
        }
    }
}

// === impl ContainerPlan ===

impl ContainerPlan {
    /// The plan for a leased task. Fails, with a message for the user, when the code's stack
    /// is not one of this runner's or cannot launch its runtime.
    pub fn new(leased: &LeasedTask, stacks: &StackTable) -> Result<Self, String> {
        let has_package = leased.code.has_package();
        match &leased.code.spec.kind {
            CodeKind::Image { image, command } => Ok(ContainerPlan {
                image: image.clone(),
                // A command replaces whatever the image would run, entrypoint included, so it
                // runs exactly as written.
                entrypoint: command.as_ref().map(|_| Vec::new()),
                cmd: command
                    .as_ref()
                    .map(|command| vec!["sh".to_owned(), "-c".to_owned(), command.clone()]),
                package: if has_package {
                    PackagePlan::Unpack
                } else {
                    PackagePlan::None
                },
            }),
            CodeKind::Runtime {
                runtime,
                file_name,
                stack,
            } => {
                let resolved = stacks
                    .for_revision(runtime, stack.as_deref())
                    .map_err(|error| format!("this runner cannot run the code: {error}"))?;
                let entry_point = file_name.trim_start_matches("./").to_owned();
                let mut cmd: Vec<String> = resolved
                    .runtime
                    .launcher()
                    .iter()
                    .map(|part| (*part).to_owned())
                    .collect();
                cmd.extend([
                    format!("{TASK_DIR}/{entry_point}"),
                    "-id".to_owned(),
                    leased.task.id.clone(),
                    "-d".to_owned(),
                    TASK_DIR.to_owned(),
                    "-payload".to_owned(),
                    PAYLOAD_FILE.to_owned(),
                    "-config".to_owned(),
                    CONFIG_FILE.to_owned(),
                ]);
                Ok(ContainerPlan {
                    image: resolved.stack.image.clone(),
                    // The launcher is the whole command: an image entrypoint would wrap it.
                    entrypoint: Some(Vec::new()),
                    cmd: Some(cmd),
                    package: PackagePlan::UnpackWithEntryPoint(entry_point),
                })
            }
        }
    }

    /// The full container spec for the runner `config`: contract environment and files
    /// (and where the API is, when the operator publishes it, unless the code sets those
    /// variables itself), the `package` to unpack (opened with this plan's entry point,
    /// [`PackagePlan::entry_point`]), limits, labels and the network. Fails, with a message
    /// for the user, when the package is missing or lacks the entry point, or the code's
    /// network is not allowed here.
    pub fn spec(
        &self,
        leased: &LeasedTask,
        config: &RunnerConfig,
        package: Option<ZipPackage>,
    ) -> Result<ContainerSpec, String> {
        let (task, code) = (&leased.task, &leased.code);
        let runner_id = config.runner_id.as_str();
        let network = config.network.engine_network(&code.spec.network)?;
        let mut env = vec![
            ("TASK_ID".to_owned(), task.id.clone()),
            ("TASK_DIR".to_owned(), TASK_DIR.to_owned()),
            ("PAYLOAD_FILE".to_owned(), PAYLOAD_FILE.to_owned()),
            ("CONFIG_FILE".to_owned(), CONFIG_FILE.to_owned()),
        ];
        env.extend(
            config
                .network
                .api_env()
                .into_iter()
                .filter(|(name, _)| !code.spec.env_vars.contains_key(name)),
        );
        env.extend(
            code.spec
                .env_vars
                .iter()
                .map(|(name, value)| (name.clone(), value.clone())),
        );
        let mut spec = ContainerSpec {
            // The lease token makes the name unique per attempt, so a slow removal of an
            // earlier attempt's container never blocks the next one.
            name: Some(container_name(runner_id, &task.id, leased.lease.token)),
            image: self.image.clone(),
            cmd: self.cmd.clone(),
            entrypoint: self.entrypoint.clone(),
            env,
            working_dir: Some(TASK_DIR.to_owned()),
            labels: BTreeMap::from_iter(
                [
                    Some((LABEL_TASK.to_owned(), task.id.clone())),
                    Some((LABEL_PROJECT.to_owned(), task.project_id.clone())),
                    Some((LABEL_RUNNER.to_owned(), runner_id.to_owned())),
                    config
                        .lease_ledger
                        .as_ref()
                        .map(|dir| (LABEL_LEDGER.to_owned(), dir.display().to_string())),
                ]
                .into_iter()
                .flatten(),
            ),
            memory_bytes: Some(u64::from(code.spec.limits.memory_mib) << 20),
            nano_cpus: code.spec.limits.cpus.or(config.default_cpus).map(nano_cpus),
            pids_limit: config.pids_limit,
            network_mode: Some(network),
            files: vec![
                FileToUpload::readable(PAYLOAD_FILE, task.payload.as_bytes()),
                FileToUpload::readable(CONFIG_FILE, code.spec.config.clone().unwrap_or_default()),
            ],
            ..ContainerSpec::default()
        };
        if self.package == PackagePlan::None {
            return Ok(spec);
        }
        let Some(package) = package else {
            return Err("the code's zip package is missing".to_owned());
        };
        if let Some(entry_point) = self.package.entry_point()
            && !package.contains_file(entry_point)
        {
            return Err(format!(
                "the code package has no file {entry_point:?} (the code's file_name)"
            ));
        }
        spec.package = Some(package);
        Ok(spec)
    }
}

/// The credentials for `image`'s registry, if the configuration has some: the entry whose
/// `server_address` is the image's registry host, or for Docker Hub images an entry without
/// an address (or with `docker.io`).
pub fn registry_auth_for(image: &str, auths: &[RegistryAuth]) -> Option<RegistryAuth> {
    let registry = match image.split_once('/') {
        Some((host, _)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            Some(host)
        }
        _ => None,
    };
    auths
        .iter()
        .find(|auth| {
            let address = auth
                .server_address
                .as_deref()
                .map(|address| address.trim_start_matches("https://").trim_end_matches('/'));
            match (registry, address) {
                (Some(registry), Some(address)) => registry == address,
                (None, None) => true,
                (None, Some(address)) => {
                    matches!(
                        address,
                        "docker.io" | "index.docker.io" | "registry-1.docker.io"
                    ) || address.starts_with("index.docker.io/")
                }
                (Some(_), None) => false,
            }
        })
        .cloned()
}

/// The container's name: readable in `docker ps`, unique per attempt.
fn container_name(runner_id: &str, task_id: &str, lease_token: i64) -> String {
    format!("stevedore-{}-{task_id}-{lease_token}", name_safe(runner_id))
}

/// `name` with every character a container or file name cannot hold (anything but ASCII
/// letters, digits, `_`, `.` and `-`) made a `-`.
pub(crate) fn name_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A CPU count in the engine's billionths of a CPU; at least one.
fn nano_cpus(cpus: f64) -> u64 {
    // Validation keeps `cpus` within 0.01..=64, so the product fits easily.
    let nanos = (cpus * 1e9).round();
    if nanos.is_finite() && nanos >= 1.0 {
        nanos as u64
    } else {
        1
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use stevedore_model::Lease;
    use stevedore_model::{CodeRevision, CodeSpec, Limits, Task, TaskStatus};

    use super::*;

    /// The package of a zip with `entries`, opened for `plan`; the directory holds its file.
    fn package_of(
        plan: &ContainerPlan,
        entries: &[(&str, &str)],
    ) -> (tempfile::TempDir, ZipPackage) {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("code.zip");
        let mut writer = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        for (name, contents) in entries {
            writer
                .start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            writer.write_all(contents.as_bytes()).unwrap();
        }
        writer.finish().unwrap();
        let package = ZipPackage::open(&path, plan.package.entry_point()).unwrap();
        (dir, package)
    }

    pub(crate) fn runner(runner_id: &str, pids_limit: Option<u64>) -> RunnerConfig {
        RunnerConfig {
            runner_id: runner_id.to_owned(),
            pids_limit,
            ..RunnerConfig::default()
        }
    }

    pub(crate) fn leased(id: &str, kind: CodeKind) -> LeasedTask {
        let now = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let task = Task {
            id: id.into(),
            project_id: "p".into(),
            code_id: "c".into(),
            code_name: "hello".into(),
            code_rev: 1,
            status: TaskStatus::Preparing,
            priority: 0,
            payload: "{\"n\":1}".into(),
            label: None,
            cluster: "default".into(),
            timeout_secs: 60,
            delay_secs: 0,
            created_at: now,
            updated_at: now,
            due_at: now,
            start_time: None,
            end_time: None,
            percent: None,
            msg: None,
            retry_count: 0,
            original_task_id: None,
            schedule_id: None,
            exit_code: None,
            log_size: 0,
            infra_attempts: 0,
            cancel_requested: false,
            peak_memory_bytes: None,
            cpu_time_ms: None,
            runner_id: Some("r1".into()),
            log_removed_at: None,
            payload_removed_at: None,
        };
        let code = CodeRevision {
            id: "c".into(),
            project_id: "p".into(),
            rev: 1,
            spec: CodeSpec {
                name: "hello".into(),
                kind,
                env_vars: BTreeMap::from([("GREETING".to_owned(), "hi".to_owned())]),
                config: Some("{\"k\":\"v\"}".into()),
                max_concurrency: None,
                retries: 0,
                retries_delay_secs: 0,
                default_priority: 0,
                limits: Limits {
                    timeout_secs: 60,
                    memory_mib: 64,
                    cpus: Some(0.5),
                },
                network: "none".into(),
                retries_backoff: stevedore_model::RetriesBackoff::Fixed,
            },
            package_sha256: None,
            package_size: None,
            created_at: now,
            updated_at: now,
            paused: false,
        };
        LeasedTask {
            task,
            code,
            lease: Lease {
                token: 7,
                expires_at: now,
            },
            registry_credential: None,
        }
    }

    #[test]
    fn an_image_code_with_a_command_runs_sh_c_with_the_contract() {
        let leased = leased(
            "t1",
            CodeKind::Image {
                image: "busybox".into(),
                command: Some("echo $TASK_ID".into()),
            },
        );
        let plan = ContainerPlan::new(&leased, &StackTable::default()).unwrap();
        let spec = plan.spec(&leased, &runner("r1", Some(64)), None).unwrap();
        assert_eq!(spec.name.as_deref(), Some("stevedore-r1-t1-7"));
        assert_eq!(spec.image, "busybox");
        assert_eq!(spec.entrypoint, Some(vec![]));
        assert_eq!(
            spec.cmd,
            Some(vec!["sh".into(), "-c".into(), "echo $TASK_ID".into()])
        );
        assert_eq!(
            spec.env,
            vec![
                ("TASK_ID".into(), "t1".into()),
                ("TASK_DIR".into(), "/mnt/task".into()),
                ("PAYLOAD_FILE".into(), "/mnt/.task_payload".into()),
                ("CONFIG_FILE".into(), "/mnt/.task_config".into()),
                ("GREETING".into(), "hi".into()),
            ]
        );
        assert_eq!(spec.working_dir.as_deref(), Some("/mnt/task"));
        assert_eq!(spec.labels[LABEL_TASK], "t1");
        assert_eq!(spec.labels[LABEL_RUNNER], "r1");
        assert_eq!(spec.labels[LABEL_PROJECT], "p");
        assert_eq!(spec.memory_bytes, Some(64 << 20));
        assert_eq!(spec.nano_cpus, Some(500_000_000));
        assert_eq!(spec.pids_limit, Some(64));
        assert_eq!(spec.network_mode.as_deref(), Some("none"));
        assert_eq!(spec.files[0].path, PAYLOAD_FILE);
        assert_eq!(spec.files[0].contents, b"{\"n\":1}");
        assert_eq!(spec.files[1].path, CONFIG_FILE);
        assert_eq!(spec.files[1].contents, b"{\"k\":\"v\"}");
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn a_code_without_cpus_gets_the_runners_default_cpu_limit() {
        let mut leased = leased(
            "t1",
            CodeKind::Image {
                image: "busybox".into(),
                command: None,
            },
        );
        leased.code.spec.limits.cpus = None;
        let plan = ContainerPlan::new(&leased, &StackTable::default()).unwrap();
        let spec = plan.spec(&leased, &runner("r1", None), None).unwrap();
        assert_eq!(spec.nano_cpus, Some(1_000_000_000));
        let unlimited = RunnerConfig {
            default_cpus: None,
            ..runner("r1", None)
        };
        assert_eq!(
            plan.spec(&leased, &unlimited, None).unwrap().nano_cpus,
            None
        );
        // The code's own limit wins over the default.
        leased.code.spec.limits.cpus = Some(0.25);
        let spec = plan.spec(&leased, &runner("r1", None), None).unwrap();
        assert_eq!(spec.nano_cpus, Some(250_000_000));
    }

    #[test]
    fn bridge_runs_on_the_managed_network_and_the_published_api_is_in_the_environment() {
        let mut leased = leased(
            "t1",
            CodeKind::Image {
                image: "busybox".into(),
                command: None,
            },
        );
        leased.code.spec.network = "bridge".into();
        leased
            .code
            .spec
            .env_vars
            .insert("IRON_PORT".into(), "9999".into());
        let mut config = runner("r1", None);
        config.network.api = Some(crate::PublishedApi {
            protocol: "http".into(),
            host: "172.30.0.1".into(),
            port: 8080,
        });
        let plan = ContainerPlan::new(&leased, &StackTable::default()).unwrap();
        let spec = plan.spec(&leased, &config, None).unwrap();
        assert_eq!(spec.network_mode.as_deref(), Some("stevedore-tasks"));
        let env: BTreeMap<_, _> = spec.env.iter().cloned().collect();
        assert_eq!(env["IRON_HOST"], "172.30.0.1");
        assert_eq!(env["IRON_PROTOCOL"], "http");
        // The code's own value wins, and is there once.
        assert_eq!(env["IRON_PORT"], "9999");
        assert_eq!(spec.env.iter().filter(|(k, _)| k == "IRON_PORT").count(), 1);

        leased.code.spec.network = "somewhere".into();
        let refused = plan.spec(&leased, &config, None).unwrap_err();
        assert!(refused.contains("not allowed"), "{refused}");
    }

    #[test]
    fn an_image_code_without_a_command_keeps_the_image_entrypoint() {
        let leased = leased(
            "t1",
            CodeKind::Image {
                image: "team/app:1".into(),
                command: None,
            },
        );
        let plan = ContainerPlan::new(&leased, &StackTable::default()).unwrap();
        assert_eq!((plan.entrypoint, plan.cmd), (None, None));
    }

    #[test]
    fn a_runtime_code_runs_the_launcher_with_the_legacy_flags() {
        let leased = leased(
            "t2",
            CodeKind::Runtime {
                runtime: "sh".into(),
                file_name: "hello.sh".into(),
                stack: None,
            },
        );
        let plan = ContainerPlan::new(&leased, &StackTable::default()).unwrap();
        assert_eq!(plan.image, "stevedore/stack-default:local");
        assert_eq!(
            plan.cmd.clone().unwrap().join(" "),
            "sh /mnt/task/hello.sh -id t2 -d /mnt/task -payload /mnt/.task_payload \
             -config /mnt/.task_config"
        );
        assert_eq!(plan.package.entry_point(), Some("hello.sh"));
        let (_dir, package) = package_of(&plan, &[("hello.sh", "#!/bin/sh\necho hi\n")]);
        let spec = plan
            .spec(&leased, &runner("r1", None), Some(package.clone()))
            .unwrap();
        assert_eq!(spec.package, Some(package));

        let (_dir, without_entry_point) = package_of(&plan, &[("other.sh", "")]);
        let missing = plan.spec(&leased, &runner("r1", None), Some(without_entry_point));
        assert!(missing.unwrap_err().contains("hello.sh"));
    }

    #[test]
    fn an_unknown_runtime_names_the_known_ones() {
        let cobol = leased(
            "t",
            CodeKind::Runtime {
                runtime: "cobol".into(),
                file_name: "main.cob".into(),
                stack: None,
            },
        );
        let error = ContainerPlan::new(&cobol, &StackTable::default()).unwrap_err();
        assert!(
            error.contains("cobol") && error.contains("binary"),
            "{error}"
        );
        let php_on_python = leased(
            "t",
            CodeKind::Runtime {
                runtime: "php".into(),
                file_name: "main.php".into(),
                stack: Some("python-3.11".into()),
            },
        );
        let error = ContainerPlan::new(&php_on_python, &StackTable::default()).unwrap_err();
        assert!(error.contains("python-3.11"), "{error}");
    }

    #[test]
    fn each_runtime_has_its_launcher_on_its_stack() {
        for (runtime, stack, image, launcher) in [
            ("python", None, "python:3.11-slim", "python3"),
            (
                "java",
                Some("java-17"),
                "eclipse-temurin:17-jre",
                "java -jar",
            ),
            (
                "node",
                Some("default"),
                "stevedore/stack-default:local",
                "node",
            ),
            ("binary", None, "stevedore/busybox:local", ""),
        ] {
            let leased = leased(
                "t",
                CodeKind::Runtime {
                    runtime: runtime.into(),
                    file_name: "main".into(),
                    stack: stack.map(str::to_owned),
                },
            );
            let plan = ContainerPlan::new(&leased, &StackTable::default()).unwrap();
            assert_eq!(plan.image, image, "{runtime}");
            let cmd = plan.cmd.unwrap().join(" ");
            assert!(
                cmd.starts_with(format!("{launcher} /mnt/task/main -id t").trim_start()),
                "{runtime}: {cmd}"
            );
        }
    }

    #[test]
    fn an_image_code_uploaded_with_a_zip_gets_it_unpacked() {
        let mut leased = leased(
            "t3",
            CodeKind::Image {
                image: "team/app:1".into(),
                command: Some("./run.sh".into()),
            },
        );
        let without = ContainerPlan::new(&leased, &StackTable::default()).unwrap();
        assert_eq!(without.package, PackagePlan::None);
        leased.code.package_sha256 = Some("abc".into());
        let plan = ContainerPlan::new(&leased, &StackTable::default()).unwrap();
        assert_eq!(plan.package, PackagePlan::Unpack);
        assert_eq!(plan.package.entry_point(), None);
        let (_dir, package) = package_of(&plan, &[("run.sh", "echo hi\n"), ("data/a.txt", "a")]);
        let spec = plan
            .spec(&leased, &runner("r1", None), Some(package))
            .unwrap();
        let package = spec.package.unwrap();
        assert!(package.contains_file("run.sh") && package.contains_file("data/a.txt"));
        assert!(plan.spec(&leased, &runner("r1", None), None).is_err());
    }

    #[test]
    fn registry_credentials_are_picked_by_host() {
        let hub = RegistryAuth {
            username: Some("hub".into()),
            ..RegistryAuth::default()
        };
        let private = RegistryAuth {
            username: Some("private".into()),
            server_address: Some("registry.example.com:5000".into()),
            ..RegistryAuth::default()
        };
        let auths = [private.clone(), hub.clone()];
        assert_eq!(registry_auth_for("team/app:1", &auths), Some(hub));
        assert_eq!(
            registry_auth_for("registry.example.com:5000/app", &auths),
            Some(private)
        );
        assert_eq!(registry_auth_for("ghcr.io/x/y", &auths), None);
    }
}
