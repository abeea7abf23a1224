"""Enroll many users at once, through the domain layer, for the scale bench (issue 13).

    .venv/bin/python bench/populate.py --users 1000000 [--schema S --database-url URL --keys SPEC
                                       --email-every 10 --processes 2 --chunk 5000]

Writes, with PostgreSQL COPY into a schema the server has migrated (or migrates
here), the rows a user has after enrolling through the API: StartEnrollment and
ConfirmEnrollment of the authenticator app (the methods row with the TOTP secret
sealed by the keyring, the first backup codes as keyed hashes and ciphertexts,
the user row as the confirmation leaves it, the audit events). Every
`--email-every`-th user then also set an email address and enabled email
(SetContact, StartEnrollment and ConfirmEnrollment of EMAIL), and later got a
login code by email, delivered and used (the challenge row as delivery and
Verify leave it, within the last day: retention deletes challenges a day after
they expire, so that is what a running service holds). The secrets, codes and
hashes come from the same domain functions the use cases call (totp.new_secret,
Keyring.encrypt and keyed_hash, backup_codes.new_codes, backup_code_data,
challenge_data); tests/bench/test_populate.py checks the rows against a user
enrolled through the real server, and that populated users verify over gRPC.

Bulk, not one transaction per user: `--processes` processes each COPY chunks of
`--chunk` users (every table of a chunk in one transaction). The foreign keys
hold by construction (a user's rows go in with the user), so the loading
sessions skip their per-row checks and triggers (session_replication_role = replica: the
verify_state rows the triggers keep are written here); the
indexes are in place while loading, so they grow as under real enrollments.
User ids are `<prefix>` plus a keyed hash of the index: they arrive in random
key order, as real ids do.

Prints the time taken, and with --sizes the bytes per user of every table and
index (pg_total_relation_size / users).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import secrets
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from twofactor_server.domain import backup_codes, totp
from twofactor_server.domain.keyring import BACKUP_CODE, CHALLENGE_CODE, TOTP_SECRET, Keyring
from twofactor_server.settings import PolicySettings
from twofactor_server.storage.database import PostgresDatabase
from twofactor_server.usecases.backup_codes import backup_code_data
from twofactor_server.usecases.challenges import challenge_data

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ENROLLED_SECONDS_AGO = 120  # the confirmation; the Verify that follows uses a newer step
DAY_MS = 86_400_000

USER_COLUMNS = (
    "user_id",
    "email",
    "phone",
    "created_at",
    "last_verified_at",
    "failed_attempts",
    "locked_until",
    "totp_last_step",
    "backup_codes_generated_at",
    "credential_epoch",
)
METHOD_COLUMNS = ("user_id", "method", "enabled_at", "pending_since", "secret", "pending_secret")
BACKUP_COLUMNS = ("user_id", "position", "code_hash", "code_ciphertext", "used_at")
# What the triggers on backup_codes and methods keep (migration 0008); they don't fire under replica.
VERIFY_STATE_COLUMNS = ("user_id", "backup_codes_unused", "secret_version")
AUDIT_COLUMNS = ("at", "actor", "user_id", "action", "request_id", "outcome", "detail")
CHALLENGE_COLUMNS = (
    "challenge_id",
    "user_id",
    "method",
    "purpose",
    "destination",
    "code_hash",
    "code_ciphertext",
    "idempotency_key",
    "locale",
    "created_at",
    "expires_at",
    "attempts",
    "consumed_at",
    "superseded_at",
    "delivery_status",
    "delivery_attempts",
    "provider_message_id",
    "failure_reason",
    "updated_at",
    "publish_generation",
    "published_at",
    "lease_until",
    "next_publish_at",
)
TABLES = {
    "users": USER_COLUMNS,
    "methods": METHOD_COLUMNS,
    "backup_codes": BACKUP_COLUMNS,
    "verify_state": VERIFY_STATE_COLUMNS,
    "audit_events": AUDIT_COLUMNS,
    "challenges": CHALLENGE_COLUMNS,
}


@dataclass(frozen=True)
class Population:
    """What to write: users 0..count-1 of one run, keyed by `prefix`."""

    count: int
    prefix: str
    keys: str  # TWOFACTOR_KEYS: the keyring that seals the secrets, as the server is given it
    now_ms: int
    email_every: int = 10  # every n-th user also has email enabled (0: nobody)
    actor: str = "bench"  # the API token name the enrollments came from, for the audit events
    backup_code_count: int = PolicySettings.backup_code_count
    code_ttl_seconds: int = PolicySettings.code_ttl_seconds
    email_domain: str = "bench.invalid"

    def user_id(self, index: int) -> str:
        digest = hashlib.blake2b(index.to_bytes(8, "big"), key=self.prefix.encode()[:64], digest_size=8)
        return f"{self.prefix}{digest.hexdigest()}"

    def has_email(self, index: int) -> bool:
        return self.email_every > 0 and index % self.email_every == 0

    def email(self, index: int) -> str:
        return f"{self.prefix}{index}@{self.email_domain}"


@dataclass(frozen=True)
class PopulatedUser:
    """What the bench's clients need of a user: the secret the app holds, the address, the codes."""

    index: int
    user_id: str
    secret_base32: str
    last_step: int  # the step the enrollment was confirmed with: Verify needs a newer one
    email: str | None
    backup_codes: tuple[str, ...]


