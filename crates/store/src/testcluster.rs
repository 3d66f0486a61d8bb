//! A throwaway PostgreSQL cluster for tests and benchmarks, and a fresh database in it per test.
//!
//! Test runners such as nextest run every test in a process of its own, so one cluster per
//! process would mean an `initdb` per test. Instead every process on the machine shares one
//! cluster in a well-known directory under the temporary directory (per user and PostgreSQL
//! version), coordinated by two file locks there:
//!
//! * `setup.lock`, held exclusively while a process checks the cluster (`pg_isready`) and, when
//!   it does not answer, creates it (`initdb`) and starts it (`pg_ctl start`);
//! * `users.lock`, held shared by every process using the cluster, for as long as it lives.
//!
//! The process that starts the cluster also starts a small detached reaper (a shell loop with
//! `flock`): once nobody has held `users.lock` for a few seconds, it takes both locks, stops the
//! cluster and removes its data. The reaper needs `setup.lock`, which a process holds until it
//! holds `users.lock`, so a cluster is never stopped under a process that just found it ready.
//!
//! The cluster listens on a Unix socket in its own directory only (`listen_addresses = ''`):
//! no TCP port can clash with anything else on the machine. It runs without fsync; nothing in
//! it needs to survive a crash. Each test gets its own database (`CREATE DATABASE`), so tests
//! run in parallel, and the database is dropped when the test's [`TestDatabase`] is.
//!
//! PostgreSQL's binaries come from `STEVEDORE_PG_BIN`, else the newest
//! `/usr/lib/postgresql/*/bin`, else `pg_config --bindir`. `initdb` and `postgres` refuse to run
//! as root; as root they run as the `postgres` user (`runuser`). Without PostgreSQL a test is
//! skipped with a message, unless `CI` is set: then it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection};

/// The superuser `initdb` creates; every test database belongs to it.
const SUPERUSER: &str = "stevedore";
/// Names the socket file; with no TCP listener it cannot clash with another server.
const PORT: u16 = 5432;
/// How long the reaper lets the cluster sit unused before it stops it.
const IDLE_SECONDS_BEFORE_STOP: u32 = 5;

/// The shared cluster, as this process found or started it.
#[derive(Debug)]
pub struct TestCluster {
    bin: PathBuf,
    socket_dir: PathBuf,
    /// The shared lock that keeps the reaper away while this process lives.
    _users: File,
}

/// A fresh, empty database in the shared cluster, dropped with this value.
#[derive(Debug)]
pub struct TestDatabase {
    /// A `postgres://` URL for it (over the cluster's Unix socket).
    pub url: String,
    name: String,
    cluster: &'static TestCluster,
}

impl TestCluster {
    /// A URL for `database` in this cluster.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost/{database}?host={}&port={PORT}",
            self.socket_dir.display()
        )
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Blocking, and best effort: the whole cluster goes once unused.
        let dropped = Command::new(self.cluster.bin.join("psql"))
            .args(["-X", "-q", "-h"])
            .arg(&self.cluster.socket_dir)
            .args([
                "-p",
                &PORT.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
                "-c",
            ])
            .arg(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !dropped.is_ok_and(|status| status.success()) {
            eprintln!("note: could not drop test database {}", self.name);
        }
    }
}

/// A fresh database, or `None` (after a message) when PostgreSQL is not installed and `CI` is
/// not set. Panics when PostgreSQL is missing in CI, or is there but cannot be started.
pub async fn fresh_database() -> Option<TestDatabase> {
    let cluster = cluster()?;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let name = format!(
        "test_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = PgConnection::connect(&cluster.url("postgres"))
        .await
        .expect("connect to the test cluster");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    drop(admin.close().await);
    Some(TestDatabase {
        url: cluster.url(&name),
        name,
        cluster,
    })
}

/// The shared cluster, started on first use in this process; `None` when PostgreSQL is not
/// installed and `CI` is not set.
pub fn cluster() -> Option<&'static TestCluster> {
    static CLUSTER: OnceLock<Option<TestCluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            let Some(bin) = bin_dir() else {
                let message = "PostgreSQL is not installed (no initdb in STEVEDORE_PG_BIN, \
                               /usr/lib/postgresql/*/bin or pg_config --bindir)";
                if std::env::var_os("CI").is_some_and(|ci| !ci.is_empty()) {
                    panic!("{message}; CI is set, so this is a failure: run scripts/test.sh");
                }
                eprintln!("skipping: {message}; scripts/test.sh installs it");
                return None;
            };
            match start(&bin) {
                Ok(cluster) => Some(cluster),
                Err(error) => panic!("cannot start the test PostgreSQL cluster: {error}"),
            }
        })
        .as_ref()
}

/// Where PostgreSQL's server binaries are, if anywhere.
pub fn bin_dir() -> Option<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("STEVEDORE_PG_BIN").map(PathBuf::from) {
        return has_initdb(&dir).then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let dir = entry.path().join("bin");
            has_initdb(&dir).then_some((version, dir))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    let output = Command::new("pg_config").arg("--bindir").output().ok()?;
    let dir = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    has_initdb(&dir).then_some(dir)
}

