-- Step-up proofs (verification_token) carry the user's credential epoch: every change of a
-- method, the contacts or the backup codes, and an admin reset, moves it on, so proofs
-- issued before the change stop working.
ALTER TABLE users ADD COLUMN credential_epoch BIGINT NOT NULL DEFAULT 0;
