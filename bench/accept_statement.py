"""PostgreSQL CPU of the accepted-Verify statement alone, against a bare committed 1-row UPDATE.

    cd bench && ../.venv/bin/python accept_statement.py [--users 2000 --calls 200 --rounds 60
                                                         --pause-ms P --one-row]

On a fresh schema migrated by this tree, --users users written by bench/populate.py (an
authenticator and 10 backup codes each), one connection in autocommit runs, in interleaved
rounds: --calls of the tree's accepting statement as the Verify fast path sends it, with the
user's sealed secret cached (`attempts.accept_totp_step_unlocked`, or on older trees
`accept_totp_step` with `unlocked_below`; the users in turn, each with a newer step; no audit
row), then --calls `UPDATE users SET created_at = $1 WHERE user_id = $2` on the same users. The
CPU is that of the connection's one backend, read from /proc/PID/schedstat (ns) around each
batch, so other sessions on a shared PostgreSQL and its background processes don't count.
Prints the ratio of the two kinds' total CPU (the issue's "PostgreSQL CPU per accepted Verify /
per committed UPDATE", for the statement alone) and the quartiles of the per-round ratios.
Short batches, finely interleaved (the order alternating from round to round), see the same
load from other work on a shared machine, so the ratio of totals holds up where one batch's
figure does not. Run it in two trees to compare them: each measures its own statement on its
own schema.

--pause-ms P sleeps P ms after each statement, so the backend waits for the next one as a
server's pooled connection does between calls (a woken backend, cold caches), where back to
back it does not. --one-row also measures, interleaved with the two, the statement the
accepted path would send if the two values it reads from verify_state were columns of users
(added to the scratch schema only, filled from verify_state): one row touched, no join. It
measures that design before anyone builds it (docs/benchmarks.md, the eleventh sitting).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
import uuid
from typing import Any

import psycopg
from loadgen import _on_cpu_seconds
from populate import Population, populate, schema_url

from twofactor_server.domain.keyring import Keyring
from twofactor_server.storage import attempts
from twofactor_server.storage.database import PostgresDatabase

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
MAX_FAILURES = 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=200, help="statements of each kind per round")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--pause-ms", type=float, default=0.0, help="sleep after each statement (ms)")
    parser.add_argument(
        "--one-row", action="store_true", help="also the accepting statement on users alone (scratch columns)"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the schema is dropped
    schema = f"tf_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = schema_url(args.database_url, schema)
    db = PostgresDatabase(url, pool_size=1, timeout=3600)  # one unit of work for the whole run
    try:
        db.migrate()
        keys = Keyring.new_key_spec(1)
        population = Population(args.users, prefix="stmt-", keys=keys, now_ms=int(time.time() * 1000))
        users = populate(url, population, keep=range(args.users), processes=1)
        with psycopg.connect(url, autocommit=True) as conn:
            if args.one_row:
                conn.execute(_ONE_ROW_COLUMNS)
                conn.execute("VACUUM FULL users")
            conn.execute("VACUUM ANALYZE")
        run(db, users, args)
    finally:
        db.close()
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


# --one-row: the version and the count as columns of users, this scratch schema only.
_ONE_ROW_COLUMNS = (
    "ALTER TABLE users ADD COLUMN secret_version BIGINT, ADD COLUMN backup_codes_unused INTEGER; "
    "UPDATE users u SET secret_version = v.secret_version, backup_codes_unused = v.backup_codes_unused "
    "FROM verify_state v WHERE v.user_id = u.user_id"
)
_ONE_ROW_ACCEPT = (
    "UPDATE users SET totp_last_step = %(s)s, failed_attempts = 0, locked_until = NULL, "
    "last_verified_at = %(now)s WHERE user_id = %(u)s AND secret_version = %(version)s "
    "AND credential_epoch = %(epoch)s AND (totp_last_step IS NULL OR totp_last_step < %(s)s) "
    "AND failed_attempts < %(max_failures)s AND (locked_until IS NULL OR locked_until <= %(now)s) "
    "RETURNING backup_codes_unused AS backup_left, credential_epoch"
)


def run(db: PostgresDatabase, users: list[Any], args: argparse.Namespace) -> None:
    with db.statements() as q:
        known = {u.user_id: attempts.verify_snapshot(q, u.user_id) for u in users}
        backend = int(q.one("SELECT pg_backend_pid() AS pid")["pid"])  # type: ignore[index]
        steps = {u.user_id: u.last_step for u in users}
        now = int(time.time() * 1000)
        turn = 0
        # The tree's fast-path statement: checked against the methods version where the tree keeps
        # one (verify_state), else against the sealed secret itself.
        unlocked = getattr(attempts, "accept_totp_step_unlocked", None)

        def next_user() -> tuple[str, Any]:
            """The next user in turn, with a newer step to accept, and what was read of it."""
            nonlocal turn
            user = users[turn % len(users)].user_id
            turn += 1
            steps[user] += 1
            seen = known[user]
            assert seen is not None and seen.authenticator_secret is not None
            return user, seen

        def accept() -> None:
            user, seen = next_user()
            if unlocked is not None:
                # The version, and the epoch on trees whose statement checks it too.
                read = (seen.secret_version, getattr(seen, "credential_epoch", None))  # type: ignore[attr-defined, unused-ignore]
                checked = read if read[1] is not None else read[:1]
                taken = unlocked(q, user, steps[user], *checked, now, unlocked_below=MAX_FAILURES)
            else:
                sealed = seen.authenticator_secret
                taken = attempts.accept_totp_step(
                    q, user, steps[user], sealed, now, unlocked_below=MAX_FAILURES
                )  # type: ignore[call-arg, unused-ignore]
            if taken is None:
                raise RuntimeError(f"not accepted: {user}")

        def one_row() -> None:
            user, seen = next_user()
            params = {"u": user, "s": steps[user], "now": now, "max_failures": MAX_FAILURES}
            params.update(version=seen.secret_version, epoch=seen.credential_epoch)
            if q.one(_ONE_ROW_ACCEPT, params) is None:
                raise RuntimeError(f"not accepted: {user}")

        def update() -> None:
            nonlocal turn
            user = users[turn % len(users)].user_id
            turn += 1
            q.execute("UPDATE users SET created_at = %(now)s WHERE user_id = %(u)s", {"u": user, "now": now})

        def batch(action: Any) -> float:
            before = _on_cpu_seconds(backend)
            for _ in range(args.calls):
                action()
                if pause:
                    time.sleep(pause)
            return (_on_cpu_seconds(backend) - before) / args.calls * 1e6

        pause = args.pause_ms / 1000
        kinds = [accept, update, *((one_row,) if args.one_row else ())]
        for kind in kinds:
            batch(kind)  # warm-up: prepared statements, caches
        ratios, totals = [], dict.fromkeys(kinds, 0.0)
        for index in range(args.rounds):
            # Each kind first as often as the others, each order also reversed.
            order = kinds[index % len(kinds) :] + kinds[: index % len(kinds)]
            if (index // len(kinds)) % 2:
                order.reverse()
            spent = {kind: batch(kind) for kind in order}
            ratios.append(spent[accept] / spent[update])
            for kind in totals:
                totals[kind] += spent[kind] / args.rounds
        quartiles = statistics.quantiles(ratios, n=4)
        print(
            f"{args.rounds} rounds of {args.calls}: accept {totals[accept]:.1f} us, update "
            f"{totals[update]:.1f} us per statement; ratio {totals[accept] / totals[update]:.3f} "
            f"(per round: quartiles {quartiles[0]:.2f} / {quartiles[1]:.2f} / {quartiles[2]:.2f})",
            flush=True,
        )
        if args.one_row:
            print(
                f"one row (scratch columns on users): {totals[one_row]:.1f} us per statement; ratio "
                f"{totals[one_row] / totals[update]:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
