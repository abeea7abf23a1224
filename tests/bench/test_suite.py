"""bench/suite.py's table and verdicts (`make bench`): a run with the default options can show the
issue's targets met, and each verdict divides by what the run really had."""

from __future__ import annotations

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
