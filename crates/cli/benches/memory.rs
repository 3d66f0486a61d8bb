//! The memory of `serve` while big packages pass through it, and the API's latency meanwhile:
//! the real `stevedore serve` binary with its embedded runner, its resident memory (`VmRSS` in
//! `/proc/<pid>/status`) sampled every 20 ms, `GET tasks` asked over and over beside it. Two
//! phases, each on a fresh `serve` whose idle memory is the baseline:
//!
//! * `unpack`: tasks at once (default 8) of a runtime code whose package is a small zip that
//!   unpacks to one big file (default 500 MiB of zeros); each task counts the file's bytes;
//! * `upload`: code uploads at once (default 4) of a zip about as large as it unpacks (default
//!   250 MiB of random data, stored), with the server's package limits raised to take them.
//!
//! Prints, per phase, the idle baseline, the peak over it (sampled, and `VmHWM`, the kernel's
//! own peak), and the p50/p99/max of the API's answers. The target is under 100 MiB over the
//! baseline in each phase. Asserts nothing about memory or speed; fails loudly when the server
//! or a task misbehaves.
//!
//! `cargo bench -p stevedore --bench memory`. Knobs: `STEVEDORE_BENCH_TASKS` (tasks of the
//! first phase), `STEVEDORE_BENCH_UNPACKED_MIB` (the file they count), `STEVEDORE_BENCH_UPLOADS`
//! (uploads of the second), `STEVEDORE_BENCH_UPLOAD_MIB` (their size),
//! `STEVEDORE_BENCH_PHASES` (`unpack`, `upload` or both, comma-separated). Needs a Docker
//! engine with `stevedore/busybox:local`; skips with a message without one.

// A benchmark fails loudly: every `expect` says what went wrong.
#![allow(clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stevedore_engine::{ContainerRuntime, DockerEngine, ImageStore, LOCAL_BUSYBOX_IMAGE};

#[path = "support/server.rs"]
mod server;
#[path = "support/stats.rs"]
mod stats;

use server::Server;
use stats::percentile;

const DEFAULT_TASKS: usize = 8;
const DEFAULT_UNPACKED_MIB: u64 = 500;
const DEFAULT_UPLOADS: usize = 4;
const DEFAULT_UPLOAD_MIB: u64 = 250;
/// The target: no phase takes `serve` more than this over its idle memory.
const TARGET_MIB: f64 = 100.0;
const SAMPLE_INTERVAL: Duration = Duration::from_millis(20);
const REQUEST_PAUSE: Duration = Duration::from_millis(10);
const PHASE_DEADLINE: Duration = Duration::from_secs(900);
/// The task's script: the launcher of the `binary` runtime runs it as it is.
const SCRIPT: &str = "#!/bin/sh\nls -l \"$TASK_DIR/big.bin\"\nwc -c < \"$TASK_DIR/big.bin\"\n";

/// What one phase measured.
struct PhaseReport {
    name: &'static str,
    what: String,
    elapsed: Duration,
    baseline_kib: u64,
    /// The highest `VmRSS` sampled during the phase.
    peak_kib: u64,
    /// The kernel's peak (`VmHWM`) at the end of the phase.
    hwm_kib: u64,
    latencies_ms: Vec<f64>,
}

#[tokio::main]
async fn main() {
    let engine = match DockerEngine::connect().await {
        Ok(engine) => engine,
        Err(error) => {
            println!("memory: skipped, the Docker engine is unreachable ({error})");
            return;
        }
    };
    assert!(
        engine
            .image_present(LOCAL_BUSYBOX_IMAGE)
            .await
            .expect("ask the engine for the local busybox image"),
        "{LOCAL_BUSYBOX_IMAGE} is missing: `stevedore stack build-local busybox` makes it"
    );
    let phases = std::env::var("STEVEDORE_BENCH_PHASES").unwrap_or_else(|_| "unpack,upload".into());
    let mut reports = Vec::new();
    for phase in phases.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let report = match phase {
            "unpack" => {
                let tasks = env_number("STEVEDORE_BENCH_TASKS").unwrap_or(DEFAULT_TASKS as u64);
                let mib =
                    env_number("STEVEDORE_BENCH_UNPACKED_MIB").unwrap_or(DEFAULT_UNPACKED_MIB);
                unpack_phase(&engine, tasks as usize, mib).await
            }
            "upload" => {
                let uploads =
                    env_number("STEVEDORE_BENCH_UPLOADS").unwrap_or(DEFAULT_UPLOADS as u64);
                let mib = env_number("STEVEDORE_BENCH_UPLOAD_MIB").unwrap_or(DEFAULT_UPLOAD_MIB);
                upload_phase(uploads as usize, mib).await
            }
            other => panic!("STEVEDORE_BENCH_PHASES: unknown phase {other:?} (unpack, upload)"),
        };
        reports.push(report);
    }
    print_reports(&reports);
}

