-- Tenants reach nothing of each other's through clusters, runner tokens or leases: the SQLite
-- schema's change, in PostgreSQL's terms.

-- A runner token serves only the clusters it names (a JSON array, as in SQLite; NULL: every
-- shared cluster) and, with `project_id`, only that project's own clusters.
ALTER TABLE tokens ADD COLUMN clusters TEXT;

-- Cluster names are scoped: a shared (operator) name is unique among shared clusters, a
-- project's among that project's.
ALTER TABLE clusters DROP CONSTRAINT clusters_name_key;
DROP INDEX clusters_by_project;
CREATE UNIQUE INDEX clusters_shared_name ON clusters (name) WHERE project_id IS NULL;
CREATE UNIQUE INDEX clusters_project_name ON clusters (project_id, name)
    WHERE project_id IS NOT NULL;

-- Whose clusters a runner serves: NULL, the operator's; else the project its token is bound to.
ALTER TABLE runners ADD COLUMN owner TEXT;

-- Lease tokens are random (they are the only proof that a runner holds a lease), no longer
-- taken from a sequence.
DROP SEQUENCE lease_tokens;
