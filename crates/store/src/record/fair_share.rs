//! Fair share: the order in which one lease call hands out due tasks of several projects.
//!
//! Priority dominates: every due task of a higher priority goes before any of a lower one.
//! Within a priority, projects take turns. Each project with due work gets one task per round,
//! in the order of their last turns (`project_lease_turns.turn`: the project served longest
//! ago first, a project never served before any other, then the one whose earliest task is
//! due first); within a project, tasks go by due time. The rotation carries on across lease
//! calls: the call records, for each project it served, a turn later than every turn before,
//! in the order of each project's last task in the call (`served_turns`), so the next call
//! starts with the project that waited longest.
//!
//! A backend walks a [`FairShare`] inside its lease transaction: it lists the projects with
//! due work (`ProjectTurn`, one query over the index of queued tasks by priority and project),
//! and then asks `next` for one candidate at a time, fetching a few candidates of several
//! projects in one query whenever `next` asks for them (`Next::Fetch`). A project whose
//! backlog is 100,000 tasks costs no more than one with a single task: only the candidates
//! that can be handed out are read.

use std::collections::VecDeque;

use super::TaskRecord;
use crate::{Result, StoreError};

/// A project with due work at one priority, and where its turn stands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProjectTurn {
    pub priority: u8,
    pub project_id: String,
    /// The project's last turn; 0 when it was never served.
    pub turn: i64,
    /// When its earliest due task of this priority became due (as stored), the tie-break
    /// between projects with the same turn.
    pub first_due: i64,
}

/// A due task that may be handed out, with its code's `max_concurrency`.
pub(crate) type Candidate = (TaskRecord, Option<i64>);

/// One lease call's walk through the projects with due work, priority by priority.
#[derive(Debug)]
pub(crate) struct FairShare {
    /// Priorities still to walk, highest first; each with its projects in turn order.
    priorities: VecDeque<(u8, Vec<ProjectQueue>)>,
    /// The project at the current priority whose turn is next.
    cursor: usize,
}

/// What a backend does next in its lease loop.
#[derive(Debug)]
pub(crate) enum Next {
    /// Offer this candidate (take a `max_concurrency` slot, pick it). Boxed: a task record
    /// is large beside the other steps.
    Candidate(Box<Candidate>),
    /// Fetch candidates of these projects and hand them to `FairShare::refill`.
    Fetch(FetchPlan),
    /// No due task is left to offer.
    Done,
}

/// Which candidates to fetch: of `priority`, up to `per_project` of each of `projects`, by
/// due time, without tasks already picked in this call or of codes that are full.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FetchPlan {
    pub priority: u8,
    pub projects: Vec<String>,
    pub per_project: usize,
}

#[derive(Debug)]
struct ProjectQueue {
    project_id: String,
    /// Candidates fetched and not offered yet, earliest due first.
    fetched: VecDeque<Candidate>,
    /// The last fetch returned fewer than asked: nothing more is due.
    exhausted: bool,
}

// === impl FairShare ===

impl FairShare {
    /// The walk through `projects`, in any order.
    pub fn new(mut projects: Vec<ProjectTurn>) -> FairShare {
        projects.sort_by(|a, b| {
            (b.priority, a.turn, a.first_due, &a.project_id).cmp(&(
                a.priority,
                b.turn,
                b.first_due,
                &b.project_id,
            ))
        });
        let mut priorities: VecDeque<(u8, Vec<ProjectQueue>)> = VecDeque::new();
        for project in projects {
            let queue = ProjectQueue {
                project_id: project.project_id,
                fetched: VecDeque::new(),
                exhausted: false,
            };
            match priorities.back_mut() {
                Some((priority, queues)) if *priority == project.priority => queues.push(queue),
                _ => priorities.push_back((project.priority, vec![queue])),
            }
        }
        FairShare {
            priorities,
            cursor: 0,
        }
    }

    /// The next step while `wanted` more tasks are wanted: the next project's next candidate,
    /// or the fetch that must come first. A candidate that is not picked (its code is full) is
    /// simply dropped; the next fetch leaves its code out.
    pub fn next(&mut self, wanted: usize) -> Next {
        loop {
            let Some((priority, queues)) = self.priorities.front_mut() else {
                return Next::Done;
            };
            if queues.is_empty() {
                self.priorities.pop_front();
                self.cursor = 0;
                continue;
            }
            if self.cursor >= queues.len() {
                self.cursor = 0;
            }
            let live = queues.len();
            let queue = &mut queues[self.cursor];
            if let Some(candidate) = queue.fetched.pop_front() {
                self.cursor += 1;
                return Next::Candidate(Box::new(candidate));
            }
            if queue.exhausted {
                queues.remove(self.cursor);
                continue;
            }
            // This project and the next ones in turn that have nothing fetched: as many as
            // this call can still serve, each enough for its share of what is wanted.
            let projects = (0..live)
                .map(|offset| &queues[(self.cursor + offset) % live])
                .filter(|queue| queue.fetched.is_empty() && !queue.exhausted)
                .take(wanted.max(1))
                .map(|queue| queue.project_id.clone())
                .collect();
            return Next::Fetch(FetchPlan {
                priority: *priority,
                projects,
                per_project: wanted.div_ceil(live).max(1),
            });
        }
    }

    /// Serves `project_id` no more in this call, at any priority: it reached its
    /// `running_tasks` quota.
    pub fn drop_project(&mut self, project_id: &str) {
        for (index, (_, queues)) in self.priorities.iter_mut().enumerate() {
            if let Some(position) = queues
                .iter()
                .position(|queue| queue.project_id == project_id)
            {
                queues.remove(position);
                // At the current priority the cursor stays on the project after it.
                if index == 0 && position < self.cursor {
                    self.cursor -= 1;
                }
            }
        }
    }

    /// Hands the candidates fetched for `plan` to their projects (in the order fetched,
    /// earliest due first). A project that got fewer than asked has nothing more due.
    pub fn refill(&mut self, plan: &FetchPlan, fetched: Vec<Candidate>) -> Result<()> {
        let Some((priority, queues)) = self.priorities.front_mut() else {
            return Err(StoreError::Corrupt(
                "a lease fetched past its last priority".to_owned(),
            ));
        };
        if *priority != plan.priority {
            return Err(StoreError::Corrupt(format!(
                "a lease fetched priority {} while walking priority {priority}",
                plan.priority
            )));
        }
        for candidate in fetched {
            let project_id = &candidate.0.task.project_id;
            let queue = queues
                .iter_mut()
                .find(|queue| &queue.project_id == project_id && plan.projects.contains(project_id))
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("a lease fetched a task of project {project_id}"))
                })?;
            queue.fetched.push_back(candidate);
        }
        for queue in queues
            .iter_mut()
            .filter(|queue| plan.projects.contains(&queue.project_id))
        {
            queue.exhausted = queue.fetched.len() < plan.per_project;
        }
        Ok(())
    }
}

/// The projects served by a lease call, in the order their turns are recorded: by the
/// position of each project's last task among `picked`. The backend gives them turns after
/// every turn recorded so far, in this order.
pub(crate) fn served_turns(picked: &[TaskRecord]) -> Vec<&str> {
    let mut served: Vec<&str> = Vec::new();
    for record in picked.iter().rev() {
        let project_id = record.task.project_id.as_str();
        if !served.contains(&project_id) {
            served.push(project_id);
        }
    }
    served.reverse();
    served
}
