"""The SQL of key rotation: which key versions stored values use, and re-encrypting them.

A stored value's key version is its first 4 bytes (big-endian), so SQL reads it
with `substr(column, 1, 4)` on both backends, and comparing those 4 bytes
compares versions. Rotation reads rows in batches keyed by primary key and
writes each one back with a compare-and-swap on the value it read: a
concurrent change (a new enrollment, a regenerated set, a reset) wins, and the
row is left as that change wrote it.
"""

from __future__ import annotations

from twofactor_server.domain.keyring import (
    BACKUP_CODE,
    TOTP_SECRET,
    version_of,
    version_prefix,
)
from twofactor_server.storage.database import Transaction
from twofactor_server.storage.records import KeyUsageRecord, MethodRecord, StoredBackupCode, select_list

# Kind of stored value -> (table, column, extra condition). Challenge codes count only while
# they can still be accepted or delivered; an expired one is never read again.
_LIVE = "consumed_at IS NULL AND superseded_at IS NULL AND expires_at > %(now)s"
KINDS: dict[str, tuple[str, str, str]] = {
    "totp_secret": ("methods", "secret", ""),
    "pending_totp_secret": ("methods", "pending_secret", ""),
    "backup_code_ciphertext": ("backup_codes", "code_ciphertext", ""),
    "backup_code_hash": ("backup_codes", "code_hash", ""),
    "challenge_code_ciphertext": ("challenges", "code_ciphertext", _LIVE),
    # A notice's hash covers no code (only its own id): it is never checked, so never counted.
    "challenge_code_hash": ("challenges", "code_hash", f"{_LIVE} AND purpose <> 'notice'"),
}
CHALLENGE_KINDS = ("challenge_code_ciphertext", "challenge_code_hash")
_METHOD_COLUMNS = ("secret", "pending_secret")


# Ciphertext kinds a key can be tried on: kind -> (table, column, whose value, its purpose). Not
# challenge codes: their table has no index on the version (and they expire within minutes).
_SEALED_KINDS = {
    "totp_secret": ("methods", "secret", "user_id", TOTP_SECRET),
    "pending_totp_secret": ("methods", "pending_secret", "user_id", TOTP_SECRET),
    "backup_code_ciphertext": ("backup_codes", "code_ciphertext", "user_id", BACKUP_CODE),
}


def sealed_samples(tx: Transaction, version: int, per_kind: int = 3) -> list[tuple[str, str, str, bytes]]:
    """A few ciphertexts stored under `version`, of each kind: (kind, purpose, owner, ciphertext),
    to try the configured key on (a search of migration 0004's index on the version, each)."""
    found = []
    for kind, (table, column, owner, purpose) in _SEALED_KINDS.items():
        rows = tx.all(
            f"SELECT {owner} AS owner, {column} AS sealed FROM {table} "  # noqa: S608 - fixed names
            f"WHERE substr({column}, 1, 4) = %(prefix)s LIMIT %(n)s",
            {"prefix": version_prefix(version), "n": per_kind},
        )
        found += [(kind, purpose, str(row["owner"]), bytes(row["sealed"])) for row in rows]
    return found


def key_usage(tx: Transaction, now_ms: int) -> list[KeyUsageRecord]:
    """Every kind's count of stored values per key version (one aggregate per kind)."""
    return [usage for kind in KINDS for usage in _usage(tx, kind, now_ms, versions_outside=None)]


def usage_outside(tx: Transaction, versions: tuple[int, ...], now_ms: int) -> list[KeyUsageRecord]:
    """Stored values under any version not in `versions`.

    Written as ranges between the known versions on `substr(column, 1, 4)`, so the
    indexes of migration 0004 answer it without reading the tables when nothing is found.
    """
    return [usage for kind in KINDS for usage in _usage(tx, kind, now_ms, versions_outside=versions)]


def _usage(
    tx: Transaction, kind: str, now_ms: int, *, versions_outside: tuple[int, ...] | None
) -> list[KeyUsageRecord]:
    table, column, condition = KINDS[kind]
    key = f"substr({column}, 1, 4)"
    params: dict[str, object] = {"now": now_ms}
    where = f"{column} IS NOT NULL" + (f" AND {condition}" if condition else "")
    expires = "expires_at" if table == "challenges" else "NULL"
    if versions_outside is None:
        source = f"SELECT {key} AS prefix, {expires} AS expires_at FROM {table} WHERE {where}"  # noqa: S608
    else:
        # One range per gap between the known versions, each a search of the index on `key`.
        known = sorted(versions_outside)
        params.update({f"v{i}": version_prefix(v) for i, v in enumerate(known)})
        ranges = [f"{key} < %(v0)s", f"{key} > %(v{len(known) - 1})s"]
        ranges += [f"{key} > %(v{i})s AND {key} < %(v{i + 1})s" for i in range(len(known) - 1)]
        source = " UNION ALL ".join(
            f"SELECT {key} AS prefix, {expires} AS expires_at FROM {table} WHERE {where} AND {r}"  # noqa: S608
            for r in ranges
        )
    rows = tx.all(
        f"SELECT prefix, COUNT(*) AS n, MAX(expires_at) AS expires_by FROM ({source}) found "  # noqa: S608
        "GROUP BY prefix",
        params,
    )
    found = [
        KeyUsageRecord(kind, version_of(bytes(row["prefix"])), int(row["n"]), row["expires_by"])
        for row in rows
    ]
    return sorted(found, key=lambda usage: usage.version)


