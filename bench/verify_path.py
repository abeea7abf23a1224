"""Where one Verify's time goes, without gRPC: the domain call against PostgreSQL, piece by piece.

    .venv/bin/python bench/verify_path.py [--calls N --threads 1,4,16 --database-url URL]

In one process, on a fresh schema (dropped at the end): enrolls users through
the domain (server.domain.service.TwoFactor), then times

  - TwoFactor.verify with a correct code, and the SQL statements it runs
    (each is a round trip to PostgreSQL, plus BEGIN and COMMIT);
  - its parts: a bare round trip, a committed one-row UPDATE (the WAL flush),
    decrypting the TOTP secret, and matching the code;
  - a sketch of the same state change in two round trips (read, then one
    conditional UPDATE in autocommit), to size what fewer round trips would give;
  - TwoFactor.verify from several threads at once (the GIL, the pool and the
    WAL flush shared), still without gRPC.

Each user gets its own clock that moves 30 s per call, so every call carries a
fresh code for a newer TOTP step and is accepted.
"""

from __future__ import annotations

import argparse
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

from server.domain import totp
from server.domain.keyring import Keyring
from server.domain.models import Caller, VerifyResult
from server.domain.service import TOTP_SECRET, TwoFactor
from server.settings import PolicySettings
from server.storage.database import PostgresDatabase

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
START = 1_900_000_000.0
CALLER = Caller(actor="bench", request_id="bench")


class NoDispatch:
    def dispatch(self, challenge_id: str) -> None:
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
        self.statements = 0

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        with self._db.transaction() as tx:
            yield _CountingTransaction(tx, self)


class _CountingTransaction:
    def __init__(self, tx: Any, owner: CountingDatabase) -> None:
        self._tx = tx
        self._owner = owner

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._tx, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._owner.statements += 1
            return method(*args, **kwargs)

        return counted


class User:
    """An enrolled user with a clock of its own, so each call can send a newer step's code."""

    def __init__(self, db: Any, keyring: Keyring, user_id: str) -> None:
        self.clock = Clock()
        self.twofactor = TwoFactor(db, keyring, PolicySettings(), NoDispatch(), clock=self.clock)
        self.user_id = user_id
        setup = self.twofactor.start_enrollment(
            user_id, "authenticator", account_name="", locale="", caller=CALLER
        ).authenticator
        assert setup is not None
        self.hotp = pyotp.HOTP(setup.secret_base32)
        step = totp.time_step(self.clock.now)
        assert self.twofactor.confirm_enrollment(
            user_id, "authenticator", self.hotp.at(step), caller=CALLER
        ).confirmed

    def next_code(self) -> str:
        self.clock.now += totp.STEP_SECONDS
        return self.hotp.at(totp.time_step(self.clock.now))

    def verify(self) -> None:
        outcome = self.twofactor.verify(self.user_id, self.next_code(), caller=CALLER)
        if outcome.result != VerifyResult.ACCEPTED:
            raise RuntimeError(f"verify was not accepted: {outcome.result}")


