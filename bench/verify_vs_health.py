"""Verify versus Health/Check: throughput and latency on one server, in one run.

    .venv/bin/python bench/verify_vs_health.py [--users N --clients P --threads T --seconds S
                                                --rounds R --database-url URL --max-workers W]

Creates a fresh PostgreSQL schema, starts `twofactor serve` on it as a separate
process, enrolls N users in the authenticator app through the API, then loads
the server from P client processes of T closed-loop threads each, alternating
phases of S seconds: Health/Check, Verify, Health/Check, Verify, ... (R rounds).
Every Verify sends a fresh correct code (the user's code for the current TOTP
step, each user at most once per step). Prints each phase, the medians over the
rounds and the ratio Verify/Health of the median throughputs. Drops the schema
and stops the server at the end. See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import secrets
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
from loadgen import (
    HEALTH,
    STEP_SECONDS,
    VERIFY,
    CpuMeter,
    PhaseResult,
    ServerProcess,
    clients,
    cpu_usage,
    median,
    wait_serving,
)

from server.domain.keyring import Keyring

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_RATIO = 0.6
GAP = 0.5  # seconds between phases, for the client processes to hand in results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8000, help="users to enroll (default 8000)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument(
        "--threads", type=int, default=4, help="closed-loop threads per client process (default 4)"
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="length of each measured phase (default 5)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="Health/Verify phase pairs; medians are reported"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of each kind first")
    parser.add_argument(
        "--database-url", default=DEFAULT_DATABASE_URL, help="PostgreSQL to create the schema in"
    )
    parser.add_argument(
        "--max-workers", type=int, help="TWOFACTOR_MAX_WORKERS of the server (default: its own)"
    )
    parser.add_argument("--pool-size", type=int, help="TWOFACTOR_DATABASE_POOL_SIZE of the server")
    args = parser.parse_args(argv)
    if not (
        1 <= args.clients <= 64 and 1 <= args.threads <= 64 and 0 < args.seconds <= 28 and args.rounds >= 1
    ):
        parser.error(
            "need 1-64 clients, 1-64 threads, 1 or more rounds, and at most 28 seconds per phase "
            "(a Verify phase must fit in one 30-second TOTP step)"
        )
    if args.users < args.clients * args.threads:
        parser.error("need at least one user per client thread")
    if "?" in args.database_url:
        parser.error("--database-url takes no query string; the bench adds its own search_path")

    schema = f"tf_bench_{uuid.uuid4().hex[:12]}"
    token = "bench-" + secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "TWOFACTOR_DATABASE_URL": f"{args.database_url}?options=-csearch_path%3D{schema}",
        "TWOFACTOR_KEYS": Keyring.new_key_spec(1),
        "TWOFACTOR_TOKENS": f"bench:app:{hashlib.sha256(token.encode()).hexdigest()}",
        "TWOFACTOR_LISTEN": "127.0.0.1:0",
        "TWOFACTOR_LOG_LEVEL": "WARNING",
    }
    if args.max_workers:
        env["TWOFACTOR_MAX_WORKERS"] = str(args.max_workers)
    if args.pool_size:
        env["TWOFACTOR_DATABASE_POOL_SIZE"] = str(args.pool_size)

    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    server = None
    try:
        server = ServerProcess([sys.executable, "-m", "server.cli", "serve"], env, cwd=str(ROOT))
        port = server.wait_listening(timeout=60)
        target = f"127.0.0.1:{port}"
        wait_serving(target, timeout=30)
        print(
            f"server pid {server.pid} on {target}, schema {schema}, "
            f"max_workers {args.max_workers or 'default'}, pool {args.pool_size or 'default'}; "
            f"{args.clients} client processes x {args.threads} threads; {os.cpu_count()} CPUs",
            flush=True,
        )
        with clients(target, processes=args.clients, threads=args.threads, token=token) as load:
            began = time.monotonic()
            run_id = uuid.uuid4().hex[:8]
            enrolled = load.enroll([f"bench-{run_id}-{i:06d}" for i in range(args.users)], timeout=3600)
            took = time.monotonic() - began
            print(f"enrolled {enrolled} users in {took:.1f} s ({enrolled / took:.0f}/s)", flush=True)
            results: dict[str, list[PhaseResult]] = {HEALTH: [], VERIFY: []}
            phases = schedule(args)
            cpu = CpuRecorder(CpuMeter(server.pid, load.pids), phases)
            for index, result in enumerate(load.run_schedule(phases)):
                number = index // 2 + (0 if args.warmup > 0 else 1)
                if number:
                    results[result.kind].append(result)
                print(f"{f'round {number}' if number else 'warm-up':<8} {result.line()}", flush=True)
                print(f"{'':<8} {cpu.usage(index, result.calls)}", flush=True)
        return report(results, args)
    finally:
        if server is not None:
            server.stop()
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def schedule(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(kind, start, end) of every phase: an optional warm-up, then a Health/Check and a Verify per round.

    Each round's Verify phase starts just after a TOTP step boundary and ends
    before the next one, so every user is fresh again for every round's Verify
    and a run needs about (Verify calls/s) x (seconds) users, not more.
    """
    phases = []
    t = time.time() + 1.0
    if args.warmup > 0:
        phases += [(HEALTH, t, t + args.warmup), (VERIFY, t + args.warmup + GAP, t + 2 * args.warmup + GAP)]
        t += 2 * args.warmup + 2 * GAP
    for _ in range(args.rounds):
        boundary = math.ceil((t + args.seconds + GAP) / STEP_SECONDS) * STEP_SECONDS
        phases.append((HEALTH, boundary - GAP - args.seconds, boundary - GAP))
        phases.append((VERIFY, boundary + GAP, boundary + GAP + args.seconds))
        t = boundary + args.seconds + 2 * GAP
    return phases


