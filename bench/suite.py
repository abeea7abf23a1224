"""The whole bench in one run and one table: `make bench`, or `make bench-quick` (about a minute).

    .venv/bin/python bench/suite.py [--quick] [--users N --email-users E --clients P --threads T
                                     --seconds S --rounds R --worker-concurrency C --worker-nice W
                                     --worker-idle --processes N --client h2|grpc]

On a fresh PostgreSQL schema, a private Redis queue and a local SMTP sink
(aiosmtpd, in a child process), starts `twofactor serve` and one `twofactor worker`
(at nice W, 10 by default: a worker that shares the server's cores yields them to
the logins, as an operator would run it there; 0 as before 2026-11-30) as separate
processes, then measures, each with calls/s, p50/p99 and CPU µs per
call of the server, PostgreSQL, the workers and the client processes:

- enrollment: StartEnrollment(AUTHENTICATOR) + ConfirmEnrollment for N users;
- Health/Check, Verify with a fresh correct code (accepted), Verify with a wrong
  code (rejected), in R rounds of S seconds (medians);
- one committed single-row UPDATE from this process (the PostgreSQL floor), back to back and
  at the accepted-Verify rate over as many connections as the server's pool used;
- SendCode(EMAIL) flood, then the delivery rate of the worker until the sink
  has every message (worker CPU per email, SMTP connections per email);
- end-to-end latency SendCode -> SMTP acceptance, one message at a time.

Prints the table and the issue's ratios with their targets. Exits 1 when a
phase had errors, rejected codes or too few users. Figures on a shared or
loaded machine are indicative only: the `other` CPU column says how loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from loadgen import (
    HEALTH,
    REJECTED,
    SENDCODE,
    SERVE,
    STEP_SECONDS,
    VERIFY,
    Clients,
    CpuMeter,
    CpuRecorder,
    PhaseResult,
    ServerProcess,
    _on_cpu_seconds,
    add_client_option,
    clients,
    server_env,
    sink_delivery,
    wait_serving,
)
from plans import explain_all, print_plans
from populate import PopulatedUser, Population, email_indices, populate, print_sizes, spread
from psycopg import sql
from sendcode_path import make_users as make_email_users
from sink import BenchSink
from twofactor.v1 import twofactor_service_pb2

from twofactor_server.domain.keyring import Keyring
from twofactor_server.storage.database import PostgresDatabase
from twofactor_server.supervisor import process_count

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# privacyIDEA 3.14's correct TOTP checks/s (no PIN, 2 gunicorn workers, c=8), measured on this
# machine kind when quiet with bench/privacyidea.py on 2026-11-30: 34-36 (the 16 was a
# slower day). Measure it again beside a run and pass it with --privacyidea-rate.
PRIVACYIDEA_CALLS_PER_SECOND = 35.0
# The throughput target: Verify >= 100x privacyIDEA's checks/s.
THROUGHPUT_TARGET = 100.0
# A Verify phase sends each user at most once (a TOTP step is accepted once), so it counts at most
# users / seconds calls/s: by default enough users for the throughput target with this margin.
USERS_MARGIN = 1.25
GAP = 0.5
# pg_backends: this run's own backends, a part of `postgres` (which adds PostgreSQL's background
# processes); other: everything else on the machine (a loaded machine shows here).
COLUMNS = ("server", "postgres", "pg_backends", "workers", "clients", "other")
HEADINGS = {"pg_backends": "pg own"}
# --qr-format: the QR code images StartEnrollment asks for in the enrollment phase.
QR_FORMATS: dict[str, list[int]] = {
    "none": [],
    "png": [twofactor_service_pb2.QR_CODE_FORMAT_PNG],
    "svg": [twofactor_service_pb2.QR_CODE_FORMAT_SVG],
}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # A SIGTERM (timeout, kill) unwinds like Ctrl-C: the server, worker and schema are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run = uuid.uuid4().hex[:10]
    schema, queue = f"tf_bench_{run}", f"tf_bench_{run}"
    token = "bench-" + secrets.token_urlsafe(24)
    sink = BenchSink()
    sink.start()
    # application_name tells this run's backends from other sessions' on a shared PostgreSQL.
    env = server_env(
        database_url(args, schema, schema),
        Keyring.new_key_spec(1),
        token,
        {
            **sink_delivery(args.redis_url, queue, sink.port),
            # The rejected phase sends many wrong codes per user, SendCode many codes per user.
            "TWOFACTOR_LOCKOUT_THRESHOLD": "100",
            "TWOFACTOR_MAX_CONSECUTIVE_FAILURES": "100",
            "TWOFACTOR_RESEND_COOLDOWN_SECONDS": "0",
            "TWOFACTOR_SENDS_PER_USER_PER_HOUR": "1000",
            "TWOFACTOR_SENDS_PER_DESTINATION_PER_HOUR": "1000",
        },
    )
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    rows: dict[str, Row] = {}
    valid = True
    try:
        with contextlib.ExitStack() as stack:
            server = ServerProcess(server_command(args.processes), env, cwd=str(ROOT))
            stack.callback(server.stop)
            target = f"127.0.0.1:{server.wait_listening(timeout=60)}"
            wait_serving(target, timeout=30)
            population = populated(args, env, schema) if args.population else None
            worker_env = {
                **env,
                "TWOFACTOR_DATABASE_URL": database_url(args, schema, worker_application_name(schema)),
            }
            worker = stack.enter_context(
                running_worker(worker_env, args.worker_concurrency, args.worker_nice, idle=args.worker_idle)
            )
            load = stack.enter_context(
                clients(target, processes=args.clients, threads=args.threads, token=token, client=args.client)
            )
            backends = stack.enter_context(PostgresPids(args.database_url, schema))
            meter = BufferMeter(server.pid, load.pids, worker.pid, backends)
            print(
                f"server pid {server.pid} ({args.processes} process(es)) on {target}; worker pid "
                f"{worker.pid} (concurrency {args.worker_concurrency}, nice {args.worker_nice}"
                f"{', SCHED_IDLE' if args.worker_idle else ''}); "
                f"schema {schema}; "
                f"{args.clients} client processes x {args.threads} threads (client {args.client}); "
                f"{os.cpu_count()} CPUs",
                flush=True,
            )
            rows["enrollment"], ok = measure_enrollment(load, meter, args.users, args.qr_format)
            valid &= ok
            if population is None:
                email_users = create_email_users(env["TWOFACTOR_DATABASE_URL"], args.email_users)
            else:  # the Verify and SendCode phases use users spread over the whole population
                load.set_users([(u.user_id, u.secret_base32, u.last_step) for u in population if not u.email])
                email_users = [u.user_id for u in population if u.email]
            load.set_email_users(email_users)
            for kind, row in measure_rpcs(load, meter, args).items():
                rows[kind] = row
                valid &= row.valid
            # The PostgreSQL floor twice: back to back (the wording), and in the shape of
            # the accepted-Verify phase just measured (its rate, over as many backends as the
            # server's pool used), whose backends sleep between statements (docs/benchmarks.md).
            verify = rows[VERIFY]
            create_floor_table(args, schema, max(args.clients * args.threads, verify.backends))
            rows["update"] = measure_updates(args, schema, meter, args.clients * args.threads)
            if verify.rate > 0:
                paced = max(1, verify.backends)
                rows["paced update"] = measure_updates(args, schema, meter, paced, rate=verify.rate)
            rows[SENDCODE], rows["delivery"] = measure_sendcode(load, meter, sink, args, schema, worker.pid)
            valid &= rows[SENDCODE].valid and rows["delivery"].valid
            rows["e2e"] = measure_end_to_end(target, token, sink, email_users, args.e2e_messages)
            valid &= rows["e2e"].valid
            # Half the maximum, which was measured with the worker stopped: once so again (the
            # server's latency at half its load), once with the worker delivering on the same cores.
            half = rows[SENDCODE].rate / 2
            os.killpg(worker.pid, signal.SIGSTOP)
            try:
                rows["paced"] = measure_paced_sendcode(
                    target, token, email_users, half, args.seconds, "worker stopped"
                )
            finally:
                os.killpg(worker.pid, signal.SIGCONT)
            valid &= rows["paced"].valid and wait_drained(args.database_url, schema, timeout=180)
            rows["paced delivering"] = measure_paced_sendcode(
                target, token, email_users, half, args.seconds, "delivering"
            )
            valid &= rows["paced delivering"].valid
            # That half is more than one worker delivers on these cores (the delivery row), so
            # the queue grows through the phase. The email path as a whole carries no more than
            # that delivery rate (reached with the server idle: with SendCode beside it, less);
            # half of it, the worker delivering, is the load the path takes at half its maximum.
            valid &= wait_drained(args.database_url, schema, timeout=180)
            rows["paced path"] = measure_paced_sendcode(
                target, token, email_users, rows["delivery"].rate / 2, args.seconds, "delivering"
            )
            valid &= rows["paced path"].valid
            if args.plans and population:
                url = env["TWOFACTOR_DATABASE_URL"]
                print_sizes(args.database_url, schema, args.population + args.users)
                user = next(u for u in population if not u.email)
                mail = next(u for u in population if u.email)
                print_plans(explain_all(url, env["TWOFACTOR_KEYS"], user, mail))
    finally:
        sink.stop()
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        forget_queue(args.redis_url, queue)
    print_table(rows, args)
    if not valid:
        print("INVALID RUN: a phase had errors, rejected codes or too few users (see the lines above)")
    return 0 if valid else 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about one minute: fewer users, shorter phases")
    parser.add_argument(
        "--users",
        type=int,
        help="authenticator users (default: enough for Verify at the throughput target, at least "
        "12000; quick 2000)",
    )
    parser.add_argument(
        "--email-users", type=int, help="users with email enabled (default 10000; quick 3000)"
    )
    parser.add_argument("--clients", type=int, help="client processes (default 4; quick 2)")
    parser.add_argument("--threads", type=int, default=4, help="closed-loop threads per client process")
    parser.add_argument("--seconds", type=float, help="length of each measured phase (default 5; quick 1)")
    parser.add_argument("--rounds", type=int, help="rounds of Health/Verify phases (default 3; quick 1)")
    parser.add_argument("--e2e-messages", type=int, help="end-to-end samples (default 100; quick 20)")
    parser.add_argument("--worker-concurrency", type=int, default=4, help="the worker's pool processes")
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=10,
        help="the worker's niceness (10: it yields the shared cores to the server; 0: it competes)",
    )
    parser.add_argument(
        "--worker-idle",
        action="store_true",
        help="run the worker under SCHED_IDLE (chrt --idle 0): a core only when nothing else wants it",
    )
    parser.add_argument(
        "--privacyidea-rate",
        type=float,
        default=PRIVACYIDEA_CALLS_PER_SECOND,
        help="privacyIDEA's checks/s on this machine, from bench/privacyidea.py (default %(default)g)",
    )
    parser.add_argument(
        "--qr-format",
        choices=sorted(QR_FORMATS),
        default="none",
        help="the QR code image StartEnrollment asks for in the enrollment phase (default none: "
        "the bench computes codes from the secret; a login page asks for the one it shows)",
    )
    parser.add_argument("--processes", default="1", help="`twofactor serve --processes` (when supported)")
    parser.add_argument(
        "--population",
        type=int,
        default=0,
        help="first enroll this many users in bulk (bench/populate.py); Verify and SendCode then use "
        "--sample of them, spread over the whole population",
    )
    parser.add_argument(
        "--sample",
        type=int,
        help="with --population: users the Verify phases use (default: enough for Verify at the "
        "throughput target, at least 10000)",
    )
    parser.add_argument(
        "--plans", action="store_true", help="with --population: bytes per user and query plans"
    )
    add_client_option(parser)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args(argv)
    defaults = (
        {"email_users": 3000, "clients": 2, "seconds": 1.0, "rounds": 1, "e2e_messages": 20}
        if args.quick
        else {
            "email_users": 10000,
            "clients": 4,
            "seconds": 5.0,
            "rounds": 3,
            "e2e_messages": 100,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # Users for a Verify phase at the throughput target and then some, in thousands.
    enough = math.ceil(USERS_MARGIN * THROUGHPUT_TARGET * args.privacyidea_rate * args.seconds / 1000) * 1000
    if args.users is None:
        args.users = max(2000 if args.quick else 12000, enough)
    if args.sample is None:
        args.sample = max(10000, enough)
    if not 0 < args.seconds <= 25 or args.users < args.clients * args.threads or args.email_users < 1:
        parser.error("need 0 < --seconds <= 25, a user per client thread and at least one email user")
    return args


def populated(args: argparse.Namespace, env: dict[str, str], schema: str) -> list[PopulatedUser]:
    """Enroll --population users in bulk into the server's schema (it migrated it at start); return
    the sample the phases use: --sample authenticator users and --email-users email users, each
    spread evenly over the population (not only its newest rows)."""
    url = env["TWOFACTOR_DATABASE_URL"]
    population = Population(
        args.population,
        prefix=f"pop-{uuid.uuid4().hex[:6]}-",
        keys=env["TWOFACTOR_KEYS"],
        now_ms=int(time.time() * 1000),
        actor="bench",
    )
    mail = list(email_indices(population))
    plain = [i for i in range(args.population) if not population.has_email(i)]
    keep = {*spread(len(plain), args.sample, among=plain), *spread(len(mail), args.email_users, among=mail)}
    began = time.monotonic()
    users = populate(url, population, keep=keep, processes=os.cpu_count() or 1, progress=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")  # as autovacuum leaves a table that grew slowly
        conn.execute("CHECKPOINT")  # the load's dirty pages written now, not during the phases
    print(f"population: {args.population:,} users in bulk in {time.monotonic() - began:.0f} s", flush=True)
    return users


def database_url(args: argparse.Namespace, schema: str, application_name: str) -> str:
    return f"{args.database_url}?options=-csearch_path%3D{schema}&application_name={application_name}"


def worker_application_name(schema: str) -> str:
    """The worker's backends are the run's too, named apart: their outbox recovery rounds are
    not the statements of the phase that runs meanwhile."""
    return f"{schema}-worker"


def server_command(processes: str) -> list[str]:
    return [*SERVE] if processes == "1" else [*SERVE, "--processes", processes]


class Row:
    """One line of the table."""

    def __init__(
        self, label: str, result: PhaseResult | None, cpu: dict[str, float] | None, count: int
    ) -> None:
        self.label = label
        self.result = result
        self.cpu_us = {k: (cpu or {}).get(k, 0.0) / max(count, 1) * 1e6 for k in COLUMNS}
        # Within `pg own`: the backends that ran the phase's statements alone (own_parts).
        self.statements_us = (cpu or {}).get("pg_statements", float("nan")) / max(count, 1) * 1e6
        self.rate = result.throughput if result else 0.0
        self.p50 = result.percentile(0.5) if result else float("nan")
        self.p99 = result.percentile(0.99) if result else float("nan")
        self.valid = result.valid if result else False
        self.note = ""
        self.backends = 0  # the statement backends that ran the phase (RPC phases: the server's pool)
        self.round_ratios: list[float] = []  # accepted Verify: server CPU over its round's Health/Check


def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    spent = {key: after[key] - before[key] for key in ("server", "postgres", "workers", "redis", "clients")}
    spent["other"] = max(0.0, after["machine_busy"] - before["machine_busy"] - sum(spent.values()))
    for key in ("pg_backends", "pg_statements"):  # within "postgres": kept out of `other`
        if key in before and key in after:
            spent[key] = after[key] - before[key]
    for key in BUFFER_KEYS:  # not CPU: kept out of `other`
        if key in before and key in after:
            spent[key] = after[key] - before[key]
    return spent


BUFFER_KEYS = ("blks_hit", "blks_read", "wal_fpi", "wal_bytes")  # WAL: pg_stat_statements only


def buffers_per_call(spent: dict[str, float], calls: int) -> str:
    """Shared buffers found (hit) and read from the OS (read) per call in the phase, when counted."""
    if not calls or not all(key in spent for key in BUFFER_KEYS[:2]):
        return ""
    text = f"  blks/call hit {spent['blks_hit'] / calls:.1f} read {spent['blks_read'] / calls:.2f}"
    if "wal_bytes" in spent:  # full-page images: the first change of a page after a checkpoint
        text += f"  wal/call {spent['wal_bytes'] / calls:.0f} B, fpi {spent['wal_fpi'] / calls:.2f}"
    return text


class PostgresPids:
    """The postgres processes that count for this run: the backends whose application_name is the
    run's (the server's, the worker's as `<run>-worker`, the UPDATE floors') and PostgreSQL's
    background processes (WAL writer, checkpointer, autovacuum workers of every database...); other
    sessions on a shared PostgreSQL are left out. `backends()` names the first kind alone, as of the
    last call: the CPU the run's own statements cost, which the issue's ratio compares
    (docs/benchmarks.md). `statement_backends()` names those of them that run a phase's statements:
    the server's pool (or a floor's connections), not the worker's outbox recovery nor the server's
    storage probe (its own connection, which only ever runs SELECT 1)."""

    def __init__(self, database_url: str, application_name: str) -> None:
        self._conn = psycopg.connect(database_url, autocommit=True)
        self._name = application_name
        self._lock = threading.Lock()
        self._statements: bool | None = None  # whether pg_stat_statements is there
        self._own: set[int] = set()
        self._statement_backends: set[int] = set()

    def __enter__(self) -> PostgresPids:
        return self

    def __exit__(self, *_: object) -> None:
        self._conn.close()

    def __call__(self) -> set[int]:
        with self._lock:
            names = (self._name, worker_application_name(self._name))
            rows = self._conn.execute(
                "SELECT pid, application_name, query FROM pg_stat_activity "
                "WHERE application_name IN (%s, %s) "
                # Parallel workers carry their leader's application_name: another session's are not ours.
                "OR backend_type NOT IN ('client backend', 'parallel worker')",
                names,
            ).fetchall()
            self._own = {int(pid) for pid, name, _ in rows if name in names}
            self._statement_backends = {
                int(pid) for pid, name, query in rows if name == self._name and query != "SELECT 1"
            }
        return {int(pid) for pid, _, _ in rows}

    def backends(self) -> set[int]:
        """This run's own backends among the pids the last call returned."""
        with self._lock:
            return set(self._own)

    def statement_backends(self) -> set[int]:
        """Those of the run's own backends that run the phases' statements, as of the last call."""
        with self._lock:
            return set(self._statement_backends)

    def buffers(self) -> dict[str, float]:
        """Shared-buffer hits and reads (pages not in shared buffers: from the OS cache or the
        disk) so far, of every statement in the database. From pg_stat_statements when the
        extension is there (counted as each statement ends), else from pg_stat_database (each
        backend reports about once a second: a phase's figure may be off by a second's calls).
        On a shared PostgreSQL other sessions' statements count too: use a private cluster."""
        with self._lock:
            if self._statements is None:
                self._statements = bool(
                    self._conn.execute(
                        "SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'"
                    ).fetchone()
                )
            query = (
                "SELECT sum(shared_blks_hit), sum(shared_blks_read), sum(wal_fpi), sum(wal_bytes) "
                "FROM pg_stat_statements"
                if self._statements
                else "SELECT blks_hit, blks_read FROM pg_stat_database WHERE datname = current_database()"
            )
            row = self._conn.execute(query).fetchone()
        return {key: float(value or 0) for key, value in zip(BUFFER_KEYS, row or (), strict=False)}


