"""The house: imports run one way, modules stay small, the package list is complete."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"twofactor_server": ROOT / "server", "twofactor_workers": ROOT / "workers"}
DRIVERS = {"psycopg", "psycopg_pool", "sqlite3"}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_server_never_imports_the_worker_package() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imported_modules(path) if m.split(".")[0] == "twofactor_workers"
        )
        for path in FOLDERS["twofactor_server"].rglob("*.py")
    }
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_the_api_knows_no_database_driver_and_no_storage() -> None:
    for path in (FOLDERS["twofactor_server"] / "api").rglob("*.py"):
        modules = imported_modules(path)
        assert not {m.split(".")[0] for m in modules} & DRIVERS, path
        assert not [m for m in modules if m.startswith("twofactor_server.storage")], path


def test_no_module_exceeds_400_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for folder in FOLDERS.values()
        for path in folder.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert long == {}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join([name, *init.parent.relative_to(folder).parts])
        for name, folder in FOLDERS.items()
        for init in folder.rglob("__init__.py")
    }
    assert listed == on_disk


def test_the_core_runs_the_embedded_default_without_celery(tmp_path: Path) -> None:
    """Settings, domain, storage and delivery import, and the embedded server starts, with Celery absent."""
    script = (
        "import sys\n"
        "sys.modules['celery'] = None  # any import of Celery now fails\n"
        "from twofactor_server.app import create_server\n"
        "from pathlib import Path\nfrom twofactor_server.settings import Settings\n"
        f"server, port = create_server(Settings(listen='127.0.0.1:0', data_dir=Path({str(tmp_path)!r})))\n"
        "server.start(); server.stop(grace=None)\n"
        "assert port > 0\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
