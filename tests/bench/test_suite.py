"""bench/suite.py's table and verdicts (`make bench`): a run with the default options can show the
issue's targets met, and each verdict divides by what the run really had."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from tests.bench.test_plans import load


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
