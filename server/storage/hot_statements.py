"""HotStatement: a statement on a hot path (Verify, SendCode, a confirmed enrollment, the worker's
claim and record), run without psycopg's cursor.

Through Cursor.execute a statement costs the server about 130,000 instructions of Python (query
conversion, parameter dumping, the row maker) against about 20,000 this way: prepared by name
once per connection, its parameters sent as text (bytes as binary bytea), its rows read by
each column's type (docs/benchmarks.md). Errors are psycopg's, as the cursor would raise them,
so database.py maps them as it maps every other statement's.

A statement runs prepared inside a transaction block as outside one. psycopg follows a ROLLBACK,
DROP or ALTER that it sees, on a connection where it prepared statements of its own, with
DEALLOCATE ALL, which would drop ours too: database.py sends BEGIN, COMMIT and ROLLBACK through
libpq, out of psycopg's sight, and forgets the prepared names after migrations.
"""

from __future__ import annotations

import contextlib
import re
import select
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg.pq import ConnStatus, DiagnosticField, Escaping, ExecStatus, TransactionStatus
from psycopg.pq.abc import PGconn, PGresult

_BYTEA_OID, _INT8_OID = 17, 20
_NO_SUCH_PREPARED_STATEMENT = b"26000"  # invalid_sql_statement_name
_PREPARED_ALREADY = b"42P05"  # duplicate_prepared_statement


# A result column's type (OID) -> its value from PostgreSQL's text output.
_FROM_TEXT: dict[int, Callable[[bytes], Any]] = {
    16: lambda text: text == b"t",  # bool
    17: Escaping().unescape_bytea,  # bytea, in either output format (hex, escape), as libpq reads it
    20: int,  # int8
    21: int,  # int2
    23: int,  # int4
    25: bytes.decode,  # text
    1043: bytes.decode,  # varchar
    2278: lambda _: None,  # void: a function called for what it does (a lock), not what it returns
}


@dataclass(frozen=True)
class HotStatement:
    """Written with the same `%(name)s` placeholders as every statement; PostgreSQL gets `$n`.
    Parameters are str, int or None; those named in `binary` are bytes (or None), sent as bytea."""

    name: str  # the prepared statement's name on each connection; unique per statement
    sql: str
    binary: frozenset[str] = frozenset()
    param_names: tuple[str, ...] = field(init=False)
    postgres_sql: bytes = field(init=False)
    wire_name: bytes = field(init=False)  # `name` as libpq takes it
    param_formats: tuple[int, ...] | None = field(init=False)  # None: every parameter as text

    def __post_init__(self) -> None:
        names: list[str] = []

        def positional(match: re.Match[str]) -> str:
            if match[1] not in names:
                names.append(match[1])
            return f"${names.index(match[1]) + 1}"

        object.__setattr__(self, "postgres_sql", re.sub(r"%\((\w+)\)s", positional, self.sql).encode())
        object.__setattr__(self, "param_names", tuple(names))
        object.__setattr__(self, "wire_name", self.name.encode())
        if not self.binary <= set(names):
            raise ValueError(f"{self.name}: binary names no parameter: {sorted(self.binary - set(names))}")
        formats = tuple(1 if name in self.binary else 0 for name in names) if self.binary else None
        object.__setattr__(self, "param_formats", formats)

    def wire_values(self, params: Mapping[str, Any]) -> list[bytes | None]:
        """The parameters as libpq sends them, in `$n` order; TypeError for a value of another type."""
        if self.param_formats is None:
            # An int, the commonest parameter, encoded in place: a call per value would cost more.
            return [
                b"%d" % value if type(value) is int else _as_text(value)
                for value in map(params.__getitem__, self.param_names)
            ]
        return [
            _as_binary(params[name]) if binary else _as_text(params[name])
            for name, binary in zip(self.param_names, self.param_formats, strict=True)
        ]


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
) -> tuple[Any, ...] | None:
    """`statement` through a transaction's ordinary `one` (SQLite); its first row's values as the
    driver gives them, or None; the parameters checked as run_prepared would send them, so a
    wrong type fails on either backend alike."""
    statement.wire_values(params)
    row = one(statement.sql, params)
    return None if row is None else tuple(row.values())


