"""The site's configuration: the only module that reads the environment.

WEB_* variables, so they can't be mistaken for the server's TWOFACTOR_* ones.
Without WEB_APP_TOKEN / WEB_ADMIN_TOKEN the site uses the development tokens
that `make serve` (the embedded default) wrote to .twofactor/dev-secrets.json.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class SettingsError(ValueError):
    """A setting is missing or malformed; the site refuses to start."""


@dataclass(frozen=True)
class SiteSettings:
    twofactor_target: str = "127.0.0.1:50051"
    app_token: str = ""  # scope `app`: TwoFactorService
    admin_token: str = ""  # scope `admin`: AdminService, for the admin page
    # Signs the session cookie. A random one (the default) logs everybody out at restart.
    secret_key: str = ""
    listen: str = "127.0.0.1:8000"
    # Mark the session cookie Secure. Turn on behind HTTPS; off so http://127.0.0.1 works.
    secure_cookies: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SiteSettings:
        env = os.environ if env is None else env
        dev_secrets = Path(env.get("WEB_DEV_SECRETS", ".twofactor/dev-secrets.json"))
        app_token = env.get("WEB_APP_TOKEN", "")
        admin_token = env.get("WEB_ADMIN_TOKEN", "")
        if not (app_token and admin_token):
            dev = _read_dev_secrets(dev_secrets)
            app_token = app_token or dev["app_token"]
            admin_token = admin_token or dev["admin_token"]
        return cls(
            twofactor_target=env.get("WEB_TWOFACTOR_TARGET", cls.twofactor_target),
            app_token=app_token,
            admin_token=admin_token,
            secret_key=env.get("WEB_SECRET_KEY", "") or secrets.token_urlsafe(32),
            listen=env.get("WEB_LISTEN", cls.listen),
            secure_cookies=env.get("WEB_SECURE_COOKIES", "false").lower() == "true",
        )


def _read_dev_secrets(path: Path) -> dict[str, str]:
    try:
        values = json.loads(path.read_text())
        return {"app_token": str(values["app_token"]), "admin_token": str(values["admin_token"])}
    except (OSError, ValueError, KeyError) as error:
        raise SettingsError(
            f"no WEB_APP_TOKEN/WEB_ADMIN_TOKEN and no development tokens in {path} ({error}): "
            "start `make serve` first, or set the variables"
        ) from None
