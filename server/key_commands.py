"""`twofactor keygen`, `twofactor token`, and `twofactor keys status | rotate`: what an operator runs
to add, activate and retire keys and API tokens (README, "Rotating keys and tokens")."""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import signal
import sys
import threading
import time

from twofactor_server.domain.keyring import Keyring
from twofactor_server.setting_values import new_token_entry
from twofactor_server.settings import Settings, SettingsError
from twofactor_server.storage.database import Database
from twofactor_server.storage.records import KeyUsageRecord
from twofactor_server.usecases.key_fingerprints import require_recorded_keys
from twofactor_server.usecases.key_rotation import (
    CHALLENGE_KINDS,
    KIND_NAMES,
    KeyRotation,
    RotationProgress,
    require_keys_for_stored_values,
)

_ROTATION_GUIDE = "README, 'Rotating keys and tokens'"
_SCAN_TIMEOUT_SECONDS = 600.0


def print_new_key(version: int) -> int:
    """Print a `N:base64key` entry on stdout and how to deploy it on stderr."""
    print(Keyring.new_key_spec(version))
    print(
        "Append this entry to TWOFACTOR_KEYS after a comma "
        f"(TWOFACTOR_KEYS=<current entries>,{version}:...). "
        "For a new key on a running fleet: first deploy it everywhere with TWOFACTOR_ACTIVE_KEY_VERSION set "
        "to the current version (decrypt-only), then activate it, then run `twofactor keys rotate`, then "
        f"remove the old entry ({_ROTATION_GUIDE}).",
        file=sys.stderr,
    )
    return 0


def print_new_token(name: str, scopes: str) -> int:
    """Print a new API token and the TWOFACTOR_TOKENS entry (its digest) ready to append."""
    value = secrets.token_urlsafe(32)
    try:
        entry = new_token_entry(name, scopes, hashlib.sha256(value.encode()).hexdigest())
    except SettingsError as error:  # the server would refuse the entry at start
        print(f"twofactor token: {error}", file=sys.stderr)
        return 2
    print(f"token: {value}")
    print(f"TWOFACTOR_TOKENS entry: {entry}")
    print(
        "Give the token to its caller; append the entry to TWOFACTOR_TOKENS after a comma "
        f"(TWOFACTOR_TOKENS=<current entries>,{entry}) and restart the servers. To rotate a token, "
        "add the new entry, move the caller to the new token, then remove the old entry "
        f"({_ROTATION_GUIDE}).",
        file=sys.stderr,
    )
    return 0


def _rotation(settings: Settings, batch_size: int = 500) -> tuple[KeyRotation, Database, Keyring]:
    from twofactor_server.app import load_keyring, require_usable_data_dir
    from twofactor_server.storage.database import open_database, sqlite_path
    from twofactor_server.storage.migrator import migrations
    from twofactor_server.storage.refusals import database_location, pending_migrations_at_start

    if settings.embedded and not sqlite_path(settings.data_dir).is_file():
        # A mistyped TWOFACTOR_DATA_DIR must not get a new empty database (and a development key)
        # whose status says every key "can be removed". What is wrong with one that exists (a
        # file, a damaged development secrets file) is said first, as for every command.
        if settings.data_dir.exists():
            require_usable_data_dir(settings)
            if not settings.keys and (settings.data_dir / "dev-secrets.json").exists():
                load_keyring(settings)
        raise SettingsError(
            f"TWOFACTOR_DATA_DIR: {settings.data_dir} holds no twofactor database: "
            "set it to the server's data directory"
        )
    require_usable_data_dir(settings)
    keyring = load_keyring(settings)
    # First within the storage timeout, as a server's start: a mistyped URL is refused (exit 2)
    # and a database that does not answer said so (exit 1), rather than waited for as long as
    # a scan may take.
    first = open_database(
        settings.database_url,
        data_dir=settings.data_dir,
        pool_size=1,
        timeout=settings.storage_timeout_seconds,
    )
    try:
        pending = pending_migrations_at_start(first, settings.database_url, settings.storage_timeout_seconds)
    finally:
        first.close()
    # Counting reads whole tables: longer than a call's storage timeout, bounded all the same.
    timeout = max(settings.storage_timeout_seconds, _SCAN_TIMEOUT_SECONDS)
    db = open_database(settings.database_url, data_dir=settings.data_dir, pool_size=2, timeout=timeout)
    try:
        if pending == [version for version, _ in migrations(db.dialect)]:
            raise SettingsError(
                f"TWOFACTOR_DATA_DIR: {sqlite_path(settings.data_dir)} has no twofactor tables: "
                "set it to the server's data directory"
                if settings.embedded
                else f"TWOFACTOR_DATABASE_URL: {database_location(settings.database_url)} has no "
                "twofactor tables: set it to the servers' database"
            )
        db.migrate()  # the indexes that key status and the start-up check read
    except BaseException:
        db.close()
        raise
    return KeyRotation(db, keyring, batch_size=batch_size), db, keyring


