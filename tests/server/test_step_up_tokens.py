"""The pure step-up token code (server/domain/step_up.py): what a token binds and what it refuses."""

from __future__ import annotations

import base64
import re

import pytest

from twofactor_server.domain import step_up
from twofactor_server.domain.keyring import Keyring

NOW = 1_800_000_000_000
LIFETIME = 300_000
KEYS = Keyring.parse(Keyring.new_key_spec(1))


def token(keyring: Keyring = KEYS, **overrides: object) -> str:
    fields: dict[str, object] = {"user_id": "alice", "actor": "backend", "epoch": 3, "now_ms": NOW}
    fields.update(overrides)
    return step_up.issue_token(keyring, **fields)  # type: ignore[arg-type]


def valid(value: str, keyring: Keyring = KEYS, **overrides: object) -> bool:
    fields: dict[str, object] = {
        "user_id": "alice",
        "actor": "backend",
        "epoch": 3,
        "now_ms": NOW,
        "lifetime_ms": LIFETIME,
    }
    fields.update(overrides)
    return step_up.token_is_valid(keyring, value, **fields)  # type: ignore[arg-type]


def test_a_token_is_valid_for_its_user_caller_and_epoch_within_its_lifetime() -> None:
    issued = token()
    assert valid(issued)
    assert valid(issued, now_ms=NOW + LIFETIME - 1)
    assert not valid(issued, now_ms=NOW + LIFETIME)
    assert not valid(issued, user_id="bob")
    assert not valid(issued, actor="other-backend")
    assert not valid(issued, epoch=4)
    assert not valid(issued, keyring=Keyring.parse(Keyring.new_key_spec(1)))


def test_a_token_from_the_future_beyond_clock_skew_is_refused() -> None:
    assert valid(token(now_ms=NOW + step_up.MAX_CLOCK_SKEW_MS))
    assert not valid(token(now_ms=NOW + step_up.MAX_CLOCK_SKEW_MS + 1))


def test_tokens_are_unique_opaque_and_name_no_user() -> None:
    first, second = token(user_id="alice@example.com"), token(user_id="alice@example.com")
    assert first != second
    raw = base64.urlsafe_b64decode(first.removeprefix(step_up.PREFIX) + "==")
    assert b"alice" not in raw and b"backend" not in raw
    assert len(first) < step_up.MAX_TOKEN_CHARS


def test_a_changed_byte_anywhere_is_refused() -> None:
    issued = token()
    raw = bytearray(base64.urlsafe_b64decode(issued.removeprefix(step_up.PREFIX) + "=="))
    for i in range(len(raw)):
        tampered = bytearray(raw)
        tampered[i] ^= 0x01
        text = step_up.PREFIX + base64.urlsafe_b64encode(bytes(tampered)).decode().rstrip("=")
        assert not valid(text), i


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "tfv1.",
        "tfv1.!!!!",
        "tfv1.AAAA",
        "tfv1.AAAAA",  # one character past a multiple of 4: not base64 at all (binascii.Error)
        "tfv2." + "A" * 80,
        "A" * 80,
        "tfv1." + "A" * 400,
        "tfv1.==",
    ],
)
def test_garbage_is_refused_without_an_error(garbage: str) -> None:
    assert not valid(garbage)


def test_a_token_is_url_safe_base64_without_padding_or_line_break() -> None:
    # It travels in headers and URLs: nothing but the URL-safe alphabet after the prefix.
    for _ in range(20):
        assert re.fullmatch(r"tfv1\.[A-Za-z0-9_-]+", token())


@pytest.mark.parametrize("mac_bytes", [0, 1, 3])
def test_a_fresh_header_with_a_mac_too_short_to_name_a_key_is_refused(mac_bytes: int) -> None:
    # Issued now, so only the MAC part can refuse it; too short to carry a key version
    # (the keyring raises KeyringError for it), it is not a token of ours.
    raw = NOW.to_bytes(8, "big") + bytes(step_up.NONCE_BYTES) + b"\x00" * mac_bytes
    forged = step_up.PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert not valid(forged)


def test_a_valid_body_under_another_prefix_or_beyond_the_length_bound_is_refused() -> None:
    # Past the length bound a token is refused before it is decoded at all.
    body = token().removeprefix(step_up.PREFIX)
    assert valid(step_up.PREFIX + body)
    assert not valid("tfv2." + body)
    padded = step_up.PREFIX + body + "!" * (step_up.MAX_TOKEN_CHARS - len(step_up.PREFIX) - len(body) + 1)
    assert len(padded) == step_up.MAX_TOKEN_CHARS + 1
    assert not valid(padded)


def test_a_token_survives_key_rotation() -> None:
    old_spec = Keyring.new_key_spec(1)
    issued = token(keyring=Keyring.parse(old_spec))
    rotated = Keyring.parse(f"{old_spec},{Keyring.new_key_spec(2)}")
    assert valid(issued, keyring=rotated)
    assert valid(token(keyring=rotated), keyring=rotated)


def test_a_token_made_under_a_key_the_server_lacks_is_simply_not_valid() -> None:
    """After key 1 is retired, a token it made is refused like an expired one (the caller
    verifies again), not answered KEY_VERSION_MISSING; the staged rollout's servers accept
    each other's tokens."""
    old, new = Keyring.new_key_spec(1), Keyring.new_key_spec(2)
    staged, activated = Keyring.parse(f"{old},{new}", active_version=1), Keyring.parse(f"{old},{new}")
    assert valid(token(activated), staged) and valid(token(staged), activated)
    assert not valid(token(Keyring.parse(old)), Keyring.parse(new))


def test_a_token_built_as_earlier_releases_built_it_is_valid_and_issued_alike() -> None:
    # During a rolling deploy, processes of the previous release check this one's tokens and
    # the other way round: the MAC's input and the text form must stay byte for byte the same.
    nonce = bytes(range(step_up.NONCE_BYTES))
    data = b"\0".join((b"alice", b"backend", b"3", str(NOW).encode(), nonce))
    mac = KEYS.keyed_hash(data, purpose=step_up.STEP_UP)
    earlier = step_up.PREFIX + base64.urlsafe_b64encode(NOW.to_bytes(8, "big") + nonce + mac).decode().rstrip(
        "="
    )
    assert valid(earlier)
    issued = token()
    raw = base64.urlsafe_b64decode(issued.removeprefix(step_up.PREFIX) + "=" * (-len(issued) % 4))
    assert raw[:8] == NOW.to_bytes(8, "big")
    own_nonce = raw[8 : 8 + step_up.NONCE_BYTES]
    rebuilt = b"\0".join((b"alice", b"backend", b"3", str(NOW).encode(), own_nonce))
    assert raw[8 + step_up.NONCE_BYTES :] == KEYS.keyed_hash(rebuilt, purpose=step_up.STEP_UP)


def test_only_the_issued_text_of_a_token_is_accepted() -> None:
    # base64 decoding skips characters outside its alphabet (and, with altchars, takes the
    # standard alphabet too): each variant below decodes to the valid bytes, none was issued.
    body = token().removeprefix(step_up.PREFIX)
    assert valid(step_up.PREFIX + body)
    variants = [body + "!", "!" + body, body[:10] + "\n" + body[10:], body[:10] + "." + body[10:]]
    standard = body.replace("-", "+").replace("_", "/")
    variants += [standard] if standard != body else []
    for variant in variants:
        assert not valid(step_up.PREFIX + variant), variant
