"""Telling a database that refuses us from one that does not answer (yet), at start.

psycopg_pool retries every failed connection in the background and start-up waits for one: right
for a database that is starting too, wrong for a connection string that can never work. There
the operator saw ten seconds of pool warnings, then "did not answer: is it running?", exit 1.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg.conninfo import conninfo_to_dict

from twofactor_server.domain.errors import StorageUnavailable
from twofactor_server.setting_values import SettingsError
from twofactor_server.storage.migrator import pending_migrations
from twofactor_server.storage.units import Database

log = logging.getLogger(__name__)

# A server that answers FATAL with one of these accepts connections later: an outage to wait out.
# Any other FATAL (no such database or role, a password or a host refused by pg_hba.conf) is a
# configuration to fix, as is a connection string libpq can't read.
_PASSING = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is not yet accepting connections",
    "the database system is in recovery mode",
    "too many clients",
    "remaining connection slots are reserved",
)


def raise_if_refused(url: str, timeout: float) -> None:
    """Connect once; SettingsError (exit 2) when the database's refusal, or libpq's, is permanent."""
    try:
        psycopg.connect(url, connect_timeout=max(1, round(timeout))).close()
    except psycopg.Error as error:
        reason = _permanent_reason(str(error))
        if reason is not None:
            where = database_location(url)
            raise SettingsError(
                f"TWOFACTOR_DATABASE_URL: {where} refused the connection: {reason}; fix the URL "
                "(host, port, database, user, password, options) or the database's roles"
            ) from None


def _permanent_reason(message: str) -> str | None:
    if message.startswith("connection is bad:"):  # libpq could not read an option: never connects
        return message.removeprefix("connection is bad:").strip().splitlines()[0]
    _, fatal, reason = message.partition("FATAL:")
    if fatal and not any(passing in reason for passing in _PASSING):
        return reason.strip().splitlines()[0]
    return None


def database_location(url: str) -> str:
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return "the database"
    host, port, name = parts.get("host", "localhost"), parts.get("port", 5432), parts.get("dbname", "")
    return f"the database at {host}:{port}/{name}"


def pending_migrations_at_start(db: Database, url: str, timeout: float) -> list[str]:
    """pending_migrations, for a server or worker starting with migrations off: a database that
    refuses the connection for good is a SettingsError (exit 2) here too, as in migrate()."""
    try:
        return pending_migrations(db)
    except StorageUnavailable:
        if url:
            raise_if_refused(url, timeout)
            log_no_answer_at_start(url)
        raise


def log_no_answer_at_start(url: str, waited: str = "") -> None:
    """The one line of a database that did not answer at start (`waited`: "within 10 s ")."""
    log.error(
        "%s did not answer %sat start: is it running, and is TWOFACTOR_DATABASE_URL right?",
        database_location(url),
        waited,
    )


def require_readable_url(url: str) -> None:
    """SettingsError for a URL that libpq can't read, or reads otherwise than it was meant: a
    password with an unencoded % or / (base64 has /). libpq's own message, which the pool logs
    on every retry, quotes the password, and a misread URL would be waited for as a database
    that does not answer: refused at once, naming no part of the URL. An unencoded @ too."""
    rest = url.partition("://")[2].split("?", 1)[0]
    authority = rest.split("/", 1)[0]
    try:
        conninfo_to_dict(url)
        # A / in the user info cuts it short; libpq ends it at the first @, reading the rest of
        # a password with an @ as the host (and logging it as the host that did not answer).
        readable = ("@" not in rest or "@" in authority) and authority.count("@") <= 1
    except psycopg.Error:
        readable = False
    if not readable:
        raise SettingsError(
            "TWOFACTOR_DATABASE_URL: libpq can't read this URL: percent-encode the user name and "
            "password (% as %25, / as %2F, @ as %40, : as %3A)"
        )


def migration_refused(url: str, error: Exception) -> SettingsError:
    """The database refused a migration for good (the role may not create tables): exit 2, as a
    refused connection, rather than a traceback, or a worker serving on the old schema."""
    reason = str(error).strip().splitlines()[0]
    return SettingsError(
        f"TWOFACTOR_DATABASE_URL: {database_location(url)} refused the migrations: {reason}; run "
        "`twofactor migrate` as a role that may create tables, then start with "
        "TWOFACTOR_MIGRATE_ON_START=false"
    )
