"""bench/threads.py reads a real process's threads: a thread that sleeps on an event many times
shows as many voluntary context switches, under its name without its number, and a busy one
as CPU."""

from __future__ import annotations

import os
import threading
import time

from tests.bench.test_plans import load


def test_a_thread_that_waits_shows_its_switches_and_a_busy_one_its_cpu() -> None:
    threads = load("threads")
    meter = threads.ThreadMeter(os.getpid())
    wake, stop, named = threading.Event(), threading.Event(), threading.Event()

    def waiter() -> None:
        # Python does not name its threads for the kernel; gRPC's C threads are named so.
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write("waiter-7")
        named.set()
        while not stop.is_set():
            wake.wait(1)
            wake.clear()

    sleeper = threading.Thread(target=waiter)
    sleeper.start()
    try:
        assert named.wait(10)
        before = meter.snapshot()
        for _ in range(200):
            wake.set()
            time.sleep(0.001)
        spin_until = time.process_time() + 0.05
        while time.process_time() < spin_until:  # this thread: busy, on the CPU
            pass
        after = meter.snapshot()
    finally:
        stop.set()
        wake.set()
        sleeper.join(timeout=10)
    assert after["waiter voluntary"] - before["waiter voluntary"] >= 100
    busy = max((after[k] - before.get(k, 0.0), k) for k in after if k.endswith(" cpu"))
    assert busy[0] >= 0.04 and busy[1] != "waiter cpu"
    line = threads.thread_usage(before, after, 100)
    assert line.startswith("threads per call: ") and "waiter " in line and " cs" in line