class BufferMeter(CpuMeter):
    """CpuMeter whose snapshots also carry PostgreSQL's shared-buffer hits and reads, and the CPU
    of the backends that run the phases' statements ("pg_statements", within "pg_backends")."""

    def __init__(
        self, server_pid: int, client_pids: list[int], worker_pid: int, backends: PostgresPids
    ) -> None:
        super().__init__(server_pid, client_pids, worker_pid, backends, backends.backends)
        self._backends = backends
        # The CPU so far of every statement backend seen, as of each snapshot (numbered in the
        # snapshot's "snapshot" key): which backends ran between two snapshots. The last figure
        # of a backend that exits is kept, so the sum never goes down.
        self._statement_cpu: dict[int, float] = {}
        self._taken: list[dict[int, float]] = []

    def snapshot(self) -> dict[str, float]:
        spent = super().snapshot()  # refreshes the backends' list
        for pid in self._backends.statement_backends():
            self._statement_cpu[pid] = max(self._statement_cpu.get(pid, 0.0), _on_cpu_seconds(pid))
        self._taken.append(dict(self._statement_cpu))
        spent["pg_statements"] = sum(self._statement_cpu.values())
        spent["snapshot"] = len(self._taken) - 1
        return {**spent, **self._backends.buffers()}

    def statement_backends_that_ran(self, before: dict[str, float], after: dict[str, float]) -> int:
        """How many statement backends used CPU between two snapshots: in an RPC phase, the
        connections of the server's pool that served it (the pool hands them out in turn)."""
        first, last = self._taken[int(before["snapshot"])], self._taken[int(after["snapshot"])]
        return sum(seconds > first.get(pid, 0.0) for pid, seconds in last.items())


