"""The SQL of key rotation: which key versions stored values use, and re-encrypting them.

A stored value's key version is its first 4 bytes (big-endian), so SQL reads it
with `substr(column, 1, 4)` on both backends, and comparing those 4 bytes
compares versions. Rotation reads rows in batches keyed by primary key and
writes each one back with a compare-and-swap on the value it read: a
concurrent change (a new enrollment, a regenerated set, a reset) wins, and the
row is left as that change wrote it.
"""

from __future__ import annotations

from twofactor_server.domain.keyring import version_of, version_prefix
from twofactor_server.storage.database import Transaction
from twofactor_server.storage.records import KeyUsageRecord, MethodRecord, StoredBackupCode

# Kind of stored value -> (table, column, extra condition). Challenge codes count only while
# they can still be accepted or delivered; an expired one is never read again.
_LIVE = "consumed_at IS NULL AND superseded_at IS NULL AND expires_at > %(now)s"
KINDS: dict[str, tuple[str, str, str]] = {
    "totp_secret": ("methods", "secret", ""),
    "pending_totp_secret": ("methods", "pending_secret", ""),
    "backup_code_ciphertext": ("backup_codes", "code_ciphertext", ""),
    "backup_code_hash": ("backup_codes", "code_hash", ""),
    "challenge_code_ciphertext": ("challenges", "code_ciphertext", _LIVE),
    "challenge_code_hash": ("challenges", "code_hash", _LIVE),
}
CHALLENGE_KINDS = ("challenge_code_ciphertext", "challenge_code_hash")
_METHOD_COLUMNS = ("secret", "pending_secret")


def key_usage(tx: Transaction, now_ms: int) -> list[KeyUsageRecord]:
    """Every kind's count of stored values per key version (one aggregate per kind)."""
    return [usage for kind in KINDS for usage in _usage(tx, kind, now_ms, versions_outside=None)]


def usage_outside(tx: Transaction, versions: tuple[int, ...], now_ms: int) -> list[KeyUsageRecord]:
    """Stored values under any version not in `versions`.

    Written as ranges between the known versions on `substr(column, 1, 4)`, so the
    indexes of migration 0002 answer it without reading the tables when nothing is found.
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
        "SELECT * FROM methods WHERE (user_id, method) > (%(u)s, %(m)s) "
        "AND (substr(secret, 1, 4) <> %(v)s OR substr(pending_secret, 1, 4) <> %(v)s) "
        "ORDER BY user_id, method LIMIT %(n)s",
        {"u": after[0], "m": after[1], "v": version_prefix(active), "n": limit},
    )
    return [MethodRecord(**row) for row in rows]


def swap_method_secret(
    tx: Transaction, user_id: str, method: str, column: str, old: bytes, new: bytes
) -> bool:
    """Replace one sealed secret if it still is `old`; False when a concurrent change won."""
    assert column in _METHOD_COLUMNS
    return (
        tx.execute(
            f"UPDATE methods SET {column} = %(new)s "  # noqa: S608
            f"WHERE user_id = %(u)s AND method = %(m)s AND {column} = %(old)s",
            {"u": user_id, "m": method, "old": old, "new": new},
        )
        == 1
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


def swap_backup_code(tx: Transaction, old: StoredBackupCode, new_hash: bytes, new_ciphertext: bytes) -> bool:
    """Replace one code's hash and ciphertext if both are still what was read; False when a
    regeneration or reset won. Whether the code was used is not touched."""
    return (
        tx.execute(
            "UPDATE backup_codes SET code_hash = %(nh)s, code_ciphertext = %(nc)s "
            "WHERE user_id = %(u)s AND position = %(p)s AND code_hash = %(oh)s "
            "AND code_ciphertext = %(oc)s",
            {
                "u": old.user_id,
                "p": old.position,
                "oh": old.code_hash,
                "oc": old.code_ciphertext,
                "nh": new_hash,
                "nc": new_ciphertext,
            },
        )
        == 1
    )
