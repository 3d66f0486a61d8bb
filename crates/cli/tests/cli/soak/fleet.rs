//! The servers and runners of a soak, and the chaos thread that kills them (and dockerd) and
//! starts them again.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::{RunnerProcess, ServerProcess, runner_token_with_env, unique};

use super::Settings;
use super::containers::containers_of;

/// What the soak's processes left once they stopped.
pub(super) struct Leftovers {
    /// Containers of the soak's runners still there right after the runners stopped.
    pub(super) containers: Vec<String>,
    /// Runners whose watchdog still ran 10 s after they stopped.
    pub(super) watchdogs: Vec<String>,
}

/// One kill of the chaos thread.
#[derive(Debug, Clone)]
pub struct Kill {
    pub victim: Victim,
    /// Since the soak started.
    pub at: Duration,
    pub down: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    Runner(usize),
    Server(usize),
    Dockerd,
}

// === the processes and their killing ===

/// Two servers and two runners, each of which the chaos thread may kill and start again.
pub(super) struct Fleet {
    /// Starts every runner id and label of this soak, to tell its containers from others'.
    pub(super) prefix: String,
    database_url: String,
    pub(super) server_dirs: [tempfile::TempDir; 2],
    /// `host:port` of each server, kept across its restarts.
    listen: [String; 2],
    pub(super) servers: [Option<ServerProcess>; 2],
    pub(super) runner_ids: [String; 2],
    runners: [Option<RunnerProcess>; 2],
    runner_token: String,
    capacity: String,
    lease_secs: u32,
}

impl Fleet {
    pub(super) fn start(database_url: &str, settings: &Settings) -> Fleet {
        let prefix = unique("soak");
        let server_dirs = [(); 2].map(|()| tempfile::tempdir().expect("a data directory"));
        let mut fleet = Fleet {
            runner_ids: [1, 2].map(|n| format!("{prefix}-runner-{n}")),
            prefix,
            database_url: database_url.to_owned(),
            server_dirs,
            listen: [String::new(), String::new()],
            servers: [None, None],
            runners: [None, None],
            runner_token: String::new(),
            capacity: settings.capacity.to_string(),
            lease_secs: settings.lease_secs,
        };
        for n in 0..2 {
            fleet.start_server(n, "127.0.0.1:0");
            let base = &fleet.servers[n].as_ref().expect("just started").base;
            fleet.listen[n] = base.trim_start_matches("http://").to_owned();
        }
        fleet.runner_token = runner_token_with_env(fleet.server_dirs[0].path(), &fleet.store_env());
        for n in 0..2 {
            fleet.start_runner(n);
        }
        fleet
    }

    pub(super) fn store_env(&self) -> [(&str, &str); 2] {
        [
            ("STEVEDORE_DATABASE", self.database_url.as_str()),
            ("STEVEDORE_CONFIG", "/dev/null"),
        ]
    }

    fn start_server(&mut self, n: usize, listen: &str) {
        // One credential key for both, as servers sharing a database must have.
        let key_file = self.server_dirs[0].path().join("credential.key");
        let env = [
            ("STEVEDORE_RUNNER__ENABLED", "false"),
            ("STEVEDORE_DATABASE", self.database_url.as_str()),
            (
                "STEVEDORE_CREDENTIAL_KEY_FILE",
                key_file.to_str().expect("a UTF-8 path"),
            ),
        ];
        self.servers[n] = Some(ServerProcess::start_listening(
            self.server_dirs[n].path(),
            listen,
            &["--database", &self.database_url],
            &env,
        ));
    }

    /// Runner `n` leases through server `n`, which is up: only one process is down at a time.
    fn start_runner(&mut self, n: usize) {
        let server = self.servers[n]
            .as_ref()
            .expect("a runner starts while its server is up");
        self.runners[n] = Some(RunnerProcess::start_with_args(
            server,
            &self.runner_token,
            &self.runner_ids[n],
            &[],
            self.lease_secs,
            &["--capacity", &self.capacity],
        ));
    }

    fn kill(&mut self, victim: Victim) {
        match victim {
            Victim::Runner(n) => {
                if let Some(mut runner) = self.runners[n].take() {
                    runner.kill_hard();
                }
            }
            Victim::Server(n) => {
                if let Some(mut server) = self.servers[n].take() {
                    server.kill_hard();
                }
            }
            Victim::Dockerd => kill_dockerd(),
        }
    }

    fn restart(&mut self, victim: Victim) {
        match victim {
            // The same id and data directory: it reaps what its earlier life left and gives
            // back the tasks that life held.
            Victim::Runner(n) => self.start_runner(n),
            // The same port, so its runner and the clients find it again.
            Victim::Server(n) => {
                let listen = self.listen[n].clone();
                self.start_server(n, &listen);
            }
            Victim::Dockerd => start_dockerd(),
        }
    }

