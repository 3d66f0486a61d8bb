-- Packages stored once per checksum, in chunks of 1 MiB, instead of one BLOB per revision.
--
-- A package's bytes are written into a blob of their own, chunk by chunk, before the
-- revision that names them; the blob becomes the package of its checksum (`packages`) in the
-- revision's transaction. A blob no package names is loose: being written, or pruned; once
-- `loose_until` (the database's clock, microseconds) has passed, its chunks are deleted.
CREATE TABLE package_blobs (
    id           INTEGER PRIMARY KEY,
    loose_until  INTEGER
) STRICT;
CREATE INDEX package_blobs_loose ON package_blobs (loose_until) WHERE loose_until IS NOT NULL;

-- A rowid table: SQLite keeps rows this large out of WITHOUT ROWID tables' pages.
CREATE TABLE package_chunks (
    blob   INTEGER NOT NULL REFERENCES package_blobs (id),
    seq    INTEGER NOT NULL,
    bytes  BLOB NOT NULL,
    PRIMARY KEY (blob, seq)
) STRICT;

CREATE TABLE packages (
    sha256      TEXT PRIMARY KEY NOT NULL,
    size        INTEGER NOT NULL,
    blob        INTEGER NOT NULL UNIQUE REFERENCES package_blobs (id),
    created_at  INTEGER NOT NULL
) STRICT;

-- The package a revision holds now; NULL once pruned (or for a revision without one).
-- `package_sha256` and `package_size` stay the record of what was pushed.
ALTER TABLE code_revisions ADD COLUMN stored_package TEXT REFERENCES packages (sha256);
-- Who holds a package (pruning, quotas, the foreign key), and the revisions pruning walks.
CREATE INDEX code_revisions_by_package ON code_revisions (stored_package, code_id, rev)
    WHERE stored_package IS NOT NULL;

-- Whether an unfinished task pins a revision: one seek per status instead of a walk over
-- the code's backlog.
DROP INDEX tasks_by_status_code;
CREATE INDEX tasks_by_status_code ON tasks (status, code_id, code_rev);

-- The old packages, one per recorded checksum (the server recorded each package's SHA-256
-- as it stored it): the earliest revision's bytes, cut into chunks. A package without a
-- recorded checksum keeps a key of its own.
CREATE TEMP TABLE migrated_packages AS
SELECT ROW_NUMBER() OVER (ORDER BY sha256) AS blob, sha256, code_id, rev, size, created_at
FROM (
    SELECT COALESCE(r.package_sha256, 'unrecorded-' || p.code_id || '-' || p.rev) AS sha256,
           p.code_id, p.rev, length(p.bytes) AS size, r.created_at,
           ROW_NUMBER() OVER (
               PARTITION BY COALESCE(r.package_sha256, 'unrecorded-' || p.code_id || '-' || p.rev)
               ORDER BY r.created_at, p.code_id, p.rev
           ) AS nth
    FROM code_packages AS p
    JOIN code_revisions AS r ON r.code_id = p.code_id AND r.rev = p.rev
)
WHERE nth = 1;

INSERT INTO package_blobs (id, loose_until) SELECT blob, NULL FROM migrated_packages;

WITH RECURSIVE seqs (seq) AS (
    SELECT 0
    UNION ALL
    SELECT seq + 1 FROM seqs
    WHERE (seq + 1) * 1048576 < (SELECT COALESCE(MAX(size), 0) FROM migrated_packages)
)
INSERT INTO package_chunks (blob, seq, bytes)
SELECT m.blob, s.seq, substr(p.bytes, s.seq * 1048576 + 1, 1048576)
FROM migrated_packages AS m
JOIN code_packages AS p ON p.code_id = m.code_id AND p.rev = m.rev
JOIN seqs AS s ON s.seq * 1048576 < m.size;

INSERT INTO packages (sha256, size, blob, created_at)
SELECT sha256, size, blob, created_at FROM migrated_packages;

UPDATE code_revisions
SET package_sha256 = COALESCE(package_sha256, 'unrecorded-' || code_id || '-' || rev),
    stored_package = COALESCE(package_sha256, 'unrecorded-' || code_id || '-' || rev)
WHERE EXISTS (
    SELECT 1 FROM code_packages AS p
    WHERE p.code_id = code_revisions.code_id AND p.rev = code_revisions.rev
);

DROP TABLE migrated_packages;
DROP TABLE code_packages;
