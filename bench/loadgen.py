"""Closed-loop gRPC load from several client processes, shared by the bench scripts.

Each client process runs a few threads; each thread has its own channel and
sends one call after another (closed loop) until the phase ends. The parent
tells every process the same wall-clock start and end, so all of them load the
server at once, and collects every call's latency.

Verify needs a fresh correct authenticator code on every call, and the server
accepts a user's TOTP step once (RFC 6238 §5.2). So each client process owns a
disjoint slice of the enrolled users and hands them to its threads in turn,
sending each user's code for the current 30-second step at most once per step.
When the turn comes back to a user already used in this step, the process has
run out of users: its threads wait for the next step and count the wait as
"starved" (the run then needs more users).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

STEP_SECONDS = 30
CALL_TIMEOUT = 10.0
HEALTH, VERIFY = "health", "verify"
# How the client processes send Health/Check and Verify (the rejected kind too): "grpc", grpcio's
# blocking stubs from `threads` threads, one channel each; "h2", bench/h2load.py's plain HTTP/2
# from one thread, over as many connections with one call in flight on each (the same load as
# the server sees it, at a third of the client's CPU). Enrollment and SendCode use grpcio in both.
CLIENT_SHAPES = ("grpc", "h2")


def add_client_option(parser: argparse.ArgumentParser) -> None:
    """`--client h2|grpc` (h2 by default), as every bench script that runs these phases takes it."""
    parser.add_argument(
        "--client",
        choices=CLIENT_SHAPES,
        default="h2",
        help="how the Health/Check and Verify clients send: h2 (bench/h2load.py, plain HTTP/2 from one "
        "thread per process; default) or grpc (grpcio's blocking stubs, one thread per connection)",
    )


HEALTH_PATH = "/grpc.health.v1.Health/Check"
VERIFY_PATH = "/twofactor.v1.TwoFactorService/Verify"
REJECTED = "rejected"  # Verify with a wrong code for an enrolled user
SENDCODE = "sendcode"  # SendCode(METHOD_EMAIL) for a user who enabled email
WRONG_STEP_OFFSET = 10  # a code from 5 minutes ahead: outside the accepted drift, so always wrong


# ---- the server under test, as a separate process ------------------------------

SERVE = (sys.executable, "-m", "twofactor_server.cli", "serve")  # `twofactor serve`, this interpreter's


def sink_delivery(redis_url: str, queue: str, smtp_port: int) -> dict[str, str]:
    """The settings that send email through the Celery queue `queue` on Redis to the bench's SMTP
    sink on 127.0.0.1:`smtp_port`, for a server and a worker alike; SMS stays on the console
    provider, which with PostgreSQL must be allowed out loud."""
    return {
        "TWOFACTOR_BROKER_URL": redis_url,
        "TWOFACTOR_DELIVERY_QUEUE": queue,
        "TWOFACTOR_EMAIL_PROVIDER": "smtp",
        "TWOFACTOR_SMTP_HOST": "127.0.0.1",
        "TWOFACTOR_SMTP_PORT": str(smtp_port),
        "TWOFACTOR_SMTP_SECURITY": "none",
        "TWOFACTOR_SMTP_FROM": "bench@example.com",
        "TWOFACTOR_ALLOW_CONSOLE_DELIVERY": "true",
    }


def server_env(database_url: str, keys: str, token: str, settings: Mapping[str, str] = {}) -> dict[str, str]:
    """The environment of a `twofactor serve` under bench: this process's own without any
    TWOFACTOR_ setting, then the database, the keys, the bench's one app token (by its digest),
    any free port, warnings only; then `settings`."""
    return {
        **{key: value for key, value in os.environ.items() if not key.startswith("TWOFACTOR_")},
        "TWOFACTOR_DATABASE_URL": database_url,
        "TWOFACTOR_KEYS": keys,
        "TWOFACTOR_TOKENS": f"bench:app:{hashlib.sha256(token.encode()).hexdigest()}",
        "TWOFACTOR_LISTEN": "127.0.0.1:0",
        "TWOFACTOR_LOG_LEVEL": "WARNING",
        **settings,
    }


class ServerProcess:
    """A server started as a child process; prints `... listening on HOST:PORT ...` when ready."""

    def __init__(self, command: Sequence[str], env: dict[str, str], *, cwd: str | None = None) -> None:
        self.process = subprocess.Popen(
            list(command),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it in order
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line.rstrip())
            self._lines.put(line)

    def wait_listening(self, timeout: float) -> int:
        """The port from the server's `listening on host:port` line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None and self._lines.empty():
                raise RuntimeError("server exited early:\n" + "\n".join(self.output[-30:]))
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if "listening on" in line:
                address = line.split("listening on", 1)[1].split()[0]
                return int(address.rpartition(":")[2])
        raise RuntimeError(f"server not listening after {timeout:.0f} s:\n" + "\n".join(self.output[-30:]))

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def wait_serving(target: str, timeout: float) -> None:
    """Poll grpc.health.v1.Health/Check until SERVING, for at most `timeout` seconds."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                last = error
            time.sleep(0.1)
    raise RuntimeError(f"{target} not SERVING after {timeout:.0f} s: {last}")


# ---- where the CPU goes (Linux /proc) ----------------------------------------------------


class CpuMeter:
    """CPU seconds used so far by the server, every postgres process, the workers, Redis and the clients.

    The server and the worker count with every process of their session (both are
    started with start_new_session): a supervisor's children and a Celery worker's
    pool processes are in the figure.
    """

    def __init__(
        self,
        server_pid: int,
        client_pids: Sequence[int],
        worker_pid: int | None = None,
        postgres_pids: Callable[[], set[int]] | None = None,
        postgres_backends: Callable[[], set[int]] | None = None,
    ) -> None:
        """`postgres_pids`, when given, names the postgres processes to count (on a shared
        PostgreSQL: this run's backends and the server's own background processes).
        `postgres_backends`, called after it, names those of them that are this run's own
        backends: their CPU is also given apart, as "pg_backends" (within "postgres")."""
        self._postgres_pids = postgres_pids
        self._postgres_backends = postgres_backends
        self._backend_pids: set[int] = set()  # every pid seen as one of this run's backends
        self._server = server_pid
        self._worker = worker_pid
        self._clients = list(client_pids)
        self._tick = os.sysconf("SC_CLK_TCK")
        # PostgreSQL backends come and go (other sessions' connections too): keep the last
        # figure of each one seen, so a backend that exits does not make the sum go down.
        self._postgres: dict[int, float] = {}

    def snapshot(self) -> dict[str, float]:
        server: list[int] = []
        worker: list[int] = []
        redis: list[int] = []
        counted = self._postgres_pids() if self._postgres_pids is not None else None
        if self._postgres_backends is not None:
            self._backend_pids |= self._postgres_backends()
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            comm = _comm(pid)
            if comm == "postgres":
                if counted is not None and pid not in counted:
                    continue
                self._postgres[pid] = max(self._postgres.get(pid, 0.0), _on_cpu_seconds(pid))
            elif comm == "redis-server":
                redis.append(pid)
            else:
                session = _session(pid)
                if session == self._server:
                    server.append(pid)
                elif self._worker is not None and session == self._worker:
                    worker.append(pid)
        return {
            "server": self._seconds(server or [self._server]),
            "postgres": sum(self._postgres.values()),
            "pg_backends": sum(v for pid, v in self._postgres.items() if pid in self._backend_pids),
            "workers": self._seconds(worker),
            "redis": self._seconds(redis),
            "clients": self._seconds(self._clients),
            "machine_busy": _machine_busy_ticks() / self._tick,
        }

    def _seconds(self, pids: Sequence[int]) -> float:
        ticks = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
            except OSError:  # the process ended
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return ticks / self._tick


def cpu_usage(before: dict[str, float], after: dict[str, float], seconds: float, calls: int) -> str:
    """CPU used between two snapshots: % of one core, and CPU microseconds per call.

    `other` is everything else on the machine: with it well above zero, something
    besides the bench competed for the CPU and the figures are not clean.
    """
    used = {key: after[key] - before[key] for key in ("server", "postgres", "workers", "redis", "clients")}
    used["other"] = max(0.0, after["machine_busy"] - before["machine_busy"] - sum(used.values()))
    share = "  ".join(f"{key} {value / seconds * 100:.0f}" for key, value in used.items())
    per_call = "  ".join(
        f"{key} {used[key] / max(calls, 1) * 1e6:.0f}" for key in ("server", "postgres", "workers", "clients")
    )
    return f"cpu % of a core: {share} (of {100 * (os.cpu_count() or 1)});  cpu us/call: {per_call}"


class Meter(Protocol):
    def snapshot(self) -> dict[str, float]: ...


class CpuRecorder:
    """Snapshots of CPU use at the start and end of every phase, taken by a background thread
    (a CpuMeter's, or any meter's: threads.ThreadMeter)."""

    def __init__(self, meter: Meter, phases: list[tuple[str, float, float]]) -> None:
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

    def taken(self, index: int) -> tuple[dict[str, float], dict[str, float]] | None:
        """The (before, after) snapshots of phase `index`, once taken (waits at most 5 s)."""
        deadline = time.monotonic() + 5
        while len(self._taken) <= index and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._taken[index] if len(self._taken) > index else None

    def usage(self, index: int, calls: int) -> str:
        deadline = time.monotonic() + 5
        while len(self._taken) <= index and time.monotonic() < deadline:
            time.sleep(0.01)
        if len(self._taken) <= index:
            return "cpu: not measured"
        _, start, end = self._phases[index]
        return cpu_usage(*self._taken[index], end - start, calls)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


def _on_cpu_seconds(pid: int) -> float:
    """CPU time of a single-threaded process (a postgres backend) in nanoseconds' precision.

    /proc/PID/stat counts in clock ticks (10 ms): a backend that ran a few hundred
    UPDATEs of 50 us each in a phase rounds to nothing or to a whole tick.
    /proc/PID/schedstat's first field is the time on a CPU, in ns (the main thread
    only: right for postgres, wrong for the threaded server).
    """
    try:
        with open(f"/proc/{pid}/schedstat") as schedstat:
            return int(schedstat.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _session(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rpartition(")")[2].split()[3])
    except (OSError, ValueError, IndexError):
        return -1


def _machine_busy_ticks() -> int:
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return sum(values[:3]) + sum(values[5:7])  # user, nice, system, irq, softirq


# ---- results ---------------------------------------------------------------------------


@dataclass
class PhaseResult:
    kind: str
    seconds: float
    latencies_ms: array = field(default_factory=lambda: array("d"))
    rejected: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    starved_seconds: float = 0.0
    late: int = 0  # successful calls that ended after the phase (not in calls/s; SendCode still sent)

    def add(self, other: PhaseResult) -> None:
        self.latencies_ms.extend(other.latencies_ms)
        self.late += other.late
        self.rejected += other.rejected
        self.errors.update(other.errors)
        self.starved_seconds += other.starved_seconds

    @property
    def calls(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds

    def percentile(self, q: float) -> float:
        """The nearest-rank percentile: the smallest latency that at least a share `q` of the
        calls did not exceed (p99 of 100 calls is the 99th, not the slowest)."""
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        rank = math.ceil(round(q * len(ordered), 9))  # round: 0.07 * 100 is 7.000000000000001
        return ordered[min(len(ordered), max(1, rank)) - 1]

    @property
    def valid(self) -> bool:
        return self.calls > 0 and not self.rejected and not self.errors and self.starved_seconds == 0

    def line(self) -> str:
        text = (
            f"{self.kind:<7} {self.throughput:9.1f} calls/s   p50 {self.percentile(0.50):7.2f} ms   "
            f"p99 {self.percentile(0.99):7.2f} ms   ({self.calls} calls in {self.seconds:.1f} s)"
        )
        if self.rejected:
            text += f"   REJECTED {self.rejected}"
        if self.errors:
            text += "   ERRORS " + ", ".join(f"{code}={n}" for code, n in self.errors.items())
        if self.starved_seconds:
            text += f"   STARVED {self.starved_seconds:.1f} thread-s (too few users)"
        return text


# ---- the client processes ----------------------------------------------------------


@dataclass
class Enrolled:
    user_id: str
    hotp: Any  # pyotp.HOTP over the base32 secret, as an authenticator app holds it
    last_step: int  # the newest TOTP step a Verify was sent for (accepted, unless counted as rejected)

    def __post_init__(self) -> None:
        self.key: bytes = self.hotp.byte_secret()  # for code_at: pyotp decodes base32 on every call

    def code_at(self, step: int) -> str:
        """The six-digit code of `step` (RFC 4226 §5.3), as `hotp.at(step)` gives it in a fifth of the
        time (tests/bench/test_h2load.py holds the two equal): the h2 client's share of CPU."""
        digest = hmac.digest(self.key, step.to_bytes(8, "big"), "sha1")
        offset = digest[19] & 0x0F
        return f"{(int.from_bytes(digest[offset : offset + 4], 'big') & 0x7FFFFFFF) % 1_000_000:06d}"


