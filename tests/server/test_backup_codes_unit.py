"""The pure functions of server/domain/backup_codes.py: generation, display and normalisation."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twofactor_server.domain import backup_codes

CANONICAL = st.text(
    alphabet=backup_codes.ALPHABET, min_size=backup_codes.LENGTH, max_size=backup_codes.LENGTH
)
# Deterministic runs with no time limit per example (a loaded CI machine is slow, not wrong).
STEADY = settings(deadline=None, derandomize=True, database=None)
DISPLAYED = re.compile(r"^[0-9a-hjkmnp-tv-z]{5}-[0-9a-hjkmnp-tv-z]{5}$")


def test_alphabet_has_32_symbols_and_no_look_alikes() -> None:
    assert len(set(backup_codes.ALPHABET)) == len(backup_codes.ALPHABET) == 32
    assert not set("ilou") & set(backup_codes.ALPHABET)
    assert backup_codes.ALPHABET.lower() == backup_codes.ALPHABET
    # At least 50 bits per code.
    assert backup_codes.LENGTH * math.log2(len(backup_codes.ALPHABET)) >= 50


def test_new_code_is_canonical_and_displays_in_two_groups() -> None:
    for _ in range(200):
        code = backup_codes.new_code()
        assert len(code) == backup_codes.LENGTH and set(code) <= set(backup_codes.ALPHABET)
        assert DISPLAYED.match(backup_codes.display(code))


def test_new_code_draws_its_50_bits_from_secrets_5_per_symbol(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []
    # Symbol i (from the low bits up) gets the value 31 - 3 * i: every symbol differs, 31 included.
    bits = sum((31 - 3 * i) << (5 * i) for i in range(backup_codes.LENGTH))

    class FakeSecrets:
        @staticmethod
        def randbits(k: int) -> int:
            drawn.append(k)
            return bits

    monkeypatch.setattr(backup_codes, "secrets", FakeSecrets)
    code = backup_codes.new_code()
    assert drawn == [5 * backup_codes.LENGTH]  # one draw, 5 bits a symbol: 32 symbols, each uniform
    assert code == "".join(backup_codes.ALPHABET[31 - 3 * i] for i in range(backup_codes.LENGTH))


@pytest.mark.parametrize("count", [1, 5, 10, 100])
def test_new_codes_gives_count_distinct_codes(count: int) -> None:
    codes = backup_codes.new_codes(count)
    assert len(codes) == len(set(codes)) == count
    assert all(backup_codes.normalize(c) == c for c in codes)


def test_codes_are_not_predictable_from_each_other() -> None:
    # 2000 codes of 50 bits: a repeat would mean a broken generator, not bad luck.
    codes = [backup_codes.new_code() for _ in range(2000)]
    assert len(set(codes)) == len(codes)
    # Every symbol turns up in every position (20000 draws; a miss has probability ~1e-25).
    for position in range(backup_codes.LENGTH):
        assert {c[position] for c in codes} == set(backup_codes.ALPHABET)


@STEADY
@given(CANONICAL)
def test_display_then_normalize_round_trips(code: str) -> None:
    shown = backup_codes.display(code)
    assert DISPLAYED.match(shown)
    assert backup_codes.normalize(shown) == code


@STEADY
@given(CANONICAL, st.lists(st.sampled_from([" ", "-", "  ", "\t"]), min_size=11, max_size=11))
def test_normalize_ignores_case_spaces_and_dashes(code: str, separators: list[str]) -> None:
    typed = "".join(sep + ch for sep, ch in zip(separators, code.upper(), strict=False)) + separators[-1]
    assert backup_codes.normalize(typed) == code
    assert backup_codes.normalize(code.upper()) == code
    assert backup_codes.normalize(code) == code


@STEADY
@given(CANONICAL, st.data())
def test_normalize_reads_crockford_look_alikes(code: str, data: st.DataObject) -> None:
    typed = "".join(
        data.draw(st.sampled_from("oO"))
        if ch == "0"
        else data.draw(st.sampled_from("iIlL"))
        if ch == "1"
        else ch
        for ch in code
    )
    assert backup_codes.normalize(typed) == code


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("K7M2Q-X9P4W", "k7m2qx9p4w"),
        ("k7m2q x9p4w", "k7m2qx9p4w"),
        ("k7m2qx9p4w", "k7m2qx9p4w"),
        (" k7m2q - x9p4w ", "k7m2qx9p4w"),
        ("oOiIl-LabcD", "001111abcd"),
    ],
)
def test_normalize_examples(typed: str, expected: str) -> None:
    assert backup_codes.normalize(typed) == expected


@pytest.mark.parametrize(
    "typed",
    [
        "",
        "k7m2q-x9p4",  # one symbol short
        "k7m2q-x9p4wz",  # one symbol long
        "k7m2q-x9p4u",  # U is not in Crockford's alphabet
        "k7m2q_x9p4w",  # underscore is not a separator
        "k7m2q-x9p4!",
        "\uff4b7m2q-x9p4w",  # full-width k
        "123456",  # an authenticator code is not a backup code
    ],
)
def test_normalize_refuses_what_cannot_be_a_code(typed: str) -> None:
    assert backup_codes.normalize(typed) is None


@STEADY
@given(st.text(max_size=40))
def test_normalize_returns_none_or_a_canonical_code(typed: str) -> None:
    result = backup_codes.normalize(typed)
    assert result is None or (
        len(result) == backup_codes.LENGTH and set(result) <= set(backup_codes.ALPHABET)
    )
