"""`twofactor worker-health`: ask a delivery worker over the broker whether it is alive (Celery's ping).

Exit status 0 when the worker answered, 1 when it did not (or the broker can't be
reached), 2 on a configuration error. By default it asks the worker of this host
(`celery@<hostname>`, Celery's default name), which is what a container probe wants.
"""

from __future__ import annotations

import argparse
import socket
import sys

from twofactor_server.observability import logs
from twofactor_server.setting_values import mask_url
from twofactor_server.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twofactor worker-health")
    parser.add_argument("--name", default=f"celery@{socket.gethostname()}", help="the worker's node name")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if not settings.broker_url:
            raise SettingsError("TWOFACTOR_BROKER_URL is required to reach a worker")
    except SettingsError as error:
        print(f"twofactor: configuration error: {error}", file=sys.stderr)
        return 2
    from twofactor_workers.celery_app import app

    try:
        answers = app.control.ping(destination=[args.name], timeout=args.timeout)
    except Exception as error:  # kombu/redis raise many types for "broker unreachable"
        # What Redis or the socket said ("Connection refused", "invalid username-password pair"):
        # a wrong password must not read as a network fault. Neither quotes the URL's password.
        detail = logs.said(error)
        print(
            f"twofactor worker-health: the broker at {mask_url(settings.broker_url)} can't be reached "
            f"({type(error).__name__}: {detail}); check that Redis is running and TWOFACTOR_BROKER_URL",
            file=sys.stderr,
        )
        return 1
    if any(args.name in answer for answer in answers):
        print(f"{args.name}: ok")
        return 0
    print(f"twofactor worker-health: {args.name} did not answer within {args.timeout:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