class ClientProcesses:
    """`processes` spawned child processes, each running `main(pipe, *args)`: it says "ready" once
    set up, then answers every message the parent sends with one reply (an exception: it failed).
    ("run", kind, start, end) runs a phase of closed-loop calls and replies with its PhaseResult;
    ("stop",) ends it. Clients (gRPC) and privacyidea.py's CheckClients (HTTP) are two of these."""

    def __init__(self, main: Callable[..., None], args: tuple[Any, ...], processes: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork after grpc is initialised
        self._pipes: list[multiprocessing.connection.Connection] = []
        self._workers = []
        for _ in range(processes):
            parent_end, child_end = context.Pipe()
            worker = context.Process(target=main, args=(child_end, *args), daemon=True)
            worker.start()
            child_end.close()
            self._pipes.append(parent_end)
            self._workers.append(worker)
        self._replies(deadline=time.monotonic() + 60)  # every process has started and is set up

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self._workers if worker.pid is not None]

    def _ask_all(self, messages: Sequence[tuple[Any, ...]], timeout: float) -> list[Any]:
        for pipe, message in zip(self._pipes, messages, strict=True):
            pipe.send(message)
        return self._replies(deadline=time.monotonic() + timeout)

    def _deal(self, kind: str, items: Sequence[Any], timeout: float = 60) -> list[Any]:
        """Send (kind, its share of `items`) to each process: dealt out in turn."""
        count = len(self._pipes)
        return self._ask_all([(kind, list(items[i::count])) for i in range(count)], timeout)

    def run_schedule(self, phases: Sequence[tuple[str, float, float]]) -> Iterator[PhaseResult]:
        """Run (kind, start, end) phases, wall-clock times in order; yields each phase's merged result.

        Every process gets the whole schedule at once, so a phase can start right
        after the previous one without waiting for the parent.
        """
        for pipe in self._pipes:
            for kind, start, end in phases:
                pipe.send(("run", kind, start, end))
        for kind, start, end in phases:
            total = PhaseResult(kind, end - start)
            for reply in self._replies(deadline=time.monotonic() + max(0.0, end - time.time()) + 60):
                total.add(reply)
            yield total

    def _replies(self, deadline: float) -> list[Any]:
        replies = []
        for pipe in self._pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a client process did not answer in time")
            reply = pipe.recv()
            if isinstance(reply, BaseException):
                raise RuntimeError("a client process failed") from reply
            replies.append(reply)
        return replies

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for worker in self._workers:
            worker.join(10)
            if worker.is_alive():
                worker.terminate()
                worker.join(5)


