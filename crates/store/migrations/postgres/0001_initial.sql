-- stevedore's PostgreSQL schema: the same tables as the SQLite one, in PostgreSQL's own types.
--
-- Timestamps are BIGINT microseconds since the Unix epoch (UTC), as in SQLite, so both stores
-- share one conversion at their boundary and compare times as integers;
-- `to_timestamp(col / 1e6)` shows them as dates. Statuses are the lowercase names of
-- `TaskStatus` and `ScheduleStatus`. Code and schedule specs are JSON kept as TEXT: JSONB
-- refuses the escaped NUL (`\u0000`) a user's string may hold. Payloads are BYTEA (their UTF-8
-- bytes) because TEXT cannot hold a NUL character and a payload is any string at all.

CREATE TABLE projects (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

-- Only the SHA-256 of a token's secret is kept.
CREATE TABLE tokens (
    id             TEXT PRIMARY KEY,
    project_id     TEXT REFERENCES projects (id),
    role           TEXT NOT NULL CHECK (role IN ('project', 'runner', 'admin')),
    secret_sha256  TEXT NOT NULL UNIQUE,
    created_at     BIGINT NOT NULL
);

-- A code is its name in a project plus what every revision shares: the pause switch, the
-- concurrency limit of the latest revision (read by the lease query), soft deletion.
CREATE TABLE codes (
    id               TEXT PRIMARY KEY,
    project_id       TEXT NOT NULL REFERENCES projects (id),
    name             TEXT NOT NULL,
    latest_rev       BIGINT NOT NULL,
    max_concurrency  BIGINT,
    paused           BOOLEAN NOT NULL DEFAULT FALSE,
    created_at       BIGINT NOT NULL,
    -- When the latest revision was pushed.
    updated_at       BIGINT NOT NULL,
    deleted_at       BIGINT
);

-- A deleted code frees its name for a new code.
CREATE UNIQUE INDEX codes_by_name ON codes (project_id, name) WHERE deleted_at IS NULL;
CREATE INDEX codes_by_update ON codes (project_id, updated_at DESC) WHERE deleted_at IS NULL;

-- Revisions are immutable. `spec` is the `CodeSpec` as JSON.
CREATE TABLE code_revisions (
    code_id         TEXT NOT NULL REFERENCES codes (id),
    rev             BIGINT NOT NULL,
    spec            TEXT NOT NULL,
    package_sha256  TEXT,
    package_size    BIGINT,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (code_id, rev)
);

-- Zip packages, apart from the revision rows (PostgreSQL also moves large values out of line).
CREATE TABLE code_packages (
    code_id  TEXT NOT NULL,
    rev      BIGINT NOT NULL,
    bytes    BYTEA NOT NULL,
    PRIMARY KEY (code_id, rev),
    FOREIGN KEY (code_id, rev) REFERENCES code_revisions (code_id, rev)
);

CREATE TABLE tasks (
    id                 TEXT PRIMARY KEY,
    project_id         TEXT NOT NULL REFERENCES projects (id),
    code_id            TEXT NOT NULL,
    code_name          TEXT NOT NULL,
    code_rev           BIGINT NOT NULL,
    status             TEXT NOT NULL CHECK (status IN
                           ('queued', 'preparing', 'running', 'complete', 'error', 'timeout', 'cancelled')),
    priority           SMALLINT NOT NULL,
    payload            BYTEA NOT NULL,
    label              TEXT,
    cluster            TEXT NOT NULL,
    timeout_secs       BIGINT NOT NULL,
    delay_secs         BIGINT NOT NULL,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    due_at             BIGINT NOT NULL,
    start_time         BIGINT,
    end_time           BIGINT,
    percent            SMALLINT,
    msg                TEXT,
    retry_count        BIGINT NOT NULL,
    original_task_id   TEXT,
    schedule_id        TEXT,
    exit_code          BIGINT,
    -- Bytes in task_logs, marker line included.
    log_size           BIGINT NOT NULL DEFAULT 0,
    -- The log reached its cap and ends with the truncation marker; later bytes are dropped.
    log_truncated      BOOLEAN NOT NULL DEFAULT FALSE,
    infra_attempts     BIGINT NOT NULL DEFAULT 0,
    cancel_requested   BOOLEAN NOT NULL DEFAULT FALSE,
    peak_memory_bytes  BIGINT,
    cpu_time_ms        BIGINT,
    -- The lease: set while the task is preparing or running, cleared when it finishes or is
    -- requeued. lease_token comes from the sequence lease_tokens and only grows.
    runner_id          TEXT,
    lease_token        BIGINT,
    lease_expires_at   BIGINT,
    -- Grows by one with every write of the row (the SQLite store's optimistic guard; here
    -- every writer also holds the row lock).
    version            BIGINT NOT NULL DEFAULT 0,
    FOREIGN KEY (code_id, code_rev) REFERENCES code_revisions (code_id, rev)
);

-- The lease query walks due queued tasks best first: highest priority, earliest due, then id.
-- Partial, so a task leaves this index when it is leased and finished tasks never weigh on it.
CREATE INDEX tasks_queued ON tasks (priority DESC, due_at, id) WHERE status = 'queued';
-- max_concurrency counts a code's active tasks; the rescuer walks leases by expiry.
CREATE INDEX tasks_active_by_code ON tasks (code_id) WHERE status IN ('preparing', 'running');
CREATE INDEX tasks_leases ON tasks (lease_expires_at) WHERE status IN ('preparing', 'running');
-- Code stats and cancelling a code's tasks.
CREATE INDEX tasks_by_code_status ON tasks (code_id, status);
-- Task lists, newest first, for a project and for one code name.
CREATE INDEX tasks_by_project ON tasks (project_id, created_at DESC);
CREATE INDEX tasks_by_project_code ON tasks (project_id, code_name, created_at DESC);

-- A task's log as chunks; `seq` is the byte offset of the chunk in the log.
CREATE TABLE task_logs (
    task_id  TEXT NOT NULL REFERENCES tasks (id),
    seq      BIGINT NOT NULL,
    bytes    BYTEA NOT NULL,
    PRIMARY KEY (task_id, seq)
);

-- The single source of lease tokens. A sequence only ever grows, across every connection and
-- restart, and is never rolled back: a token handed out by a transaction that then failed is
-- simply never used.
CREATE SEQUENCE lease_tokens AS BIGINT START WITH 1 NO CYCLE;

-- `spec` is the `ScheduleSpec` as JSON.
CREATE TABLE schedules (
    id             TEXT PRIMARY KEY,
    project_id     TEXT NOT NULL REFERENCES projects (id),
    code_id        TEXT NOT NULL REFERENCES codes (id),
    spec           TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('scheduled', 'complete', 'cancelled')),
    next_start     BIGINT,
    last_run_time  BIGINT,
    run_count      BIGINT NOT NULL DEFAULT 0,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

CREATE INDEX schedules_by_project ON schedules (project_id, created_at DESC);
CREATE INDEX schedules_due ON schedules (next_start) WHERE status = 'scheduled';
