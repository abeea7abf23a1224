"""storage/pool.py: the short checkout and return keep every promise of psycopg_pool's own path.

Each case the short path must not take (a connection mid-transaction, broken, past its lifetime,
older than a drain, a client waiting, a closed pool) is tried against a real PostgreSQL, and the
first test pins that the short path is the one taken in the everyday case: psycopg_pool counts
the requests of its own path, and an upgrade that renamed what pool.py reads fails here first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from twofactor_server.storage.pool import Pool

Pooled = Pool[psycopg.Connection[tuple[object, ...]]]


@pytest.fixture
def pool(postgres_url: str) -> Iterator[Pooled]:
    with Pool(postgres_url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False) as opened:
        opened.wait(timeout=10)
        yield opened


def _backend(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    return conn.info.backend_pid


def _next_backend(pool: Pooled) -> int:
    """The backend of the connection the pool hands out next (given back at once)."""
    conn = pool.getconn(timeout=10)
    try:
        assert not conn.closed
        return _backend(conn)
    finally:
        pool.putconn(conn)


def test_an_idle_connection_is_handed_out_and_taken_back_by_the_short_path(pool: Pooled) -> None:
    first = pool.getconn()
    pid = _backend(first)
    pool.putconn(first)
    for _ in range(5):
        conn = pool.getconn()
        assert conn is first and _backend(conn) == pid  # the same connection, reused
        assert conn.execute("SELECT 1").fetchone() == (1,)
        pool.putconn(conn)
    assert pool.get_stats().get("requests_num", 0) == 0  # the library's own path never ran


def test_a_connection_returned_mid_transaction_is_rolled_back_before_reuse(pool: Pooled) -> None:
    conn = pool.getconn()
    conn.execute("BEGIN")
    conn.execute("CREATE TEMP TABLE left_behind (x int)")
    assert conn.pgconn.transaction_status == TransactionStatus.INTRANS
    pool.putconn(conn)
    again = pool.getconn()
    try:
        assert again.pgconn.transaction_status == TransactionStatus.IDLE
        assert again.execute("SELECT to_regclass('pg_temp.left_behind')").fetchone() == (None,)
    finally:
        pool.putconn(again)


def test_a_broken_connection_is_discarded_and_replaced(pool: Pooled) -> None:
    conn = pool.getconn()
    pid = _backend(conn)
    conn.close()
    pool.putconn(conn)
    pool.wait(timeout=10)  # the library opens a replacement in the background
    assert _next_backend(pool) != pid


def test_a_connection_checked_out_across_a_drain_is_closed_when_returned(pool: Pooled) -> None:
    conn = pool.getconn()
    pid = _backend(conn)
    pool.drain()
    pool.putconn(conn)
    assert conn.closed
    assert _next_backend(pool) != pid


def test_a_connection_past_its_lifetime_is_closed_when_returned(postgres_url: str) -> None:
    with Pool(postgres_url, min_size=1, max_size=1, max_lifetime=0.5, open=False) as pool:
        pool.wait(timeout=10)
        conn = pool.getconn()
        deadline = time.monotonic() + 10
        while conn._expire_at > time.monotonic():  # the pool jitters the lifetime by up to 5 %
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pool.putconn(conn)
        assert conn.closed


def test_a_returned_connection_goes_to_the_client_already_waiting(postgres_url: str) -> None:
    with Pool(postgres_url, min_size=1, max_size=1, open=False) as pool:
        pool.wait(timeout=10)
        held = pool.getconn()
        got: list[psycopg.Connection[tuple[object, ...]]] = []
        waiter = threading.Thread(target=lambda: got.append(pool.getconn(timeout=20)))
        waiter.start()
        deadline = time.monotonic() + 10
        while pool.get_stats().get("requests_waiting", 0) == 0:  # the waiter is queued
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pool.putconn(held)
        waiter.join(timeout=10)
        assert got == [held]  # handed over, not parked in the idle queue until the timeout
        pool.putconn(held)


def test_a_connection_returned_to_a_closed_pool_is_closed(postgres_url: str) -> None:
    pool: Pooled = Pool(postgres_url, min_size=1, max_size=1, open=False)
    pool.open(wait=True, timeout=10)
    conn = pool.getconn()
    pool.close(timeout=5)
    pool.putconn(conn)
    assert conn.closed


def test_a_connection_given_back_twice_or_from_elsewhere_is_refused(pool: Pooled, postgres_url: str) -> None:
    conn = pool.getconn()
    pool.putconn(conn)
    idle = len(pool._pool)
    with pytest.raises(ValueError):
        pool.putconn(conn)  # twice: else two threads would later share it
    assert len(pool._pool) == idle
    with psycopg.connect(postgres_url) as foreign, pytest.raises(ValueError):
        pool.putconn(foreign)


def test_a_pools_check_and_reset_hooks_run_on_every_checkout_and_return(postgres_url: str) -> None:
    checked: list[object] = []
    reset: list[object] = []
    hooks = {"check": checked.append, "reset": reset.append}
    with Pool(postgres_url, min_size=1, max_size=1, open=False, **hooks) as pool:
        pool.wait(timeout=10)
        for _ in range(3):
            pool.putconn(pool.getconn(timeout=10))
        deadline = time.monotonic() + 10
        while len(reset) < 3:  # the library resets on its maintenance thread
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(checked) == 3 and len(reset) == 3


def test_a_wait_for_the_pool_to_fill_sees_a_connection_given_back(postgres_url: str) -> None:
    with Pool(postgres_url, min_size=2, max_size=2, open=False) as pool:
        pool.wait(timeout=10)
        conn = pool.getconn()
        failed: list[BaseException] = []

        def wait_full() -> None:
            try:
                pool.wait(timeout=10)
            except BaseException as error:  # reported by the assertion below
                failed.append(error)

        waiter = threading.Thread(target=wait_full)
        waiter.start()
        deadline = time.monotonic() + 10
        while pool._pool_full_event is None:  # wait() is waiting for the pool to fill
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pool.putconn(conn)
        waiter.join(timeout=15)
        assert not waiter.is_alive() and failed == [] and not pool.closed
