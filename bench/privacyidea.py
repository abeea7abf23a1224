"""privacyIDEA's TOTP check and our Verify, side by side on this machine, in the same minutes (issue 13).

    .venv/bin/python bench/privacyidea.py [--venv /tmp/pi-venv --users N --verify-users M
                                           --clients P --threads T --seconds S --verify-seconds V
                                           --rounds R --database-url URL]

privacyIDEA is not a dependency of this project and none of its code is here: it
runs from a virtualenv of its own (--venv; the script says how to make one when
it is missing). In a temporary directory the script writes a pi.cfg (a PostgreSQL
database of its own on the --database-url server, random SECRET_KEY and PI_PEPPER,
an encryption key and audit signing keys made by pi-manage), creates the tables and
an admin, and serves privacyIDEA with gunicorn, 2 sync workers, on 127.0.0.1 (the
issue's setup). Through its API it creates a passwd-file resolver with N users,
a realm over it, and one TOTP token per user with a secret the script chose
(POST /token/init type=totp genkey=0 otpkey=<hex>), without a PIN by default: the
check then compares the OTP alone, as Verify does, privacyIDEA's cheapest check.
--with-pin gives each token a PIN, checked as PIN + OTP (privacyIDEA's own
scheme), which hashes the PIN with argon2id on every check.

It also starts `twofactor serve` on a fresh schema of the same PostgreSQL and
enrolls M users through the API.

Then, after a warm-up of each, R rounds, each in one 30-second TOTP step: a
privacyIDEA phase of S seconds (POST /validate/check user, realm, pass = the
user's code for the current step) and then a Verify phase of V seconds (our
server, a fresh correct code each call, bench/loadgen.py), so the two alternate
(ABAB). Both are loaded the same way: P client processes of T closed-loop
threads (8 in all by default: the issue's wrk c=8); each user is sent at most
once per step, as both servers refuse a code used once (a thread out of fresh
users waits, counted as STARVED). Only accepted answers count (privacyIDEA:
result.value true). Each phase prints calls/s, p50/p99 and CPU µs per call of
the server (every process of its session: gunicorn's master and workers), of
PostgreSQL (the server's own backends, told by application_name: `pg own`; and
with PostgreSQL's background processes), of the client processes, and `other`
(everything else on the machine: well above zero means a loaded machine). The
summary gives the ratios Verify / privacyIDEA per round. Nothing is asserted.

Stops both servers, drops privacyIDEA's database and our schema at the end.
See bench/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from loadgen import (
    SERVE,
    STEP_SECONDS,
    VERIFY,
    ClientProcesses,
    Clients,
    CpuMeter,
    CpuRecorder,
    PhaseResult,
    ServerProcess,
    add_client_option,
    clients,
    server_env,
    wait_serving,
)
from suite import PostgresPids

import twofactor_server
from twofactor_server.domain.keyring import Keyring

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_VENV = "/tmp/pi-venv"  # noqa: S108 (a suggestion: anywhere outside the project)
PRIVACYIDEA_VERSION = "3.14"  # the issue's
GUNICORN_WORKERS = 2  # the issue's
CHECK = "pi-check"  # the privacyIDEA phase's kind
REALM = "bench"
GAP = 0.5  # seconds between phases, and after a step boundary
CALL_TIMEOUT = 30.0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not venv_ready(args.venv):
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: servers stopped, database dropped
    print("bench/privacyidea.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(
        f"privacyIDEA {installed_version(args.venv)} from {args.venv}; "
        f"twofactor_server from {Path(twofactor_server.__file__).parent}; "
        f"{os.cpu_count()} CPUs; {args.clients} client processes x {args.threads} threads for each "
        f"(Verify: {args.threads} connections per process, client {args.client})",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        pi = stack.enter_context(running_privacyidea(args))
        pi_users = pi.enroll(args.users, args.with_pin)
        _, tf_pid, tf_backends, load = stack.enter_context(running_twofactor(args))
        pi_load = stack.enter_context(check_clients(pi.url, args.clients, args.threads))
        pi_load.set_users(pi_users)
        rows = measure(args, pi, pi_load, tf_pid, tf_backends, load)
    summarize(rows, args)
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--venv", default=DEFAULT_VENV, help=f"privacyIDEA's virtualenv (default {DEFAULT_VENV})"
    )
    parser.add_argument("--users", type=int, default=600, help="privacyIDEA users with a TOTP token (600)")
    parser.add_argument("--verify-users", type=int, default=8000, help="twofactor users (8000)")
    parser.add_argument("--clients", type=int, default=2, help="client processes per server (2)")
    parser.add_argument("--threads", type=int, default=4, help="closed-loop threads per client process (4)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each privacyIDEA phase (10)")
    parser.add_argument("--verify-seconds", type=float, default=2.0, help="each Verify phase (2)")
    parser.add_argument("--rounds", type=int, default=2, help="privacyIDEA, Verify pairs (2: ABAB)")
    parser.add_argument(
        "--with-pin",
        action="store_true",
        help="give every privacyIDEA token a PIN (checked as PIN + OTP, its PIN hashed with argon2id)",
    )
    parser.add_argument(
        "--processes",
        default="1",
        help=f"`twofactor serve --processes` (1; privacyIDEA has its {GUNICORN_WORKERS} gunicorn workers)",
    )
    add_client_option(parser)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="the PostgreSQL server")
    args = parser.parse_args(argv)
    if args.seconds + args.verify_seconds + 3 * GAP > STEP_SECONDS:
        parser.error("a round (--seconds + --verify-seconds + 1.5 s) must fit in one 30-second TOTP step")
    if min(args.users, args.verify_users) < args.clients * args.threads:
        parser.error("need at least one user per client thread on each side")
    if "?" in args.database_url:
        parser.error("--database-url takes no query string")
    return args


# ---- privacyIDEA, from its own virtualenv ------------------------------------------------


def venv_ready(venv: str) -> bool:
    missing = [name for name in ("gunicorn", "pi-manage", "python") if not Path(venv, "bin", name).exists()]
    if not missing:
        return True
    print(
        f"privacyIDEA's virtualenv {venv} lacks {', '.join(missing)}. Make it outside the project:\n"
        f"    python3 -m venv {venv} && {venv}/bin/pip install privacyidea=={PRIVACYIDEA_VERSION} "
        "gunicorn psycopg2-binary\n"
        "then run this again (or pass --venv PATH).",
        file=sys.stderr,
    )
    return False


def installed_version(venv: str) -> str:
    code = "import importlib.metadata as m; print(m.version('privacyidea'))"
    return subprocess.run([f"{venv}/bin/python", "-c", code], capture_output=True, text=True).stdout.strip()


@dataclass
class PrivacyIdea:
    url: str  # http://127.0.0.1:PORT
    pid: int  # gunicorn's master: its session holds the workers
    application_name: str  # of its PostgreSQL connections
    directory: Path
    admin_password: str

    def enroll(self, count: int, with_pin: bool) -> list[tuple[str, str, str]]:
        """A passwd-file resolver with `count` users, a realm over it, and a TOTP token for each
        user with a secret of ours; returns (user, base32 secret, PIN) of each.

        Without a PIN the token has no PIN hash and a check compares the OTP alone, as Verify
        does. With one (privacyIDEA's own PIN + OTP), every check also verifies the PIN against
        its hash: argon2id (64 MiB, t=9, p=4 here), hundreds of ms of CPU per check."""
        import base64

        names = [f"pib{i:06d}" for i in range(count)]
        passwd = self.directory / "users.passwd"
        passwd.write_text(
            "".join(f"{n}:x:{10000 + i}:10000::/nonexistent:/bin/false\n" for i, n in enumerate(names))
        )
        session = Http(self.url)
        token = session.call("POST", "/auth", {"username": "admin", "password": self.admin_password})
        session.auth = token["value"]["token"]
        session.call("POST", "/resolver/benchusers", {"type": "passwdresolver", "fileName": str(passwd)})
        session.call("POST", f"/realm/{REALM}", {"resolvers": "benchusers"})
        keys = {name: secrets.token_bytes(20) for name in names}
        pins = {name: secrets.token_hex(3) if with_pin else "" for name in names}

        def init(name: str) -> None:
            fields = {"type": "totp", "genkey": "0", "otpkey": keys[name].hex()}
            if with_pin:
                fields["pin"] = pins[name]
            Http(self.url, session.auth).call("POST", "/token/init", {**fields, "user": name, "realm": REALM})

        began = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(init, names))
        took = time.monotonic() - began
        pin = "with a PIN (pass = PIN + OTP)" if with_pin else "without a PIN (pass = OTP)"
        print(f"privacyIDEA: {count} TOTP tokens {pin} enrolled in {took:.1f} s ({count / took:.0f}/s)")
        return [(name, base64.b32encode(keys[name]).decode(), pins[name]) for name in names]


class Http:
    """privacyIDEA's JSON API over one keep-alive-if-offered HTTP connection."""

    def __init__(self, url: str, auth: str = "") -> None:
        self.auth = auth
        self._conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=CALL_TIMEOUT)

    def call(self, method: str, path: str, fields: dict[str, str]) -> dict[str, Any]:
        """The reply's `result`; raises unless result.status is true."""
        status, reply = self.send(method, path, fields)
        if status != 200 or not reply.get("result", {}).get("status"):
            raise RuntimeError(f"privacyIDEA {method} {path}: HTTP {status} {json.dumps(reply)[:400]}")
        result: dict[str, Any] = reply["result"]
        return result

    def send(self, method: str, path: str, fields: dict[str, str]) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if self.auth:
            headers["Authorization"] = self.auth
        self._conn.request(method, path, urllib.parse.urlencode(fields), headers)
        response = self._conn.getresponse()
        body = response.read()
        if response.will_close:  # gunicorn's sync workers close after every answer
            self._conn.close()
        return response.status, json.loads(body or b"{}")


