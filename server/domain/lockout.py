"""The failure budget: consecutive wrong codes lock the user for a growing time.

Defaults follow NIST SP 800-63B §5.2.2: after `threshold` failures the lock
lasts `base` seconds, doubling with each further failure up to `max_seconds`;
after `max_consecutive_failures` the user stays locked until an admin unlocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from twofactor_server.domain.models import Lock
from twofactor_server.settings import PolicySettings


def lock_of(
    failed_attempts: int, locked_until_ms: int | None, policy: PolicySettings, now_ms: int
) -> Lock | None:
    """The lock in force, if any: the one lockout rule, read by every path that checks a code."""
    if failed_attempts >= policy.max_consecutive_failures:
        return Lock(None, permanent=True)
    if locked_until_ms is not None and locked_until_ms > now_ms:
        return Lock(locked_until_ms)
    return None


def locked_until_after(failures: int, policy: PolicySettings, now_ms: int) -> int | None:
    """When `failures` consecutive failures, counted now, lock the user until (None: not timed)."""
    seconds = lock_seconds(failures, policy)
    return None if not seconds else now_ms + int(seconds * 1000)


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


def lock_schedule(
    policy: PolicySettings, now_ms: int
) -> tuple[tuple[tuple[int, int | None], ...], int | None]:
    """locked_until_after for every failure count from the threshold on, counted now, in a form
    one UPDATE can apply (storage's count_failure_unlocked): (count, locked_until) pairs while
    the lock still grows, then the one lock of every later count below max_consecutive_failures.
    None means no timed lock (counts below the threshold set none either)."""
    pairs: list[tuple[int, int | None]] = []
    failures = policy.lockout_threshold
    while failures + 1 < policy.max_consecutive_failures and lock_seconds(failures, policy) != lock_seconds(
        failures + 1, policy
    ):
        pairs.append((failures, locked_until_after(failures, policy, now_ms)))
        failures += 1
    return tuple(pairs), locked_until_after(failures, policy, now_ms)


@dataclass(frozen=True)
class Reservation:
    """An attempt counted before its code is checked: the counters before and after."""

    failures_before: int
    locked_until_before: int | None
    failures: int
    locked_until: int | None
    locks: bool  # whether this attempt's count started a lock