class Clients(ClientProcesses):
    """`processes` client processes with `threads` closed-loop gRPC threads each."""

    def __init__(
        self, target: str, *, processes: int, threads: int, token: str = "", client: str = "grpc"
    ) -> None:
        if client not in CLIENT_SHAPES:
            raise ValueError(f"client shape {client!r}: one of {', '.join(CLIENT_SHAPES)}")
        super().__init__(_client_main, (target, token, threads, client), processes)

    def retarget(self, target: str) -> None:
        """Point every client thread at another server (the same users stay enrolled in the database)."""
        self._ask_all([("retarget", target)] * len(self._pipes), timeout=60)

    def enroll(self, user_ids: Sequence[str], timeout: float, qr_formats: Sequence[int] = ()) -> array:
        """Enroll the users in the authenticator app, spread over the processes; StartEnrollment
        asks for the QR code images in `qr_formats` (twofactor.v1 QrCodeFormat values; none by default).

        Returns the latency (ms) of each enrollment: StartEnrollment plus ConfirmEnrollment.
        """
        count = len(self._pipes)
        slices = [list(user_ids[i::count]) for i in range(count)]
        latencies = array("d")
        for part in self._ask_all([("enroll", s, list(qr_formats)) for s in slices], timeout):
            latencies.extend(part)
        return latencies

    def set_users(self, users: Sequence[tuple[str, str, int]]) -> None:
        """Replace the Verify phases' users with these (user id, base32 secret, last accepted step),
        spread over the processes: users enrolled in bulk (bench/populate.py)."""
        self._deal("users", users)

    def set_email_users(self, user_ids: Sequence[str]) -> None:
        """The users SendCode phases send to (email enabled), spread over the processes."""
        self._deal("email_users", user_ids)


