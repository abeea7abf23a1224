-- The number of each user's unused backup codes, kept by triggers whoever writes backup_codes:
-- see 0008_backup_codes_left.postgres.sql for why. SQLite has row triggers only.

CREATE TABLE backup_code_counts (
    user_id TEXT PRIMARY KEY REFERENCES users (user_id) ON DELETE CASCADE,
    unused INTEGER NOT NULL
);

CREATE TRIGGER backup_codes_added AFTER INSERT ON backup_codes FOR EACH ROW WHEN NEW.used_at IS NULL
BEGIN
    INSERT INTO backup_code_counts (user_id, unused) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET unused = unused + 1;
END;

CREATE TRIGGER backup_codes_removed AFTER DELETE ON backup_codes FOR EACH ROW WHEN OLD.used_at IS NULL
BEGIN
    UPDATE backup_code_counts SET unused = unused - 1 WHERE user_id = OLD.user_id;
END;

CREATE TRIGGER backup_code_used AFTER UPDATE OF used_at ON backup_codes FOR EACH ROW
    WHEN (OLD.used_at IS NULL) <> (NEW.used_at IS NULL)
BEGIN
    UPDATE backup_code_counts SET unused = unused + (NEW.used_at IS NULL) - (OLD.used_at IS NULL)
    WHERE user_id = NEW.user_id;
END;

INSERT INTO backup_code_counts (user_id, unused)
SELECT user_id, COUNT(*) FROM backup_codes WHERE used_at IS NULL GROUP BY user_id;
