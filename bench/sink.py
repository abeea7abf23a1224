"""A local SMTP sink for the bench (aiosmtpd in a child process): when each message arrived and how
many connections were opened.

The sink runs in a process of its own, as an SMTP server would: in the bench's process it
shared a GIL with the paced SendCode clients, and a burst of deliveries then showed up as
their latency. The child reports each connection and each accepted message (stamped with
time.time() on arrival) on its stdout, one line each; a thread of the bench reads them.

    python bench/sink.py     # the child: prints its port, then `C` and `A <time>` lines
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

_CHILD_START_SECONDS = 30.0


class BenchSink:
    def __init__(self) -> None:
        self.arrivals: list[float] = []  # time.time() of each accepted message
        self.connections = 0
        self.changed = threading.Condition()
        self.port = 0
        self._child: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def wait_for(self, count: int, timeout: float) -> bool:
        """Whether `count` messages in all have arrived within `timeout` seconds."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.arrivals) >= count, timeout)

    def start(self) -> None:
        self._child = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C of the bench reaches it through stop(), in order
        )
        assert self._child.stdout is not None
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(ready,), name="sink-reader", daemon=True)
        self._reader.start()
        if not ready.wait(_CHILD_START_SECONDS) or not self.port:
            self.stop()
            raise RuntimeError(f"the SMTP sink did not start within {_CHILD_START_SECONDS:g} s")

    def __enter__(self) -> BenchSink:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)
            try:
                self._child.wait(10)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait(5)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _read(self, ready: threading.Event) -> None:
        assert self._child is not None and self._child.stdout is not None
        first = self._child.stdout.readline()
        self.port = int(first) if first.strip().isdigit() else 0
        ready.set()
        for line in self._child.stdout:
            kind, _, moment = line.rstrip("\n").partition(" ")
            with self.changed:
                if kind == "A":
                    self.arrivals.append(float(moment))
                elif kind == "C":
                    self.connections += 1
                self.changed.notify_all()


def _serve() -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, Envelope, Session

    out = sys.stdout
    lock = threading.Lock()
    serving = threading.Event()  # set once the port is reported: Controller.start's own probe isn't counted

    def report(line: str) -> None:
        with lock:
            out.write(line + "\n")
            out.flush()

    class Handler:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            report(f"A {time.time()!r}")
            return "250 2.0.0 accepted"

    class CountingSMTP(SMTP):
        def connection_made(self, transport: Any) -> None:
            if serving.is_set():
                report("C")
            super().connection_made(transport)

    class CountingController(Controller):
        def factory(self) -> SMTP:
            return CountingSMTP(self.handler, **self.SMTP_kwargs)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    controller = CountingController(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    report(str(port))
    serving.set()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    controller.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # for sigwait, in every thread
    _serve()
