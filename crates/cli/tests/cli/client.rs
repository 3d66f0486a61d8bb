//! The client commands (`code`, `task`, `schedule`, `stack`), driven as a user would: the
//! real binary against a real server, reading iron.json from the server's data directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::support::{ServerProcess, binary, docker_available, ensure_local_image};

/// The binary, run in its own working directory with an empty home, so that no iron.json
/// of the machine leaks in; the server is found through `--data-dir`.
pub struct Cli {
    pub cwd: tempfile::TempDir,
    home: tempfile::TempDir,
    data_dir: PathBuf,
}

impl Cli {
    pub fn new(server: &ServerProcess) -> Self {
        Self::for_data_dir(&server.data_dir)
    }

    pub fn for_data_dir(data_dir: &Path) -> Self {
        Cli {
            cwd: tempfile::tempdir().unwrap(),
            home: tempfile::tempdir().unwrap(),
            data_dir: data_dir.to_owned(),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary());
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .current_dir(self.cwd.path())
            .env("HOME", self.home.path())
            .env("STEVEDORE_LOG", "warn")
            // `run` runs the stacks on the images `stack build-local` made.
            .env("STEVEDORE_STACK_IMAGES", "local")
            .stdin(Stdio::null());
        for (key, _) in std::env::vars() {
            if key.starts_with("IRON_") {
                command.env_remove(key);
            }
        }
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run stevedore")
    }

    /// Runs stevedore with its standard output and error on a pseudo-terminal (util-linux's
    /// `script`) and returns what the terminal showed.
    pub fn run_on_terminal(&self, args: &[&str]) -> String {
        let mut line = shell_quote(binary());
        for arg in ["--data-dir", &self.data_dir.to_string_lossy()]
            .iter()
            .chain(args)
        {
            line.push(' ');
            line.push_str(&shell_quote(arg));
        }
        let template = self.command(&[]);
        let mut terminal = Command::new("script");
        terminal
            .args(["--quiet", "--return", "--command", &line, "/dev/null"])
            .current_dir(self.cwd.path())
            .stdin(Stdio::null());
        for (key, value) in template.get_envs() {
            match value {
                Some(value) => terminal.env(key, value),
                None => terminal.env_remove(key),
            };
        }
        let output = terminal.output().expect("run stevedore under script(1)");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "stevedore {args:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs with `--json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let text = self.ok(&args);
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("{args:?}: {error}: {text}"))
    }

    /// Runs, asserts the exit code, returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let output = self.run(args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(
            output.status.code(),
            Some(code),
            "stevedore {args:?}: {stderr}{}",
            String::from_utf8_lossy(&output.stdout)
        );
        stderr
    }
}

/// Replaces the ids and times of a table with placeholders, so it can be snapshotted.
fn normalise(text: &str, ids: &[(&str, &str)]) -> String {
    let mut text = text.to_owned();
    for (id, name) in ids {
        text = text.replace(id, name);
    }
    // "YYYY-MM-DD HH:MM:SS" → "<time>              " keeps the columns aligned.
    let mut out = String::new();
    let chars: Vec<char> = text.chars().collect();
    let mut index = 0;
    while index < chars.len() {
        let candidate: String = chars[index..(index + 19).min(chars.len())].iter().collect();
        if candidate.len() == 19 && is_time(&candidate) {
            out.push_str("<time>             ");
            index += 19;
        } else {
            out.push(chars[index]);
            index += 1;
        }
    }
    out.lines()
        .map(|line| format!("{}\n", line.trim_end()))
        .collect()
}

fn is_time(text: &str) -> bool {
    text.char_indices().all(|(index, c)| match index {
        4 | 7 => c == '-',
        10 => c == ' ',
        13 | 16 => c == ':',
        _ => c.is_ascii_digit(),
    })
}