    /// Stops runners (SIGTERM: they finish or give back their tasks and remove their
    /// containers) and then servers, waits for the runners' watchdogs to end, removes the
    /// runners' data directories, and says what was left.
    pub(super) fn stop(mut self) -> Leftovers {
        for runner in self.runners.iter_mut().flatten() {
            let status = runner.terminate();
            assert!(status.success(), "{} exited {status}", runner.id);
        }
        for server in self.servers.iter_mut().flatten() {
            let status = server.terminate();
            assert!(status.success(), "a server exited {status}");
        }
        let containers = containers_of(&self.prefix, &["-a"])
            .into_iter()
            .map(|(container, _)| container)
            .collect();
        // A watchdog ends by itself a second or so after its runner stopped cleanly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut watchdogs = self.runner_ids.to_vec();
        loop {
            watchdogs.retain(|id| watchdog_runs(id));
            if watchdogs.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for id in &self.runner_ids {
            let _ = std::fs::remove_dir_all(RunnerProcess::data_dir(id));
        }
        Leftovers {
            containers,
            watchdogs,
        }
    }
}

/// Whether runner `runner_id`'s watchdog still holds the lock of its ledger
/// (`<data dir>/leases/<runner id>/watchdog.lock`).
fn watchdog_runs(runner_id: &str) -> bool {
    let lock = RunnerProcess::data_dir(runner_id)
        .join("leases")
        .join(runner_id)
        .join("watchdog.lock");
    std::fs::OpenOptions::new()
        .write(true)
        .open(lock)
        .is_ok_and(|file| matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
}

/// The chaos thread: until told to stop, waits a random while, kills a random victim and
/// starts it again after a random while. Told to stop before it killed one of every kind (the
/// random pauses and restarts of a short run can leave no room for a whole round), it goes on
/// with short pauses until it has. Returns the fleet, every process up.
pub(super) fn chaos(
    mut fleet: Fleet,
    settings: &Settings,
    stop: &mpsc::Receiver<()>,
    began: Instant,
) -> (Fleet, Vec<Kill>) {
    let kinds = settings.victims();
    let mut random = SplitMix(settings.seed);
    let mut kills = Vec::new();
    // The kinds still to kill in this round, each once, in a random order.
    let mut round: Vec<usize> = Vec::new();
    if kinds.is_empty() {
        let _ = stop.recv();
        return (fleet, kills);
    }
    // Whether each kind was killed yet.
    let mut killed = vec![false; kinds.len()];
    let mut stopping = false;
    loop {
        let pause = random.between(settings.kill_every / 2, settings.kill_every * 3 / 2);
        if stopping {
            std::thread::sleep(Duration::from_secs(1));
        } else {
            stopping = !matches!(
                stop.recv_timeout(pause),
                Err(mpsc::RecvTimeoutError::Timeout)
            );
        }
        if stopping && killed.iter().all(|killed| *killed) {
            return (fleet, kills);
        }
        if round.is_empty() {
            round = (0..kinds.len()).collect();
            for index in (1..round.len()).rev() {
                round.swap(index, random.below(index + 1));
            }
        }
        let index = round.pop().unwrap_or_default();
        killed[index] = true;
        let kind = &kinds[index];
        let victim = kind[random.below(kind.len())];
        let at = began.elapsed();
        eprintln!("soak: {:.1} s: killing {victim:?}", at.as_secs_f64());
        fleet.kill(victim);
        let down = random.between(settings.down_for.0, settings.down_for.1);
        std::thread::sleep(down);
        fleet.restart(victim);
        eprintln!(
            "soak: {:.1} s: {victim:?} is back",
            began.elapsed().as_secs_f64()
        );
        kills.push(Kill { victim, at, down });
    }
}

/// Kills the Docker daemon with SIGKILL and waits until it is gone: its containers keep
/// running under their shims until a new daemon starts and, without live restore, kills them.
fn kill_dockerd() {
    let pid = dockerd_pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "dockerd", "pid {pid} is not dockerd");
    let killed = Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill -KILL dockerd");
    assert!(killed.success(), "kill -KILL {pid} failed");
    // Gone, or a zombie nobody reaps (no init in a sandbox): either way it serves no more.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.split(' ').next());
        if state == Some("Z") {
            break;
        }
        assert!(Instant::now() < deadline, "dockerd {pid} does not die");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Docker daemon's pid: from its pid file, else the one live process named `dockerd` (a
/// pid file removed by hand while the daemon ran).
fn dockerd_pid() -> String {
    if let Ok(pid) = std::fs::read_to_string("/var/run/docker.pid") {
        return pid.trim().to_owned();
    }
    let mut daemons: Vec<String> = std::fs::read_dir("/proc")
        .expect("list /proc")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|pid| {
            // `comm` in parentheses, then the state: a killed daemon nobody reaped is a zombie.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.contains("(dockerd) ") && !stat.contains("(dockerd) Z"))
        })
        .collect();
    assert_eq!(
        daemons.len(),
        1,
        "no /var/run/docker.pid, and not one dockerd process: {daemons:?}"
    );
    daemons.remove(0)
}

/// Starts the Docker daemon with `scripts/ensure-docker.sh`, which removes the pid file a
/// killed daemon left, and waits until it answers.
fn start_dockerd() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ensure-docker.sh");
    let status = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("run scripts/ensure-docker.sh");
    assert!(
        status.success(),
        "scripts/ensure-docker.sh failed: {status}"
    );
}

/// A small, seeded generator (SplitMix64): victims and moments, repeatable from the seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let fraction = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        low + (high.saturating_sub(low)).mul_f64(fraction)
    }
}