fn start(bin: &Path) -> Result<TestCluster, String> {
    let version = run(Command::new(bin.join("pg_ctl")).arg("--version"))?;
    let major = version
        .split_whitespace()
        .last()
        .and_then(|version| version.split('.').next())
        .unwrap_or("unknown")
        .to_owned();
    let uid = fs::metadata("/proc/self").map_or(0, |meta| meta.uid());
    let base = std::env::temp_dir().join(format!("stevedore-test-pg{major}-uid{uid}"));
    fs::create_dir_all(&base).map_err(|error| format!("{}: {error}", base.display()))?;
    let owner = (uid == 0).then(postgres_user).transpose()?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&base, Some(uid), Some(gid))
            .map_err(|error| format!("chown {}: {error}", base.display()))?;
    }
    let open = |name: &str| {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(base.join(name))
            .map_err(|error| format!("{name}: {error}"))
    };
    let setup = open("setup.lock")?;
    let users = open("users.lock")?;
    setup
        .lock()
        .map_err(|error| format!("locking setup.lock: {error}"))?;
    let cluster = TestCluster {
        bin: bin.to_owned(),
        socket_dir: base.join("socket"),
        _users: users,
    };
    let ready = ensure_running(bin, &base, &cluster.socket_dir, owner.is_some());
    // Shared before the setup lock goes, so the reaper cannot stop the cluster in between.
    let shared = cluster._users.lock_shared();
    drop(setup);
    ready?;
    shared.map_err(|error| format!("locking users.lock: {error}"))?;
    Ok(cluster)
}

/// Under the setup lock: makes sure the cluster answers, creating and starting it if needed,
/// and that a reaper watches it.
fn ensure_running(
    bin: &Path,
    base: &Path,
    socket_dir: &Path,
    as_postgres: bool,
) -> Result<(), String> {
    let data = base.join("data");
    let log = base.join("postgres.log");
    let as_owner = |program: &str| {
        let program = bin.join(program);
        if as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    };
    let ready = as_owner("pg_isready")
        .arg("-q")
        .arg("-h")
        .arg(socket_dir)
        .args(["-p", &PORT.to_string()])
        .status()
        .is_ok_and(|status| status.success());
    if !ready {
        if data.exists() {
            // Left by a cluster that crashed or was killed: start over.
            drop(
                as_owner("pg_ctl")
                    .args(["stop", "-m", "immediate", "-D"])
                    .arg(&data)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status(),
            );
            fs::remove_dir_all(&data).map_err(|error| format!("{}: {error}", data.display()))?;
        }
        let _ = fs::remove_dir_all(socket_dir);
        fs::create_dir_all(socket_dir)
            .map_err(|error| format!("{}: {error}", socket_dir.display()))?;
        if as_postgres {
            let (uid, gid) = postgres_user()?;
            std::os::unix::fs::chown(socket_dir, Some(uid), Some(gid))
                .map_err(|error| format!("chown {}: {error}", socket_dir.display()))?;
        }
        run(as_owner("initdb").arg("-D").arg(&data).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]))?;
        let options = format!(
            "-c listen_addresses='' -k {} -p {PORT} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300",
            socket_dir.display()
        );
        // setsid: the server outlives this process and must not share its process group,
        // which a test runner may signal when the test ends.
        let mut start = Command::new("setsid");
        let start = if as_postgres {
            start.args(["runuser", "-u", "postgres", "--"])
        } else {
            &mut start
        };
        run(start
            .arg(bin.join("pg_ctl"))
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(options))?;
    }
    ensure_reaper(bin, base, as_postgres)
}

/// Starts the reaper unless the one recorded in `reaper.pid` is alive.
fn ensure_reaper(bin: &Path, base: &Path, as_postgres: bool) -> Result<(), String> {
    let pid_file = base.join("reaper.pid");
    if let Ok(pid) = fs::read_to_string(&pid_file)
        && !pid.trim().is_empty()
        && Path::new("/proc").join(pid.trim()).exists()
    {
        return Ok(());
    }
    let run_as = if as_postgres {
        "runuser -u postgres --"
    } else {
        ""
    };
    let script = format!(
        r#"
idle=0
while sleep 1; do
    if flock -n -x "$0/users.lock" true; then idle=$((idle + 1)); else idle=0; fi
    [ "$idle" -ge {IDLE_SECONDS_BEFORE_STOP} ] || continue
    if flock -n -E 75 -x "$0/setup.lock" flock -n -E 75 -x "$0/users.lock" \
        sh -c '{run_as} "$1/pg_ctl" stop -m fast -w -D "$0/data" >/dev/null 2>&1; rm -rf "$0/data" "$0/socket" "$0/reaper.pid"; exit 0' "$0" "$1"
    then
        exit 0
    fi
    idle=0
done
"#
    );
    let child = Command::new("setsid")
        .args(["sh", "-c", &script])
        .arg(base)
        .arg(bin)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|error| format!("starting the reaper: {error}"))?;
    fs::write(&pid_file, child.id().to_string())
        .map_err(|error| format!("{}: {error}", pid_file.display()))
}

/// The `postgres` user's uid and gid.
fn postgres_user() -> Result<(u32, u32), String> {
    let id = |flag: &str| -> Result<u32, String> {
        run(Command::new("id").args([flag, "postgres"]))?
            .trim()
            .parse()
            .map_err(|error| format!("id {flag} postgres: {error}"))
    };
    Ok((id("-u")?, id("-g")?))
}

/// Runs a command to completion; its stdout, or an error with its output.
fn run(command: &mut Command) -> Result<String, String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("{command:?}: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
