"""HotStatement: a statement on the hottest path (the accepted Verify), run without psycopg's cursor.

Through Cursor.execute a statement costs the server about 130,000 instructions of Python (query
conversion, parameter dumping, the row maker) against about 20,000 this way: prepared by name
once per connection, its parameters sent as text, its one row read as integers
(docs/benchmarks.md). Errors are psycopg's, as the cursor would raise them, so database.py maps
them as it maps every other statement's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg.pq import ConnStatus, DiagnosticField, ExecStatus
from psycopg.pq.abc import PGconn, PGresult

_INT8_OID = 20
_NO_SUCH_PREPARED_STATEMENT = b"26000"  # invalid_sql_statement_name


@dataclass(frozen=True)
class HotStatement:
    """Written with the same `%(name)s` placeholders as every statement; PostgreSQL gets `$n`."""

    name: str  # the prepared statement's name on each connection; unique per statement
    sql: str
    param_names: tuple[str, ...] = field(init=False)
    postgres_sql: bytes = field(init=False)
    wire_name: bytes = field(init=False)  # `name` as libpq takes it

    def __post_init__(self) -> None:
        names: list[str] = []

        def positional(match: re.Match[str]) -> str:
            if match[1] not in names:
                names.append(match[1])
            return f"${names.index(match[1]) + 1}"

        object.__setattr__(self, "postgres_sql", re.sub(r"%\((\w+)\)s", positional, self.sql).encode())
        object.__setattr__(self, "param_names", tuple(names))
        object.__setattr__(self, "wire_name", self.name.encode())


class PreparingConnection(Protocol):
    """A psycopg connection that remembers which HotStatements it prepared."""

    hot_prepared: frozenset[str]

    @property
    def pgconn(self) -> PGconn: ...

    @property
    def info(self) -> Any: ...


def run_as_query(
    one: Callable[[str, Mapping[str, Any]], Mapping[str, Any] | None],
    statement: HotStatement,
    params: Mapping[str, Any],
) -> tuple[int, ...] | None:
    """`statement` through a transaction's ordinary `one` (SQLite, or PostgreSQL inside BEGIN),
    its row read as run_prepared reads it; the parameters checked as run_prepared would send
    them (str, int, None), on either backend alike."""
    for name in statement.param_names:
        _as_text(params[name])
    row = one(statement.sql, params)
    return None if row is None else tuple(int(value) for value in row.values())


def run_prepared(
    conn: PreparingConnection, statement: HotStatement, params: Mapping[str, Any]
) -> tuple[int, ...] | None:
    """Run `statement` on `conn`, outside any transaction block (a failed statement is sent
    again once prepared: inside BEGIN it could not be); its first row's values, integers and
    never NULL, or None when it returns no row.

    libpq's blocking calls release the GIL and wait on the socket, so the deadline watchdog's
    shutdown (deadlines.py) wakes them as it wakes psycopg's own waits."""
    pgconn = conn.pgconn
    values = [_as_text(params[name]) for name in statement.param_names]
    name = statement.wire_name
    if statement.name in conn.hot_prepared:
        result = pgconn.exec_prepared(name, values)  # type: ignore[arg-type]  # None: NULL
        if (
            result.status == ExecStatus.FATAL_ERROR
            and result.error_field(DiagnosticField.SQLSTATE) == _NO_SUCH_PREPARED_STATEMENT
        ):
            # psycopg's upkeep of its own prepared statements sends DEALLOCATE ALL after a
            # ROLLBACK or a DROP on this connection, which drops ours too: prepare it again.
            conn.hot_prepared = conn.hot_prepared - {statement.name}
    if statement.name not in conn.hot_prepared:
        # ints typed int8 (an INSERT ... SELECT can't infer them); text left for the server to infer
        types = [_INT8_OID if isinstance(params[key], int) else 0 for key in statement.param_names]
        _check(conn, pgconn.prepare(name, statement.postgres_sql, types), ExecStatus.COMMAND_OK)
        conn.hot_prepared = conn.hot_prepared | {statement.name}
        result = pgconn.exec_prepared(name, values)  # type: ignore[arg-type]
    _check(conn, result, ExecStatus.TUPLES_OK)
    if result.ntuples == 0:
        return None
    return tuple(int(result.get_value(0, column)) for column in range(result.nfields))  # type: ignore[arg-type]


def _as_text(value: object) -> bytes | None:
    if type(value) is int:  # the common case first, by exact type (a bool is an int too)
        return b"%d" % value
    if isinstance(value, str):
        return value.encode()
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value
    raise TypeError(f"a HotStatement parameter must be str, int or None, not {type(value).__name__}")


def _check(conn: PreparingConnection, result: PGresult, expected: ExecStatus) -> None:
    """Raise what psycopg's cursor would for a failed libpq call: OperationalError for a lost
    connection, the SQLSTATE's class (DeadlockDetected, ...) for an error of the statement."""
    if result.status == expected:
        return
    if conn.pgconn.status == ConnStatus.BAD:
        message = conn.pgconn.error_message.decode(errors="replace").strip()
        raise psycopg.OperationalError(message or "connection lost")
    raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
