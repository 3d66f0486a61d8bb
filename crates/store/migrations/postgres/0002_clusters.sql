-- Clusters (named pools of runners) and the runners seen asking for work: the SQLite schema's
-- tables, in PostgreSQL's own types.

-- A cluster's name routes tasks (`tasks.cluster`) and is unique across the store, so a runner
-- serving it gets only its project's tasks. `project_id` NULL: shared by every project. The
-- sizes are informational.
CREATE TABLE clusters (
    id          TEXT PRIMARY KEY,
    project_id  TEXT REFERENCES projects (id),
    name        TEXT NOT NULL UNIQUE,
    memory_mib  BIGINT,
    disk_mib    BIGINT,
    runners     BIGINT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE INDEX clusters_by_project ON clusters (project_id, name);

-- Written whenever a runner leases. `clusters` lists the names it serves, in its order; the GIN
-- index finds a cluster's runners (`clusters @> ARRAY[name]`).
CREATE TABLE runners (
    id         TEXT PRIMARY KEY,
    clusters   TEXT[] NOT NULL,
    capacity   BIGINT NOT NULL,
    last_seen  BIGINT NOT NULL
);

CREATE INDEX runners_by_cluster ON runners USING GIN (clusters);

-- Cluster statistics: a cluster's waiting and active tasks, and each runner's live leases.
CREATE INDEX tasks_by_cluster_active ON tasks (cluster, status)
    WHERE status IN ('queued', 'preparing', 'running');
CREATE INDEX tasks_by_runner ON tasks (runner_id) WHERE runner_id IS NOT NULL;