# ---- methods: TOTP secrets and pending enrollment secrets ----------------------


def methods_to_rotate(
    tx: Transaction, active: int, *, after: tuple[str, str], limit: int
) -> list[MethodRecord]:
    """The next methods, by primary key after `after`, whose secret or pending secret is not
    under the `active` key version."""
    rows = tx.all(
        f"SELECT {select_list(MethodRecord)} FROM methods WHERE (user_id, method) > (%(u)s, %(m)s) "  # noqa: S608
        "AND (substr(secret, 1, 4) <> %(v)s OR substr(pending_secret, 1, 4) <> %(v)s) "
        "ORDER BY user_id, method LIMIT %(n)s",
        {"u": after[0], "m": after[1], "v": version_prefix(active), "n": limit},
    )
    return [MethodRecord(**row) for row in rows]


def swap_method_secrets(tx: Transaction, column: str, swaps: list[tuple[str, str, bytes, bytes]]) -> int:
    """Replace sealed secrets, each (user_id, method, old, new) only if it still is `old`, in one
    statement; return how many were replaced (the rest lost to a concurrent change)."""
    assert column in _METHOD_COLUMNS
    if not swaps:
        return 0
    params: dict[str, object] = {}
    rows = []
    for i, (user_id, method, old, new) in enumerate(swaps):
        params.update({f"u{i}": user_id, f"m{i}": method, f"o{i}": old, f"n{i}": new})
        rows.append(f"(%(u{i})s, %(m{i})s, %(o{i})s, %(n{i})s)")
    # VALUES columns are column1..column4 on both backends.
    return tx.execute(
        f"UPDATE methods SET {column} = v.column4 FROM (VALUES {', '.join(rows)}) AS v "  # noqa: S608
        f"WHERE methods.user_id = v.column1 AND methods.method = v.column2 AND methods.{column} = v.column3",
        params,
    )


# ---- backup codes -----------------------------------------------------------------


def backup_codes_to_rotate(
    tx: Transaction, active: int, *, after: tuple[str, int], limit: int
) -> list[StoredBackupCode]:
    """The next backup codes (used ones too), by primary key after `after`, whose hash or
    ciphertext is not under the `active` key version."""
    rows = tx.all(
        "SELECT user_id, position, code_hash, code_ciphertext FROM backup_codes "
        "WHERE (user_id, position) > (%(u)s, %(p)s) "
        "AND (substr(code_hash, 1, 4) <> %(v)s OR substr(code_ciphertext, 1, 4) <> %(v)s) "
        "ORDER BY user_id, position LIMIT %(n)s",
        {"u": after[0], "p": after[1], "v": version_prefix(active), "n": limit},
    )
    return [StoredBackupCode(**row) for row in rows]


def swap_backup_codes(tx: Transaction, swaps: list[tuple[StoredBackupCode, bytes, bytes]]) -> int:
    """Replace codes' hashes and ciphertexts, each (old row, new hash, new ciphertext) only if both
    are still what was read, in one statement; return how many were replaced (the rest lost to a
    regeneration or reset). Whether a code was used is not touched."""
    if not swaps:
        return 0
    params: dict[str, object] = {}
    rows = []
    for i, (old, new_hash, new_ciphertext) in enumerate(swaps):
        params.update(
            {
                f"u{i}": old.user_id,
                f"p{i}": old.position,
                f"oh{i}": old.code_hash,
                f"oc{i}": old.code_ciphertext,
                f"nh{i}": new_hash,
                f"nc{i}": new_ciphertext,
            }
        )
        rows.append(f"(%(u{i})s, %(p{i})s, %(oh{i})s, %(oc{i})s, %(nh{i})s, %(nc{i})s)")
    return tx.execute(
        "UPDATE backup_codes SET code_hash = v.column5, code_ciphertext = v.column6 "  # noqa: S608
        f"FROM (VALUES {', '.join(rows)}) AS v "
        "WHERE backup_codes.user_id = v.column1 AND backup_codes.position = v.column2 "
        "AND backup_codes.code_hash = v.column3 AND backup_codes.code_ciphertext = v.column4",
        params,
    )
