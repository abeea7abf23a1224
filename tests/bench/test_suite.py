"""bench/suite.py's table and verdicts (`make bench`): a run with the default options can show the
issue's targets met, and each verdict divides by what the run really had."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.bench.test_plans import load
from tests.server.helpers import EMAIL, wait_until
from tests.server.serve_process import APP_METADATA, ServeProcess, serve_env
from tests.smtp_sink import SmtpSink, code_in


def suite_module() -> ModuleType:
    for name in ("loadgen", "populate", "plans", "verify_path", "sendcode_path", "sink"):
        load(name)  # suite.py imports its neighbours by their bare names
    return load("suite")


suite = suite_module()


@pytest.mark.parametrize("options", [[], ["--quick"], ["--quick", "--seconds", "3"]])
def test_the_default_users_suffice_for_verify_at_the_throughput_target(options: list[str]) -> None:
    """Each Verify phase sends every user at most once (a TOTP step is accepted once), so it counts
    at most users / seconds calls/s: with too few users a server at the target is STARVED (an
    invalid run) and the table shows the users' ceiling, not the server's rate."""
    args = suite.parse(options)
    target = 100 * args.privacyidea_rate  # the issue: Verify throughput >= 100x privacyIDEA
    assert args.users / args.seconds >= target
    population = suite.parse([*options, "--population", "100000"])
    assert population.sample / population.seconds >= target


def enrollment_row(rate: float) -> object:
    from array import array

    result = suite.PhaseResult("enroll", 1.0, array("d", [1.0] * int(rate)))
    return suite.Row("enrollment (Start + Confirm)", result, {}, result.calls)


def verdict(output: str, label: str) -> float:
    line = next(line for line in output.splitlines() if line.strip().startswith(label))
    return float(line[len(line) - len(line.lstrip()) + len(label) :].split()[0])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to allow one")
def test_enrollments_per_process_with_processes_auto_divide_by_the_servers_processes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`serve --processes auto` starts one process per CPU this process may run on (taskset, a
    container's cpuset), not per CPU of the machine: the per-process rate divides by as many."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # as under `taskset -c 0 make bench`
    try:
        suite.print_table({"enrollment": enrollment_row(600)}, suite.parse(["--processes", "auto"]))
    finally:
        os.sched_setaffinity(0, allowed)
    assert verdict(capsys.readouterr().out, "enrollments/s per server process") == 600.0


def test_paced_sendcode_latency_counts_from_when_each_call_was_due(sink: SmtpSink, tmp_path: Path) -> None:
    """The paced rows are open loop: a call the bench could not start on its schedule (its 32
    sending threads all waiting on the server) waits too, as a login would. Here the server is
    stopped (SIGSTOP) past the end of the schedule: 100 calls due within 1.5 s of the start, none
    answered before 2.5 s, so every one of them waited at least a second."""
    env = serve_env(
        tmp_path / "data",
        "",
        sink,
        RESEND_COOLDOWN_SECONDS="0",
        SENDS_PER_USER_PER_HOUR="1000",
        SENDS_PER_DESTINATION_PER_HOUR="1000",
        STORAGE_TIMEOUT_SECONDS="60",
    )
    server = ServeProcess(env)
    try:
        server.twofactor.SetContact(
            pb.SetContactRequest(user_id="alice", email="alice@example.com"), metadata=APP_METADATA
        )
        server.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="alice", method=EMAIL), metadata=APP_METADATA
        )
        code = code_in(sink.message_to("alice@example.com", "Confirm"))
        confirmed = server.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="alice", method=EMAIL, code=code), metadata=APP_METADATA
        )
        assert confirmed.confirmed
        token = APP_METADATA[0][1].removeprefix("Bearer ")
        server.process.send_signal(signal.SIGSTOP)
        resume = threading.Timer(2.5, server.process.send_signal, (signal.SIGCONT,))
        resume.start()
        try:
            row = suite.measure_paced_sendcode(
                f"127.0.0.1:{server.port}", token, ["alice"], 100.0, 1.0, "server stopped"
            )
        finally:
            resume.join()
            server.process.send_signal(signal.SIGCONT)
    finally:
        server.stop()
    assert row.valid and row.result.calls == 100
    assert min(row.result.latencies_ms) >= 1000.0


def test_another_sessions_parallel_workers_are_not_counted_as_the_runs_postgres(postgres_url: str) -> None:
    """On a shared PostgreSQL the run counts its own backends and the server's background
    processes (WAL writer, checkpointer, autovacuum): not the parallel workers that another
    session's query started, which are that session's backends."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")
    other = psycopg.connect(postgres_url, autocommit=True, application_name="someone-else")
    for setting in ("parallel_setup_cost", "parallel_tuple_cost", "min_parallel_table_scan_size"):
        other.execute(f"SET {setting} = 0")  # a parallel plan for a small table
    leader = other.info.backend_pid

    def scan() -> None:
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            other.execute("SELECT count(*) FROM t WHERE pg_sleep(0.001) IS NOT NULL")  # ~7 s

    scanning = threading.Thread(target=scan)
    scanning.start()
    try:
        with psycopg.connect(postgres_url, autocommit=True) as watch:

            def workers() -> set[int]:
                rows = watch.execute(
                    "SELECT pid FROM pg_stat_activity WHERE leader_pid = %s AND pid <> %s", (leader, leader)
                ).fetchall()
                return {int(pid) for (pid,) in rows}

            try:
                wait_until(lambda: workers() or not scanning.is_alive(), "the scan's parallel workers")
                started = workers()
                if not started:
                    pytest.skip("PostgreSQL started no parallel worker (max_parallel_workers in use)")
                with suite.PostgresPids(postgres_url, "tf_bench_not_this_one") as counted:
                    assert not started & counted()
            finally:
                watch.execute("SELECT pg_cancel_backend(%s)", (leader,))
    finally:
        scanning.join(timeout=30)
        other.close()
