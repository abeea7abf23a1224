"""`twofactor serve --processes N`: N server processes on one port, and the supervisor that runs them.

One Python process serves about one core (the GIL). The supervisor binds the
port first, with SO_REUSEPORT, and keeps it bound (not listening) while the
children run: a port another program holds (without SO_REUSEPORT) fails here,
at start, with one clear line, and the kernel then spreads new connections over
the children, which bind the same port with SO_REUSEPORT (only sockets of the
same user may join the group). The supervisor imports neither gRPC nor the
storage: it starts `twofactor serve` children, waits until each one listens,
prints one `listening on` line, forwards SIGTERM/SIGINT to every child and
waits while each drains its in-flight calls. When a child dies on its own, the
supervisor stops the others and exits 1: a half-sized server should be
restarted whole by whatever runs it (systemd, Kubernetes).

With TWOFACTOR_METRICS_LISTEN set, the supervisor serves /metrics for all
children on that one port: prometheus-client's multiprocess mode, its
directory made before the children start (they inherit it) and removed at the
end; the children serve none of their own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from twofactor_server.settings import Settings, SettingsError

CHILD_FLAG = "--supervised-listen"  # `twofactor serve --supervised-listen HOST:PORT`: a child
START_TIMEOUT = 120.0  # seconds for every child to listen (migrations run in the first one)
STOP_MARGIN = 30.0  # seconds past the drain grace before a child that does not stop is killed


def process_count(text: str) -> int:
    """The --processes value: a whole number from 1, or `auto` (the CPU count)."""
    if text == "auto":  # the CPUs this process may run on (taskset, a container's cpuset)
        allowed = getattr(os, "sched_getaffinity", None)  # Linux only
        return (len(allowed(0)) if allowed else os.cpu_count()) or 1
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= 256:
        raise SettingsError(f"--processes takes a number from 1 to 256 or 'auto', got {text!r}")
    return count


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Bind HOST:PORT with SO_REUSEPORT (port 0 picks one); returns the socket and the HOST:PORT to use."""
    host, _, port_text = listen.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise SettingsError(f"TWOFACTOR_LISTEN must be HOST:PORT, got {listen!r}") from None
    address = host.strip("[]") or "0.0.0.0"  # noqa: S104 - the documented default binds every interface
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
        reserved = socket.socket(family, kind, proto)
    except OSError as error:
        raise SettingsError(f"could not listen on {listen} ({error})") from None
    try:
        if port:
            # A plain bind first: SO_REUSEPORT alone would share the port with any other program
            # (another supervisor too) that binds it with SO_REUSEPORT, and split the calls.
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT is no holder
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(sockaddr)
        # For the bind only: left on, a later probe (another supervisor's) would bind beside it.
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    except OSError as error:
        reserved.close()
        held = ": another program holds the port; stop it or set TWOFACTOR_LISTEN to a free one"
        raise SettingsError(
            f"could not listen on {listen} ({error.strerror or error})"
            + (held if error.errno == errno.EADDRINUSE else "")
        ) from None
    return reserved, f"{host}:{reserved.getsockname()[1]}"


class _Child:
    """One `twofactor serve` child; its output is passed on, except its own `listening on` line."""

    def __init__(self, listen: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "twofactor_server.cli", "serve", CHILD_FLAG, listen],
            # Never written: its end of file tells the child that this supervisor is gone.
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.listening = threading.Event()
        self.exited = threading.Event()
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if " listening on " in line and not self.listening.is_set():
                self.listening.set()
            else:
                _say(line, end="")
        self.process.wait()
        self.exited.set()


