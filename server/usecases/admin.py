"""The use cases of AdminService: look up, unlock and reset users, read the audit log."""

from __future__ import annotations

import base64
import binascii

from twofactor_server.domain.clock import Clock, now_ms
from twofactor_server.domain.errors import FailedPrecondition, InvalidArgument
from twofactor_server.domain.models import MAX_USER_ID_BYTES, AuditEvent, Caller, UserState
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import store
from twofactor_server.storage.database import Database, Transaction
from twofactor_server.usecases import audit
from twofactor_server.usecases.notices import Notices
from twofactor_server.usecases.users import existing_user, load_state, user_state

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_EVENT_ID = 2**63 - 1  # BIGINT


class Admin:
    def __init__(self, db: Database, policy: PolicySettings, notices: Notices, clock: Clock) -> None:
        self._db = db
        self._policy = policy
        self._notices = notices
        self._clock = clock

    def get_user(self, user_id: str) -> UserState:
        with self._db.transaction(snapshot=True) as tx:  # the row, methods and codes of one moment
            return load_state(tx, existing_user(tx, user_id), self._policy, self._now_ms())

    def list_users(
        self, *, page_size: int, page_token: str, enabled: bool | None
    ) -> tuple[list[UserState], str]:
        limit = _page_size(page_size)
        after = _decode_token(page_token, "u") if page_token else ""
        with self._db.transaction(snapshot=True) as tx:
            rows = store.list_users(tx, after=str(after), limit=limit + 1, enabled=enabled)
            page = rows[:limit]
            # Two statements for the page, whatever its size: a round trip per user would not fit
            # a 1,000-user page into one storage timeout on a database a few milliseconds away.
            user_ids = [user.user_id for user in page]
            methods = store.methods_of_users(tx, user_ids)
            unused_codes = store.count_unused_backup_codes_of_users(tx, user_ids)
            now = self._now_ms()
            users = [
                user_state(user, methods[user.user_id], unused_codes[user.user_id], self._policy, now)
                for user in page
            ]
        next_token = _encode_token("u", page[-1].user_id) if len(rows) > limit else ""
        return users, next_token

    def reset_user(self, user_id: str, *, reason: str, caller: Caller) -> UserState:
        if not self._policy.allow_admin_reset:
            # A refused reset is worth knowing about: record it (in its own transaction) before refusing.
            with self._db.transaction() as tx:
                if store.get_user(tx, user_id) is not None:
                    self._audit(tx, caller, user_id, "user_reset", reason, outcome="failure")
            raise FailedPrecondition("ADMIN_RESET_DISABLED", "the policy does not allow admin resets")
        with self._db.transaction() as tx:
            user = existing_user(tx, user_id, lock=True)
            # Told only of a reset that changes something (not a retry, nor one with nothing
            # enrolled), and before it: the notice is judged by the address as the user's methods
            # had it (a confirmed one hears of every change, Notices._over_the_cap).
            enrolled = store.methods_of(tx, user_id) or store.count_unused_backup_codes(tx, user_id)
            if enrolled or user.failed_attempts or user.locked_until is not None:
                self._notices.add(tx, user.email, user_id, "admin_reset", self._now_ms())
            store.reset_user(tx, user_id)
            self._audit(tx, caller, user_id, "user_reset", reason)
            return load_state(tx, existing_user(tx, user_id), self._policy, self._now_ms())

    def unlock_user(self, user_id: str, *, caller: Caller) -> UserState:
        with self._db.transaction() as tx:
            existing_user(tx, user_id, lock=True)
            store.unlock(tx, user_id)
            self._audit(tx, caller, user_id, "user_unlocked", "")
            return load_state(tx, existing_user(tx, user_id), self._policy, self._now_ms())

    def list_audit_events(
        self,
        *,
        user_id: str,
        page_size: int,
        page_token: str,
        actions: tuple[str, ...] = (),
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> tuple[list[AuditEvent], str]:
        """Newest first, filtered by user, actions and time range [since, until); a page at a time."""
        limit = _page_size(page_size)
        before = int(_decode_token(page_token, "e")) if page_token else None
        with self._db.transaction() as tx:
            rows = store.list_audit_events(
                tx,
                user_id=user_id,
                before_id=before,
                limit=limit + 1,
                actions=actions,
                since_ms=since_ms,
                until_ms=until_ms,
            )
        page = rows[:limit]
        next_token = _encode_token("e", str(page[-1].event_id)) if len(rows) > limit else ""
        return page, next_token

    def _audit(
        self,
        tx: Transaction,
        caller: Caller,
        user_id: str,
        action: str,
        detail: str,
        *,
        outcome: str = "success",
    ) -> None:
        audit.record(tx, caller, self._now_ms(), user_id, action, outcome=outcome, detail=detail)

    def _now_ms(self) -> int:
        return now_ms(self._clock)


def _page_size(requested: int) -> int:
    if requested < 0 or requested > MAX_PAGE_SIZE:
        raise InvalidArgument("INVALID_PAGE_SIZE", f"page_size must be between 0 and {MAX_PAGE_SIZE}")
    return requested or DEFAULT_PAGE_SIZE


def _encode_token(kind: str, position: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode()


def _decode_token(token: str, kind: str) -> str:
    try:
        found_kind, _, position = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        found_kind, position = "", ""
    if found_kind != kind or not _is_position(kind, position):
        raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not one this list returned")
    return position


def _is_position(kind: str, position: str) -> bool:
    """Whether a decoded token holds a position the query can use; tokens are opaque but can be forged."""
    if kind == "e":
        # isdigit() alone admits "²" and other digits int() refuses, and int() refuses more than
        # 4,300 digits: the length is checked first.
        return (
            position.isascii()
            and position.isdigit()
            and len(position) <= len(str(MAX_EVENT_ID))
            and int(position) <= MAX_EVENT_ID
        )
    return 0 < len(position.encode()) <= MAX_USER_ID_BYTES and position.isprintable()
