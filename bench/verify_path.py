"""Where one Verify's time goes, without gRPC: the domain call against PostgreSQL, piece by piece.

    .venv/bin/python bench/verify_path.py [--calls N --threads 1,4,16 --database-url URL]

In one process, on a fresh schema (dropped at the end): enrolls users through
the use cases (twofactor_server.usecases: Enrollment, Verification), then times

  - Verification.verify with a correct code, and the SQL statements it runs
    (each is a round trip to PostgreSQL; a transaction's BEGIN and COMMIT go with its
    first and hot_last statements, or alone when those are not prepared HotStatements);
  - its parts: a bare round trip (also on an AsyncConnection, as a grpc.aio
    server would make it), a committed one-row UPDATE (the WAL flush),
    decrypting the TOTP secret, and matching the code;
  - two sketches of the accepted path with fewer round trips (a read, then one
    conditional UPDATE in autocommit; or that UPDATE alone, with the sealed
    secret cached), to size what fewer round trips would give. They are not
    the server's code;
  - Verification.verify from several threads at once (the GIL, the pool and the
    WAL flush shared), still without gRPC.

Each user gets its own clock that moves 30 s per call, so every call carries a
fresh code for a newer TOTP step and is accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pyotp
from loadgen import CpuMeter

from twofactor_server.domain import totp
from twofactor_server.domain.keyring import TOTP_SECRET, Keyring
from twofactor_server.domain.models import Caller, VerifyResult
from twofactor_server.settings import PolicySettings
from twofactor_server.storage.database import PostgresDatabase
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import Challenges
from twofactor_server.usecases.enrollment import Enrollment
from twofactor_server.usecases.notices import Notices
from twofactor_server.usecases.verification import Verification

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
START = 1_900_000_000.0
CALLER = Caller(actor="bench", request_id="bench")


class NoDispatch:
    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        raise AssertionError("the bench sends no email or SMS")


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class CountingDatabase:
    """Wraps the real database and counts the statements each transaction runs."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db
        self.dialect = db.dialect
        self.count = 0
        self.transactions = 0

    @contextmanager
    def transaction(self, *, snapshot: bool = False) -> Iterator[Any]:
        self.transactions += 1
        with self._db.transaction(snapshot=snapshot) as tx:
            yield _CountingTransaction(tx, self)

    @contextmanager
    def statements(self) -> Iterator[Any]:
        with self._db.statements() as tx:
            yield _CountingTransaction(tx, self)

    def __getattr__(self, name: str) -> Any:  # everything else (unavailable, ping...) as the real one
        return getattr(self._db, name)


class _CountingTransaction:
    def __init__(self, tx: Any, owner: CountingDatabase) -> None:
        self._tx = tx
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._tx, name)
        if name not in ("execute", "one", "all", "hot_row", "hot_rows", "hot_last"):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._owner.count += 1
            return attribute(*args, **kwargs)

        return counted


class User:
    """An enrolled user with a clock of its own, so each call can send a newer step's code."""

    def __init__(self, db: Any, keyring: Keyring, user_id: str) -> None:
        self.clock = Clock()
        policy = PolicySettings()
        challenges = Challenges(db, keyring, policy, NoDispatch(), self.clock)
        notices = Notices(db, keyring, policy, NoDispatch(), self.clock)
        backup_codes = BackupCodes(db, keyring, policy, notices, self.clock)
        enrollment = Enrollment(db, keyring, policy, challenges, backup_codes, notices, self.clock)
        self.verification = Verification(db, keyring, policy, challenges, backup_codes, notices, self.clock)
        self.user_id = user_id
        setup = enrollment.start_enrollment(
            user_id, "authenticator", account_name="", locale="", verification_token="", caller=CALLER
        ).authenticator
        assert setup is not None
        self.hotp = pyotp.HOTP(setup.secret_base32)
        step = totp.time_step(self.clock.now)
        assert enrollment.confirm_enrollment(
            user_id, "authenticator", self.hotp.at(step), caller=CALLER
        ).confirmed

    def next_code(self) -> str:
        self.clock.now += totp.STEP_SECONDS
        return self.hotp.at(totp.time_step(self.clock.now))

    def verify(self) -> None:
        outcome = self.verification.verify(self.user_id, self.next_code(), caller=CALLER)
        if outcome.result != VerifyResult.ACCEPTED:
            raise RuntimeError(f"verify was not accepted: {outcome.result}")


def timed(calls: int, action: Callable[[], object]) -> str:
    """Median wall time per call; mean CPU per call of this process and of PostgreSQL (microseconds)."""
    samples = []
    meter = CpuMeter(os.getpid(), [])
    before = meter.snapshot()
    for _ in range(calls):
        t0 = time.perf_counter()
        action()
        samples.append(time.perf_counter() - t0)
    return describe(samples, before, meter.snapshot())


