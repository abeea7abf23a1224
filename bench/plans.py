"""The query plans of the hot statements, as the product runs them, on a populated schema.

    .venv/bin/python bench/plans.py --users 1000000 [--database-url URL]   # populates, explains, drops

Runs the use cases in this process (twofactor_server.usecases: Verification,
Challenges, Enrollment, OutboxRecovery) against the schema, through a database
wrapper that, before each statement the product sends, runs it under
`EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)` inside a savepoint (or a transaction of
its own in autocommit) and rolls that back; then runs the statement itself. So
the plans are those of the product's own SQL text, with real parameters, at the
population's size. Prints each operation's statements with their plans, and
flags any sequential scan of a table.

bench/suite.py --population N --plans calls `explain_all` on its schema before
dropping it.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pyotp
from populate import (
    DEFAULT_DATABASE_URL,
    PopulatedUser,
    Population,
    email_indices,
    migrate,
    populate,
    print_sizes,
    schema_url,
    spread,
)
from psycopg import sql
from psycopg.pq import TransactionStatus

from twofactor_server.delivery.recovery import OutboxRecovery
from twofactor_server.domain import totp
from twofactor_server.domain.keyring import Keyring
from twofactor_server.domain.models import Caller, VerifyResult
from twofactor_server.settings import PolicySettings
from twofactor_server.storage.database import PostgresDatabase
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import Challenges
from twofactor_server.usecases.enrollment import Enrollment
from twofactor_server.usecases.notices import Notices
from twofactor_server.usecases.verification import Verification

CALLER = Caller(actor="bench", request_id="bench-plans")


@dataclass
class Explained:
    sql: str
    plan: list[str]

    @property
    def seq_scans(self) -> list[str]:
        return [line.strip() for line in self.plan if "Seq Scan" in line]


@dataclass
class Recorder:
    """The statements of the operation under way, each with its plan."""

    operation: str = ""
    seen: dict[str, list[Explained]] = field(default_factory=dict)

    def explain(self, conn: psycopg.Connection[Any], statement: str, params: Any) -> None:
        if any(e.sql == statement for e in self.seen.setdefault(self.operation, [])):
            return
        # A savepoint inside the use case's transaction, BEGIN outside one, rolled back through
        # libpq as the product ends its transactions: a ROLLBACK that psycopg saw would make it
        # send DEALLOCATE ALL, dropping the product's prepared statements mid-transaction.
        inside = conn.pgconn.transaction_status != TransactionStatus.IDLE
        conn.pgconn.exec_(b"SAVEPOINT twofactor_explain" if inside else b"BEGIN")
        try:
            rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {statement}", params).fetchall()
        except psycopg.Error as error:
            rows = [{"QUERY PLAN": f"(not explained: {type(error).__name__}: {error})"}]
        finally:
            conn.pgconn.exec_(b"ROLLBACK TO SAVEPOINT twofactor_explain" if inside else b"ROLLBACK")
        self.seen[self.operation].append(Explained(statement, [str(next(iter(r.values()))) for r in rows]))


class ExplainingDatabase:
    """The real database; every statement is explained (and rolled back) before it runs."""

    def __init__(self, db: PostgresDatabase, recorder: Recorder) -> None:
        self._db = db
        self._recorder = recorder
        self.dialect = db.dialect
        self.unavailable = db.unavailable

    @contextmanager
    def transaction(self, *, snapshot: bool = False) -> Iterator[Any]:
        with self._db.transaction(snapshot=snapshot) as tx:
            yield _ExplainingTransaction(tx, self._recorder)

    @contextmanager
    def statements(self) -> Iterator[Any]:
        with self._db.statements() as tx:
            yield _ExplainingTransaction(tx, self._recorder)


class _ExplainingTransaction:
    def __init__(self, tx: Any, recorder: Recorder) -> None:
        self._tx = tx
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._tx, name)
        if name not in ("execute", "one", "all", "hot_row", "hot_rows"):
            return attribute

        def explained(statement: Any, params: Any = None) -> Any:
            text = statement if isinstance(statement, str) else statement.sql  # a HotStatement's SQL
            self._recorder.explain(self._tx._cursor.connection, text, params)  # under the hood
            return attribute(statement, params)

        return explained


class FixedClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def explain_all(
    database_url: str, keys: str, user: PopulatedUser, email_user: PopulatedUser
) -> dict[str, list[Explained]]:
    """Run each hot operation once through the use cases, explaining its statements."""
    keyring = Keyring.parse(keys)
    recorder = Recorder()
    real = PostgresDatabase(database_url, pool_size=2)
    db = ExplainingDatabase(real, recorder)
    # A clock ahead of the wall clock: the sampled users' codes for these steps are still unused.
    clock = FixedClock(time.time() + 3600)
    policy = PolicySettings(resend_cooldown_seconds=0)
    sent: list[str] = []

    class Recording:
        def dispatch(self, challenge_id: str, *, method: str = "") -> None:
            sent.append(challenge_id)

    challenges = Challenges(db, keyring, policy, Recording(), clock)  # type: ignore[arg-type]
    notices = Notices(db, keyring, policy, Recording(), clock)  # type: ignore[arg-type]
    backup = BackupCodes(db, keyring, policy, notices, clock)  # type: ignore[arg-type]
    verification = Verification(db, keyring, policy, challenges, backup, notices, clock)  # type: ignore[arg-type]
    enrollment = Enrollment(db, keyring, policy, challenges, backup, notices, clock)  # type: ignore[arg-type]
    try:
        hotp = pyotp.HOTP(user.secret_base32)
        recorder.operation = "Verify, accepted (authenticator code)"
        outcome = verification.verify(user.user_id, hotp.at(totp.time_step(clock.now)), caller=CALLER)
        assert outcome.result == VerifyResult.ACCEPTED, outcome
        recorder.operation = "Verify, rejected (wrong authenticator code)"
        clock.now += 30
        wrong = hotp.at(totp.time_step(clock.now) + 10)
        assert verification.verify(user.user_id, wrong, caller=CALLER).result == VerifyResult.REJECTED
        recorder.operation = "SendCode (email): limits, insert, publish"
        challenges.send_code(email_user.user_id, "email", idempotency_key="", locale="en", caller=CALLER)
        recorder.operation = "Outbox recovery round"
        OutboxRecovery(db, lambda *_: None, recovery_seconds=10.0, clock=clock).run_once()  # type: ignore[arg-type]
        recorder.operation = "Enrollment: StartEnrollment + ConfirmEnrollment (authenticator)"
        new_user = f"plans-{uuid.uuid4().hex[:12]}"
        setup = enrollment.start_enrollment(
            new_user, "authenticator", account_name="", locale="", verification_token="", caller=CALLER
        ).authenticator
        assert setup is not None
        code = pyotp.TOTP(setup.secret_base32).at(clock.now)
        assert enrollment.confirm_enrollment(new_user, "authenticator", code, caller=CALLER).confirmed
    finally:
        real.close()
    return recorder.seen


def print_plans(seen: dict[str, list[Explained]]) -> int:
    """Print every operation's statements and plans; return the number of sequential scans."""
    scans = 0
    for operation, statements in seen.items():
        print(f"\n### {operation}: {len(statements)} distinct statements")
        for explained in statements:
            print(f"\n{' '.join(explained.sql.split())}")
            for line in explained.plan:
                print(f"    {line}")
            for scan in explained.seq_scans:
                scans += 1
                print(f"  !! sequential scan: {scan}")
    print(f"\nsequential scans: {scans}")
    return scans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    args = parser.parse_args(argv)
    schema = f"tf_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    url = schema_url(args.database_url, schema)
    try:
        migrate(url)
        population = Population(
            args.users, prefix="plans-", keys=Keyring.new_key_spec(1), now_ms=int(time.time() * 1000)
        )
        middle = spread(args.users, 1)[0] + args.users // 2
        mail = list(email_indices(population))
        mail_user = mail[len(mail) // 2]
        kept = populate(url, population, keep={middle, mail_user}, processes=args.processes, progress=True)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        print_sizes(args.database_url, schema, args.users)
        by_index = {u.index: u for u in kept}
        print_plans(explain_all(url, population.keys, by_index[middle], by_index[mail_user]))
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
