"""Storage that fails fast and says so: with PostgreSQL frozen (SIGSTOP) or stopped, every RPC
that needs it answers UNAVAILABLE (STORAGE_UNAVAILABLE) within the storage timeout, health is
NOT_SERVING, and once the database is back the same server serves again, without a restart.

Each test runs its own PostgreSQL cluster (tests/private_postgres.py): the shared one is never
stopped or frozen."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import (
    POSTGRES_ADMIN_URL,
    Clock,
    Harness,
    ServerFactory,
    base_settings,
    require_service,
    started_harness,
)
from tests.pg_proxy import PostgresProxy
from tests.private_postgres import PrivatePostgres, private_postgres
from tests.server.helpers import (
    AUTHENTICATOR,
    EMAIL,
    enroll_authenticator,
    error_info,
    totp_now,
    verified_token,
    verify,
)
from tests.server.test_metrics import scrape, value
from twofactor_server.app import SERVICE_NAMES
from twofactor_server.domain.errors import StorageUnavailable
from twofactor_server.settings import Settings
from twofactor_server.storage.database import PostgresDatabase

STORAGE_TIMEOUT = 1.0
BOUND = 5.0  # generous: the timeout is 1 s, the machine may be loaded
RECOVERY_BOUND = 60.0
HEALTH = ("", *SERVICE_NAMES)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def cluster() -> Iterator[PrivatePostgres]:
    try:
        pg = private_postgres()
        started = pg.__enter__()
    except FileNotFoundError as error:  # no PostgreSQL server binaries on this machine
        require_service("a private PostgreSQL cluster", error)
    try:
        yield started
    finally:
        pg.__exit__(None, None, None)


@pytest.fixture
def settings(tmp_path: Path, cluster: PrivatePostgres) -> Settings:
    return base_settings(
        tmp_path,
        database_url=cluster.url,
        storage_timeout_seconds=STORAGE_TIMEOUT,
        storage_probe_seconds=0.2,
    )


def every_storage_rpc(h: Harness) -> list[tuple[str, Callable[[], Message]]]:
    """One call of each RPC that reads or writes the database, for a user `ana` (enrolled, with an
    email) and `bob` (unknown until a call creates him)."""
    app, admin = h.app_metadata, h.admin_metadata
    t, a = h.twofactor, h.admin
    return [
        ("GetStatus", lambda: t.GetStatus(pb.GetStatusRequest(user_id="ana"), metadata=app, timeout=30)),
        (
            "SetContact",
            lambda: t.SetContact(
                pb.SetContactRequest(user_id="ana", email="ana@example.com"), metadata=app, timeout=30
            ),
        ),
        (
            "ConfirmContact",
            lambda: t.ConfirmContact(
                pb.ConfirmContactRequest(user_id="ana", method=EMAIL, code="000000"), metadata=app, timeout=30
            ),
        ),
        (
            "StartEnrollment",
            lambda: t.StartEnrollment(
                pb.StartEnrollmentRequest(user_id="bob", method=AUTHENTICATOR), metadata=app, timeout=30
            ),
        ),
        (
            "ConfirmEnrollment",
            lambda: t.ConfirmEnrollment(
                pb.ConfirmEnrollmentRequest(user_id="bob", method=AUTHENTICATOR, code="000000"),
                metadata=app,
                timeout=30,
            ),
        ),
        (
            "DisableMethod",
            lambda: t.DisableMethod(
                pb.DisableMethodRequest(user_id="bob", method=EMAIL), metadata=app, timeout=30
            ),
        ),
        (
            "SendCode",
            lambda: t.SendCode(pb.SendCodeRequest(user_id="ana", method=EMAIL), metadata=app, timeout=30),
        ),
        (
            "GetChallenge",
            lambda: t.GetChallenge(
                pb.GetChallengeRequest(user_id="ana", challenge_id="no-such-challenge"),
                metadata=app,
                timeout=30,
            ),
        ),
        (
            "Verify",
            lambda: t.Verify(pb.VerifyRequest(user_id="ana", code="000000"), metadata=app, timeout=30),
        ),
        (
            "GetBackupCodes",
            lambda: t.GetBackupCodes(pb.GetBackupCodesRequest(user_id="ana"), metadata=app, timeout=30),
        ),
        (
            "RegenerateBackupCodes",
            lambda: t.RegenerateBackupCodes(
                pb.RegenerateBackupCodesRequest(user_id="ana"), metadata=app, timeout=30
            ),
        ),
        ("GetUser", lambda: a.GetUser(admin_pb.GetUserRequest(user_id="ana"), metadata=admin, timeout=30)),
        ("ListUsers", lambda: a.ListUsers(admin_pb.ListUsersRequest(), metadata=admin, timeout=30)),
        (
            "ResetUser",
            lambda: a.ResetUser(
                admin_pb.ResetUserRequest(user_id="carol", reason="lost phone"), metadata=admin, timeout=30
            ),
        ),
        (
            "UnlockUser",
            lambda: a.UnlockUser(admin_pb.UnlockUserRequest(user_id="ana"), metadata=admin, timeout=30),
        ),
        (
            "ListAuditEvents",
            lambda: a.ListAuditEvents(admin_pb.ListAuditEventsRequest(), metadata=admin, timeout=30),
        ),
    ]


def outcome(call: Callable[[], Message]) -> tuple[grpc.StatusCode, str, float]:
    """The status code, the ErrorInfo reason ("" on success) and how long the call took."""
    started = time.monotonic()
    try:
        call()
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
        reason = error_info(error).reason if code is not grpc.StatusCode.DEADLINE_EXCEEDED else ""
        return code, reason, time.monotonic() - started
    return grpc.StatusCode.OK, "", time.monotonic() - started


def health_of(h: Harness) -> dict[str, int]:
    stub = health_pb2_grpc.HealthStub(h.channel)
    # Health never waits for the database: a short deadline is part of the claim.
    return {
        name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status for name in HEALTH
    }


def wait_for_health(h: Harness, status: int, bound: float) -> float:
    """Seconds until every health name reports `status`; fails past `bound`."""
    started = time.monotonic()
    while True:
        seen = health_of(h)
        if all(value == status for value in seen.values()):
            return time.monotonic() - started
        assert time.monotonic() - started < bound, f"health still {seen} after {bound} s"
        time.sleep(0.05)


def prepare(h: Harness, clock: Clock) -> str:
    """`ana` enrolled in the authenticator app, with an email, her sealed secret cached by the
    server (she has verified once: her next right code takes the one-statement path); returns
    her secret."""
    h.twofactor.SetContact(  # before enrolling: afterwards a contact change needs a step-up proof
        pb.SetContactRequest(user_id="ana", email="ana@example.com"), metadata=h.app_metadata
    )
    secret, _ = enroll_authenticator(h, clock, "ana")
    clock.advance(30)
    assert verify(h, "ana", totp_now(secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED
    clock.advance(30)
    assert all(status == SERVING for status in health_of(h).values())
    return secret


def assert_every_rpc_fails_fast(h: Harness, secret: str, clock: Clock) -> None:
    right = pb.VerifyRequest(user_id="ana", code=totp_now(secret, clock))
    right_code = (  # the accepted path's one statement (a HotStatement, through libpq directly)
        "Verify (a right code, the secret cached)",
        lambda: h.twofactor.Verify(right, metadata=h.app_metadata, timeout=30),
    )
    # Alone first, while the pool still has its idle connection: the statement itself meets the
    # frozen or stopped database (in the crowd below, most calls wait for a connection instead).
    results = [(right_code[0], *outcome(right_code[1]))]
    calls = [*every_storage_rpc(h), right_code] * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        results += list(pool.map(lambda named: (named[0], *outcome(named[1])), calls))
    slow_or_wrong = [
        (name, code.name, reason, round(took, 2))
        for name, code, reason, took in results
        if code is not grpc.StatusCode.UNAVAILABLE or reason != "STORAGE_UNAVAILABLE" or took > BOUND
    ]
    assert slow_or_wrong == [], "each call must be UNAVAILABLE (STORAGE_UNAVAILABLE) within the bound"
    # GetPolicy needs no database: it still answers.
    policy = h.admin.GetPolicy(admin_pb.GetPolicyRequest(), metadata=h.admin_metadata, timeout=BOUND)
    assert policy.policy.code_length == 6


def assert_serving_again(h: Harness, clock: Clock, secret: str) -> None:
    wait_for_health(h, SERVING, RECOVERY_BOUND)
    # The first calls after recovery succeed: no broken connection is handed out again.
    for name, call in every_storage_rpc(h):
        code, reason, _ = outcome(call)
        assert code not in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ), (name, code, reason)
    clock.advance(30)
    assert verify(h, "ana", totp_now(secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED
    assert (
        h.admin.GetUser(admin_pb.GetUserRequest(user_id="ana"), metadata=h.admin_metadata).user.user_id
        == "ana"
    )


@contextmanager
def frozen_then_thawed(h: Harness, clock: Clock, cluster: PrivatePostgres) -> Iterator[str]:
    """`ana` prepared (her secret yielded), the database frozen for the block, then thawed; and
    the server serving again after it."""
    secret = prepare(h, clock)
    cluster.freeze()
    try:
        yield secret
    finally:
        cluster.thaw()
    assert_serving_again(h, clock, secret)


def test_a_frozen_database_fails_fast_and_the_server_recovers_when_it_thaws(
    start_server: ServerFactory, clock: Clock, cluster: PrivatePostgres
) -> None:
    h = start_server()
    with frozen_then_thawed(h, clock, cluster) as secret:
        assert_every_rpc_fails_fast(h, secret, clock)
        wait_for_health(h, NOT_SERVING, BOUND)


def test_a_stopped_database_fails_fast_and_the_server_recovers_when_it_restarts(
    start_server: ServerFactory, clock: Clock, cluster: PrivatePostgres
) -> None:
    h = start_server()
    secret = prepare(h, clock)
    cluster.stop()
    assert_every_rpc_fails_fast(h, secret, clock)
    wait_for_health(h, NOT_SERVING, BOUND)
    # Still down a while later: still fast, the pool's reconnect attempts keep nobody waiting.
    assert_every_rpc_fails_fast(h, secret, clock)
    cluster.start()
    assert_serving_again(h, clock, secret)


def test_health_goes_not_serving_while_frozen_without_any_call(
    start_server: ServerFactory, clock: Clock, cluster: PrivatePostgres
) -> None:
    """The probe alone notices: a server nobody calls still reports its storage truthfully, in
    its health and in twofactor_storage_up (which a broker outage, also UNAVAILABLE, leaves be)."""
    h = start_server(metrics_listen="127.0.0.1:0")
    prepare(h, clock)
    assert value(scrape(h), "twofactor_storage_up") == 1
    cluster.freeze()
    try:
        assert wait_for_health(h, NOT_SERVING, BOUND) < BOUND
        assert value(scrape(h), "twofactor_storage_up") == 0
    finally:
        cluster.thaw()
    wait_for_health(h, SERVING, RECOVERY_BOUND)
    assert value(scrape(h), "twofactor_storage_up") == 1


def test_after_a_restart_the_pool_hands_out_no_broken_connection(
    start_server: ServerFactory, clock: Clock, cluster: PrivatePostgres
) -> None:
    """Connections left idle in the pool by an outage are replaced before health says SERVING."""
    h = start_server()
    secret = prepare(h, clock)
    calls = [call for _, call in every_storage_rpc(h)] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(outcome, calls))  # the pool grows to serve 8 callers at once
    db = h.server.db
    assert isinstance(db, PostgresDatabase)
    idle = db._pool.get_stats()["pool_available"]
    assert idle >= 2, "the test needs several idle connections to be meaningful"
    cluster.stop()
    wait_for_health(h, NOT_SERVING, BOUND)  # no call in between: the probe alone notices
    cluster.start()
    wait_for_health(h, SERVING, RECOVERY_BOUND)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(outcome, calls))
    assert [r for r in results if r[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)] == []
    clock.advance(30)
    assert verify(h, "ana", totp_now(secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED


def test_sqlite_waits_for_a_busy_file_no_longer_than_the_storage_timeout(
    tmp_path: Path, clock: Clock
) -> None:
    """The embedded store keeps its busy wait (another process holding the write lock), bounded
    by the same setting; a busy file is not an unreachable database, so health stays SERVING."""
    chosen = base_settings(tmp_path, storage_timeout_seconds=0.5, storage_probe_seconds=0.2)
    h = started_harness(chosen, clock)
    try:
        secret, _ = enroll_authenticator(h, clock, "ana")
        blocker = sqlite3.connect(chosen.data_dir / "twofactor.sqlite3", isolation_level=None, timeout=0)
        with closing(blocker):
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            code, reason, took = outcome(
                lambda: h.twofactor.SetContact(
                    pb.SetContactRequest(user_id="ana", email="ana@example.com"),
                    metadata=h.app_metadata,
                    timeout=30,
                )
            )
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
            assert 0.4 <= took < 3.0, f"waited {took:.2f} s for a 0.5 s storage timeout"
            assert all(status == SERVING for status in health_of(h).values())
            blocker.execute("ROLLBACK")
        token = verified_token(h, clock, "ana", secret)
        h.twofactor.SetContact(
            pb.SetContactRequest(user_id="ana", email="ana@example.com", verification_token=token),
            metadata=h.app_metadata,
        )
    finally:
        h.channel.close()
        h.server.stop(grace=None)


def test_health_answers_while_calls_for_a_frozen_database_hold_every_handler_thread(
    start_server: ServerFactory, clock: Clock, cluster: PrivatePostgres
) -> None:
    """Two handler threads, each held by a call waiting out the storage timeout, and more calls
    behind them: a liveness probe queued with those calls would miss its deadline. Health's
    Check runs on threads of its own."""
    h = start_server(max_workers=2)
    prepare(h, clock)
    cluster.freeze()
    try:
        with ThreadPoolExecutor(8) as callers:
            burst = [
                callers.submit(
                    outcome,
                    lambda: h.twofactor.GetStatus(
                        pb.GetStatusRequest(user_id="ana"), metadata=h.app_metadata, timeout=30
                    ),
                )
                for _ in range(8)
            ]
            probes = 0
            while not all(call.done() for call in burst):
                health_of(h)  # each Check within its 2-second deadline, or DEADLINE_EXCEEDED
                probes += 1
            assert probes > 1
            assert {call.result()[:2] for call in burst} == {
                (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
            }
    finally:
        cluster.thaw()
    wait_for_health(h, SERVING, RECOVERY_BOUND)


def get_status(h: Harness) -> Callable[[], Message]:
    return lambda: h.twofactor.GetStatus(
        pb.GetStatusRequest(user_id="ana"), metadata=h.app_metadata, timeout=30
    )


def test_calls_queued_for_a_thread_behind_a_frozen_database_hear_within_the_storage_timeout(
    start_server: ServerFactory, clock: Clock, cluster: PrivatePostgres
) -> None:
    """Two handler threads, 24 calls at once: each thread's call waits out the 1-second
    timeout, and the calls queued behind them would each wait it again (12 s for the last).
    The wait for a thread is counted: every caller hears within the bound."""
    h = start_server(max_workers=2)
    with frozen_then_thawed(h, clock, cluster):
        with ThreadPoolExecutor(24) as callers:
            results = list(callers.map(lambda _: outcome(get_status(h)), range(24)))
        slow_or_wrong = [
            (code.name, reason, round(took, 2))
            for code, reason, took in results
            if (code, reason) != (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE") or took > BOUND
        ]
        assert slow_or_wrong == []


def test_once_the_probe_finds_the_database_frozen_calls_are_answered_at_once(
    start_server: ServerFactory, clock: Clock, cluster: PrivatePostgres
) -> None:
    """No thread waits on a database the probe found silent: with a 3-second timeout, calls are
    answered long before it, and the probe still finds the thaw."""
    h = start_server(storage_timeout_seconds=3.0)
    with frozen_then_thawed(h, clock, cluster):
        wait_for_health(h, NOT_SERVING, 3.0 + BOUND)  # the probe alone notices
        with ThreadPoolExecutor(8) as callers:
            results = list(callers.map(lambda _: outcome(get_status(h)), range(16)))
        assert {result[:2] for result in results} == {(grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")}
        assert max(took for _, _, took in results) < 1.5, "answered at once, not after the 3 s timeout"


def test_a_restart_is_not_taken_for_a_frozen_database(
    start_server: ServerFactory, clock: Clock, cluster: PrivatePostgres
) -> None:
    """After a restart the probe's kept connection is dead, and its ping fails at once: that is a
    refusal, not silence, so calls go on trying (and get new connections) rather than being
    answered UNAVAILABLE until the next probe, 30 s away here."""
    h = start_server(storage_probe_seconds=30.0)
    prepare(h, clock)
    assert h.server.storage_health.check()  # the probe's connection, kept from here on
    cluster.stop()
    cluster.start()
    started = time.monotonic()
    while (result := outcome(get_status(h)))[0] is not grpc.StatusCode.OK:
        assert result[:2] == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
        assert time.monotonic() - started < 15.0, "calls still refused after the restart"
        time.sleep(0.1)
    wait_for_health(h, SERVING, BOUND)


class SlowToConnect(PostgresProxy):
    """Holds each connection's first answer from the server for `delay` s, then relays at once:
    a database slow to open a connection (TLS and SCRAM to a distant server) and quick on an
    open one."""

    def __init__(self, postgres_url: str, delay: float) -> None:
        super().__init__(postgres_url)
        self._delay = delay

    def from_server(self, data: bytes, *, first: bool) -> tuple[bytes, bool]:
        if first:
            time.sleep(self._delay)
        return data, False


def test_a_probe_slow_to_connect_is_not_taken_for_silence() -> None:
    """The probe opens a connection of its own after a failure: when that takes longer than the
    storage timeout, the database still answers, and calls on the pool's open connections go on
    being served (a connect that outran the deadline once made every call fail at once, for good)."""
    proxy = SlowToConnect(POSTGRES_ADMIN_URL, delay=1.0)
    db = PostgresDatabase(proxy.url, timeout=0.5)
    try:

        def call() -> bool:
            try:
                with db.statements() as tx:
                    return tx.one("SELECT 1 AS one", {}) == {"one": 1}
            except StorageUnavailable:
                return False

        started = time.monotonic()
        while not call():  # the pool opens its first connection in the background (1 s here)
            assert time.monotonic() - started < 30, "the pool never got a connection"
            time.sleep(0.1)
        db.ping()  # a new connection of the probe's own: 1 s to open, then SELECT 1 at once
        db.ping()  # its connection kept
        assert call()
    finally:
        db.close()
        proxy.close()
