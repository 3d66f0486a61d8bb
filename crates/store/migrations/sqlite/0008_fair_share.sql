-- Fair share: within a priority, leases take turns between the projects with due work.

-- The lease walks the projects with queued tasks of a priority (one seek per project) and
-- each project's due tasks by due time. Partial, like `tasks_queued`.
CREATE INDEX tasks_queued_by_project ON tasks (priority, project_id, due_at, id)
    WHERE status = 'queued';

-- Each project's last turn: a lease that served a project records a turn later than any
-- before, so the project served longest ago (or never, no row) goes first. One row per
-- project ever served.
CREATE TABLE project_lease_turns (
    project_id  TEXT PRIMARY KEY NOT NULL REFERENCES projects (id),
    turn        INTEGER NOT NULL
) STRICT;
CREATE INDEX project_lease_turns_by_turn ON project_lease_turns (turn);
