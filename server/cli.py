"""The `twofactor` command: serve, migrate, worker, worker-health, health, config, demo, code, keygen,
token, keys."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from twofactor_server import key_commands
from twofactor_server.domain.errors import TwoFactorError
from twofactor_server.domain.keyring import MAX_VERSION
from twofactor_server.settings import Settings, SettingsError, effective_configuration, unknown_variables
from twofactor_server.usecases.key_rotation import MAX_BATCH_SIZE

log = logging.getLogger("twofactor_server.cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twofactor", description="Two-factor verification service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_command = commands.add_parser(
        "serve", help="run the gRPC server (configured by TWOFACTOR_* variables)"
    )
    serve_command.add_argument(
        "--processes",
        default="1",
        help="server processes sharing the port (SO_REUSEPORT); 'auto' is the CPU count (default 1)",
    )
    # Set by the supervisor of --processes for its children: listen here, in the port's group.
    serve_command.add_argument("--supervised-listen", help=argparse.SUPPRESS)
    commands.add_parser("migrate", help="apply database migrations and exit")
    worker = commands.add_parser("worker", help="run a Celery delivery worker (needs TWOFACTOR_BROKER_URL)")
    worker.add_argument("--concurrency", type=int, default=2)
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--hostname", help="the worker's node name (Celery's default: celery@<hostname>)")
    worker.add_argument(
        "celery_options", nargs="*", metavar="-- CELERY_OPTION", help="after --: options of `celery worker`"
    )
    worker_health = commands.add_parser(
        "worker-health", help="ping this host's delivery worker over the broker; exit 0 when it answers"
    )
    worker_health.add_argument("--name", help="the worker's node name (default: celery@<hostname>)")
    worker_health.add_argument("--timeout", type=float, default=5.0)
    demo = commands.add_parser("demo", help="enroll a user in the authenticator app against a running server")
    demo.add_argument("--target", default="localhost:50051")
    demo.add_argument(
        "--token", help="an app-scope token (default: the embedded default's development token)"
    )
    demo.add_argument("--user", default="alice")
    code = commands.add_parser(
        "code", help="print the code an authenticator app shows for a secret (for trying the API by hand)"
    )
    code.add_argument("--secret", required=True, help="the base32 secret StartEnrollment returned")
    code.add_argument(
        "--next", action="store_true", help="the next time step's code (Verify accepts one step of drift)"
    )
    keygen = commands.add_parser("keygen", help="print a new TWOFACTOR_KEYS entry")
    keygen.add_argument("--version", type=_key_version, default=1, help="the key's version (default 1)")
    token = commands.add_parser("token", help="print a new API token and its TWOFACTOR_TOKENS entry")
    token.add_argument("name")
    token.add_argument("scopes", help="app, admin or app+admin")
    commands.add_parser("config", help="print the effective configuration, secrets masked")
    health = commands.add_parser(
        "health", help="ask a server's gRPC health service; exit 0 when SERVING, 1 otherwise"
    )
    health.add_argument("--target", help="HOST:PORT (default: TWOFACTOR_LISTEN)")
    health.add_argument("--service", default="", help='the health service name (default "": the server)')
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    health.add_argument("--ca-file", default="", help="CA to trust (default: TWOFACTOR_TLS_CERT_FILE)")
    health.add_argument("--cert", default="", help="client certificate, when the server requires one")
    health.add_argument("--key", default="", help="the client certificate's key")
    keys = commands.add_parser("keys", help="see and rotate the keys stored values are encrypted under")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    status = keys_commands.add_parser("status", help="how many stored values use each key version")
    status.add_argument("--json", action="store_true", help="print JSON")
    rotate = keys_commands.add_parser(
        "rotate", help="re-encrypt every secret and backup code under the active key"
    )
    rotate.add_argument(
        "--batch-size",
        type=_batch_size,
        default=500,
        help=f"rows per transaction, 1 to {MAX_BATCH_SIZE} (default 500)",
    )
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
        # A child of `serve --processes` leaves the warnings about unknown variables to its supervisor.
        configure_logging(settings, warn_unknown=not getattr(args, "supervised_listen", None))
        if args.command == "config":
            for name, value in effective_configuration():
                print(f"{name}={value}")
            return 0
        if args.command == "health":
            from twofactor_server.health_probe import TlsOptions, probe

            tls = TlsOptions(ca_file=args.ca_file, cert_file=args.cert, key_file=args.key)
            return probe(settings, target=args.target, service=args.service, timeout=args.timeout, tls=tls)
        if args.command == "serve":
            if args.supervised_listen:
                # A child: its supervisor serves the one /metrics of all children (multiprocess mode).
                child = dataclasses.replace(settings, listen=args.supervised_listen, metrics_listen="")
                return serve(child, reuse_port=True, supervised=True)
            from twofactor_server.supervisor import process_count, supervise

            processes = process_count(args.processes)
            return serve(settings) if processes == 1 else supervise(settings, processes)
        if args.command == "migrate":
            from twofactor_server.app import require_usable_data_dir
            from twofactor_server.storage.database import open_database

            require_usable_data_dir(settings)  # the embedded database lives there
            db = open_database(settings.database_url, data_dir=settings.data_dir)
            applied = db.migrate()
            db.close()
            print(f"applied: {', '.join(applied) or 'nothing, already up to date'}")
            return 0
        if args.command == "worker":
            return run_worker(args.concurrency, args.loglevel, args.hostname, args.celery_options)
        if args.command == "worker-health":
            options = [f"--timeout={args.timeout}", *([f"--name={args.name}"] if args.name else [])]
            return exec_module("twofactor_workers.health", options)
        if args.command == "demo":
            from twofactor_server.demo import run_demo

            return run_demo(
                target=args.target, token=args.token, user_id=args.user, data_dir=settings.data_dir
            )
        if args.command == "code":
            return print_code(args.secret, next_step=args.next)
        if args.command == "keygen":
            return key_commands.print_new_key(args.version)
        if args.command == "token":
            return key_commands.print_new_token(args.name, args.scopes)
        if args.command == "keys" and args.keys_command == "status":
            return key_commands.key_status(settings, as_json=args.json)
        if args.command == "keys" and args.keys_command == "rotate":
            return key_commands.rotate_keys(settings, batch_size=args.batch_size)
    except SettingsError as error:
        print(f"twofactor: configuration error: {error}", file=sys.stderr)
        return 2
    except TwoFactorError as error:  # the database can't be reached, say
        print(f"twofactor: {error.message}", file=sys.stderr)
        return 1
    return 1


def configure_logging(settings: Settings, *, warn_unknown: bool = True) -> None:
    """Logs as the settings say, and a warning for each TWOFACTOR_* variable no setting reads."""
    from twofactor_server.observability import logs

    log_format = settings.log_format or logs.default_format(sys.stderr)
    logs.configure_logging(settings.log_level, log_format)
    for name in unknown_variables() if warn_unknown else ():
        log.warning("%s is not a twofactor setting and is ignored (a typo?)", name)


def _whole_number(what: str, most: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to `most`, or a line naming `what`."""

    def parse(text: str) -> int:
        if not text.isdigit() or not 0 < int(text) <= most:
            raise argparse.ArgumentTypeError(f"{what} is a whole number from 1 to {most}")
        return int(text)

    return parse