@dataclass
class Chunk:
    """The rows of some users, per table, ready to COPY."""

    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: {t: [] for t in TABLES})
    kept: list[PopulatedUser] = field(default_factory=list)


def user_rows(population: Population, keyring: Keyring, index: int, chunk: Chunk, keep: bool) -> None:
    """Add the rows of user `index` to `chunk`, as the API leaves them (see the module docstring)."""
    p = population
    user_id = p.user_id(index)
    now = p.now_ms - ENROLLED_SECONDS_AGO * 1000
    started, confirmed = now - _ms(5_000, 60_000), now
    step = totp.time_step(confirmed / 1000)
    secret = totp.new_secret()
    request = uuid.uuid4().hex
    audit = chunk.rows["audit_events"]

    # StartEnrollment(AUTHENTICATOR), then ConfirmEnrollment: the method, the first backup codes.
    chunk.rows["methods"].append(
        (
            user_id,
            "authenticator",
            confirmed,
            None,
            keyring.encrypt(secret, purpose=TOTP_SECRET, user_id=user_id),
            None,
        )
    )
    audit.append((started, p.actor, user_id, "enrollment_started", request, "success", "authenticator"))
    request = uuid.uuid4().hex
    audit.append((confirmed, p.actor, user_id, "enrollment_confirmed", request, "success", "authenticator"))
    codes = backup_codes.new_codes(p.backup_code_count)
    for position, code in enumerate(codes):
        chunk.rows["backup_codes"].append(
            (
                user_id,
                position,
                keyring.keyed_hash(backup_code_data(user_id, code), purpose=BACKUP_CODE),
                keyring.encrypt(code.encode(), purpose=BACKUP_CODE, user_id=user_id),
                None,
            )
        )
    audit.append(
        (confirmed, p.actor, user_id, "backup_codes_generated", request, "success", f"{len(codes)} codes")
    )
    epoch = 1  # the first confirmation moves it on once (the method and its backup codes together)
    methods_version = 2  # the methods row inserted (StartEnrollment), then enabled (ConfirmEnrollment)
    email = None
    last_verified = confirmed
    if p.has_email(index):
        email = p.email(index)
        # SetContact and the email enrollment, each with the step-up proof of a Verify before it.
        contact_at = confirmed + _ms(1_000, 30_000)
        mail_started = contact_at + _ms(1_000, 10_000)
        mail_confirmed = mail_started + _ms(5_000, 60_000)
        audit.append((contact_at, p.actor, user_id, "contact_changed", uuid.uuid4().hex, "success", "email"))
        audit.append(
            (mail_started, p.actor, user_id, "enrollment_started", uuid.uuid4().hex, "success", "email")
        )
        audit.append(
            (mail_confirmed, p.actor, user_id, "enrollment_confirmed", uuid.uuid4().hex, "success", "email")
        )
        chunk.rows["methods"].append((user_id, "email", mail_confirmed, None, None, None))
        epoch += 2  # SetContact, then enabling email
        methods_version += 2  # the email method inserted, then enabled
        # A login code by email within the last day: sent, delivered, used.
        sent = p.now_ms - _ms(2 * 3_600_000, DAY_MS)
        used = sent + _ms(5_000, 60_000)
        challenge_id = uuid.uuid4().hex
        code = "".join(secrets.choice("0123456789") for _ in range(6))
        chunk.rows["challenges"].append(
            (
                challenge_id,
                user_id,
                "email",
                "login",
                email,
                keyring.keyed_hash(challenge_data(challenge_id, code), purpose=CHALLENGE_CODE),
                None,  # the code's ciphertext is wiped once it is sent
                None,
                "en",
                sent,
                sent + p.code_ttl_seconds * 1000,
                0,
                used,
                None,
                "sent",
                1,
                f"<{uuid.uuid4().hex}@{p.email_domain}>",
                None,
                used,
                0,
                sent,
                None,
                None,
            )
        )
        audit.append((sent, p.actor, user_id, "code_sent", uuid.uuid4().hex, "success", "email"))
        last_verified = used
    chunk.rows["users"].append(
        (user_id, email, None, started, last_verified, 0, None, step, confirmed, epoch)
    )
    chunk.rows["verify_state"].append((user_id, len(codes), methods_version))
    if keep:
        chunk.kept.append(
            PopulatedUser(
                index,
                user_id,
                totp.to_base32(secret),
                step,
                email,
                tuple(backup_codes.display(c) for c in codes),
            )
        )


