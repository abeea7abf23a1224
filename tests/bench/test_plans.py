"""bench/plans.py explains every statement the hot operations send, through the real storage layer:
on a populated schema, each operation has its statements, each with a plan from PostgreSQL."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import TEST_KEYS, Harness, ServerFactory
from twofactor_server.settings import Settings

BENCH = Path(__file__).resolve().parents[2] / "bench"
OPERATIONS = {
    "Verify, accepted (authenticator code)",
    "Verify, rejected (wrong authenticator code)",
    "SendCode (email): limits, insert, publish",
    "Outbox recovery round",
    "Enrollment: StartEnrollment + ConfirmEnrollment (authenticator)",
}


def load(name: str) -> ModuleType:
    """bench/ is a folder of scripts, not a package: load a module from its file (plans.py imports
    populate.py by its bare name, so that one goes into sys.modules first)."""
    if name in sys.modules and str(BENCH) in str(getattr(sys.modules[name], "__file__", "")):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


populate = load("populate")
plans = load("plans")


@pytest.fixture
def settings(tmp_path: Path, postgres_url: str) -> Settings:
    from tests.conftest import base_settings

    return base_settings(tmp_path, database_url=postgres_url)  # EXPLAIN is PostgreSQL's


def test_every_hot_statement_is_explained_with_its_plan(
    postgres_url: str, start_server: ServerFactory
) -> None:
    server: Harness = start_server(database_url=postgres_url)  # migrates the schema
    # explain_all runs the use cases on the wall clock (plus an hour), as the bench does.
    now_ms = int(time.time() * 1000)
    population = populate.Population(
        20, prefix="plans-test-", keys=TEST_KEYS, now_ms=now_ms, email_every=5, actor="bench"
    )
    users = populate.populate(server.settings.database_url, population, keep=range(20), processes=1, chunk=10)
    user = next(u for u in users if not u.email)
    mail = next(u for u in users if u.email)

    seen = plans.explain_all(server.settings.database_url, TEST_KEYS, user, mail)

    assert set(seen) == OPERATIONS
    for operation, statements in seen.items():
        assert statements, operation
        for explained in statements:
            assert not explained.plan[0].startswith("(not explained"), (explained.sql, explained.plan)
            assert any("Execution Time" in line for line in explained.plan), (explained.sql, explained.plan)
    accepted = seen["Verify, accepted (authenticator code)"]
    assert any(e.sql.lstrip().startswith("UPDATE users") for e in accepted), [e.sql for e in accepted]
