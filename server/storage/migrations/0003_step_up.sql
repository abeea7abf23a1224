-- Step-up proofs (verification_token) carry the user's credential epoch: every change of a
-- method, the contacts or the backup codes, and an admin reset, moves it on, so proofs
-- issued before the change stop working.
ALTER TABLE users ADD COLUMN credential_epoch BIGINT NOT NULL DEFAULT 0;

-- SMS pumping guard: texts counted per clock hour and country ('*' counts them all). A send
-- takes one with a conditional UPDATE below the cap, so concurrent sends can't pass it.
CREATE TABLE sms_send_counts (
    hour BIGINT NOT NULL,                -- ms since the epoch // 3600000
    country TEXT NOT NULL,               -- ISO 3166-1 alpha-2, or '*'
    sends INTEGER NOT NULL,
    PRIMARY KEY (hour, country)
);
