-- Schema 2: every row that decides who may do what carries a MAC under a key
-- derived from the root key (keystore.rs, `SEALED_ROWS`); the broker computes
-- them for the rows already there when it migrates. Whoever can write the
-- database cannot make such a row (a principal, a policy, a trust root, a key
-- state, an alias, an access key's owner) that the replicas accept.
ALTER TABLE keys ADD COLUMN mac BYTEA;
ALTER TABLE aliases ADD COLUMN mac BYTEA;
ALTER TABLE principals ADD COLUMN mac BYTEA;
ALTER TABLE trust_roots ADD COLUMN mac BYTEA;
ALTER TABLE access_keys ADD COLUMN mac BYTEA;