def _client_main(
    pipe: multiprocessing.connection.Connection, target: str, token: str, threads: int, shape: str
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    client = _ClientProcess(target, token, threads, shape)
    pipe.send("ready")
    try:
        while True:
            message = pipe.recv()
            try:
                if message[0] == "stop":
                    return
                if message[0] == "enroll":
                    pipe.send(client.enroll(message[1], message[2]))
                elif message[0] == "users":
                    pipe.send(client.set_users(message[1]))
                elif message[0] == "email_users":
                    pipe.send(client.set_email_users(message[1]))
                elif message[0] == "retarget":
                    pipe.send(client.retarget(message[1]))
                elif message[0] == "run":
                    pipe.send(client.run(*message[1:]))
            except Exception as error:
                pipe.send(RuntimeError(f"client process {os.getpid()}: {type(error).__name__}: {error}"))
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        client.close()


class _ClientProcess:
    def __init__(self, target: str, token: str, threads: int, shape: str = "grpc") -> None:
        import grpc

        self._grpc = grpc
        self._target = target
        self._shape = shape
        self._metadata = (("authorization", f"Bearer {token}"),)
        # One channel per thread: one channel is one HTTP/2 connection, and the
        # server handles each connection's frames in order.
        self._channels = [grpc.insecure_channel(target) for _ in range(threads)]
        # The process's users, handed to its threads in turn, each at most once per TOTP step.
        self._users: list[Enrolled] = []
        self._next_user = 0
        self._users_lock = threading.Lock()
        self._email_users: list[str] = []
        self._next_email_user = 0
        self._next_wrong_user = 0

    def set_email_users(self, user_ids: list[str]) -> str:
        self._email_users = user_ids
        return "ready"

    def set_users(self, users: list[tuple[str, str, int]]) -> str:
        import pyotp

        with self._users_lock:
            self._users = [Enrolled(user_id, pyotp.HOTP(secret), step) for user_id, secret, step in users]
            self._next_user = self._next_wrong_user = 0
        return "ready"

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def retarget(self, target: str) -> str:
        self.close()
        self._target = target
        self._channels = [self._grpc.insecure_channel(target) for _ in self._channels]
        return "ready"

    # enrollment: StartEnrollment(AUTHENTICATOR) then ConfirmEnrollment with the app's code

    def enroll(self, user_ids: list[str], qr_formats: list[int]) -> array:
        threads = len(self._channels)
        with ThreadPoolExecutor(threads) as pool:
            done = list(
                pool.map(
                    self._enroll_slice,
                    range(threads),
                    [user_ids[i::threads] for i in range(threads)],
                    [qr_formats] * threads,
                )
            )
        latencies = array("d")
        for part in done:
            latencies.extend(part)
        return latencies

    def _enroll_slice(self, index: int, user_ids: list[str], qr_formats: list[int]) -> array:
        import pyotp
        from twofactor.v1 import common_pb2, twofactor_service_pb2, twofactor_service_pb2_grpc

        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(self._channels[index])
        latencies = array("d")
        for user_id in user_ids:
            t0 = time.perf_counter()
            start = stub.StartEnrollment(
                twofactor_service_pb2.StartEnrollmentRequest(
                    user_id=user_id, method=common_pb2.METHOD_AUTHENTICATOR, qr_formats=qr_formats
                ),
                metadata=self._metadata,
                timeout=CALL_TIMEOUT,
            )
            hotp = pyotp.HOTP(start.authenticator.secret)
            # Confirm with the previous step's code (the server allows one step of drift), so the
            # user's current-step code is still fresh for the measured Verify calls; at a step
            # boundary fall back to the current step's code.
            for step in (_step() - 1, _step()):
                reply = stub.ConfirmEnrollment(
                    twofactor_service_pb2.ConfirmEnrollmentRequest(
                        user_id=user_id, method=common_pb2.METHOD_AUTHENTICATOR, code=hotp.at(step)
                    ),
                    metadata=self._metadata,
                    timeout=CALL_TIMEOUT,
                )
                if reply.confirmed:
                    latencies.append((time.perf_counter() - t0) * 1000)
                    with self._users_lock:
                        self._users.append(Enrolled(user_id, hotp, step))
                    break
            else:
                raise RuntimeError(f"could not confirm the enrollment of {user_id}")
        return latencies

    # the measured phases

    def run(self, kind: str, start: float, end: float) -> PhaseResult:
        threads = len(self._channels)
        late = time.time() > start  # the previous phase overran: this one would be measured short
        loop = {
            HEALTH: self._health_loop,
            VERIFY: self._verify_loop,
            REJECTED: self._rejected_loop,
            SENDCODE: self._sendcode_loop,
        }[kind]
        if kind == VERIFY:
            # Every Verify phase starts from the process's first user (all fresh again: a phase
            # starts just after a step boundary). So a round after the first meets users the server
            # has seen, as a long-running server mostly does (its sealed-secret cache warm: one
            # statement per accepted code), where carrying on down the list met only users it saw
            # for the first time (a read, then the statement).
            with self._users_lock:
                self._next_user = 0
        if self._shape == "h2" and kind != SENDCODE:
            total = self._h2_phase(kind, start, end)
            if late:
                total.errors["LATE_START"] += 1
            return total
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(lambda i: loop(i, start, end), range(threads)))
        total = PhaseResult(kind, end - start)
        if late:
            total.errors["LATE_START"] += 1
        for part in parts:
            total.add(part)
        return total

    def _h2_phase(self, kind: str, start: float, end: float) -> PhaseResult:
        """The phase from one thread over plain HTTP/2 (bench/h2load.py): the same calls, users
        and judgement as the threads' loops below."""
        from grpc_health.v1 import health_pb2
        from h2load import Judge, run_closed_loop
        from twofactor.v1 import twofactor_service_pb2 as pb

        connections = len(self._channels)
        if kind == HEALTH:
            serving = health_pb2.HealthCheckResponse.SERVING
            request = health_pb2.HealthCheckRequest(service="").SerializeToString()

            def judge_health(reply: bytes) -> str:
                return (
                    "ok"
                    if health_pb2.HealthCheckResponse.FromString(reply).status == serving
                    else "NOT_SERVING"
                )

            check = (HEALTH_PATH, request, judge_health)
            return run_closed_loop(
                self._target, (), connections, lambda now: check, time.time, kind, start, end
            )
        if not self._users:
            result = PhaseResult(kind, end - start)
            result.errors["NO_USERS"] += 1
            return result

        def judge_accepted(reply: bytes) -> str:
            return (
                "ok"
                if pb.VerifyResponse.FromString(reply).result == pb.VERIFY_RESULT_ACCEPTED
                else "rejected"
            )

        def judge_rejected(reply: bytes) -> str:  # accepted or locked: not what this phase measures
            outcome = pb.VerifyResponse.FromString(reply).result
            return "ok" if outcome == pb.VERIFY_RESULT_REJECTED else pb.VerifyResult.Name(outcome)

        def next_verify(now: float) -> tuple[str, bytes, Judge] | None:
            step = int(now // STEP_SECONDS)
            user = self._next_fresh_user(step)
            if user is None:  # this process has used all its users in this step: wait for the next
                return None
            request = pb.VerifyRequest(user_id=user.user_id, code=user.code_at(step))
            return VERIFY_PATH, request.SerializeToString(), judge_accepted

        def next_wrong(now: float) -> tuple[str, bytes, Judge]:
            with self._users_lock:
                user = self._users[self._next_wrong_user]
                self._next_wrong_user = (self._next_wrong_user + 1) % len(self._users)
            code = user.code_at(int(now // STEP_SECONDS) + WRONG_STEP_OFFSET)
            return (
                VERIFY_PATH,
                pb.VerifyRequest(user_id=user.user_id, code=code).SerializeToString(),
                judge_rejected,
            )

        def next_step() -> float:
            return (_step() + 1) * STEP_SECONDS + 0.01

        next_call = next_verify if kind == VERIFY else next_wrong
        return run_closed_loop(
            self._target, self._metadata, connections, next_call, next_step, kind, start, end
        )

    def _health_loop(self, index: int, start: float, end: float) -> PhaseResult:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channels[index])
        request = health_pb2.HealthCheckRequest(service="")
        result = PhaseResult(HEALTH, end - start)
        _sleep_until(start)
        while True:
            began = time.time()
            if began >= end:
                return result
            t0 = time.perf_counter()
            try:
                stub.Check(request, timeout=CALL_TIMEOUT)
            except self._grpc.RpcError as error:
                result.errors[error.code().name] += 1
                time.sleep(0.01)
                continue
            elapsed = time.perf_counter() - t0
            if began + elapsed <= end:
                result.latencies_ms.append(elapsed * 1000)

    def _next_fresh_user(self, step: int) -> Enrolled | None:
        """The next user in turn, marked as used in `step`; None when every user was used in this step."""
        with self._users_lock:
            user = self._users[self._next_user]
            if user.last_step >= step:
                return None
            self._next_user = (self._next_user + 1) % len(self._users)
            user.last_step = step
            return user

    def _verify_loop(self, index: int, start: float, end: float) -> PhaseResult:
        from twofactor.v1 import twofactor_service_pb2, twofactor_service_pb2_grpc

        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(self._channels[index])
        accepted = twofactor_service_pb2.VERIFY_RESULT_ACCEPTED
        result = PhaseResult(VERIFY, end - start)
        if not self._users:
            result.errors["NO_USERS"] += 1
            return result
        _sleep_until(start)
        while True:
            began = time.time()
            if began >= end:
                return result
            step = int(began // STEP_SECONDS)
            user = self._next_fresh_user(step)
            if user is None:  # this process has used all its users in this step: wait for the next
                wake = min(end, (step + 1) * STEP_SECONDS + 0.01)
                result.starved_seconds += max(0.0, wake - began)
                _sleep_until(wake)
                continue
            code = user.code_at(step)
            t0 = time.perf_counter()
            try:
                reply = stub.Verify(
                    twofactor_service_pb2.VerifyRequest(user_id=user.user_id, code=code),
                    metadata=self._metadata,
                    timeout=CALL_TIMEOUT,
                )
            except self._grpc.RpcError as error:
                result.errors[error.code().name] += 1
                time.sleep(0.01)
                continue
            elapsed = time.perf_counter() - t0
            if reply.result != accepted:
                result.rejected += 1
            elif began + elapsed <= end:
                result.latencies_ms.append(elapsed * 1000)

    def _rejected_loop(self, index: int, start: float, end: float) -> PhaseResult:
        """Verify with a wrong code, the users in turn (each wrong code counts toward a lockout:
        the server runs with a high threshold, and an accepted Verify resets the count)."""
        from twofactor.v1 import twofactor_service_pb2, twofactor_service_pb2_grpc

        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(self._channels[index])
        rejected = twofactor_service_pb2.VERIFY_RESULT_REJECTED
        result = PhaseResult(REJECTED, end - start)
        if not self._users:
            result.errors["NO_USERS"] += 1
            return result
        _sleep_until(start)
        while True:
            began = time.time()
            if began >= end:
                return result
            with self._users_lock:
                user = self._users[self._next_wrong_user]
                self._next_wrong_user = (self._next_wrong_user + 1) % len(self._users)
            code = user.code_at(int(began // STEP_SECONDS) + WRONG_STEP_OFFSET)
            t0 = time.perf_counter()
            try:
                reply = stub.Verify(
                    twofactor_service_pb2.VerifyRequest(user_id=user.user_id, code=code),
                    metadata=self._metadata,
                    timeout=CALL_TIMEOUT,
                )
            except self._grpc.RpcError as error:
                result.errors[error.code().name] += 1
                time.sleep(0.01)
                continue
            elapsed = time.perf_counter() - t0
            if reply.result != rejected:  # accepted or locked: not what this phase measures
                result.errors[twofactor_service_pb2.VerifyResult.Name(reply.result)] += 1
            elif began + elapsed <= end:
                result.latencies_ms.append(elapsed * 1000)

    def _sendcode_loop(self, index: int, start: float, end: float) -> PhaseResult:
        from twofactor.v1 import common_pb2, twofactor_service_pb2, twofactor_service_pb2_grpc

        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(self._channels[index])
        result = PhaseResult(SENDCODE, end - start)
        if not self._email_users:
            result.errors["NO_EMAIL_USERS"] += 1
            return result
        _sleep_until(start)
        while True:
            began = time.time()
            if began >= end:
                return result
            with self._users_lock:
                user_id = self._email_users[self._next_email_user]
                self._next_email_user = (self._next_email_user + 1) % len(self._email_users)
            t0 = time.perf_counter()
            try:
                stub.SendCode(
                    twofactor_service_pb2.SendCodeRequest(user_id=user_id, method=common_pb2.METHOD_EMAIL),
                    metadata=self._metadata,
                    timeout=CALL_TIMEOUT,
                )
            except self._grpc.RpcError as error:
                result.errors[error.code().name] += 1
                time.sleep(0.01)
                continue
            elapsed = time.perf_counter() - t0
            if began + elapsed <= end:
                result.latencies_ms.append(elapsed * 1000)
            else:
                result.late += 1


def _step() -> int:
    return int(time.time() // STEP_SECONDS)


def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@contextlib.contextmanager
def clients(
    target: str, *, processes: int, threads: int, token: str = "", client: str = "grpc"
) -> Iterator[Clients]:
    pool = Clients(target, processes=processes, threads=threads, token=token, client=client)
    try:
        yield pool
    finally:
        pool.close()
