"""RFC 6238 time-based codes."""

from __future__ import annotations

import base64
import hmac
import importlib
import sys
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twofactor_server.domain import backup_codes, one_time_codes, totp

RFC_SECRET = b"12345678901234567890"  # RFC 6238 Appendix B, SHA1 seed


@pytest.mark.parametrize(
    ("unix_time", "expected"),
    [
        (59, "94287082"),
        (1111111109, "07081804"),
        (1111111111, "14050471"),
        (1234567890, "89005924"),
        (2000000000, "69279037"),
        (20000000000, "65353130"),
    ],
)
def test_rfc6238_appendix_b_sha1_vectors(unix_time: int, expected: str) -> None:
    assert totp.code_at_step(RFC_SECRET, totp.time_step(unix_time), digits=8) == expected


def test_six_digit_code_matches_an_independent_implementation() -> None:
    secret = totp.new_secret()
    reference = pyotp.TOTP(base64.b32encode(secret).decode())
    for t in (0, 29, 30, 1_700_000_000, 1_800_000_015):
        assert totp.code_at_step(secret, totp.time_step(t)) == reference.at(t)


@settings(deadline=None, derandomize=True, database=None)  # the same examples on every run
@given(
    st.binary(min_size=20, max_size=100),
    st.integers(min_value=30, max_value=2**40),
    st.sampled_from([-1, 0, 1]),
)
def test_matching_finds_the_codes_of_an_independent_implementation(
    secret: bytes, unix_time: int, offset: int
) -> None:
    # Keys longer than SHA-1's 64-byte block are hashed first (RFC 2104); pyotp is the reference.
    reference = pyotp.HOTP(base64.b32encode(secret).decode())
    step = totp.time_step(unix_time) + offset
    found = totp.matching_step(secret, reference.at(step), unix_time)
    assert found is not None
    assert reference.at(found) == reference.at(step)  # another step of the window may share the code


def test_accepts_one_step_of_drift_each_way_and_no_more() -> None:
    # A fixed secret and step whose five codes around it all differ, so every assertion
    # below runs and a code two steps away cannot match by coincidence.
    secret = RFC_SECRET
    step = totp.time_step(1_800_000_000)
    codes = {offset: totp.code_at_step(secret, step + offset) for offset in (-2, -1, 0, 1, 2)}
    assert len(set(codes.values())) == 5
    for now in (1_800_000_000.0, 1_800_000_015.5, 1_800_000_029.999):  # start, middle, end of the step
        assert totp.time_step(now) == step
        for offset in (-1, 0, 1):
            assert totp.matching_step(secret, codes[offset], now) == step + offset
        for offset in (-2, 2):
            assert totp.matching_step(secret, codes[offset], now) is None


def test_every_step_of_the_window_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # hmac.compare_digest for each of the three candidates, even after one matched: neither an
    # == nor an early exit may make a right guess take less time than a wrong one.
    now = 1_800_000_000
    step = totp.time_step(now)
    compared: list[bytes] = []
    constant_time = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append(bytes(a))
        return constant_time(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    assert totp.matching_step(RFC_SECRET, totp.code_at_step(RFC_SECRET, step - 1), now) == step - 1
    assert compared == [totp.code_at_step(RFC_SECRET, s).encode() for s in (step - 1, step, step + 1)]


def test_refuses_secrets_under_160_bits() -> None:
    with pytest.raises(ValueError, match="160 bits"):
        totp.code_at_step(b"x" * 19, 1)


def test_new_secrets_are_160_random_bits() -> None:
    secrets_ = {totp.new_secret() for _ in range(100)}
    assert len(secrets_) == 100
    assert all(len(s) == 20 for s in secrets_)
    assert all("=" not in totp.to_base32(s) and len(totp.to_base32(s)) == 32 for s in secrets_)


def test_provisioning_uri_carries_what_google_authenticator_reads() -> None:
    secret = totp.new_secret()
    uri = totp.provisioning_uri(secret, account_name="alice@example.com", issuer="Acme Corp")
    parsed = urlparse(uri)
    assert parsed.scheme == "otpauth" and parsed.netloc == "totp"
    assert parsed.path == "/Acme%20Corp:alice%40example.com"
    query = parse_qs(parsed.query)
    assert query["secret"] == [totp.to_base32(secret)]
    assert query["issuer"] == ["Acme Corp"]
    # Google Authenticator only honours SHA1/6/30; absent parameters mean exactly those.
    assert query.get("algorithm", ["SHA1"]) == ["SHA1"]
    assert query.get("digits", ["6"]) == ["6"]
    assert query.get("period", ["30"]) == ["30"]


@given(st.binary(min_size=20, max_size=64), st.integers(min_value=0, max_value=2**40))
def test_the_current_code_always_matches_its_own_step(secret: bytes, unix_time: int) -> None:
    code = totp.code_at_step(secret, totp.time_step(unix_time))
    assert len(code) == 6 and code.isdigit()
    assert totp.matching_step(secret, code, unix_time) is not None


@given(st.text(max_size=40) | st.from_regex(r"[0-9 ]{6,12}", fullmatch=True))
def test_an_authenticator_code_is_never_a_backup_code(typed: str) -> None:
    # Verify skips the backup code's normalization for a six-digit code (usecases/verification.py).
    digits = one_time_codes.normalize(typed)
    if digits is not None and len(digits) == totp.DIGITS:
        assert backup_codes.normalize(typed) is None


def test_the_codes_are_the_same_without_cpythons_own_sha1(monkeypatch: pytest.MonkeyPatch) -> None:
    # An interpreter built without _sha1 takes hashlib's (OpenSSL's) SHA-1: the same codes.
    monkeypatch.setitem(sys.modules, "_sha1", None)  # importing it now raises ImportError
    fallback = importlib.reload(totp)
    try:
        assert fallback._sha1.__module__ != "_sha1"
        assert fallback.code_at_step(RFC_SECRET, totp.time_step(59), digits=8) == "94287082"
        secret = fallback.new_secret()
        code = fallback.code_at_step(secret, 1_000)
        assert fallback.matching_step(secret, code, 1_000 * 30 + 29) == 1_000
        assert code == pyotp.HOTP(base64.b32encode(secret).decode()).at(1_000)
    finally:
        monkeypatch.undo()
        importlib.reload(totp)
