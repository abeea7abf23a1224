"""Instructions per accepted-Verify storage call, layer by layer, under callgrind.

    cd bench && ../.venv/bin/python storage_call.py [--users 2000] [--calls 100,1100]

On a fresh schema (dropped at the end) populated by populate.py, runs each layer of the
accepted Verify's storage call N1 and N2 times in a child process under valgrind's callgrind
and prints (Ir(N2) - Ir(N1)) / (N2 - N1), the instructions of one call without the process's
start-up and set-up, repeatable whatever else the machine runs:

  checkout    the pool's connection and the deadline watch (PostgresDatabase._checkout/_checkin)
  statements  `with db.statements()`, doing nothing inside
  statement   the accepting statement inside statements() (attempts.accept_totp_step_unlocked)

Run it in two trees (PYTHONPATH to the other's server/ as twofactor_server) to compare them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from populate import Population, populate, schema_url

from twofactor_server.domain.keyring import Keyring
from twofactor_server.storage import attempts
from twofactor_server.storage.database import PostgresDatabase

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LAYERS = ("checkout", "statements", "statement")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--calls", default="100,1100", help="N1,N2 (default 100,1100)")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--child", nargs=3, metavar=("SETUP", "LAYER", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_layer(Path(args.child[0]), args.child[1], int(args.child[2]))
        return 0
    low, high = (int(n) for n in args.calls.split(","))
    schema = f"tf_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        with tempfile.TemporaryDirectory() as scratch:
            setup = Path(scratch) / "setup.json"
            write_setup(schema_url(args.database_url, schema), args.users, setup)
            for layer in LAYERS:
                counts = [instructions(setup, layer, calls, Path(scratch)) for calls in (low, high)]
                print(f"{layer:<11} {(counts[1] - counts[0]) / (high - low):>9,.0f} instructions per call")
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


def write_setup(url: str, users: int, path: Path) -> None:
    db = PostgresDatabase(url, pool_size=1, timeout=3600)
    try:
        db.migrate()
        population = Population(
            users, prefix="call-", keys=Keyring.new_key_spec(1), now_ms=int(time.time() * 1000)
        )
        rows = populate(url, population, keep=range(users), processes=1)
        with db.statements() as q:
            versions = [attempts.verify_snapshot(q, u.user_id) for u in rows]
        # The version, and the epoch on trees whose statement checks it too.
        listed = [
            [
                u.user_id,
                seen.secret_version,
                *([seen.credential_epoch] if hasattr(seen, "credential_epoch") else []),
            ]
            for u, seen in zip(rows, versions, strict=True)
            if seen
        ]
    finally:
        db.close()
    path.write_text(json.dumps({"url": url, "users": listed}))


def instructions(setup: Path, layer: str, calls: int, scratch: Path) -> int:
    out = scratch / f"callgrind.{layer}.{calls}"
    child = [sys.executable, __file__, "--child", str(setup), layer, str(calls)]
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *child],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no count from callgrind: {done.stderr[-500:]}")
    return int(found[1])


def run_layer(setup: Path, layer: str, calls: int) -> None:
    config: dict[str, Any] = json.loads(setup.read_text())
    db = PostgresDatabase(config["url"], pool_size=1, timeout=60)
    users, now = config["users"], int(time.time() * 1000)
    first_step = int(time.time() * 1e6)  # newer than any step an earlier run accepted
    try:
        db.ping()
        for index in range(calls):
            user_id, *read = users[index % len(users)]
            if layer == "checkout" and hasattr(db, "_checkout"):
                db._checkin(*db._checkout())
            elif layer == "checkout":  # trees before the checkout was split out of _connection()
                with db._connection():
                    pass
            elif layer == "statements":
                with db.statements():
                    pass
            else:
                with db.statements() as q:
                    taken = attempts.accept_totp_step_unlocked(
                        q, user_id, first_step + index, *read, now, unlocked_below=100
                    )
                if taken is None:
                    raise RuntimeError(f"not accepted: {user_id}")
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
