-- The number of each user's unused backup codes, in a table of its own, so that the accepted
-- Verify statement returns it with one primary-key probe instead of counting backup_codes
-- (docs/benchmarks.md, issue 13). Not a column of users: the previous release reads users with
-- SELECT * into a record that refuses unknown columns, and it still serves during a rollout.
-- Triggers keep the count, in the writer's own transaction, whoever writes backup_codes: this
-- release, the previous one (which knows nothing of the table), an operator's SQL. A count each
-- release kept itself would go wrong as soon as a server of the previous release used a code.
-- Relative changes (+n, -1), not a recount: under READ COMMITTED an UPDATE that waited for
-- another writer of the row applies its change to the newest version, where a recount would
-- still see its own statement's older snapshot. No row: no unused code.
-- The triggers come before the count: creating them takes backup_codes' lock, so no writer slips
-- in between. SQLite's version: 0008_backup_codes_left.sqlite.sql.

CREATE TABLE backup_code_counts (
    user_id TEXT PRIMARY KEY REFERENCES users (user_id) ON DELETE CASCADE,
    unused INTEGER NOT NULL
);

CREATE FUNCTION backup_codes_added() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO backup_code_counts AS c (user_id, unused)
    SELECT user_id, COUNT(*) FROM added WHERE used_at IS NULL GROUP BY user_id
    ON CONFLICT (user_id) DO UPDATE SET unused = c.unused + EXCLUDED.unused;
    RETURN NULL;
END $$;

CREATE FUNCTION backup_codes_removed() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE backup_code_counts c SET unused = c.unused - r.n
    FROM (SELECT user_id, COUNT(*) AS n FROM removed WHERE used_at IS NULL GROUP BY user_id) r
    WHERE c.user_id = r.user_id;
    RETURN NULL;
END $$;

CREATE FUNCTION backup_code_used() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE backup_code_counts SET unused = unused
        + (NEW.used_at IS NULL)::integer - (OLD.used_at IS NULL)::integer
    WHERE user_id = NEW.user_id;
    RETURN NULL;
END $$;

-- One statement per set of codes (a regeneration inserts 10 rows in one INSERT).
CREATE TRIGGER backup_codes_added AFTER INSERT ON backup_codes
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION backup_codes_added();
CREATE TRIGGER backup_codes_removed AFTER DELETE ON backup_codes
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION backup_codes_removed();
-- A code is used one at a time; key rotation's UPDATE of the hash and ciphertext doesn't fire it.
CREATE TRIGGER backup_code_used AFTER UPDATE OF used_at ON backup_codes FOR EACH ROW
    WHEN ((OLD.used_at IS NULL) <> (NEW.used_at IS NULL)) EXECUTE FUNCTION backup_code_used();

INSERT INTO backup_code_counts (user_id, unused)
SELECT user_id, COUNT(*) FROM backup_codes WHERE used_at IS NULL GROUP BY user_id;
