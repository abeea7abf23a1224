"""Typed reading of TWOFACTOR_* values from a given environment mapping, with messages that name
the variable; settings.py says which settings exist and passes the environment in."""

from __future__ import annotations

import email.utils
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

METHOD_NAMES = ("authenticator", "email", "sms")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting is missing or malformed; the process refuses to start."""


@dataclass(frozen=True)
class TokenSetting:
    """An API token: its name (the audit actor), scopes, and SHA-256 digest."""

    name: str
    scopes: frozenset[str]
    sha256: bytes


class EnvValues:
    """Typed access to TWOFACTOR_* variables with messages that name the variable."""

    PREFIX = "TWOFACTOR_"

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.kinds: dict[str, str] = {}  # every variable read, and how it is parsed
        self.values: dict[str, str] = {}  # the effective value of each, as text

    def _raw(self, name: str, kind: str, default: object) -> str | None:
        self.kinds.setdefault(self.PREFIX + name, kind)
        value = (self._environ.get(self.PREFIX + name) or "").strip() or None
        self.values[self.PREFIX + name] = str(default) if value is None else value
        if value is not None and _CONTROL.search(value):
            raise SettingsError(f"{self.PREFIX}{name} contains a control character (a stray paste?)")
        return value

    def text(self, name: str, default: str, kind: str = "text") -> str:
        value = self._raw(name, kind, default)
        return default if value is None else value

    def matching(
        self, name: str, default: str, kind: str, pattern: str, wanted: str, *, ignore_case: bool = True
    ) -> str:
        value = self.text(name, default, kind)
        if value != default and not re.fullmatch(pattern, value, re.IGNORECASE if ignore_case else 0):
            raise SettingsError(f"{self.PREFIX}{name} must be {wanted}, got {mask_url(value)!r}")
        return value

    def redis_url(self, name: str) -> str:
        """An optional redis:// or rediss:// URL that redis-py and kombu both read as it was meant.
        Both cut the host short at an unencoded / ? or # in the password (base64 has /) and then
        raise a traceback quoting part of it, or read a database path like /x as database 0 (the
        server) and refuse it (the worker): refused here, naming no part of the URL."""
        value = self.matching(name, "", "url", r"rediss?://.+", "a redis:// or rediss:// URL")
        problem = value and _redis_url_problem(value)
        if problem:
            raise SettingsError(
                f"{self.PREFIX}{name}: can't read this URL ({problem}): percent-encode the user name and "
                "password (% as %25, / as %2F, ? as %3F, # as %23, [ as %5B, ] as %5D, @ as %40, "
                ": as %3A)"
            )
        return value

    def sender(self, name: str, default: str) -> str:
        """An address to send mail from, bare or with a display name of its own (`Acme Security
        <security@acme.example>`), as the email package reads it: one address, an ASCII dot-atom
        at a host name. A typo such as a second @ would otherwise send every code from <>,
        which receivers refuse or file as spam."""
        value = self.text(name, default, "email")
        entries = email.utils.getaddresses([value])
        local, _, domain = entries[0][1].rpartition("@") if len(entries) == 1 else ("", "", "")
        if not (_SENDER_LOCAL.fullmatch(local) and _HOST_NAME.fullmatch(domain)):
            raise SettingsError(
                f"{self.PREFIX}{name} must be one address, such as security@acme.example or "
                f"Acme Security <security@acme.example>, got {value!r}"
            )
        return value

    def optional_int(self, name: str, low: int, high: int) -> int | None:
        return None if self._raw(name, "int", "") is None else self.int(name, 0, low, high)

    def int(self, name: str, default: int, low: int, high: int) -> int:
        value = self._raw(name, "int", default)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise SettingsError(f"{self.PREFIX}{name} must be a whole number, got {value!r}") from None
        if not low <= number <= high:
            raise SettingsError(f"{self.PREFIX}{name} must be between {low} and {high}, got {number}")
        return number

    def float(self, name: str, default: float, low: float, high: float) -> float:
        value = self._raw(name, "float", default)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"{self.PREFIX}{name} must be a number, got {value!r}") from None
        if not low <= number <= high:  # false for nan too; inf is past any high
            raise SettingsError(f"{self.PREFIX}{name} must be between {low:g} and {high:g}, got {value!r}")
        return number

    def address(self, name: str, default: str, wanted: str) -> str:
        """host:port, [ipv6]:port or :port (every interface), the port 0 (any free one) to 65535."""
        value = self.matching(name, default, "address", ADDRESS, wanted)
        if not value:  # an optional address left empty
            return value
        port = int(value.rpartition(":")[2])
        if port > 65535:
            raise SettingsError(f"{self.PREFIX}{name} must have a port from 0 to 65535, got {value!r}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        value = self._raw(name, "bool", str(default).lower())
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{self.PREFIX}{name} must be true or false, got {value!r}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default, "choice")
        value = value.upper() if choices == LOG_LEVELS else value.lower()
        if value not in choices and value != default:
            raise SettingsError(f"{self.PREFIX}{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def methods(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._raw(name, "methods", ",".join(default))
        if value is None:
            return default
        methods = tuple(dict.fromkeys(m.strip().lower() for m in value.split(",") if m.strip()))
        unknown = [m for m in methods if m not in METHOD_NAMES]
        if unknown or not methods:
            raise SettingsError(
                f"{self.PREFIX}{name} must list some of {', '.join(METHOD_NAMES)}, got {value!r}"
            )
        return methods

    def countries(self, name: str) -> tuple[str, ...]:
        """ISO 3166-1 alpha-2 codes separated by commas, as libphonenumber knows them (GB, not UK)."""
        import phonenumbers  # only here: the rest of the settings need no phone library

        value = self._raw(name, "countries", "")
        if value is None:
            return ()
        codes = tuple(dict.fromkeys(c.strip().upper() for c in value.split(",") if c.strip()))
        unknown = [c for c in codes if c not in phonenumbers.SUPPORTED_REGIONS]
        if unknown or not codes:  # only commas would read as every country: the guard off
            raise SettingsError(
                f"{self.PREFIX}{name} must list ISO 3166 country codes like US,CA,GB (or be unset "
                f"for every country); {'unknown: ' + ', '.join(unknown) if unknown else f'got {value!r}'}"
            )
        return codes

    def tokens(self, name: str) -> tuple[TokenSetting, ...]:
        """TWOFACTOR_TOKENS: `name:scope+scope:sha256hex` entries separated by commas.

        Only digests are configured, so the environment never holds a usable
        token; `twofactor token` prints a new token and its entry.
        """
        value = self._raw(name, "tokens", "")
        if value is None:
            return ()
        tokens: list[TokenSetting] = []
        entries = value.split(",")
        for position, entry in enumerate(entries, 1):
            try:
                tokens.append(token_entry(entry, tokens))
            except ValueError as error:
                where = f" (entry {position} of {len(entries)})" if len(entries) > 1 else ""
                raise SettingsError(f"{self.PREFIX}{name}{where}: {error}") from None
        return tuple(tokens)


TOKEN_SCOPES = frozenset({"app", "admin"})


def token_entry(entry: str, earlier: Sequence[TokenSetting] = ()) -> TokenSetting:
    """One `name:scope+scope:sha256hex` entry of TWOFACTOR_TOKENS; a ValueError says what is wrong.

    Two entries of one name are a rotation (README): both tokens act as that caller. One token in
    two entries that disagree is refused: it would act, and be audited, as whichever came last."""
    parts = entry.strip().split(":")
    if len(parts) != 3:
        # Not quoted: the likeliest entry of no two colons is a token pasted in its entry's place.
        raise ValueError(
            "an entry is not name:scopes:sha256hex (the `TWOFACTOR_TOKENS entry:` line of "
            "`twofactor token`, not the token itself)"
        )
    token_name, scopes, digest = parts
    try:
        sha256 = bytes.fromhex(digest)
    except ValueError:
        sha256 = b""
    scope_set = frozenset(s for s in scopes.split("+") if s)
    if len(sha256) != 32 or not token_name or not scope_set <= TOKEN_SCOPES or not scope_set:
        raise ValueError(
            f"entry for {token_name!r} needs scopes from app+admin and a 64-hex-digit SHA-256 digest"
        )
    token = TokenSetting(token_name, scope_set, sha256)
    for position, other in enumerate(earlier, 1):
        if other.sha256 == sha256 and other != token:
            raise ValueError(
                f"entry {token_name!r} holds the same token as entry {position} ({other.name!r}) with "
                "another name or scopes: remove one of them, or give one a new token "
                "(`twofactor token NAME SCOPES`)"
            )
    return token


def new_token_entry(name: str, scopes: str, sha256hex: str) -> str:
    """The TWOFACTOR_TOKENS entry for a new token (`twofactor token NAME SCOPES`), read as the
    setting reads it: a SettingsError when the server would refuse it or read another name."""
    if not name or set(name) & {",", ":"} or name != name.strip() or _CONTROL.search(name):
        raise SettingsError(f"a token name has no ',' or ':' and no space at either end, got {name!r}")
    entry = f"{name}:{scopes}:{sha256hex}"
    try:
        if "," in scopes or _CONTROL.search(scopes):
            raise ValueError(scopes)  # another entry, or a value the setting refuses as a whole
        token_entry(entry)
    except ValueError:
        raise SettingsError(f"scopes must be app, admin or app+admin, got {scopes!r}") from None
    return entry


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SENDER_LOCAL = re.compile(rf"{_ATOM}(\.{_ATOM})*", re.ASCII)
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"  # _ too: internal hosts have it
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?", re.ASCII)  # a trailing dot: a rooted name
ADDRESS = r"(\[[0-9a-f:.]+\]|[^:\[\]\s]*):\d{1,5}"  # host:port, [ipv6]:port, or :port


_PASSWORD_KEYS = ("password", "sslpassword")  # libpq's; redis-py reads `password` too
_QUERY_PARAMETER = re.compile(r"([?&])([^=&#]*)=([^&#]*)")
_CONNINFO_PASSWORD = re.compile(r"\b((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def _redis_url_problem(url: str) -> str:
    """What makes `url` unreadable as redis-py and kombu read it ('' when nothing does)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL": a [ or ] in the password
        return "a [ or ] outside an IPv6 host"
    try:
        port = parts.port
    except ValueError:
        return "its port is not a number from 0 to 65535"
    if not parts.hostname:
        return "it names no host"
    if port == 0:
        return "its port is 0"
    if not re.fullmatch(r"/?\d*|//", parts.path):  # kombu reads // (AMQP's default vhost) as 0
        return "the path after the host must be the database number, as in redis://host:6379/0"
    return ""


def mask_url(url: str) -> str:
    """The value with every password in it replaced by ****: a URL's user:password@ part and its
    password= query parameters, or the password= keywords of a libpq `key=value` string."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _CONNINFO_PASSWORD.sub(r"\1****", url)
    at = _end_of_userinfo(rest)
    if at >= 0 and ":" in rest[:at]:
        rest = rest[:at].partition(":")[0] + ":****" + rest[at:]
    return scheme + sep + _QUERY_PARAMETER.sub(_masked_parameter, rest)


def _end_of_userinfo(rest: str) -> int:
    """Where the user part of `rest` (a URL after ://) ends: its last @, as a password pasted with
    an unencoded @ (or / or ?) would otherwise show its tail; -1 for none. An @ in a query value
    (after ?, past an =) is not one."""
    at = rest.rfind("@")
    query = rest.find("?")
    if 0 <= query < at and "=" in rest[query:at]:
        at = rest.rfind("@", 0, query)
    return at


def _masked_parameter(match: re.Match[str]) -> str:
    if urllib.parse.unquote(match[2]).strip().lower() in _PASSWORD_KEYS:
        return f"{match[1]}{match[2]}=****"
    return match[0]
