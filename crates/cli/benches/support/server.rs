//! `stevedore serve` as the benchmarks start it: the real binary on a free loopback port, with
//! its embedded runner, read back from the `iron.json` it writes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::{Child, Command};

/// A `stevedore serve` process on a free loopback port.
pub struct Server {
    child: Child,
    pub base: String,
    pub project_id: String,
    pub token: String,
}

impl Server {
    /// Starts `serve` in `data_dir` with `capacity` task slots, the runner id `runner_id` and
    /// more environment `env`, and waits until it serves.
    pub async fn start(
        data_dir: &Path,
        capacity: usize,
        runner_id: &str,
        env: &[(&str, &str)],
    ) -> Server {
        let iron_path: PathBuf = data_dir.join("iron.json");
        let mut command = Command::new(env!("CARGO_BIN_EXE_stevedore"));
        // The benchmarks' own knobs are not settings of `serve`.
        for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("STEVEDORE_BENCH_")) {
            command.env_remove(name);
        }
        let child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            // No stray `stevedore.toml` from the working directory.
            .current_dir(data_dir)
            .env("STEVEDORE_RUNNER__CAPACITY", capacity.to_string())
            .env("STEVEDORE_RUNNER__ID", runner_id)
            .env("STEVEDORE_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start stevedore serve");
        let mut server = Server {
            child,
            base: String::new(),
            project_id: String::new(),
            token: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            server.assert_running();
            let iron = std::fs::read_to_string(&iron_path)
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok());
            if let Some(iron) = iron
                && iron["port"].as_u64().is_some_and(|port| port != 0)
            {
                let field = |name: &str| {
                    iron[name]
                        .as_str()
                        .unwrap_or_else(|| panic!("iron.json lacks {name}: {iron}"))
                        .to_owned()
                };
                server.base = format!("http://{}:{}", field("host"), iron["port"]);
                server.project_id = field("project_id");
                server.token = field("token");
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "stevedore serve wrote no iron.json within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A project path of the v2 API.
    pub fn url(&self, path: &str) -> String {
        format!("{}/2/projects/{}/{path}", self.base, self.project_id)
    }

    /// The process id of `serve`, for reading its memory from `/proc`.
    #[allow(dead_code)] // Only some benchmarks read it.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the server is still running")
    }

    pub fn authorization(&self) -> String {
        format!("OAuth {}", self.token)
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("poll the server process") {
            panic!("stevedore serve exited early: {status}");
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn terminate(&mut self) {
        let pid = self.child.id().expect("the server is still running");
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("run kill -TERM");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("stevedore serve stops within 60 s of SIGTERM")
            .expect("wait for stevedore serve");
        assert!(
            status.success(),
            "stevedore serve exited {status} on SIGTERM"
        );
    }
}
