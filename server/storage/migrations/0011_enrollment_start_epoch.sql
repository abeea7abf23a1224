-- The user's credential epoch when a pending enrollment started with a step-up proof.
-- ConfirmEnrollment refuses the enrollment once the epoch has moved on (a method enabled or
-- disabled, backup codes regenerated, a contact changed, a reset): the proof it started with
-- no longer speaks for the account, so a QR code seen then must not add an authenticator later.
-- Nullable: a row the previous release writes during the rollout has none, and for it no epoch
-- is compared (as before).
ALTER TABLE enrollment_starts ADD COLUMN credential_epoch BIGINT;
