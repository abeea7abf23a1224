-- What the accepted Verify statement checks and returns besides the users row, in one row per
-- user it finds with one primary-key probe (docs/benchmarks.md, issue 13):
-- - backup_codes_unused: the number of unused backup codes, instead of counting backup_codes;
-- - secret_version: moves on with every change of the user's methods rows (a new enrollment, a
--   reset, a disabled method, a key rotation's re-encryption), so that a server's cached sealed
--   secret, kept with the version it was read with, is checked without probing methods.
-- Not columns of users or methods: the previous release reads those with SELECT * into records
-- that refuse unknown columns, and it still serves during a rollout. Triggers keep both, in the
-- writer's own transaction, whoever writes: this release, the previous one (which knows nothing
-- of the table), an operator's SQL; a value each release kept itself would go wrong as soon as
-- a server of the previous release used a code or re-enrolled a user. Relative changes (+n, -1,
-- +1), not recounts: under READ COMMITTED an UPDATE that waited for another writer of the row
-- applies its change to the newest version, where a recount would still see its own statement's
-- older snapshot. No row: no unused code, and no cached secret is accepted (the row lock path
-- decides). No foreign key: a user's deletion cascades to methods, whose trigger would then
-- write a row for a user already gone; a row left behind holds 0 codes and a number.
-- The triggers come before the backfill: creating them takes the tables' locks, so no writer
-- slips in between; methods first, then backup_codes, the order in which the servers' own
-- transactions write them (a confirmation, a reset), so a server's transaction and this one
-- wait for each other at most one way. SQLite's version: 0008_verify_state.sqlite.sql.

CREATE TABLE verify_state (
    user_id TEXT PRIMARY KEY,
    backup_codes_unused INTEGER NOT NULL DEFAULT 0,
    secret_version BIGINT NOT NULL DEFAULT 0
);

CREATE FUNCTION backup_codes_added() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO verify_state AS v (user_id, backup_codes_unused)
    SELECT user_id, COUNT(*) FROM added WHERE used_at IS NULL GROUP BY user_id
    ON CONFLICT (user_id) DO UPDATE SET backup_codes_unused = v.backup_codes_unused + EXCLUDED.backup_codes_unused;
    RETURN NULL;
END $$;

CREATE FUNCTION backup_codes_removed() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE verify_state v SET backup_codes_unused = v.backup_codes_unused - r.n
    FROM (SELECT user_id, COUNT(*) AS n FROM removed WHERE used_at IS NULL GROUP BY user_id) r
    WHERE v.user_id = r.user_id;
    RETURN NULL;
END $$;

CREATE FUNCTION backup_code_used() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE verify_state SET backup_codes_unused = backup_codes_unused
        + (NEW.used_at IS NULL)::integer - (OLD.used_at IS NULL)::integer
    WHERE user_id = NEW.user_id;
    RETURN NULL;
END $$;

CREATE FUNCTION method_changed() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    changed TEXT := CASE WHEN TG_OP = 'DELETE' THEN OLD.user_id ELSE NEW.user_id END;
BEGIN
    INSERT INTO verify_state AS v (user_id, secret_version) VALUES (changed, 1)
    ON CONFLICT (user_id) DO UPDATE SET secret_version = v.secret_version + 1;
    RETURN NULL;
END $$;

-- Any method row added or removed, any secret or enabled time written (a pending enrollment's
-- own columns don't count: they decide no login).
CREATE TRIGGER method_changed AFTER INSERT OR DELETE OR UPDATE OF secret, enabled_at ON methods
    FOR EACH ROW EXECUTE FUNCTION method_changed();
-- One statement per set of codes (a regeneration inserts 10 rows in one INSERT).
CREATE TRIGGER backup_codes_added AFTER INSERT ON backup_codes
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION backup_codes_added();
CREATE TRIGGER backup_codes_removed AFTER DELETE ON backup_codes
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION backup_codes_removed();
-- A code is used one at a time; key rotation's UPDATE of the hash and ciphertext doesn't fire it.
CREATE TRIGGER backup_code_used AFTER UPDATE OF used_at ON backup_codes FOR EACH ROW
    WHEN ((OLD.used_at IS NULL) <> (NEW.used_at IS NULL)) EXECUTE FUNCTION backup_code_used();

INSERT INTO verify_state (user_id, backup_codes_unused)
SELECT u.user_id, (SELECT COUNT(*) FROM backup_codes b WHERE b.user_id = u.user_id AND b.used_at IS NULL)
FROM users u
WHERE EXISTS (SELECT 1 FROM methods m WHERE m.user_id = u.user_id)
   OR EXISTS (SELECT 1 FROM backup_codes b WHERE b.user_id = u.user_id);
