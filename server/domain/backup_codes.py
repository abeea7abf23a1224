"""Backup codes: single-use recovery codes shown to the user as `k7m2q-x9p4w`.

Crockford's base32 alphabet leaves out I, L, O and U, so codes read back
unambiguously; ten symbols carry 50 bits.
"""

from __future__ import annotations

import secrets

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
LENGTH = 10
GROUP = 5
# What users type for the letters Crockford's alphabet leaves out.
_LOOKALIKES = str.maketrans({"o": "0", "i": "1", "l": "1"})
_IGNORED = str.maketrans("", "", " -\t")


def new_code() -> str:
    """A new code in canonical form (lower case, no separator).

    One draw of 50 random bits, 5 per symbol: the alphabet has 32 symbols, so each is uniform,
    as with a secrets.choice per symbol, at a tenth of the cost."""
    bits = secrets.randbits(5 * LENGTH)
    return "".join(ALPHABET[(bits >> (5 * i)) & 31] for i in range(LENGTH))


def new_codes(count: int) -> list[str]:
    codes: set[str] = set()
    while len(codes) < count:
        codes.add(new_code())
    return sorted(codes)


def display(code: str) -> str:
    return f"{code[:GROUP]}-{code[GROUP:]}"


def normalize(typed: str) -> str | None:
    """The canonical form of a typed code, ignoring case, spaces and dashes; None if it can't be one."""
    code = typed.lower().translate(_IGNORED).translate(_LOOKALIKES)
    if len(code) != LENGTH or any(c not in ALPHABET for c in code):
        return None
    return code