// === the phases ===

/// `tasks` tasks at once of a runtime code whose small package unpacks to `mib` MiB.
async fn unpack_phase(engine: &DockerEngine, tasks: usize, mib: u64) -> PhaseReport {
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let zip_path = scratch.path().join("unpack.zip");
    let began = Instant::now();
    let zip_bytes = write_zip(&zip_path, mib << 20, Contents::Zeros);
    eprintln!(
        "unpack: a {} KiB zip of a {mib} MiB file, written in {:.1} s",
        zip_bytes >> 10,
        began.elapsed().as_secs_f64()
    );
    let runner_id = format!("bench-memory-{}", std::process::id());
    let data_dir = scratch.path().join("data");
    std::fs::create_dir(&data_dir).expect("create the data directory");
    let mut server = Server::start(&data_dir, tasks, &runner_id, &[]).await;
    let client = reqwest::Client::new();
    let zip = tokio::fs::read(&zip_path).await.expect("read the zip");
    upload_code(
        &client,
        &server,
        "unpack",
        reqwest::Body::from(zip),
        zip_bytes,
    )
    .await;
    let baseline_kib = idle_baseline(server.pid()).await;

    let probe = Probe::start(&server, &client);
    let began = Instant::now();
    let batch: Vec<Value> = (0..tasks)
        .map(|_| json!({"code_name": "unpack", "timeout": 600}))
        .collect();
    let queued: Value = client
        .post(server.url("tasks"))
        .header("Authorization", server.authorization())
        .json(&json!({ "tasks": batch }))
        .send()
        .await
        .expect("POST tasks")
        .error_for_status()
        .expect("POST tasks succeeds")
        .json()
        .await
        .expect("POST tasks answers JSON");
    let ids: Vec<String> = queued["tasks"]
        .as_array()
        .expect("POST tasks lists the tasks")
        .iter()
        .map(|task| task["id"].as_str().expect("a task id").to_owned())
        .collect();
    let mut finished = Vec::new();
    for id in &ids {
        loop {
            server.assert_running();
            assert!(
                began.elapsed() < PHASE_DEADLINE,
                "the tasks did not end in time"
            );
            let task = get_json(&client, &server, &format!("tasks/{id}")).await;
            if ["complete", "error", "timeout", "cancelled"]
                .contains(&task["status"].as_str().unwrap_or(""))
            {
                finished.push(task);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let elapsed = began.elapsed();
    let (peak_kib, latencies_ms) = probe.stop().await;
    let hwm_kib = memory_kib(server.pid()).map_or(0, |memory| memory.hwm_kib);
    for task in &finished {
        assert_eq!(
            task["status"], "complete",
            "a task did not complete: {task}"
        );
    }
    let log = client
        .get(server.url(&format!("tasks/{}/log", ids[0])))
        .header("Authorization", server.authorization())
        .send()
        .await
        .expect("GET log")
        .text()
        .await
        .expect("the log");
    assert!(
        log.contains(&(mib << 20).to_string()),
        "the task did not count {} bytes: {log}",
        mib << 20
    );
    server.terminate().await;
    for id in engine
        .list_labeled("stevedore.runner", &runner_id)
        .await
        .expect("list the runner's containers")
    {
        let _ = engine.remove(&id).await;
    }
    PhaseReport {
        name: "unpack",
        what: format!(
            "{tasks} tasks at once, each unpacking a {} KiB zip to {mib} MiB",
            zip_bytes >> 10
        ),
        elapsed,
        baseline_kib,
        peak_kib,
        hwm_kib,
        latencies_ms,
    }
}

/// `uploads` code uploads at once of a stored zip of `mib` MiB of random data.
async fn upload_phase(uploads: usize, mib: u64) -> PhaseReport {
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let zip_path = scratch.path().join("upload.zip");
    let began = Instant::now();
    let zip_bytes = write_zip(&zip_path, mib << 20, Contents::Random);
    eprintln!(
        "upload: a {} MiB zip written in {:.1} s",
        zip_bytes >> 20,
        began.elapsed().as_secs_f64()
    );
    let runner_id = format!("bench-memory-upload-{}", std::process::id());
    let data_dir = scratch.path().join("data");
    std::fs::create_dir(&data_dir).expect("create the data directory");
    // The default package limit (64 MiB) would refuse the uploads.
    let max_package = (zip_bytes + (1 << 20)).to_string();
    let max_unpacked = ((mib << 20) + (1 << 20)).max(512 << 20).to_string();
    let package_quota = (zip_bytes * (uploads as u64 + 1)).max(10 << 30).to_string();
    let env = [
        ("STEVEDORE_MAX_PACKAGE_BYTES", max_package.as_str()),
        ("STEVEDORE_MAX_UNPACKED_BYTES", max_unpacked.as_str()),
        ("STEVEDORE_QUOTAS__PACKAGE_BYTES", package_quota.as_str()),
    ];
    let mut server = Server::start(&data_dir, 1, &runner_id, &env).await;
    let client = reqwest::Client::new();
    let baseline_kib = idle_baseline(server.pid()).await;

    let probe = Probe::start(&server, &client);
    let began = Instant::now();
    let sends = (0..uploads).map(|n| {
        let (client, server, zip_path) = (&client, &server, &zip_path);
        async move {
            let body = file_body(zip_path).await;
            upload_code(client, server, &format!("upload-{n}"), body, zip_bytes).await;
        }
    });
    futures::future::join_all(sends).await;
    let elapsed = began.elapsed();
    let (peak_kib, latencies_ms) = probe.stop().await;
    server.assert_running();
    let hwm_kib = memory_kib(server.pid()).map_or(0, |memory| memory.hwm_kib);
    server.terminate().await;
    PhaseReport {
        name: "upload",
        what: format!("{uploads} uploads at once of a {} MiB zip", zip_bytes >> 20),
        elapsed,
        baseline_kib,
        peak_kib,
        hwm_kib,
        latencies_ms,
    }
}

// === serve's memory and the API's latency ===

/// What `/proc/<pid>/status` says of a process's memory.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

fn memory_kib(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// `serve`'s resident memory once it has settled: the median of a second of samples.
async fn idle_baseline(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut samples = Vec::new();
    for _ in 0..20 {
        samples.push(memory_kib(pid).expect("serve's /proc status").rss_kib);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Samples `serve`'s memory and times `GET tasks` until stopped.
struct Probe {
    stop: Arc<AtomicBool>,
    sampler: tokio::task::JoinHandle<u64>,
    requests: tokio::task::JoinHandle<Vec<f64>>,
}

impl Probe {
    fn start(server: &Server, client: &reqwest::Client) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = server.pid();
        let sampler = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move {
                let mut peak = 0;
                let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
                while !stop.load(Ordering::Relaxed) {
                    ticks.tick().await;
                    if let Some(memory) = memory_kib(pid) {
                        peak = peak.max(memory.rss_kib);
                    }
                }
                peak
            }
        });
        let requests = tokio::spawn({
            let stop = Arc::clone(&stop);
            let client = client.clone();
            let url = server.url("tasks?per_page=30");
            let authorization = server.authorization();
            async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    client
                        .get(&url)
                        .header("Authorization", &authorization)
                        .send()
                        .await
                        .expect("GET tasks")
                        .error_for_status()
                        .expect("GET tasks succeeds")
                        .bytes()
                        .await
                        .expect("GET tasks answers");
                    latencies.push(asked.elapsed().as_secs_f64() * 1000.0);
                    tokio::time::sleep(REQUEST_PAUSE).await;
                }
                latencies
            }
        });
        Probe {
            stop,
            sampler,
            requests,
        }
    }

    /// The peak `VmRSS` sampled, KiB, and the latencies of the answers, ms.
    async fn stop(self) -> (u64, Vec<f64>) {
        self.stop.store(true, Ordering::Relaxed);
        let peak = self.sampler.await.expect("the sampler ran");
        let latencies = self.requests.await.expect("the requests ran");
        (peak, latencies)
    }
}

// === packages ===

/// What the big file of a package holds.
#[derive(Clone, Copy)]
enum Contents {
    /// Zeros, deflated: a tiny zip that unpacks big.
    Zeros,
    /// Random bytes, stored: a zip as big as what it holds.
    Random,
}

/// Writes a zip of the task's script and `big.bin` of `size` bytes to `path`; returns its size.
fn write_zip(path: &Path, size: u64, contents: Contents) -> u64 {
    let file = std::fs::File::create(path).expect("create the zip");
    let mut writer = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let executable = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    writer
        .start_file("run.sh", executable)
        .expect("start run.sh");
    writer.write_all(SCRIPT.as_bytes()).expect("write run.sh");
    let method = match contents {
        Contents::Zeros => zip::CompressionMethod::Deflated,
        Contents::Random => zip::CompressionMethod::Stored,
    };
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(method)
        .unix_permissions(0o644)
        .large_file(size >= u32::MAX as u64);
    writer
        .start_file("big.bin", options)
        .expect("start big.bin");
    let mut block = vec![0u8; 1 << 20];
    let mut random = 0x9e37_79b9_7f4a_7c15_u64;
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        if let Contents::Random = contents {
            for word in block[..n].chunks_mut(8) {
                // xorshift64: random enough that nothing compresses it.
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                word.copy_from_slice(&random.to_le_bytes()[..word.len()]);
            }
        }
        writer.write_all(&block[..n]).expect("write big.bin");
        left -= n as u64;
    }
    writer
        .finish()
        .expect("finish the zip")
        .into_inner()
        .map_err(|error| error.into_error())
        .expect("flush the zip")
        .sync_all()
        .expect("sync the zip");
    std::fs::metadata(path).expect("the zip's size").len()
}