def measure_enrollment(load: Clients, meter: CpuMeter, users: int, qr_format: str) -> tuple[Row, bool]:
    run = uuid.uuid4().hex[:8]
    before, began = meter.snapshot(), time.monotonic()
    latencies = load.enroll(
        [f"bench-{run}-{i:06d}" for i in range(users)], timeout=3600, qr_formats=QR_FORMATS[qr_format]
    )
    took, after = time.monotonic() - began, meter.snapshot()
    result = PhaseResult("enroll", took, latencies)
    print(f"enrollment  {result.line()}{buffers_per_call(used(before, after), result.calls)}", flush=True)
    drawn = "" if qr_format == "none" else f" + {qr_format.upper()}"
    label = f"enrollment (Start{drawn} + Confirm)"
    return Row(label, result, used(before, after), result.calls), result.valid


def create_email_users(database_url: str, count: int) -> list[str]:
    """Users with a registered address and email enabled, written in bulk through the storage
    layer (as an enrollment leaves them), not through the API: enough of them that the SendCode
    flood sends each at most one code or so, so the worker's backlog is emails to send, not codes
    superseded by a newer one (which it skips, and the delivery rate would not count)."""
    db = PostgresDatabase(database_url, pool_size=1, timeout=600)  # one transaction for them all
    try:
        return make_email_users(db, uuid.uuid4().hex[:8], count)
    finally:
        db.close()


