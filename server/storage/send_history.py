"""What the send limits read of a user's past sends: the last send of each method (the resend
cooldown, per user and method, runs from it) and the hourly counts, per user and per address."""

from __future__ import annotations

from dataclasses import dataclass

from twofactor_server.storage.database import Transaction
from twofactor_server.storage.hot_statements import HotStatement

# The user's last send (%(u)s: the user): every code but the failed and the void.
_LAST_SEND = (
    "SELECT MAX(created_at) FROM challenges "
    "WHERE user_id = %(u)s AND delivery_status NOT IN ('failed', 'void') AND purpose <> 'notice'"
)
# Of one method (%(m)s): the resend cooldown's start. Another method's code is no reason to wait.
LAST_SEND_OF_METHOD = f"{_LAST_SEND} AND method = %(m)s"
# Sends that count toward an hourly limit: every code but the void (notices are no codes).
_COUNT_SENDS = (
    "SELECT COUNT(*) FROM challenges WHERE {column} = %({value})s AND created_at > %(since)s "
    "AND delivery_status <> 'void' AND purpose <> 'notice'"
)
# SendCode's: the figures the send limits look at, and the method's state, in one statement
# (prepared by name and run through libpq, hot_statements.py).
_RECENT_SENDS = HotStatement(
    "twofactor_recent_sends",
    f"SELECT ({_LAST_SEND}) AS last, ({LAST_SEND_OF_METHOD}) AS last_of_method, "  # noqa: S608
    f"({_COUNT_SENDS.format(column='user_id', value='u')}) AS to_user, "
    f"({_COUNT_SENDS.format(column='destination', value='d')}) AS to_destination, "
    "EXISTS (SELECT 1 FROM methods WHERE user_id = %(u)s AND method = %(m)s "
    "AND enabled_at IS NOT NULL) AS method_enabled",
)


@dataclass(frozen=True)
class RecentSends:
    """What the send limits look at, read in one statement."""

    last_ms: int | None  # the user's last send, of any method: a new send is timed after it
    last_of_method_ms: int | None  # last_send_ms: the method's resend cooldown runs from it
    to_user: int  # sends counting toward the hourly limit, to the user (every method)
    to_destination: int  # and to the destination
    method_enabled: bool  # whether the user has `method` enabled


def recent_sends(
    tx: Transaction, user_id: str, destination: str | None, *, since_ms: int, method: str
) -> RecentSends:
    """The user's last send, of any method and of `method`, the two hourly counts of the send
    limits, and whether the user has `method` enabled, in one round trip."""
    row = tx.hot_row(_RECENT_SENDS, {"u": user_id, "d": destination, "since": since_ms, "m": method})
    assert row is not None
    last, of_method, to_user, to_destination, enabled = row
    last_ms, of_method_ms = (None if t is None else int(t) for t in (last, of_method))
    return RecentSends(last_ms, of_method_ms, int(to_user), int(to_destination), bool(enabled))


def last_send_ms(tx: Transaction, user_id: str, method: str) -> int | None:
    """When the user's last code by `method` was sent: its resend cooldown runs from then."""
    row = tx.one(f"SELECT ({LAST_SEND_OF_METHOD}) AS last", {"u": user_id, "m": method})
    return None if row is None or row["last"] is None else int(row["last"])
