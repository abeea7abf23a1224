"""One Celery delivery worker draining a full queue: emails/s and the worker's CPU per email,
its consumer (main) process apart from its pool processes, for several worker configurations.

    .venv/bin/python bench/worker_path.py [--emails N --runs R --concurrency C]
        [--config 'NAME=worker options' ...]

On a fresh schema (dropped at the end) and a queue of its own on Redis (deleted at the
end), with the bench's SMTP sink (bench/sink.py, a child process that only counts), for each run and
each configuration in turn (the order reversed every other run: ABBA): start
`python -m twofactor_workers --concurrency C --loglevel WARNING <options>` (what
`twofactor worker` execs), warm it up (4 emails per pool process: every pool process has its
database and SMTP connections), queue N enrollment emails through the use cases (not
measured), push their task messages in one Redis pipeline (the server's own LPUSH
message, task_queue.deliver_message), and time until the sink has all of them; then stop
the worker. CPU is read from /proc (every thread of every process of the worker's
session, ns precision) and from this run's PostgreSQL backends. A configuration's
options are `twofactor worker` options; `--` passes the rest to `celery worker`
(e.g. `'fair=-- -O fair'`). Outbox recovery is set to an hour so that it does not
republish the rows queued here without a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import redis
from delivery_path import CALLER, RecordingDispatch
from loadgen import sink_delivery
from sink import BenchSink
from suite import PostgresPids, forget_queue

from twofactor_server.delivery.task_queue import deliver_message
from twofactor_server.domain.clock import system_clock
from twofactor_server.domain.keyring import Keyring
from twofactor_server.settings import Settings
from twofactor_server.storage.database import PostgresDatabase
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import Challenges
from twofactor_server.usecases.enrollment import Enrollment
from twofactor_server.usecases.notices import Notices
from twofactor_server.usecases.profiles import UserProfiles

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def session_cpu(session: int) -> tuple[float, float]:
    """CPU seconds so far of (the session leader, its other processes), every thread, from schedstat."""
    leader = others = 0.0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if int(stat.read().rpartition(")")[2].split()[3]) != session:
                    continue
            seconds = 0.0
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                    seconds += int(schedstat.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):  # the process or thread ended
            continue
        if pid == session:
            leader += seconds
        else:
            others += seconds
    return leader, others


def postgres_cpu(backends: PostgresPids) -> float:
    seconds = 0.0
    for pid in backends():
        try:
            with open(f"/proc/{pid}/schedstat") as schedstat:
                seconds += int(schedstat.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return seconds


@dataclasses.dataclass
class Result:
    rate: float
    main_us: float
    pool_us: float
    postgres_us: float
    main_ir: float = 0.0
    pool_ir: float = 0.0

    def line(self, instructions: bool) -> str:
        text = (
            f"{self.rate:7.1f} emails/s   worker CPU {self.main_us + self.pool_us:6.0f} us/email "
            f"(main {self.main_us:5.0f} + pool {self.pool_us:5.0f})   "
            f"PostgreSQL {self.postgres_us:5.0f} us/email"
        )
        if instructions:
            text += f"   instructions/email main {self.main_ir:,.0f} + pool {self.pool_ir:,.0f}"
        return text


FIELDS = dataclasses.fields(Result)


class Bench:
    def __init__(self, db: PostgresDatabase, env: dict[str, str], keyring: Keyring, queue: str) -> None:
        settings = Settings()
        policy = dataclasses.replace(settings.policy, resend_cooldown_seconds=0, sends_per_user_per_hour=1000)
        self.recorder = RecordingDispatch()
        challenges = Challenges(db, keyring, policy, self.recorder, system_clock)
        notices = Notices(db, keyring, policy, self.recorder, system_clock)
        backup_codes = BackupCodes(db, keyring, policy, notices, system_clock)
        self.enrollment = Enrollment(db, keyring, policy, challenges, backup_codes, notices, system_clock)
        self.profiles = UserProfiles(db, keyring, policy, challenges, notices, system_clock)
        self.env = env
        self.queue = queue
        self.redis = redis.Redis.from_url(env["TWOFACTOR_BROKER_URL"])
        self.run_id = uuid.uuid4().hex[:8]
        self.users = 0

    def queue_emails(self, count: int) -> list[bytes]:
        """`count` enrollment emails queued in the outbox; their task messages, not yet pushed."""
        self.recorder.queued.clear()

        def enroll(user_id: str) -> None:
            self.profiles.set_contact(
                user_id, email=f"{user_id}@bench.invalid", phone=None, verification_token="", caller=CALLER
            )
            self.enrollment.start_enrollment(
                user_id, "email", account_name="", locale="", verification_token="", caller=CALLER
            )

        users = [f"bench-worker-{self.run_id}-{self.users + index}" for index in range(count)]
        self.users += count
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(enroll, users))
        return [deliver_message(c, g, self.queue) for c, g in self.recorder.queued]

    def push(self, messages: list[bytes]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for message in messages:
            pipe.lpush(self.queue, message)
        pipe.execute()

    def measure(self, sink: BenchSink, backends: PostgresPids, options: list[str], args: Any) -> Result:
        warm = self.queue_emails(args.concurrency * 4)
        messages = self.queue_emails(args.emails)
        log = tempfile.NamedTemporaryFile(prefix="twofactor-bench-worker-", suffix=".log", delete=False)  # noqa: SIM115
        module = ["-m", "twofactor_workers"]
        valgrind: list[str] = []
        if args.callgrind:  # instructions, not time: repeatable on a busy machine
            valgrind = ["valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no",
                        f"--callgrind-out-file={args.callgrind}/cg.%p"]  # fmt: skip
        if args.profile:  # the same worker under cProfile (bench/profiled_worker.py)
            module = [str(Path(__file__).with_name("profiled_worker.py")), args.profile]
        command = [
            *valgrind,
            sys.executable,
            *module,
            f"--concurrency={args.concurrency}",
            "--loglevel=WARNING",
        ]
        env = dict(self.env)
        while options and "=" in options[0] and options[0].split("=")[0].isupper():
            key, _, value = options[0].partition(
                "="
            )  # KEY=VALUE before the options: the worker's environment
            env[key] = value
            options = options[1:]
        command += options
        worker = subprocess.Popen(
            command, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            expected = len(sink.arrivals) + len(warm)
            self.push(warm)
            if not sink.wait_for(expected, timeout=600 if args.callgrind else 120):
                raise SystemExit(f"the worker did not warm up in 120 s; its log: {log.name}")
            time.sleep(
                0.5
            )  # the pool processes idle again (the bench's own pacing, not a wait on a condition)
            expected = len(sink.arrivals) + len(messages)
            pids = session_pids(worker.pid)
            if args.callgrind:
                callgrind_control(pids, "-i", "on")
            main0, pool0 = session_cpu(worker.pid)
            pg0, t0 = postgres_cpu(backends), time.perf_counter()
            self.push(messages)
            if not sink.wait_for(expected, timeout=1800 if args.callgrind else 300):
                raise SystemExit(
                    f"the worker did not deliver {len(messages)} emails in time; log: {log.name}"
                )
            wall = time.perf_counter() - t0
            main1, pool1 = session_cpu(worker.pid)
            pg1 = postgres_cpu(backends)
            instructions = (0.0, 0.0)
            if args.callgrind:
                callgrind_control(pids, "-d")
                callgrind_control(pids, "-i", "off")
                instructions = dumped_instructions(args.callgrind, pids, worker.pid)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
            log.close()
            os.unlink(log.name)
        n = len(messages)
        return Result(
            n / wall, (main1 - main0) / n * 1e6, (pool1 - pool0) / n * 1e6, (pg1 - pg0) / n * 1e6,
            instructions[0] / n, instructions[1] / n,
        )  # fmt: skip


def session_pids(session: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat:
                    if int(stat.read().rpartition(")")[2].split()[3]) == session:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def callgrind_control(pids: list[int], *command: str) -> None:
    """Send a command to each of these processes only (never without a pid: that means all of
    the machine's callgrind processes, other people's too)."""
    for pid in pids:
        assert pid > 0
        subprocess.run(
            ["callgrind_control", *command, str(pid)], check=True, capture_output=True, timeout=120
        )


def dumped_instructions(directory: str, pids: list[int], leader: int) -> tuple[float, float]:
    """Instructions in the last dump of (the session leader, the other processes)."""
    leader_ir = others = 0.0
    for pid in pids:
        dumps = sorted(Path(directory).glob(f"cg.{pid}.*"), key=lambda p: int(p.suffix[1:]))
        if not dumps:
            continue
        totals = [line for line in dumps[-1].read_text().splitlines() if line.startswith("totals:")]
        ir = float(totals[0].split()[1]) if totals else 0.0
        if pid == leader:
            leader_ir += ir
        else:
            others += ir
    return leader_ir, others


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emails", type=int, default=1000, help="emails per measurement (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="measurements of each configuration (default 3)")
    parser.add_argument("--concurrency", type=int, default=4, help="the worker's --concurrency (default 4)")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="NAME=options of `twofactor worker` (after `--`: of `celery worker`); repeatable; "
        "default one configuration, the worker's defaults",
    )
    parser.add_argument(
        "--callgrind", metavar="DIR", help="run the worker under callgrind: instructions per email (slow)"
    )
    parser.add_argument("--profile", metavar="DIR", help="run the worker under cProfile, profiles in DIR")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    configs = [(c.partition("=")[0], shlex.split(c.partition("=")[2])) for c in args.config or ["default="]]
    schema = f"tf_bench_{uuid.uuid4().hex[:12]}"
    queue = f"twofactor-bench-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = f"{args.database_url}?options=-csearch_path%3D{schema}&application_name={schema}"
    keys = Keyring.new_key_spec(1)
    db = PostgresDatabase(url, pool_size=8)
    results: dict[str, list[Result]] = {name: [] for name, _ in configs}
    try:
        db.migrate()
        with BenchSink() as sink, PostgresPids(args.database_url, schema) as backends:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")},
                "TWOFACTOR_DATABASE_URL": url,
                "TWOFACTOR_KEYS": keys,
                "TWOFACTOR_LOG_LEVEL": "WARNING",
                **sink_delivery(args.redis_url, queue, sink.port),
                "TWOFACTOR_OUTBOX_RECOVERY_SECONDS": "3600",
            }
            bench = Bench(db, env, Keyring.parse(keys), queue)
            print(
                f"{args.emails} emails per measurement, --concurrency {args.concurrency}, "
                f"{os.cpu_count()} CPUs"
            )
            for run in range(args.runs):
                for name, options in configs if run % 2 == 0 else configs[::-1]:
                    r = bench.measure(sink, backends, options, args)
                    results[name].append(r)
                    print(f"run {run + 1} {name:<16} {r.line(bool(args.callgrind))}", flush=True)
    finally:
        db.close()
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        forget_queue(args.redis_url, queue)
    print(f"\nmedian of {args.runs} runs:")
    for name, options in configs:
        if results[name]:
            median = Result(*(statistics.median(getattr(r, f.name) for r in results[name]) for f in FIELDS))
            print(f"  {name:<16} {median.line(bool(args.callgrind))}   [{shlex.join(options)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