fn hello_dir(cli: &Cli) -> PathBuf {
    let dir = cli.cwd.path().join("hello");
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    std::fs::write(
        dir.join("hello.sh"),
        "#!/bin/sh\necho \"hello from $TASK_ID\"\ncat \"$PAYLOAD_FILE\"; echo\n. ./lib/more.sh\n",
    )
    .unwrap();
    std::fs::write(dir.join("lib/more.sh"), "echo more\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("hello.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    dir
}

#[test]
fn codes_tasks_and_schedules_from_the_command_line() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path());
    let cli = Cli::new(&server);

    // Codes: an image code and a zip package from a directory; a second push is a revision.
    let image = cli.json(&[
        "code",
        "push",
        "hello",
        "--image",
        "stevedore/busybox:local",
        "--command",
        "echo hi",
        "--env",
        "GREETING=hi",
        "--memory",
        "64",
        "--timeout",
        "30",
    ]);
    let image_id = image["id"].as_str().unwrap().to_owned();
    assert_eq!(image["rev"], 1);
    let dir = hello_dir(&cli);
    let zipped = cli.ok(&[
        "code",
        "push",
        "legacy",
        "--runtime",
        "sh",
        "--file",
        "hello.sh",
        "--zip",
        dir.to_str().unwrap(),
    ]);
    assert!(zipped.starts_with("pushed legacy revision 1 ("), "{zipped}");
    let again = cli.json(&[
        "code",
        "push",
        "hello",
        "--image",
        "stevedore/busybox:local",
        "--command",
        "echo again",
    ]);
    assert_eq!(
        (again["id"].as_str(), again["rev"].as_u64()),
        (Some(image_id.as_str()), Some(2))
    );
    let legacy_id = cli.json(&["code", "show", "legacy"])["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let ids = [
        (image_id.as_str(), "<hello-id>"),
        (legacy_id.as_str(), "<legacy-id>"),
    ];
    insta::assert_snapshot!("code_ls", normalise(&cli.ok(&["code", "ls"]), &ids));
    insta::assert_snapshot!(
        "code_show",
        normalise(&cli.ok(&["code", "show", "hello"]), &ids)
    );
    let revisions = cli.json(&["code", "revisions", "hello"]);
    assert_eq!(revisions["revisions"].as_array().unwrap().len(), 2);

    // The package comes back as it was zipped, with the nested file and its mode.
    cli.ok(&["code", "download", "legacy", "-o", "legacy.zip"]);
    let zip = std::fs::read(cli.cwd.path().join("legacy.zip")).unwrap();
    assert_eq!(&zip[..2], b"PK");
    let listing = String::from_utf8_lossy(&zip);
    assert!(listing.contains("hello.sh") && listing.contains("lib/more.sh"));

    // Tasks stay queued: this server runs none.
    let queued = cli.ok(&[
        "task",
        "queue",
        "hello",
        "--payload",
        r#"{"n":1}"#,
        "--priority",
        "2",
        "--label",
        "first",
    ]);
    let task_id = queued.trim().to_owned();
    let task = cli.json(&["task", "show", &task_id]);
    assert_eq!(task["status"], "queued");
    assert_eq!(task["priority"], 2);
    assert_eq!(task["payload"], r#"{"n":1}"#);
    assert_eq!(task["label"], "first");
    let payload_file = cli.cwd.path().join("payload.json");
    std::fs::write(&payload_file, r#"{"from":"file"}"#).unwrap();
    let second = cli.json(&[
        "task",
        "queue",
        "legacy",
        "--payload-file",
        payload_file.to_str().unwrap(),
        "--delay",
        "60",
    ]);
    let second_id = second["tasks"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        cli.json(&["task", "show", &second_id])["payload"],
        r#"{"from":"file"}"#
    );

    let listed = cli.json(&["task", "ls", "--code", "hello", "--status", "queued"]);
    let listed: Vec<&str> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| task["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![task_id.as_str()]);
    let labelled = cli.json(&["task", "ls", "--label", "first"]);
    let labelled: Vec<&str> = labelled["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| task["id"].as_str().unwrap())
        .collect();
    assert_eq!(labelled, vec![task_id.as_str()]);
    let table = cli.ok(&["task", "ls"]);
    assert!(table.starts_with("ID ") && table.contains(&task_id) && table.contains(&second_id));
    let no_log = cli.run(&["task", "log", &task_id]);
    assert!(no_log.status.success());
    assert!(String::from_utf8_lossy(&no_log.stderr).contains("has no log yet"));

    assert!(cli.ok(&["task", "cancel", &task_id]).contains("cancelled"));
    let retried = cli.ok(&["task", "retry", &task_id]);
    let retry_id = retried.trim();
    assert_ne!(retry_id, task_id);
    assert_eq!(
        cli.json(&["task", "show", retry_id])["original_task_id"],
        task_id.as_str()
    );

    // Schedules.
    let schedule_id = cli.ok(&[
        "schedule",
        "create",
        "hello",
        "--every",
        "3600",
        "--start-at",
        "2100-01-01T00:00:00Z",
        "--run-times",
        "3",
        "--delay",
        "30",
        "--max-concurrency",
        "2",
    ]);
    let schedule_id = schedule_id.trim();
    let every = cli.ok(&["schedule", "show", schedule_id]);
    assert!(
        every.contains("30s") && every.contains("max concurrency") && every.contains('2'),
        "{every}"
    );
    let cron = cli.json(&[
        "schedule",
        "create",
        "legacy",
        "--cron",
        "*/5 * * * *",
        "--tz",
        "Europe/Berlin",
    ]);
    let cron_id = cron["schedules"][0]["id"].as_str().unwrap().to_owned();
    let shown = cli.json(&["schedule", "show", &cron_id]);
    assert_eq!(
        (shown["cron"].as_str(), shown["timezone"].as_str()),
        (Some("*/5 * * * *"), Some("Europe/Berlin"))
    );
    let ids = [(schedule_id, "<every-id>"), (cron_id.as_str(), "<cron-id>")];
    let ls = normalise(&cli.ok(&["schedule", "ls"]), &ids);
    assert!(
        ls.contains("<every-id>") && ls.contains("every 3600s") && ls.contains("0/3"),
        "{ls}"
    );
    assert!(ls.contains("cron */5 * * * * (Europe/Berlin)"), "{ls}");
    cli.ok(&["schedule", "cancel", schedule_id]);
    assert_eq!(
        cli.json(&["schedule", "show", schedule_id])["status"],
        "cancelled"
    );

    // Stacks.
    let stacks = cli.ok(&["stack", "ls"]);
    assert!(
        stacks.starts_with("NAME ") && stacks.contains("stevedore/busybox:local"),
        "{stacks}"
    );

    // Deleting a code.
    cli.ok(&["code", "rm", "legacy"]);
    let missing = cli.fails(&["code", "show", "legacy"], 1);
    assert!(missing.contains("no code named \"legacy\""), "{missing}");
}

#[test]
fn mistakes_get_clear_errors_and_exit_codes() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path());
    let cli = Cli::new(&server);

    let unknown = cli.fails(&["task", "queue", "nope"], 1);
    assert!(
        unknown.starts_with("error: the server answered 404"),
        "{unknown}"
    );
    assert!(unknown.contains("nope"), "{unknown}");
    let status = cli.fails(&["task", "ls", "--status", "done"], 1);
    assert!(
        status.contains("--status \"done\" is not a status"),
        "{status}"
    );
    let nothing = cli.fails(&["code", "push", "x"], 1);
    assert!(
        nothing.contains("--image IMAGE, --runtime RUNTIME"),
        "{nothing}"
    );
    let env = cli.fails(
        &["code", "push", "x", "--image", "a", "--env", "NOEQUALS"],
        1,
    );
    assert!(env.contains("KEY=VALUE"), "{env}");
    let bad = cli.fails(&["code", "push", "x", "--image", "a", "--memory=-5"], 1);
    assert!(bad.contains("400") && bad.contains("memory"), "{bad}");
    // clap's usage errors exit 2.
    cli.fails(&["task", "queue"], 2);
    cli.fails(&["schedule", "create", "hello"], 2);

    let bad_token = cli.fails(&["code", "ls", "--token", "wrong"], 1);
    assert!(bad_token.contains("401"), "{bad_token}");

    // No configuration at all: say how to provide it.
    let empty = tempfile::tempdir().unwrap();
    let lost = Cli::for_data_dir(empty.path());
    let error = lost.fails(&["code", "ls"], 1);
    assert!(
        error.contains("no project id is configured") && error.contains("IRON_PROJECT_ID"),
        "{error}"
    );

    // A server that is not there.
    let iron = lost.cwd.path().join("iron.json");
    std::fs::write(
        &iron,
        r#"{"project_id":"p","token":"t","host":"127.0.0.1","port":9}"#,
    )
    .unwrap();
    let down = lost.fails(&["code", "ls"], 1);
    assert!(
        down.contains("cannot reach the stevedore server at http://127.0.0.1:9"),
        "{down}"
    );
}

#[test]
fn queue_wait_and_follow_stream_the_log_of_real_containers() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let server =
        ServerProcess::start_running(data.path(), &format!("cli-{}", std::process::id()), &[]);
    let cli = Cli::new(&server);
    cli.ok(&[
        "code", "push", "steps", "--image", "stevedore/busybox:local", "--command",
        "for i in 1 2 3; do echo \"step $i\"; echo \"::stevedore-progress::$((i * 33)) step $i\"; sleep 0.3; done; cat $PAYLOAD_FILE",
    ]);
    cli.ok(&[
        "code",
        "push",
        "fails",
        "--image",
        "stevedore/busybox:local",
        "--command",
        "echo oops; exit 7",
    ]);

    let output = cli.run(&[
        "task",
        "queue",
        "steps",
        "--payload",
        "the-payload",
        "--wait",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("step 1\n")
            && stdout.contains("step 3\n")
            && stdout.ends_with("the-payload"),
        "{stdout}"
    );
    assert!(stderr.contains(" complete"), "{stderr}");

    let failed = cli.run(&["task", "queue", "fails", "--wait"]);
    assert_eq!(failed.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&failed.stdout), "oops\n");
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("error (exit code 7)"), "{stderr}");

    // --json --wait prints the finished task as JSON and keeps the exit code.
    let waited = cli.run(&["task", "queue", "fails", "--wait", "--json"]);
    assert_eq!(waited.status.code(), Some(3));
    let task: Value = serde_json::from_slice(&waited.stdout).unwrap();
    assert_eq!(
        (task["status"].as_str(), task["exit_code"].as_i64()),
        (Some("error"), Some(7))
    );

    // On a terminal, a log whose last line lacks its newline still leaves the status line on
    // a line of its own (a regression: it was printed right after the output).
    cli.ok(&[
        "code",
        "push",
        "no-newline",
        "--image",
        "stevedore/busybox:local",
        "--command",
        "printf 'no newline at the end'",
    ]);
    let on_terminal = cli.run_on_terminal(&["task", "queue", "no-newline", "--wait"]);
    assert!(
        on_terminal.contains("no newline at the end\r\ntask "),
        "{on_terminal:?}"
    );

    // Follow a task that is already running, then read its whole log.
    let task_id = cli
        .ok(&["task", "queue", "steps", "--payload", "p2"])
        .trim()
        .to_owned();
    let follow = cli.run(&["task", "log", &task_id, "--follow"]);
    assert!(follow.status.success());
    assert_eq!(
        String::from_utf8_lossy(&follow.stdout),
        cli.ok(&["task", "log", &task_id])
    );
    let shown = cli.json(&["task", "show", &task_id]);
    assert_eq!(
        (shown["percent"].as_u64(), shown["msg"].as_str()),
        (Some(99), Some("step 3"))
    );
}