@contextlib.contextmanager
def running_privacyidea(args: argparse.Namespace) -> Iterator[PrivacyIdea]:
    run = uuid.uuid4().hex[:10]
    database, application_name = f"pi_bench_{run}", f"pi_bench_{run}"
    with tempfile.TemporaryDirectory(prefix="pi-bench-") as temp:
        directory = Path(temp)
        config = directory / "pi.cfg"
        server = urllib.parse.urlsplit(args.database_url)
        config.write_text(
            "import logging\n"
            f"SQLALCHEMY_DATABASE_URI = 'postgresql+psycopg2://{server.netloc}/{database}"
            f"?application_name={application_name}'\n"
            f"SECRET_KEY = b'{secrets.token_hex(32)}'\n"
            f"PI_PEPPER = '{secrets.token_hex(32)}'\n"
            f"PI_ENCFILE = '{directory / 'enckey'}'\n"
            f"PI_AUDIT_KEY_PRIVATE = '{directory / 'private.pem'}'\n"
            f"PI_AUDIT_KEY_PUBLIC = '{directory / 'public.pem'}'\n"
            f"PI_LOGFILE = '{directory / 'privacyidea.log'}'\n"
            "PI_LOGLEVEL = logging.INFO  # production's default\n"
        )
        env = {**os.environ, "PRIVACYIDEA_CONFIGFILE": str(config)}
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        try:
            admin_password = secrets.token_urlsafe(16)
            for command in (
                ["setup", "create_enckey"],
                ["setup", "create_audit_keys"],
                ["setup", "create_tables"],
                ["admin", "add", "admin", "-p", admin_password],
            ):
                manage = [f"{args.venv}/bin/pi-manage", *command]
                done = subprocess.run(manage, env=env, cwd=temp, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"pi-manage {command[:2]} failed:\n{done.stdout}\n{done.stderr}")
            port = free_port()
            app = f'privacyidea.app:create_app(config_name="production", config_file="{config}", silent=True)'
            gunicorn = ServerProcess(
                [
                    f"{args.venv}/bin/gunicorn",
                    f"--workers={GUNICORN_WORKERS}",
                    f"--bind=127.0.0.1:{port}",
                    f"--control-socket={directory / 'gunicorn.ctl'}",
                    app,
                ],
                env,
                cwd=temp,
            )
            try:
                url = f"http://127.0.0.1:{port}"
                wait_answering(url, gunicorn, timeout=60)
                print(f"privacyIDEA: gunicorn pid {gunicorn.pid} on {url}, database {database}", flush=True)
                yield PrivacyIdea(url, gunicorn.pid, application_name, directory, admin_password)
            finally:
                gunicorn.stop()
        finally:
            with psycopg.connect(args.database_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_answering(url: str, server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError("gunicorn exited:\n" + "\n".join(server.output[-30:]))
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            status, _ = Http(url).send("GET", "/healthz/", {})
            if status < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"privacyIDEA not answering after {timeout:.0f} s:\n" + "\n".join(server.output[-30:]))


# ---- the client processes for privacyIDEA (the shape of bench/loadgen.py, over HTTP) -----


class CheckClients(ClientProcesses):
    """`processes` client processes of `threads` closed-loop threads, each sending /validate/check."""

    def __init__(self, url: str, processes: int, threads: int) -> None:
        super().__init__(_check_client_main, (url, threads), processes)

    def set_users(self, users: Sequence[tuple[str, str, str]]) -> None:
        """(user, base32 secret, PIN) of each, dealt out to the processes."""
        self._deal("users", users)


@contextlib.contextmanager
def check_clients(url: str, processes: int, threads: int) -> Iterator[CheckClients]:
    pool = CheckClients(url, processes, threads)
    try:
        yield pool
    finally:
        pool.close()


def _check_client_main(pipe: multiprocessing.connection.Connection, url: str, threads: int) -> None:
    import pyotp

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    users: list[list[Any]] = []  # [name, HOTP, PIN, last step sent]
    turn = [0]
    lock = threading.Lock()

    def next_fresh(step: int) -> list[Any] | None:
        with lock:
            user = users[turn[0]]
            if user[3] >= step:
                return None  # every user of this process was sent in this step
            turn[0] = (turn[0] + 1) % len(users)
            user[3] = step
            return user

    def loop(start: float, end: float) -> PhaseResult:
        result = PhaseResult(CHECK, end - start)
        http_ = Http(url)
        time.sleep(max(0.0, start - time.time()))
        while (began := time.time()) < end:
            step = int(began // STEP_SECONDS)
            user = next_fresh(step)
            if user is None:
                wake = min(end, (step + 1) * STEP_SECONDS + 0.01)
                result.starved_seconds += max(0.0, wake - began)
                time.sleep(max(0.0, wake - time.time()))
                continue
            fields = {"user": user[0], "realm": REALM, "pass": user[2] + user[1].at(step)}
            t0 = time.perf_counter()
            try:
                status, reply = http_.send("POST", "/validate/check", fields)
            except (OSError, http.client.HTTPException, ValueError) as error:
                result.errors[type(error).__name__] += 1
                http_ = Http(url)
                continue
            elapsed = time.perf_counter() - t0
            if status != 200:
                result.errors[f"HTTP {status}"] += 1
            elif reply.get("result", {}).get("value") is not True:
                result.rejected += 1
            elif began + elapsed <= end:
                result.latencies_ms.append(elapsed * 1000)
        return result

    pipe.send("ready")
    try:
        while (message := pipe.recv())[0] != "stop":
            try:
                if message[0] == "users":
                    users[:] = [[name, pyotp.HOTP(secret), pin, -1] for name, secret, pin in message[1]]
                    pipe.send("ready")
                elif message[0] == "run":
                    _, _, start, end = message
                    turn[0] = 0
                    with ThreadPoolExecutor(threads) as pool:
                        parts = list(pool.map(loop, [start] * threads, [end] * threads))
                    total = PhaseResult(CHECK, end - start)
                    for part in parts:
                        total.add(part)
                    pipe.send(total)
            except Exception as error:  # reported to the parent, which stops the run (ClientProcesses)
                pipe.send(RuntimeError(f"privacyIDEA client {os.getpid()}: {type(error).__name__}: {error}"))
    except (EOFError, KeyboardInterrupt):
        return


# ---- twofactor, as bench/verify_vs_health.py runs it ----------------------------------------


@contextlib.contextmanager
def running_twofactor(args: argparse.Namespace) -> Iterator[tuple[str, int, PostgresPids, Clients]]:
    """(target, server pid, its PostgreSQL pids, the Verify clients with M users enrolled)."""
    schema = f"tf_bench_{uuid.uuid4().hex[:10]}"
    token = "bench-" + secrets.token_urlsafe(24)
    env = server_env(
        # application_name tells the server's backends from other sessions' (suite.PostgresPids)
        f"{args.database_url}?options=-csearch_path%3D{schema}&application_name={schema}",
        Keyring.new_key_spec(1),
        token,
        {"TWOFACTOR_ALLOW_CONSOLE_DELIVERY": "true"},  # the bench sends no codes
    )
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        with contextlib.ExitStack() as stack:
            processes = [] if args.processes == "1" else ["--processes", args.processes]
            server = ServerProcess([*SERVE, *processes], env, cwd=str(ROOT))
            stack.callback(server.stop)
            target = f"127.0.0.1:{server.wait_listening(timeout=60)}"
            wait_serving(target, timeout=30)
            print(f"twofactor: server pid {server.pid} on {target}, schema {schema}", flush=True)
            load = stack.enter_context(
                clients(target, processes=args.clients, threads=args.threads, token=token, client=args.client)
            )
            began = time.monotonic()
            enrolled = len(load.enroll([f"bench-{i:06d}" for i in range(args.verify_users)], timeout=3600))
            took = time.monotonic() - began
            print(
                f"twofactor: {enrolled} users enrolled in {took:.1f} s ({enrolled / took:.0f}/s)", flush=True
            )
            backends = stack.enter_context(PostgresPids(args.database_url, schema))
            yield target, server.pid, backends, load
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


# ---- the measurement -------------------------------------------------------------------


@dataclass
class Measured:
    kind: str
    round: int  # 0: warm-up
    result: PhaseResult
    cpu: dict[str, float]  # CPU seconds spent in the phase, by part

    def per_call_us(self, part: str) -> float:
        return self.cpu.get(part, float("nan")) / max(self.result.calls, 1) * 1e6


def schedule(
    args: argparse.Namespace,
) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]]]:
    """The privacyIDEA phases and the Verify phases. Each round is one TOTP step: privacyIDEA
    just after the step boundary, then Verify (other users, other server). Round 0, a warm-up
    of 2 s and 1 s, is a step of its own, so every user is fresh again for round 1."""
    checks, verifies = [], []
    boundary = math.ceil((time.time() + 2) / STEP_SECONDS) * STEP_SECONDS
    for number in range(args.rounds + 1):
        check_seconds, verify_seconds = (2.0, 1.0) if number == 0 else (args.seconds, args.verify_seconds)
        check_start = boundary + GAP
        verify_start = check_start + check_seconds + GAP
        checks.append((CHECK, check_start, check_start + check_seconds))
        verifies.append((VERIFY, verify_start, verify_start + verify_seconds))
        boundary += STEP_SECONDS
    return checks, verifies


