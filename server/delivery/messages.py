"""Email and SMS text for a code, rendered from per-language template files.

Templates live in workers/templates/<language>/ and use string.Template
($variable) syntax: no logic, nothing to sandbox, easy for a translator. Each
purpose has its own files, because a sentence rarely translates by swapping one
word. A language may translate only some files; the rest fall back to English.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache
from importlib.resources import files
from string import Template

PURPOSES = ("login", "enrollment", "contact")
# The changes a user is told of by email (usecases/notices.py), a subject and a text each.
NOTICES = (
    "method_added",
    "method_disabled",
    "contact_changed",
    "backup_codes_viewed",
    "backup_codes_regenerated",
    "admin_reset",
    "locked_out",
)
DEFAULT_LANGUAGE = "en"
_TEMPLATES = files("twofactor_server.delivery") / "templates"
_LOCALE_TAG = re.compile(r"[a-z]{2,3}(?:_[a-z0-9]{2,8})*")


def render_email(
    *, purpose: str, code: str, issuer: str, ttl_minutes: int, locale: str
) -> tuple[str, str, str]:
    """Return (subject, text, html). The subject never holds the code: it shows in notifications."""
    variables = _variables(purpose, code, issuer, ttl_minutes, locale)
    escaped = {name: html.escape(value, quote=True) for name, value in variables.items()}
    # A header is one line: an issuer containing a newline must not split (or inject) headers.
    subject = " ".join(_render(purpose, "subject.txt", variables, locale).split())
    text = _render(purpose, "email.txt", variables, locale)
    body = _render(purpose, "email.html", escaped, locale)
    return subject, text, body


def render_sms(*, purpose: str, code: str, issuer: str, ttl_minutes: int, locale: str) -> str:
    """Return one short line; the English text fits one 160-character GSM segment."""
    variables = _variables(purpose, code, issuer, ttl_minutes, locale)
    return " ".join(_render(purpose, "sms.txt", variables, locale).split())


def render_notice(
    *, notice: str, variables: dict[str, str], issuer: str, locale: str
) -> tuple[str, str, str]:
    """Return (subject, text, html) of a notice. The HTML is the text's paragraphs, escaped, in
    one shared layout: a translator writes each notice once."""
    if notice not in NOTICES:
        raise ValueError(f"notice must be one of {', '.join(NOTICES)}, got {notice!r}")
    values = {**variables, "issuer": issuer}
    subject = " ".join(_render_plain(f"notice.{notice}.subject.txt", values, locale).split())
    text = _render_plain(f"notice.{notice}.email.txt", values, locale)
    body = text.split("\n-- \n")[0]  # the signature is the layout's
    paragraphs = "\n".join(
        f"<p>{html.escape(' '.join(p.split()), quote=True)}</p>" for p in body.split("\n\n") if p.strip()
    )
    layout = {"subject": html.escape(subject, quote=True), "issuer": html.escape(issuer, quote=True)}
    page = _render_plain("notice.email.html", {**layout, "paragraphs": paragraphs}, locale)
    return subject, text, page


def locale_candidates(locale: str) -> tuple[str, ...]:
    """Template directories to try, most specific first: "pt-BR" → ("pt_br", "pt", "en")."""
    tag = locale.strip().lower().replace("-", "_")
    # Only well-formed tags are used as directory names: nothing like "../" reaches the path.
    if not _LOCALE_TAG.fullmatch(tag):
        return (DEFAULT_LANGUAGE,)
    parts = tag.split("_")
    found = ["_".join(parts[:n]) for n in range(len(parts), 0, -1)]
    return tuple(dict.fromkeys([*found, DEFAULT_LANGUAGE]))


def _variables(purpose: str, code: str, issuer: str, ttl_minutes: int, locale: str) -> dict[str, str]:
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    # A code living less than a minute still reads "1 minute" rather than "0 minutes".
    minutes = max(1, ttl_minutes)
    plural = _render_plain("minutes.txt", {"ttl_minutes": str(minutes)}, locale).splitlines()
    # minutes.txt holds the singular form on its first line and the plural on its second.
    expiry = plural[0] if minutes == 1 else plural[-1]
    return {"code": code, "issuer": issuer, "ttl_minutes": str(minutes), "expiry": expiry.strip()}


def _render(purpose: str, name: str, variables: dict[str, str], locale: str) -> str:
    return _render_plain(f"{purpose}.{name}", variables, locale)


def _render_plain(name: str, variables: dict[str, str], locale: str) -> str:
    # substitute(), not safe_substitute(): a template naming an unknown variable is a bug.
    return _template(name, locale).substitute(variables)


@lru_cache(maxsize=1024)
def _template(name: str, locale: str) -> Template:
    """The template `name` for `locale`, read once per process: the files ship with the package."""
    for language in locale_candidates(locale):
        resource = _TEMPLATES / language / name
        if resource.is_file():
            return Template(resource.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"no template {name!r} for locale {locale!r}")
