"""What `twofactor config` shows and which variables are typos: the settings read from a given
environment, recorded as they are read (settings.py passes the process environment in)."""

from __future__ import annotations

from collections.abc import Mapping

from twofactor_server.setting_values import EnvValues, mask_url
from twofactor_server.settings import Settings

# Shown as **** by `twofactor config`; URLs show everything but their password.
SECRET_SETTINGS = frozenset({"TWOFACTOR_KEYS", "TWOFACTOR_SMTP_PASSWORD"})


def setting_kinds() -> dict[str, str]:
    """Every TWOFACTOR_* variable the settings read, and how it is parsed (for tests and docs)."""
    Settings._read(env := EnvValues({}))
    return dict(env.kinds)


def unknown_in(environ: Mapping[str, str]) -> list[str]:
    known = setting_kinds()
    return sorted(n for n in environ if n.startswith("TWOFACTOR_") and n not in known)


def effective_in(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Raises SettingsError like Settings.from_env."""
    env = EnvValues(environ)
    Settings._read(env)
    return [
        (name, "****" if name in SECRET_SETTINGS and value else mask_url(value))
        for name, value in sorted(env.values.items())
    ]
