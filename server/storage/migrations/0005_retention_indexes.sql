-- Retention deletes audit events by age (storage/retention.py): an index so it reads only what
-- it deletes. (Challenges by expiry have one since 0004.) Expand-only: the previous release ignores it.
CREATE INDEX audit_events_by_time ON audit_events (at);
