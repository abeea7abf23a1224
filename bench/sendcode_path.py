"""Where one SendCode's time goes, without gRPC: the use case against PostgreSQL and Redis.

    .venv/bin/python bench/sendcode_path.py [--calls N --users U --threads 1,4,8 --profile
                                             --database-url URL --redis-url URL]

In one process, on a fresh schema and a private Redis queue (both dropped at the
end): U users with email enabled (written with the storage functions), then

  - Challenges.send_code by email to the users in turn (send limits high, no
    cooldown, as in bench/suite.py), with the real Redis publish: wall time, CPU
    of this process and of this run's PostgreSQL backends per call, and the SQL
    statements and transactions per call (each statement is a round trip; BEGIN and
    COMMIT go with a transaction's first and hot_last statements);
  - its parts alone: the Redis publish (one LPUSH), the task message, the code's
    keyed hash and seal;
  - send_code from several threads at once (the GIL and the pool shared);
  - with --profile, cProfile of the 1-thread calls, sorted by own time.

The queue is emptied as it goes: nothing is delivered.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable

import psycopg
import redis
from loadgen import CpuMeter
from verify_path import CountingDatabase

from twofactor_server.delivery.dispatch import CeleryDispatcher
from twofactor_server.delivery.task_queue import deliver_message
from twofactor_server.domain.keyring import CHALLENGE_CODE, Keyring
from twofactor_server.domain.models import Caller
from twofactor_server.settings import PolicySettings, Settings
from twofactor_server.storage import store
from twofactor_server.storage.database import PostgresDatabase
from twofactor_server.usecases.challenges import Challenges, challenge_data

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CALLER = Caller(actor="bench", request_id="bench")


def make_users(db: PostgresDatabase, run: str, count: int) -> list[str]:
    users = [f"bench-send-{run}-{i:05d}" for i in range(count)]
    now = int(time.time() * 1000)
    with db.transaction() as tx:
        for index, user_id in enumerate(users):
            store.ensure_user(tx, user_id, now)
            store.set_contact(tx, user_id, "email", f"user{index}-{run}@bench.invalid")
            store.start_method_enrollment(tx, user_id, "email", now, with_proof=True)
            store.enable_method(tx, user_id, "email", now)
    return users


def per_call(samples: list[float], before: dict[str, float], after: dict[str, float]) -> str:
    ours, postgres = ((after[key] - before[key]) / len(samples) * 1e6 for key in ("server", "postgres"))
    wall = statistics.median(samples) * 1e6
    return f"{wall:7.1f} us wall (median), CPU {ours:6.1f} us here + {postgres:6.1f} us in PostgreSQL"


def timed(meter: CpuMeter, calls: int, action: Callable[[int], object]) -> str:
    samples = []
    before = meter.snapshot()
    for index in range(calls):
        t0 = time.perf_counter()
        action(index)
        samples.append(time.perf_counter() - t0)
    return per_call(samples, before, meter.snapshot())


def threaded(meter: CpuMeter, threads: int, seconds: float, action: Callable[[int], object]) -> str:
    counts = [0] * threads
    stop = threading.Event()

    def loop(slot: int) -> None:
        index = slot
        while not stop.is_set():
            action(index)
            index += threads
            counts[slot] += 1

    workers = [threading.Thread(target=loop, args=(slot,)) for slot in range(threads)]
    before, began = meter.snapshot(), time.monotonic()
    for worker in workers:
        worker.start()
    stop.wait(seconds)  # the measurement's length, not a wait for a condition
    stop.set()
    for worker in workers:
        worker.join()
    took, after = time.monotonic() - began, meter.snapshot()
    calls = sum(counts)
    ours, postgres = ((after[key] - before[key]) / calls * 1e6 for key in ("server", "postgres"))
    return f"{calls / took:7.1f} calls/s, CPU {ours:6.1f} us here + {postgres:6.1f} us in PostgreSQL per call"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="1-thread calls per measurement")
    parser.add_argument("--users", type=int, default=200, help="email users the calls go to in turn")
    parser.add_argument("--threads", default="4,8", help="thread counts for the concurrent part")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each concurrent measurement")
    parser.add_argument("--profile", action="store_true", help="cProfile of the 1-thread calls")
    parser.add_argument(
        "--send-only", action="store_true", help="only the 1-thread send_code calls (for callgrind)"
    )
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args(argv)
    thread_counts = [int(n) for n in args.threads.split(",") if n.strip()]
    if not (1 <= args.calls <= 100_000 and all(1 <= n <= 64 for n in thread_counts) and args.seconds <= 60):
        parser.error("need 1-100000 calls, 1-64 threads, at most 60 seconds")

    run = uuid.uuid4().hex[:12]
    schema = queue = f"tf_bench_{run}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    db = PostgresDatabase(
        f"{args.database_url}?options=-csearch_path%3D{schema}&application_name={schema}",
        pool_size=max([1, *thread_counts]),
        timeout=60.0,  # generous: under valgrind a unit of work runs 50 times slower
    )
    broker = redis.Redis.from_url(args.redis_url, socket_timeout=5)
    try:
        db.migrate()
        run_bench(db, broker, args, thread_counts, run, queue, schema)
    finally:
        db.close()
        broker.delete(queue)
        broker.close()
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


def run_bench(
    db: PostgresDatabase,
    broker: redis.Redis,
    args: argparse.Namespace,
    thread_counts: list[int],
    run: str,
    queue: str,
    schema: str,
) -> None:
    settings = Settings(broker_url=args.redis_url, delivery_queue=queue)
    policy = PolicySettings(
        resend_cooldown_seconds=0, sends_per_user_per_hour=1_000_000, sends_per_destination_per_hour=1_000_000
    )
    keyring = Keyring.parse(Keyring.new_key_spec(1))
    dispatcher = CeleryDispatcher(settings)
    counting = CountingDatabase(db)
    challenges = Challenges(counting, keyring, policy, dispatcher, time.time)  # type: ignore[arg-type]
    users = make_users(db, run, args.users)
    pids = PostgresBackends(args.database_url, schema)
    meter = CpuMeter(os.getpid(), [], postgres_pids=pids)

    def send(index: int) -> None:
        challenges.send_code(users[index % len(users)], "email", idempotency_key="", locale="", caller=CALLER)
        if index % 500 == 0:
            broker.delete(queue)

    for index in range(50):  # warm up: the pool's connections, prepared statements
        send(index)
    counting.count = counting.transactions = 0
    print(f"Challenges.send_code, 1 thread:   {timed(meter, args.calls, send)}")
    statements = counting.count / args.calls
    transactions = counting.transactions / args.calls
    print(
        f"  per call: {statements:.1f} statements in {transactions:.1f} transactions and 1 LPUSH to "
        "Redis (BEGIN goes with a transaction's first statement, COMMIT with its hot_last one, "
        "each as one round trip: docs/benchmarks.md)"
    )
    if args.profile:
        profiler = cProfile.Profile(time.process_time)  # CPU, not wall time
        profiler.enable()
        for index in range(args.calls):
            send(index)
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)

    if args.send_only:
        pids.close()
        dispatcher.close()
        return
    message = deliver_message(uuid.uuid4().hex, 0, queue)
    publish = timed(meter, args.calls, lambda _: dispatcher.dispatch(uuid.uuid4().hex))
    print(f"publish alone (LPUSH):            {publish}")
    broker.delete(queue)
    build = timed(meter, args.calls, lambda _: deliver_message("c" * 32, 0, queue))
    print(f"task message alone:               {build}")
    print(f"  ({len(message)} bytes)")

    def seal(_: int) -> None:
        challenge_id = uuid.uuid4().hex
        keyring.keyed_hash(challenge_data(challenge_id, "123456"), purpose=CHALLENGE_CODE)
        keyring.encrypt(b"123456", purpose=CHALLENGE_CODE, user_id=challenge_id)

    print(f"code hash + seal alone:           {timed(meter, args.calls, seal)}")
    for threads in thread_counts:
        print(f"send_code, {threads:2d} threads:             {threaded(meter, threads, args.seconds, send)}")
    pids.close()
    dispatcher.close()


class PostgresBackends:
    """This run's backends (by application_name) and PostgreSQL's background processes."""

    def __init__(self, database_url: str, application_name: str) -> None:
        self._conn = psycopg.connect(database_url, autocommit=True)
        self._name = application_name
        self._lock = threading.Lock()

    def __call__(self) -> set[int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                "OR backend_type NOT IN ('client backend', 'parallel worker')",  # those: a session's
                (self._name,),
            ).fetchall()
        return {int(pid) for (pid,) in rows}

    def close(self) -> None:
        self._conn.close()


if __name__ == "__main__":
    sys.exit(main())
