//! What a soak saw, as figures with their targets.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{Value, json};

use super::Settings;
use super::containers::Sampling;
use super::fleet::{Kill, Leftovers, Victim};

/// What a soak saw. [`Report::missed`] lists the targets that do not hold.
#[derive(Debug)]
pub struct Report {
    pub settings: Settings,
    /// Seconds from the first task queued to the last one finished.
    pub took: Duration,
    pub kills: Vec<Kill>,
    /// Every task the projects hold at the end.
    pub queued: usize,
    /// Tasks whose queueing the API acknowledged with their ids.
    pub acknowledged: usize,
    pub completed: usize,
    /// Tasks that ended otherwise: id, status and message.
    pub ended_otherwise: Vec<(String, String, String)>,
    /// Acknowledged tasks the API no longer knows.
    pub lost: Vec<String>,
    /// Tasks still unfinished when the drain gave up: id and status.
    pub unfinished: Vec<(String, String)>,
    /// Tasks seen with two or more containers running at one moment: id, most seen at once.
    pub overlapped: Vec<(String, usize)>,
    /// Tasks whose container started and that ran again after.
    pub reran: usize,
    /// The attempts after which a task ran again although their container had started, by
    /// the reason they ended.
    pub reran_because: BTreeMap<String, usize>,
    /// Attempts given back before their container started, by reason.
    pub given_back_before_start: BTreeMap<String, usize>,
    /// Tasks whose `attempts` do not match `infra_attempts` (one attempt more).
    pub attempts_mismatched: Vec<String>,
    /// `GET tasks/{id}` of a task that ran again, when one did.
    pub example_rerun: Option<Value>,
    pub samples: usize,
    /// Samples that failed (the engine was away).
    pub samples_failed: usize,
    /// Containers of the soak's runners there right after runners and servers stopped.
    pub containers_left: Vec<String>,
    /// Runners whose watchdog still ran 10 s after everything stopped.
    pub watchdogs_left: Vec<String>,
}

