"""The SQL of key fingerprints: which key (by its fingerprint, never the key) a database first saw
under each key version (migration 0012)."""

from __future__ import annotations

from twofactor_server.storage.database import Transaction


def record_fingerprints(tx: Transaction, fingerprints: dict[int, bytes], now_ms: int) -> list[int]:
    """Record each version's fingerprint unless one is recorded already; the versions recorded now.

    In version order, so processes starting together take their row locks in one order: of two
    first starts with different keys, one inserts and the other, waiting on that row, finds it
    (ON CONFLICT DO NOTHING) and reads it with recorded_fingerprints."""
    recorded = []
    for version in sorted(fingerprints):
        inserted = tx.execute(
            "INSERT INTO key_fingerprints (version, fingerprint, recorded_at_ms) "
            "VALUES (%(v)s, %(f)s, %(at)s) ON CONFLICT (version) DO NOTHING",
            {"v": version, "f": fingerprints[version], "at": now_ms},
        )
        if inserted:
            recorded.append(version)
    return recorded


def recorded_fingerprints(tx: Transaction, versions: tuple[int, ...]) -> dict[int, bytes]:
    """The recorded fingerprint of each of `versions` that has one."""
    if not versions:
        return {}
    params = {f"v{i}": version for i, version in enumerate(versions)}
    rows = tx.all(
        "SELECT version, fingerprint FROM key_fingerprints "  # noqa: S608 - placeholders only
        f"WHERE version IN ({', '.join(f'%({name})s' for name in params)})",
        params,
    )
    return {int(row["version"]): bytes(row["fingerprint"]) for row in rows}
