-- Schema 1: keys and their versions, aliases, principals, trust roots.
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id BLOB PRIMARY KEY,
    description TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('Enabled', 'Disabled', 'PendingDeletion')),
    created_ms INTEGER NOT NULL,
    deletion_ms INTEGER,
    policy TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS key_versions (
    key_id BLOB NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    material BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT PRIMARY KEY,
    key_id BLOB NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS principals (
    name TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    policy TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS trust_roots (
    label TEXT PRIMARY KEY,
    der BLOB NOT NULL,
    added_ms INTEGER NOT NULL
);
