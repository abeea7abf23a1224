-- Retention deletes by age (storage/retention.py): indexes so it reads only what it deletes.
-- Expand-only: the previous release ignores them.
CREATE INDEX audit_events_by_time ON audit_events (at);
CREATE INDEX challenges_by_expiry ON challenges (expires_at);
