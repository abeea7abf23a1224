"""Verify versus Health/Check: throughput and latency on one server, in one run.

    .venv/bin/python bench/verify_vs_health.py [--users N --clients P --threads T --seconds S
                                                --rounds R --database-url URL --max-workers W[,W...]
                                                --per-thread]

Creates a fresh PostgreSQL schema, starts `twofactor serve` on it as a separate
process, enrolls N users in the authenticator app through the API, then loads
the server from P client processes of T closed-loop threads each, in rounds of
one Health/Check phase and one Verify phase of S seconds (after a warm-up).
Every Verify sends a fresh correct code (the user's code for the current TOTP
step, each user at most once per step). Prints each phase with the CPU used by
the server, PostgreSQL and the clients, then the medians over the rounds and
the ratio Verify/Health of the median throughputs. Several --max-workers values
restart the server with each in turn, on the same users. Stops the server and
drops the schema at the end; exits 1 if any phase had rejected codes, errors or
too few users. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import secrets
import sys
import time
import uuid
from pathlib import Path

import psycopg
from loadgen import (
    HEALTH,
    SERVE,
    STEP_SECONDS,
    VERIFY,
    Clients,
    CpuMeter,
    CpuRecorder,
    PhaseResult,
    ServerProcess,
    add_client_option,
    clients,
    median,
    server_env,
    wait_serving,
)
from threads import ThreadMeter, thread_usage

from twofactor_server.domain.keyring import Keyring

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_RATIO = 0.6
GAP = 0.5  # seconds between phases, for the client processes to hand in results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=12000, help="users to enroll (default 12000)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--threads", type=int, default=4, help="closed-loop threads per client process")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measured phase")
    parser.add_argument(
        "--rounds", type=int, default=3, help="Health/Verify phase pairs; medians are reported"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of each kind first")
    add_client_option(parser)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="PostgreSQL for the schema")
    parser.add_argument(
        "--max-workers",
        default="",
        help="TWOFACTOR_MAX_WORKERS of the server; a comma-separated list measures each in turn "
        "on the same users (default: the server's own)",
    )
    parser.add_argument("--pool-size", type=int, help="TWOFACTOR_DATABASE_POOL_SIZE of the server")
    parser.add_argument(
        "--per-thread",
        action="store_true",
        help="also print the server's CPU and context switches per call by thread name (bench/threads.py)",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        help="run the server with sys.setswitchinterval(SECONDS) (Python's default is 0.005), "
        "to see what the GIL hand-off costs",
    )
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
    try:
        worker_counts = [int(n) for n in args.max_workers.split(",") if n.strip()] or [None]
    except ValueError:
        parser.error("--max-workers takes whole numbers separated by commas")

    schema = f"tf_bench_{uuid.uuid4().hex[:12]}"
    token = "bench-" + secrets.token_urlsafe(24)
    env = server_env(
        f"{args.database_url}?options=-csearch_path%3D{schema}",
        Keyring.new_key_spec(1),
        token,
        {"TWOFACTOR_ALLOW_CONSOLE_DELIVERY": "true"},  # the bench sends no codes
    )
    if args.pool_size:
        env["TWOFACTOR_DATABASE_POOL_SIZE"] = str(args.pool_size)

    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    summary = []
    fresh_from = 0.0  # enrollment confirms with the previous step's code: the current one is fresh
    try:
        with contextlib.ExitStack() as stack:
            load = None
            for workers in worker_counts:
                if workers is not None:
                    env["TWOFACTOR_MAX_WORKERS"] = str(workers)
                server = ServerProcess(server_command(args.switch_interval), env, cwd=str(ROOT))
                try:
                    target = f"127.0.0.1:{server.wait_listening(timeout=60)}"
                    wait_serving(target, timeout=30)
                    print(
                        f"\nserver pid {server.pid} on {target}, schema {schema}, "
                        f"max_workers {workers or 'default'}, pool {args.pool_size or 'default'}, "
                        f"switch interval {args.switch_interval or 'default'}; "
                        f"{args.clients} client processes x {args.threads} threads (client {args.client}); "
                        f"{os.cpu_count()} CPUs",
                        flush=True,
                    )
                    if load is None:
                        load = stack.enter_context(
                            clients(
                                target,
                                processes=args.clients,
                                threads=args.threads,
                                token=token,
                                client=args.client,
                            )
                        )
                        enroll(load, args.users)
                    else:
                        load.retarget(target)
                    results, fresh_from = measure(load, server.pid, args, fresh_from)
                finally:
                    server.stop()
                summary.append((workers, *report(results, args)))
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    if len(summary) > 1:
        print("\nmax_workers  Health/Check calls/s  Verify calls/s  ratio")
        for workers, health, verify, ratio, _ in summary:
            print(f"{workers or 'default'!s:>11}  {health:20.0f}  {verify:14.0f}  {ratio:5.2f}")
    return 0 if all(valid for *_, valid in summary) else 1


def server_command(switch_interval: float | None) -> list[str]:
    if switch_interval is None:
        return [*SERVE]
    code = (
        f"import sys; sys.setswitchinterval({switch_interval!r}); "
        "from twofactor_server.cli import main; sys.exit(main(['serve']))"
    )
    return [sys.executable, "-c", code]


def enroll(load: Clients, users: int) -> None:
    began = time.monotonic()
    run_id = uuid.uuid4().hex[:8]
    enrolled = len(load.enroll([f"bench-{run_id}-{i:06d}" for i in range(users)], timeout=3600))
    took = time.monotonic() - began
    print(f"enrolled {enrolled} users in {took:.1f} s ({enrolled / took:.0f}/s)", flush=True)


def measure(
    load: Clients, server_pid: int, args: argparse.Namespace, fresh_from: float
) -> tuple[dict[str, list[PhaseResult]], float]:
    """The measured phases' results, and when the users are all fresh again afterwards."""
    results: dict[str, list[PhaseResult]] = {HEALTH: [], VERIFY: []}
    phases = schedule(args, fresh_from)
    cpu = CpuRecorder(CpuMeter(server_pid, load.pids), phases)
    by_thread = CpuRecorder(ThreadMeter(server_pid), phases) if args.per_thread else None
    for index, result in enumerate(load.run_schedule(phases)):
        number = index // 2 + (0 if args.warmup > 0 else 1)
        if number:
            results[result.kind].append(result)
        print(f"{f'round {number}' if number else 'warm-up':<8} {result.line()}", flush=True)
        print(f"{'':<8} {cpu.usage(index, result.calls)}", flush=True)
        if by_thread is not None and (taken := by_thread.taken(index)) is not None:
            print(f"{'':<8} {thread_usage(*taken, result.calls)}", flush=True)
    last_verify_end = max(end for kind, _, end in phases if kind == VERIFY)
    return results, math.ceil(last_verify_end / STEP_SECONDS) * STEP_SECONDS


