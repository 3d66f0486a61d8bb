-- Tenants reach nothing of each other's through clusters, runner tokens or leases.

-- A runner token serves only the clusters it names (`clusters`, a JSON array; NULL: every
-- shared cluster) and, with `project_id`, only that project's own clusters.
ALTER TABLE tokens ADD COLUMN clusters TEXT;

-- Cluster names are scoped: a shared (operator) name is unique among shared clusters, a
-- project's among that project's. A project's task naming a cluster runs on the project's own
-- cluster of that name if it has one, else on the shared one; so no project can take a name
-- from the operator, nor a recycled name route one project's tasks to another's runners.
CREATE TABLE clusters_scoped (
    id          TEXT PRIMARY KEY NOT NULL,
    project_id  TEXT REFERENCES projects (id),
    name        TEXT NOT NULL,
    memory_mib  INTEGER,
    disk_mib    INTEGER,
    runners     INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;
INSERT INTO clusters_scoped SELECT id, project_id, name, memory_mib, disk_mib, runners,
    created_at, updated_at FROM clusters;
DROP TABLE clusters;
ALTER TABLE clusters_scoped RENAME TO clusters;
CREATE UNIQUE INDEX clusters_shared_name ON clusters (name) WHERE project_id IS NULL;
CREATE UNIQUE INDEX clusters_project_name ON clusters (project_id, name)
    WHERE project_id IS NOT NULL;

-- Whose clusters a runner serves: NULL, the operator's; else the project its token is bound to.
ALTER TABLE runners ADD COLUMN owner TEXT;

-- Lease tokens are random (they are the only proof that a runner holds a lease), no longer
-- counted.
DROP TABLE lease_counter;
