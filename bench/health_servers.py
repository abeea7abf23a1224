"""Health/Check throughput of server shapes: sync thread pools of several sizes, grpc.aio, the real server.

    .venv/bin/python bench/health_servers.py [--clients P --threads T --seconds S --rounds R
                                              --servers sync:8,sync:32,aio,twofactor:32]

For the decision "grpc.aio or a thread pool", with the same closed-loop clients
as bench/verify_vs_health.py. Each server runs as its own process, one at a
time, on 127.0.0.1:

  sync:N       grpc.server(ThreadPoolExecutor(max_workers=N)) hosting only grpc.health.v1
  aio          grpc.aio.server() hosting only the asyncio grpc.health.v1 servicer
  twofactor:N  the real `twofactor serve` (its interceptors, reflection, TWOFACTOR_MAX_WORKERS=N)
               on the embedded SQLite store in a temporary directory (Health/Check never
               touches the store)

Prints the median over the rounds of each server's throughput and p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

from loadgen import HEALTH, SERVE, CpuMeter, CpuRecorder, ServerProcess, clients, median, wait_serving

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SERVERS = "sync:4,sync:8,sync:16,sync:32,sync:64,aio,twofactor:32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--threads", type=int, default=4, help="threads per client process")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measured phase")
    parser.add_argument("--rounds", type=int, default=3, help="phases per server; medians are reported")
    parser.add_argument(
        "--servers", default=DEFAULT_SERVERS, help=f"comma-separated (default {DEFAULT_SERVERS})"
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one server shape in this process
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve)
    if not (1 <= args.clients <= 64 and 1 <= args.threads <= 64 and 0 < args.seconds <= 120):
        parser.error("need 1-64 clients, 1-64 threads, 0-120 seconds per phase")

    print(f"{args.clients} client processes x {args.threads} threads; {os.cpu_count()} CPUs", flush=True)
    rows = []
    for shape in [s.strip() for s in args.servers.split(",") if s.strip()]:
        with tempfile.TemporaryDirectory(prefix="tf-bench-") as data_dir:
            server = start_server(shape, data_dir)
            try:
                port = server.wait_listening(timeout=60)
                target = f"127.0.0.1:{port}"
                wait_serving(target, timeout=30)
                with clients(target, processes=args.clients, threads=args.threads) as load:
                    begin = time.time() + 0.5
                    phases = [(HEALTH, begin, begin + 1.0)]  # warm-up
                    for _ in range(args.rounds):
                        begin = phases[-1][2] + 0.5
                        phases.append((HEALTH, begin, begin + args.seconds))
                    cpu = CpuRecorder(CpuMeter(server.pid, load.pids), phases)
                    runs, usage = [], []
                    for index, run in enumerate(load.run_schedule(phases)):
                        if index:
                            runs.append(run)
                            usage.append(cpu.usage(index, run.calls))
            finally:
                server.stop()
        for run, used in zip(runs, usage, strict=True):
            print(f"  {shape:<14} {run.line()}\n  {'':<14} {used}", flush=True)
        rows.append(
            (
                shape,
                median([r.throughput for r in runs]),
                median([r.percentile(0.50) for r in runs]),
                median([r.percentile(0.99) for r in runs]),
                all(r.valid for r in runs),
            )
        )
    print()
    print(f"median of {args.rounds} phases of {args.seconds:g} s, Health/Check:")
    for shape, throughput, p50, p99, valid in rows:
        note = "" if valid else "   INVALID (errors)"
        print(f"  {shape:<14} {throughput:9.1f} calls/s   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms{note}")
    return 0 if all(row[4] for row in rows) else 1


def start_server(shape: str, data_dir: str) -> ServerProcess:
    kind, _, size = shape.partition(":")
    if kind == "twofactor":
        env = {
            **{key: value for key, value in os.environ.items() if not key.startswith("TWOFACTOR_")},
            "TWOFACTOR_LISTEN": "127.0.0.1:0",
            "TWOFACTOR_DATA_DIR": data_dir,
            "TWOFACTOR_LOG_LEVEL": "WARNING",
        }
        if size:
            env["TWOFACTOR_MAX_WORKERS"] = size
        return ServerProcess([*SERVE], env, cwd=str(ROOT))
    if kind not in ("sync", "aio"):
        raise SystemExit(f"unknown server {shape!r}: use sync:N, aio or twofactor:N")
    return ServerProcess([sys.executable, str(Path(__file__).resolve()), "--serve", shape], dict(os.environ))


def serve(shape: str) -> int:
    kind, _, size = shape.partition(":")
    if kind == "aio":
        asyncio.run(serve_aio())
    else:
        serve_sync(int(size or 32))
    return 0


def serve_sync(max_workers: int) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=[("grpc.so_reuseport", 0)]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"sync:{max_workers} listening on 127.0.0.1:{port}", flush=True)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    while not stopping:
        time.sleep(0.2)
    server.stop(1).wait()


async def serve_aio() -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"aio listening on 127.0.0.1:{port}", flush=True)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(1)


if __name__ == "__main__":
    sys.exit(main())
