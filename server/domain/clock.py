"""The one clock: seconds since the epoch in, integer milliseconds (what storage keeps) out."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]  # time.time, or a test's hand-moved clock
system_clock: Clock = time.time


def now_ms(clock: Clock) -> int:
    return int(clock() * 1000)