#[test]
fn code_push_builds_a_dockerfile_into_the_code_image() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    let data = tempfile::tempdir().unwrap();
    let server =
        ServerProcess::start_running(data.path(), &format!("cli-df-{}", std::process::id()), &[]);
    let cli = Cli::new(&server);
    let context = cli.cwd.path().join("worker");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        "FROM stevedore/busybox:local\nCOPY greeting.txt /greeting.txt\nRUN echo built-by-run > /built.txt\nCMD cat /greeting.txt /built.txt\n",
    )
    .unwrap();
    std::fs::write(context.join("greeting.txt"), "hello from a Dockerfile\n").unwrap();
    std::fs::write(context.join("secret.txt"), "ignored\n").unwrap();
    std::fs::write(context.join(".dockerignore"), "secret.txt\n").unwrap();

    let pushed = cli.json(&[
        "code",
        "push",
        "built",
        "--dockerfile",
        context.to_str().unwrap(),
    ]);
    let code = cli.json(&["code", "show", "built"]);
    let image = code["image"].as_str().unwrap().to_owned();
    // Built for this project alone: its id is in the image's path.
    let project_id = server.iron["project_id"].as_str().unwrap();
    assert!(
        image.starts_with(&format!("stevedore-code/{project_id}/built:")),
        "{image}"
    );
    assert_eq!(pushed["rev"], 1);

    let output = cli.run(&["task", "queue", "built", "--wait"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "hello from a Dockerfile\nbuilt-by-run\n"
    );

    // A Dockerfile that fails says why, and registers nothing.
    std::fs::write(
        context.join("Dockerfile"),
        "FROM stevedore/busybox:local\nRUN exit 3\n",
    )
    .unwrap();
    let error = cli.fails(
        &[
            "code",
            "push",
            "built",
            "--dockerfile",
            context.to_str().unwrap(),
        ],
        1,
    );
    assert!(error.contains("cannot build the image"), "{error}");
    assert_eq!(cli.json(&["code", "show", "built"])["rev"], 1);

    let _ = Command::new("docker")
        .args(["image", "rm", "-f", &image])
        .output();
}

