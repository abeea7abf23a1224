"""The failure budget: consecutive wrong codes lock the user for a growing time.

Defaults follow NIST SP 800-63B §5.2.2: after `threshold` failures the lock
lasts `base` seconds, doubling with each further failure up to `max_seconds`;
after `max_consecutive_failures` the user stays locked until an admin unlocks.
"""

from __future__ import annotations

from twofactor_server.settings import PolicySettings


def lock_seconds(failures: int, policy: PolicySettings) -> float | None:
    """How long `failures` consecutive failures lock the user: 0 for not at all, None for until unlocked."""
    if failures >= policy.max_consecutive_failures:
        return None
    if failures < policy.lockout_threshold:
        return 0
    doublings = failures - policy.lockout_threshold
    if doublings >= 32:  # 2**32 base-seconds is past any configurable maximum
        return float(policy.lockout_max_seconds)
    return float(min(policy.lockout_base_seconds * 2**doublings, policy.lockout_max_seconds))


def attempts_left(failures: int, policy: PolicySettings) -> int:
    """Wrong codes left before the next lock."""
    if failures < policy.lockout_threshold:
        return policy.lockout_threshold - failures
    return 1 if failures < policy.max_consecutive_failures else 0
