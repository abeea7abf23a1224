"""The sealed (encrypted) authenticator secrets this process read last, so that an accepted
Verify needs one statement instead of a read and a write.

A cached secret is only a guess of what the database holds: it is kept with the version of the
user's methods it was read at (verify_state.secret_version, which the database moves on with
every change of them: a new enrollment, a reset, a disabled method, a key rotation), and the
statement that accepts a code checks that version; a stale entry touches no row and the caller
falls back to reading the user afresh. It holds ciphertexts only, never a secret in clear.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

DEFAULT_MAX_ENTRIES = 100_000  # about 20 MB at ~200 bytes an entry (user id, 52-byte ciphertext, dict)


class CachedSecret(NamedTuple):
    sealed: bytes
    version: int  # the user's verify_state.secret_version when `sealed` was read
    epoch: int  # the user's credential_epoch, read with it


class SealedSecrets:
    """A bounded map of user id to sealed secret; the entry written longest ago goes first when full.

    Reads take no lock (a dict lookup is atomic under the GIL); writes, rare, take one.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._max = max_entries
        self._entries: dict[str, CachedSecret] = {}
        self._lock = threading.Lock()

    def get(self, user_id: str) -> CachedSecret | None:
        return self._entries.get(user_id)

    def put(self, user_id: str, entry: CachedSecret | None) -> None:
        """Remember the user's sealed secret (None: the user has none; forget the entry)."""
        with self._lock:
            if entry is None:
                self._entries.pop(user_id, None)
                return
            if self._entries.pop(user_id, None) is None and len(self._entries) >= self._max:
                del self._entries[next(iter(self._entries))]
            self._entries[user_id] = entry  # the newest entry, last to go

    def __len__(self) -> int:
        return len(self._entries)
