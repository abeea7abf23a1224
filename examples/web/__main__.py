"""`python -m examples.web` (or `make web`): serve the site on WEB_LISTEN (127.0.0.1:8000).

Flask's development server, for trying the site out beside `make serve`. A
deployment runs `create_app(SiteSettings.from_env())` under a WSGI server
(gunicorn, uWSGI, ...) behind HTTPS, with WEB_SECRET_KEY and WEB_SECURE_COOKIES=true.
"""

from __future__ import annotations

import sys

from .app import create_app
from .settings import SettingsError, SiteSettings


def main() -> int:
    try:
        settings = SiteSettings.from_env()
    except SettingsError as error:
        print(f"examples.web: {error}", file=sys.stderr)
        return 2
    host, _, port = settings.listen.rpartition(":")
    print(f"Example site on http://{settings.listen} (twofactor at {settings.twofactor_target})", flush=True)
    create_app(settings).run(host=host, port=int(port), debug=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
