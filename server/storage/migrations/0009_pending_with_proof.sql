-- Whether a pending enrollment was started with a step-up proof (the user had a usable method,
-- so StartEnrollment required one) or without one (no method guarded the account yet), decided
-- under the user's row lock in the starting transaction. ConfirmEnrollment refuses a pending
-- enrollment started without a proof once the user has a usable method. Deciding that from the
-- timestamps (pending_since against another method's enabled_at) let through a start in the same
-- millisecond, or one written by a server whose clock ran ahead.
-- A table of its own, not a column of methods: releases before this one read methods whole
-- (README, Upgrades). A row counts only for the pending enrollment it was written with (the same
-- pending_since): one the previous release started during the rollout has none, and for it the
-- timestamps still decide. One row per user and method at most, replaced by each start.
CREATE TABLE enrollment_starts (
    user_id TEXT NOT NULL,
    method TEXT NOT NULL,
    pending_since BIGINT NOT NULL,
    with_proof BOOLEAN NOT NULL,
    PRIMARY KEY (user_id, method)
);