// === impl Report ===

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        settings: &Settings,
        took: Duration,
        kills: Vec<Kill>,
        acknowledged: &[String],
        tasks: &[Value],
        sampling: &Sampling,
        leftovers: Leftovers,
        runner_ids: &[String],
    ) -> Report {
        let by_id: HashMap<&str, &Value> = tasks
            .iter()
            .map(|task| (task["id"].as_str().unwrap_or_default(), task))
            .collect();
        let lost = acknowledged
            .iter()
            .filter(|id| !by_id.contains_key(id.as_str()))
            .cloned()
            .collect();
        let mut report = Report {
            settings: settings.clone(),
            took,
            kills,
            queued: tasks.len(),
            acknowledged: acknowledged.len(),
            completed: 0,
            ended_otherwise: Vec::new(),
            lost,
            unfinished: Vec::new(),
            overlapped: sampling
                .most_at_once
                .iter()
                .filter(|(_, most)| **most > 1)
                .map(|(id, most)| (id.clone(), *most))
                .collect(),
            reran: 0,
            reran_because: BTreeMap::new(),
            given_back_before_start: BTreeMap::new(),
            attempts_mismatched: Vec::new(),
            example_rerun: None,
            samples: sampling.taken,
            samples_failed: sampling.failed,
            containers_left: leftovers.containers,
            watchdogs_left: leftovers.watchdogs,
        };
        for task in tasks {
            report.count(task, runner_ids);
        }
        report
    }

    fn count(&mut self, task: &Value, runner_ids: &[String]) {
        let id = task["id"].as_str().unwrap_or_default().to_owned();
        let status = task["status"].as_str().unwrap_or_default();
        match status {
            "complete" => self.completed += 1,
            "error" | "timeout" | "cancelled" => self.ended_otherwise.push((
                id.clone(),
                status.to_owned(),
                task["msg"].as_str().unwrap_or_default().to_owned(),
            )),
            _ => self.unfinished.push((id.clone(), status.to_owned())),
        }
        let attempts = task["attempts"].as_array().cloned().unwrap_or_default();
        if attempts.len() as u64 != task["infra_attempts"].as_u64().unwrap_or(0) + 1 {
            self.attempts_mismatched.push(id);
        }
        let Some((_last, earlier)) = attempts.split_last() else {
            return;
        };
        let mut ran_again = false;
        for attempt in earlier {
            let reason = normalized_reason(attempt["reason"].as_str(), runner_ids);
            let tally = if attempt["started_at"].is_string() {
                ran_again = true;
                &mut self.reran_because
            } else {
                &mut self.given_back_before_start
            };
            *tally.entry(reason).or_default() += 1;
        }
        if ran_again {
            self.reran += 1;
            // The most telling example: the task that took the most attempts.
            let attempts_of =
                |task: &Value| task["attempts"].as_array().map_or(0, std::vec::Vec::len);
            if self
                .example_rerun
                .as_ref()
                .is_none_or(|example| attempts_of(example) < attempts.len())
            {
                self.example_rerun = Some(task.clone());
            }
        }
    }

    /// The targets that do not hold, each with what was seen.
    pub fn missed(&self) -> Vec<String> {
        let mut missed = Vec::new();
        let mut target = |name: &str, seen: usize, detail: String| {
            if seen != 0 {
                missed.push(format!("{name}: {seen} ({detail})"));
            }
        };
        target("lost", self.lost.len(), format!("{:?}", self.lost));
        target(
            "unfinished after the drain",
            self.unfinished.len(),
            format!("{:?}", self.unfinished),
        );
        target(
            "ended other than complete",
            self.ended_otherwise.len(),
            format!("{:?}", self.ended_otherwise),
        );
        target(
            "ran twice with overlap",
            self.overlapped.len(),
            format!("{:?}", self.overlapped),
        );
        target(
            "containers left",
            self.containers_left.len(),
            format!("{:?}", self.containers_left),
        );
        target(
            "watchdogs left",
            self.watchdogs_left.len(),
            format!("{:?}", self.watchdogs_left),
        );
        target(
            "attempts other than infra_attempts + 1",
            self.attempts_mismatched.len(),
            format!("{:?}", self.attempts_mismatched),
        );
        if self.queued < self.acknowledged {
            missed.push(format!(
                "fewer tasks ({}) than acknowledged ({})",
                self.queued, self.acknowledged
            ));
        }
        missed
    }

    /// The figures as a table, with each target and whether it holds.
    pub fn print(&self) {
        let settings = &self.settings;
        println!();
        println!("soak: {}", settings.describe());
        let kills: Vec<String> = self
            .kills
            .iter()
            .map(|kill| {
                let victim = match kill.victim {
                    Victim::Runner(n) => format!("runner {}", n + 1),
                    Victim::Server(n) => format!("server {}", n + 1),
                    Victim::Dockerd => "dockerd".to_owned(),
                };
                format!(
                    "{victim} at {:.0} s for {:.1} s",
                    kill.at.as_secs_f64(),
                    kill.down.as_secs_f64()
                )
            })
            .collect();
        println!("kills ({}): {}", kills.len(), kills.join(", "));
        println!(
            "{} s from the first task queued to the last one finished, {:.2} tasks/s; {} \
             overlap samples, {} failed (the engine was away)",
            self.took.as_secs(),
            self.completed as f64 / self.took.as_secs_f64(),
            self.samples,
            self.samples_failed
        );
        println!();
        let row = |name: &str, value: usize, target: Option<usize>| {
            let verdict = match target {
                Some(target) if value == target => format!("= {target}  holds"),
                Some(target) => format!("= {target}  MISSED"),
                None => String::new(),
            };
            println!("{name:<58} {value:>7}  {verdict}");
        };
        row("queued", self.queued, None);
        row("  acknowledged by the API", self.acknowledged, None);
        row("completed once", self.completed, Some(self.queued));
        row("ended otherwise", self.ended_otherwise.len(), Some(0));
        row("lost", self.lost.len(), Some(0));
        row("unfinished after the drain", self.unfinished.len(), Some(0));
        row("ran twice with overlap", self.overlapped.len(), Some(0));
        row("ran twice in sequence (tasks)", self.reran, None);
        let reran: usize = self.reran_because.values().sum();
        row(
            "  attempts that started and ran again after, by why",
            reran,
            None,
        );
        for (reason, count) in &self.reran_because {
            row(&format!("    {}", clip(reason, 52)), *count, None);
        }
        let given_back: usize = self.given_back_before_start.values().sum();
        row(
            "attempts given back before their container started",
            given_back,
            None,
        );
        for (reason, count) in &self.given_back_before_start {
            row(&format!("    {}", clip(reason, 52)), *count, None);
        }
        row(
            "attempts other than infra_attempts + 1",
            self.attempts_mismatched.len(),
            Some(0),
        );
        row(
            "containers left after everything stopped",
            self.containers_left.len(),
            Some(0),
        );
        row(
            "runner watchdogs still running 10 s after that",
            self.watchdogs_left.len(),
            Some(0),
        );
        println!();
        for (id, status, msg) in self.ended_otherwise.iter().take(5) {
            println!("ended {status}: {id}: {msg}");
        }
        for (reason, _) in self
            .reran_because
            .iter()
            .chain(&self.given_back_before_start)
        {
            if reason.chars().count() > 52 {
                println!("reason in full: {reason}");
            }
        }
        if let Some(example) = &self.example_rerun {
            let shown = json!({
                "id": example["id"],
                "status": example["status"],
                "msg": example["msg"],
                "infra_attempts": example["infra_attempts"],
                "attempts": example["attempts"],
            });
            println!(
                "GET tasks/{{id}} of a task that ran again (abridged):\n{}",
                serde_json::to_string_pretty(&shown).unwrap_or_default()
            );
        }
        match self.missed().as_slice() {
            [] => println!("every target holds"),
            missed => {
                for miss in missed {
                    println!("MISSED {miss}");
                }
            }
        }
    }
}

/// A reason with what varies from task to task (runner ids, container ids) taken out, so that
/// equal causes count together.
fn normalized_reason(reason: Option<&str>, runner_ids: &[String]) -> String {
    let mut reason = reason.unwrap_or("(none)").to_owned();
    for (n, id) in runner_ids.iter().enumerate() {
        reason = reason.replace(id.as_str(), &format!("<runner {}>", n + 1));
    }
    reason
        .split(' ')
        .map(|word| {
            let hex = word.chars().filter(char::is_ascii_hexdigit).count();
            if hex >= 12 && hex + 2 >= word.len() {
                "<id>"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn clip(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        return text.to_owned();
    }
    let mut clipped: String = text.chars().take(chars - 1).collect();
    clipped.push('…');
    clipped
}
