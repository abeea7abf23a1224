"""constraints.txt pins every dependency at the version the suite passed with, and the Makefile
and the image install with it: CI tests what the image ships, and a rebuild a month later ships
the same."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, separator, version = line.partition("==")
            assert separator and version.strip(), f"not pinned with ==: {line!r}"
            found[canonical(name)] = version.strip()
    return found


def declared() -> set[str]:
    """Every distribution pyproject.toml names: runtime, extras, and the SDK's own."""
    names = set()
    for path in (ROOT / "pyproject.toml", ROOT / "clients/python/pyproject.toml"):
        project = tomllib.loads(path.read_text())["project"]
        requirements = [*project.get("dependencies", [])]
        for extra in project.get("optional-dependencies", {}).values():
            requirements += extra
        names |= {canonical(match[1]) for r in requirements if (match := _NAME.match(r))}
    return names - {"twofactor-client"}  # ours, from clients/python


def test_every_declared_dependency_is_pinned() -> None:
    assert sorted(declared() - pins().keys()) == []


def test_the_tested_environment_is_the_pinned_one() -> None:
    """What this suite runs with is what constraints.txt (and so the image) says; `make` reinstalls
    after constraints.txt changes."""
    differ = []
    for name, version in sorted(pins().items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # pinned for another extra, or another platform's dependency: not installed here
        if installed != version:
            differ.append(f"{name}: {installed} installed, {version} pinned")
    assert differ == []
    missing = [name for name in sorted(declared()) if not _installed(name)]
    assert missing == [], "declared but not installed (run `make test` to set up the environment)"


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def test_the_makefile_and_the_image_install_with_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "$(BIN)/pip install" in line and "-e" in line]
    assert installs and all("$(CONSTRAINTS)" in line for line in installs), installs
    assert "CONSTRAINTS = -c constraints.txt" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "constraints.txt" in next(
        line for line in dockerfile.splitlines() if line.startswith("COPY pyproject")
    )
    assert [line for line in dockerfile.splitlines() if "pip install" in line] == [
        "RUN /opt/twofactor/bin/pip install --no-cache-dir -c constraints.txt ./clients/python ."
    ]
