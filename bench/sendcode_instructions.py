"""Server cost of a whole SendCode RPC against a Health/Check, in instructions or CPU µs per call.

    .venv/bin/python bench/sendcode_instructions.py [--users N --calls C --rounds R --threads T]
        [--callgrind DIR] [--database-url URL] [--redis-url URL]

What bench/sendcode_path.py measures in-process, with gRPC, the interceptor and the servicer
around it: on a fresh schema and a Redis queue of its own (both removed at the end), N users
with email enabled (written with the storage functions), then `twofactor serve` as a child
process (whatever `twofactor_server` the interpreter imports: PYTHONPATH picks another tree)
publishing to that queue, no worker, no resend cooldown and high send limits. A warm-up of
N SendCode calls (unmeasured), then R rounds of C Health/Check calls and C SendCode calls by
email, to the users in turn, from T client threads; the queue is emptied after each round.
Under `--callgrind DIR` the server runs in valgrind's callgrind and each phase's figure is its
instructions (every thread, user space) per call, as in bench/verify_instructions.py; without
it, the server's CPU per call from /proc.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import uuid
from pathlib import Path

import psycopg
import redis
import sendcode_path
import verify_instructions
from loadgen import ServerProcess, server_env, wait_serving
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb
from verify_instructions import Callgrind, measured, serve_command

from twofactor_server.domain.keyring import Keyring
from twofactor_server.storage.database import PostgresDatabase

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def make_users(url: str, run: str, count: int) -> list[str]:
    db = PostgresDatabase(url, pool_size=1, timeout=600)  # one transaction for them all
    try:
        db.migrate()
        return sendcode_path.make_users(db, run, count)
    finally:
        db.close()


class Calls(verify_instructions.Calls):
    """Health/Check (verify_instructions.Calls) and SendCode by email, from the client threads."""

    def send_code(self, users: list[str], calls: int) -> None:
        def run(index: int) -> None:
            for number in range(index, calls, self._threads):
                reply = self._verify[index].SendCode(  # the TwoFactorService stub of this thread
                    pb.SendCodeRequest(user_id=users[number % len(users)], method=common_pb2.METHOD_EMAIL),
                    metadata=self._metadata,
                    timeout=60,
                )
                assert reply.challenge.challenge_id

        list(self._pool.map(run, range(self._threads)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100, help="email users the calls go to in turn")
    parser.add_argument("--calls", type=int, default=300, help="calls of each kind per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="client threads")
    parser.add_argument("--callgrind", type=Path, help="run the server in callgrind, dumps in this directory")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args(argv)
    if not (1 <= args.users <= 5000 and 1 <= args.calls <= 20000 and 1 <= args.rounds <= 20):
        parser.error("need 1-5000 users, 1-20000 calls, 1-20 rounds")

    run = uuid.uuid4().hex[:12]
    schema = queue = f"tf_bench_{run}"
    url = f"{args.database_url}?options=-csearch_path%3D{schema}"
    token = "bench-" + secrets.token_urlsafe(24)
    import twofactor_server

    print(f"twofactor_server from {Path(twofactor_server.__file__).parent}", flush=True)
    broker = redis.Redis.from_url(args.redis_url, socket_timeout=5)
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        users = make_users(url, run, args.users)
        env = server_env(
            url,
            Keyring.new_key_spec(1),
            token,
            {
                "TWOFACTOR_BROKER_URL": args.redis_url,
                "TWOFACTOR_DELIVERY_QUEUE": queue,
                "TWOFACTOR_ALLOW_CONSOLE_DELIVERY": "true",
                "TWOFACTOR_RESEND_COOLDOWN_SECONDS": "0",
                "TWOFACTOR_SENDS_PER_USER_PER_HOUR": "1000",
                "TWOFACTOR_SENDS_PER_DESTINATION_PER_HOUR": "1000",
            },
        )
        command = serve_command(env, args.callgrind, "--dump-instr=no")
        server = ServerProcess(command, env, cwd=str(ROOT))
        try:
            target = f"127.0.0.1:{server.wait_listening(timeout=600)}"
            wait_serving(target, timeout=300)
            calls = Calls(target, token, args.threads)
            calls.health(args.users)
            calls.send_code(users, args.users)  # warm-up: connections, prepared statements
            broker.delete(queue)
            meter = Callgrind(server.pid, args.callgrind) if args.callgrind else None
            figures: dict[str, list[float]] = {"health": [], "sendcode": []}
            unit = "instructions" if meter else "CPU µs"
            for number in range(args.rounds):
                for kind, action in (
                    ("health", lambda: calls.health(args.calls)),
                    ("sendcode", lambda: calls.send_code(users, args.calls)),
                ):
                    per_call = measured(server.pid, meter, f"r{number + 1}-{kind}", args.calls, action)
                    figures[kind].append(per_call)
                    print(f"round {number + 1} {kind:<8} {per_call:12,.0f} {unit} per call", flush=True)
                broker.delete(queue)
            calls.close()
            health, send = (statistics.median(figures[k]) for k in ("health", "sendcode"))
            print(
                f"median of {args.rounds}: Health/Check {health:,.0f}, SendCode {send:,.0f} {unit} per call",
                flush=True,
            )
        finally:
            server.stop(timeout=120)
    finally:
        broker.delete(queue)
        broker.close()
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


if __name__ == "__main__":
    sys.exit(main())