def timed(calls: int, action: Callable[[], object]) -> tuple[float, float]:
    """Median wall and mean CPU (of this process) per call, in microseconds."""
    samples = []
    cpu = time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        action()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6, (time.process_time() - cpu) / calls * 1e6


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
    counting.statements = 0
    wall, cpu = timed(args.calls, user.verify)
    per_call = counting.statements / args.calls
    print(
        f"TwoFactor.verify, 1 thread: {wall:7.0f} us wall (median), {cpu:5.0f} us CPU of this process (mean)"
    )
    print(f"  statements per call: {per_call:.0f} (+ BEGIN and COMMIT = {per_call + 2:.0f} round trips)")

    with db._pool.connection() as conn:  # the bench looks under the hood; the server never does this
        conn.autocommit = True
        wall, cpu = timed(args.calls, lambda: conn.execute("SELECT 1").fetchone())
        print(f"  one round trip (SELECT 1):             {wall:7.0f} us wall, {cpu:5.0f} us CPU")
        update = "UPDATE users SET last_verified_at = %(t)s WHERE user_id = %(u)s"
        wall, cpu = timed(args.calls, lambda: conn.execute(update, {"t": time.time_ns(), "u": user.user_id}))
        print(f"  committed one-row UPDATE (WAL flush):  {wall:7.0f} us wall, {cpu:5.0f} us CPU")
        secret_blob = conn.execute(
            "SELECT secret FROM methods WHERE user_id = %(u)s", {"u": user.user_id}
        ).fetchone()["secret"]
        conn.autocommit = False
    wall, cpu = timed(
        args.calls, lambda: keyring.decrypt(secret_blob, purpose=TOTP_SECRET, user_id=user.user_id)
    )
    print(f"  decrypt the TOTP secret (AES-GCM):     {wall:7.1f} us wall, {cpu:5.1f} us CPU")
    secret = keyring.decrypt(secret_blob, purpose=TOTP_SECRET, user_id=user.user_id)
    code = user.hotp.at(totp.time_step(START))
    wall, cpu = timed(args.calls, lambda: totp.matching_step(secret, code, START))
    print(f"  match the code (3 HOTP, pyotp):        {wall:7.1f} us wall, {cpu:5.1f} us CPU")

    two_trips = TwoRoundTrips(db, keyring, user)
    two_trips.verify()
    wall, cpu = timed(args.calls, two_trips.verify)
    print(f"sketch, the same state change in 2 round trips: {wall:7.0f} us wall, {cpu:5.0f} us CPU")

    print(
        f"TwoFactor.verify from several threads for {args.seconds:g} s each (pool size {max(thread_counts)}):"
    )
    for threads in thread_counts:
        users = [User(db, keyring, f"bench-path-{threads}-{i}") for i in range(threads)]
        rate, p50, cpu_share = concurrent(users, args.seconds)
        print(
            f"  {threads:3d} threads: {rate:7.0f} calls/s   p50 {p50 / 1000:6.2f} ms   this process {cpu_share:3.0f}% CPU"
        )


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


class TwoRoundTrips:
    """Not the server's code: the accepted-code path of Verify rewritten as two statements.

    1. In autocommit, read the user's lock state and authenticator secret in one query.
    2. Match the code in Python, then one conditional UPDATE (autocommit) that advances the
       step, clears failures and returns the unused backup-code count. The `totp_last_step <`
       condition keeps the replay guard without a row lock held across round trips.
    Failures (a wrong code) would still take the locking transaction; they are rare.
    """

    READ = (
        "SELECT u.failed_attempts, u.locked_until, m.secret FROM users u "
        "JOIN methods m ON m.user_id = u.user_id AND m.method = 'authenticator' AND m.enabled_at IS NOT NULL "
        "WHERE u.user_id = %(u)s"
    )
    ACCEPT = (
        "UPDATE users SET totp_last_step = %(s)s, failed_attempts = 0, locked_until = NULL, "
        "last_verified_at = %(now)s WHERE user_id = %(u)s AND (totp_last_step IS NULL OR totp_last_step < %(s)s) "
        "RETURNING (SELECT COUNT(*) FROM backup_codes b WHERE b.user_id = %(u)s AND b.used_at IS NULL) AS left"
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
                secret = self._keyring.decrypt(row["secret"], purpose=TOTP_SECRET, user_id=self._user.user_id)
                step = totp.matching_step(secret, code, now)
                params = {"u": self._user.user_id, "s": step, "now": int(now * 1000)}
                accepted = conn.execute(self.ACCEPT, params).fetchone()
            finally:
                conn.autocommit = False
        if accepted is None:
            raise RuntimeError("the sketch did not accept the code")


if __name__ == "__main__":
    sys.exit(main())
