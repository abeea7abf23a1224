"""AES-256-GCM at rest and keyed hashes, with versioned keys."""

from __future__ import annotations

import pytest

from twofactor_server.domain.keyring import Keyring, KeyringError


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
    assert after.current_version == 2
    assert after.decrypt(sealed_old, purpose="p", user_id="u") == b"a"
    assert after.matches(hash_old, b"code", purpose="p")
    assert after.encrypt(b"a", purpose="p", user_id="u")[:4] == (2).to_bytes(4, "big")
    with pytest.raises(KeyringError, match="no key version 2"):
        Keyring.parse(old).decrypt(after.encrypt(b"a", purpose="p", user_id="u"), purpose="p", user_id="u")


def test_keyed_hash_depends_on_key_purpose_and_data() -> None:
    keyring = Keyring.parse(Keyring.new_key_spec(1))
    stored = keyring.keyed_hash(b"123456", purpose="challenge_code")
    assert keyring.matches(stored, b"123456", purpose="challenge_code")
    assert not keyring.matches(stored, b"123457", purpose="challenge_code")
    assert not keyring.matches(stored, b"123456", purpose="backup_code")
    assert not Keyring.parse(Keyring.new_key_spec(1)).matches(stored, b"123456", purpose="challenge_code")


@pytest.mark.parametrize("spec", ["", "1", "x:AAAA", "1:not-base64!", "1:AAAA"])
def test_refuses_malformed_or_short_keys(spec: str) -> None:
    with pytest.raises(KeyringError):
        Keyring.parse(spec)
