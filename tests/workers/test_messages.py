from __future__ import annotations

import pytest

from twofactor_server.delivery.messages import PURPOSES, locale_candidates, render_email, render_sms

CODE = "904217"
# Every character the GSM 03.38 default alphabet can send in one 7-bit septet.
GSM_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)


def email(purpose: str = "login", **overrides: object) -> tuple[str, str, str]:
    values: dict[str, object] = {"code": CODE, "issuer": "Acme", "ttl_minutes": 10, "locale": "en"}
    values.update(overrides)
    return render_email(purpose=purpose, **values)  # type: ignore[arg-type]


def sms(purpose: str = "login", **overrides: object) -> str:
    values: dict[str, object] = {"code": CODE, "issuer": "Acme", "ttl_minutes": 10, "locale": "en"}
    values.update(overrides)
    return render_sms(purpose=purpose, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("purpose", PURPOSES)
def test_email_names_issuer_code_and_expiry_but_the_subject_hides_the_code(purpose: str) -> None:
    subject, text, html = email(purpose)

    assert "Acme" in subject
    assert CODE not in subject
    assert "\n" not in subject
    for body in (text, html):
        assert CODE in body and "Acme" in body and "10 minutes" in body
    assert html.lstrip().startswith("<!DOCTYPE html>")


def test_login_and_enrollment_read_differently() -> None:
    assert email("login") != email("enrollment")
    assert sms("login") != sms("enrollment")


def test_english_login_sms() -> None:
    assert sms() == f"Your Acme verification code is {CODE}. It expires in 10 minutes. Do not share it."


def test_one_minute_is_singular_and_shorter_lifetimes_round_up_to_it() -> None:
    assert "expires in 1 minute." in sms(ttl_minutes=1)
    assert "expires in 1 minute." in sms(ttl_minutes=0)
    assert "1 minute." in email(ttl_minutes=1)[1]


def test_html_escapes_variables_and_text_keeps_them_verbatim() -> None:
    issuer = 'Acme & Sons <script>alert("x")</script>'
    subject, text, html = email(issuer=issuer)

    assert "<script>" not in html
    assert "Acme &amp; Sons &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert issuer in text
    assert issuer in subject


def test_an_issuer_with_a_newline_cannot_split_the_subject_header() -> None:
    subject, _, _ = email(issuer="Acme\r\nBcc: eve@example.com")

    assert "\r" not in subject and "\n" not in subject


@pytest.mark.parametrize("purpose", PURPOSES)
@pytest.mark.parametrize("code", ["123456", "1234567890"])
def test_sms_fits_one_gsm_segment(purpose: str, code: str) -> None:
    text = sms(purpose, code=code, issuer="Example Corporation", ttl_minutes=10)

    assert len(text) < 160
    assert set(text) <= GSM_BASIC
    assert code in text and "Example Corporation" in text and "10 minutes" in text


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("pt-BR", ("pt_br", "pt", "en")),
        ("en_US", ("en_us", "en")),
        ("EN", ("en",)),
        ("zh-Hant-TW", ("zh_hant_tw", "zh_hant", "zh", "en")),
        ("", ("en",)),
        ("../../etc", ("en",)),
        ("de/../../x", ("en",)),
    ],
)
def test_locale_candidates_go_from_specific_to_english(locale: str, expected: tuple[str, ...]) -> None:
    assert locale_candidates(locale) == expected


@pytest.mark.parametrize("locale", ["pt-BR", "en-GB", "xx", "", "../../etc"])
def test_locales_without_templates_fall_back_to_english(locale: str) -> None:
    assert email(locale=locale) == email(locale="en")
    assert sms(locale=locale) == sms(locale="en")


def test_unknown_purpose_is_refused() -> None:
    with pytest.raises(ValueError, match="purpose"):
        sms("password_reset")
