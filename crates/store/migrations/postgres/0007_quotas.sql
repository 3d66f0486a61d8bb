-- Quotas: the SQLite schema's change, in PostgreSQL's terms.

CREATE TABLE project_quotas (
    project_id  TEXT NOT NULL REFERENCES projects (id),
    quota       TEXT NOT NULL,
    "limit"     BIGINT NOT NULL CHECK ("limit" >= 0),
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (project_id, quota)
);

-- A project's queued tasks are counted through tasks_by_project_status (0003).
CREATE INDEX schedules_scheduled_by_project ON schedules (project_id) WHERE status = 'scheduled';