_key_version = _whole_number("a key version", MAX_VERSION)
_batch_size = _whole_number("a batch size", MAX_BATCH_SIZE)


def serve(settings: Settings, *, reuse_port: bool = False, supervised: bool = False) -> int:
    from twofactor_server.app import create_server, dev_tokens
    from twofactor_server.delivery.providers import ProviderConfigError

    # Before the server is made: a stop asked for while it starts (migrations may take a while)
    # drains it once it has started, rather than killing it half made.
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if supervised:
        threading.Thread(target=_stop_when_the_supervisor_is_gone, args=(stopping,), daemon=True).start()
    try:
        server, port = create_server(settings, reuse_port=reuse_port)
    except ProviderConfigError as error:
        raise SettingsError(str(error)) from None
    server.start()
    host = settings.listen.rpartition(":")[0] or "0.0.0.0"  # noqa: S104 - only used in the message
    storage = "embedded SQLite in " + str(settings.data_dir) if settings.embedded else "PostgreSQL"
    print(f"twofactor listening on {host}:{port} ({storage})", flush=True)
    if settings.embedded and not settings.tokens:
        tokens = dev_tokens(settings)
        print(
            "development tokens (embedded default only):\n"
            f"  app:   {tokens['app']}\n  admin: {tokens['admin']}",
            flush=True,
        )
    stopping.wait()
    with contextlib.suppress(OSError):
        print("draining in-flight calls", flush=True)
    server.stop(settings.grace_seconds)
    with contextlib.suppress(OSError):
        print("stopped", flush=True)
    return 0


def _stop_when_the_supervisor_is_gone(stopping: threading.Event) -> None:
    """A child's stdin is a pipe from its supervisor: end of file means the supervisor is gone
    (killed with SIGKILL, say). The child then drains and stops, rather than keep serving the
    port as an orphan that the next `twofactor serve` finds taken."""
    # os.read, not sys.stdin: a daemon thread blocked in the buffered reader holds its lock, and
    # the interpreter aborts at exit when it can't take it.
    while os.read(0, 4096):
        pass
    # Standard output was a pipe to the supervisor, read by nobody now: what the child still
    # prints (draining, stopped) goes where its log lines go.
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    if not stopping.is_set():
        stopping.set()  # first: a line nobody reads (a closed pipe) must not keep the child serving
        with contextlib.suppress(OSError):
            print("twofactor: the supervisor is gone; draining in-flight calls and stopping", file=sys.stderr)


def print_code(secret_base32: str, *, next_step: bool) -> int:
    import binascii
    import time

    from twofactor_server.domain import totp

    try:
        secret = totp.from_base32(secret_base32)
    except (binascii.Error, ValueError):
        print("twofactor code: --secret is not base32 text (copy it from StartEnrollment)", file=sys.stderr)
        return 2
    if len(secret) < totp.SECRET_BYTES:
        print(
            f"twofactor code: --secret is {len(secret) * 8} bits; twofactor's secrets are "
            f"{totp.SECRET_BYTES * 8} (copy the whole secret from StartEnrollment)",
            file=sys.stderr,
        )
        return 2
    print(totp.code_at_step(secret, totp.time_step(time.time()) + (1 if next_step else 0)))
    return 0


def run_worker(
    concurrency: int, loglevel: str, hostname: str | None = None, celery_options: list[str] | None = None
) -> int:
    """Become a delivery worker: the worker package runs Celery; the server package never imports it."""
    if Settings.from_env().metrics_listen:
        from twofactor_server.observability.metrics import prepare_multiprocess_dir

        prepare_multiprocess_dir()  # pool processes add up in one /metrics (prometheus_client's mode)
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [
        sys.executable,
        "-m",
        "twofactor_workers",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        *([f"--hostname={hostname}"] if hostname else []),
        *(["--", *celery_options] if celery_options else []),
    ]
    os.execv(sys.executable, argv)  # noqa: S606 - same process id: signals and supervisors reach the worker itself


def exec_module(module: str, options: list[str]) -> int:
    """Become `python -m module options...` (the server package never imports the worker package)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *options])  # noqa: S606
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
