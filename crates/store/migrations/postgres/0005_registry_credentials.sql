-- A project's credentials for private container registries (`POST /2/projects/{id}/credentials`,
-- `stevedore registry login`): the SQLite schema's table, in PostgreSQL's own types.
--
-- The password never reaches the database in clear: `sealed` is the server's AEAD box of it
-- (nonce, ciphertext and tag), bound to the project and registry as associated data, and
-- `key_id` names the key that sealed it, so a server holding another key says so instead of
-- failing obscurely. `registry` is the normalized host (`docker.io`, `registry.example.com:5000`).
CREATE TABLE registry_credentials (
    project_id  TEXT NOT NULL REFERENCES projects (id),
    registry    TEXT NOT NULL,
    username    TEXT NOT NULL,
    sealed      BYTEA NOT NULL,
    key_id      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (project_id, registry)
);
