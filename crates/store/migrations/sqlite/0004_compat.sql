-- IronWorker's clients list tasks by label, and a schedule's `max_concurrency` counts the
-- schedule's tasks that are still queued or running when it fires.
CREATE INDEX tasks_by_project_label ON tasks (project_id, label, created_at DESC) WHERE label IS NOT NULL;
CREATE INDEX tasks_by_schedule ON tasks (schedule_id, status) WHERE schedule_id IS NOT NULL;