class CpuRecorder:
    """Snapshots of CPU use at the start and end of every phase, taken by a background thread."""

    def __init__(self, meter: CpuMeter, phases: list[tuple[str, float, float]]) -> None:
        self._meter = meter
        self._phases = phases
        self._taken: list[tuple[dict[str, float], dict[str, float]]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for _, start, end in self._phases:
            time.sleep(max(0.0, start - time.time()))
            before = self._meter.snapshot()
            time.sleep(max(0.0, end - time.time()))
            self._taken.append((before, self._meter.snapshot()))

    def usage(self, index: int, calls: int) -> str:
        deadline = time.monotonic() + 5
        while len(self._taken) <= index and time.monotonic() < deadline:
            time.sleep(0.01)
        if len(self._taken) <= index:
            return "cpu: not measured"
        _, start, end = self._phases[index]
        return cpu_usage(*self._taken[index], end - start, calls)


def report(results: dict[str, list[PhaseResult]], args: argparse.Namespace) -> int:
    print()
    shape = f"{args.clients} processes x {args.threads} threads"
    print(f"median of {args.rounds} rounds of {args.seconds:g} s, {shape} closed-loop clients:")
    throughput = {}
    for kind, label in (
        (HEALTH, "grpc.health.v1.Health/Check"),
        (VERIFY, "twofactor.v1.TwoFactorService/Verify"),
    ):
        runs = results[kind]
        throughput[kind] = median([r.throughput for r in runs])
        p50 = median([r.percentile(0.50) for r in runs])
        p99 = median([r.percentile(0.99) for r in runs])
        print(f"  {label:<38} {throughput[kind]:9.1f} calls/s   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms")
    ratio = throughput[VERIFY] / throughput[HEALTH] if throughput[HEALTH] else float("nan")
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    print(f"  Verify/Health throughput ratio: {ratio:.3f} ({verdict} the {TARGET_RATIO} target)")
    invalid = [r for runs in results.values() for r in runs if not r.valid]
    if invalid:
        print("  INVALID RUN: a phase had rejected codes, errors or too few users (see the lines above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