def describe(samples: list[float], before: dict[str, float], after: dict[str, float]) -> str:
    ours, postgres = ((after[key] - before[key]) / len(samples) * 1e6 for key in ("server", "postgres"))
    wall = statistics.median(samples) * 1e6
    return f"{wall:7.1f} us wall, CPU {ours:6.1f} us here + {postgres:6.1f} us in PostgreSQL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement (default 2000)")
    parser.add_argument("--threads", default="1,4,16", help="thread counts for the concurrent part")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each concurrent measurement")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    args = parser.parse_args(argv)
    thread_counts = [int(n) for n in args.threads.split(",") if n.strip()]
    if not (1 <= args.calls <= 100_000 and all(1 <= n <= 64 for n in thread_counts) and args.seconds <= 60):
        parser.error("need 1-100000 calls, 1-64 threads, at most 60 seconds")

    schema = f"tf_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    db = PostgresDatabase(
        f"{args.database_url}?options=-csearch_path%3D{schema}", pool_size=max(thread_counts)
    )
    try:
        db.migrate()
        run(db, args, thread_counts)
    finally:
        db.close()
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


def run(db: PostgresDatabase, args: argparse.Namespace, thread_counts: list[int]) -> None:
    keyring = Keyring.parse(Keyring.new_key_spec(1))
    counting = CountingDatabase(db)
    user = User(counting, keyring, "bench-path-0")
    user.verify()  # warm up: prepared statements, pool connection
    counting.count = 0
    counting.transactions = 0
    print(f"Verification.verify, 1 thread:          {timed(args.calls, user.verify)}")
    per_call = counting.count / args.calls
    begins = 2 * counting.transactions / args.calls
    print(f"  statements per call: {per_call:.0f} in {begins / 2:.0f} transactions")

    with db._pool.connection() as conn:  # the bench looks under the hood; the server never does this
        conn.autocommit = True
        print(
            f"  one round trip (SELECT 1):            {timed(args.calls, lambda: conn.execute('SELECT 1'))}"
        )
        update = "UPDATE users SET last_verified_at = %(t)s WHERE user_id = %(u)s"
        params = {"t": 0, "u": user.user_id}
        flush = timed(args.calls, lambda: conn.execute(update, params))
        print(f"  committed one-row UPDATE (WAL flush): {flush}")
        blob = conn.execute(
            "SELECT secret FROM methods WHERE user_id = %(u)s", {"u": user.user_id}
        ).fetchone()
        conn.autocommit = False
    assert blob is not None

    print(f"  one round trip, AsyncConnection:      {async_round_trip(args.database_url, args.calls)}")

    def decrypt() -> bytes:
        return keyring.decrypt(blob["secret"], purpose=TOTP_SECRET, user_id=user.user_id)

    secret = decrypt()
    code = user.hotp.at(totp.time_step(START))
    print(f"  decrypt the TOTP secret (AES-GCM):    {timed(args.calls, decrypt)}")
    match = timed(args.calls, lambda: totp.matching_step(secret, code, START))
    print(f"  match the code (3 HOTP, pyotp):       {match}")

    two_trips = TwoRoundTrips(db, keyring, user)
    two_trips.verify()
    print(f"sketch: the same in 2 round trips:      {timed(args.calls, two_trips.verify)}")
    one_trip = OneRoundTrip(db, keyring, user)
    one_trip.verify()
    print(f"sketch: 1 round trip, secret cached:    {timed(args.calls, one_trip.verify)}")

    print(f"TwoFactor.verify from several threads, {args.seconds:g} s each (pool size {max(thread_counts)}):")
    for threads in thread_counts:
        users = [User(db, keyring, f"bench-path-{threads}-{i}") for i in range(threads)]
        rate, p50, cpu_share = concurrent(users, args.seconds)
        print(
            f"  {threads:3d} threads: {rate:7.0f} calls/s   p50 {p50 / 1000:6.2f} ms   "
            f"this process {cpu_share:3.0f}% CPU"
        )


def async_round_trip(url: str, calls: int) -> str:
    """`SELECT 1` on a psycopg AsyncConnection under asyncio: what a grpc.aio server would pay per trip."""

    async def measure() -> str:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("SELECT 1")
            samples = []
            meter = CpuMeter(os.getpid(), [])
            before = meter.snapshot()
            for _ in range(calls):
                t0 = time.perf_counter()
                await conn.execute("SELECT 1")
                samples.append(time.perf_counter() - t0)
            return describe(samples, before, meter.snapshot())

    return asyncio.run(measure())