def measure_rpcs(load: Clients, meter: BufferMeter, args: argparse.Namespace) -> dict[str, Row]:
    """Health/Check, Verify accepted, Verify rejected: R rounds after a warm-up; the median round of each."""
    phases, warmups = schedule(args)
    recorder = CpuRecorder(meter, phases)
    runs: dict[str, list[tuple[PhaseResult, dict[str, float]]]] = {HEALTH: [], VERIFY: [], REJECTED: []}
    for index, result in enumerate(load.run_schedule(phases)):
        taken = recorder.taken(index)
        spent = used(*taken) if taken else {}
        if taken:
            spent["pool_backends"] = meter.statement_backends_that_ran(*taken)
        warmup = index < warmups
        cpu = "".join(
            f"  {HEADINGS.get(name, name)} {spent[name] / result.calls * 1e6:.0f}"
            for name in ("server", "postgres", "pg_backends")
            if name in spent and result.calls
        )
        cpu = f"   cpu us/call:{cpu}{own_parts(spent, result.calls)}" if cpu else ""
        cpu += buffers_per_call(spent, result.calls)
        print(f"{'warm-up' if warmup else 'round':<8} {result.line()}{cpu}", flush=True)
        if not warmup:
            runs[result.kind].append((result, spent))
    labels = {HEALTH: "Health/Check", VERIFY: "Verify (accepted)", REJECTED: "Verify (rejected)"}
    # Each round's Verify against the Health/Check just before it, in the same minute: the
    # table's medians may pair rounds that the machine treated differently.
    round_ratios = [
        (verify[1]["server"] / verify[0].calls) / (health[1]["server"] / health[0].calls)
        for health, verify in zip(runs[HEALTH], runs[VERIFY], strict=False)
        if health[0].calls and verify[0].calls and health[1].get("server") and "server" in verify[1]
    ]
    rows = {}
    for kind, measured in runs.items():
        measured.sort(key=lambda pair: pair[0].throughput)
        result, spent = measured[len(measured) // 2]  # the median round by throughput
        row = Row(labels[kind], result, spent, result.calls)
        row.valid = all(r.valid for r, _ in measured)
        row.backends = int(spent.get("pool_backends", 0))
        rows[kind] = row
    rows[VERIFY].round_ratios = round_ratios
    return rows


def own_parts(spent: dict[str, float], calls: int) -> str:
    """`pg own` in its two parts, µs per call: the backends that ran the phase's statements (the
    server's pool, or a floor's connections; how many of them did) and the rest of the run's own
    backends (the server's storage probe, the worker's outbox recovery), which run whatever the phase."""
    if not calls or "pg_statements" not in spent:
        return ""
    statements = spent["pg_statements"] / calls * 1e6
    rest = (spent["pg_backends"] - spent["pg_statements"]) / calls * 1e6
    ran = f" on {spent['pool_backends']:.0f} backends" if "pool_backends" in spent else ""
    return f" (statements {statements:.0f}{ran}, probe+worker {rest:.0f})"


def schedule(args: argparse.Namespace) -> tuple[list[tuple[str, float, float]], int]:
    """The phases, and how many of them at the start are warm-up.

    A warm-up of each kind (Health/Check only with --quick: a Verify warm-up would
    use up the users of a TOTP step, and waiting for the next costs up to 30 s), then
    per round Health/Check, Verify (just after a step boundary, so every user is
    fresh) and Verify with wrong codes.
    """
    phases = []
    t = time.time() + 1.0
    warm = min(1.0, args.seconds)
    if args.quick:
        phases.append((HEALTH, t, t + warm))
        t += warm + GAP
    else:
        boundary = math.ceil((t + warm + GAP) / STEP_SECONDS) * STEP_SECONDS
        phases.append((HEALTH, boundary - GAP - warm, boundary - GAP))
        phases.append((VERIFY, boundary + GAP, boundary + GAP + warm))
        phases.append((REJECTED, boundary + 2 * GAP + warm, boundary + 2 * GAP + 2 * warm))
        t = boundary + 3 * GAP + 2 * warm
    warmups = len(phases)
    for _ in range(args.rounds):
        boundary = math.ceil((t + args.seconds + GAP) / STEP_SECONDS) * STEP_SECONDS
        phases.append((HEALTH, boundary - GAP - args.seconds, boundary - GAP))
        phases.append((VERIFY, boundary + GAP, boundary + GAP + args.seconds))
        phases.append((REJECTED, boundary + 2 * GAP + args.seconds, boundary + 2 * GAP + 2 * args.seconds))
        t = boundary + 3 * GAP + 2 * args.seconds
    return phases, warmups


def create_floor_table(args: argparse.Namespace, schema: str, rows: int) -> None:
    """The floors' table: one row per connection, each connection updating its own."""
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".bench_row (id int PRIMARY KEY, n bigint NOT NULL)')
        conn.execute(
            sql.SQL("INSERT INTO {}.bench_row SELECT i, 0 FROM generate_series(0, %s) i").format(
                sql.Identifier(schema)
            ),
            (rows - 1,),
        )


def measure_updates(
    args: argparse.Namespace, schema: str, meter: BufferMeter, connections: int, rate: float | None = None
) -> Row:
    """Committed single-row UPDATEs (autocommit, one row per connection) from this process.

    Without `rate`, back to back: each connection sends its next UPDATE as soon as the last one
    returns (closed loop), so its backend rarely sleeps. With `rate`, in the shape of the Verify
    phase's load on the server's pool: UPDATEs due every 1/rate s, open loop (on their schedule,
    whatever the others do), dealt to the connections in turn as the pool hands out its
    connections, so each backend wakes for one statement every connections/rate s.
    """
    start = time.time() + 1.0
    end = start + args.seconds
    result = PhaseResult("update" if rate is None else "update@", args.seconds)
    finished: list[float] = []  # when each UPDATE in the phase returned
    lock = threading.Lock()

    def loop(index: int) -> None:
        mine, times = [], []
        with psycopg.connect(args.database_url, autocommit=True, application_name=schema) as conn:
            statement = sql.SQL("UPDATE {}.bench_row SET n = n + 1 WHERE id = %s").format(
                sql.Identifier(schema)
            )
            conn.execute(statement, (index,), prepare=True)
            time.sleep(max(0.0, start - time.time()))
            for turn in itertools.count():
                if rate is not None:  # the schedule, not a wait for anything
                    time.sleep(max(0.0, start + (turn * connections + index) / rate - time.time()))
                if (began := time.time()) >= end:
                    break
                t0 = time.perf_counter()
                conn.execute(statement, (index,), prepare=True)
                elapsed = time.perf_counter() - t0
                if began + elapsed <= end:
                    mine.append(elapsed * 1000)
                    times.append(began + elapsed)
        with lock:
            result.latencies_ms.extend(mine)
            finished.extend(times)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, start - time.time()))
    before = meter.snapshot()
    # The snapshots take a while (and share this process with the UPDATE threads): the CPU
    # per UPDATE counts the UPDATEs that returned between the two, not the whole phase's.
    measured_from = time.time()
    time.sleep(max(0.0, end - 0.2 - time.time()))
    measured_to = time.time()
    after = meter.snapshot()
    for thread in threads:
        thread.join()
    between = sum(measured_from <= t <= measured_to for t in finished)
    spent = used(before, after)
    print(f"{result.kind:<8} {result.line()}{own_parts(spent, between)}", flush=True)
    if rate is None:
        row = Row("1-row UPDATE, back to back", result, spent, between)
        row.note = f"floor: {connections} connections, closed loop"
    else:
        row = Row("1-row UPDATE at Verify's rate", result, spent, between)
        row.note = f"floor: {rate:.0f}/s open loop over {connections} connections"
    row.backends = connections
    row.cpu_us["clients"] = float("nan")  # the UPDATE clients are threads of this process
    return row


