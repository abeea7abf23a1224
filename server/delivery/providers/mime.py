"""The bytes of an email, written directly: the same bytes the email package writes for it.

`email.message.EmailMessage` (default policy) parses every header it is given
into the header registry, then folds it again, and `smtplib.send_message`
flattens the result through a generator: about 2 ms of CPU per message, most
of a delivery's (docs/benchmarks.md, Delivery). Our messages always have one
shape: From, To, Subject, Date, Message-ID, then a multipart/alternative of a
text part and an HTML part. For the common case (short, plain ASCII headers),
`message_bytes` writes that shape itself, choosing each part's transfer
encoding by the email package's own rules (7bit, quoted-printable or base64),
for about a tenth of the CPU. For anything else (a non-ASCII or long header,
an address with quotes or comments, a body the package would send as 8bit) it
returns None and the caller builds the message with the email package as
before. tests/workers/test_mime.py checks, over generated inputs, that the
bytes are identical to the package's whenever this path is taken.
"""

from __future__ import annotations

import binascii
import random
import re
import sys
from email import quoprimime
from email.utils import formatdate

MAX_LINE = 78  # the default policy's max_line_length
# A dot-atom address (RFC 5322 §3.4.1) without quotes, comments or a display name.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
# "Name <address>": words of letters, digits and hyphens, the address as above.
_NAMED = re.compile(r"[A-Za-z0-9-]+(?: [A-Za-z0-9-]+)* <(?P<address>[^<>\s]+)>")
# Printable ASCII, single spaces inside, none at either end.
_PLAIN = re.compile(r"[!-~]+(?: [!-~]+)*")
_TOKEN_WIDTH = len(repr(sys.maxsize - 1))  # as email.generator's boundaries
_boundaries = random.Random()  # noqa: S311 - a MIME boundary, not a secret


def bare_address(value: str) -> bool:
    """Whether `value` is a dot-atom address alone ("a@b.c"), nothing to quote or parse."""
    return _ADDRESS.fullmatch(value) is not None


def plain_address(value: str) -> str | None:
    """The address of a From or To value written the simple way ("a@b.c" or "Name <a@b.c>"),
    else None (the email package handles the rest)."""
    if _ADDRESS.fullmatch(value):
        return value
    named = _NAMED.fullmatch(value)
    if named is not None and _ADDRESS.fullmatch(named["address"]):
        return named["address"]
    return None


def message_bytes(
    *,
    from_header: str,
    to: str,
    subject: str,
    message_id: str,
    text: str,
    html: str,
    date: str | None = None,
    boundary: str | None = None,
) -> bytes | None:
    """The message as `SmtpEmailSender` sends it (CRLF line ends), or None when it is not one
    of the simple cases. `date` and `boundary` are chosen here unless given (tests)."""
    headers = (("From", from_header), ("To", to), ("Subject", subject), ("Message-ID", message_id))
    for name, value in headers:
        if (
            len(name) + 2 + len(value) > MAX_LINE
            or "=?" in value  # would be read as an RFC 2047 encoded word
            or not _PLAIN.fullmatch(value)
        ):
            return None
    if plain_address(from_header) is None or _ADDRESS.fullmatch(to) is None:
        return None
    text_part, html_part = _encoded(text), _encoded(html)
    if text_part is None or html_part is None:
        return None
    if boundary is None:
        boundary = "=" * 15 + f"{_boundaries.getrandbits(63):0{_TOKEN_WIDTH}d}" + "=="
    if date is None:
        # formatdate's names are English whatever the locale; the header registry writes UTC as +0000.
        date = formatdate(usegmt=True).removesuffix("GMT") + "+0000"
    marker = f"--{boundary}"
    (text_cte, text_body), (html_cte, html_body) = text_part, html_part
    if any(line.startswith(marker) for line in (text_body + html_body).splitlines()):
        return None  # the package would pick another boundary
    lines = [
        f"From: {from_header}",
        f"To: {to}",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        "Content-Type: multipart/alternative;",
        f' boundary="{boundary}"',
        "",
        marker,
        'Content-Type: text/plain; charset="utf-8"',
        f"Content-Transfer-Encoding: {text_cte}",
        "",
        text_body,
        marker,
        'Content-Type: text/html; charset="utf-8"',
        f"Content-Transfer-Encoding: {html_cte}",
        "MIME-Version: 1.0",
        "",
        html_body,
        f"{marker}--",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


def _encoded(content: str) -> tuple[str, str] | None:
    """(transfer encoding, body with LF line ends, no final LF) as `set_content(str)` picks them
    (email.contentmanager's heuristics for utf-8 text); None where it would pick 8bit."""
    lines = content.encode("utf-8").splitlines()
    body = b"\n".join(lines) + b"\n"
    if max((len(line) for line in lines), default=0) <= MAX_LINE:
        try:
            return "7bit", _lf_lines(body.decode("ascii"))
        except UnicodeDecodeError:
            return None  # the default policy sends it 8bit: left to the email package
    sniff = b"\n".join(lines[:10]) + b"\n"
    sniffed = quoprimime.body_encode(sniff.decode("latin-1"), MAX_LINE)
    if len(sniffed) > len(binascii.b2a_base64(sniff)):
        step = MAX_LINE // 4 * 3
        chunks = (binascii.b2a_base64(body[i : i + step]).decode("ascii") for i in range(0, len(body), step))
        return "base64", _lf_lines("".join(chunks))
    # Ten lines or fewer: the sniff was the whole body, already encoded (most text parts).
    encoded = sniffed if len(lines) <= 10 else quoprimime.body_encode(body.decode("latin-1"), MAX_LINE)
    return "quoted-printable", _lf_lines(encoded)


def _lf_lines(payload: str) -> str:
    """The payload's lines as the generator writes them, to be joined with CRLF: a final line
    end becomes the blank line before the next boundary."""
    return "\r\n".join(re.split(r"\r\n|\r|\n", payload))
