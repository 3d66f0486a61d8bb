//! Starting and stopping the real binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_stevedore")
}

/// A `stevedore serve` process on a free loopback port.
pub struct ServerProcess {
    pub child: Child,
    pub data_dir: PathBuf,
    pub iron: Value,
    pub base: String,
}

impl ServerProcess {
    pub fn start(data_dir: &Path) -> ServerProcess {
        Self::start_with_env(data_dir, &[])
    }

    pub fn start_with_env(data_dir: &Path, env: &[(&str, &str)]) -> ServerProcess {
        let iron_path = data_dir.join("iron.json");
        let before = std::fs::metadata(&iron_path)
            .and_then(|meta| meta.modified())
            .ok();
        let mut command = Command::new(binary());
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("STEVEDORE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("start stevedore serve");
        // The server rewrites iron.json with its real port once it listens.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let modified = std::fs::metadata(&iron_path)
                .and_then(|meta| meta.modified())
                .ok();
            if modified.is_some() && modified != before {
                if let Ok(iron) = std::fs::read_to_string(&iron_path)
                    .map(|text| serde_json::from_str::<Value>(&text))
                {
                    if let Ok(iron) = iron {
                        let base =
                            format!("http://{}:{}", iron["host"].as_str().unwrap(), iron["port"]);
                        return ServerProcess {
                            child,
                            data_dir: data_dir.to_owned(),
                            iron,
                            base,
                        };
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "the server did not write iron.json within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "{}/2/projects/{}/{}",
            self.base,
            self.iron["project_id"].as_str().unwrap(),
            path
        )
    }

    pub fn token(&self) -> String {
        self.iron["token"].as_str().unwrap().to_owned()
    }

    /// Kills the process with SIGKILL: no shutdown code runs.
    pub fn kill_hard(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary with arguments and returns its stdout, asserting success.
pub fn run_ok(args: &[&str]) -> String {
    let output = Command::new(binary())
        .args(args)
        .output()
        .expect("run stevedore");
    assert!(
        output.status.success(),
        "stevedore {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// Whether the tests are running in CI, where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| !value.is_empty() && value != "false" && value != "0")
}