def measure_sendcode(
    load: Clients, meter: CpuMeter, sink: BenchSink, args: argparse.Namespace, schema: str, worker_pid: int
) -> tuple[Row, Row]:
    """A SendCode flood with the worker stopped (SIGSTOP); then the worker, resumed, drains the backlog.

    SendCode is measured alone; the delivery rate and the workers' CPU per email are
    those of one worker emptying a full queue. A SendCode to a user whose earlier code
    is still unsent supersedes it and the worker skips it: the rate counts the emails
    the sink accepted (enough email users make that rare).
    """
    arrived_before = len(sink.arrivals)
    connections_before = sink.connections
    os.killpg(worker_pid, signal.SIGSTOP)
    try:
        start = time.time() + 1.0
        phases = [(SENDCODE, start, start + args.seconds)]
        recorder = CpuRecorder(meter, phases)
        result = next(iter(load.run_schedule(phases)))
        taken = recorder.taken(0)
        spent = used(*taken) if taken else {}
        print(f"sendcode {result.line()}{buffers_per_call(spent, result.calls)}", flush=True)
        send_row = Row("SendCode (email)", result, spent, result.calls)
        before = meter.snapshot()
        resumed = time.time()
    finally:
        os.killpg(worker_pid, signal.SIGCONT)
    drained = wait_drained(args.database_url, schema, timeout=180)
    after = meter.snapshot()
    with sink.changed:
        arrivals = sink.arrivals[arrived_before:]
        opened = sink.connections - connections_before
    window = (arrivals[-1] - resumed) if arrivals else 0.0
    delivery_row = Row("delivery (worker -> SMTP)", None, used(before, after), len(arrivals))
    delivery_row.rate = len(arrivals) / window if window > 0 else 0.0
    delivery_row.valid = drained and bool(arrivals)
    sent = result.calls + result.late
    delivery_row.note = f"{len(arrivals)} emails of {sent} SendCode, {opened} SMTP connections"
    if not drained:
        delivery_row.note += "; NOT DRAINED within 180 s"
    print(f"delivery {delivery_row.rate:9.1f} emails/s   {delivery_row.note}", flush=True)
    return send_row, delivery_row


