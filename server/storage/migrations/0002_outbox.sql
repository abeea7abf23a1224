-- The outbox's publish bookkeeping (issue 9). Additive: new nullable columns and an index.
-- A row is "published" once its delivery message is known to be in the queue; until then
-- its code is not live and supersedes nothing. publish_generation rises with each republish
-- by recovery; a message of an older generation is a no-op. lease_until bounds one worker's
-- claim on a 'sending' row; next_publish_at is when recovery republishes a row still queued.

ALTER TABLE challenges ADD COLUMN publish_generation INTEGER DEFAULT 0;
ALTER TABLE challenges ADD COLUMN published_at BIGINT;
ALTER TABLE challenges ADD COLUMN lease_until BIGINT;
ALTER TABLE challenges ADD COLUMN next_publish_at BIGINT;
UPDATE challenges SET publish_generation = 0, published_at = created_at;
CREATE INDEX challenges_to_recover ON challenges (delivery_status, expires_at);