#[test]
fn run_executes_a_code_locally_with_the_production_contract() {
    if !docker_available() {
        return;
    }
    ensure_local_image();
    // No server at all: the code comes from the flags.
    let nowhere = tempfile::tempdir().unwrap();
    let cli = Cli::for_data_dir(nowhere.path());
    let output = cli.run(&[
        "run", "local", "--image", "stevedore/busybox:local", "--env", "GREETING=hey",
        "--code-config", "the-config", "--payload", r#"{"n":2}"#, "--command",
        "echo \"$GREETING $TASK_ID in $TASK_DIR\"; cat $PAYLOAD_FILE; echo; cat $CONFIG_FILE; echo; echo '::stevedore-progress::60 most'",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("hey ") && stdout.contains(" in /mnt/task\n{\"n\":2}\nthe-config\n"),
        "{stdout}"
    );
    assert!(stderr.contains(" complete (exit code 0)"), "{stderr}");

    // A zip package on a runtime, with the IronWorker flags; a failure exits 3.
    let dir = hello_dir(&cli);
    let output = cli.run(&[
        "run",
        "legacy",
        "--runtime",
        "sh",
        "--file",
        "hello.sh",
        "--zip",
        dir.to_str().unwrap(),
        "--payload",
        "zipped",
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    let log = result["log"].as_str().unwrap();
    assert!(
        log.starts_with("hello from ") && log.ends_with("zipped\nmore\n"),
        "{log}"
    );
    assert!(
        crate::support::containers_labelled(&format!(
            "stevedore.task={}",
            result["id"].as_str().unwrap()
        ))
        .is_empty()
    );

    let failed = cli.run(&[
        "run",
        "bad",
        "--image",
        "stevedore/busybox:local",
        "--command",
        "exit 9",
        "--json",
    ]);
    assert_eq!(failed.status.code(), Some(3));
    let result: Value = serde_json::from_slice(&failed.stdout).unwrap();
    assert_eq!(
        (result["status"].as_str(), result["exit_code"].as_i64()),
        (Some("error"), Some(9))
    );
    let oom = cli.run(&[
        "run",
        "oom",
        "--image",
        "stevedore/busybox:local",
        "--memory",
        "16",
        "--json",
        "--command",
        "head -c 64m /dev/zero | tail > /dev/null",
    ]);
    assert_eq!(oom.status.code(), Some(3));
    let result: Value = serde_json::from_slice(&oom.stdout).unwrap();
    assert_eq!(result["msg"], "out of memory (limit 16 MiB)");

    let missing = cli.fails(
        &["run", "ghost", "--image", "stevedore/no-such-image:none"],
        1,
    );
    assert!(
        missing.contains("stevedore/no-such-image:none"),
        "{missing}"
    );
    let invalid = cli.fails(
        &[
            "run",
            "bad",
            "--image",
            "stevedore/busybox:local",
            "--memory",
            "1",
        ],
        1,
    );
    assert!(invalid.contains("memory"), "{invalid}");

    // Without definition flags, the code and its package come from the server.
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path());
    let cli = Cli::new(&server);
    let dir = hello_dir(&cli);
    cli.ok(&[
        "code",
        "push",
        "legacy",
        "--runtime",
        "sh",
        "--file",
        "hello.sh",
        "--zip",
        dir.to_str().unwrap(),
    ]);
    let output = cli.run(&["run", "legacy", "--payload", "from-the-server"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.ends_with("from-the-server\nmore\n"), "{stdout}");
    let unknown = cli.fails(&["run", "nope"], 1);
    assert!(unknown.contains("no code named \"nope\""), "{unknown}");
}

#[test]
fn usage_from_the_command_line() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path());
    let cli = Cli::new(&server);
    cli.ok(&[
        "code",
        "push",
        "hello",
        "--image",
        "stevedore/busybox:local",
    ]);
    // A task cancelled while it waits has finished, without compute time.
    let queued = cli.json(&["task", "queue", "hello", "--delay", "3600"]);
    let task_id = queued["tasks"][0]["id"].as_str().unwrap().to_owned();
    cli.ok(&["task", "cancel", &task_id]);

    let report = cli.json(&["usage", "--bucket", "hour"]);
    assert_eq!(report["bucket_secs"], 3600);
    assert_eq!(report["totals"]["tasks"], 1);
    assert_eq!(report["totals"]["cancelled"], 1);
    assert_eq!(report["codes"][0]["code_name"], "hello");
    assert_eq!(report["stacks"][0]["stack"], "image");

    let by_stack = cli.ok(&["usage", "--by", "stack"]);
    let total = by_stack
        .lines()
        .find(|line| line.starts_with("total"))
        .unwrap_or_else(|| panic!("no total row in:\n{by_stack}"));
    let cells: Vec<&str> = total.split_whitespace().collect();
    assert_eq!(cells, ["total", "image", "1", "0", "0", "1", "0ms"]);
    assert!(by_stack.contains("STACK"), "{by_stack}");

    let refused = cli.fails(&["usage", "--bucket", "week"], 1);
    assert!(
        refused.starts_with("error: the server answered 400") && refused.contains("bucket"),
        "{refused}"
    );
}

/// Quotes `text` for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}
