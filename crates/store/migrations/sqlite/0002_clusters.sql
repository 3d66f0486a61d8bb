-- Clusters (named pools of runners) and the runners seen asking for work.

-- A cluster's name routes tasks (`tasks.cluster`) and is unique across the store, so a runner
-- serving it gets only its project's tasks. `project_id` NULL: shared by every project. The
-- sizes are informational.
CREATE TABLE clusters (
    id          TEXT PRIMARY KEY NOT NULL,
    project_id  TEXT REFERENCES projects (id),
    name        TEXT NOT NULL UNIQUE,
    memory_mib  INTEGER,
    disk_mib    INTEGER,
    runners     INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;

CREATE INDEX clusters_by_project ON clusters (project_id, name);

-- Written whenever a runner leases. `clusters` is a JSON array of names.
CREATE TABLE runners (
    id         TEXT PRIMARY KEY NOT NULL,
    clusters   TEXT NOT NULL,
    capacity   INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL
) STRICT;

-- Cluster statistics: a cluster's waiting and active tasks, and each runner's live leases.
CREATE INDEX tasks_by_cluster_active ON tasks (cluster, status)
    WHERE status IN ('queued', 'preparing', 'running');
CREATE INDEX tasks_by_runner ON tasks (runner_id) WHERE runner_id IS NOT NULL;