def concurrent(users: list[User], seconds: float) -> tuple[float, float, float]:
    latencies: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def loop(user: User) -> None:
        mine = []
        while time.monotonic() < end:
            t0 = time.perf_counter()
            user.verify()
            mine.append((time.perf_counter() - t0) * 1e6)
        with lock:
            latencies.extend(mine)

    cpu = time.process_time()
    began = time.monotonic()
    workers = [threading.Thread(target=loop, args=(user,)) for user in users]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    took = time.monotonic() - began
    return len(latencies) / took, statistics.median(latencies), (time.process_time() - cpu) / took * 100


# The accepted-code path: advance the step, clear failures, count backup codes left. The
# conditions keep the rules that the locking transaction keeps today: a step is accepted once
# (`totp_last_step <`), a locked user is refused, and the authenticator is still the enrolled one.
ACCEPT = (
    "UPDATE users SET totp_last_step = %(s)s, failed_attempts = 0, locked_until = NULL, "
    "last_verified_at = %(now)s "
    "WHERE user_id = %(u)s AND (totp_last_step IS NULL OR totp_last_step < %(s)s) "
    "AND (locked_until IS NULL OR locked_until <= %(now)s) AND failed_attempts < %(max)s "
    "AND EXISTS (SELECT 1 FROM methods m WHERE m.user_id = users.user_id AND m.method = 'authenticator' "
    "AND m.enabled_at IS NOT NULL AND m.secret = %(blob)s) "
    "RETURNING (SELECT COUNT(*) FROM backup_codes b WHERE b.user_id = %(u)s AND b.used_at IS NULL) "
    "AS backup_codes_left"
)


class TwoRoundTrips:
    """Not the server's code: Verify's accepted path in two autocommit statements.

    1. Read the user's lock state and authenticator secret in one query (no BEGIN, no row lock).
    2. Match the code in Python, then ACCEPT: one conditional UPDATE whose row count says
       whether this call won. A wrong code (no matching step, or ACCEPT touching no row)
       would take today's locking transaction to count the failure; that path is rare.
    """

    READ = (
        "SELECT u.failed_attempts, u.locked_until, m.secret FROM users u "
        "JOIN methods m ON m.user_id = u.user_id AND m.method = 'authenticator' "
        "AND m.enabled_at IS NOT NULL WHERE u.user_id = %(u)s"
    )

    def __init__(self, db: PostgresDatabase, keyring: Keyring, user: User) -> None:
        self._db = db
        self._keyring = keyring
        self._user = user

    def verify(self) -> None:
        code = self._user.next_code()
        now = self._user.clock.now
        with self._db._pool.connection() as conn:
            conn.autocommit = True
            try:
                row = conn.execute(self.READ, {"u": self._user.user_id}).fetchone()
                assert row is not None
                secret = self._keyring.decrypt(row["secret"], purpose=TOTP_SECRET, user_id=self._user.user_id)
                step = totp.matching_step(secret, code, now)
                params = {
                    "u": self._user.user_id,
                    "s": step,
                    "now": int(now * 1000),
                    "max": 100,
                    "blob": row["secret"],
                }
                accepted = conn.execute(ACCEPT, params).fetchone()
            finally:
                conn.autocommit = False
        if accepted is None:
            raise RuntimeError("the sketch did not accept the code")


class OneRoundTrip:
    """Not the server's code: as TwoRoundTrips, with the sealed secret kept in memory after the first read.

    Only ACCEPT goes to the database. Its `m.secret = <cached ciphertext>` condition makes a
    stale cache (re-enrolled, reset or disabled authenticator) fail safe: no row is touched,
    and the server would fall back to reading the user afresh.
    """

    def __init__(self, db: PostgresDatabase, keyring: Keyring, user: User) -> None:
        self._db = db
        self._keyring = keyring
        self._user = user
        with db._pool.connection() as conn:
            row = conn.execute(TwoRoundTrips.READ, {"u": user.user_id}).fetchone()
        assert row is not None
        self._blob = row["secret"]

    def verify(self) -> None:
        code = self._user.next_code()
        now = self._user.clock.now
        secret = self._keyring.decrypt(self._blob, purpose=TOTP_SECRET, user_id=self._user.user_id)
        step = totp.matching_step(secret, code, now)
        params = {"u": self._user.user_id, "s": step, "now": int(now * 1000), "max": 100, "blob": self._blob}
        with self._db._pool.connection() as conn:
            conn.autocommit = True
            try:
                accepted = conn.execute(ACCEPT, params).fetchone()
            finally:
                conn.autocommit = False
        if accepted is None:
            raise RuntimeError("the sketch did not accept the code")


if __name__ == "__main__":
    sys.exit(main())
