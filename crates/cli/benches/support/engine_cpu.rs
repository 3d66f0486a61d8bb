//! The CPU time the container engine's own processes spend, read from `/proc`: `dockerd`,
//! `containerd`, and the shims (`containerd-shim*`, one per container, with the `runc` runs
//! and container processes they reap). A shim lives only as long as its container, so the
//! processes are sampled every [`SAMPLE_INTERVAL`] and a shim counts with the last time it
//! was seen: what it spent after that sample is missed, so the shims' figure errs low.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How often the engine's processes are read.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The engine's CPU time in seconds, by kind of process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineCpu {
    pub dockerd: f64,
    pub containerd: f64,
    pub shims: f64,
}

/// Samples the engine's processes on a thread of its own until dropped.
pub struct EngineCpuMeter {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

/// Every engine process seen, by id and start time: its kind and its last CPU ticks.
type Seen = HashMap<(u32, u64), (Kind, u64)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dockerd,
    Containerd,
    Shim,
}

impl EngineCpu {
    pub fn total(&self) -> f64 {
        self.dockerd + self.containerd + self.shims
    }

    /// Both together.
    pub fn plus(&self, other: &EngineCpu) -> EngineCpu {
        EngineCpu {
            dockerd: self.dockerd + other.dockerd,
            containerd: self.containerd + other.containerd,
            shims: self.shims + other.shims,
        }
    }

    /// What was spent between `earlier` and `self`.
    pub fn since(&self, earlier: &EngineCpu) -> EngineCpu {
        EngineCpu {
            dockerd: self.dockerd - earlier.dockerd,
            containerd: self.containerd - earlier.containerd,
            shims: self.shims - earlier.shims,
        }
    }
}

impl EngineCpuMeter {
    pub fn start() -> EngineCpuMeter {
        let meter = EngineCpuMeter {
            seen: Arc::default(),
            stop: Arc::default(),
        };
        let (seen, stop) = (meter.seen.clone(), meter.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                sample(&seen);
                std::thread::sleep(SAMPLE_INTERVAL);
            }
        });
        meter
    }

    /// The CPU time every engine process seen so far has spent, read now.
    pub fn read(&self) -> EngineCpu {
        sample(&self.seen);
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let mut cpu = EngineCpu::default();
        for (kind, ticks) in seen.values() {
            let seconds = *ticks as f64 / TICKS_PER_SECOND;
            match kind {
                Kind::Dockerd => cpu.dockerd += seconds,
                Kind::Containerd => cpu.containerd += seconds,
                Kind::Shim => cpu.shims += seconds,
            }
        }
        cpu
    }
}

impl Drop for EngineCpuMeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The CPU time (user and system, its reaped children's included) a process spent, in
/// seconds; `None` once it is gone.
pub fn process_cpu(pid: u32) -> Option<f64> {
    Stat::read(pid).map(|stat| stat.ticks as f64 / TICKS_PER_SECOND)
}

/// Reads every engine process's CPU ticks into `seen`, keeping what vanished processes spent.
/// A process is known by its id and start time, as ids are reused.
fn sample(seen: &Mutex<Seen>) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        let Some(stat) = Stat::read(pid) else {
            continue;
        };
        let kind = match stat.name.as_str() {
            "dockerd" => Kind::Dockerd,
            "containerd" => Kind::Containerd,
            // The name is cut at 15 characters: `containerd-shim`.
            name if name.starts_with("containerd-shim") => Kind::Shim,
            _ => continue,
        };
        seen.insert((pid, stat.start_time), (kind, stat.ticks));
    }
}

/// What `/proc/<pid>/stat` says of a process.
struct Stat {
    name: String,
    /// utime + stime + cutime + cstime.
    ticks: u64,
    start_time: u64,
}

impl Stat {
    fn read(pid: u32) -> Option<Stat> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The name is in parentheses and may hold spaces and parentheses: it ends at the last.
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let name = stat.get(open + 1..close)?.to_owned();
        // Field 3 (the state) is the first after the name: field n is at n - 3.
        let fields: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
        let number = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            name,
            ticks: number(14)? + number(15)? + number(16)? + number(17)?,
            start_time: number(22)?,
        })
    }
}
