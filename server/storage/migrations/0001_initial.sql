-- Times are integer milliseconds since the Unix epoch in both backends.
-- {BLOB} and {SERIAL_PK} are filled in per backend (database.py).

CREATE TABLE users (
    user_id TEXT PRIMARY KEY,
    email TEXT,
    phone TEXT,
    created_at BIGINT NOT NULL,
    last_verified_at BIGINT,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    locked_until BIGINT,                 -- NULL: not locked
    totp_last_step BIGINT,               -- RFC 6238 §5.2: only newer steps are accepted
    backup_codes_generated_at BIGINT
);

-- One row per method a user has enabled or is enrolling in.
CREATE TABLE methods (
    user_id TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    method TEXT NOT NULL,                -- authenticator | email | sms
    enabled_at BIGINT,                   -- NULL while only pending
    pending_since BIGINT,                -- NULL when no enrollment is pending
    secret {BLOB},                       -- authenticator: AES-GCM ciphertext of the TOTP secret
    pending_secret {BLOB},               -- authenticator: the secret being enrolled
    PRIMARY KEY (user_id, method)
);

-- Codes sent by email or SMS, with their delivery (the outbox the workers read).
CREATE TABLE challenges (
    challenge_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    method TEXT NOT NULL,                -- email | sms
    purpose TEXT NOT NULL,               -- login | enrollment
    destination TEXT NOT NULL,
    code_hash {BLOB} NOT NULL,           -- keyed HMAC of the code
    code_ciphertext {BLOB},              -- for the worker; wiped once sent
    idempotency_key TEXT,
    locale TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    consumed_at BIGINT,
    superseded_at BIGINT,
    delivery_status TEXT NOT NULL,       -- queued | sending | sent | failed | expired
    delivery_attempts INTEGER NOT NULL DEFAULT 0,
    provider_message_id TEXT,
    failure_reason TEXT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX challenges_by_user ON challenges (user_id, created_at);
CREATE INDEX challenges_by_destination ON challenges (destination, created_at);
CREATE UNIQUE INDEX challenges_by_idempotency_key ON challenges (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE backup_codes (
    user_id TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    code_hash {BLOB} NOT NULL,           -- keyed HMAC, to check a typed code
    code_ciphertext {BLOB} NOT NULL,     -- AES-GCM, to show the unused codes again
    used_at BIGINT,
    PRIMARY KEY (user_id, position)
);

CREATE TABLE audit_events (
    event_id {SERIAL_PK},
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    user_id TEXT NOT NULL,
    action TEXT NOT NULL,
    request_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_events_by_user ON audit_events (user_id, event_id);
