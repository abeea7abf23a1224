"""`python -m twofactor_workers` under cProfile, for bench/worker_path.py --profile DIR.

The consumer (main) process writes DIR/main-PID.prof when it exits; each pool process,
forked with the profiler running, writes DIR/pool-PID.prof when it shuts down.
"""

from __future__ import annotations

import cProfile
import os
import sys
import time

from celery.signals import worker_process_init, worker_process_shutdown

from twofactor_workers.__main__ import main

directory = sys.argv[1]
profile = cProfile.Profile(time.thread_time)  # CPU of this thread, not wall time


@worker_process_init.connect
def _fresh(**_: object) -> None:
    profile.clear()  # the pool process's own figures only, not the parent's before the fork


@worker_process_shutdown.connect
def _dump(**_: object) -> None:
    profile.disable()
    profile.dump_stats(os.path.join(directory, f"pool-{os.getpid()}.prof"))


profile.enable()
try:
    status = main(sys.argv[2:])
finally:
    profile.disable()
    profile.dump_stats(os.path.join(directory, f"main-{os.getpid()}.prof"))
sys.exit(status)
