"""Typed reading of TWOFACTOR_* values from a given environment mapping, with messages that name
the variable; settings.py says which settings exist and passes the environment in."""

from __future__ import annotations

import re
from collections.abc import Mapping
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

    def matching(self, name: str, default: str, kind: str, pattern: str, wanted: str) -> str:
        value = self.text(name, default, kind)
        if value != default and not re.fullmatch(pattern, value, re.IGNORECASE):
            raise SettingsError(f"{self.PREFIX}{name} must be {wanted}, got {mask_url(value)!r}")
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

    def float(self, name: str, default: float) -> float:
        value = self._raw(name, "float", default)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"{self.PREFIX}{name} must be a number, got {value!r}") from None
        if number <= 0:
            raise SettingsError(f"{self.PREFIX}{name} must be positive, got {value!r}")
        return number

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
        if unknown:
            raise SettingsError(
                f"{self.PREFIX}{name} must list ISO 3166 country codes like US,CA,GB; "
                f"unknown: {', '.join(unknown)}"
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
        tokens = []
        for entry in value.split(","):
            parts = entry.strip().split(":")
            if len(parts) != 3:
                raise SettingsError(
                    f"{self.PREFIX}{name}: entry {entry.strip()!r} is not name:scopes:sha256hex"
                )
            token_name, scopes, digest = parts
            try:
                sha256 = bytes.fromhex(digest)
            except ValueError:
                sha256 = b""
            scope_set = frozenset(s for s in scopes.split("+") if s)
            if len(sha256) != 32 or not token_name or not scope_set <= {"app", "admin"} or not scope_set:
                raise SettingsError(
                    f"{self.PREFIX}{name}: entry for {token_name!r} needs scopes from app+admin "
                    "and a 64-hex-digit SHA-256 digest"
                )
            tokens.append(TokenSetting(token_name, scope_set, sha256))
        return tuple(tokens)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ADDRESS = r"(\[[0-9a-f:.]+\]|[^:\[\]\s]*):\d{1,5}"  # host:port, [ipv6]:port, or :port


def mask_url(url: str) -> str:
    """The URL with the password of its user part replaced by ****."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1****@", url)