def wait_drained(database_url: str, schema: str, timeout: float) -> bool:
    """Whether every challenge's delivery is settled (sent, failed or superseded) within `timeout`."""
    query = sql.SQL(
        "SELECT count(*) FROM {}.challenges WHERE delivery_status IN ('queued', 'sending') "
        "AND superseded_at IS NULL AND expires_at > %s"
    ).format(sql.Identifier(schema))
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(query, (int(time.time() * 1000),)).fetchone()
            if row is not None and row[0] == 0:
                return True
            time.sleep(0.05)  # polling the database from the bench, bounded by the deadline
    return False


def send_email_code(stub: Any, metadata: tuple[tuple[str, str], ...], user_id: str) -> None:
    """One SendCode by email (grpc.RpcError when refused)."""
    from twofactor.v1 import common_pb2
    from twofactor.v1 import twofactor_service_pb2 as pb

    stub.SendCode(
        pb.SendCodeRequest(user_id=user_id, method=common_pb2.METHOD_EMAIL), metadata=metadata, timeout=10
    )


def measure_end_to_end(target: str, token: str, sink: BenchSink, users: list[str], count: int) -> Row:
    """SendCode, then wait until the sink accepted that message; one at a time, the queue idle."""
    import grpc
    from twofactor.v1 import twofactor_service_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),)
    result = PhaseResult("e2e", 1.0)
    began = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(channel)
        for index in range(count):
            expected = len(sink.arrivals) + 1
            t0 = time.time()
            try:
                send_email_code(stub, metadata, users[index % len(users)])
            except grpc.RpcError as error:
                result.errors[error.code().name] += 1
                continue
            if not sink.wait_for(expected, timeout=30):
                result.errors["NOT_DELIVERED_IN_30_S"] += 1
                continue
            result.latencies_ms.append((sink.arrivals[expected - 1] - t0) * 1000)
    result.seconds = time.monotonic() - began
    print(f"e2e      {result.line()}", flush=True)
    row = Row("end-to-end SendCode -> SMTP", result, None, 1)
    row.rate = float("nan")
    row.cpu_us = dict.fromkeys(COLUMNS, float("nan"))
    return row


