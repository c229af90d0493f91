-- Schema 1 (PostgreSQL): the keystore as SQLite's schema 2 has it, and what
-- broker replicas share besides: the generation of the keystore, the request
-- ids accepted, the audit chain and the replicas alive.
CREATE TABLE meta (name TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE keys (
    key_id BYTEA PRIMARY KEY,
    description TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('Enabled', 'Disabled', 'PendingDeletion')),
    created_ms BIGINT NOT NULL,
    deletion_ms BIGINT,
    policy TEXT NOT NULL,
    -- NULL: automatic rotation is off.
    rotation_days BIGINT,
    next_rotation_ms BIGINT
);
CREATE TABLE key_versions (
    key_id BYTEA NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    -- AES-256-GCM under the root key, bound to the key id and version.
    material BYTEA NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE aliases (
    alias TEXT PRIMARY KEY,
    key_id BYTEA NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE
);
CREATE TABLE principals (
    name TEXT PRIMARY KEY,
    public_key BYTEA NOT NULL,
    policy TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE trust_roots (
    label TEXT PRIMARY KEY,
    der BYTEA NOT NULL,
    added_ms BIGINT NOT NULL
);
CREATE TABLE access_keys (
    access_key_id TEXT PRIMARY KEY,
    principal TEXT NOT NULL REFERENCES principals(name) ON DELETE CASCADE,
    -- The secret, AES-256-GCM under the root key, bound to the access key id.
    secret BYTEA NOT NULL,
    created_ms BIGINT NOT NULL
);
-- Every change of the keystore adds one, in its transaction: a replica whose
-- copy was read at an older generation reloads it before it answers.
CREATE TABLE generation (id INT PRIMARY KEY CHECK (id = 1), n BIGINT NOT NULL);
INSERT INTO generation VALUES (1, 0);
-- Request ids accepted (the first 16 bytes of SHA-256(principal || 0 || id)),
-- kept until no request with that id can be within the clock skew any more.
CREATE TABLE request_ids (digest BYTEA PRIMARY KEY, expires_ms BIGINT NOT NULL);
CREATE INDEX request_ids_expiry ON request_ids (expires_ms);
-- The audit chain: every line's exact bytes, in order, and its head (the last
-- line's seq and SHA-256, signed by the broker key), updated with each append.
CREATE TABLE audit_log (seq BIGINT PRIMARY KEY, line TEXT NOT NULL);
CREATE TABLE audit_head (
    id INT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL
);
-- The empty chain: seq 0, the genesis hash, nothing to sign yet.
INSERT INTO audit_head VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', '');
-- Replicas serving, and when each last said so (rate limits divide by them).
CREATE TABLE replicas (name TEXT PRIMARY KEY, started_ms BIGINT NOT NULL, seen_ms BIGINT NOT NULL);
