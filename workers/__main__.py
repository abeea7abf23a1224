"""`python -m twofactor_workers` (what `twofactor worker` runs): a Celery delivery worker."""

from __future__ import annotations

import argparse
import logging
import sys

from twofactor_server.delivery.providers import ProviderConfigError, build_email_sender, build_sms_sender
from twofactor_server.settings import Settings, SettingsError


def require_readable_store(settings: Settings) -> None:
    """Refuse to start when stored codes need a key version this worker's keyring lacks
    (checked when the database answers at start; a worker started during an outage waits)."""
    from twofactor_server.app import load_keyring
    from twofactor_server.storage.database import open_database
    from twofactor_server.usecases.key_rotation import require_keys_for_stored_values

    keyring = load_keyring(settings)
    db = open_database(
        settings.database_url,
        data_dir=settings.data_dir,
        pool_size=1,
        timeout=settings.storage_timeout_seconds,
    )
    try:
        db.migrate()  # as the server does at start; safe with several processes
        require_keys_for_stored_values(db, keyring)
    except SettingsError:
        raise
    except Exception as error:  # the database can't be reached: one line, no traceback
        # Start anyway: the worker takes no task until its storage answers (storage_pause.py),
        # and a stored value under a missing key then fails that delivery with its reason.
        print(
            f"twofactor worker: can't check which key versions stored values use yet "
            f"({type(error).__name__}); starting, and taking no task until the database answers",
            file=sys.stderr,
        )
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twofactor worker", description="Run a Celery delivery worker")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if not settings.broker_url:
            raise SettingsError("TWOFACTOR_BROKER_URL is required to run a worker")
        try:  # refuse to start with a provider that can't load
            build_email_sender(settings)
            build_sms_sender(settings)
        except ProviderConfigError as error:
            raise SettingsError(str(error)) from None
        require_readable_store(settings)
    except SettingsError as error:
        print(f"twofactor: configuration error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from twofactor_workers.celery_app import app

    app.worker_main(
        [
            "worker",
            f"--queues={settings.delivery_queue}",
            f"--concurrency={args.concurrency}",
            f"--loglevel={args.loglevel}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