def run_as_query_rows(
    all_rows: Callable[[str, Mapping[str, Any]], Sequence[Mapping[str, Any]]],
    statement: HotStatement,
    params: Mapping[str, Any],
) -> list[tuple[Any, ...]]:
    """run_as_query for every row (a transaction's ordinary `all`)."""
    statement.wire_values(params)
    return [tuple(row.values()) for row in all_rows(statement.sql, params)]


def run_prepared(
    conn: PreparingConnection,
    statement: HotStatement,
    params: Mapping[str, Any],
    *,
    begin: bool = False,
    commit: bool = False,
) -> tuple[Any, ...] | None:
    """Run `statement` on `conn` (run_prepared_rows); its first row's values, or None when it
    returns no row (or none at all: an INSERT without RETURNING). With `commit` always None: no
    one reads what goes with COMMIT (hot_last), where a row read could only fail a committed block."""
    result = _run(conn, statement, params, begin, commit)
    return None if commit or result is None or result.ntuples == 0 else _row(statement, result, 0)


def run_prepared_rows(
    conn: PreparingConnection,
    statement: HotStatement,
    params: Mapping[str, Any],
    *,
    begin: bool = False,
    commit: bool = False,
) -> list[tuple[Any, ...]]:
    """Run `statement` on `conn`, in a transaction block or outside one; every row's values
    (int, bool, str, bytes, None for NULL), in the order the statement gives them. With `begin`,
    BEGIN first opens the block; with `commit`, COMMIT then ends it (an error if the block did
    not commit, as database.py's COMMIT raises). Once the connection has the statement prepared,
    they go in one round trip with it (_pipelined).

    The record of what is prepared (conn.hot_prepared) and the server's can part only by a
    DEALLOCATE or DISCARD that we don't send: psycopg's, after DDL or a savepoint's rollback it
    saw on the connection (none of which the service runs on a pooled connection), or anyone's.
    A statement the server no longer knows makes the whole record go (whatever dropped it may
    have dropped the others), and one it knows already is recorded; outside a transaction block
    the call then goes on, inside one the error stands, as the block is aborted
    (database.py answers it UNAVAILABLE: a retry finds the record right).

    libpq's blocking calls (PQexec, PQprepare, PQexecPrepared) release the GIL and wait on the
    socket, so the deadline watchdog's shutdown (deadlines.py) wakes them as it wakes psycopg's
    own waits; the pipeline waits likewise, on its own (_pipeline_result)."""
    result = _run(conn, statement, params, begin, commit)
    return [] if result is None else [_row(statement, result, index) for index in range(result.ntuples)]


def _run(
    conn: PreparingConnection,
    statement: HotStatement,
    params: Mapping[str, Any],
    begin: bool = False,
    commit: bool = False,
) -> PGresult | None:
    """The statement's result with its rows, or None for a statement that returns none."""
    values = statement.wire_values(params)
    if (begin or commit) and statement.name in conn.hot_prepared:
        return _pipelined(conn, statement, values, begin, commit)
    if begin:
        begin_block(conn)  # the statement is prepared first, below
    result = _run_alone(conn, statement, params, values)
    if commit:
        commit_block(conn)
    return result


def _run_alone(
    conn: PreparingConnection, statement: HotStatement, params: Mapping[str, Any], values: list[bytes | None]
) -> PGresult | None:
    pgconn = conn.pgconn
    name = statement.wire_name
    formats = statement.param_formats
    if statement.name in conn.hot_prepared:
        result = pgconn.exec_prepared(name, values, formats)  # type: ignore[arg-type]  # None: NULL
        if (
            result.status == ExecStatus.FATAL_ERROR
            and result.error_field(DiagnosticField.SQLSTATE) == _NO_SUCH_PREPARED_STATEMENT
        ):
            conn.hot_prepared = frozenset()
            if pgconn.transaction_status != TransactionStatus.IDLE:
                _check(conn, result, ExecStatus.TUPLES_OK)  # raises: the block is aborted
    if statement.name not in conn.hot_prepared:
        # ints typed int8 (an INSERT ... SELECT can't infer them), bytes bytea; text left for
        # the server to infer from where the parameter stands
        types = [
            _BYTEA_OID if key in statement.binary else _INT8_OID if isinstance(params[key], int) else 0
            for key in statement.param_names
        ]
        prepared = pgconn.prepare(name, statement.postgres_sql, types)
        if (
            prepared.status == ExecStatus.FATAL_ERROR
            and prepared.error_field(DiagnosticField.SQLSTATE) == _PREPARED_ALREADY
        ):  # prepared before its record was written (an interrupt between the two): recorded now
            conn.hot_prepared = conn.hot_prepared | {statement.name}
            if pgconn.transaction_status != TransactionStatus.IDLE:
                _check(conn, prepared, ExecStatus.COMMAND_OK)  # raises: the block is aborted
        else:
            _check(conn, prepared, ExecStatus.COMMAND_OK)
            conn.hot_prepared = conn.hot_prepared | {statement.name}
        result = pgconn.exec_prepared(name, values, formats)  # type: ignore[arg-type]
    return _rows_or_none(conn, result)


