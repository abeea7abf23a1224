"""Where an enrollment's CPU goes, without gRPC: the use cases against PostgreSQL.

    .venv/bin/python bench/enrollment_path.py [--users N --rounds R --profile --database-url URL]

In one process, on a fresh schema (dropped at the end), R rounds of: N users
through Enrollment.start_enrollment(AUTHENTICATOR) with no QR code image, then
N with the PNG, N with the SVG, and Enrollment.confirm_enrollment for the users
of the first batch (the first method, so it brings the 10 backup codes and a
step-up token). Prints the CPU per call of this process and of this run's
PostgreSQL backends (told by application_name; /proc/PID/schedstat), and apart
from them the QR code pieces (encoding the symbol, drawing the PNG and the SVG) and the
backup-code set (generating, hashing and sealing 10 codes). With --profile,
cProfile (CPU time) of the last round's confirmations and starts.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import uuid
from collections.abc import Callable

import psycopg
import pyotp

from twofactor_server.domain import backup_codes, qr_codes
from twofactor_server.domain.keyring import BACKUP_CODE, Keyring
from twofactor_server.domain.models import Caller, ConfirmResult
from twofactor_server.settings import PolicySettings
from twofactor_server.storage.database import PostgresDatabase
from twofactor_server.usecases.backup_codes import BackupCodes, backup_code_data
from twofactor_server.usecases.challenges import Challenges
from twofactor_server.usecases.enrollment import Enrollment
from twofactor_server.usecases.notices import Notices

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CALLER = Caller(actor="bench", request_id="bench")
URI = (
    "otpauth://totp/twofactor:bench-0a1b2c3d-000123?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP&issuer=twofactor"
)


class NoDispatch:
    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        raise AssertionError("the bench sends no email or SMS")


class Meter:
    """CPU seconds of the run's PostgreSQL backends."""

    def __init__(self, database_url: str, application_name: str) -> None:
        self._url = database_url
        self._name = application_name

    def postgres(self) -> float:
        with psycopg.connect(self._url, autocommit=True) as conn:
            pids = [
                pid
                for (pid,) in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self._name,)
                )
            ]
        postgres = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/schedstat") as stat:
                    postgres += int(stat.read().split()[0])
            except OSError:
                pass
        return postgres / 1e9


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--users", type=int, default=300, help="users per batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile the last round")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    args = parser.parse_args(argv)

    schema = f"tf_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    db = PostgresDatabase(
        f"{args.database_url}?options=-csearch_path%3D{schema}&application_name={schema}", pool_size=2
    )
    try:
        db.migrate()
        run(db, Meter(args.database_url, schema), args)
    finally:
        db.close()
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


def run(db: PostgresDatabase, meter: Meter, args: argparse.Namespace) -> None:
    keyring = Keyring.parse(Keyring.new_key_spec(1))
    policy = PolicySettings()
    challenges = Challenges(db, keyring, policy, NoDispatch(), time.time)
    notices = Notices(db, keyring, policy, NoDispatch(), time.time)  # the users have no email address
    codes = BackupCodes(db, keyring, policy, notices, time.time)
    enrollment = Enrollment(db, keyring, policy, challenges, codes, notices, time.time)
    for number in range(1, args.rounds + 1):
        one_round(enrollment, meter, number, args.users, profile=args.profile and number == args.rounds)

    rows = qr_codes.module_rows(URI)
    print("apart (CPU µs per call, this process):")
    print(f"  encode the symbol (zxing-cpp)     {cpu(lambda: qr_codes.module_rows(URI)):8.0f}")
    print(f"  draw the PNG                      {cpu(lambda: qr_codes.png_image(rows)):8.0f}")
    print(f"  draw the SVG                      {cpu(lambda: qr_codes.svg_document(rows)):8.0f}")
    print(f"  10 new backup codes               {cpu(lambda: backup_codes.new_codes(10)):8.0f}")
    print(f"  hash and seal 10 codes            {cpu(lambda: seal(keyring)):8.0f}")


def one_round(enrollment: Enrollment, meter: Meter, number: int, n: int, *, profile: bool) -> None:
    users = [f"u-{number}-{i:06d}" for i in range(n)]
    secrets: list[str] = []

    def start(formats: tuple[str, ...], prefix: str) -> None:
        for i in range(n):
            setup = enrollment.start_enrollment(
                f"{prefix}-{number}-{i:06d}",
                "authenticator",
                account_name="",
                locale="",
                verification_token="",
                caller=CALLER,
                qr_formats=formats,
            ).authenticator
            assert setup is not None
            if not formats:
                secrets.append(setup.secret_base32)

    def confirm() -> None:
        for user_id, secret in zip(users, secrets, strict=True):
            done = enrollment.confirm_enrollment(
                user_id, "authenticator", pyotp.TOTP(secret).now(), caller=CALLER
            )
            assert done.result is ConfirmResult.CONFIRMED and len(done.backup_codes) == 10

    print(f"round {number} ({n} calls each), CPU µs per call: this process / PostgreSQL")
    print(f"  start_enrollment, no image        {per_call(meter, n, lambda: start((), 'u'))}")
    print(f"  start_enrollment + PNG            {per_call(meter, n, lambda: start(('png',), 'p'))}")
    print(f"  start_enrollment + SVG            {per_call(meter, n, lambda: start(('svg',), 's'))}")
    profiler = cProfile.Profile(time.process_time) if profile else None
    if profiler is not None:
        profiler.enable()
    print(f"  confirm_enrollment (first method) {per_call(meter, n, confirm)}")
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


def seal(keyring: Keyring) -> None:
    for code in backup_codes.new_codes(10):
        keyring.keyed_hash(backup_code_data("u", code), purpose=BACKUP_CODE)
        keyring.encrypt(code.encode(), purpose=BACKUP_CODE, user_id="u")


def per_call(meter: Meter, n: int, work: Callable[[], None]) -> str:
    pg0 = meter.postgres()
    here0 = time.process_time()
    work()
    here1 = time.process_time()
    pg1 = meter.postgres()
    return f"{(here1 - here0) / n * 1e6:8.0f} / {(pg1 - pg0) / n * 1e6:6.0f}"


def cpu(work: Callable[[], object], n: int = 200) -> float:
    work()
    began = time.process_time()
    for _ in range(n):
        work()
    return (time.process_time() - began) / n * 1e6


if __name__ == "__main__":
    raise SystemExit(main())
