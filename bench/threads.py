"""One process's CPU and context switches per thread name, from /proc/PID/task.

Where a call's server CPU goes between gRPC's own threads (event_engine, the timer) and the
Python threads that run the handlers, and how often each gives up the CPU: a thread that
waits for the GIL or for a message sleeps (a voluntary switch), and each switch costs the
kernel a few microseconds. Threads are grouped by name with any trailing number dropped
(gRPC numbers some of its threads). CPU is read from /proc/PID/task/TID/schedstat
(nanoseconds), switches from .../status. A thread that exits between two snapshots is left
out of both; a thread that starts in between counts from zero.
"""

from __future__ import annotations

import os
import re

_NUMBERED = re.compile(r"[-_ ]?\d+$")
_SWITCHES = re.compile(r"^(voluntary|nonvoluntary)_ctxt_switches:\s+(\d+)$", re.MULTILINE)


class ThreadMeter:
    """snapshot(): {"<name> cpu": seconds, "<name> voluntary": n, "<name> nonvoluntary": n}, summed
    over the process's threads of each name (a CpuRecorder takes it as its meter)."""

    def __init__(self, pid: int) -> None:
        self._pid = pid

    def snapshot(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        try:
            tids = os.listdir(f"/proc/{self._pid}/task")
        except OSError:
            return totals
        for tid in tids:
            task = f"/proc/{self._pid}/task/{tid}"
            try:
                with (
                    open(f"{task}/comm") as comm,
                    open(f"{task}/schedstat") as sched,
                    open(f"{task}/status") as status,
                ):
                    name = _NUMBERED.sub("", comm.read().strip()) or "?"
                    on_cpu_ns = int(sched.read().split()[0])
                    switches = dict(_SWITCHES.findall(status.read()))
            except (OSError, ValueError, IndexError):
                continue  # the thread exited while it was read
            totals[f"{name} cpu"] = totals.get(f"{name} cpu", 0.0) + on_cpu_ns / 1e9
            for kind in ("voluntary", "nonvoluntary"):
                key = f"{name} {kind}"
                totals[key] = totals.get(key, 0.0) + int(switches.get(kind, 0))
        return totals


def thread_usage(before: dict[str, float], after: dict[str, float], calls: int) -> str:
    """Per call, each thread name's CPU in µs and its context switches (voluntary + involuntary),
    the busiest first, and the whole process's switches."""
    if calls <= 0:
        return "threads: no calls"
    names = {key.rsplit(" ", 1)[0] for key in after}

    def per_call(key: str) -> float:
        return (after.get(key, 0.0) - before.get(key, 0.0)) / calls

    rows = sorted(((per_call(f"{n} cpu") * 1e6, n) for n in names), reverse=True)
    parts = []
    total_switches = 0.0
    for cpu_us, name in rows:
        voluntary, involuntary = per_call(f"{name} voluntary"), per_call(f"{name} nonvoluntary")
        total_switches += voluntary + involuntary
        if cpu_us >= 1 or voluntary + involuntary >= 0.05:
            parts.append(f"{name} {cpu_us:.0f} µs {voluntary:.1f}+{involuntary:.1f} cs")
    return f"threads per call: {'; '.join(parts)} (context switches in all: {total_switches:.1f})"
