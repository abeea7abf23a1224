"""What both storage backends share: the Transaction and Database protocols, rows, the actions
run after a commit, and the one line logged when storage is unavailable."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, Protocol

from twofactor_server.domain.errors import StorageUnavailable
from twofactor_server.storage.hot_statements import HotStatement

log = logging.getLogger(__name__)

Row = dict[str, Any]
Params = Mapping[str, Any]


def in_list(prefix: str, values: list[str]) -> tuple[str, dict[str, str]]:
    """An `IN (...)` list of bound parameters named prefix0, prefix1, ... and their values: one
    statement for a batch, every value a parameter."""
    params = {f"{prefix}{i}": value for i, value in enumerate(values)}
    return ", ".join(f"%({name})s" for name in params), params


class Transaction(Protocol):
    dialect: str  # "postgres" | "sqlite"
    # Appended to a SELECT to hold its rows until commit; empty where the
    # whole transaction is already exclusive (SQLite).
    row_lock: str

    def execute(self, sql: str, params: Params | None = None) -> int:
        """Run a statement; return the number of rows it touched."""

    def one(self, sql: str, params: Params | None = None) -> Row | None: ...

    def all(self, sql: str, params: Params | None = None) -> list[Row]: ...

    def hot_row(self, statement: HotStatement, params: Params) -> tuple[Any, ...] | None:
        """Run a HotStatement (parameters: str, int or None; bytes where it says binary); its
        first row's values, or None when it returns no row. PostgreSQL reads each column by its
        type (int, bool, str, bytes; None for NULL); SQLite's values are its own (a boolean is
        0 or 1), so callers convert what they read as they would a row of `one`."""

    def hot_rows(self, statement: HotStatement, params: Params) -> list[tuple[Any, ...]]:
        """hot_row for every row the statement returns, in its order."""

    def hot_last(self, statement: HotStatement, params: Params) -> None:
        """A HotStatement whose rows the caller doesn't read, meant to be the transaction's last:
        PostgreSQL sends it with COMMIT, in one round trip, so its error (a constraint's) is
        raised when the block ends. A statement after it sends it first, as hot_row would."""

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run `action` once the transaction has committed and its connection is back in the
        pool (never on rollback): work that must not hold a connection, like publishing."""


class Database(Protocol):
    dialect: str  # "postgres" | "sqlite"
    # Set whenever a call finds the storage unavailable, so the health probe looks at once.
    unavailable: threading.Event

    def transaction(self, *, snapshot: bool = False) -> Any:
        """A context manager yielding a Transaction; commits on success, rolls back on error.
        `snapshot`: a read-only one whose statements all see the same moment (a read of a user's
        state spread over several tables never mixes before and after a change)."""

    def statements(self) -> Any:
        """A context manager yielding a Transaction whose statements each commit on their own:
        no BEGIN, no COMMIT, for hot paths whose single statements are atomic by themselves."""

    def ping(self) -> None:
        """One round trip to the database within the storage timeout; StorageUnavailable if not."""

    def migrate(self) -> list[str]: ...

    def close(self) -> None: ...


class CommitActions:
    """What both backends' transactions keep for after the commit (Transaction.after_commit)."""

    _committed_actions: tuple[Callable[[], None], ...] = ()  # few, and mostly none

    def after_commit(self, action: Callable[[], None]) -> None:
        self._committed_actions = (*self._committed_actions, action)

    def run_committed_actions(self) -> None:
        """Called by the Database once the commit is done and the connection given back."""
        for action in self._committed_actions:
            action()


def raise_unavailable(error: Exception) -> NoReturn:
    """Log one line saying what failed, and raise the domain's retryable storage error."""
    log.warning("storage unavailable: %s: %s", type(error).__name__, " ".join(str(error).split())[:300])
    raise StorageUnavailable() from error
