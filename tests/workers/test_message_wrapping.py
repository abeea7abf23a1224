"""Email text parts as a person reads them: one line per paragraph (the mail client wraps it), so no
sentence is broken mid-way whatever the issuer's length; the HTML part says the same."""

from __future__ import annotations

import re

import pytest

from twofactor_server.delivery.messages import PURPOSES, render_email


@pytest.mark.parametrize("purpose", PURPOSES)
@pytest.mark.parametrize("issuer", ["Acme", "The Very Long Name of an Example Corporation Limited"])
def test_each_paragraph_of_the_text_part_is_one_line(purpose: str, issuer: str) -> None:
    subject, text, html = render_email(
        purpose=purpose, code="123456", issuer=issuer, ttl_minutes=10, locale="en"
    )
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    for paragraph in paragraphs:
        lines = paragraph.strip("\n").splitlines()
        assert len(lines) == 1 or paragraph.startswith("-- "), (
            f"a paragraph is broken across lines: {paragraph!r}"
        )
    prose = [p for p in paragraphs if not p.startswith(("    ", "-- "))]
    assert all(p.rstrip().endswith((".", ":")) for p in prose), prose
    assert "    123456" in text and "10 minutes" in text and issuer in text
    body_text = " ".join(re.sub(r"<[^>]+>", " ", html).split())
    assert "123456" in body_text and "10 minutes" in body_text and issuer in body_text
    assert "123456" not in subject
