"""`python -m twofactor_workers` (what `twofactor worker` runs): a Celery delivery worker."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

import click

from twofactor_server.delivery.providers import ProviderConfigError, build_email_sender, build_sms_sender
from twofactor_server.settings import Settings, SettingsError, unknown_variables

if TYPE_CHECKING:
    from celery import Celery


def require_readable_store(settings: Settings) -> None:
    """Refuse to start when stored codes need a key version this worker's keyring lacks
    (checked when the database answers at start; a worker started during an outage waits)."""
    from twofactor_server.app import load_keyring, prepare_schema, require_keys_of_database
    from twofactor_server.storage.database import open_database

    keyring = load_keyring(settings)
    db = open_database(
        settings.database_url,
        data_dir=settings.data_dir,
        pool_size=1,
        timeout=settings.storage_timeout_seconds,
    )
    try:
        prepare_schema(db, settings)  # as the server does at start; safe with several processes
        require_keys_of_database(db, keyring, settings)
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
    parser.add_argument("--hostname", help="the worker's node name (default: celery@<hostname>)")
    parser.add_argument("celery_options", nargs="*", help="after --: options of `celery worker`")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    finally:
        from twofactor_server.observability.metrics import remove_multiprocess_dir

        # `twofactor worker` made it before the exec: gone however the worker ends (exit 2 too).
        remove_multiprocess_dir()


def _run(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
        if not settings.broker_url:
            raise SettingsError("TWOFACTOR_BROKER_URL is required to run a worker")
        from twofactor_server.app import load_keyring

        load_keyring(settings)  # refuse to start with keys that don't parse
        try:  # refuse to start with a provider that can't load
            build_email_sender(settings)
            build_sms_sender(settings)
        except ProviderConfigError as error:
            raise SettingsError(str(error)) from None
        require_readable_store(settings)
    except SettingsError as error:
        print(f"twofactor: configuration error: {error}", file=sys.stderr)
        return 2
    from twofactor_server.observability import logs, metrics
    from twofactor_workers import observability

    log_format = settings.log_format or logs.default_format(sys.stderr)
    logs.configure_logging(settings.log_level, log_format)
    observability.install(settings, log_format)
    for name in unknown_variables():
        logging.getLogger(__name__).warning("%s is not a twofactor setting and is ignored (a typo?)", name)
    if settings.metrics_listen:
        if not metrics.multiprocess_enabled():
            print(
                "twofactor: configuration error: TWOFACTOR_METRICS_LISTEN needs prometheus_client's "
                "multiprocess mode: start workers with `twofactor worker` (or set PROMETHEUS_MULTIPROC_DIR)",
                file=sys.stderr,
            )
            return 2
        try:
            endpoint = metrics.serve_metrics(settings.metrics_listen, multiprocess=True)
        except (OSError, ValueError) as error:
            print(f"twofactor: configuration error: TWOFACTOR_METRICS_LISTEN: {error}", file=sys.stderr)
            return 2
        logging.getLogger(__name__).info("metrics on %s:%d/metrics", endpoint.host, endpoint.port)
    from twofactor_server.periodic import Periodic

    # Retention runs here too, so a fleet of workers alone keeps the tables trimmed.
    Periodic("retention", settings.retention_interval_seconds, lambda: run_retention(settings)).start()
    from twofactor_workers.celery_app import app

    # `celery [--quiet] worker ...`: with JSON logs, no banner, so every line is a JSON record.
    return run_celery(
        app,
        [
            *(["--quiet"] if log_format == "json" else []),
            "worker",
            f"--queues={settings.delivery_queue}",
            f"--concurrency={args.concurrency}",
            f"--loglevel={args.loglevel}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *([f"--hostname={args.hostname}"] if args.hostname else []),
            *args.celery_options,
        ],
    )


def run_celery(app: Celery, argv: list[str]) -> int:
    """`celery <argv>` on `app`, as Celery.start runs it, with the exit status kept: Celery.start
    drops it (a worker that could not start, say its pidfile is taken, exited 0, and a service
    manager restarting on failure never did). An option mistyped after `--` is click's message
    and usage line, exit 2, not a traceback."""
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app  # the --app option, as Celery.start sets it
    try:
        # prog_name: the usage line names `celery worker`, whose --help lists the options `--` takes.
        status = celery_command.main(args=argv, prog_name="celery", standalone_mode=False)
    except click.exceptions.Exit as exit_:
        status = exit_.exit_code
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.exceptions.Abort:
        return 1
    finally:
        celery_command.params[0].default = None
    return status if isinstance(status, int) else 0


def run_retention(settings: Settings) -> None:
    """One retention run on a connection of its own (opened and closed here: the pool forks)."""
    from twofactor_server.domain.clock import system_clock
    from twofactor_server.storage.database import open_database
    from twofactor_server.usecases.retention import Retention

    db = open_database(
        settings.database_url,
        data_dir=settings.data_dir,
        pool_size=1,
        timeout=settings.storage_timeout_seconds,
    )
    try:
        Retention(db, settings.audit_retention_days, system_clock).run_once()
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
