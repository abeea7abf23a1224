"""The embedded default's SQLite file: its owner's alone, and safe to open from several processes
starting at once on a new file (`serve` and `migrate` together, say)."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

from tests.conftest import base_settings
from twofactor_server.app import create_server
from twofactor_server.storage.database import open_database


def test_the_embedded_database_and_its_directory_are_their_owners_alone(tmp_path: Path) -> None:
    """The file holds every user's contacts and the audit trail; the development keys beside it
    are 0600. With the usual umask (022) nothing of it is readable by another local user."""
    old = os.umask(0o022)
    try:
        server, _ = create_server(base_settings(tmp_path))
        server.stop(grace=None)
    finally:
        os.umask(old)
    data_dir = tmp_path / "data"
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    files = sorted(data_dir.glob("twofactor.sqlite3*"))
    assert files
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in files}
    assert all(stat.S_IMODE(path.stat().st_mode) & 0o077 == 0 for path in files), modes


def _open_and_migrate(data_dir: str, start: multiprocessing.synchronize.Barrier, failures: object) -> None:
    start.wait(timeout=60)
    try:
        db = open_database("", data_dir=Path(data_dir), timeout=10)
        db.migrate()
        db.close()
    except Exception as error:  # any failure is the finding: reported to the test
        failures.put(f"{type(error).__name__}: {error}")  # type: ignore[attr-defined]


def test_processes_opening_a_new_file_at_the_same_moment_all_migrate_it(tmp_path: Path) -> None:
    """The first open makes the file WAL, which takes its write lock: another process doing the
    same at that moment waits for it (the busy timeout is set first), never 'database is locked'."""
    context = multiprocessing.get_context("fork")
    failures = context.Queue()
    for round_ in range(10):
        data_dir = tmp_path / f"round-{round_}"
        start = context.Barrier(3)
        processes = [
            context.Process(target=_open_and_migrate, args=(str(data_dir), start, failures)) for _ in range(3)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        assert [process.exitcode for process in processes] == [0, 0, 0]
    found = []
    while not failures.empty():
        found.append(failures.get(timeout=5))
    assert found == []
