-- The key version of a stored value is its first 4 bytes. These indexes let a
-- server check at start, without reading whole tables, that no stored value
-- uses a key version its keyring lacks (storage/keys.py). PostgreSQL
-- deduplicates their entries, and nearly all share one version.
CREATE INDEX methods_by_secret_key ON methods (substr(secret, 1, 4));
CREATE INDEX methods_by_pending_secret_key ON methods (substr(pending_secret, 1, 4));
CREATE INDEX backup_codes_by_hash_key ON backup_codes (substr(code_hash, 1, 4));
CREATE INDEX backup_codes_by_ciphertext_key ON backup_codes (substr(code_ciphertext, 1, 4));
-- Waiting challenge codes are the unexpired ones.
CREATE INDEX challenges_by_expiry ON challenges (expires_at);