def measure_paced_sendcode(
    target: str, token: str, users: list[str], rate: float, seconds: float, worker: str
) -> Row:
    """SendCode at a fixed rate (open loop: each call is due on its schedule, whatever the others
    do): the latency a login sees at that load (the caller says whether the worker delivers meanwhile,
    on the same cores, with the SMTP sink in this process). Each latency counts from when its call
    was due: a call that waited for one of the 32 sending threads waited as a login would."""
    import grpc
    from twofactor.v1 import twofactor_service_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),)
    result = PhaseResult("paced", seconds)
    count = max(1, int(rate * seconds))
    lock = threading.Lock()
    with grpc.insecure_channel(target) as channel, ThreadPoolExecutor(max_workers=32) as pool:
        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(channel)

        def send(index: int, due: float) -> None:
            try:
                send_email_code(stub, metadata, users[index % len(users)])
            except grpc.RpcError as error:
                with lock:
                    result.errors[error.code().name] += 1
                return
            with lock:
                result.latencies_ms.append((time.monotonic() - due) * 1000)

        began = time.monotonic() + 0.5
        for index in range(count):
            due = began + index / rate
            time.sleep(max(0.0, due - time.monotonic()))  # the schedule, not a wait
            pool.submit(send, index, due)
    result.seconds = seconds
    print(f"sendcode@ {result.line()}  (target {rate:.1f} calls/s, {worker})", flush=True)
    row = Row(f"SendCode @{rate:.0f}/s, {worker}", result, None, 1)
    row.cpu_us = dict.fromkeys(COLUMNS, float("nan"))
    return row


