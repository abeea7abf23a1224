"""The one wiring point: build every component from Settings and start the gRPC server."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twofactor.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    twofactor_service_pb2,
    twofactor_service_pb2_grpc,
)

from twofactor_server.api import reflection
from twofactor_server.api.admin_servicer import AdminServicer
from twofactor_server.api.interceptors import ApiInterceptor
from twofactor_server.api.monitoring import MonitoringInterceptor
from twofactor_server.api.twofactor_servicer import TwoFactorServicer
from twofactor_server.delivery.broker_health import CHECK_INTERVAL_SECONDS, BrokerHealth
from twofactor_server.delivery.dispatch import build_dispatcher, build_senders
from twofactor_server.domain.clock import Clock, system_clock
from twofactor_server.domain.keyring import Keyring, KeyringError
from twofactor_server.health import HealthServicer, StorageHealth
from twofactor_server.observability.metrics import serve_metrics
from twofactor_server.periodic import Periodic
from twofactor_server.settings import Settings, SettingsError, TokenSetting, check_keys
from twofactor_server.storage.database import Database, open_database
from twofactor_server.storage.deadlines import HandlerPool
from twofactor_server.storage.refusals import pending_migrations_at_start
from twofactor_server.tls import server_credentials
from twofactor_server.usecases.admin import Admin
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import Challenges, Dispatcher
from twofactor_server.usecases.enrollment import Enrollment
from twofactor_server.usecases.key_rotation import require_keys_for_stored_values
from twofactor_server.usecases.notices import Notices
from twofactor_server.usecases.profiles import UserProfiles
from twofactor_server.usecases.retention import Retention
from twofactor_server.usecases.verification import Verification

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    twofactor_service_pb2.DESCRIPTOR.services_by_name["TwoFactorService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)
# The largest request a twofactor RPC takes at its fields' limits is a few kilobytes. gRPC's default
# (4 MiB) let a caller with no token make the server read and hold 4 MiB per call before the token
# was looked at (a thousand calls at once: 1.6 GB); past this, a call is refused at its first bytes.
MAX_REQUEST_BYTES = 64 * 1024


@dataclass
class TwoFactorServer:
    """A started-or-startable gRPC server and the resources it owns."""

    grpc_server: grpc.Server
    db: Database
    health: HealthServicer
    storage_health: StorageHealth
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    metrics_port: int = 0  # the /metrics port when TWOFACTOR_METRICS_LISTEN is set

    def start(self) -> None:
        self.grpc_server.start()
        self.storage_health.start()  # SERVING, then NOT_SERVING whenever the database does not answer

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within `grace`, then release resources."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        self.storage_health.stop()
        for close in self.on_stop:
            close()
        self.db.close()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def create_server(
    settings: Settings,
    *,
    clock: Clock = system_clock,
    dispatcher: Dispatcher | None = None,
    reuse_port: bool = False,
) -> tuple[TwoFactorServer, int]:
    """Build the server from settings and bind it; returns it unstarted with its port (0 picks one).

    reuse_port joins the port's SO_REUSEPORT group: only for the children of
    `serve --processes`, whose supervisor holds the port (server/supervisor.py).
    """
    require_usable_data_dir(settings)
    keyring = load_keyring(settings)
    tokens = load_tokens(settings)
    credentials = server_credentials(settings)
    # A provider setting that can't work stops the start before the database is opened: a
    # deploy with a wrong setting migrates nothing.
    senders = build_senders(settings) if dispatcher is None else None
    db = open_database(
        settings.database_url,
        data_dir=settings.data_dir,
        pool_size=settings.database_pool_size,
        timeout=settings.storage_timeout_seconds,
    )
    on_stop: list[Callable[[], None]] = []
    try:
        prepare_schema(db, settings)
        require_keys_of_database(db, keyring, settings, clock)
        if dispatcher is None:
            dispatcher, close = build_dispatcher(
                settings, db=db, keyring=keyring, clock=clock, senders=senders
            )
            on_stop.append(close)
        policy = settings.policy
        challenges = Challenges(db, keyring, policy, dispatcher, clock)
        notices = Notices(db, keyring, policy, dispatcher, clock)
        backup_codes = BackupCodes(db, keyring, policy, notices, clock)
        twofactor_servicer = TwoFactorServicer(
            profiles=UserProfiles(db, keyring, policy, challenges, notices, clock),
            enrollment=Enrollment(db, keyring, policy, challenges, backup_codes, notices, clock),
            challenges=challenges,
            verification=Verification(db, keyring, policy, challenges, backup_codes, notices, clock),
            backup_codes=backup_codes,
            policy=policy,
        )
        admin = Admin(db, policy, notices, clock)

        grpc_server = grpc.server(
            HandlerPool(max_workers=settings.max_workers, thread_name_prefix="rpc"),
            # A stream holds a handler thread while open: a quarter of them at most (one at least).
            interceptors=[MonitoringInterceptor(max(1, settings.max_workers // 4)), ApiInterceptor(tokens)],
            options=[
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                # BDP probing grows each stream's receive window to megabytes, which a caller fills
                # before the size check refuses its call: requests are small, the default 64 KiB do.
                ("grpc.http2.bdp_probe", 0),
            ],
        )
        twofactor_service_pb2_grpc.add_TwoFactorServiceServicer_to_server(twofactor_servicer, grpc_server)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(admin, settings.policy), grpc_server
        )
        health_servicer = HealthServicer(settings.max_workers)
        on_stop.append(health_servicer.close)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            grpc_server,
        )
        port = _bind(grpc_server, settings.listen, credentials)
        metrics_port = _serve_metrics(settings.metrics_listen, on_stop)
        retention = Periodic(
            "retention",
            settings.retention_interval_seconds,
            Retention(db, settings.audit_retention_days, clock).run_once,
        )
        retention.start()
        on_stop.append(retention.stop)
        broker = BrokerHealth(settings, health_servicer)
        broker.check()
        if settings.broker_url:
            broker_checks = Periodic("broker-health", CHECK_INTERVAL_SECONDS, broker.check)
            broker_checks.start()
            on_stop.append(broker_checks.stop)
    except BaseException:
        # A server that fails to start releases what it opened.
        for close in on_stop:
            close()
        db.close()
        raise
    storage_health = StorageHealth(db, health_servicer, SERVICE_NAMES, settings.storage_probe_seconds)
    return TwoFactorServer(grpc_server, db, health_servicer, storage_health, on_stop, metrics_port), port


def prepare_schema(db: Database, settings: Settings) -> None:
    """At the start of a server or worker: apply the migrations, or with TWOFACTOR_MIGRATE_ON_START
    =false (a fleet's migrate job does it, once, before the rollout) refuse a database behind."""
    if settings.migrate_on_start:
        db.migrate()
    elif pending := pending_migrations_at_start(db, settings.database_url, settings.storage_timeout_seconds):
        raise SettingsError(
            f"the database lacks migrations {', '.join(pending)}: run `twofactor migrate` first "
            "(TWOFACTOR_MIGRATE_ON_START is false)"
        )


def _serve_metrics(listen: str, on_stop: list[Callable[[], None]]) -> int:
    """Start /metrics on `listen` (empty: none); returns its port, 0 for none."""
    if not listen:
        return 0
    try:
        endpoint = serve_metrics(listen)
    except (OSError, ValueError) as error:
        raise SettingsError(
            f"TWOFACTOR_METRICS_LISTEN: could not serve metrics on {listen} ({error})"
        ) from None
    on_stop.append(endpoint.close)
    log.info("metrics on http://%s:%d/metrics", endpoint.host or "0.0.0.0", endpoint.port)  # noqa: S104
    return endpoint.port


def _bind(grpc_server: grpc.Server, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    host, _, port_text = listen.rpartition(":")
    # gRPC wants a host: none (":50051") means every interface, as for the supervisor and /metrics.
    address = f"{host or '0.0.0.0'}:{port_text}"  # noqa: S104 - the documented meaning of ":port"
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(address)
        else:
            port = grpc_server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio's "Failed to bind"
        port = 0
    if port == 0:
        raise SettingsError(f"could not listen on {listen} ({_bind_failure(host, int(port_text))})")
    return port


def _bind_failure(host: str, port: int) -> str:
    """Why the address can't be bound, found with a plain socket: gRPC only says that it failed."""
    try:
        found = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in found:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind(address)
    except socket.gaierror:
        return f"the host {host} does not resolve"
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return f"port {port} is already in use"
        if error.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an address of this machine"
        if error.errno == errno.EACCES:
            return f"permission denied: port {port} needs privileges"
        return f"{error.strerror or error}"
    return "address in use or not valid"


def require_usable_data_dir(settings: Settings) -> None:
    """The embedded default keeps its database and development secrets in TWOFACTOR_DATA_DIR."""
    if not settings.embedded:
        return
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise SettingsError(f"TWOFACTOR_DATA_DIR: {settings.data_dir} is a file, not a directory")
    try:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # holds the database and dev keys
    except OSError as error:
        raise SettingsError(
            f"TWOFACTOR_DATA_DIR: cannot create {settings.data_dir} ({error.strerror})"
        ) from None
    if not os.access(settings.data_dir, os.W_OK | os.X_OK):
        raise SettingsError(f"TWOFACTOR_DATA_DIR: {settings.data_dir} is not writable by this user")


def load_keyring(settings: Settings) -> Keyring:
    """The configured keys; for the embedded default only, a local development key made on first run."""
    if not settings.keys and not settings.embedded:
        raise SettingsError("TWOFACTOR_KEYS is required with TWOFACTOR_DATABASE_URL (run `twofactor keygen`)")
    return check_keys(settings.keys or _dev_secrets(settings.data_dir)["keys"], settings.active_key_version)


def require_keys_of_database(
    db: Database, keyring: Keyring, settings: Settings, clock: Clock = system_clock
) -> None:
    """require_keys_for_stored_values. On the embedded default without TWOFACTOR_KEYS the key is
    the development one dev-secrets.json holds: a refusal then says what to do with that file
    (its loss made a new key), not with a setting nobody set."""
    try:
        require_keys_for_stored_values(db, keyring, clock)
    except SettingsError:
        if settings.keys or not settings.embedded:
            raise
        path = settings.data_dir / "dev-secrets.json"
        raise SettingsError(
            f"TWOFACTOR_DATA_DIR: the development key in {path} is not the key this database was "
            f"started with (the file replaced or deleted?): restore the file, or move {settings.data_dir} "
            "away and run `make serve` again to start afresh with a new database"
        ) from None


def load_tokens(settings: Settings) -> tuple[TokenSetting, ...]:
    """The configured API tokens; for the embedded default only, development tokens printed at start."""
    if settings.tokens:
        return settings.tokens
    if not settings.embedded:
        raise SettingsError(
            "TWOFACTOR_TOKENS is required with TWOFACTOR_DATABASE_URL (run `twofactor token`)"
        )
    dev = _dev_secrets(settings.data_dir)
    return tuple(
        TokenSetting(name, frozenset({scope}), hashlib.sha256(dev[f"{scope}_token"].encode()).digest())
        for name, scope in (("dev-app", "app"), ("dev-admin", "admin"))
    )


def dev_tokens(settings: Settings) -> dict[str, str]:
    """The development tokens of the embedded default, to print at start-up."""
    dev = _dev_secrets(settings.data_dir)
    return {"app": dev["app_token"], "admin": dev["admin_token"]}


def _dev_secrets(data_dir: Path) -> dict[str, str]:
    path = data_dir / "dev-secrets.json"
    if path.exists():
        return _read_dev_secrets(path)
    data_dir.mkdir(parents=True, exist_ok=True)
    values = {
        "keys": Keyring.new_key_spec(1),
        "app_token": "dev-app-" + secrets.token_urlsafe(24),
        "admin_token": "dev-admin-" + secrets.token_urlsafe(24),
    }
    # Create with owner-only permissions before writing anything into it.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        raise SettingsError(f"TWOFACTOR_DATA_DIR: cannot create {path} ({error.strerror})") from None
    with os.fdopen(fd, "w") as out:
        json.dump(values, out)
    log.warning(
        "created a development key and tokens in %s: for local use only; "
        "set TWOFACTOR_KEYS and TWOFACTOR_TOKENS in production",
        path,
    )
    return values


def _read_dev_secrets(path: Path) -> dict[str, str]:
    """The development secrets a first run wrote, or a SettingsError saying what to do instead."""
    try:
        values = json.loads(path.read_text())
    except OSError as error:  # a directory in its place, say
        problem = error.strerror or str(error)
    except ValueError:  # not JSON, or not text
        problem = "not JSON"
    else:
        problem = f"it needs {', '.join(_DEV_SECRETS)}"
        if isinstance(values, dict) and all(isinstance(values.get(n), str) for n in _DEV_SECRETS):
            try:
                Keyring.parse(values["keys"])
                return {n: values[n] for n in _DEV_SECRETS}
            except KeyringError:
                problem = "its development key is malformed"
    raise SettingsError(
        f"TWOFACTOR_DATA_DIR: {path} is not a usable development secrets file ({problem}): restore it, "
        f"or move {path.parent} away and run `make serve` again to start afresh with new development "
        "secrets (a new development key can't read data sealed with the old one)"
    )


_DEV_SECRETS = ("keys", "app_token", "admin_token")  # the fields of dev-secrets.json
