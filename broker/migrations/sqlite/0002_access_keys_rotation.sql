-- Schema 2: SigV4 access keys (the AWS API listener) and automatic key rotation.
CREATE TABLE access_keys (
    access_key_id TEXT PRIMARY KEY,
    principal TEXT NOT NULL REFERENCES principals(name) ON DELETE CASCADE,
    -- The secret, AES-256-GCM under the root key, bound to the access key id.
    secret BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
-- NULL: automatic rotation is off.
ALTER TABLE keys ADD COLUMN rotation_days INTEGER;
ALTER TABLE keys ADD COLUMN next_rotation_ms INTEGER;
