-- The row per user the accepted Verify statement finds with one key probe: the unused backup
-- codes and a version of the user's methods rows, kept by triggers whoever writes: see
-- 0008_verify_state.postgres.sql for why. SQLite has row triggers only.

CREATE TABLE verify_state (
    user_id TEXT PRIMARY KEY,
    backup_codes_unused INTEGER NOT NULL DEFAULT 0,
    secret_version BIGINT NOT NULL DEFAULT 0
);

CREATE TRIGGER backup_codes_added AFTER INSERT ON backup_codes FOR EACH ROW WHEN NEW.used_at IS NULL
BEGIN
    INSERT INTO verify_state (user_id, backup_codes_unused) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET backup_codes_unused = backup_codes_unused + 1;
END;

CREATE TRIGGER backup_codes_removed AFTER DELETE ON backup_codes FOR EACH ROW WHEN OLD.used_at IS NULL
BEGIN
    UPDATE verify_state SET backup_codes_unused = backup_codes_unused - 1 WHERE user_id = OLD.user_id;
END;

CREATE TRIGGER backup_code_used AFTER UPDATE OF used_at ON backup_codes FOR EACH ROW
    WHEN (OLD.used_at IS NULL) <> (NEW.used_at IS NULL)
BEGIN
    UPDATE verify_state SET backup_codes_unused = backup_codes_unused
        + (NEW.used_at IS NULL) - (OLD.used_at IS NULL)
    WHERE user_id = NEW.user_id;
END;

CREATE TRIGGER method_added AFTER INSERT ON methods FOR EACH ROW
BEGIN
    INSERT INTO verify_state (user_id, secret_version) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET secret_version = secret_version + 1;
END;

CREATE TRIGGER method_removed AFTER DELETE ON methods FOR EACH ROW
BEGIN
    INSERT INTO verify_state (user_id, secret_version) VALUES (OLD.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET secret_version = secret_version + 1;
END;

CREATE TRIGGER method_changed AFTER UPDATE OF secret, enabled_at ON methods FOR EACH ROW
BEGIN
    INSERT INTO verify_state (user_id, secret_version) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET secret_version = secret_version + 1;
END;

INSERT INTO verify_state (user_id, backup_codes_unused)
SELECT u.user_id, (SELECT COUNT(*) FROM backup_codes b WHERE b.user_id = u.user_id AND b.used_at IS NULL)
FROM users u
WHERE EXISTS (SELECT 1 FROM methods m WHERE m.user_id = u.user_id)
   OR EXISTS (SELECT 1 FROM backup_codes b WHERE b.user_id = u.user_id);
