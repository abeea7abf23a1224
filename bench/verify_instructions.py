"""Server cost of an accepted Verify against a Health/Check, in instructions or CPU µs per call.

    .venv/bin/python bench/verify_instructions.py [--users N --rounds R --threads T]
        [--rejected] [--callgrind DIR] [--database-url URL]

Repeatable where calls/s are not: under `--callgrind DIR` the server runs in valgrind's
callgrind, which counts the instructions every thread of the process executes whatever
else runs on the machine. Without it the server runs natively and the CPU it used is
read from /proc (ns precision, every thread), as bench/suite.py does.

On a fresh schema (dropped at the end): N x R users enrolled in the authenticator app
through the use cases in this process (the server's keyring, a clock an hour behind, so
their last accepted step is old), then `twofactor serve` started as a child process
(whatever `twofactor_server` the interpreter imports: PYTHONPATH picks another tree).
Every user verifies once with the current step's code (unmeasured: it fills the
server's cache of sealed secrets, as a user's first Verify in a process does), then R
rounds of N Health/Check calls and N accepted Verify calls of that round's users, with
the next step's code (always newer than the warm-up's), from T client threads. With
--rejected, the Verify phases send a wrong code instead (each user's first failure: counted,
no lock) and expect REJECTED. Each phase's figure is the server's (instructions or CPU µs)
divided by its calls; a wrong answer or an RPC error stops the run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import psycopg
import pyotp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loadgen import SERVE, WRONG_STEP_OFFSET, ServerProcess, server_env, wait_serving
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from twofactor_server.domain import totp
from twofactor_server.domain.keyring import Keyring
from twofactor_server.domain.models import Caller
from twofactor_server.settings import PolicySettings
from twofactor_server.storage.database import PostgresDatabase
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import Challenges
from twofactor_server.usecases.enrollment import Enrollment
from twofactor_server.usecases.notices import Notices

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CALLER = Caller(actor="bench", request_id="bench")


class NoDispatch:
    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        raise AssertionError("the bench sends no email or SMS")


def enroll(url: str, keyring: Keyring, user_ids: list[str]) -> dict[str, pyotp.HOTP]:
    """Enroll through the use cases, an hour in the past: the users' last step is far behind."""
    db = PostgresDatabase(url, pool_size=2)
    try:
        db.migrate()
        policy = PolicySettings()

        def clock() -> float:
            return time.time() - 3600

        challenges = Challenges(db, keyring, policy, NoDispatch(), clock)
        notices = Notices(db, keyring, policy, NoDispatch(), clock)
        backup_codes = BackupCodes(db, keyring, policy, notices, clock)
        enrollment = Enrollment(db, keyring, policy, challenges, backup_codes, notices, clock)
        hotps = {}
        for user_id in user_ids:
            setup = enrollment.start_enrollment(
                user_id, "authenticator", account_name="", locale="", verification_token="", caller=CALLER
            ).authenticator
            assert setup is not None
            hotp = pyotp.HOTP(setup.secret_base32)
            code = hotp.at(totp.time_step(clock()))
            assert enrollment.confirm_enrollment(user_id, "authenticator", code, caller=CALLER).confirmed
            hotps[user_id] = hotp
        return hotps
    finally:
        db.close()


class Calls:
    def __init__(self, target: str, token: str, threads: int) -> None:
        self._channels = [grpc.insecure_channel(target) for _ in range(threads)]
        self._verify = [pb_grpc.TwoFactorServiceStub(c) for c in self._channels]
        self._health = [health_pb2_grpc.HealthStub(c) for c in self._channels]
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._threads = threads

    def health(self, calls: int) -> None:
        def run(index: int) -> None:
            stub = self._health[index]
            for _ in range(index, calls, self._threads):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

        list(self._pool.map(run, range(self._threads)))

    def verify(self, users: list[tuple[str, pyotp.HOTP]], step_offset: int, *, wrong: bool = False) -> None:
        """Each user's code for the step `step_offset` from now: ACCEPTED; or, `wrong`, the code
        of a step outside the accepted drift (loadgen.WRONG_STEP_OFFSET, as the suite's rejected
        phase sends), REJECTED."""
        expected = pb.VERIFY_RESULT_REJECTED if wrong else pb.VERIFY_RESULT_ACCEPTED
        offset = step_offset + (WRONG_STEP_OFFSET if wrong else 0)

        def run(index: int) -> None:
            stub = self._verify[index]
            for user_id, hotp in users[index :: self._threads]:
                code = hotp.at(totp.time_step(time.time()) + offset)
                reply = stub.Verify(
                    pb.VerifyRequest(user_id=user_id, code=code), metadata=self._metadata, timeout=30
                )
                if reply.result != expected:
                    raise RuntimeError(f"{user_id}: {pb.VerifyResult.Name(reply.result)}")

        list(self._pool.map(run, range(self._threads)))

    def close(self) -> None:
        self._pool.shutdown()
        for channel in self._channels:
            channel.close()


