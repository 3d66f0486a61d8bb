//! How many `true` task containers a second the direct OCI runtime runs (through `crun` and
//! through `runc`), beside the Docker engine in the same run: each task is create (with the
//! task directory in place) → attach → start → its output to the end → wait → remove, one at
//! a time and four at once. Prints a table with tasks/s and the median time from the create
//! call to the start's return.
//!
//! ```text
//! cargo bench -p stevedore-engine --bench oci_throughput
//! OCI_BENCH_TASKS=200 cargo bench -p stevedore-engine --bench oci_throughput
//! OCI_BENCH_STATE_ROOT=/dev/shm/oci-bench OCI_BENCH_DOCKER=0 cargo bench ...  # bundles on tmpfs
//! ```
//!
//! Needs root, the static busybox, and `crun`, `runc` and a Docker engine (each one missing
//! is left out of the table, saying so).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use stevedore_engine::oci::{
    ImageRunConfig, OciRuntime, OciSettings, UnpackedImage, UnpackedImages,
};
use stevedore_engine::{
    ContainerRuntime, ContainerSpec, DockerEngine, EngineError, HOST_BUSYBOX, LOCAL_BUSYBOX_IMAGE,
    build_local_busybox_image, busybox_rootfs_tar,
};

type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The busybox image, unpacked as one layer.
struct BusyboxImage {
    layer: PathBuf,
}

#[async_trait]
impl UnpackedImages for BusyboxImage {
    async fn unpacked(&self, reference: &str) -> Result<Option<UnpackedImage>, EngineError> {
        Ok((reference == LOCAL_BUSYBOX_IMAGE).then(|| UnpackedImage {
            id: "sha256:busybox-bench".to_owned(),
            layers: vec![self.layer.clone()],
            config: ImageRunConfig {
                env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_owned()],
                cmd: Some(vec!["sh".to_owned()]),
                working_dir: Some("/mnt/task".to_owned()),
                ..ImageRunConfig::default()
            },
        }))
    }
}

/// What one run of tasks measured.
struct Measured {
    tasks: usize,
    elapsed: Duration,
    create_to_start: Vec<Duration>,
    failures: usize,
}

fn spec() -> ContainerSpec {
    let mut spec = ContainerSpec::new(LOCAL_BUSYBOX_IMAGE);
    spec.cmd = Some(vec!["true".to_owned()]);
    spec.memory_bytes = Some(64 << 20);
    spec.pids_limit = Some(64);
    spec.network_mode = Some("none".to_owned());
    spec.labels
        .insert("stevedore.bench".to_owned(), "oci_throughput".to_owned());
    spec
}

/// One task from create to remove; the time from the create call to the start's return.
async fn one_task(runtime: &dyn ContainerRuntime) -> Result<Duration, EngineError> {
    let spec = spec();
    let began = Instant::now();
    let id = runtime.create(&spec).await?;
    let run = async {
        let mut output = runtime.attach(&id).await?;
        runtime.start(&id).await?;
        let started = began.elapsed();
        while let Some(chunk) = output.next().await {
            chunk?;
        }
        let status = runtime.wait(&id).await?;
        if status.exit_code != 0 {
            return Err(EngineError::Failed {
                message: format!("true exited {}", status.exit_code),
            });
        }
        Ok(started)
    };
    let outcome = run.await;
    runtime.remove(&id).await?;
    outcome
}

async fn measure(runtime: Arc<dyn ContainerRuntime>, tasks: usize, concurrency: usize) -> Measured {
    let began = Instant::now();
    let results: Vec<Result<Duration, EngineError>> = futures::stream::iter(0..tasks)
        .map(|_| {
            let runtime = runtime.clone();
            async move { one_task(runtime.as_ref()).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = began.elapsed();
    let mut create_to_start = Vec::new();
    let mut failures = 0;
    for result in results {
        match result {
            Ok(latency) => create_to_start.push(latency),
            Err(error) => {
                failures += 1;
                eprintln!("a task failed: {error}");
            }
        }
    }
    create_to_start.sort();
    Measured {
        tasks,
        elapsed,
        create_to_start,
        failures,
    }
}

fn busybox_layer(scratch: &Path) -> BenchResult<PathBuf> {
    let layer = scratch.join("busybox-layer");
    let tar = busybox_rootfs_tar(Path::new(HOST_BUSYBOX), 0)?;
    let mut archive = tar::Archive::new(&tar[..]);
    archive.set_preserve_permissions(true);
    archive.unpack(&layer)?;
    Ok(layer)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> BenchResult {
    let tasks: usize = std::env::var("OCI_BENCH_TASKS")
        .ok()
        .and_then(|tasks| tasks.parse().ok())
        .unwrap_or(60);
    let scratch = match std::env::var_os("OCI_BENCH_STATE_ROOT") {
        Some(root) => {
            std::fs::create_dir_all(&root)?;
            tempfile::tempdir_in(root)?
        }
        None => tempfile::tempdir()?,
    };
    let layer = busybox_layer(scratch.path())?;
    let with_docker = std::env::var("OCI_BENCH_DOCKER").map_or(true, |value| value != "0");

    let mut runtimes: Vec<(String, Arc<dyn ContainerRuntime>)> = Vec::new();
    for binary in ["crun", "runc"] {
        let settings = OciSettings {
            state_root: scratch.path().join(format!("state-{binary}")),
            runtime: Some(PathBuf::from(binary)),
        };
        let images = Arc::new(BusyboxImage {
            layer: layer.clone(),
        });
        match OciRuntime::new(images, None, settings).await {
            Ok(runtime) => runtimes.push((format!("oci ({binary})"), Arc::new(runtime))),
            Err(error) => eprintln!("left out: oci ({binary}): {error}"),
        }
    }
    match DockerEngine::connect().await {
        Ok(_) if !with_docker => eprintln!("left out: docker (OCI_BENCH_DOCKER=0)"),
        Ok(docker) => {
            build_local_busybox_image(&docker, Path::new(HOST_BUSYBOX), LOCAL_BUSYBOX_IMAGE)
                .await?;
            runtimes.push(("docker".to_owned(), Arc::new(docker)));
        }
        Err(error) => eprintln!("left out: docker: {error}"),
    }

    println!("{tasks} `true` tasks each: create → attach → start → output → wait → remove");
    println!(
        "{:<14} {:>11} {:>9} {:>20} {:>20} {:>9}",
        "engine",
        "concurrency",
        "tasks/s",
        "p50 create→start ms",
        "p90 create→start ms",
        "failures"
    );
    for concurrency in [1, 4] {
        for (name, runtime) in &runtimes {
            // A few first, so images and caches are warm.
            let _ = measure(runtime.clone(), 4, concurrency).await;
            let measured = measure(runtime.clone(), tasks, concurrency).await;
            let quantile = |q: f64| {
                let latencies = &measured.create_to_start;
                if latencies.is_empty() {
                    return f64::NAN;
                }
                let index = ((latencies.len() - 1) as f64 * q).round() as usize;
                latencies[index].as_secs_f64() * 1000.0
            };
            println!(
                "{:<14} {:>11} {:>9.1} {:>20.1} {:>20.1} {:>9}",
                name,
                concurrency,
                measured.tasks as f64 / measured.elapsed.as_secs_f64(),
                quantile(0.5),
                quantile(0.9),
                measured.failures
            );
        }
    }
    Ok(())
}
