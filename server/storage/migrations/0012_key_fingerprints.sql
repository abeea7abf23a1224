-- Per key version, the fingerprint of the key (domain/keyring.py key_fingerprint: a one-way value,
-- never the key) the first server, worker or `twofactor keys` command to start with that
-- version saw. Every later start compares its own key's: another key under a recorded version
-- (another environment's, or mistyped) is refused at start, even before anything is sealed.
-- A retired version keeps its row, so its number is never taken by a new key. A new table:
-- the release before this one neither reads nor writes it.
CREATE TABLE key_fingerprints (
    version BIGINT PRIMARY KEY,
    fingerprint {BLOB} NOT NULL,
    recorded_at_ms BIGINT NOT NULL
);