def cpu_ns(pid: int) -> int:
    """On-CPU ns of every thread of `pid` (schedstat's first field)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended: its time is lost either way, for both phases alike
    return total


class Callgrind:
    def __init__(self, pid: int, directory: Path) -> None:
        self._pid = pid
        self._directory = directory
        self._dumps = 0

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "--zero", str(self._pid)], check=True, capture_output=True)

    def dump(self, name: str) -> int:
        """Dump the counts since zero(); return the instructions (Ir) of the dump."""
        before = set(self._directory.glob("callgrind.out.*"))
        subprocess.run(
            ["callgrind_control", f"--dump={name}", str(self._pid)], check=True, capture_output=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            new = set(self._directory.glob("callgrind.out.*")) - before
            for path in new:
                text = path.read_text(errors="replace")
                found = re.search(r"^totals: (\d+)", text, re.M) or re.search(r"^summary: (\d+)", text, re.M)
                if found:
                    target = self._directory / f"{self._dumps:02d}-{name}.callgrind"
                    path.rename(target)
                    self._dumps += 1
                    return int(found.group(1))
            time.sleep(0.2)
        raise RuntimeError("callgrind wrote no dump")


def in_callgrind(directory: Path, command: list[str], *options: str) -> list[str]:
    """`command` run in valgrind's callgrind, its dumps in `directory` (Callgrind reads them)."""
    directory.mkdir(parents=True, exist_ok=True)
    return [
        "valgrind",
        "--tool=callgrind",
        *options,
        f"--callgrind-out-file={directory}/callgrind.out.%p",
        *command,
    ]


def serve_command(env: dict[str, str], callgrind: Path | None, *options: str) -> list[str]:
    """`twofactor serve`, in callgrind (with `options`) when given a dump directory; then the
    storage and broker timeouts in `env` are made long: the server runs ~50 times slower."""
    if callgrind is None:
        return [*SERVE]
    env["TWOFACTOR_STORAGE_TIMEOUT_SECONDS"] = "60"
    env["TWOFACTOR_BROKER_TIMEOUT_SECONDS"] = "60"
    return in_callgrind(callgrind, [*SERVE], *options)


def measured(pid: int, meter: Callgrind | None, name: str, calls: int, action: Callable[[], object]) -> float:
    """The server's instructions (under callgrind, dumped as `name`) or CPU µs per call of `action`."""
    if meter:
        meter.zero()
        action()
        return meter.dump(name) / calls
    before = cpu_ns(pid)
    action()
    return (cpu_ns(pid) - before) / 1000 / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=300, help="users (and Health/Check calls) per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="client threads")
    parser.add_argument("--rejected", action="store_true", help="measure a rejected Verify (a wrong code)")
    parser.add_argument("--callgrind", type=Path, help="run the server in callgrind, dumps in this directory")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    args = parser.parse_args(argv)
    if not (1 <= args.users <= 5000 and 1 <= args.rounds <= 20 and 1 <= args.threads <= 32):
        parser.error("need 1-5000 users, 1-20 rounds, 1-32 threads")

    schema = f"tf_bench_{uuid.uuid4().hex[:12]}"
    url = f"{args.database_url}?options=-csearch_path%3D{schema}"
    spec = Keyring.new_key_spec(1)
    token = "bench-" + secrets.token_urlsafe(24)
    import twofactor_server

    print(f"twofactor_server from {Path(twofactor_server.__file__).parent}", flush=True)
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        run_id = uuid.uuid4().hex[:8]
        ids = [f"bench-{run_id}-{i:05d}" for i in range(args.users * args.rounds)]
        hotps = enroll(url, Keyring.parse(spec), ids)
        users = list(hotps.items())
        env = server_env(url, spec, token, {"TWOFACTOR_ALLOW_CONSOLE_DELIVERY": "true"})
        command = serve_command(env, args.callgrind)
        server = ServerProcess(command, env, cwd=str(ROOT))
        try:
            target = f"127.0.0.1:{server.wait_listening(timeout=600)}"
            wait_serving(target, timeout=300)
            calls = Calls(target, token, args.threads)
            calls.health(args.users)
            calls.verify(users, step_offset=0)  # the cache of sealed secrets filled
            meter = Callgrind(server.pid, args.callgrind) if args.callgrind else None
            figures: dict[str, list[float]] = {"health": [], "verify": []}
            unit = "instructions" if meter else "CPU µs"
            for number in range(args.rounds):
                mine = users[number * args.users : (number + 1) * args.users]
                for kind, action in (
                    ("health", lambda: calls.health(args.users)),
                    ("verify", lambda mine=mine: calls.verify(mine, step_offset=1, wrong=args.rejected)),
                ):
                    per_call = measured(server.pid, meter, f"r{number + 1}-{kind}", args.users, action)
                    figures[kind].append(per_call)
                    print(f"round {number + 1} {kind:<7} {per_call:12,.0f} {unit} per call", flush=True)
            calls.close()
            health, verify = (statistics.median(figures[k]) for k in ("health", "verify"))
            print(
                f"median of {args.rounds}: Health/Check {health:,.0f}, "
                f"{'rejected' if args.rejected else 'accepted'} Verify {verify:,.0f} "
                f"{unit} per call; ratio {verify / health:.2f}",
                flush=True,
            )
        finally:
            server.stop(timeout=120)
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    if args.callgrind and shutil.which("callgrind_annotate"):
        print(f"per-function counts: callgrind_annotate {args.callgrind}/NN-rK-verify.callgrind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