def supervise(settings: Settings, processes: int) -> int:
    """Run `processes` server children on settings.listen until SIGTERM or SIGINT; the exit status."""
    if settings.embedded:
        raise SettingsError(
            "--processes above 1 needs PostgreSQL (TWOFACTOR_DATABASE_URL): "
            "the embedded SQLite store serves one process"
        )
    reserved, listen = reserve_port(settings.listen)
    try:
        metrics = _metrics_endpoint(settings)
    except BaseException:
        reserved.close()
        raise
    wake = threading.Event()
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children: list[_Child] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        # The first child alone until it listens: a setting every child would refuse is said
        # once, and the migrations run in one process.
        children.append(_start_child(listen, wake))
        started = _all_listening(children, wake, stopping, deadline)
        if started:  # the others have as long again: the first one's migrations are done
            children += [_start_child(listen, wake) for _ in range(processes - 1)]
            started = _all_listening(children, wake, stopping, time.monotonic() + START_TIMEOUT)
        if started is None:
            print(f"twofactor: server processes not listening after {START_TIMEOUT:.0f} s", file=sys.stderr)
            return _stop_all(children, settings, status=1)
        if started:
            print(
                f"twofactor listening on {listen} (PostgreSQL, {processes} processes, "
                f"pids {' '.join(str(c.process.pid) for c in children)})",
                flush=True,
            )
            wake.wait()
        if stopping.is_set():
            _say(f"draining in-flight calls of {processes} processes")
            return _stop_all(children, settings, status=0)
        dead = next(c for c in children if c.exited.is_set())
        # A child refusing its configuration at start (status 2: a bad setting, an unmigrated
        # database) is the whole server's configuration error, as for `twofactor serve` alone,
        # and its own line says which: nothing to add.
        refused = dead.process.returncode == 2 and not all(c.listening.is_set() for c in children)
        if not refused:
            print(
                f"twofactor: server process {dead.process.pid} exited with status {dead.process.returncode}; "
                "stopping the others (see its message above)",
                file=sys.stderr,
            )
        return _stop_all(children, settings, status=2 if refused else 1)
    finally:
        reserved.close()
        if metrics is not None:
            metrics()


def _start_child(listen: str, wake: threading.Event) -> _Child:
    child = _Child(listen)
    threading.Thread(target=_wake_on_exit, args=(child, wake), daemon=True).start()
    return child


def _all_listening(
    children: list[_Child], wake: threading.Event, stopping: threading.Event, deadline: float
) -> bool | None:
    """Wait until every child listens (True); False once a stop is asked for or a child exited,
    None at the deadline."""
    while not all(c.listening.is_set() for c in children):
        if stopping.is_set() or any(c.exited.is_set() for c in children):
            return False
        if time.monotonic() > deadline:
            return None
        wake.wait(0.1)
    return True


def _metrics_endpoint(settings: Settings) -> Callable[[], None] | None:
    """Serve /metrics for every child (multiprocess mode); returns what closes it, or None without metrics."""
    if not settings.metrics_listen:
        return None
    from twofactor_server.observability.metrics import (
        prepare_multiprocess_dir,
        remove_multiprocess_dir,
        serve_metrics,
    )

    try:
        prepare_multiprocess_dir()  # before the children start: they inherit it and write their files there
    except OSError as error:
        raise SettingsError(
            "TWOFACTOR_METRICS_LISTEN with --processes needs a writable temporary directory "
            f"(TMPDIR): {error}"
        ) from None
    try:
        endpoint = serve_metrics(settings.metrics_listen, multiprocess=True)
    except (OSError, ValueError) as error:
        remove_multiprocess_dir()
        raise SettingsError(
            f"TWOFACTOR_METRICS_LISTEN: could not serve metrics on {settings.metrics_listen} ({error})"
        ) from None

    def close() -> None:
        endpoint.close()
        remove_multiprocess_dir()

    return close


def _wake_on_exit(child: _Child, wake: threading.Event) -> None:
    child.exited.wait()
    wake.set()


def _stop_all(children: list[_Child], settings: Settings, *, status: int) -> int:
    """SIGTERM every child, wait for each to drain (grace + a margin, then SIGKILL); the exit status."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.grace_seconds + STOP_MARGIN
    for child in children:
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"twofactor: server process {child.process.pid} did not stop; killing it", file=sys.stderr)
            child.process.kill()
            child.process.wait()
            status = 1
        # A child stopped by the signal itself did not get to set its handlers (a stop during
        # its start): stopped as asked.
        if child.process.returncode not in (0, -signal.SIGTERM, -signal.SIGINT) and status == 0:
            status = 1
        child.exited.wait(5)  # its last lines are passed on
    _say("stopped")
    return status


def _say(line: str, end: str = "\n") -> None:
    """A line on standard output; nobody reading it (a `| tee` stopped) must not stop the supervisor."""
    with contextlib.suppress(OSError):
        print(line, end=end, flush=True)