def key_status(settings: Settings, *, as_json: bool) -> int:
    """Per key version, how many stored values of each kind use it, and what to do next."""
    rotation, db, keyring = _rotation(settings)
    try:
        # Counts read with another key under a recorded version would be advice for the wrong
        # key; compared only: a status records no key (the one it was given may be a typo).
        require_recorded_keys(db, keyring, record=False)
        usage = rotation.status()
    finally:
        db.close()
    if as_json:
        print(json.dumps({"active_version": keyring.active_version, "versions": _by_version(usage, keyring)}))
        return 0
    print(
        f"active key version: {keyring.active_version} "
        f"(TWOFACTOR_KEYS has {', '.join(map(str, keyring.versions))})"
    )
    for version, kinds in _by_version(usage, keyring).items():
        configured = (
            "in TWOFACTOR_KEYS" if int(version) in keyring.versions else "MISSING from TWOFACTOR_KEYS"
        )
        active = ", active" if int(version) == keyring.active_version else ""
        print(f"key version {version} ({configured}{active}):")
        for kind, name in KIND_NAMES.items():
            count, expires_by = kinds[kind]["count"], kinds[kind]["expires_by_ms"]
            until = f"  (left to expire, the last by {_utc(expires_by)})" if expires_by and count else ""
            print(f"  {name:<32}{count:>10}{until}")
        print(f"  -> {_advice(int(version), kinds, keyring)}")
    return 0


def _by_version(usage: list[KeyUsageRecord], keyring: Keyring) -> dict[str, dict[str, dict[str, int | None]]]:
    versions = sorted({*keyring.versions, *(u.version for u in usage)})
    table: dict[str, dict[str, dict[str, int | None]]] = {
        str(v): {kind: {"count": 0, "expires_by_ms": None} for kind in KIND_NAMES} for v in versions
    }
    for u in usage:
        table[str(u.version)][u.kind] = {"count": u.count, "expires_by_ms": u.expires_by_ms}
    return table


def _advice(version: int, kinds: dict[str, dict[str, int | None]], keyring: Keyring) -> str:
    stored = sum(int(k["count"] or 0) for kind, k in kinds.items() if kind not in CHALLENGE_KINDS)
    waiting = [k for kind, k in kinds.items() if kind in CHALLENGE_KINDS and k["count"]]
    if version == keyring.active_version:
        return "the active key: new values are written under it"
    if version not in keyring.versions and (stored or waiting):
        # Rotation can't read what no configured key opens.
        return "TWOFACTOR_KEYS lacks it, and stored values need it: add that key back"
    if stored:
        return (
            f"{stored} values still use it: run `twofactor keys rotate` (key {keyring.active_version} active)"
        )
    if waiting:
        last = max(int(k["expires_by_ms"] or 0) for k in waiting)
        return f"only waiting challenge codes use it: remove it after {_utc(last)}"
    return "unused: it can be removed from TWOFACTOR_KEYS"


def _utc(ms: int | None) -> str:
    return datetime.datetime.fromtimestamp((ms or 0) / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def rotate_keys(settings: Settings, *, batch_size: int) -> int:
    """Re-encrypt every secret and backup code under the active key; SIGTERM or Ctrl-C stops after
    the current batch, and running again resumes."""
    rotation, db, keyring = _rotation(settings, batch_size)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _s, _f: stopping.set())
    active = keyring.active_version
    try:
        # A mistyped key would seal everything anew under it, or find every value unreadable.
        require_keys_for_stored_values(db, keyring)
        total = sum(
            u.count
            for u in rotation.status()
            if u.version != active and u.kind in ("totp_secret", "pending_totp_secret", "backup_code_hash")
        )
        print(f"re-encrypting about {total} values under key version {active}", flush=True)
        ticker = _Progress(total)
        report = rotation.rotate(on_batch=ticker.show, should_stop=stopping.is_set)
    finally:
        db.close()
    ticker.done()
    done = report.progress
    print(
        f"re-encrypted {done.rotated} values under key version {active}; "
        f"{done.superseded} were rewritten by a concurrent change first (left as written)"
    )
    for problem in done.problems:
        print(f"could not re-encrypt {problem}", file=sys.stderr)
    if report.interrupted:
        print("interrupted: run `twofactor keys rotate` again to finish; nothing is lost", file=sys.stderr)
        return 1
    for u in report.remaining:
        print(f"still under key version {u.version}: {u.count} {KIND_NAMES[u.kind]}", file=sys.stderr)
    for u in report.waiting_challenges:
        print(
            f"left to expire under key version {u.version}: {u.count} {KIND_NAMES[u.kind]}, "
            f"the last by {_utc(u.expires_by_ms)}"
        )
    if report.remaining or done.unreadable:
        print(
            "not everything is under the active key: check that every server writes with key "
            f"{active} (TWOFACTOR_ACTIVE_KEY_VERSION) and run `twofactor keys rotate` again",
            file=sys.stderr,
        )
        return 1
    print("no TOTP secret or backup code uses another key version now (`twofactor keys status`)")
    return 0


class _Progress:
    """A progress line rewritten in place on a terminal; elsewhere a line every 10 seconds."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._tty = sys.stderr.isatty()
        self._last = time.monotonic()

    def show(self, progress: RotationProgress) -> None:
        line = f"re-encrypted {progress.rotated} of about {self._total}"
        if self._tty:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        elif time.monotonic() - self._last >= 10:
            self._last = time.monotonic()
            print(line, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self._tty:
            print(file=sys.stderr, flush=True)