/// The file's bytes as a request body read in chunks, never whole.
async fn file_body(path: &Path) -> reqwest::Body {
    let file = tokio::fs::File::open(path).await.expect("open the zip");
    let chunks = futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut chunk = vec![0u8; 256 << 10];
        match file.read(&mut chunk).await {
            Ok(0) => None,
            Ok(n) => {
                chunk.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(chunk)), file))
            }
            Err(error) => Some((Err(error), file)),
        }
    });
    reqwest::Body::wrap_stream(chunks)
}

/// Uploads a `binary` runtime code running `run.sh` from the zip in `body` (`length` bytes), as
/// IronWorker's clients do: a multipart `data` document and the zip.
async fn upload_code(
    client: &reqwest::Client,
    server: &Server,
    name: &str,
    body: reqwest::Body,
    length: u64,
) {
    let data = json!({
        "name": name,
        "runtime": "binary",
        "file_name": "run.sh",
        "network": "none",
    });
    let form = reqwest::multipart::Form::new()
        .text("data", data.to_string())
        .part(
            "file",
            reqwest::multipart::Part::stream_with_length(body, length)
                .file_name("code.zip")
                .mime_str("application/zip")
                .expect("a MIME type"),
        );
    let answer = client
        .post(server.url("codes"))
        .header("Authorization", server.authorization())
        .multipart(form)
        .send()
        .await
        .expect("POST codes");
    let status = answer.status();
    let text = answer.text().await.unwrap_or_default();
    assert!(status.is_success(), "POST codes {name}: {status} {text}");
}

