-- Outbox recovery looks for rows a worker took though the server never recorded their publish
-- (storage/outbox.py claimed_but_unpublished): published_at IS NULL, oldest first. Nearly every
-- row is published, so a partial index holds only the few that are not; without it each round
-- read the whole challenges table (docs/benchmarks.md, "Flat cost at a million users").
-- Expand-only: the previous release ignores it.
CREATE INDEX challenges_unpublished ON challenges (created_at) WHERE published_at IS NULL;
