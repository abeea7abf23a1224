-- The user's credential epoch when a contact change (a challenge of purpose 'contact') was
-- authorized: the epoch its step-up proof was checked at. ConfirmContact and GetStatus take the
-- change only while the user's epoch is still that one, so a change started before an admin
-- reset, a method turned off or on, new backup codes or another contact changed is dead: the
-- proof it started with no longer speaks for the account. (The other half of the SetContact
-- that started it, applied at once or confirmed, carries it to the new epoch.) NULL for other
-- purposes, and for a change the previous release writes during the rollout: for it no epoch
-- is compared (as before).
ALTER TABLE challenges ADD COLUMN credential_epoch BIGINT;
