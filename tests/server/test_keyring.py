"""AES-256-GCM at rest and keyed hashes, with versioned keys."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import hmac
import threading

import pytest

from twofactor_server.domain.keyring import (
    MAX_VERSION,
    Keyring,
    KeyringError,
    KeyVersionMissing,
    key_fingerprint,
    version_of,
)


def test_round_trip_bound_to_user_and_purpose() -> None:
    keyring = Keyring.parse(Keyring.new_key_spec(1))
    sealed = keyring.encrypt(b"secret", purpose="totp_secret", user_id="alice")
    assert b"secret" not in sealed
    assert keyring.decrypt(sealed, purpose="totp_secret", user_id="alice") == b"secret"
    with pytest.raises(KeyringError):
        keyring.decrypt(sealed, purpose="totp_secret", user_id="mallory")  # a row swapped to another user
    with pytest.raises(KeyringError):
        keyring.decrypt(sealed, purpose="backup_code", user_id="alice")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(KeyringError):
        keyring.decrypt(tampered, purpose="totp_secret", user_id="alice")


def test_rotation_newest_encrypts_all_decrypt() -> None:
    old = Keyring.new_key_spec(1)
    new = Keyring.new_key_spec(2)
    before = Keyring.parse(old)
    sealed_old = before.encrypt(b"a", purpose="p", user_id="u")
    hash_old = before.keyed_hash(b"code", purpose="p")
    after = Keyring.parse(f"{old},{new}")
    assert after.active_version == 2
    assert after.decrypt(sealed_old, purpose="p", user_id="u") == b"a"
    assert after.matches(hash_old, b"code", purpose="p")
    assert after.encrypt(b"a", purpose="p", user_id="u")[:4] == (2).to_bytes(4, "big")
    with pytest.raises(KeyVersionMissing, match="key version 2, which TWOFACTOR_KEYS lacks") as missing:
        Keyring.parse(old).decrypt(after.encrypt(b"a", purpose="p", user_id="u"), purpose="p", user_id="u")
    assert missing.value.reason == "KEY_VERSION_MISSING"
    # A hash under a missing version is an error too, never a mismatch counted as a wrong code.
    with pytest.raises(KeyVersionMissing, match="key version 2"):
        Keyring.parse(old).matches(after.keyed_hash(b"code", purpose="p"), b"code", purpose="p")


def test_an_explicit_active_version_encrypts_while_newer_keys_only_decrypt() -> None:
    old, new = Keyring.new_key_spec(1), Keyring.new_key_spec(2)
    staged = Keyring.parse(f"{old},{new}", active_version=1)
    activated = Keyring.parse(f"{old},{new}")
    assert staged.active_version == 1 and staged.versions == (1, 2)
    assert version_of(staged.encrypt(b"a", purpose="p", user_id="u")) == 1
    assert version_of(staged.keyed_hash(b"a", purpose="p")) == 1
    # Each process reads what the other writes: the staged rollout has no unreadable moment.
    assert staged.decrypt(activated.encrypt(b"a", purpose="p", user_id="u"), purpose="p", user_id="u") == b"a"
    assert staged.matches(activated.keyed_hash(b"c", purpose="p"), b"c", purpose="p")
    assert activated.decrypt(staged.encrypt(b"b", purpose="p", user_id="u"), purpose="p", user_id="u") == b"b"
    with pytest.raises(KeyringError, match="active key version 3 is not in the keyring"):
        Keyring.parse(f"{old},{new}", active_version=3)


def test_keyed_hash_depends_on_key_purpose_and_data() -> None:
    keyring = Keyring.parse(Keyring.new_key_spec(1))
    stored = keyring.keyed_hash(b"123456", purpose="challenge_code")
    assert keyring.matches(stored, b"123456", purpose="challenge_code")
    assert not keyring.matches(stored, b"123457", purpose="challenge_code")
    assert not keyring.matches(stored, b"123456", purpose="backup_code")
    assert not Keyring.parse(Keyring.new_key_spec(1)).matches(stored, b"123456", purpose="challenge_code")


def test_a_keyed_hash_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stored code's hash is compared to the typed code's with hmac.compare_digest, never ==,
    # whose time would tell how many leading bytes of a guess's MAC are right.
    keyring = Keyring.parse(Keyring.new_key_spec(1))
    stored = keyring.keyed_hash(b"123456", purpose="challenge_code")
    compared: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((bytes(a), bytes(b)))
        return constant_time(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    assert keyring.matches(stored, b"123456", purpose="challenge_code")
    assert not keyring.matches(stored, b"123457", purpose="challenge_code")
    assert [a for a, _ in compared] == [stored[4:], stored[4:]]


@pytest.mark.parametrize(
    ("data", "purpose", "expected"),
    [
        (b"k7m2q-x9p4w", "backup_code", "424bda65b9e14325c26e48bca1b6fa0e31fe7930c5ff1d0d9c78ee2799cc5b58"),
        (b"", "step_up", "8eff482663072f187277876f94d17383bac59e0f7bcd27294dc234f6a84fbf93"),
        (b"x" * 200, "challenge_code", "4644e194a00199c4a218cbeecbfacee76146a97c2e11e00a592ffd1d2832c3f1"),
    ],
)
def test_keyed_hashes_are_the_bytes_earlier_releases_stored(data: bytes, purpose: str, expected: str) -> None:
    # Backup-code and sent-code hashes are stored: any change to how a keyed hash is made
    # (the pepper's derivation, the purpose prefix, the MAC) would stop them matching.
    keyring = Keyring.parse("7:" + base64.b64encode(bytes(range(32))).decode())
    assert keyring.keyed_hash(data, purpose=purpose) == bytes.fromhex("00000007" + expected)
    assert keyring.matches(bytes.fromhex("00000007" + expected), data, purpose=purpose)


@pytest.mark.parametrize(
    ("sealed", "purpose", "user_id", "plaintext"),
    [
        (
            "00000007e04624d2694bc1618290c22f91a5c5ad69fd96660c03b341767911780cad0c23d2190929c257c9f70fac2c3c22944c1a",
            "totp_secret",
            "alice@example.com",
            b"12345678901234567890",
        ),
        (
            "000000078e0414319f58d50990cd8c4ec5a20f070f83cc105b8ae07a99bfcab3",
            "challenge_code",
            "\u00e9l\u00e8ve",
            b"",
        ),
    ],
)
def test_secrets_sealed_by_earlier_releases_open(
    sealed: str, purpose: str, user_id: str, plaintext: bytes
) -> None:
    # Sealed by the release of e4dbf6d: the associated data (purpose, key version, user) must be
    # built byte for byte as it was, or every stored secret stops opening.
    keyring = Keyring.parse("7:" + base64.b64encode(bytes(range(32))).decode())
    assert keyring.decrypt(bytes.fromhex(sealed), purpose=purpose, user_id=user_id) == plaintext
    with pytest.raises(KeyringError):
        keyring.decrypt(bytes.fromhex(sealed), purpose=purpose, user_id=user_id + "x")


def test_keyed_hashes_are_right_from_many_threads_at_once() -> None:
    # Each (key version, purpose) keeps one keyed HMAC state that every hash starts from a copy
    # of: threads that share them, mixing purposes and key versions, must each get the bytes
    # that one thread alone gets (and, under version 7, the bytes earlier releases stored).
    seven = "7:" + base64.b64encode(bytes(range(32))).decode()
    eight = "8:" + base64.b64encode(bytes(range(32, 64))).decode()
    keyring = Keyring.parse(f"{seven},{eight}", active_version=7)
    cases = [
        (b"k7m2q-x9p4w", "backup_code", "424bda65b9e14325c26e48bca1b6fa0e31fe7930c5ff1d0d9c78ee2799cc5b58"),
        (b"", "step_up", "8eff482663072f187277876f94d17383bac59e0f7bcd27294dc234f6a84fbf93"),
        (b"x" * 200, "challenge_code", "4644e194a00199c4a218cbeecbfacee76146a97c2e11e00a592ffd1d2832c3f1"),
    ]
    under_seven = [(data, purpose, bytes.fromhex("00000007" + hexed)) for data, purpose, hexed in cases]
    alone = Keyring.parse(f"{seven},{eight}", active_version=8)
    under_eight = [(data, purpose, alone.keyed_hash(data, purpose=purpose)) for data, purpose, _ in cases]
    stored = under_seven + under_eight
    start = threading.Barrier(8)

    def hash_many(offset: int) -> list[bool]:
        start.wait(timeout=30)
        results = []
        for index in range(300):
            data, purpose, expected = stored[(index + offset) % len(stored)]
            if expected.startswith(b"\0\0\0\x07"):  # the active version: made afresh here
                results.append(keyring.keyed_hash(data, purpose=purpose) == expected)
            results.append(keyring.matches(expected, data, purpose=purpose))
            results.append(not keyring.matches(expected, data + b"!", purpose=purpose))
        return results

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = [ok for results in pool.map(hash_many, range(8)) for ok in results]
    assert len(outcomes) == 8 * (300 * 2 + 150)
    assert all(outcomes)


KEY_1 = Keyring.new_key_spec(1)
KEY_2 = Keyring.new_key_spec(2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "entry 1 of 1 is empty"),
        ("1", "entry 1 of 1 is not version:base64key"),
        ("x:AAAA", "entry 1 of 1 is not version:base64key"),
        ("\u00b2:" + KEY_1.partition(":")[2], "entry 1 of 1 is not version:base64key"),  # a digit, not ASCII
        (f"{KEY_1},", "entry 2 of 2 is empty"),
        ("1:not-base64!", r"entry 1 of 1 \(version 1\): the key is not valid base64"),
        ("1:AAAA", r"entry 1 of 1 \(version 1\): the key is 3 bytes, it must be 32"),
        ("1:", r"entry 1 of 1 \(version 1\) has an empty key"),
        ("0:" + KEY_1.partition(":")[2], "the version must be between 1 and"),
        (f"{MAX_VERSION + 1}:" + KEY_1.partition(":")[2], "the version must be between 1 and 4294967295"),
        ("1:" + KEY_1.partition(":")[2] + "!", r"entry 1 of 1 \(version 1\): the key is not valid base64"),
        (
            f"{KEY_1},{KEY_2},1:{KEY_2.partition(':')[2]}",
            r"entry 3 of 3 \(version 1\): version 1 appears twice",
        ),
    ],
)
def test_refuses_malformed_short_or_duplicate_keys_naming_the_entry(spec: str, message: str) -> None:
    with pytest.raises(KeyringError, match=message) as refused:
        Keyring.parse(spec)
    for key in (KEY_1, KEY_2):  # the message names the entry, never a key
        assert key.partition(":")[2] not in str(refused.value)


def test_the_highest_version_a_value_can_carry_is_a_usable_key() -> None:
    # Four bytes carry the version in every ciphertext and hash: 2**32 - 1 is the last that fits.
    keyring = Keyring.parse(f"{MAX_VERSION}:" + KEY_1.partition(":")[2])
    sealed = keyring.encrypt(b"secret", purpose="totp_secret", user_id="alice")
    assert version_of(sealed) == MAX_VERSION == 2**32 - 1
    assert keyring.decrypt(sealed, purpose="totp_secret", user_id="alice") == b"secret"


def test_a_key_fingerprint_tells_keys_apart_and_is_no_key_material(monkeypatch: pytest.MonkeyPatch) -> None:
    """The value a database records for a key version: the same for the same key (every process
    of a fleet), another for another key under that version, and neither the key nor a plain
    hash of it, nor the pepper or sealing key derived from it."""
    key = base64.b64decode(KEY_1.partition(":")[2])
    mine, again = Keyring.parse(KEY_1), Keyring.parse(f"{KEY_1},{KEY_2}")
    other = Keyring.parse(Keyring.new_key_spec(1))
    assert mine.fingerprint(1) == again.fingerprint(1) == key_fingerprint(key)
    assert len(mine.fingerprint(1)) == 32
    assert mine.fingerprint(1) != other.fingerprint(1) and again.fingerprint(2) != mine.fingerprint(1)
    assert mine.fingerprint(1) not in (key, hashlib.sha256(key).digest(), hmac.digest(key, b"", "sha256"))
    assert key not in mine.fingerprint(1)
    recorded = key_fingerprint(key)
    assert mine.has_fingerprint(1, recorded) and not other.has_fingerprint(1, recorded)
    # Compared in constant time, as every secret-derived value.
    compared: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    assert mine.has_fingerprint(1, recorded)
    assert compared == [(recorded, recorded)]
