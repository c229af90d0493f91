-- Schema 3: every row that decides who may do what carries a MAC under a key
-- derived from the root key (keystore.rs, `SEALED_ROWS`); the broker computes
-- them for the rows already there when it migrates.
ALTER TABLE keys ADD COLUMN mac BLOB;
ALTER TABLE aliases ADD COLUMN mac BLOB;
ALTER TABLE principals ADD COLUMN mac BLOB;
ALTER TABLE trust_roots ADD COLUMN mac BLOB;
ALTER TABLE access_keys ADD COLUMN mac BLOB;
