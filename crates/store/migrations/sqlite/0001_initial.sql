-- stevedore's SQLite schema.
--
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC), so they sort and compare as
-- numbers; the store converts them at its boundary. Booleans are INTEGER 0 or 1. Statuses are
-- the lowercase names of `TaskStatus` and `ScheduleStatus`.

CREATE TABLE projects (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
) STRICT;

-- Only the SHA-256 of a token's secret is kept.
CREATE TABLE tokens (
    id             TEXT PRIMARY KEY NOT NULL,
    project_id     TEXT REFERENCES projects (id),
    role           TEXT NOT NULL CHECK (role IN ('project', 'runner', 'admin')),
    secret_sha256  TEXT NOT NULL UNIQUE,
    created_at     INTEGER NOT NULL
) STRICT;

-- A code is its name in a project plus what every revision shares: the pause switch, the
-- concurrency limit of the latest revision (read by the lease query), soft deletion.
CREATE TABLE codes (
    id               TEXT PRIMARY KEY NOT NULL,
    project_id       TEXT NOT NULL REFERENCES projects (id),
    name             TEXT NOT NULL,
    latest_rev       INTEGER NOT NULL,
    max_concurrency  INTEGER,
    paused           INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    -- When the latest revision was pushed.
    updated_at       INTEGER NOT NULL,
    deleted_at       INTEGER
) STRICT;

-- A deleted code frees its name for a new code.
CREATE UNIQUE INDEX codes_by_name ON codes (project_id, name) WHERE deleted_at IS NULL;
CREATE INDEX codes_by_update ON codes (project_id, updated_at DESC) WHERE deleted_at IS NULL;

-- Revisions are immutable. `spec` is the `CodeSpec` as JSON.
CREATE TABLE code_revisions (
    code_id         TEXT NOT NULL REFERENCES codes (id),
    rev             INTEGER NOT NULL,
    spec            TEXT NOT NULL,
    package_sha256  TEXT,
    package_size    INTEGER,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (code_id, rev)
) STRICT;

-- Zip packages live in the database, apart from the revision rows so that reading a revision
-- never touches the package's pages.
CREATE TABLE code_packages (
    code_id  TEXT NOT NULL,
    rev      INTEGER NOT NULL,
    bytes    BLOB NOT NULL,
    PRIMARY KEY (code_id, rev),
    FOREIGN KEY (code_id, rev) REFERENCES code_revisions (code_id, rev)
) STRICT;

CREATE TABLE tasks (
    id                 TEXT PRIMARY KEY NOT NULL,
    project_id         TEXT NOT NULL REFERENCES projects (id),
    code_id            TEXT NOT NULL,
    code_name          TEXT NOT NULL,
    code_rev           INTEGER NOT NULL,
    status             TEXT NOT NULL CHECK (status IN
                           ('queued', 'preparing', 'running', 'complete', 'error', 'timeout', 'cancelled')),
    priority           INTEGER NOT NULL,
    payload            TEXT NOT NULL,
    label              TEXT,
    cluster            TEXT NOT NULL,
    timeout_secs       INTEGER NOT NULL,
    delay_secs         INTEGER NOT NULL,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    due_at             INTEGER NOT NULL,
    start_time         INTEGER,
    end_time           INTEGER,
    percent            INTEGER,
    msg                TEXT,
    retry_count        INTEGER NOT NULL,
    original_task_id   TEXT,
    schedule_id        TEXT,
    exit_code          INTEGER,
    -- Bytes in task_logs, marker line included.
    log_size           INTEGER NOT NULL DEFAULT 0,
    -- The log reached its cap and ends with the truncation marker; later bytes are dropped.
    log_truncated      INTEGER NOT NULL DEFAULT 0,
    infra_attempts     INTEGER NOT NULL DEFAULT 0,
    cancel_requested   INTEGER NOT NULL DEFAULT 0,
    peak_memory_bytes  INTEGER,
    cpu_time_ms        INTEGER,
    -- The lease: set while the task is preparing or running, cleared when it finishes or is
    -- requeued. lease_token comes from lease_counter and only grows.
    runner_id          TEXT,
    lease_token        INTEGER,
    lease_expires_at   INTEGER,
    -- Grows by one with every write of the row: a writer that read version N may only write
    -- while it is still N (optimistic concurrency).
    version            INTEGER NOT NULL DEFAULT 0,
    FOREIGN KEY (code_id, code_rev) REFERENCES code_revisions (code_id, rev)
) STRICT;

-- The lease query walks due queued tasks of one priority by due time. Partial, so a task
-- leaves this index when it is leased and finished tasks never weigh on it.
CREATE INDEX tasks_queued ON tasks (priority, due_at, id) WHERE status = 'queued';
-- max_concurrency counts (status, code), code stats (code, each status) and the rescuer, which
-- walks the leased tasks (status in preparing, running) for expired leases. Status first, so
-- the few leased tasks are one range however many finished tasks there are.
CREATE INDEX tasks_by_status_code ON tasks (status, code_id);
-- Task lists, newest first, for a project and for one code name.
CREATE INDEX tasks_by_project ON tasks (project_id, created_at DESC);
CREATE INDEX tasks_by_project_code ON tasks (project_id, code_name, created_at DESC);

-- A task's log as chunks; `seq` is the byte offset of the chunk in the log.
CREATE TABLE task_logs (
    task_id  TEXT NOT NULL REFERENCES tasks (id),
    seq      INTEGER NOT NULL,
    bytes    BLOB NOT NULL,
    PRIMARY KEY (task_id, seq)
) STRICT;

-- The single source of lease tokens. One row; last_token only ever grows, across restarts.
CREATE TABLE lease_counter (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    last_token  INTEGER NOT NULL
) STRICT;
INSERT INTO lease_counter (id, last_token) VALUES (1, 0);

-- `spec` is the `ScheduleSpec` as JSON.
CREATE TABLE schedules (
    id             TEXT PRIMARY KEY NOT NULL,
    project_id     TEXT NOT NULL REFERENCES projects (id),
    code_id        TEXT NOT NULL REFERENCES codes (id),
    spec           TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('scheduled', 'complete', 'cancelled')),
    next_start     INTEGER,
    last_run_time  INTEGER,
    run_count      INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
) STRICT;

CREATE INDEX schedules_by_project ON schedules (project_id, created_at DESC);
CREATE INDEX schedules_due ON schedules (next_start) WHERE status = 'scheduled';