def _rows_or_none(conn: PreparingConnection, result: PGresult) -> PGresult | None:
    status = result.status
    if status == ExecStatus.TUPLES_OK:
        return result
    if status == ExecStatus.COMMAND_OK:  # a statement that returns no rows (no RETURNING)
        return None
    _check(conn, result, ExecStatus.TUPLES_OK)  # raises
    return result


def _pipelined(
    conn: PreparingConnection, statement: HotStatement, values: list[bytes | None], begin: bool, commit: bool
) -> PGresult | None:
    """BEGIN, the prepared statement and COMMIT (either or both) in one round trip, through
    libpq's pipeline mode: a transaction's first statement doesn't wait for BEGIN's answer, nor
    COMMIT for its last one's (SendCode: 4 round trips to PostgreSQL instead of 6). Errors are
    raised in the order the server met them; a statement the server no longer knows clears the
    connection's record (run_prepared_rows), and its error stands, as inside any block."""
    pgconn = conn.pgconn
    pgconn.enter_pipeline_mode()
    try:
        if begin:
            pgconn.send_query_params(b"BEGIN", None)
        pgconn.send_query_prepared(statement.wire_name, values, statement.param_formats)
        if commit:
            pgconn.send_query_params(b"COMMIT", None)
        pgconn.pipeline_sync()
        _flush(pgconn)
        began = _pipeline_result(pgconn) if begin else None
        result = _pipeline_result(pgconn)
        committed = _pipeline_result(pgconn) if commit else None
        # The session may end before the pipeline's end (a FATAL error or the socket closed). A
        # block whose COMMIT was answered committed all the same: its rows are read, and the
        # connection, left in pipeline mode, is not pooled (database.py). Others raise its error.
        done = result is not None and committed is not None and committed.command_status == b"COMMIT"
        try:
            synced = _pipeline_result(pgconn)
        except psycopg.OperationalError:
            if not done:
                raise
            synced = None
        if done and (synced is None or synced.status != ExecStatus.PIPELINE_SYNC):
            return None if result is None else _rows_or_none(conn, result)
        if synced is not None and synced.status != ExecStatus.PIPELINE_SYNC:
            _check(conn, synced, ExecStatus.PIPELINE_SYNC)  # raises
    except BaseException:
        # Results may be left unread, and then libpq refuses to leave pipeline mode: the
        # connection stays in it, not IDLE, and database.py closes it instead of pooling it.
        # The error that got us here is the one raised.
        if pgconn.status == ConnStatus.OK and pgconn.pipeline_status:
            with contextlib.suppress(psycopg.Error):
                pgconn.exit_pipeline_mode()
        raise
    pgconn.exit_pipeline_mode()  # every result was read
    if result is None or synced is None or (begin and began is None) or (commit and committed is None):
        message = pgconn.error_message.decode(errors="replace").strip()
        raise psycopg.OperationalError(f"the connection ended a pipeline early: {message}")
    if began is not None:
        check_command(conn, began)  # raises if BEGIN failed (the statement was then not run)
    if (
        result.status == ExecStatus.FATAL_ERROR
        and result.error_field(DiagnosticField.SQLSTATE) == _NO_SUCH_PREPARED_STATEMENT
    ):
        conn.hot_prepared = frozenset()
    rows = _rows_or_none(conn, result)  # raises the statement's error (COMMIT was then not run)
    if committed is not None:
        _check_committed(conn, committed)
    return rows


