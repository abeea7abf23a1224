"""The pure functions of server/domain/one_time_codes.py: the numeric codes sent by email or SMS."""

from __future__ import annotations

import pytest

from twofactor_server.domain import one_time_codes


@pytest.mark.parametrize("length", [6, 8, 10])
def test_new_code_has_length_digits(length: int) -> None:
    for _ in range(200):
        code = one_time_codes.new_code(length)
        assert len(code) == length and code.isascii() and code.isdigit()


def test_new_code_draws_once_and_keeps_leading_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []

    class FakeSecrets:
        @staticmethod
        def randbelow(n: int) -> int:
            drawn.append(n)
            return 42

    monkeypatch.setattr(one_time_codes, "secrets", FakeSecrets)
    assert one_time_codes.new_code(6) == "000042"
    assert drawn == [10**6]  # one draw over every 6-digit code: each code equally likely


def test_every_digit_turns_up_in_every_position() -> None:
    # 2000 codes: a digit missing from a position has probability ~1e-90.
    codes = [one_time_codes.new_code(6) for _ in range(2000)]
    for position in range(6):
        assert {c[position] for c in codes} == set("0123456789")


@pytest.mark.parametrize("length", [5, 11])
def test_new_code_refuses_other_lengths(length: int) -> None:
    with pytest.raises(ValueError):
        one_time_codes.new_code(length)
