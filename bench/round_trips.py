"""A transaction's round trips to PostgreSQL, one by one or in one pipeline: CPU and wall time (issue 13).

    .venv/bin/python bench/round_trips.py [--calls N --rounds R --database-url URL]

On one pooled connection of the server's own storage layer (PostgresDatabase), with a
prepared one-row HotStatement, alternately:

  one by one  BEGIN, the statement, COMMIT: three round trips, as every transaction ran
              before 2026-11-30;
  pipelined   the same three in one round trip (run_prepared(begin=True, commit=True)), as a
              transaction's first statement and its hot_last statement now go.

Prints, per round and per transaction, this thread's CPU (user + system: time.thread_time)
and the wall time. Callgrind's instruction counts (verify_instructions.py, sendcode_instructions.py)
are user space only: they see the pipeline's extra libpq calls, not the system calls and the
waits it saves, which is why this measures CPU time. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

from twofactor_server.storage.database import PostgresDatabase
from twofactor_server.storage.hot_statements import HotStatement, begin_block, commit_block, run_prepared

STATEMENT = HotStatement("bench_round_trips", "SELECT %(n)s::int8 + 1 AS n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="transactions per round and kind (3000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each kind once per round (5)")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    db = PostgresDatabase(args.database_url, pool_size=1, timeout=30.0)
    conn, watch = db._checkout()
    try:
        run_prepared(conn, STATEMENT, {"n": 0})

        def one_by_one(n: int) -> None:
            begin_block(conn)
            run_prepared(conn, STATEMENT, {"n": n})
            commit_block(conn)

        def pipelined(n: int) -> None:
            run_prepared(conn, STATEMENT, {"n": n}, begin=True, commit=True)

        for round_number in range(1, args.rounds + 1):
            for name, transaction in (("one by one", one_by_one), ("pipelined", pipelined)):
                cpu, wall = time.thread_time(), time.perf_counter()
                for n in range(args.calls):
                    transaction(n)
                cpu_us = (time.thread_time() - cpu) / args.calls * 1e6
                wall_us = (time.perf_counter() - wall) / args.calls * 1e6
                print(f"round {round_number}  {name:<10}  cpu {cpu_us:5.1f} µs  wall {wall_us:5.1f} µs")
    finally:
        db._checkin(conn, watch)
        db.close()


if __name__ == "__main__":
    main()