def _pipeline_result(pgconn: PGconn) -> PGresult | None:
    """The pipeline's next result (and the None after a query's results), read once it has arrived:
    libpq's PQgetResult would wait for it holding the GIL, stopping every other thread. The wait
    here releases it, and ends when the deadline watchdog shuts the socket down (deadlines.py):
    consume_input then raises OperationalError."""
    while pgconn.is_busy():
        _wait_readable(pgconn.socket)
        pgconn.consume_input()
    result = pgconn.get_result()
    # After a query's result comes the None that ends its results (not after the sync's).
    if result is not None and result.status != ExecStatus.PIPELINE_SYNC and pgconn.get_result() is not None:
        raise psycopg.OperationalError("libpq pipeline: more than one result for a query")
    return result


def _wait_readable(fd: int) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.poll()


def _flush(pgconn: PGconn) -> None:
    """Send what the pipeline holds. psycopg's connections are non-blocking, so libpq may keep
    part of it until the socket takes more (a large statement, a full send buffer): without
    this the server would wait for the rest, and we for its answer, until the deadline. While
    waiting to write, what the server sends is read, so neither side's buffer stays full."""
    while pgconn.flush():  # 1: more to send
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN | select.POLLOUT)
        for _, events in poller.poll():
            if events & select.POLLIN:
                pgconn.consume_input()


def _row(statement: HotStatement, result: PGresult, index: int) -> tuple[Any, ...]:
    """Row `index` of `result`, each column read by its type."""
    row = []
    for column in range(result.nfields):
        value = result.get_value(index, column)
        if value is not None:
            convert = _FROM_TEXT.get(result.ftype(column))
            if convert is None:
                raise TypeError(f"{statement.name}: column {column + 1} has a type HotStatement can't read")
            value = convert(value)
        row.append(value)
    return tuple(row)


def _as_binary(value: object) -> bytes | None:
    if value is None or type(value) is bytes:
        return value
    raise TypeError(f"a binary HotStatement parameter must be bytes or None, not {type(value).__name__}")


def _as_text(value: object) -> bytes | None:
    if type(value) is int:  # the common case first, by exact type (a bool is an int too)
        return b"%d" % value
    if isinstance(value, str):
        # libpq would end the value at a NUL; the cursor refuses it. (Looked for in the str:
        # `b"\0" in bytes` first tries the needle as an integer, and pays for that TypeError.)
        if "\0" in value:
            raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        return value.encode()
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value
    raise TypeError(f"a HotStatement parameter must be str, int or None, not {type(value).__name__}")


def check_command(conn: PreparingConnection, result: PGresult) -> None:
    """Raise as the cursor would for a failed command sent through libpq (BEGIN, COMMIT)."""
    _check(conn, result, ExecStatus.COMMAND_OK)


def begin_block(conn: PreparingConnection) -> None:
    """BEGIN through libpq, as HotStatements run (psycopg's Transaction costs about 25 µs more of
    Python per transaction); a failure raised as psycopg's cursor would raise it."""
    check_command(conn, conn.pgconn.exec_(b"BEGIN"))


def commit_block(conn: PreparingConnection) -> None:
    """COMMIT through libpq (_check_committed: an error if the block did not commit)."""
    _check_committed(conn, conn.pgconn.exec_(b"COMMIT"))


def _check_committed(conn: PreparingConnection, result: PGresult) -> None:
    """COMMIT's result. A block that a failed statement aborted is rolled back by its COMMIT,
    without an error: if a unit of work ever swallowed that statement's error, raising here keeps
    it from counting as committed (its after-commit actions don't run)."""
    check_command(conn, result)
    if result.command_status != b"COMMIT":
        raise psycopg.errors.InFailedSqlTransaction(
            "rolled back at COMMIT: a statement in the transaction failed, and its error was not raised"
        )


def _check(conn: PreparingConnection, result: PGresult, expected: ExecStatus) -> None:
    """Raise what psycopg's cursor would for a failed libpq call: OperationalError for a lost
    connection, the SQLSTATE's class (DeadlockDetected, ...) for an error of the statement."""
    if result.status == expected:
        return
    if conn.pgconn.status == ConnStatus.BAD:
        message = conn.pgconn.error_message.decode(errors="replace").strip()
        raise psycopg.OperationalError(message or "connection lost")
    raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
