"""Instructions per call of each piece of an accepted Verify, in-process, counted by callgrind.

    .venv/bin/python bench/verify_pieces.py [--calls N] [--piece NAME ...] [--database-url URL]

bench/verify_instructions.py counts a whole RPC; this says where an accepted Verify's
instructions go. For each piece, a child process of this script sets up what the server's
accepted path uses (a user enrolled in the authenticator app on a fresh PostgreSQL schema,
dropped at the end; its sealed secret; the keyring; the interceptor with one token), then
calls the piece N times from a generator that `math.fsum` drains, under `valgrind
--tool=callgrind --toggle-collect=math_fsum`: only the instructions inside that one call are
counted, not the imports, the setup or the teardown, so the figure per call is exact to the
loop's own few hundred instructions. Whatever `twofactor_server` the interpreter imports is
measured (PYTHONPATH picks another tree).

Pieces: verify (Verification.verify, accepted, a newer step each call: everything the domain
does), match (the three HOTP candidates), decrypt (the sealed secret's AES-GCM), stepup (the
step-up token), outcome (a VerifyOutcome), caller (a Caller), auth (the bearer token's
check), statements (db.statements() entered and left: pool checkout and return, deadline
watch), convert (the protobuf answer, serialized).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PIECES = ("verify", "match", "decrypt", "stepup", "outcome", "caller", "auth", "statements", "convert")
TOKEN = "bench-" + secrets.token_urlsafe(24)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls of each piece (1000)")
    parser.add_argument("--piece", action="append", choices=PIECES, help="only these pieces (repeatable)")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: the child that runs one piece
    args = parser.parse_args(argv)
    if not 1 <= args.calls <= 100_000:
        parser.error("need 1-100000 calls")
    if args.run:
        run_piece(args.run, args.calls, args.database_url)
        return 0
    if shutil.which("valgrind") is None:
        parser.error("needs valgrind (apt-get install valgrind)")
    import twofactor_server

    print(f"twofactor_server from {Path(twofactor_server.__file__).parent}", flush=True)
    for piece in args.piece or PIECES:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--toggle-collect=math_fsum",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            str(Path(__file__).resolve()),
            "--run",
            piece,
            "--calls",
            str(args.calls),
            "--database-url",
            args.database_url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        collected = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or collected is None:
            print(done.stdout + done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{piece}: the child failed (exit status {done.returncode})")
        print(f"{piece:<11} {int(collected.group(1)) / args.calls:12,.0f} instructions per call", flush=True)
    return 0


def run_piece(piece: str, calls: int, database_url: str) -> None:
    """Set up, then call `piece` `calls` times inside math.fsum (what callgrind counts)."""
    import verify_path

    from twofactor_server.api import convert
    from twofactor_server.api.interceptors import ApiInterceptor
    from twofactor_server.domain import step_up, totp
    from twofactor_server.domain.keyring import TOTP_SECRET, Keyring
    from twofactor_server.domain.models import Caller, CodeKind, VerifyOutcome, VerifyResult
    from twofactor_server.settings import TokenSetting
    from twofactor_server.storage.database import PostgresDatabase

    schema = f"tf_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    db = PostgresDatabase(f"{database_url}?options=-csearch_path%3D{schema}", pool_size=2)
    try:
        db.migrate()
        keyring = Keyring.parse(Keyring.new_key_spec(1))
        user = verify_path.User(db, keyring, "bench-pieces")
        for _ in range(20):  # prepared statements, the cache of sealed secrets, the pool
            user.verify()
        caller = Caller("bench", "bench")
        with db.transaction() as tx:
            row = tx.one("SELECT secret FROM methods WHERE user_id = %(u)s", {"u": user.user_id})
        assert row is not None
        sealed = row["secret"]
        secret = keyring.decrypt(sealed, purpose=TOTP_SECRET, user_id=user.user_id)
        code = totp.code_at_step(secret, totp.time_step(1e9))
        codes = [user.next_code() for _ in range(calls)]
        user.clock.now -= calls * totp.STEP_SECONDS  # each code's step comes round again below
        outcome = VerifyOutcome(
            VerifyResult.ACCEPTED, CodeKind.AUTHENTICATOR, 5, 10, None, 0, "tfv1." + "A" * 80
        )
        digest = hashlib.sha256(TOKEN.encode()).digest()
        interceptor = ApiInterceptor((TokenSetting("bench", frozenset({"app"}), digest),))

        def verify() -> None:
            for typed in codes:
                user.clock.now += totp.STEP_SECONDS
                user.verification.verify(user.user_id, typed, caller=caller)

        def statements() -> None:
            for _ in range(calls):
                with db.statements():
                    pass

        def repeat(action: Callable[[], object]) -> Callable[[], None]:
            def loop() -> None:
                for _ in range(calls):
                    action()

            return loop

        runs: dict[str, Callable[[], None]] = {
            "verify": verify,
            "match": repeat(lambda: totp.matching_step(secret, code, 1e9)),
            "decrypt": repeat(lambda: keyring.decrypt(sealed, purpose=TOTP_SECRET, user_id=user.user_id)),
            "stepup": repeat(
                lambda: step_up.issue_token(keyring, user_id=user.user_id, actor="bench", epoch=0, now_ms=1)
            ),
            "outcome": repeat(
                lambda: VerifyOutcome(VerifyResult.ACCEPTED, CodeKind.AUTHENTICATOR, 5, 10, None, 0, "x")
            ),
            "caller": repeat(lambda: Caller("bench", "request")),
            "auth": repeat(lambda: interceptor._authenticate(f"Bearer {TOKEN}", "app", "request")),
            "statements": statements,
            "convert": repeat(lambda: convert.verify(outcome).SerializeToString()),
        }

        def counted() -> Iterator[float]:
            runs[piece]()
            yield 0.0

        math.fsum(counted())  # the one call callgrind counts (--toggle-collect=math_fsum)
    finally:
        db.close()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    sys.exit(main())