_RANDOM = secrets.SystemRandom()


def _ms(low: int, high: int) -> int:
    """A random offset (ms), so that timestamps spread as real ones do."""
    return _RANDOM.randint(low, high)


def copy_chunk(conn: psycopg.Connection[Any], chunk: Chunk) -> None:
    """COPY every table's rows of the chunk, in one transaction (users first)."""
    with conn.transaction(), conn.cursor() as cursor:
        for table, columns in TABLES.items():
            rows = chunk.rows[table]
            if not rows:
                continue
            statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
            )
            with cursor.copy(statement) as copy:
                for row in rows:
                    copy.write_row(row)


def load_range(
    database_url: str, population: Population, start: int, end: int, keep: Sequence[int] | frozenset[int]
) -> list[PopulatedUser]:
    """Write users start..end-1 (one transaction); return those whose index is in `keep`."""
    keyring = Keyring.parse(population.keys)
    chunk = Chunk()
    wanted = frozenset(keep)
    for index in range(start, end):
        user_rows(population, keyring, index, chunk, index in wanted)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # see the module docstring
        copy_chunk(conn, chunk)
    return chunk.kept


def _load_task(job: tuple[str, Population, int, int, frozenset[int]]) -> tuple[int, list[PopulatedUser]]:
    database_url, population, start, end, keep = job
    return end - start, load_range(database_url, population, start, end, keep)


def populate(
    database_url: str,
    population: Population,
    *,
    keep: Iterable[int] = (),
    processes: int = 1,
    chunk: int = 5000,
    progress: bool = False,
) -> list[PopulatedUser]:
    """Write every user of `population` into the database (its schema must be migrated); return the
    users whose index is in `keep`, in index order."""
    wanted = frozenset(keep)
    jobs = [
        (database_url, population, start, min(start + chunk, population.count), wanted)
        for start in range(0, population.count, chunk)
    ]
    kept: list[PopulatedUser] = []
    began = time.monotonic()
    if processes <= 1:
        results: Iterator[tuple[int, list[PopulatedUser]]] = map(_load_task, jobs)
        kept = _collect(results, population.count, began, progress)
    else:
        # spawn: the bench process may run threads (the SMTP sink) and gRPC; fork is not safe there.
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            kept = _collect(pool.imap_unordered(_load_task, jobs), population.count, began, progress)
    return sorted(kept, key=lambda user: user.index)