def spent(taken: tuple[dict[str, float], dict[str, float]] | None) -> dict[str, float]:
    if taken is None:
        return {}
    before, after = taken
    parts = {key: after[key] - before[key] for key in ("server", "postgres", "pg_backends", "clients")}
    busy = after["machine_busy"] - before["machine_busy"]
    parts["other"] = max(0.0, busy - sum(v for k, v in parts.items() if k != "pg_backends"))
    return parts


def measure(
    args: argparse.Namespace,
    pi: PrivacyIdea,
    pi_load: CheckClients,
    tf_pid: int,
    tf_backends: PostgresPids,
    tf_load: Clients,
) -> list[Measured]:
    check_phases, verify_phases = schedule(args)
    first = check_phases[0][1]
    print(
        f"\nwarm-up, then {args.rounds} rounds, a 30-s step each; first phase in {first - time.time():.0f} s"
    )
    with PostgresPids(args.database_url, pi.application_name) as pi_backends:
        pi_meter = CpuMeter(pi.pid, pi_load.pids, None, pi_backends, pi_backends.backends)
        pi_cpu = CpuRecorder(pi_meter, check_phases)
        tf_meter = CpuMeter(tf_pid, tf_load.pids, None, tf_backends, tf_backends.backends)
        tf_cpu = CpuRecorder(tf_meter, verify_phases)
        verify_results: list[PhaseResult] = []
        verify_thread = threading.Thread(
            target=lambda: verify_results.extend(tf_load.run_schedule(verify_phases)), daemon=True
        )
        verify_thread.start()
        check_results = list(pi_load.run_schedule(check_phases))
        verify_thread.join()
        rows = []
        for number, (check, verify) in enumerate(zip(check_results, verify_results, strict=True)):
            rows.append(Measured(CHECK, number, check, spent(pi_cpu.taken(number))))
            rows.append(Measured(VERIFY, number, verify, spent(tf_cpu.taken(number))))
    for row in rows:
        label = "warm-up" if row.round == 0 else f"round {row.round}"
        name = "privacyIDEA" if row.kind == CHECK else "Verify"
        cpu = "  ".join(f"{heading} {row.per_call_us(part):,.0f}" for part, heading in HEADINGS.items())
        other = row.cpu.get("other", 0.0) / row.result.seconds * 100
        print(f"{label:<8} {name:<11} {row.result.line()}")
        print(f"{'':<20} cpu us/call: {cpu}  (other {other:.0f}% of a core)")
    return rows