@contextlib.contextmanager
def running_worker(
    env: dict[str, str], concurrency: int, nice: int = 0, *, idle: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    log = tempfile.NamedTemporaryFile(prefix="twofactor-bench-worker-", suffix=".log", delete=False)  # noqa: SIM115
    print(f"worker log: {log.name}", flush=True)
    worker = subprocess.Popen(
        [
            *(("chrt", "--idle", "0") if idle else ()),
            *(("nice", "-n", str(nice)) if nice else ()),
            sys.executable,
            "-m",
            "twofactor_server.cli",
            "worker",
            f"--concurrency={concurrency}",
            "--loglevel=WARNING",
        ],
        env=env,
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield worker
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(5)
        log.close()


def forget_queue(redis_url: str, queue: str) -> None:
    """Delete this run's queue keys (only ours: Redis is shared)."""
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(redis_url, socket_timeout=5)
        client.delete(queue, f"_kombu.binding.{queue}")
        client.close()


def background_us(row: Row) -> float:
    """PostgreSQL's background processes (WAL writer, checkpointer, autovacuum), µs per call."""
    return row.cpu_us["postgres"] - row.cpu_us["pg_backends"]


def print_table(rows: dict[str, Row], args: argparse.Namespace) -> None:
    shape = f"{args.clients} x {args.threads} closed-loop clients, {args.seconds:g} s phases"
    print(f"\n{shape}; {os.cpu_count()} CPUs; CPU in µs per call (per email for delivery)")
    head = f"{'':<32} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
    head += "".join(f" {HEADINGS.get(k, k):>9}" for k in COLUMNS)
    print(head)
    for row in rows.values():
        cells = f"{row.label:<32} {row.rate:9.1f} {row.p50:8.2f} {row.p99:8.2f}"
        cells += "".join(f" {row.cpu_us[k]:9.0f}" for k in COLUMNS)
        print(cells + (f"  {row.note}" if row.note else ""))
    print("\ntargets (issue 13):")
    health, verify, update = rows.get(HEALTH), rows.get(VERIFY), rows.get("update")
    paced = rows.get("paced update")
    checks = []
    if health and verify:
        checks.append(
            (
                "server CPU per accepted Verify / per Health/Check",
                verify.cpu_us["server"] / health.cpu_us["server"],
                "<=",
                1.5,
            )
        )
        # A STARVED phase ran out of fresh users: its rate is the bench's ceiling, not the server's.
        starved = " (STARVED: a ceiling)" if verify.result and verify.result.starved_seconds else ""
        checks.append(
            (
                f"Verify throughput / privacyIDEA's {args.privacyidea_rate:g} calls/s{starved}",
                verify.rate / args.privacyidea_rate,
                ">=",
                THROUGHPUT_TARGET,
            )
        )
    if verify and update:  # the wording: the floor back to back
        checks.append(
            (
                "PostgreSQL CPU per accepted Verify / per UPDATE back to back",
                verify.cpu_us["pg_backends"] / update.cpu_us["pg_backends"],
                "<=",
                1.2,
            )
        )
    if verify and paced:  # the floor in the shape of Verify's load: backends waking per statement
        checks.append(
            (
                "PostgreSQL CPU per accepted Verify / per UPDATE at Verify's rate",
                verify.cpu_us["pg_backends"] / paced.cpu_us["pg_backends"],
                "<=",
                1.2,
            )
        )
    if "enrollment" in rows:
        processes = process_count(args.processes)  # as many as `serve --processes` starts
        per_process = rows["enrollment"].rate / processes
        checks.append(("enrollments/s per server process", per_process, ">=", 300.0))
    if SENDCODE in rows:
        checks.append(("server CPU µs per SendCode", rows[SENDCODE].cpu_us["server"], "<=", 1000.0))
    if "delivery" in rows:
        checks.append(("emails/s delivered by one worker", rows["delivery"].rate, ">=", 300.0))
    if "e2e" in rows:
        checks.append(("end-to-end p50 ms, idle queue", rows["e2e"].p50, "<=", 100.0))
    if "paced" in rows:
        checks.append(("SendCode p99 ms at half the max rate, worker stopped", rows["paced"].p99, "<=", 20.0))
    if "paced delivering" in rows:
        delivering = rows["paced delivering"].p99
        checks.append(("SendCode p99 ms at half the max rate, worker delivering", delivering, "<=", 20.0))
    if "paced path" in rows:
        on_path = rows["paced path"].p99
        checks.append(("SendCode p99 ms at half the delivery rate, worker delivering", on_path, "<=", 20.0))
    for label, value, sense, target in checks:
        met = value <= target if sense == "<=" else value >= target
        print(f"  {label:<64} {value:9.2f}  target {sense} {target:g}  {'met' if met else 'NOT MET'}")
    if verify and len(verify.round_ratios) > 1:
        by_round = ", ".join(f"{ratio:.2f}" for ratio in verify.round_ratios)
        print(
            f"  (Verify / Health/Check server CPU round by round, each against its own round: {by_round}; "
            f"median {statistics.median(verify.round_ratios):.2f})"
        )
    floors = [(name, row) for name, row in (("back to back", update), ("at Verify's rate", paced)) if row]
    if verify and floors:
        print("  (the PostgreSQL ratios above are on `pg own`, the run's own backends; measured otherwise:")
        for name, row in floors:
            print(
                f"   per UPDATE {name}: the statements' backends alone (no storage probe, no outbox "
                f"recovery) {verify.statements_us / row.statements_us:.2f}; with PostgreSQL's background "
                f"processes, `postgres`, {verify.cpu_us['postgres'] / row.cpu_us['postgres']:.2f} "
                f"(background µs per call: Verify {background_us(verify):.0f}, "
                f"UPDATE {background_us(row):.0f})"
            )
        print("  )")


if __name__ == "__main__":
    sys.exit(main())
