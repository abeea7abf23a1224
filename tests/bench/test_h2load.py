"""bench/h2load.py, the bench's plain-HTTP/2 client, against the real server: it counts a call
accepted only when the server's reply says so, counts the rest, and loses no call past the
server's flow-control window. And loadgen's fast code is the authenticator app's code."""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path
from types import ModuleType

import pyotp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness
from tests.server.helpers import enroll_authenticator, totp_now, verify

BENCH = Path(__file__).resolve().parents[2] / "bench"
VERIFY_PATH = "/twofactor.v1.TwoFactorService/Verify"


def load(name: str) -> ModuleType:
    """bench/ is a folder of scripts, not a package: load a module from its file, by the name
    its neighbours import it by."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


loadgen = load("loadgen")
h2load = load("h2load")


class WallClock(Clock):
    """The server's clock at a fixed offset from the wall clock: loadgen's phases take their
    TOTP steps from time.time()."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    @property  # type: ignore[override]
    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock() -> Clock:
    return WallClock(0.0)


def judge_accepted(reply: bytes) -> str:
    return "ok" if pb.VerifyResponse.FromString(reply).result == pb.VERIFY_RESULT_ACCEPTED else "rejected"


def run_once_each(harness: Harness, calls: list[tuple[str, bytes, object]], connections: int, metadata=None):
    """Each call sent once, over `connections` connections; the phase ends once all are answered
    (bounded: a minute, for a loaded machine; 400 calls one after another once took over 3 s)."""
    pending = list(calls)

    def next_call(now: float):
        return pending.pop() if pending else None

    start = time.time()
    return h2load.run_closed_loop(
        harness.target,
        harness.app_metadata if metadata is None else metadata,
        connections,
        next_call,
        lambda: math.inf,  # no call comes back once the list is done
        "verify",
        start,
        start + 60.0,
    )


def verify_call(user_id: str, code: str) -> tuple[str, bytes, object]:
    return VERIFY_PATH, pb.VerifyRequest(user_id=user_id, code=code).SerializeToString(), judge_accepted


def test_correct_codes_count_as_accepted_and_their_replays_as_rejected(
    harness: Harness, clock: Clock
) -> None:
    users = {f"h2-{i}": enroll_authenticator(harness, clock, f"h2-{i}")[0] for i in range(6)}
    calls = [verify_call(user_id, totp_now(secret, clock)) for user_id, secret in users.items()]

    first = run_once_each(harness, calls, connections=3)
    assert (first.calls, first.rejected, dict(first.errors)) == (6, 0, {})
    # The server saw each code: the same codes again are replays, which it refuses.
    again = run_once_each(harness, calls, connections=2)
    assert (again.calls, again.rejected, dict(again.errors)) == (0, 6, {})
    assert all(latency > 0 for latency in first.latencies_ms)


def test_a_call_the_server_refuses_with_a_status_is_an_error_not_a_reply(
    harness: Harness, clock: Clock
) -> None:
    secret, _ = enroll_authenticator(harness, clock, "h2-refused")
    code = totp_now(secret, clock)
    wrong_token = (("authorization", "Bearer not-a-token"),)
    refused = run_once_each(harness, [verify_call("h2-refused", code)], connections=1, metadata=wrong_token)
    assert (refused.calls, refused.rejected, dict(refused.errors)) == (0, 0, {"NO_MESSAGE": 1})
    # Nothing was checked: the code is still fresh for the right caller.
    assert verify(harness, "h2-refused", code).result == pb.VERIFY_RESULT_ACCEPTED


def test_more_requests_than_the_servers_first_window_all_get_answers(harness: Harness, clock: Clock) -> None:
    # 400 requests of about 215 bytes on one connection: past the 65,535 bytes HTTP/2 lets a
    # client send before the server's first WINDOW_UPDATE.
    user_id = "w" * 200
    secret, _ = enroll_authenticator(harness, clock, user_id)
    wrong = totp_now(secret, clock, offset_steps=10)
    calls = [verify_call(user_id, wrong) for _ in range(400)]
    assert sum(len(body) + 5 for _, body, _ in calls) > 65_535
    result = run_once_each(harness, calls, connections=1)
    # Every one answered with a reply: rejected, then locked (judged "rejected" too).
    assert (result.calls, result.rejected, dict(result.errors)) == (0, 400, {})


def test_loadgen_drives_verify_phases_over_h2(harness: Harness, clock: Clock) -> None:
    """loadgen's h2 phase, as the bench scripts run it: the process's users in turn, each
    once per step; when all are used it waits for the next step, counted as starved."""
    assert isinstance(clock, WallClock)
    clock.offset = -90.0  # enrolled (each confirmed, then a step on) before the phase's steps
    secrets = {f"h2-loop-{i}": enroll_authenticator(harness, clock, f"h2-loop-{i}")[0] for i in range(2)}
    # The server one step behind the wall clock, so its drift window of one step takes the
    # phase's codes (the current step of time.time()) however the phase meets a step boundary.
    clock.offset = -30.0
    process = loadgen._ClientProcess(harness.target, "", 2, "h2")
    process._metadata = harness.app_metadata
    try:
        step = int(time.time() // 30)
        process.set_users([(user_id, secret, step - 1) for user_id, secret in secrets.items()])
        start = time.time() + 0.2  # a phase whose start has passed is reported LATE_START
        result = process.run(loadgen.VERIFY, start, start + 1.0)
    finally:
        process.close()
    if int(time.time() // 30) != step:  # the phase crossed a step: every user was fresh twice
        assert result.calls in (2, 4)
    else:
        assert result.calls == 2
    assert (result.rejected, dict(result.errors)) == (0, {})
    assert result.starved_seconds > 0


@given(st.binary(min_size=14, max_size=64), st.integers(min_value=0, max_value=2**40))
def test_loadgen_code_at_is_the_authenticator_apps_code(key: bytes, step: int) -> None:
    import base64

    hotp = pyotp.HOTP(base64.b32encode(key).decode())
    assert loadgen.Enrolled("u", hotp, 0).code_at(step) == hotp.at(step)