async fn get_json(client: &reqwest::Client, server: &Server, path: &str) -> Value {
    client
        .get(server.url(path))
        .header("Authorization", server.authorization())
        .send()
        .await
        .expect("GET")
        .error_for_status()
        .expect("GET succeeds")
        .json()
        .await
        .expect("GET answers JSON")
}

// === the report ===

fn print_reports(reports: &[PhaseReport]) {
    println!();
    println!(
        "{:<8} {:>10} {:>13} {:>13} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "phase",
        "idle MiB",
        "peak+ MiB",
        "VmHWM+ MiB",
        "answers",
        "p50 ms",
        "p99 ms",
        "max ms",
        "secs"
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    for report in reports {
        let mut sorted = report.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "{:<8} {:>10.1} {:>13.1} {:>13.1} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>7.1}",
            report.name,
            mib(report.baseline_kib),
            mib(report.peak_kib.saturating_sub(report.baseline_kib)),
            mib(report.hwm_kib.saturating_sub(report.baseline_kib)),
            sorted.len(),
            percentile(&sorted, 50.0),
            percentile(&sorted, 99.0),
            sorted.last().copied().unwrap_or_default(),
            report.elapsed.as_secs_f64()
        );
    }
    println!();
    for report in reports {
        let over = mib(report.peak_kib.saturating_sub(report.baseline_kib));
        let verdict = if over < TARGET_MIB { "meets" } else { "MISSES" };
        println!(
            "{}: {} took serve {over:.1} MiB over its idle memory ({verdict} the target of under \
             {TARGET_MIB} MiB)",
            report.name, report.what
        );
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|value| {
        value
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{name} must be a positive integer"))
    })
}