def schedule(args: argparse.Namespace, fresh_from: float) -> list[tuple[str, float, float]]:
    """(kind, start, end) of every phase: an optional warm-up, then a Health/Check and a Verify per round.

    Each round's Verify phase starts just after a TOTP step boundary and ends
    before the next one, so every user is fresh again for every round's Verify
    and a run needs about (Verify calls/s) x (seconds) users, not more. No
    Verify phase starts before `fresh_from`, when the users were last all fresh.
    """
    phases = []
    t = time.time() + 1.0
    if args.warmup > 0:
        phases.append((HEALTH, t, t + args.warmup))
        verify_start = max(t + args.warmup + GAP, fresh_from + GAP)
        phases.append((VERIFY, verify_start, verify_start + args.warmup))
        t = verify_start + args.warmup + GAP
    for _ in range(args.rounds):
        boundary = math.ceil(max(t + args.seconds + GAP, fresh_from) / STEP_SECONDS) * STEP_SECONDS
        phases.append((HEALTH, boundary - GAP - args.seconds, boundary - GAP))
        phases.append((VERIFY, boundary + GAP, boundary + GAP + args.seconds))
        t = boundary + args.seconds + 2 * GAP
    return phases


def report(
    results: dict[str, list[PhaseResult]], args: argparse.Namespace
) -> tuple[float, float, float, bool]:
    """Print the medians; return (Health/Check calls/s, Verify calls/s, ratio, whether the run is valid)."""
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
    valid = all(r.valid for runs in results.values() for r in runs)
    if not valid:
        print("  INVALID RUN: a phase had rejected codes, errors or too few users (see the lines above)")
    return throughput[HEALTH], throughput[VERIFY], ratio, valid


if __name__ == "__main__":
    sys.exit(main())
