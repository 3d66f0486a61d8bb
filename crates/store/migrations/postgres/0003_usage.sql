-- Usage reports (`Store::usage`, `queue_waits`, `project_counts`).

-- Finished tasks of a project by when they ended: the usage buckets. Partial, so queued and
-- running tasks never weigh on it.
CREATE INDEX tasks_finished ON tasks (project_id, end_time) WHERE end_time IS NOT NULL;
-- Started tasks of a project by when they started: the queue-wait samples.
CREATE INDEX tasks_started ON tasks (project_id, start_time) WHERE start_time IS NOT NULL;
-- A project's status mix. Without `updated_at`, which many writes of a task change, so the
-- index is rewritten only when a task's status changes.
CREATE INDEX tasks_by_project_status ON tasks (project_id, status);
