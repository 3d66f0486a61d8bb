-- Quotas: a project's own limits in place of the operator's defaults, and the indexes that
-- keep counting against them cheap inside the writes they guard.

-- One row per quota a project has its own limit for; the others are the operator's defaults.
CREATE TABLE project_quotas (
    project_id  TEXT NOT NULL REFERENCES projects (id),
    quota       TEXT NOT NULL,
    "limit"     INTEGER NOT NULL CHECK ("limit" >= 0),
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (project_id, quota)
) STRICT;

-- Counted on every schedule created: a project's schedules that still fire. (A project's
-- queued tasks are counted through tasks_by_project_status, from 0003.)
CREATE INDEX schedules_scheduled_by_project ON schedules (project_id) WHERE status = 'scheduled';

-- A project's queued tasks, kept by triggers in the statements that change them, so that the
-- check on every enqueue reads one row instead of counting up to the whole backlog. Exact:
-- SQLite has one writer, so the triggers' updates never contend. (PostgreSQL counts through
-- its index instead: a counter row there would be a lock every lease of the project waits on.)
CREATE TABLE project_queued_tasks (
    project_id  TEXT PRIMARY KEY NOT NULL REFERENCES projects (id),
    queued      INTEGER NOT NULL
) STRICT;
INSERT INTO project_queued_tasks (project_id, queued)
    SELECT project_id, COUNT(*) FROM tasks WHERE status = 'queued' GROUP BY project_id;
CREATE TRIGGER project_queued_tasks_insert AFTER INSERT ON tasks
    WHEN NEW.status = 'queued'
BEGIN
    INSERT INTO project_queued_tasks (project_id, queued) VALUES (NEW.project_id, 1)
        ON CONFLICT (project_id) DO UPDATE SET queued = queued + 1;
END;
CREATE TRIGGER project_queued_tasks_update AFTER UPDATE OF status ON tasks
    WHEN (OLD.status = 'queued') <> (NEW.status = 'queued')
BEGIN
    INSERT INTO project_queued_tasks (project_id, queued)
        VALUES (NEW.project_id, CASE WHEN NEW.status = 'queued' THEN 1 ELSE 0 END)
        ON CONFLICT (project_id) DO UPDATE
        SET queued = queued + CASE WHEN NEW.status = 'queued' THEN 1 ELSE -1 END;
END;
CREATE TRIGGER project_queued_tasks_delete AFTER DELETE ON tasks
    WHEN OLD.status = 'queued'
BEGIN
    UPDATE project_queued_tasks SET queued = queued - 1 WHERE project_id = OLD.project_id;
END;
