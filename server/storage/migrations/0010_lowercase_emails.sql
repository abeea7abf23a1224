-- Email addresses are stored in lower case since this release (domain/contacts.normalized_email):
-- one mailbox is one destination for the per-destination send limit and its lock. Addresses
-- stored before keep the case they were typed in; this brings them to the same form, so a user
-- who sends the same address again changes nothing and the limits count one mailbox once.
-- (PostgreSQL's lower() follows the database's collation, SQLite's folds ASCII only: both
-- fold every ASCII address the way Python's does, and SetContact compares normalized forms.)
UPDATE users SET email = lower(email) WHERE email IS NOT NULL AND email <> lower(email);