HEADINGS = {"server": "server", "pg_backends": "pg own", "postgres": "pg+bg", "clients": "clients"}


def summarize(rows: list[Measured], args: argparse.Namespace) -> None:
    measured = [row for row in rows if row.round > 0]
    pin = "PIN + OTP" if args.with_pin else "OTP alone, no PIN"
    print(
        f"\nprivacyIDEA ({GUNICORN_WORKERS} gunicorn workers, {pin}) vs twofactor serve "
        f"({args.processes} process(es)), "
        f"{args.clients}x{args.threads} closed-loop clients each; per round:"
    )
    print(
        "round  privacyIDEA checks/s  Verify calls/s  ratio   CPU/call (server + pg own): pI / Verify  ratio"
    )
    for number in range(1, args.rounds + 1):
        check, verify = (
            next(r for r in measured if (r.round, r.kind) == (number, kind)) for kind in (CHECK, VERIFY)
        )
        pi_cpu = check.per_call_us("server") + check.per_call_us("pg_backends")
        tf_cpu = verify.per_call_us("server") + verify.per_call_us("pg_backends")
        rate = verify.result.throughput / check.result.throughput if check.result.throughput else float("nan")
        print(
            f"{number:>5}  {check.result.throughput:20.1f}  {verify.result.throughput:14.1f}  {rate:5.0f}x"
            f"   {pi_cpu:>12,.0f} us / {tf_cpu:>6,.0f} us {'':>10} {pi_cpu / tf_cpu:5.0f}x"
        )
    if not all(row.result.valid for row in measured):
        print("NOTE: a phase had rejected codes, errors or starved threads (see its line): read with care")


if __name__ == "__main__":
    sys.exit(main())