def _collect(
    results: Iterable[tuple[int, list[PopulatedUser]]], total: int, began: float, progress: bool
) -> list[PopulatedUser]:
    kept: list[PopulatedUser] = []
    done = 0
    for count, users in results:
        done += count
        kept.extend(users)
        if progress:
            rate = done / max(time.monotonic() - began, 1e-9)
            print(f"\rpopulated {done:>9,} of {total:,} users ({rate:,.0f}/s)", end="", flush=True)
    if progress:
        print(flush=True)
    return kept


def spread(count: int, sample: int, *, among: Iterable[int] | None = None) -> list[int]:
    """`sample` indices spread evenly over 0..count-1 (or over `among`): users from the whole
    table, not only its newest (and most cached) rows."""
    pool = list(range(count)) if among is None else list(among)
    if sample >= len(pool):
        return pool
    stride = len(pool) / sample
    return [pool[int(i * stride)] for i in range(sample)]


def email_indices(population: Population) -> range:
    if population.email_every <= 0:
        return range(0)
    return range(0, population.count, population.email_every)


def relation_sizes(database_url: str, schema: str) -> list[tuple[str, str, int]]:
    """(table, relation, bytes) of every table (heap with TOAST) and each of its indexes in the schema."""
    query = (
        "SELECT c.relname AS tbl, c.relname AS rel, pg_table_size(c.oid) AS bytes FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(s)s AND c.relkind = 'r' "
        "UNION ALL SELECT t.relname, i.relname, pg_relation_size(i.oid) FROM pg_index x "
        "JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
        "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %(s)s ORDER BY 1, 2"
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        return [(str(t), str(r), int(b)) for t, r, b in conn.execute(query, {"s": schema}).fetchall()]


def print_sizes(database_url: str, schema: str, users: int) -> None:
    sizes = relation_sizes(database_url, schema)
    total = sum(b for _, _, b in sizes)
    print(f"{'table':<16} {'relation':<34} {'MB':>9} {'bytes/user':>11}")
    for table, relation, size in sizes:
        print(f"{table:<16} {relation:<34} {size / 2**20:9.1f} {size / users:11.1f}")
    print(f"{'total':<51} {total / 2**20:9.1f} {total / users:11.1f}")


def migrate(database_url: str) -> None:
    db = PostgresDatabase(database_url, pool_size=1)
    try:
        db.migrate()
    finally:
        db.close()


def schema_url(database_url: str, schema: str) -> str:
    separator = "&" if "?" in database_url else "?"
    return f"{database_url}{separator}options=-csearch_path%3D{schema}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument(
        "--schema", help="an existing schema (migrated here); default: a new tf_bench_<random>"
    )
    parser.add_argument("--keep-schema", action="store_true", help="leave the schema (default: drop it)")
    parser.add_argument("--keys", help="TWOFACTOR_KEYS (default: a new key)")
    parser.add_argument("--email-every", type=int, default=10)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk", type=int, default=5000)
    parser.add_argument("--sizes", action="store_true", help="print bytes per user of each table and index")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    args = parser.parse_args(argv)
    schema = args.schema or f"tf_bench_{uuid.uuid4().hex[:10]}"
    created = args.schema is None
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    url = schema_url(args.database_url, schema)
    try:
        migrate(url)
        population = Population(
            args.users,
            prefix=f"pop-{uuid.uuid4().hex[:6]}-",
            keys=args.keys or Keyring.new_key_spec(1),
            now_ms=int(time.time() * 1000),
            email_every=args.email_every,
        )
        began = time.monotonic()
        populate(url, population, processes=args.processes, chunk=args.chunk, progress=True)
        took = time.monotonic() - began
        print(f"{args.users:,} users in {took:.1f} s ({args.users / took:,.0f} users/s) into schema {schema}")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE")
        if args.sizes:
            print_sizes(args.database_url, schema, args.users)
    finally:
        if created and not args.keep_schema:
            with psycopg.connect(args.database_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
